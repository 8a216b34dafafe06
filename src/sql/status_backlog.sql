-- status: pending rows, the oldest one's age, and how many wait for a retry.
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_s,
       count(*) FILTER (WHERE next_attempt_at > now()) AS waiting
FROM __SCHEMA__.messages
