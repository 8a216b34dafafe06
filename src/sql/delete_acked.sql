DELETE FROM __SCHEMA__.messages
WHERE lane = $1 AND seq = ANY($2::bigint[])
