-- status: the registered relay instances and their lanes.
SELECT instance_id, hostname, pid, lanes, breaker_state, extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s
FROM __SCHEMA__.relay_instances
ORDER BY started_at
