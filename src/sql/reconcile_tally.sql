-- reconcile: per topic, what one consumer ($1) did with the window's deliveries. A delivery
-- neither processed nor dead-lettered is in flight when it went out after the cutoff ($2: now
-- minus the grace period), missing before it.
SELECT d.kafka_topic AS topic,
       count(*) AS delivered,
       count(i.message_id) AS processed,
       count(*) FILTER (WHERE i.message_id IS NULL AND x.message_id IS NOT NULL) AS dead_lettered,
       count(*) FILTER (WHERE i.message_id IS NULL AND x.message_id IS NULL AND d.delivered_at >= $2) AS in_flight,
       count(*) FILTER (WHERE i.message_id IS NULL AND x.message_id IS NULL AND d.delivered_at < $2) AS missing,
       min(d.delivered_at) FILTER (WHERE i.message_id IS NULL AND x.message_id IS NULL AND d.delivered_at < $2)
           AS oldest_missing
FROM pg_temp.reconcile_delivered d
LEFT JOIN __SCHEMA__.inbox i ON i.consumer = $1 AND i.message_id = d.id
LEFT JOIN (SELECT DISTINCT message_id FROM __SCHEMA__.inbox_dead_letters
           WHERE consumer = $1 AND message_id IS NOT NULL) x ON x.message_id = d.id
GROUP BY d.kafka_topic
ORDER BY d.kafka_topic
