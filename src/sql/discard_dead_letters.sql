WITH d AS (
    DELETE FROM __SCHEMA__.dead_letters WHERE id = ANY($1::uuid[]) RETURNING *
), unpark AS (
    -- A key stays parked while another of its dead letters remains.
    DELETE FROM __SCHEMA__.parked_keys p
    WHERE p.key IN (SELECT key FROM d)
      AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.dead_letters o
                      WHERE o.key = p.key AND o.id NOT IN (SELECT id FROM d))
), audit AS (
    INSERT INTO __SCHEMA__.audit_log (actor, action, source, target, why, details)
    SELECT $2, 'discard', 'relay', d.id::text, $3,
           jsonb_build_object('topic', d.topic, 'key', d.key, 'reason', d.reason, 'error_class', d.error_class,
                              'last_error', d.last_error, 'attempts', d.attempts, 'created_at', d.created_at,
                              'dead_lettered_at', d.dead_lettered_at, 'payload_bytes', octet_length(d.payload),
                              'payload_sha256', encode(sha256(coalesce(d.payload, '')), 'hex'))
    FROM d
)
SELECT id, key FROM d
