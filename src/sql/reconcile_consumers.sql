-- reconcile: the consumers this database knows (an inbox row or an inbox dead letter). The inbox
-- part skips along its primary key, one probe per consumer, however many rows each has.
WITH RECURSIVE c AS (
    (SELECT consumer FROM __SCHEMA__.inbox ORDER BY consumer LIMIT 1)
    UNION ALL
    SELECT (SELECT i.consumer FROM __SCHEMA__.inbox i WHERE i.consumer > c.consumer ORDER BY i.consumer LIMIT 1)
    FROM c WHERE c.consumer IS NOT NULL
)
SELECT consumer FROM c WHERE consumer IS NOT NULL
UNION
SELECT DISTINCT consumer FROM __SCHEMA__.inbox_dead_letters
ORDER BY 1
