-- The backlog gauges: pending rows, the age of the oldest, and the age of the oldest head among
-- the lanes $1, each looked for from its claim cursor $2.
SELECT b.pending,
       coalesce(extract(epoch FROM now() - b.oldest), 0)::float8 AS oldest_s,
       coalesce(extract(epoch FROM now() - (
           SELECT min(h.created_at)
           FROM unnest($1::smallint[], $2::bigint[]) AS l(lane, cursor)
           CROSS JOIN LATERAL (SELECT created_at FROM __SCHEMA__.messages m
                               WHERE m.lane = l.lane AND m.seq >= l.cursor ORDER BY seq LIMIT 1) h)), 0)::float8 AS head_s
FROM (SELECT count(*) AS pending, min(created_at) AS oldest FROM __SCHEMA__.messages) b
