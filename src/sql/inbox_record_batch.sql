WITH input AS (
    SELECT * FROM unnest($2::uuid[], $3::bytea[], $4::text[], $5::int[], $6::bigint[], $7::smallint[], $8::bigint[])
        WITH ORDINALITY AS t(message_id, digest, topic, kafka_partition, kafka_offset, outbox_lane, outbox_seq, ord)
), fresh AS (
    INSERT INTO __SCHEMA__.inbox (consumer, message_id, digest, topic, kafka_partition, kafka_offset, outbox_lane, outbox_seq)
    SELECT $1, message_id, digest, topic, kafka_partition, kafka_offset, outbox_lane, outbox_seq FROM input ORDER BY ord
    ON CONFLICT (consumer, message_id) DO NOTHING
    RETURNING message_id
)
SELECT i.message_id, EXISTS (SELECT 1 FROM fresh f WHERE f.message_id = i.message_id) AS fresh, e.digest
FROM (SELECT DISTINCT message_id FROM input) i
LEFT JOIN __SCHEMA__.inbox e ON e.consumer = $1 AND e.message_id = i.message_id
