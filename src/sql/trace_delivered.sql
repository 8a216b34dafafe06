-- trace: where the broker put it (the archive)
SELECT jsonb_build_object('topic', kafka_topic, 'partition', kafka_partition, 'offset', kafka_offset,
    'delivered_at', delivered_at, 'attempts', attempts) AS doc
FROM __SCHEMA__.delivered WHERE id = $1 ORDER BY delivered_at
