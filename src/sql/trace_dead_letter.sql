-- trace: the message as a dead letter
SELECT jsonb_build_object('topic', topic, 'key', key, 'reason', reason, 'error_class', error_class,
    'last_error', last_error, 'attempts', attempts, 'created_at', created_at,
    'first_failed_at', first_failed_at, 'dead_lettered_at', dead_lettered_at) AS doc
FROM __SCHEMA__.dead_letters WHERE id = $1
