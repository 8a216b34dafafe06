-- reconcile: the missing deliveries of one consumer ($1): delivered before the cutoff ($2),
-- neither processed nor dead-lettered; at most $3, in topic, partition and offset order.
SELECT d.id, d.kafka_topic, d.kafka_partition, d.kafka_offset, d.lane, d.seq, d.delivered_at
FROM pg_temp.reconcile_delivered d
WHERE d.delivered_at < $2
  AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.inbox i WHERE i.consumer = $1 AND i.message_id = d.id)
  AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.inbox_dead_letters x WHERE x.consumer = $1 AND x.message_id = d.id)
ORDER BY d.kafka_topic, d.kafka_partition, d.kafka_offset
LIMIT $3
