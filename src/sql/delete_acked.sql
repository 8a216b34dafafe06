-- The bounds make the index scan start and stop at the batch's rows: without them a generic plan
-- may read the whole lane, dead rows included (a held snapshot keeps those around).
DELETE FROM __SCHEMA__.messages m
WHERE m.lane = $1 AND m.seq = ANY($2::bigint[])
  AND m.seq BETWEEN (SELECT min(s) FROM unnest($2::bigint[]) s) AND (SELECT max(s) FROM unnest($2::bigint[]) s)
