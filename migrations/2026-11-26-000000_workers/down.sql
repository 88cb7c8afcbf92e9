DROP TABLE kser.controls;
DROP TABLE kser.workers;
