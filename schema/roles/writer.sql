-- Least privilege for a service that writes outbox rows (Rust API or the SQL functions).
GRANT USAGE ON SCHEMA __SCHEMA__ TO __ROLE__;
GRANT SELECT ON __SCHEMA__.settings TO __ROLE__;
GRANT INSERT ON __SCHEMA__.messages TO __ROLE__;
GRANT INSERT ON __SCHEMA__.idempotency_keys TO __ROLE__;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA __SCHEMA__ TO __ROLE__;
