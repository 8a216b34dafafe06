DELETE FROM __SCHEMA__.inbox
WHERE consumer = $1 AND message_id = ANY(ARRAY(
    SELECT message_id FROM __SCHEMA__.inbox
    WHERE consumer = $1 AND processed_at < now() - $2::bigint * interval '1 second'
    LIMIT $3
))
