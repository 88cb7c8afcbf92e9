DROP INDEX kser.operations_created_at_uuid_idx;
CREATE INDEX operations_created_at_idx ON kser.operations (created_at DESC);

DROP INDEX kser.tasks_created_at_uuid_idx;
CREATE INDEX tasks_created_at_idx ON kser.tasks (created_at DESC);
