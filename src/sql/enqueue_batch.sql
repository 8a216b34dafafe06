WITH input AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::bool[])
         WITH ORDINALITY AS t(id, topic, key, payload, headers, message_type, content_type,
                              correlation_id, traceparent, keyed, ord)
), fresh_keys AS (
    INSERT INTO __SCHEMA__.idempotency_keys (id)
    SELECT id FROM input WHERE keyed
    ON CONFLICT DO NOTHING
    RETURNING id
)
INSERT INTO __SCHEMA__.messages
    (id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent)
SELECT id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent
FROM input
WHERE NOT keyed OR id IN (SELECT id FROM fresh_keys)
ORDER BY ord
