//! A lane's database session: it holds the lane's advisory lock and runs every statement of that
//! lane, so a lost session loses the lock and the ability to delete at the same moment (there is
//! never a second owner that could still change the lane's rows). Under a session budget one
//! session serves several lanes and holds each of their locks ([`LaneConn`]).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{ConnectError, DbConfig};
use crate::schema::SchemaName;

/// An outbox row read for delivery.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    /// The lane.
    pub lane: i16,
    /// Sequence number (order within the lane).
    pub seq: i64,
    /// Message id.
    pub id: Uuid,
    /// Topic as written.
    pub topic: String,
    /// Kafka key.
    pub key: Option<String>,
    /// Payload (none: a tombstone).
    pub payload: Payload,
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
    /// How old the row is, in milliseconds.
    pub age_ms: i64,
    /// The transaction that wrote it (none for rows written before migration 9).
    pub xid: Option<i64>,
}

/// A row's payload, read in place from the database's reply: it is copied once, into the
/// producer's buffer, not first into a buffer of its own. Its `Debug` shows the size only, so a
/// row printed by mistake does not put a payload in a log line.
#[derive(Clone)]
pub struct Payload(PayloadSource);

#[derive(Clone)]
enum PayloadSource {
    /// Column `column` of row `index` of a claim's reply (shared by the claim's rows).
    Reply {
        rows: std::sync::Arc<[tokio_postgres::Row]>,
        index: usize,
        column: usize,
    },
    Owned(Option<Vec<u8>>),
}

impl Payload {
    /// The bytes (none for a tombstone).
    pub fn as_deref(&self) -> Option<&[u8]> {
        match &self.0 {
            PayloadSource::Reply { rows, index, column } => rows[*index].get(*column),
            PayloadSource::Owned(p) => p.as_deref(),
        }
    }
}

impl From<Option<Vec<u8>>> for Payload {
    fn from(p: Option<Vec<u8>>) -> Self {
        Payload(PayloadSource::Owned(p))
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.as_deref() {
            Some(p) => write!(f, "Payload({} bytes)", p.len()),
            None => f.write_str("Payload(none)"),
        }
    }
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
    /// When the relay received the broker's acknowledgement (the archive's `delivered_at`).
    pub acked_at: std::time::Instant,
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

/// A row to move to the dead letters.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The row.
    pub seq: i64,
    /// Why (`message_too_large`, `retries_exhausted`, ...).
    pub reason: String,
    /// The error's class.
    pub error_class: String,
    /// The last error.
    pub error: String,
}

