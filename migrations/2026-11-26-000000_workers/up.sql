-- The fleet: every worker records itself here and beats on a timer; any live
-- worker marks LOST those whose heartbeat stopped. `kser workers` reads it.
CREATE TABLE kser.workers (
    id             text        PRIMARY KEY,
    host           text        NOT NULL,
    pid            integer     NOT NULL,
    consumer_group text        NOT NULL,
    topics         text[]      NOT NULL,
    entrypoints    jsonb       NOT NULL DEFAULT '[]',
    version        text        NOT NULL,
    state          text        NOT NULL CHECK (state IN
                       ('STARTING', 'READY', 'ACTIVE', 'PAUSED', 'DRAINING', 'STOPPED', 'LOST')),
    paused         text[]      NOT NULL DEFAULT '{}',
    started_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    lost_after_ms  bigint      NOT NULL,
    assigned       jsonb       NOT NULL DEFAULT '{}',
    partitions     integer     NOT NULL DEFAULT 0,
    in_flight      integer     NOT NULL DEFAULT 0,
    counters       jsonb       NOT NULL DEFAULT '{}',
    lag            bigint,
    throughput     double precision NOT NULL DEFAULT 0,
    desired        integer
);

CREATE INDEX workers_group_idx ON kser.workers (consumer_group, state);

COMMENT ON TABLE kser.workers IS 'Workers and their life cycle, one row per worker id; `kser workers` shows them.';
COMMENT ON COLUMN kser.workers.entrypoints IS 'The entrypoints the worker registered: name, kind, JSON schema of the parameters.';
COMMENT ON COLUMN kser.workers.state IS 'STARTING, READY (in the group, idle), ACTIVE, PAUSED, DRAINING, STOPPED, or LOST (no heartbeat for lost_after_ms; marked by any live worker).';
COMMENT ON COLUMN kser.workers.paused IS 'What the worker holds back: entrypoint names, or * for everything.';
COMMENT ON COLUMN kser.workers.assigned IS 'Assigned partitions: {topic: [partition...]}.';
COMMENT ON COLUMN kser.workers.partitions IS 'How many partitions its topics have, which caps the useful number of workers.';
COMMENT ON COLUMN kser.workers.lag IS 'Records behind on its assigned partitions (librdkafka statistics; NULL when not known yet).';
COMMENT ON COLUMN kser.workers.throughput IS 'Tasks finished per second, averaged over the last minute.';
COMMENT ON COLUMN kser.workers.desired IS 'How many workers of its group would drain the backlog within its drain target.';

-- Runtime control, durable: a worker started later obeys it. A pause holds
-- back an entrypoint (NULL: every one) on a worker (NULL: every worker) until
-- `kser control resume` deletes it; a drain asks one worker to finish its
-- work, leave the group and exit, and is deleted by that worker.
CREATE TABLE kser.controls (
    id         bigserial   PRIMARY KEY,
    action     text        NOT NULL CHECK (action IN ('pause', 'drain')),
    worker_id  text,
    entrypoint text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (action <> 'drain' OR (worker_id IS NOT NULL AND entrypoint IS NULL)),
    UNIQUE NULLS NOT DISTINCT (action, worker_id, entrypoint)
);

COMMENT ON TABLE kser.controls IS 'Pauses and drains asked with `kser control`, read by every worker about once a second.';
