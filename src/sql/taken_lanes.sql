-- Lanes whose advisory lock (class $1, see lane_lock_class.sql) some session of this database holds.
SELECT objid::bigint::int AS lane FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = $1::bigint::oid
