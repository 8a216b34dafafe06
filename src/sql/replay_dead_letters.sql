WITH d AS (
    DELETE FROM __SCHEMA__.dead_letters dl
    WHERE dl.id = ANY($1::uuid[])
      AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.messages m WHERE m.id = dl.id)
    RETURNING dl.*
), back AS (
    -- The original sequence number: the message goes before later messages of its key.
    INSERT INTO __SCHEMA__.messages
        (seq, id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent, created_at)
    OVERRIDING SYSTEM VALUE
    SELECT seq, id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent, created_at
    FROM d
    RETURNING id
), unpark AS (
    -- A key stays parked while another of its dead letters remains.
    DELETE FROM __SCHEMA__.parked_keys p
    WHERE p.key IN (SELECT key FROM d)
      AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.dead_letters o
                      WHERE o.key = p.key AND o.id NOT IN (SELECT id FROM d))
), audit AS (
    INSERT INTO __SCHEMA__.audit_log (actor, action, source, target, why, details)
    SELECT $2, 'replay', 'relay', d.id::text, $3,
           jsonb_build_object('topic', d.topic, 'key', d.key, 'reason', d.reason, 'error_class', d.error_class,
                              'attempts', d.attempts, 'dead_lettered_at', d.dead_lettered_at)
    FROM d
)
SELECT id FROM back
