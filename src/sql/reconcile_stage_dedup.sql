-- reconcile: a message archived twice (delivered again after an operator put it back) keeps its
-- first delivery only; run when the unique index on the staged ids could not be built.
DELETE FROM pg_temp.reconcile_delivered d
USING pg_temp.reconcile_delivered e
WHERE e.id = d.id AND (e.delivered_at, e.ctid) < (d.delivered_at, d.ctid)
