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
        |rows: Vec<tokio_postgres::Row>| -> Vec<serde_json::Value> { rows.iter().map(|r| r.get("doc")).collect() };
    let q = |s: &str| schema.qualify(s);
    let mut t = Trace { message_id: Some(id), ..Default::default() };
    t.pending = outbox_db.query_opt(&q(include_str!("../sql/trace_pending.sql")), &[&id]).await?.map(|r| r.get("doc"));
    t.delivered = json_rows(outbox_db.query(&q(include_str!("../sql/trace_delivered.sql")), &[&id]).await?);
    t.dead_letter =
        outbox_db.query_opt(&q(include_str!("../sql/trace_dead_letter.sql")), &[&id]).await?.map(|r| r.get("doc"));
    t.audit = json_rows(outbox_db.query(&q(include_str!("../sql/trace_audit.sql")), &[&id.to_string()]).await?);
    if let Some(inbox) = inbox_db {
        t.processed_by = json_rows(inbox.query(&q(include_str!("../sql/trace_processed.sql")), &[&id]).await?);
        t.inbox_dead_letters =
            json_rows(inbox.query(&q(include_str!("../sql/trace_inbox_dead_letters.sql")), &[&id]).await?);
    }
    Ok(t)
}
