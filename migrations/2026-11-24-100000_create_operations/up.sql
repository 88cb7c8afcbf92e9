-- Operations: ordered sequences of tasks, each step its own Kafka message.
CREATE TABLE kser.operations (
    uuid        text        PRIMARY KEY,
    entrypoint  text        NOT NULL,
    status      text        NOT NULL DEFAULT 'PENDING'
                            CHECK (status IN ('PENDING', 'RUNNING', 'SUCCESS', 'FAILED', 'CANCELLED')),
    params      jsonb       NOT NULL DEFAULT '{}',
    metadata    jsonb       NOT NULL DEFAULT '{}',
    result      jsonb,
    error       text,
    steps       integer     NOT NULL DEFAULT 0,
    worker      text,
    topic       text,
    enqueued_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX operations_created_at_idx ON kser.operations (created_at DESC);

COMMENT ON TABLE kser.operations IS 'One row per operation: a sequence of tasks (kser.tasks rows with its uuid in operation_uuid).';
COMMENT ON COLUMN kser.operations.status IS 'PENDING, RUNNING, SUCCESS (every step succeeded), FAILED (a step failed, or the operation could not be built) or CANCELLED.';
COMMENT ON COLUMN kser.operations.result IS 'The results of the finished steps merged in order (kser wire format).';
COMMENT ON COLUMN kser.operations.steps IS 'How many tasks the operation has.';

-- Steps are tasks that belong to an operation, at a position (0-based).
ALTER TABLE kser.tasks
    ADD COLUMN operation_uuid text REFERENCES kser.operations (uuid) ON DELETE CASCADE,
    ADD COLUMN position integer;
ALTER TABLE kser.tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE kser.tasks ADD CONSTRAINT tasks_status_check
    CHECK (status IN ('PENDING', 'RUNNING', 'SUCCESS', 'FAILED', 'CANCELLED'));
CREATE UNIQUE INDEX tasks_operation_position_idx ON kser.tasks (operation_uuid, position)
    WHERE operation_uuid IS NOT NULL;

COMMENT ON COLUMN kser.tasks.operation_uuid IS 'The operation this task is a step of; NULL for a standalone task.';
COMMENT ON COLUMN kser.tasks.position IS 'The step''s place in its operation, from 0.';

-- Messages to publish, written in the same transaction as the state change
-- that calls for them, and deleted once the broker has them.
CREATE TABLE kser.outbox (
    id             bigserial   PRIMARY KEY,
    topic          text        NOT NULL,
    message_key    text,
    payload        text        NOT NULL,
    operation_uuid text        REFERENCES kser.operations (uuid) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    claimed_until  timestamptz
);

CREATE INDEX outbox_operation_idx ON kser.outbox (operation_uuid);

COMMENT ON TABLE kser.outbox IS 'Messages waiting to be published to Kafka by a worker (transactional outbox).';
COMMENT ON COLUMN kser.outbox.claimed_until IS 'A worker is publishing the row until then; after that another may.';
