-- reconcile: since when the archive (`run --archive`) holds deliveries, and until when.
SELECT min(delivered_at) AS oldest, max(delivered_at) AS newest, now() AS db_now FROM __SCHEMA__.delivered