/// Why a lane statement failed.
#[derive(Debug, thiserror::Error)]
pub enum LaneDbError {
    /// The database refused or the session broke.
    #[error("{class}: {source}")]
    Db {
        /// The error's class.
        class: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// No answer in time (a blackholed connection, a stuck server).
    #[error("pg.timeout: no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// The columns of `claim.sql`, in the order [`LaneSession::claim`] reads them.
const CLAIM_COLUMNS: [&str; 17] = [
    "seq",
    "id",
    "topic",
    "key",
    "payload",
    "headers",
    "message_type",
    "content_type",
    "correlation_id",
    "traceparent",
    "created_at",
    "attempts",
    "waiting",
    "wait_ms",
    "age_ms",
    "lane_top",
    "xid",
];

/// What one claim read.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The rows, in sequence order.
    pub rows: Vec<ClaimedRow>,
    /// For a claim from the lane's start: the lane's highest sequence in the claim's snapshot.
    /// Every row up to it that is not yet visible committed after that snapshot, so its NOTIFY
    /// (or the transaction rule of `claim.sql`) covers it, and the lane may claim up to here.
    pub lane_top: Option<i64>,
}

/// A session lane statements run on: a lane's own (the default), or shared by several lanes under
/// a session budget (`--max-sessions`), of one outbox or of several outboxes on one database. It
/// holds the advisory lock of every lane it serves; each lane's statements go through it alone,
/// so when it is gone, every lock it held and every way to change those lanes' rows are gone
/// together.
pub struct LaneConn {
    client: Client,
    closed: CancellationToken,
    call_timeout: std::time::Duration,
    /// The lanes it serves now (a pool gives a new lane to the session serving the fewest).
    lanes: std::sync::atomic::AtomicUsize,
    /// Each outbox's statements, prepared on this session when its first lane comes.
    outboxes: tokio::sync::Mutex<HashMap<SchemaName, Arc<Statements>>>,
}

/// One outbox's lane statements, prepared on one session.
struct Statements {
    lock_class: i32,
    claim: Statement,
    delete: Statement,
    archive: Option<Statement>,
    failures: Statement,
    dead: Statement,
}

impl LaneConn {
    /// Opens a session for lane statements.
    pub async fn open(db: &DbConfig, call_timeout: std::time::Duration) -> Result<Arc<Self>, ConnectError> {
        let (client, closed) = db.connect_watched().await?;
        // The lane's own bookkeeping (deletes, archive, attempts, dead letters) need not wait
        // for the disk: if a crash loses one of these commits, its rows come back and are
        // delivered again, which at-least-once allows and the inbox absorbs (ARCHITECTURE.md).
        // Under a held snapshot the statistics see few live rows, and the planner read a
        // lane's head, and its top (`lane_top`), with bitmap scans that visit every heap page
        // holding a dead row of any lane: 1.5 s each after an hour. Index scans read only the
        // lane's entries, and the top from the end (0.1 ms).
        let setup = client.batch_execute("SET synchronous_commit = off; SET enable_bitmapscan = off");
        match tokio::time::timeout(call_timeout, setup).await {
            Ok(r) => r.map_err(ConnectError::Session)?,
            Err(_) => return Err(ConnectError::Timeout(call_timeout)),
        }
        Ok(Arc::new(Self { client, closed, call_timeout, lanes: Default::default(), outboxes: Default::default() }))
    }

    /// The outbox's statements on this session, prepared the first time.
    async fn statements(
        &self,
        schema: &SchemaName,
        lock_class: i32,
        archive: bool,
    ) -> Result<Arc<Statements>, ConnectError> {
        let mut outboxes = self.outboxes.lock().await;
        if let Some(st) = outboxes.get(schema) {
            return Ok(st.clone());
        }
        let client = &self.client;
        let prepared = async {
            let claim = client.prepare(&schema.qualify(include_str!("../sql/claim.sql"))).await?;
            // The claim's rows are read by position (the hot path); the names pin the positions.
            debug_assert_eq!(
                claim.columns().iter().map(|c| c.name()).collect::<Vec<_>>(),
                CLAIM_COLUMNS,
                "claim.sql's columns and ClaimedRow's reads are out of step"
            );
            let delete = client.prepare(&schema.qualify(include_str!("../sql/delete_acked.sql"))).await?;
            let archive = if archive {
                Some(client.prepare(&schema.qualify(include_str!("../sql/archive_acked.sql"))).await?)
            } else {
                None
            };
            let failures = client.prepare(&schema.qualify(include_str!("../sql/record_failures.sql"))).await?;
            let dead = client.prepare(&schema.qualify(include_str!("../sql/dead_letter.sql"))).await?;
            Ok(Statements { lock_class, claim, delete, archive, failures, dead })
        };
        let st = match tokio::time::timeout(self.call_timeout, prepared).await {
            Ok(r) => Arc::new(r.map_err(ConnectError::Session)?),
            Err(_) => return Err(ConnectError::Timeout(self.call_timeout)),
        };
        outboxes.insert(schema.clone(), st.clone());
        Ok(st)
    }

