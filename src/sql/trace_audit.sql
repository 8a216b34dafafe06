-- trace: what operators did to it
SELECT jsonb_build_object('at', at, 'actor', actor, 'action', action, 'source', source, 'why', why) AS doc
FROM __SCHEMA__.audit_log WHERE target = $1::text ORDER BY at
