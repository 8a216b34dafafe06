-- What holds back the oldest snapshot on this database, oldest first: while it is held, rows
-- deleted from the outbox since cannot be cleaned up and every claim walks over them. Sessions of
-- this database, replication slots and prepared transactions. The query is cut to a prefix.
SELECT kind, pid, name, client, state, age_seconds, query_prefix
FROM (
    SELECT 'session' AS kind, pid, coalesce(application_name, '') AS name,
           coalesce(host(client_addr), 'local') AS client, coalesce(state, '') AS state,
           extract(epoch FROM now() - coalesce(xact_start, query_start, backend_start))::float8 AS age_seconds,
           left(regexp_replace(coalesce(query, ''), '\s+', ' ', 'g'), 60) AS query_prefix,
           age(backend_xmin) AS xid_age
    FROM pg_stat_activity
    WHERE backend_xmin IS NOT NULL AND datname = current_database() AND pid <> pg_backend_pid()
    UNION ALL
    SELECT 'replication slot', NULL, slot_name::text, coalesce(database::text, ''),
           CASE WHEN active THEN 'active' ELSE 'inactive' END, NULL, NULL, age(xmin)
    FROM pg_replication_slots
    WHERE xmin IS NOT NULL
    UNION ALL
    SELECT 'prepared transaction', NULL, gid, owner::text, 'prepared',
           extract(epoch FROM now() - prepared)::float8, NULL, age(transaction)
    FROM pg_prepared_xacts
    WHERE database = current_database()
) holders
ORDER BY xid_age DESC
LIMIT $1
