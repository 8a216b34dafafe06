WITH failed AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[]) AS f(seq, reason, error_class, error)
), gone AS (
    DELETE FROM __SCHEMA__.messages m
    USING failed f
    WHERE m.lane = $1 AND m.seq = f.seq
      AND m.seq BETWEEN (SELECT min(s) FROM unnest($2::bigint[]) s) AND (SELECT max(s) FROM unnest($2::bigint[]) s)
    RETURNING m.*, f.reason, f.error_class, f.error
), parked AS (
    INSERT INTO __SCHEMA__.parked_keys (key, lane, dead_letter_id)
    SELECT DISTINCT ON (key) key, lane, id FROM gone WHERE $6 AND key IS NOT NULL ORDER BY key, seq
    ON CONFLICT (key) DO NOTHING
)
INSERT INTO __SCHEMA__.dead_letters
    (id, seq, lane, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent,
     created_at, attempts, reason, error_class, last_error, first_failed_at, relay_instance)
SELECT id, seq, lane, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent,
       created_at, attempts + 1, reason, error_class, error, coalesce(first_failed_at, now()), $7
FROM gone
-- The same id dead-lettered again (an idempotency key resent after its window): refresh the
-- record rather than fail the statement and wedge the lane.
ON CONFLICT (id) DO UPDATE SET
    seq = EXCLUDED.seq, lane = EXCLUDED.lane, topic = EXCLUDED.topic, key = EXCLUDED.key,
    payload = EXCLUDED.payload, headers = EXCLUDED.headers, message_type = EXCLUDED.message_type,
    content_type = EXCLUDED.content_type, correlation_id = EXCLUDED.correlation_id,
    traceparent = EXCLUDED.traceparent, created_at = EXCLUDED.created_at, attempts = EXCLUDED.attempts,
    reason = EXCLUDED.reason, error_class = EXCLUDED.error_class, last_error = EXCLUDED.last_error,
    first_failed_at = EXCLUDED.first_failed_at, dead_lettered_at = now(), relay_instance = EXCLUDED.relay_instance
