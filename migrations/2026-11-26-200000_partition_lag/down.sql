ALTER TABLE kser.workers DROP COLUMN lag_by_partition;
