-- reconcile: the window's deliveries, staged in a temporary table of the inbox's session (the
-- archive may be in another database). One row per message id: the first delivery.
DROP TABLE IF EXISTS pg_temp.reconcile_delivered;
CREATE TEMPORARY TABLE reconcile_delivered (
    id              uuid PRIMARY KEY,
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    lane            smallint    NOT NULL,
    seq             bigint      NOT NULL,
    delivered_at    timestamptz NOT NULL
);
