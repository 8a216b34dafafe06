//! One lane's database session: it holds the lane's advisory lock and runs every statement of
//! that lane, so a lost session loses the lock and the ability to delete at the same moment
//! (there is never a second owner that could still change the lane's rows).

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{ConnectError, DbConfig};
use crate::schema::SchemaName;

/// An outbox row read for delivery.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    /// Sequence number (order within the lane).
    pub seq: i64,
    /// Message id.
    pub id: Uuid,
    /// Topic as written.
    pub topic: String,
    /// Kafka key.
    pub key: Option<String>,
    /// Payload.
    pub payload: Option<Vec<u8>>,
    /// The writer's headers.
    pub headers: Vec<(String, String)>,
    /// Why the row cannot be sent as written (bad headers JSON from raw SQL), if so.
    pub malformed: Option<String>,
    /// Message type.
    pub message_type: Option<String>,
    /// Content type.
    pub content_type: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// W3C traceparent.
    pub traceparent: Option<String>,
    /// When the row was written.
    pub created_at: DateTime<Utc>,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// The row waits for a retry.
    pub waiting: bool,
    /// How long it still waits, in milliseconds.
    pub wait_ms: i64,
}

/// Where the broker put an acknowledged row.
#[derive(Debug, Clone)]
pub struct Acked {
    /// The row.
    pub seq: i64,
    /// The Kafka topic it went to.
    pub kafka_topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A failed attempt to record on the row.
#[derive(Debug, Clone)]
pub struct FailedAttempt {
    /// The row.
    pub seq: i64,
    /// The error, for `last_error` (no payload in it).
    pub error: String,
    /// When to try again, from now.
    pub delay_ms: i64,
}

/// A lane's session and its prepared statements.
pub struct LaneSession {
    client: Client,
    closed: CancellationToken,
    lane: i16,
    claim: Statement,
    delete: Statement,
    archive: Option<Statement>,
    failures: Statement,
}

impl LaneSession {
    /// Opens a session and tries to take `lane`'s advisory lock; `None` if another session has it.
    pub async fn try_acquire(
        db: &DbConfig,
        schema: &SchemaName,
        lock_class: i32,
        lane: i16,
        archive: bool,
    ) -> Result<Option<Self>, ConnectError> {
        let (client, closed) = db.connect_watched().await?;
        let session = async {
            let got: bool =
                client.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&lock_class, &i32::from(lane)]).await?.get(0);
            if !got {
                return Ok(None);
            }
            let claim = client.prepare(&schema.qualify(include_str!("../sql/claim.sql"))).await?;
            let delete = client.prepare(&schema.qualify(include_str!("../sql/delete_acked.sql"))).await?;
            let archive = if archive {
                Some(client.prepare(&schema.qualify(include_str!("../sql/archive_acked.sql"))).await?)
            } else {
                None
            };
            let failures = client.prepare(&schema.qualify(include_str!("../sql/record_failures.sql"))).await?;
            Ok(Some((claim, delete, archive, failures)))
        };
        match session.await.map_err(ConnectError::Session)? {
            None => Ok(None),
            Some((claim, delete, archive, failures)) => {
                Ok(Some(Self { client, closed, lane, claim, delete, archive, failures }))
            }
        }
    }

    /// Cancelled when the session is gone (and with it the lane's lock).
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// The head of the lane, in sequence order.
    pub async fn claim(&self, limit: i64) -> Result<Vec<ClaimedRow>, tokio_postgres::Error> {
        let rows = self.client.query(&self.claim, &[&self.lane, &limit]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let (headers, malformed) = decode_headers(r.get::<_, serde_json::Value>(5));
                ClaimedRow {
                    seq: r.get(0),
                    id: r.get(1),
                    topic: r.get(2),
                    key: r.get(3),
                    payload: r.get(4),
                    headers,
                    malformed,
                    message_type: r.get(6),
                    content_type: r.get(7),
                    correlation_id: r.get(8),
                    traceparent: r.get(9),
                    created_at: r.get(10),
                    attempts: r.get(11),
                    waiting: r.get(12),
                    wait_ms: r.get(13),
                }
            })
            .collect())
    }

    /// Removes acknowledged rows (or moves them to the archive) in one statement.
    pub async fn complete(&self, acked: &[Acked]) -> Result<u64, tokio_postgres::Error> {
        if acked.is_empty() {
            return Ok(0);
        }
        let seqs: Vec<i64> = acked.iter().map(|a| a.seq).collect();
        match &self.archive {
            None => self.client.execute(&self.delete, &[&self.lane, &seqs]).await,
            Some(stmt) => {
                let topics: Vec<&str> = acked.iter().map(|a| a.kafka_topic.as_str()).collect();
                let partitions: Vec<i32> = acked.iter().map(|a| a.partition).collect();
                let offsets: Vec<i64> = acked.iter().map(|a| a.offset).collect();
                self.client.execute(stmt, &[&self.lane, &seqs, &topics, &partitions, &offsets]).await
            }
        }
    }

    /// Records failed attempts (attempts + 1, last error, next attempt time) in one statement.
    pub async fn record_failures(&self, failed: &[FailedAttempt]) -> Result<u64, tokio_postgres::Error> {
        if failed.is_empty() {
            return Ok(0);
        }
        let seqs: Vec<i64> = failed.iter().map(|f| f.seq).collect();
        let errors: Vec<&str> = failed.iter().map(|f| f.error.as_str()).collect();
        let delays: Vec<i64> = failed.iter().map(|f| f.delay_ms).collect();
        self.client.execute(&self.failures, &[&self.lane, &seqs, &errors, &delays]).await
    }

    /// The session, for statements of later stages (dead letters).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn decode_headers(v: serde_json::Value) -> (Vec<(String, String)>, Option<String>) {
    match v {
        serde_json::Value::Object(map) => {
            let mut out = Vec::with_capacity(map.len());
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) => out.push((k, s)),
                    other => {
                        let kind = match other {
                            serde_json::Value::Null => "null",
                            serde_json::Value::Bool(_) => "boolean",
                            serde_json::Value::Number(_) => "number",
                            serde_json::Value::Array(_) => "array",
                            _ => "object",
                        };
                        return (Vec::new(), Some(format!("header {k:?} has a {kind} value, not a string")));
                    }
                }
            }
            (out, None)
        }
        _ => (Vec::new(), Some("headers are not a JSON object".to_owned())),
    }
}
