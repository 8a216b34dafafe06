DELETE FROM __SCHEMA__.delivered
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM __SCHEMA__.delivered
    WHERE delivered_at < now() - $1::bigint * interval '1 second'
    LIMIT $2
))
