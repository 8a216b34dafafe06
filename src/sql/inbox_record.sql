INSERT INTO __SCHEMA__.inbox (consumer, message_id, digest, topic, kafka_partition, kafka_offset, outbox_lane, outbox_seq)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (consumer, message_id) DO NOTHING
