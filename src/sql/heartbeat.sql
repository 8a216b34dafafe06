-- The instance's heartbeat: registers it on first call, then refreshes its time, lanes and breaker.
INSERT INTO __SCHEMA__.relay_instances (instance_id, hostname, pid, version, lanes, breaker_state)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (instance_id) DO UPDATE
SET heartbeat_at = now(), lanes = EXCLUDED.lanes, breaker_state = EXCLUDED.breaker_state
