-- The console's listings filtered by entrypoint read these newest first and
-- stop at a page, instead of walking every newer row of the created_at
-- index until they find one of theirs. Neither column is ever updated, so
-- the RUNNING -> SUCCESS/FAILED update can stay HOT; an insert pays one
-- more index entry (measured: README, "Speed").
CREATE INDEX tasks_entrypoint_created_at_idx ON kser.tasks (entrypoint, created_at);
CREATE INDEX operations_entrypoint_created_at_idx ON kser.operations (entrypoint, created_at);

-- Tasks in any state but SUCCESS, newest first: few rows. The dashboard
-- counts those in other states than SUCCESS or FAILED here (index-only), and
-- a listing filtered by a rare state (CANCELLED, RUNNING, or FAILED in a big
-- entrypoint) reads only these instead of every newer row. Its predicate
-- reads `status`, so the final update of a row that had one (PENDING from
-- `send`, a step, a RUNNING mark) is no longer HOT; the insert of a SUCCESS
-- row adds no entry (measured: README, "Speed").
CREATE INDEX tasks_not_success_idx ON kser.tasks (created_at, status)
    WHERE status <> 'SUCCESS';

-- What the dashboard counts, kept as tasks end instead of counted from
-- kser.tasks: rows of tasks that reached SUCCESS or FAILED, per minute,
-- entrypoint and state, with the latest error. Written in the same
-- statement (or transaction) as the final states themselves, from the rows
-- that statement wrote: a write fenced out counts nothing, a retry (PENDING)
-- is not an end. A task that ends twice (FAILED, then SUCCESS after a
-- resume) counts once in each. A writer holds the rows it adds to until it
-- commits, so each count goes to one of 8 shards, picked by the writer's
-- backend: concurrent transactions (transactional tasks, several workers)
-- seldom wait for each other; readers sum the shards.
CREATE TABLE kser.task_minutes (
    minute      timestamptz NOT NULL,
    entrypoint  text NOT NULL,
    status      text NOT NULL CHECK (status IN ('SUCCESS', 'FAILED')),
    shard       smallint NOT NULL,
    tasks       bigint NOT NULL,
    last_error  text,
    last_at     timestamptz NOT NULL,
    PRIMARY KEY (minute, entrypoint, status, shard)
);

COMMENT ON TABLE kser.task_minutes IS 'Tasks that ended SUCCESS or FAILED, per minute and entrypoint: the console''s dashboard.';
COMMENT ON COLUMN kser.task_minutes.minute IS 'The minute they ended in (finished_at truncated).';
COMMENT ON COLUMN kser.task_minutes.shard IS 'Which of 8 rows of the minute, entrypoint and state the count went to (the writer''s backend pid mod 8): sum over it.';
COMMENT ON COLUMN kser.task_minutes.tasks IS 'How many ended so in that minute.';
COMMENT ON COLUMN kser.task_minutes.last_error IS 'The error of the latest FAILED one; NULL for SUCCESS.';
COMMENT ON COLUMN kser.task_minutes.last_at IS 'When the latest of them ended.';
