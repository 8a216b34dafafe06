SELECT seq, id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent,
       created_at, attempts,
       coalesce(next_attempt_at > now(), false) AS waiting,
       greatest(0, floor(extract(epoch FROM next_attempt_at - now()) * 1000))::bigint AS wait_ms,
       floor(extract(epoch FROM now() - created_at) * 1000)::bigint AS age_ms
FROM __SCHEMA__.messages m
WHERE lane = $1
  AND seq >= $3
  AND seq <= $4
  AND (key IS NULL OR NOT EXISTS (SELECT 1 FROM __SCHEMA__.parked_keys p WHERE p.key = m.key))
ORDER BY seq
LIMIT $2
