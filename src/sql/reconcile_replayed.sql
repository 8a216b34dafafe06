-- reconcile --replay-missing: once the broker acknowledged the re-publication, the audit log
-- says who, why, and from where to where (never the payload).
INSERT INTO __SCHEMA__.audit_log (actor, action, source, target, why, details)
VALUES ($1, 'replay', 'reconcile', $2::uuid::text, $3,
        jsonb_build_object('consumer', $4::text, 'topic', $5::text, 'partition', $6::int, 'offset', $7::bigint,
                           'republished_partition', $8::int, 'republished_offset', $9::bigint))
