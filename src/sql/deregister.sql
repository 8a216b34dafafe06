-- A stopping instance removes its row, so the others take its lanes at once.
DELETE FROM __SCHEMA__.relay_instances WHERE instance_id = $1
