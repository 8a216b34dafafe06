-- Wake only the lanes a statement wrote to: the NOTIFY payload lists them ("3,7,12"), so an idle
-- lane of the relay runs no claim for another lane's rows. An empty payload (more lanes than fit,
-- or a writer of an older schema version) wakes every lane.
CREATE OR REPLACE FUNCTION __SCHEMA__.notify_relay() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_lanes text;
BEGIN
    SELECT CASE WHEN count(*) <= 400 THEN string_agg(lane::text, ',') ELSE '' END
    INTO v_lanes
    FROM (SELECT DISTINCT lane FROM new_rows) l;
    PERFORM pg_notify('outbox_relay.' || __SCHEMA_LITERAL__, coalesce(v_lanes, ''));
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS messages_notify ON __SCHEMA__.messages;
CREATE TRIGGER messages_notify AFTER INSERT ON __SCHEMA__.messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.notify_relay();
