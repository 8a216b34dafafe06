-- outbox-relay schema, migration 4: failure handling.

-- When a row first failed, for its dead letter and for `trace`.
ALTER TABLE __SCHEMA__.messages ADD COLUMN first_failed_at timestamptz;

-- Keys held back under the `park-key` dead-letter policy: later messages of a parked key wait
-- (the relay skips them) until an operator replays or discards the dead letter that parked it.
CREATE TABLE __SCHEMA__.parked_keys (
    key            text PRIMARY KEY,
    lane           smallint    NOT NULL,
    dead_letter_id uuid        NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now()
);

-- A queue table: rows are inserted and soon deleted. Vacuum it early and without pauses, so that
-- dead tuples in front of the lane heads are cleared before they slow the claims.
ALTER TABLE __SCHEMA__.messages SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
