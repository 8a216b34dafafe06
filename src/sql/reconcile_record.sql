-- reconcile: what one run found for one consumer, for `status` and the relay's metrics.
INSERT INTO __SCHEMA__.reconciliations
    (run_id, consumer, since, until, grace_seconds, delivered, processed, dead_lettered, in_flight, missing, unknown,
     oldest_missing_at, actor)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