    /// Cancelled when the session is gone (and with it every lock it held), or retired.
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// The lanes it serves now.
    pub fn lanes(&self) -> usize {
        self.lanes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops every lane on this session (they see it as lost): it closes with the last of them
    /// and the server lets go of every lock it held.
    pub fn retire(&self) {
        self.closed.cancel();
    }

    /// Lets go of the lock of `lane` (of the outbox whose locks are of `lock_class`), once its
    /// lane loop has ended: the unlock runs after every statement the lane sent on this session
    /// (one session runs its statements one at a time).
    pub async fn unlock(&self, lock_class: i32, lane: i16) -> Result<(), LaneDbError> {
        self.lanes.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        timed(
            self.call_timeout,
            self.client.execute("SELECT pg_advisory_unlock($1, $2)", &[&lock_class, &i32::from(lane)]),
        )
        .await
        .map(|_| ())
    }
}

/// One lane on its session: the statements of that lane.
pub struct LaneSession {
    conn: Arc<LaneConn>,
    st: Arc<Statements>,
    lane: i16,
}

/// The first key of the schema's lane locks (`pg_try_advisory_lock(class, lane)`); operators and
/// tests find a lane's holder in `pg_locks` by it.
pub async fn lane_lock_class(
    client: &impl tokio_postgres::GenericClient,
    schema: &SchemaName,
) -> Result<i32, tokio_postgres::Error> {
    Ok(client.query_one(include_str!("../sql/lane_lock_class.sql"), &[&schema.as_str()]).await?.get("class"))
}

/// Runs a statement under the lane's call timeout, classifying its error.
async fn timed<T>(
    limit: std::time::Duration,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, LaneDbError> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(LaneDbError::Db { class: crate::classify::postgres(&source).class, source }),
        Err(_) => Err(LaneDbError::Timeout(limit)),
    }
}

/// A lane of one outbox: its schema, the first key of its locks, whether it archives.
#[derive(Debug, Clone)]
pub struct LaneOf<'a> {
    /// The outbox's schema.
    pub schema: &'a SchemaName,
    /// The first key of its lane locks ([`lane_lock_class`]).
    pub lock_class: i32,
    /// Whether acknowledged rows are archived.
    pub archive: bool,
    /// The lane.
    pub lane: i16,
}

impl LaneSession {
    /// Opens a session of the lane's own and tries to take `lane`'s advisory lock; `None` if
    /// another session has it.
    pub async fn try_acquire(
        db: &DbConfig,
        schema: &SchemaName,
        lock_class: i32,
        lane: i16,
        archive: bool,
        call_timeout: std::time::Duration,
    ) -> Result<Option<Self>, ConnectError> {
        let conn = LaneConn::open(db, call_timeout).await?;
        Self::try_acquire_on(&conn, LaneOf { schema, lock_class, archive, lane }).await
    }

    /// Tries to take the lane's advisory lock on `conn`, a session that may hold other lanes
    /// (of this outbox or others) too; `None` if another session has it.
    pub async fn try_acquire_on(conn: &Arc<LaneConn>, of: LaneOf<'_>) -> Result<Option<Self>, ConnectError> {
        let st = conn.statements(of.schema, of.lock_class, of.archive).await?;
        let lane_key = i32::from(of.lane);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&st.lock_class, &lane_key];
        let lock = conn.client.query_one(include_str!("../sql/lane_lock_try.sql"), &params);
        let got: bool = match tokio::time::timeout(conn.call_timeout, lock).await {
            Ok(r) => r.map_err(ConnectError::Session)?.get("got"),
            Err(_) => return Err(ConnectError::Timeout(conn.call_timeout)),
        };
        if got {
            conn.lanes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(got.then(|| Self { conn: conn.clone(), st, lane: of.lane }))
    }

    /// Cancelled when the session is gone (and with it the lane's lock).
    pub fn closed(&self) -> &CancellationToken {
        &self.conn.closed
    }

    /// Whether the session serves other lanes too (under a session budget).
    pub fn shared(&self) -> bool {
        self.conn.lanes() > 1
    }

