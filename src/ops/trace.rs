//! `trace`: where one message is (pending, delivered, dead-lettered, processed by which consumers).

use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::OpsError;
use crate::schema::SchemaName;

/// Where one message is.
#[derive(Debug, Serialize, Default)]
pub struct Trace {
    /// The id asked about.
    pub message_id: Option<Uuid>,
    /// Pending in the outbox: attempts, last error, next attempt.
    pub pending: Option<serde_json::Value>,
    /// Delivered (when the archive is kept): topic, partition, offset, time.
    pub delivered: Vec<serde_json::Value>,
    /// Dead-lettered: reason, error, attempts, times.
    pub dead_letter: Option<serde_json::Value>,
    /// Consumers that applied it.
    pub processed_by: Vec<serde_json::Value>,
    /// Consumers that dead-lettered it.
    pub inbox_dead_letters: Vec<serde_json::Value>,
    /// Operator actions on it.
    pub audit: Vec<serde_json::Value>,
}

/// Traces one message in the outbox database, and in the inbox database when given (the same one
/// when consumers share it).
pub async fn trace(
    outbox_db: &impl GenericClient,
    inbox_db: Option<&tokio_postgres::Client>,
    schema: &SchemaName,
    id: Uuid,
) -> Result<Trace, OpsError> {
    let json_rows =
        |rows: Vec<tokio_postgres::Row>| -> Vec<serde_json::Value> { rows.iter().map(|r| r.get(0)).collect() };
    let q = |s: &str| schema.qualify(s);
    let mut t = Trace { message_id: Some(id), ..Default::default() };
    t.pending = outbox_db
        .query_opt(
            &q("SELECT jsonb_build_object('topic', topic, 'key', key, 'lane', lane, 'seq', seq, 'created_at', created_at,
                       'attempts', attempts, 'last_error', last_error, 'next_attempt_at', next_attempt_at,
                       'first_failed_at', first_failed_at)
                FROM __SCHEMA__.messages WHERE id = $1"),
            &[&id],
        )
        .await?
        .map(|r| r.get(0));
    t.delivered = json_rows(
        outbox_db
            .query(
                &q("SELECT jsonb_build_object('topic', kafka_topic, 'partition', kafka_partition, 'offset', kafka_offset,
                           'delivered_at', delivered_at, 'attempts', attempts)
                    FROM __SCHEMA__.delivered WHERE id = $1 ORDER BY delivered_at"),
                &[&id],
            )
            .await?,
    );
    t.dead_letter = outbox_db
        .query_opt(
            &q("SELECT jsonb_build_object('topic', topic, 'key', key, 'reason', reason, 'error_class', error_class,
                       'last_error', last_error, 'attempts', attempts, 'created_at', created_at,
                       'first_failed_at', first_failed_at, 'dead_lettered_at', dead_lettered_at)
                FROM __SCHEMA__.dead_letters WHERE id = $1"),
            &[&id],
        )
        .await?
        .map(|r| r.get(0));
    t.audit = json_rows(
        outbox_db
            .query(
                &q("SELECT jsonb_build_object('at', at, 'actor', actor, 'action', action, 'source', source, 'why', why)
                    FROM __SCHEMA__.audit_log WHERE target = $1::text ORDER BY at"),
                &[&id.to_string()],
            )
            .await?,
    );
    if let Some(inbox) = inbox_db {
        t.processed_by = json_rows(
            inbox
                .query(
                    &q("SELECT jsonb_build_object('consumer', consumer, 'processed_at', processed_at, 'topic', topic,
                               'partition', kafka_partition, 'offset', kafka_offset)
                        FROM __SCHEMA__.inbox WHERE message_id = $1 ORDER BY processed_at"),
                    &[&id],
                )
                .await?,
        );
        t.inbox_dead_letters = json_rows(
            inbox
                .query(
                    &q("SELECT jsonb_build_object('id', dead_letter_id, 'consumer', consumer, 'reason', reason,
                               'error', error, 'attempts', attempts, 'dead_lettered_at', dead_lettered_at)
                        FROM __SCHEMA__.inbox_dead_letters WHERE message_id = $1"),
                    &[&id],
                )
                .await?,
        );
    }
    Ok(t)
}
