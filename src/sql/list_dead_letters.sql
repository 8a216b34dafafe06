-- dlq list/show/export: the relay's dead letters matching __FILTER__ (built by ops::Filter, its
-- parameters from $3), newest first, at most $1; the payload only when $2.
SELECT id::text AS id, id AS message_id, NULL::text AS consumer, topic, key, reason, error_class,
       last_error AS error, attempts, created_at, dead_lettered_at, NULL::int AS kafka_partition,
       NULL::bigint AS kafka_offset, octet_length(payload) AS payload_bytes, headers,
       CASE WHEN $2 THEN payload END AS payload
FROM __SCHEMA__.dead_letters
WHERE __FILTER__
ORDER BY dead_lettered_at DESC, seq DESC
LIMIT $1
