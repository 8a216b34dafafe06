-- The newest reconciliation of each consumer.
SELECT DISTINCT ON (consumer) consumer, at, since, until, delivered, processed, dead_lettered, in_flight, missing,
       unknown, oldest_missing_at, extract(epoch FROM now() - at)::float8 AS age_s
FROM __SCHEMA__.reconciliations
ORDER BY consumer, at DESC
