-- Retention (`kser prune`, `worker --retention`) walks old rows oldest
-- first, a batch at a time, resuming after the last (created_at, uuid) it
-- saw: that needs the pair in one index. It replaces the created_at index
-- (`list` reads the same index backwards), so the hot path's inserts keep
-- the same number of indexes; neither column is ever updated, so the
-- RUNNING -> final update stays HOT.
DROP INDEX kser.tasks_created_at_idx;
CREATE INDEX tasks_created_at_uuid_idx ON kser.tasks (created_at, uuid);

DROP INDEX kser.operations_created_at_idx;
CREATE INDEX operations_created_at_uuid_idx ON kser.operations (created_at, uuid);
