-- Custom events (`kser control event NAME`): a signal with JSON parameters
-- for the tasks that declare a handler for NAME, on every worker or one,
-- for every entrypoint or one. Unlike a pause, an event is momentary: the
-- workers running when it is sent deliver it once each; a worker started
-- later does not.
CREATE TABLE kser.events (
    id         bigserial   PRIMARY KEY,
    name       text        NOT NULL,
    params     jsonb       NOT NULL DEFAULT '{}',
    worker_id  text,
    entrypoint text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per worker and entrypoint that handled an event: NULL error when
-- the handler succeeded.
CREATE TABLE kser.event_deliveries (
    event_id     bigint      NOT NULL REFERENCES kser.events (id) ON DELETE CASCADE,
    worker_id    text        NOT NULL,
    entrypoint   text        NOT NULL,
    error        text,
    delivered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, worker_id, entrypoint)
);

COMMENT ON TABLE kser.events IS 'Custom events sent with `kser control event`, delivered once by each worker running then.';
COMMENT ON TABLE kser.event_deliveries IS 'Which worker handled which event for which entrypoint, and the handler''s error if it failed.';
