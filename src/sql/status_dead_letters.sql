-- status: the relay's dead letters per reason.
SELECT reason, count(*) AS n FROM __SCHEMA__.dead_letters GROUP BY reason ORDER BY n DESC
