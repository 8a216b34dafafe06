-- One row of the schema's settings (lanes, max_payload_bytes, idempotency_window, installed_at).
SELECT value FROM __SCHEMA__.settings WHERE name = $1
