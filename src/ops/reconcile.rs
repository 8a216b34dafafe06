//! `reconcile`: what the relay delivered (the archive of `run --archive`) against what each
//! consumer recorded in its inbox, over a window of delivery time. Set-based: the window's
//! deliveries are staged once in a temporary table of the inbox's session (the archive may live in
//! another database), then every consumer is one join against its inbox and its dead letters.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Client;
use uuid::Uuid;

use super::OpsError;
use crate::schema::SchemaName;

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct ReconcileRequest {
    /// The consumers (inbox names) to check.
    pub consumers: Vec<String>,
    /// Deliveries at or after this time.
    pub since: DateTime<Utc>,
    /// Deliveries before this time.
    pub until: DateTime<Utc>,
    /// Deliveries more recent than this are in flight, not missing, when unprocessed.
    pub grace: Duration,
    /// Only this Kafka topic.
    pub topic: Option<String>,
    /// At most this many missing messages listed per consumer.
    pub list_limit: i64,
}

/// One consumer's figures for one topic (or, in [`Reconciliation::consumers`], all topics).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    /// The consumer.
    pub consumer: String,
    /// The Kafka topic (`*` for a consumer's total).
    pub topic: String,
    /// Distinct messages the relay delivered in the window.
    pub delivered: i64,
    /// Of those, recorded in the consumer's inbox (effect applied).
    pub processed: i64,
    /// Of those, dead-lettered by the consumer and not processed.
    pub dead_lettered: i64,
    /// Neither, but delivered within the grace period: probably still on their way.
    pub in_flight: i64,
    /// Neither, and delivered before the grace period: the consumer has not processed them.
    pub missing: i64,
    /// Processed by the consumer in the window, but never delivered by this relay as far as the
    /// archive knows (another producer wrote them, or the archive was pruned).
    pub unknown: i64,
    /// When the oldest missing message was delivered.
    pub oldest_missing_at: Option<DateTime<Utc>>,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.delivered += o.delivered;
        self.processed += o.processed;
        self.dead_lettered += o.dead_lettered;
        self.in_flight += o.in_flight;
        self.missing += o.missing;
        self.unknown += o.unknown;
        self.oldest_missing_at = match (self.oldest_missing_at, o.oldest_missing_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// A delivered message a consumer has not processed: where to re-consume it from.
#[derive(Debug, Clone, Serialize)]
pub struct MissingMessage {
    /// The consumer that has not processed it.
    pub consumer: String,
    /// The message id.
    pub id: Uuid,
    /// Where the relay delivered it.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The outbox lane.
    pub lane: i16,
    /// The outbox sequence number.
    pub seq: i64,
    /// When the broker acknowledged it.
    pub delivered_at: DateTime<Utc>,
}

/// What a reconciliation found.
#[derive(Debug, Clone, Serialize)]
pub struct Reconciliation {
    /// This run's id (the rows it recorded carry it).
    pub run_id: Uuid,
    /// The window.
    pub since: DateTime<Utc>,
    /// The window's end.
    pub until: DateTime<Utc>,
    /// The grace period, in seconds.
    pub grace_seconds: f64,
    /// Deliveries neither processed nor dead-lettered after this time are in flight.
    pub cutoff: DateTime<Utc>,
    /// The archive's oldest delivery.
    pub archive_oldest: DateTime<Utc>,
    /// The archive's newest delivery.
    pub archive_newest: DateTime<Utc>,
    /// Warnings about what the figures cannot cover (a window that starts before the archive).
    pub warnings: Vec<String>,
    /// Per consumer and topic.
    pub by_topic: Vec<Tally>,
    /// Per consumer, all topics (`topic` is `*`).
    pub consumers: Vec<Tally>,
    /// The missing messages, at most `list_limit` per consumer.
    pub missing: Vec<MissingMessage>,
    /// How long it took, in seconds.
    pub elapsed_seconds: f64,
}

impl Reconciliation {
    /// Missing messages over every consumer.
    pub fn missing_total(&self) -> i64 {
        self.consumers.iter().map(|c| c.missing).sum()
    }
}

/// Why a reconciliation cannot run, said so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A bad window, no consumer, an unknown consumer.
    #[error("{0}")]
    BadArgument(String),
    /// The archive holds nothing.
    #[error(
        "the delivery archive of schema {0} is empty: reconciliation compares the consumers' inboxes with what the \
         relay archives, and the relay archives only with `run --archive` (deliveries made without it cannot be \
         reconciled); start the relay with --archive and reconcile a window after that"
    )]
    NoArchive(String),
    /// The database refused.
    #[error(transparent)]
    Ops(#[from] OpsError),
}

impl From<tokio_postgres::Error> for ReconcileError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Ops(OpsError::Db(e))
    }
}

