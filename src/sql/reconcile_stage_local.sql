-- reconcile: stage the window's deliveries when the archive is in the inbox's database.
INSERT INTO pg_temp.reconcile_delivered
SELECT id, kafka_topic, kafka_partition, kafka_offset, lane, seq, delivered_at
FROM __SCHEMA__.delivered
WHERE delivered_at >= $1 AND delivered_at < $2 AND ($3::text IS NULL OR kafka_topic = $3)
