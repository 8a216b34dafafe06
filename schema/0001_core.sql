-- outbox-relay schema, migration 1: the outbox, dead letters, relay instances, the inbox.
-- Placeholders filled in by `outbox-relay migrate`: __SCHEMA__ (a quoted identifier),
-- __SCHEMA_LITERAL__ (the schema name as a string literal), __LANES__ (the lane count, fixed here).

CREATE TABLE __SCHEMA__.settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO __SCHEMA__.settings (name, value) VALUES
    ('lanes', '__LANES__'),
    ('max_payload_bytes', '1000000'),
    ('idempotency_window', '7 days'),
    ('installed_at', now()::text);

-- The lane of a row: a stable hash of its key (or of its id when it has no key), modulo the lane
-- count chosen at install. Inlined into the generated column below, so every writer, the Rust API,
-- the SQL functions and raw INSERTs alike, gets the same lane.
CREATE FUNCTION __SCHEMA__.lane_of(k text) RETURNS smallint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ((hashtextextended(k, 0) & 9223372036854775807) % __LANES__)::smallint;

-- Pending messages. A row is deleted (or archived) once the broker acknowledged it, so this table
-- holds only what is still to be delivered: the relay needs no cursor and skips nothing when
-- transactions commit out of sequence order.
CREATE TABLE __SCHEMA__.messages (
    seq             bigint GENERATED ALWAYS AS IDENTITY,
    id              uuid        NOT NULL,
    lane            smallint    GENERATED ALWAYS AS (__SCHEMA__.lane_of(coalesce(key, id::text))) STORED,
    topic           text        NOT NULL,
    key             text,
    payload         bytea,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    message_type    text,
    content_type    text,
    correlation_id  text,
    traceparent     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    CONSTRAINT messages_pkey PRIMARY KEY (id)
);
-- The claim path: the head of one lane in sequence order.
CREATE INDEX messages_lane_seq ON __SCHEMA__.messages (lane, seq);

-- Ids derived from idempotency keys, remembered for a window after their message was delivered
-- so that a repeated business request stays a no-op even once the outbox row is gone.
CREATE TABLE __SCHEMA__.idempotency_keys (
    id         uuid PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at ON __SCHEMA__.idempotency_keys (created_at);

-- Messages that could not be delivered: permanent failures and exhausted retries.
CREATE TABLE __SCHEMA__.dead_letters (
    id               uuid PRIMARY KEY,
    seq              bigint      NOT NULL,
    lane             smallint    NOT NULL,
    topic            text        NOT NULL,
    key              text,
    payload          bytea,
    headers          jsonb       NOT NULL,
    message_type     text,
    content_type     text,
    correlation_id   text,
    traceparent      text,
    created_at       timestamptz NOT NULL,
    attempts         integer     NOT NULL,
    reason           text        NOT NULL,
    error_class      text        NOT NULL,
    last_error       text,
    first_failed_at  timestamptz,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    relay_instance   uuid
);
CREATE INDEX dead_letters_dead_lettered_at ON __SCHEMA__.dead_letters (dead_lettered_at);
CREATE INDEX dead_letters_topic_key ON __SCHEMA__.dead_letters (topic, key);

-- Live relay instances and the lanes each owns (ownership itself is an advisory lock held on the
-- instance's session; this table is what the instances and the operators see of it).
CREATE TABLE __SCHEMA__.relay_instances (
    instance_id   uuid PRIMARY KEY,
    hostname      text        NOT NULL,
    pid           integer     NOT NULL,
    version       text        NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    lanes         smallint[]  NOT NULL DEFAULT '{}',
    breaker_state text        NOT NULL DEFAULT 'closed'
);

-- The inbox: one row per (consumer, message id) whose effect was applied.
CREATE TABLE __SCHEMA__.inbox (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    digest       bytea,
    topic        text,
    kafka_partition integer,
    kafka_offset bigint,
    processed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_pkey PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_processed_at ON __SCHEMA__.inbox (processed_at);

-- Consumed messages whose handler kept failing (poison) or that had no usable id.
CREATE TABLE __SCHEMA__.inbox_dead_letters (
    dead_letter_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer        text        NOT NULL,
    message_id      uuid,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    key             bytea,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    payload         bytea,
    reason          text        NOT NULL,
    error           text,
    attempts        integer     NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbox_dead_letters_consumer ON __SCHEMA__.inbox_dead_letters (consumer, dead_lettered_at);
