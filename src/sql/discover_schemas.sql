-- Schemas whose name matches the LIKE pattern $1 and could hold an outbox (the names
-- SchemaName accepts: lowercase letters, digits and '_', at most 48 characters), in name order.
SELECT nspname::text AS schema FROM pg_namespace
WHERE nspname LIKE $1 AND nspname ~ '^[a-z_][a-z0-9_]{0,47}$'
  AND nspname NOT LIKE 'pg\_%' AND nspname <> 'information_schema'
ORDER BY nspname
