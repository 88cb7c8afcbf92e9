-- Limits across the fleet: a task's `MAX_CONCURRENCY` and the resource
-- pools it `ACQUIRES` are pools with a capacity. A run holds a lease on each
-- pool it needs; a task that finds no room waits in kser.waiters, its
-- record's offset committed, until a lease is released or expires.
CREATE TABLE kser.pools (
    name       text        PRIMARY KEY,
    capacity   integer     NOT NULL CHECK (capacity >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE kser.leases (
    pool        text        NOT NULL REFERENCES kser.pools (name) ON DELETE CASCADE,
    task_uuid   text        NOT NULL,
    units       integer     NOT NULL CHECK (units > 0),
    worker      text,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (pool, task_uuid)
);

CREATE INDEX leases_task_idx ON kser.leases (task_uuid);

CREATE TABLE kser.waiters (
    seq            bigserial   PRIMARY KEY,
    task_uuid      text        NOT NULL UNIQUE REFERENCES kser.tasks (uuid) ON DELETE CASCADE,
    entrypoint     text        NOT NULL,
    pools          text[]      NOT NULL,
    units          integer[]   NOT NULL,
    topic          text        NOT NULL,
    message_key    text,
    payload        text        NOT NULL,
    operation_uuid text        REFERENCES kser.operations (uuid) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE kser.pools IS 'Capacities shared by the whole fleet: entrypoint:NAME for a task''s MAX_CONCURRENCY, or a resource pool a task ACQUIRES. Written by the workers from their registries when they start.';
COMMENT ON TABLE kser.leases IS 'Units of a pool held by one task while it runs. A worker renews its leases while it lives; a lease past expires_at no longer counts (its worker died).';
COMMENT ON COLUMN kser.leases.worker IS 'The worker running the task; NULL while the lease is reserved for a waiting task whose message is on its way.';
COMMENT ON TABLE kser.waiters IS 'Tasks that found no room in a pool, in arrival order (seq): each is sent again, its lease reserved, when room frees up for it.';
COMMENT ON COLUMN kser.waiters.payload IS 'The message to send again (plain JSON; a worker with a key encrypts it when it publishes).';
