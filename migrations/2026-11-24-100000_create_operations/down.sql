DROP TABLE kser.outbox;
DROP INDEX kser.tasks_operation_position_idx;
ALTER TABLE kser.tasks DROP CONSTRAINT tasks_status_check;
UPDATE kser.tasks SET status = 'FAILED' WHERE status = 'CANCELLED';
ALTER TABLE kser.tasks ADD CONSTRAINT tasks_status_check
    CHECK (status IN ('PENDING', 'RUNNING', 'SUCCESS', 'FAILED'));
ALTER TABLE kser.tasks DROP COLUMN position, DROP COLUMN operation_uuid;
DROP TABLE kser.operations;