    /// The lane's pending rows with sequences `from..=to`, in sequence order, and below `from` the
    /// rows of the same transactions, except for the transactions in `looked_below` (the lane looked
    /// below for them already). Starting at the lane loop's cursor rather than at the lane's start
    /// keeps the index scan clear of the rows deleted below it, which an old snapshot elsewhere
    /// keeps from being cleaned up.
    pub async fn claim(&self, from: i64, to: i64, limit: i64, looked_below: &[i64]) -> Result<Claimed, LaneDbError> {
        let rows = timed(
            self.conn.call_timeout,
            self.conn.client.query(&self.st.claim, &[&self.lane, &limit, &from, &to, &looked_below]),
        )
        .await?;
        let lane_top = rows.first().and_then(|r| r.get::<_, Option<i64>>(15));
        let reply: std::sync::Arc<[tokio_postgres::Row]> = rows.into();
        let rows = reply
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let (headers, malformed) = decode_headers(r.get::<_, serde_json::Value>(5));
                ClaimedRow {
                    lane: self.lane,
                    seq: r.get(0),
                    id: r.get(1),
                    topic: r.get(2),
                    key: r.get(3),
                    payload: Payload(PayloadSource::Reply { rows: reply.clone(), index, column: 4 }),
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
                    age_ms: r.get(14),
                    xid: r.get(16),
                }
            })
            .collect();
        Ok(Claimed { rows, lane_top })
    }

    /// Removes acknowledged rows (or moves them to the archive) in one statement.
    pub async fn complete(&self, acked: &[Acked]) -> Result<u64, LaneDbError> {
        if acked.is_empty() {
            return Ok(0);
        }
        let seqs: Vec<i64> = acked.iter().map(|a| a.seq).collect();
        match &self.st.archive {
            None => {
                timed(self.conn.call_timeout, self.conn.client.execute(&self.st.delete, &[&self.lane, &seqs])).await
            }
            Some(stmt) => {
                let topics: Vec<&str> = acked.iter().map(|a| a.kafka_topic.as_str()).collect();
                let partitions: Vec<i32> = acked.iter().map(|a| a.partition).collect();
                let offsets: Vec<i64> = acked.iter().map(|a| a.offset).collect();
                // How long ago each acknowledgement came, so `delivered_at` is the broker's
                // acknowledgement on the database's clock, not the time of this batched statement.
                let ack_ages_us: Vec<i64> = acked.iter().map(|a| a.acked_at.elapsed().as_micros() as i64).collect();
                timed(
                    self.conn.call_timeout,
                    self.conn.client.execute(stmt, &[&self.lane, &seqs, &topics, &partitions, &offsets, &ack_ages_us]),
                )
                .await
            }
        }
    }

    /// Moves rows to the dead letters (and parks their keys under `park-key`) in one statement,
    /// so a row is never both pending and dead.
    pub async fn dead_letter(&self, dead: &[DeadLetter], park: bool, instance: uuid::Uuid) -> Result<u64, LaneDbError> {
        let seqs: Vec<i64> = dead.iter().map(|d| d.seq).collect();
        let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
        let classes: Vec<&str> = dead.iter().map(|d| d.error_class.as_str()).collect();
        let errors: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
        timed(
            self.conn.call_timeout,
            self.conn
                .client
                .execute(&self.st.dead, &[&self.lane, &seqs, &reasons, &classes, &errors, &park, &instance]),
        )
        .await
    }

    /// Records failed attempts (attempts + 1, last error, next attempt time) in one statement.
    pub async fn record_failures(&self, failed: &[FailedAttempt]) -> Result<u64, LaneDbError> {
        if failed.is_empty() {
            return Ok(0);
        }
        let seqs: Vec<i64> = failed.iter().map(|f| f.seq).collect();
        let errors: Vec<&str> = failed.iter().map(|f| f.error.as_str()).collect();
        let delays: Vec<i64> = failed.iter().map(|f| f.delay_ms).collect();
        timed(
            self.conn.call_timeout,
            self.conn.client.execute(&self.st.failures, &[&self.lane, &seqs, &errors, &delays]),
        )
        .await
    }

    /// The session, for statements of later stages (dead letters).
    pub fn client(&self) -> &Client {
        &self.conn.client
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
