-- Rows of instances silent for three instance timeouts ($1 ms) go, so `status` shows the living.
DELETE FROM __SCHEMA__.relay_instances
WHERE heartbeat_at < now() - ($1::bigint * 3) * interval '1 millisecond'
