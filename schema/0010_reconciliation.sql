-- outbox-relay schema, migration 10: reconciliation (`outbox-relay reconcile`).
-- Every record carries its lane and its sequence number (headers outbox_lane, outbox_seq); the
-- inbox records them with the message id, so what a consumer applied can be put next to what the
-- relay delivered, lane by lane.
ALTER TABLE __SCHEMA__.inbox ADD COLUMN outbox_lane smallint, ADD COLUMN outbox_seq bigint;
-- "Dead-lettered at the consumer" is looked up by id, per consumer.
CREATE INDEX inbox_dead_letters_consumer_message ON __SCHEMA__.inbox_dead_letters (consumer, message_id)
    WHERE message_id IS NOT NULL;
-- What each reconciliation found, one row per consumer and run: `status` and the relay's metrics
-- show the newest one per consumer without anyone running the command.
CREATE TABLE __SCHEMA__.reconciliations (
    reconciliation_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id        uuid        NOT NULL,
    consumer      text        NOT NULL,
    at            timestamptz NOT NULL DEFAULT now(),
    since         timestamptz NOT NULL,
    until         timestamptz NOT NULL,
    grace_seconds double precision NOT NULL,
    delivered     bigint      NOT NULL,
    processed     bigint      NOT NULL,
    dead_lettered bigint      NOT NULL,
    in_flight     bigint      NOT NULL,
    missing       bigint      NOT NULL,
    unknown       bigint      NOT NULL,
    -- The oldest missing message's delivery time (none when nothing is missing).
    oldest_missing_at timestamptz,
    actor         text        NOT NULL
);
CREATE INDEX reconciliations_consumer_at ON __SCHEMA__.reconciliations (consumer, at DESC);
