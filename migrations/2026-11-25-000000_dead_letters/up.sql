-- Dead letters the dead-letter topic refused for good (too large, an invalid
-- record, no write permission...): the original record is kept here, and the
-- dead-letter topic gets a small record without payload that points at it.
CREATE TABLE kser.dead_letters (
    id              bigserial   PRIMARY KEY,
    dlq_topic       text        NOT NULL,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    kafka_timestamp bigint,
    error_kind      text        NOT NULL,
    error           text        NOT NULL,
    attempts        integer     NOT NULL,
    uuid            text,
    producer_error  text        NOT NULL,
    key             bytea,
    value           bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- A record delivered twice (a crash before its offset was committed) is
    -- kept once.
    UNIQUE (topic, kafka_partition, kafka_offset)
);

CREATE INDEX dead_letters_dlq_topic_idx ON kser.dead_letters (dlq_topic, id);

COMMENT ON TABLE kser.dead_letters IS 'Records whose dead letter the dead-letter topic refused for good, kept byte for byte; `kser dlq list` shows them, `kser dlq replay` sends them back.';
COMMENT ON COLUMN kser.dead_letters.dlq_topic IS 'The dead-letter topic that refused it.';
COMMENT ON COLUMN kser.dead_letters.topic IS 'Where the record was read (with kafka_partition, kafka_offset).';
COMMENT ON COLUMN kser.dead_letters.kafka_timestamp IS 'The record timestamp, in milliseconds since the epoch.';
COMMENT ON COLUMN kser.dead_letters.error_kind IS 'Why it was dead-lettered, as the kser-dlq-error-kind header says (invalid_message, fatal...).';
COMMENT ON COLUMN kser.dead_letters.producer_error IS 'Why the dead-letter topic refused it.';
COMMENT ON COLUMN kser.dead_letters.key IS 'The original record key, byte for byte.';
COMMENT ON COLUMN kser.dead_letters.value IS 'The original record value, byte for byte.';