/// Progress of a long reconciliation, for the operator.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Deliveries of the window staged so far.
    Staged {
        /// How many.
        rows: u64,
        /// Since the start.
        elapsed: Duration,
    },
    /// One consumer done.
    Consumer {
        /// Its name.
        consumer: String,
        /// Its totals.
        tally: Tally,
        /// Since the start.
        elapsed: Duration,
    },
}

/// Settings for the session that reads the inboxes, before its first use of a temporary table
/// (`temp_buffers` cannot change after it): temporary tables live in the session's own buffers
/// (8 MB by default) and a million staged deliveries take about 100 MB; the joins hash a million
/// inbox rows (`work_mem`, 4 MB by default, made them spill to disk). What the CLI sets.
pub const SESSION_SETTINGS: &str = "SET temp_buffers = '512MB'; SET work_mem = '64MB'";

/// Rows read from the archive's database per page when the inbox is in another one.
const PAGE: i64 = 50_000;
/// Ids asked about per statement when looking for unknown messages in the archive.
const ARCHIVE_PROBE: usize = 10_000;

/// The consumers the inbox database knows: an inbox row or an inbox dead letter.
pub async fn known_consumers(inbox: &Client, schema: &SchemaName) -> Result<Vec<String>, OpsError> {
    let rows = inbox.query(&schema.qualify(include_str!("../sql/reconcile_consumers.sql")), &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Reconciles the archive in `outbox` with the inboxes in `inbox` (`None`: the same database and
/// session). The inbox's session gets a temporary table, dropped at the end.
pub async fn reconcile(
    outbox: &Client,
    inbox: Option<&Client>,
    schema: &SchemaName,
    req: &ReconcileRequest,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Reconciliation, ReconcileError> {
    let started = Instant::now();
    if req.since >= req.until {
        return Err(ReconcileError::BadArgument(format!(
            "bad window: --since {} is not before --until {}",
            req.since.to_rfc3339(),
            req.until.to_rfc3339()
        )));
    }
    if req.consumers.is_empty() {
        return Err(ReconcileError::BadArgument("name the consumers to reconcile: --consumer NAME".into()));
    }
    let q = |s: &str| schema.qualify(s);
    let local = inbox.is_none();
    let ib = inbox.unwrap_or(outbox);
    let known = known_consumers(ib, schema).await?;
    let unknown: Vec<&String> = req.consumers.iter().filter(|c| !known.contains(c)).collect();
    if !unknown.is_empty() {
        return Err(ReconcileError::BadArgument(format!(
            "unknown consumer{} {}: this database's inbox knows {} (check --consumer, --schema and \
             --inbox-database-url)",
            if unknown.len() > 1 { "s" } else { "" },
            unknown.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", "),
            if known.is_empty() {
                "no consumer at all".to_owned()
            } else {
                known.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", ")
            }
        )));
    }
    let bounds = outbox.query_one(&q(include_str!("../sql/reconcile_archive_bounds.sql")), &[]).await?;
    let (Some(oldest), Some(newest)) =
        (bounds.get::<_, Option<DateTime<Utc>>>("oldest"), bounds.get::<_, Option<DateTime<Utc>>>("newest"))
    else {
        return Err(ReconcileError::NoArchive(schema.as_str().to_owned()));
    };
    let mut warnings = Vec::new();
    if req.since < oldest {
        warnings.push(format!(
            "the archive's oldest delivery is at {}, after the window's start: deliveries before it are not \
             reconciled (the relay archives only with `run --archive`, and --archive-retention prunes the archive), \
             and messages processed in the window but delivered before it count as unknown",
            oldest.to_rfc3339()
        ));
    }
    // The cutoff by the inbox database's clock, the one its processed_at and the archive's
    // delivered_at come from (the same server, or one kept in time with it).
    let db_now: DateTime<Utc> = ib.query_one("SELECT now()", &[]).await?.get(0);
    let cutoff = db_now - chrono::Duration::from_std(req.grace).unwrap_or(chrono::Duration::MAX);

    ib.batch_execute(include_str!("../sql/reconcile_stage_table.sql")).await?;
    let staged = stage(outbox, ib, schema, req, local, started, progress).await;
    let result = match staged {
        Ok(()) => tally(outbox, ib, schema, req, cutoff, started, progress).await,
        Err(e) => Err(e),
    };
    // The temporary table goes with the session too; a library caller's session is left clean.
    let _ = ib.batch_execute("DROP TABLE IF EXISTS pg_temp.reconcile_delivered").await;
    let (by_topic, consumers, missing) = result?;
    Ok(Reconciliation {
        run_id: Uuid::now_v7(),
        since: req.since,
        until: req.until,
        grace_seconds: req.grace.as_secs_f64(),
        cutoff,
        archive_oldest: oldest,
        archive_newest: newest,
        warnings,
        by_topic,
        consumers,
        missing,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Stages the window's deliveries in the inbox's session: one statement when the archive is in
/// the same database, pages read from the archive's database otherwise.
async fn stage(
    outbox: &Client,
    ib: &Client,
    schema: &SchemaName,
    req: &ReconcileRequest,
    local: bool,
    started: Instant,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<(), ReconcileError> {
    let q = |s: &str| schema.qualify(s);
    if local {
        let rows = ib
            .execute(&q(include_str!("../sql/reconcile_stage_local.sql")), &[&req.since, &req.until, &req.topic])
            .await?;
        progress(Progress::Staged { rows, elapsed: started.elapsed() });
    } else {
        let page = outbox.prepare(&q(include_str!("../sql/reconcile_archive_page.sql"))).await?;
        let insert = ib.prepare(include_str!("../sql/reconcile_stage_page.sql")).await?;
        let (mut from, mut after, mut total) = (req.since, Uuid::nil(), 0u64);
        loop {
            let rows = outbox.query(&page, &[&from, &req.until, &req.topic, &after, &PAGE]).await?;
            let Some(last) = rows.last() else { break };
            (from, after) = (last.get("delivered_at"), last.get("id"));
            let ids: Vec<Uuid> = column(&rows, "id");
            let topics: Vec<String> = column(&rows, "kafka_topic");
            let partitions: Vec<i32> = column(&rows, "kafka_partition");
            let offsets: Vec<i64> = column(&rows, "kafka_offset");
            let lanes: Vec<i16> = column(&rows, "lane");
            let seqs: Vec<i64> = column(&rows, "seq");
            let times: Vec<DateTime<Utc>> = column(&rows, "delivered_at");
            ib.execute(&insert, &[&ids, &topics, &partitions, &offsets, &lanes, &seqs, &times]).await?;
            total += rows.len() as u64;
            progress(Progress::Staged { rows: total, elapsed: started.elapsed() });
            if (rows.len() as i64) < PAGE {
                break;
            }
        }
        if total == 0 {
            progress(Progress::Staged { rows: 0, elapsed: started.elapsed() });
        }
    }
    // One row per id; a temporary table has no statistics until analysed, and without them the
    // joins below are planned for a few rows.
    let index = "CREATE UNIQUE INDEX reconcile_delivered_id ON pg_temp.reconcile_delivered (id)";
    if let Err(e) = ib.batch_execute(index).await {
        if e.code() != Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
            return Err(e.into());
        }
        ib.batch_execute(include_str!("../sql/reconcile_stage_dedup.sql")).await?;
        ib.batch_execute(index).await?;
    }
    ib.batch_execute("ANALYZE pg_temp.reconcile_delivered").await?;
    Ok(())
}

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(rows: &'a [tokio_postgres::Row], name: &str) -> Vec<T> {
    rows.iter().map(|r| r.get(name)).collect()
}

type Tallies = (Vec<Tally>, Vec<Tally>, Vec<MissingMessage>);

/// Per consumer: the join against its inbox and dead letters, its missing messages, and what it
/// processed that the archive never delivered.
async fn tally(
    outbox: &Client,
    ib: &Client,
    schema: &SchemaName,
    req: &ReconcileRequest,
    cutoff: DateTime<Utc>,
    started: Instant,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Tallies, ReconcileError> {
    let q = |s: &str| schema.qualify(s);
    let (mut by_topic, mut consumers, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for consumer in &req.consumers {
        let mut topics: Vec<Tally> = ib
            .query(&q(include_str!("../sql/reconcile_tally.sql")), &[consumer, &cutoff])
            .await?
            .iter()
            .map(|r| Tally {
                consumer: consumer.clone(),
                topic: r.get("topic"),
                delivered: r.get("delivered"),
                processed: r.get("processed"),
                dead_lettered: r.get("dead_lettered"),
                in_flight: r.get("in_flight"),
                missing: r.get("missing"),
                unknown: 0,
                oldest_missing_at: r.get("oldest_missing"),
            })
            .collect();
        for (topic, n) in unknown_by_topic(outbox, ib, schema, req, consumer).await? {
            match topics.iter_mut().find(|t| t.topic == topic) {
                Some(t) => t.unknown = n,
                None => topics.push(Tally { consumer: consumer.clone(), topic, unknown: n, ..Default::default() }),
            }
        }
        let mut total = Tally { consumer: consumer.clone(), topic: "*".into(), ..Default::default() };
        for t in &topics {
            total.add(t);
        }
        if total.missing > 0 {
            let rows = ib
                .query(&q(include_str!("../sql/reconcile_missing.sql")), &[consumer, &cutoff, &req.list_limit])
                .await?;
            missing.extend(rows.iter().map(|r| MissingMessage {
                consumer: consumer.clone(),
                id: r.get("id"),
                topic: r.get("kafka_topic"),
                partition: r.get("kafka_partition"),
                offset: r.get("kafka_offset"),
                lane: r.get("lane"),
                seq: r.get("seq"),
                delivered_at: r.get("delivered_at"),
            }));
        }
        progress(Progress::Consumer { consumer: consumer.clone(), tally: total.clone(), elapsed: started.elapsed() });
        by_topic.extend(topics);
        consumers.push(total);
    }
    Ok((by_topic, consumers, missing))
}

/// What `consumer` processed in the window that is not among the window's deliveries nor
/// anywhere in the archive, counted per topic.
async fn unknown_by_topic(
    outbox: &Client,
    ib: &Client,
    schema: &SchemaName,
    req: &ReconcileRequest,
    consumer: &str,
) -> Result<Vec<(String, i64)>, ReconcileError> {
    let q = |s: &str| schema.qualify(s);
    let candidates = ib
        .query(
            &q(include_str!("../sql/reconcile_unknown_candidates.sql")),
            &[&consumer, &req.since, &req.until, &req.topic],
        )
        .await?;
    let mut archived = std::collections::HashSet::new();
    let probe = outbox.prepare(&q(include_str!("../sql/reconcile_archived.sql"))).await?;
    let ids: Vec<Uuid> = candidates.iter().map(|r| r.get("message_id")).collect();
    for chunk in ids.chunks(ARCHIVE_PROBE) {
        for r in outbox.query(&probe, &[&chunk]).await? {
            archived.insert(r.get::<_, Uuid>(0));
        }
    }
    let mut counts: std::collections::BTreeMap<String, i64> = Default::default();
    for r in &candidates {
        if !archived.contains(&r.get::<_, Uuid>("message_id")) {
            *counts.entry(r.get("topic")).or_default() += 1;
        }
    }
    Ok(counts.into_iter().collect())
}

/// Records what a run found, one row per consumer, for `status` and the relay's metrics.
pub async fn record(outbox: &Client, schema: &SchemaName, r: &Reconciliation, actor: &str) -> Result<(), OpsError> {
    let stmt = outbox.prepare(&schema.qualify(include_str!("../sql/reconcile_record.sql"))).await?;
    for c in &r.consumers {
        outbox
            .execute(
                &stmt,
                &[
                    &r.run_id,
                    &c.consumer,
                    &r.since,
                    &r.until,
                    &r.grace_seconds,
                    &c.delivered,
                    &c.processed,
                    &c.dead_lettered,
                    &c.in_flight,
                    &c.missing,
                    &c.unknown,
                    &c.oldest_missing_at,
                    &actor,
                ],
            )
            .await?;
    }
    Ok(())
}

/// The newest reconciliation of one consumer.
#[derive(Debug, Clone, Serialize)]
pub struct LastReconciliation {
    /// When it ran.
    pub at: DateTime<Utc>,
    /// How long ago, in seconds.
    pub age_seconds: f64,
    /// Its window.
    pub since: DateTime<Utc>,
    /// Its window's end.
    pub until: DateTime<Utc>,
    /// What it found (topic `*`: every topic).
    #[serde(flatten)]
    pub found: Tally,
}

/// The newest reconciliation of each consumer (none before the first run).
pub async fn last_reconciliations(
    client: &impl tokio_postgres::GenericClient,
    schema: &SchemaName,
) -> Result<Vec<LastReconciliation>, tokio_postgres::Error> {
    let rows = client.query(&schema.qualify(include_str!("../sql/reconcile_last.sql")), &[]).await?;
    Ok(rows
        .iter()
        .map(|r| LastReconciliation {
            at: r.get("at"),
            age_seconds: r.get("age_s"),
            since: r.get("since"),
            until: r.get("until"),
            found: Tally {
                consumer: r.get("consumer"),
                topic: "*".into(),
                delivered: r.get("delivered"),
                processed: r.get("processed"),
                dead_lettered: r.get("dead_lettered"),
                in_flight: r.get("in_flight"),
                missing: r.get("missing"),
                unknown: r.get("unknown"),
                oldest_missing_at: r.get("oldest_missing_at"),
            },
        })
        .collect())
}

/// Writes the audit row of one missing message re-published by `reconcile --replay-missing`.
pub async fn replayed(
    outbox: &Client,
    schema: &SchemaName,
    m: &MissingMessage,
    republished: (i32, i64),
    audit: &super::Audit,
) -> Result<(), OpsError> {
    outbox
        .execute(
            &schema.qualify(include_str!("../sql/reconcile_replayed.sql")),
            &[
                &audit.actor,
                &m.id,
                &audit.why,
                &m.consumer,
                &m.topic,
                &m.partition,
                &m.offset,
                &republished.0,
                &republished.1,
            ],
        )
        .await?;
    Ok(())
}
