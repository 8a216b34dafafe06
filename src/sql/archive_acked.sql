WITH acked AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::int[], $5::bigint[], $6::bigint[])
        AS a(seq, kafka_topic, kafka_partition, kafka_offset, ack_age_us)
), gone AS (
    DELETE FROM __SCHEMA__.messages m
    USING acked a
    WHERE m.lane = $1 AND m.seq = a.seq
      AND m.seq BETWEEN (SELECT min(s) FROM unnest($2::bigint[]) s) AND (SELECT max(s) FROM unnest($2::bigint[]) s)
    RETURNING m.id, m.seq, m.lane, m.topic, m.key, m.created_at, m.attempts, a.kafka_topic, a.kafka_partition,
              a.kafka_offset, a.ack_age_us
)
-- delivered_at: when the broker acknowledged the row (the relay says how long ago), not when this
-- batched statement ran.
INSERT INTO __SCHEMA__.delivered
    (id, seq, lane, topic, key, created_at, attempts, kafka_topic, kafka_partition, kafka_offset, delivered_at)
SELECT id, seq, lane, topic, key, created_at, attempts + 1, kafka_topic, kafka_partition, kafka_offset,
       clock_timestamp() - ack_age_us * interval '1 microsecond'
FROM gone
