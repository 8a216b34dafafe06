-- outbox-relay schema, migration 3: the optional archive of delivered messages (`run --archive`),
-- kept for `trace` and audits, pruned by age (`--archive-retention`).
CREATE TABLE __SCHEMA__.delivered (
    id              uuid        NOT NULL,
    seq             bigint      NOT NULL,
    lane            smallint    NOT NULL,
    topic           text        NOT NULL,
    key             text,
    created_at      timestamptz NOT NULL,
    attempts        integer     NOT NULL,
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    delivered_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivered_id ON __SCHEMA__.delivered (id);
CREATE INDEX delivered_delivered_at ON __SCHEMA__.delivered (delivered_at);
