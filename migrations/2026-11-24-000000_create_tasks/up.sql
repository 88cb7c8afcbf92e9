-- kser keeps its tables in their own schema, so they never collide with the
-- application's. Query them as kser.tasks.
CREATE SCHEMA IF NOT EXISTS kser;

CREATE TABLE kser.tasks (
    uuid            text        PRIMARY KEY,
    entrypoint      text        NOT NULL,
    status          text        NOT NULL DEFAULT 'PENDING'
                                CHECK (status IN ('PENDING', 'RUNNING', 'SUCCESS', 'FAILED')),
    params          jsonb       NOT NULL DEFAULT '{}',
    metadata        jsonb       NOT NULL DEFAULT '{}',
    result          jsonb,
    error           text,
    attempts        integer     NOT NULL DEFAULT 0,
    worker          text,
    topic           text,
    kafka_partition integer,
    kafka_offset    bigint,
    enqueued_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
)
-- Room on each page lets the RUNNING -> SUCCESS/FAILED update stay on the
-- page without touching the indexes (a HOT update): the worker's hot path.
WITH (fillfactor = 70);

-- `list` reads newest first. No index covers `status`: updating an indexed
-- column would rule out HOT updates.
CREATE INDEX tasks_created_at_idx ON kser.tasks (created_at DESC);

COMMENT ON TABLE kser.tasks IS 'One row per kser message (task run): its state, parameters and result.';
COMMENT ON COLUMN kser.tasks.uuid IS 'The message uuid.';
COMMENT ON COLUMN kser.tasks.status IS 'PENDING (sent, not yet picked up), RUNNING, SUCCESS (retcode 0) or FAILED.';
COMMENT ON COLUMN kser.tasks.result IS 'The task result in the kser wire format: uuid, retcode, stdout, stderr, retval.';
COMMENT ON COLUMN kser.tasks.error IS 'Why the task failed; NULL unless FAILED.';
COMMENT ON COLUMN kser.tasks.attempts IS 'How many times a worker started this message (redeliveries count).';
COMMENT ON COLUMN kser.tasks.worker IS 'The worker (host:pid) that ran it last.';
COMMENT ON COLUMN kser.tasks.enqueued_at IS 'The Kafka record timestamp: when the message was produced.';
COMMENT ON COLUMN kser.tasks.started_at IS 'When a worker last started it; started_at - enqueued_at is the time spent queued.';
COMMENT ON COLUMN kser.tasks.finished_at IS 'When it reached SUCCESS or FAILED; finished_at - started_at is the run time.';
