-- One migration of a schema at a time (concurrent `migrate` runs wait here, then find the work done).
SELECT pg_advisory_xact_lock(hashtextextended('outbox-relay migrate ' || $1::text, 0))
