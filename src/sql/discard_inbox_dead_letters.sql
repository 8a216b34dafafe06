WITH d AS (
    DELETE FROM __SCHEMA__.inbox_dead_letters WHERE dead_letter_id = ANY($1::bigint[]) RETURNING *
), audit AS (
    INSERT INTO __SCHEMA__.audit_log (actor, action, source, target, why, details)
    SELECT $2, 'discard', 'inbox', d.dead_letter_id::text, $3,
           jsonb_build_object('consumer', d.consumer, 'message_id', d.message_id, 'topic', d.topic,
                              'partition', d.kafka_partition, 'offset', d.kafka_offset, 'reason', d.reason,
                              'error', d.error, 'attempts', d.attempts, 'payload_bytes', octet_length(d.payload),
                              'payload_sha256', encode(sha256(coalesce(d.payload, '')), 'hex'))
    FROM d
)
SELECT dead_letter_id FROM d
