-- Recurring messages (`kser schedule add`): workers fire each due tick once
-- across the fleet, recording the task and its outbox message together.
CREATE TABLE kser.schedules (
    name          text        PRIMARY KEY,
    cron          text        NOT NULL,
    entrypoint    text        NOT NULL,
    params        jsonb       NOT NULL DEFAULT '{}',
    topic         text        NOT NULL,
    missed        text        NOT NULL DEFAULT 'skip' CHECK (missed IN ('skip', 'once')),
    paused        boolean     NOT NULL DEFAULT false,
    next_at       timestamptz NOT NULL,
    last_fired_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX schedules_due_idx ON kser.schedules (next_at) WHERE NOT paused;

COMMENT ON TABLE kser.schedules IS 'Recurring messages: a worker fires each tick of the cron expression once.';
COMMENT ON COLUMN kser.schedules.next_at IS 'The next tick not fired yet.';
COMMENT ON COLUMN kser.schedules.missed IS 'Ticks missed while no worker ran: skip drops them, once fires one catch-up.';
