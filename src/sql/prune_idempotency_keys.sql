DELETE FROM __SCHEMA__.idempotency_keys
WHERE id = ANY(ARRAY(
    SELECT id FROM __SCHEMA__.idempotency_keys
    WHERE created_at < now() - (SELECT value::interval FROM __SCHEMA__.settings WHERE name = 'idempotency_window')
    LIMIT $1
))
