-- status: the consumers' dead letters per consumer and reason.
SELECT consumer, reason, count(*) AS n FROM __SCHEMA__.inbox_dead_letters GROUP BY consumer, reason ORDER BY n DESC
