-- trace: which consumers applied it
SELECT jsonb_build_object('consumer', consumer, 'processed_at', processed_at, 'topic', topic,
    'partition', kafka_partition, 'offset', kafka_offset) AS doc
FROM __SCHEMA__.inbox WHERE message_id = $1 ORDER BY processed_at
