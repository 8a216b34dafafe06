UPDATE __SCHEMA__.messages m
SET attempts = m.attempts + 1,
    last_error = f.error,
    next_attempt_at = now() + f.delay_ms * interval '1 millisecond',
    first_failed_at = coalesce(m.first_failed_at, now())
FROM unnest($2::bigint[], $3::text[], $4::bigint[]) AS f(seq, error, delay_ms)
WHERE m.lane = $1 AND m.seq = f.seq
  AND m.seq BETWEEN (SELECT min(s) FROM unnest($2::bigint[]) s) AND (SELECT max(s) FROM unnest($2::bigint[]) s)
