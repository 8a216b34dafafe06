-- dlq list/show/export --inbox: the consumers' dead letters matching __FILTER__ (built by
-- ops::Filter, its parameters from $3), newest first, at most $1; the payload only when $2.
SELECT dead_letter_id::text AS id, message_id, consumer, topic, encode(key, 'escape') AS key, reason,
       NULL::text AS error_class, error, attempts, NULL::timestamptz AS created_at, dead_lettered_at,
       kafka_partition, kafka_offset, octet_length(payload) AS payload_bytes, headers,
       CASE WHEN $2 THEN payload END AS payload
FROM __SCHEMA__.inbox_dead_letters
WHERE __FILTER__
ORDER BY dead_lettered_at DESC, dead_letter_id DESC
LIMIT $1
