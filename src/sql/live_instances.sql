-- Instances whose heartbeat is fresher than the instance timeout ($1 ms), this one ($2) always.
SELECT count(*) AS live FROM __SCHEMA__.relay_instances
WHERE heartbeat_at > now() - $1::bigint * interval '1 millisecond' OR instance_id = $2
