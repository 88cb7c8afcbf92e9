DROP TABLE kser.schedules;
