-- reconcile: what one consumer ($1) processed in the window ($2, $3) that the window's
-- deliveries do not hold; the archive as a whole is asked about these next.
SELECT coalesce(i.topic, '-') AS topic, i.message_id
FROM __SCHEMA__.inbox i
WHERE i.consumer = $1 AND i.processed_at >= $2 AND i.processed_at < $3 AND ($4::text IS NULL OR i.topic = $4)
  AND NOT EXISTS (SELECT 1 FROM pg_temp.reconcile_delivered d WHERE d.id = i.message_id)
