-- A key is remembered while its message exists (pending or dead-lettered): a writer retrying after
-- the window must still find it, or it would abort on the message's primary key or enqueue a
-- second message with the same id. Past the window and with its message gone, the key goes.
DELETE FROM __SCHEMA__.idempotency_keys
WHERE id = ANY(ARRAY(
    SELECT k.id FROM __SCHEMA__.idempotency_keys k
    WHERE k.created_at < now() - (SELECT value::interval FROM __SCHEMA__.settings WHERE name = 'idempotency_window')
      AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.messages m WHERE m.id = k.id)
      AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.dead_letters d WHERE d.id = k.id)
    LIMIT $1
))
