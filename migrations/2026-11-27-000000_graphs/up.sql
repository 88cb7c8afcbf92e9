-- Graph operations: named steps with dependencies and per-step policies,
-- and the compensations that undo succeeded steps.
ALTER TABLE kser.operations ADD COLUMN graph boolean NOT NULL DEFAULT false;
ALTER TABLE kser.operations DROP CONSTRAINT operations_status_check;
ALTER TABLE kser.operations ADD CONSTRAINT operations_status_check
    CHECK (status IN ('PENDING', 'RUNNING', 'SUCCESS', 'FAILED', 'CANCELLED',
                      'COMPENSATING', 'COMPENSATED'));

ALTER TABLE kser.tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE kser.tasks ADD CONSTRAINT tasks_status_check
    CHECK (status IN ('PENDING', 'RUNNING', 'SUCCESS', 'FAILED', 'CANCELLED', 'WAITING', 'SKIPPED'));

-- One row per task of a graph operation: its place in the graph.
CREATE TABLE kser.steps (
    task_uuid      text    PRIMARY KEY REFERENCES kser.tasks (uuid) ON DELETE CASCADE,
    operation_uuid text    NOT NULL REFERENCES kser.operations (uuid) ON DELETE CASCADE,
    name           text    NOT NULL,
    after          text[]  NOT NULL DEFAULT '{}',
    join_any       boolean NOT NULL DEFAULT false,
    on_failure     text    NOT NULL DEFAULT 'fail'
                           CHECK (on_failure IN ('fail', 'continue', 'compensate')),
    delay_ms       bigint  NOT NULL DEFAULT 0,
    recovery       text    NOT NULL DEFAULT 'resume' CHECK (recovery IN ('resume', 'rerun', 'skip')),
    compensation   jsonb,
    compensates    boolean NOT NULL DEFAULT false
);

CREATE UNIQUE INDEX steps_operation_name_idx ON kser.steps (operation_uuid, name, compensates);

COMMENT ON COLUMN kser.operations.graph IS 'Whether the steps form a graph (kser.steps) rather than a list run in order.';
COMMENT ON COLUMN kser.operations.status IS 'PENDING, RUNNING, SUCCESS, FAILED, CANCELLED, COMPENSATING (undoing the steps that succeeded) or COMPENSATED.';
COMMENT ON COLUMN kser.tasks.status IS 'PENDING, RUNNING, SUCCESS, FAILED, CANCELLED; for graph steps also WAITING (for its dependencies) and SKIPPED (by resume).';
COMMENT ON TABLE kser.steps IS 'The graph of a graph operation: one row per task, with its name, dependencies and policies.';
COMMENT ON COLUMN kser.steps.after IS 'The names of the steps this one runs after.';
COMMENT ON COLUMN kser.steps.join_any IS 'Runs once the first dependency succeeded, rather than all of them.';
COMMENT ON COLUMN kser.steps.compensation IS 'The task that undoes this step: {"entrypoint", "params"}.';
COMMENT ON COLUMN kser.steps.compensates IS 'This task is the compensation of the step named `name`.';
