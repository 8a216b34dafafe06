-- The relay claims each lane from a remembered cursor instead of from the lane's start, so a claim
-- does not walk over rows deleted under an old snapshot. A row can commit after later rows of its
-- lane went out (its transaction took its sequence number first): the NOTIFY payload now gives the
-- lowest and highest sequence the statement wrote to each lane ("3:1041:1050,7:1038:1049"); a lane
-- whose cursor is past the lowest claims from there, and no lane claims past the highest sequence
-- announced (ARCHITECTURE.md, "The claim cursor", says why that keeps key order). An empty payload
-- (more lanes than fit) makes every lane claim from its start once.
CREATE OR REPLACE FUNCTION __SCHEMA__.notify_relay() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_lanes text;
BEGIN
    SELECT CASE WHEN count(*) <= 150
                THEN string_agg(lane::text || ':' || first_seq::text || ':' || last_seq::text, ',') ELSE '' END
    INTO v_lanes
    FROM (SELECT lane, min(seq) AS first_seq, max(seq) AS last_seq FROM new_rows GROUP BY lane) l;
    PERFORM pg_notify('outbox_relay.' || __SCHEMA_LITERAL__, coalesce(v_lanes, ''));
    RETURN NULL;
END $$;
