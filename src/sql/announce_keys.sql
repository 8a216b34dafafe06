-- Tells the relay that the pending rows of these keys ($2) are claimable again (their key was
-- unparked): the lowest and highest sequence per lane, in the insert trigger's NOTIFY format, so
-- each lane claims from below its cursor. No NOTIFY when the keys have no pending rows.
SELECT pg_notify($1, string_agg(lane::text || ':' || first_seq::text || ':' || last_seq::text, ','))
FROM (SELECT lane, min(seq) AS first_seq, max(seq) AS last_seq FROM __SCHEMA__.messages WHERE key = ANY($2) GROUP BY lane) l
HAVING count(*) > 0
