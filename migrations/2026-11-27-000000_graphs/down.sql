DROP TABLE kser.steps;
UPDATE kser.tasks SET status = 'CANCELLED' WHERE status IN ('WAITING', 'SKIPPED');
ALTER TABLE kser.tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE kser.tasks ADD CONSTRAINT tasks_status_check
    CHECK (status IN ('PENDING', 'RUNNING', 'SUCCESS', 'FAILED', 'CANCELLED'));
UPDATE kser.operations SET status = 'FAILED' WHERE status = 'COMPENSATED';
UPDATE kser.operations SET status = 'RUNNING' WHERE status = 'COMPENSATING';
ALTER TABLE kser.operations DROP CONSTRAINT operations_status_check;
ALTER TABLE kser.operations ADD CONSTRAINT operations_status_check
    CHECK (status IN ('PENDING', 'RUNNING', 'SUCCESS', 'FAILED', 'CANCELLED'));
ALTER TABLE kser.operations DROP COLUMN graph;
