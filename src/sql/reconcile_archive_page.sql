-- reconcile: one page of the window's deliveries, read from the archive's database to be staged
-- in the inbox's: from ($1, $4), the last page's last delivery time and id (the window's start
-- and the nil id for the first page), to the window's end ($2); $5 rows.
SELECT id, kafka_topic, kafka_partition, kafka_offset, lane, seq, delivered_at
FROM __SCHEMA__.delivered
WHERE delivered_at >= $1 AND delivered_at < $2 AND ($3::text IS NULL OR kafka_topic = $3)
  AND (delivered_at, id) > ($1, $4::uuid)
ORDER BY delivered_at, id
LIMIT $5
