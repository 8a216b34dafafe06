-- reconcile: which of these ids the archive holds, delivered at any time.
SELECT DISTINCT id FROM __SCHEMA__.delivered WHERE id = ANY($1::uuid[])
