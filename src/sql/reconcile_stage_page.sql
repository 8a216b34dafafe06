-- reconcile: stage one page read from the archive's database.
INSERT INTO pg_temp.reconcile_delivered
SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[], $5::smallint[], $6::bigint[], $7::timestamptz[])
