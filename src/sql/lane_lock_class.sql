-- The first key of every lane's advisory lock (the lane number is the second): one per schema, so
-- relays of different outboxes on one database never contend.
SELECT (hashtext('outbox-relay lanes ' || $1::text) & 2147483647)::int AS class
