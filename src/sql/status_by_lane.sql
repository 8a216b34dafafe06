-- status: pending rows per topic and lane, with the oldest one's age.
SELECT topic, lane, count(*) AS pending, extract(epoch FROM now() - min(created_at))::float8 AS oldest_s
FROM __SCHEMA__.messages
GROUP BY topic, lane
ORDER BY topic, lane
