DROP TABLE kser.task_attempts;
ALTER TABLE kser.tasks DROP COLUMN next_attempt_at;
DROP INDEX kser.outbox_available_at_idx;
ALTER TABLE kser.outbox DROP COLUMN available_at;
