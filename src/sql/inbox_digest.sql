-- The payload digest recorded with a consumer's message id (to tell a duplicate from a conflict).
SELECT digest FROM __SCHEMA__.inbox WHERE consumer = $1 AND message_id = $2
