-- trace: which consumers dead-lettered it
SELECT jsonb_build_object('id', dead_letter_id, 'consumer', consumer, 'reason', reason,
    'error', error, 'attempts', attempts, 'dead_lettered_at', dead_lettered_at) AS doc
FROM __SCHEMA__.inbox_dead_letters WHERE message_id = $1
