-- For each lane ($1) with its claim cursor ($2): the lowest claimable row below the cursor, if any.
-- Such a row committed late and no NOTIFY announced it (written with triggers off, or a key
-- unparked). Walks the rows deleted below the cursor, so it runs rarely and off the lanes' path.
SELECT c.lane,
       (SELECT m.seq
        FROM __SCHEMA__.messages m
        WHERE m.lane = c.lane
          AND m.seq < c.cursor
          AND (m.key IS NULL OR NOT EXISTS (SELECT 1 FROM __SCHEMA__.parked_keys p WHERE p.key = m.key))
        ORDER BY m.seq
        LIMIT 1) AS behind
FROM unnest($1::smallint[], $2::bigint[]) AS c(lane, cursor)
