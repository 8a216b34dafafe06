-- The outbox is a queue: every row is deleted soon after it is written, so its dead row versions
-- grow with the traffic, not with the table. PostgreSQL's defaults vacuum a table once 20% of it
-- is dead, which for a queue that is usually near-empty means rarely and then a lot at once.
-- Vacuum it after a fixed number of dead rows instead, without the cost-based throttling (the
-- table stays small, so a vacuum is short). While a session holds an old snapshot no vacuum can
-- remove what that snapshot may still see: `outbox-relay status` names the holder.
ALTER TABLE __SCHEMA__.messages SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 50000
);
