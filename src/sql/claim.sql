SELECT seq, id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent,
       created_at, attempts,
       coalesce(next_attempt_at > now(), false) AS waiting,
       greatest(0, floor(extract(epoch FROM next_attempt_at - now()) * 1000))::bigint AS wait_ms
FROM __SCHEMA__.messages
WHERE lane = $1
ORDER BY seq
LIMIT $2
