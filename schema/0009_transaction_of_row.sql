-- Every row records the (top-level) transaction that wrote it. A transaction's rows become visible
-- together, at its commit. A lane claims from a cursor, and the cursor can pass a transaction's
-- first rows while it is still open (later rows of other transactions committed first and went
-- out); when it commits, a claim from the cursor would see its later rows before its NOTIFY
-- rewinds the lane to its first ones, and a key written twice in one transaction would go out in
-- the wrong order. The claim therefore also takes the rows below its start that belong to the
-- transactions of the rows it takes (ARCHITECTURE.md, "The claim cursor"). pg_current_xact_id()
-- is the top-level transaction also inside a savepoint. Rows written before this migration have
-- no transaction recorded; they were all committed before any relay of this version claims.
ALTER TABLE __SCHEMA__.messages ADD COLUMN xid xid8;
ALTER TABLE __SCHEMA__.messages ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX messages_xid_lane_seq ON __SCHEMA__.messages (xid, lane, seq) WHERE xid IS NOT NULL;
