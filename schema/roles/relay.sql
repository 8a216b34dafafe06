-- Least privilege for the relay daemon (`outbox-relay run`). __ROLE__ needs LOGIN and CONNECT on
-- the database; advisory locks and pg_locks need no grant.
GRANT USAGE ON SCHEMA __SCHEMA__ TO __ROLE__;
GRANT SELECT ON __SCHEMA__.settings, __SCHEMA__.migrations TO __ROLE__;
GRANT SELECT, UPDATE, DELETE ON __SCHEMA__.messages TO __ROLE__;
GRANT SELECT, INSERT, UPDATE, DELETE ON __SCHEMA__.relay_instances TO __ROLE__;
GRANT SELECT, INSERT, DELETE ON __SCHEMA__.delivered TO __ROLE__;
GRANT SELECT, DELETE ON __SCHEMA__.idempotency_keys TO __ROLE__;
GRANT SELECT, INSERT ON __SCHEMA__.dead_letters TO __ROLE__;
GRANT SELECT, INSERT ON __SCHEMA__.parked_keys TO __ROLE__;
GRANT SELECT ON __SCHEMA__.reconciliations TO __ROLE__;
