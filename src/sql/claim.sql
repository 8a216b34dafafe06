-- A lane's next rows from the cursor ($3) up to the announced bound ($4), in sequence order, and
-- with them the rows below the cursor of the same transactions: a transaction's rows become
-- visible together, so one whose first rows the cursor passed while it was open must go out from
-- its first row (ARCHITECTURE.md, "The claim cursor"). $5 lists the transactions the lane has
-- already looked below for: all their rows below that look were taken then, so a large transaction
-- is looked for once, not on every claim. A full claim ($3 = the lowest bigint) has nothing below
-- it, and reports the lane's highest sequence in the same snapshot (lane_top): the lane may claim up
-- to it without waiting for a NOTIFY that announces it.
WITH head AS (
    SELECT seq, id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent,
           created_at, attempts, next_attempt_at, xid
    FROM __SCHEMA__.messages m
    WHERE lane = $1
      AND seq >= $3
      AND seq <= $4
      AND (key IS NULL OR NOT EXISTS (SELECT 1 FROM __SCHEMA__.parked_keys p WHERE p.key = m.key))
    ORDER BY seq
    LIMIT $2
), claimed AS (
    SELECT seq, id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent,
           created_at, attempts, next_attempt_at, xid
    FROM head
    UNION ALL
    SELECT b.seq, b.id, b.topic, b.key, b.payload, b.headers, b.message_type, b.content_type, b.correlation_id,
           b.traceparent, b.created_at, b.attempts, b.next_attempt_at, b.xid
    FROM (SELECT DISTINCT xid FROM head
          WHERE xid IS NOT NULL AND $3 > -9223372036854775808 AND xid::text::bigint <> ALL ($5::bigint[])) t
    CROSS JOIN LATERAL (
        -- By the transaction's index only (`lane + 0` keeps the planner off (lane, seq)): under a
        -- held snapshot the statistics see only the few live rows, the planner took the lane's
        -- index for one row, and every transaction of the batch walked all the rows deleted below
        -- the cursor (claims of 1 to 24 s; BENCHMARKS.md, table 7).
        SELECT * FROM __SCHEMA__.messages m
        WHERE m.xid = t.xid AND m.lane + 0 = $1 AND m.seq < $3
          AND (m.key IS NULL OR NOT EXISTS (SELECT 1 FROM __SCHEMA__.parked_keys p WHERE p.key = m.key))
        ORDER BY m.seq
        LIMIT $2
    ) b
)
SELECT seq, id, topic, key, payload, headers, message_type, content_type, correlation_id, traceparent,
       created_at, attempts,
       coalesce(next_attempt_at > now(), false) AS waiting,
       greatest(0, floor(extract(epoch FROM next_attempt_at - now()) * 1000))::bigint AS wait_ms,
       floor(extract(epoch FROM now() - created_at) * 1000)::bigint AS age_ms,
       (SELECT max(t.seq) FROM __SCHEMA__.messages t WHERE t.lane = $1 AND $3 = -9223372036854775808) AS lane_top,
       xid::text::bigint AS xid
FROM claimed
ORDER BY seq
