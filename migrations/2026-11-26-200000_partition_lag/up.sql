-- Lag per assigned partition, as the worker's last heartbeat saw it
-- (librdkafka's statistics): what the console's dashboard lists.
ALTER TABLE kser.workers ADD COLUMN lag_by_partition jsonb NOT NULL DEFAULT '{}';

COMMENT ON COLUMN kser.workers.lag_by_partition IS 'Records behind per assigned partition: {"topic/partition": lag}.';
