-- outbox-relay schema, migration 2: the SQL writer contract, so that a service in any language
-- writes outbox rows with plain SQL:
--   SELECT __SCHEMA__.enqueue(topic, key, payload bytea, headers jsonb, message_type, idempotency_key)
--   SELECT __SCHEMA__.enqueue_json(topic, key, payload jsonb, headers jsonb, message_type, idempotency_key)
-- Both validate like the Rust API (same rules, SQLSTATEs OB001..OB007) and return the message id.

-- SHA-1, needed for RFC 9562 UUIDv5 ids derived from idempotency keys; written here so that the
-- schema needs no extension (and no privilege to create one).
CREATE FUNCTION __SCHEMA__.sha1(data bytea) RETURNS bytea
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    m  constant bigint := 4294967295;
    h0 bigint := 1732584193;
    h1 bigint := 4023233417;
    h2 bigint := 2562383102;
    h3 bigint := 271733878;
    h4 bigint := 3285377520;
    len bigint := octet_length(data);
    msg bytea;
    w bigint[];
    a bigint; b bigint; c bigint; d bigint; e bigint; f bigint; k bigint; t bigint;
    base int;
BEGIN
    msg := data || '\x80'::bytea
        || decode(repeat('00', (((55 - len % 64) % 64) + 64)::int % 64), 'hex')
        || int8send(len * 8);
    FOR blk IN 0 .. octet_length(msg) / 64 - 1 LOOP
        base := blk * 64;
        w := array_fill(0::bigint, ARRAY[80]);
        FOR i IN 0 .. 15 LOOP
            w[i + 1] := (get_byte(msg, base + i * 4)::bigint << 24)
                      | (get_byte(msg, base + i * 4 + 1)::bigint << 16)
                      | (get_byte(msg, base + i * 4 + 2)::bigint << 8)
                      |  get_byte(msg, base + i * 4 + 3)::bigint;
        END LOOP;
        FOR i IN 16 .. 79 LOOP
            t := w[i - 2] # w[i - 7] # w[i - 13] # w[i - 15];
            w[i + 1] := ((t << 1) | (t >> 31)) & m;
        END LOOP;
        a := h0; b := h1; c := h2; d := h3; e := h4;
        FOR i IN 0 .. 79 LOOP
            IF i < 20 THEN
                f := (b & c) | ((b # m) & d); k := 1518500249;
            ELSIF i < 40 THEN
                f := b # c # d; k := 1859775393;
            ELSIF i < 60 THEN
                f := (b & c) | (b & d) | (c & d); k := 2400959708;
            ELSE
                f := b # c # d; k := 3395469782;
            END IF;
            t := ((((a << 5) | (a >> 27)) & m) + f + e + k + w[i + 1]) & m;
            e := d; d := c; c := ((b << 30) | (b >> 2)) & m; b := a; a := t;
        END LOOP;
        h0 := (h0 + a) & m; h1 := (h1 + b) & m; h2 := (h2 + c) & m;
        h3 := (h3 + d) & m; h4 := (h4 + e) & m;
    END LOOP;
    RETURN substring(int8send(h0) FROM 5) || substring(int8send(h1) FROM 5)
        || substring(int8send(h2) FROM 5) || substring(int8send(h3) FROM 5)
        || substring(int8send(h4) FROM 5);
END $$;

-- The id of a message enqueued with an idempotency key: UUIDv5 in the product's namespace
-- 7d23c104-60d5-4fd5-9f73-75537a8eb7bd, the same as the Rust API computes.
CREATE FUNCTION __SCHEMA__.idempotent_id(idempotency_key text) RETURNS uuid
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT encode(set_byte(set_byte(substring(h FOR 16),
                                    6, (get_byte(h, 6) & 15) | 80),  -- version 5
                           8, (get_byte(h, 8) & 63) | 128),          -- RFC 9562 variant
                  'hex')::uuid
    FROM (SELECT __SCHEMA__.sha1(uuid_send('7d23c104-60d5-4fd5-9f73-75537a8eb7bd'::uuid)
                                 || convert_to(idempotency_key, 'UTF8')) AS h) AS digest
$$;

-- A time-ordered UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits.
CREATE FUNCTION __SCHEMA__.uuid_v7() RETURNS uuid
    LANGUAGE sql VOLATILE PARALLEL SAFE
    RETURN encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid;

-- One place for the rules a message must meet (the Rust API checks the same before sending).
-- SQLSTATEs: OB001 topic, OB002 payload size, OB003 header, OB004 message type,
-- OB005 correlation id, OB006 traceparent, OB007 idempotency key.
CREATE FUNCTION __SCHEMA__.check_message(
    topic text, payload_bytes bigint, headers jsonb, message_type text,
    correlation_id text, traceparent text, idempotency_key text
) RETURNS void LANGUAGE plpgsql STABLE AS $$
DECLARE
    max_payload bigint;
    h record;
BEGIN
    IF topic IS NULL OR topic = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'OB001', MESSAGE = 'outbox: topic is empty',
            HINT = 'give the Kafka topic the message goes to';
    END IF;
    IF length(topic) > 249 OR topic !~ '^[A-Za-z0-9._-]+$' OR topic IN ('.', '..') THEN
        RAISE EXCEPTION USING ERRCODE = 'OB001',
            MESSAGE = format('outbox: invalid topic name %L', left(topic, 300)),
            HINT = 'a Kafka topic name is 1 to 249 characters of ASCII letters, digits, ''.'', ''_'' and ''-'', and is not ''.'' or ''..''';
    END IF;
    SELECT value::bigint INTO max_payload FROM __SCHEMA__.settings WHERE name = 'max_payload_bytes';
    IF payload_bytes > max_payload THEN
        RAISE EXCEPTION USING ERRCODE = 'OB002',
            MESSAGE = format('outbox: payload of %s bytes exceeds the maximum of %s bytes', payload_bytes, max_payload),
            HINT = format('send a smaller payload (a reference to the data instead of the data), or raise max_payload_bytes in %s.settings together with the broker''s message.max.bytes', __SCHEMA_LITERAL__);
    END IF;
    IF headers IS NULL OR jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'OB003', MESSAGE = 'outbox: headers must be a JSON object of string values',
            HINT = 'pass ''{}'' for no headers, or ''{"name": "value"}''';
    END IF;
    FOR h IN SELECT * FROM jsonb_each(headers) LOOP
        IF h.key = '' OR length(h.key) > 255 OR h.key ~ '[[:cntrl:]]' THEN
            RAISE EXCEPTION USING ERRCODE = 'OB003',
                MESSAGE = format('outbox: invalid header name %L', left(h.key, 300)),
                HINT = 'a header name is 1 to 255 characters with no control characters';
        END IF;
        IF lower(h.key) LIKE 'ce\_%' OR lower(h.key) IN ('content-type', 'traceparent', 'tracestate', 'correlation_id') THEN
            RAISE EXCEPTION USING ERRCODE = 'OB003',
                MESSAGE = format('outbox: header name %L is reserved for the message envelope', h.key),
                HINT = 'pass the correlation id and traceparent as their own arguments; ce_* and content-type are set by the relay';
        END IF;
        IF jsonb_typeof(h.value) <> 'string' THEN
            RAISE EXCEPTION USING ERRCODE = 'OB003',
                MESSAGE = format('outbox: header %L has a %s value, not a string', h.key, jsonb_typeof(h.value)),
                HINT = 'header values are strings: quote numbers and booleans';
        END IF;
    END LOOP;
    IF message_type IS NOT NULL AND (message_type = '' OR length(message_type) > 255 OR message_type ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION USING ERRCODE = 'OB004', MESSAGE = 'outbox: invalid message type',
            HINT = 'a message type is 1 to 255 characters with no control characters, or NULL';
    END IF;
    IF correlation_id IS NOT NULL AND (correlation_id = '' OR length(correlation_id) > 255 OR correlation_id ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION USING ERRCODE = 'OB005', MESSAGE = 'outbox: invalid correlation id',
            HINT = 'a correlation id is 1 to 255 characters with no control characters, or NULL';
    END IF;
    IF traceparent IS NOT NULL AND (traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
            OR substring(traceparent FROM 4 FOR 32) = repeat('0', 32)
            OR substring(traceparent FROM 37 FOR 16) = repeat('0', 16)
            OR left(traceparent, 2) = 'ff') THEN
        RAISE EXCEPTION USING ERRCODE = 'OB006', MESSAGE = format('outbox: invalid traceparent %L', left(traceparent, 100)),
            HINT = 'a W3C traceparent looks like 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, lowercase, ids not all zero';
    END IF;
    IF idempotency_key IS NOT NULL AND (idempotency_key = '' OR length(idempotency_key) > 1024) THEN
        RAISE EXCEPTION USING ERRCODE = 'OB007', MESSAGE = 'outbox: invalid idempotency key',
            HINT = 'an idempotency key is 1 to 1024 characters, or NULL for a fresh id';
    END IF;
END $$;

CREATE FUNCTION __SCHEMA__.enqueue_message(
    topic text, key text, payload bytea, headers jsonb, message_type text,
    idempotency_key text, correlation_id text, traceparent text, content_type text
) RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    PERFORM __SCHEMA__.check_message(enqueue_message.topic, octet_length(enqueue_message.payload),
        enqueue_message.headers, enqueue_message.message_type, enqueue_message.correlation_id,
        enqueue_message.traceparent, enqueue_message.idempotency_key);
    IF enqueue_message.idempotency_key IS NULL THEN
        v_id := __SCHEMA__.uuid_v7();
    ELSE
        v_id := __SCHEMA__.idempotent_id(enqueue_message.idempotency_key);
        INSERT INTO __SCHEMA__.idempotency_keys (id) VALUES (v_id) ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN v_id; -- the same business request, enqueued before: a no-op
        END IF;
    END IF;
    INSERT INTO __SCHEMA__.messages
        (id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent)
    VALUES (v_id, enqueue_message.topic, enqueue_message.key, enqueue_message.payload,
        enqueue_message.headers, enqueue_message.message_type, enqueue_message.content_type,
        enqueue_message.correlation_id, enqueue_message.traceparent);
    RETURN v_id;
END $$;

CREATE FUNCTION __SCHEMA__.enqueue(
    topic text, key text, payload bytea, headers jsonb DEFAULT '{}'::jsonb,
    message_type text DEFAULT NULL, idempotency_key text DEFAULT NULL,
    correlation_id text DEFAULT NULL, traceparent text DEFAULT NULL
) RETURNS uuid LANGUAGE sql
    RETURN __SCHEMA__.enqueue_message(topic, key, payload, headers, message_type, idempotency_key,
        correlation_id, traceparent, 'application/octet-stream');

CREATE FUNCTION __SCHEMA__.enqueue_json(
    topic text, key text, payload jsonb, headers jsonb DEFAULT '{}'::jsonb,
    message_type text DEFAULT NULL, idempotency_key text DEFAULT NULL,
    correlation_id text DEFAULT NULL, traceparent text DEFAULT NULL
) RETURNS uuid LANGUAGE sql
    RETURN __SCHEMA__.enqueue_message(topic, key, convert_to(payload::text, 'UTF8'), headers, message_type,
        idempotency_key, correlation_id, traceparent, 'application/json');

-- Wake the relay, at most once per statement (and PostgreSQL folds repeats within a transaction).
CREATE FUNCTION __SCHEMA__.notify_relay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay.' || __SCHEMA_LITERAL__, '');
    RETURN NULL;
END $$;
CREATE TRIGGER messages_notify AFTER INSERT ON __SCHEMA__.messages
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.notify_relay();
