DROP TABLE kser.task_minutes;
DROP INDEX kser.tasks_not_success_idx;
DROP INDEX kser.operations_entrypoint_created_at_idx;
DROP INDEX kser.tasks_entrypoint_created_at_idx;
