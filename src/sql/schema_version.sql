-- The newest migration applied to the schema (0: none).
SELECT coalesce(max(version), 0) AS version FROM __SCHEMA__.migrations
