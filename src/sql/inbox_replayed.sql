-- dlq replay --inbox: once the broker acknowledged the re-publication, the dead letter goes and
-- the audit log says who, why and where to.
WITH d AS (DELETE FROM __SCHEMA__.inbox_dead_letters WHERE dead_letter_id = $1 RETURNING *)
INSERT INTO __SCHEMA__.audit_log (actor, action, source, target, why, details)
SELECT $2, 'replay', 'inbox', d.dead_letter_id::text, $3,
       jsonb_build_object('consumer', d.consumer, 'message_id', d.message_id, 'topic', d.topic,
                          'republished_to', $4::text, 'reason', d.reason, 'attempts', d.attempts)
FROM d
