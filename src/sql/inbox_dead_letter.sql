INSERT INTO __SCHEMA__.inbox_dead_letters
    (consumer, message_id, topic, kafka_partition, kafka_offset, key, headers, payload, reason, error, attempts)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
