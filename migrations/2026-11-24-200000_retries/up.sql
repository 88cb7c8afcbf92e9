-- Delayed messages (retries, `send --delay`) wait in the outbox until due.
ALTER TABLE kser.outbox ADD COLUMN available_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX outbox_available_at_idx ON kser.outbox (available_at);
COMMENT ON COLUMN kser.outbox.available_at IS 'Not published before this time (a retry''s backoff, a delayed send).';

ALTER TABLE kser.tasks ADD COLUMN next_attempt_at timestamptz;
COMMENT ON COLUMN kser.tasks.next_attempt_at IS 'When a PENDING task waiting for a retry or a delayed start is due.';

-- Every attempt that failed and was retried; the last attempt is the task row.
CREATE TABLE kser.task_attempts (
    task_uuid   text        NOT NULL REFERENCES kser.tasks (uuid) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    worker      text,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL,
    retcode     integer,
    error       text,
    PRIMARY KEY (task_uuid, attempt)
);
COMMENT ON TABLE kser.task_attempts IS 'Failed attempts of tasks that were retried: number, times, error. The final attempt is in kser.tasks.';
