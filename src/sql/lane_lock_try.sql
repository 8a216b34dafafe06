-- Takes a lane's advisory lock for this session, if no other session has it.
SELECT pg_try_advisory_lock($1, $2) AS got
