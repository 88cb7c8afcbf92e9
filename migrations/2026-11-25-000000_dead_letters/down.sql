DROP TABLE kser.dead_letters;
