-- dlq replay --inbox: the dead letters to re-publish.
SELECT dead_letter_id, topic, key, headers, payload
FROM __SCHEMA__.inbox_dead_letters
WHERE dead_letter_id = ANY($1)
ORDER BY dead_letter_id
