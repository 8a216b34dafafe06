-- status: parked keys (policy park-key), oldest first.
SELECT key, dead_letter_id FROM __SCHEMA__.parked_keys ORDER BY parked_at LIMIT 1000
