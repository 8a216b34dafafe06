-- trace: the message while it is pending
SELECT jsonb_build_object('topic', topic, 'key', key, 'lane', lane, 'seq', seq, 'created_at', created_at,
    'attempts', attempts, 'last_error', last_error, 'next_attempt_at', next_attempt_at,
    'first_failed_at', first_failed_at) AS doc
FROM __SCHEMA__.messages WHERE id = $1
