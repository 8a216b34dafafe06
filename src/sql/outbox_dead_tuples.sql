-- Dead row versions in the outbox table (deleted or updated rows not yet cleaned up by vacuum).
SELECT coalesce((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = '__SCHEMA__.messages'::regclass), 0)
