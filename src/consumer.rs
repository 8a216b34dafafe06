//! A consumer runner around rdkafka that applies each message's effect exactly once.
//!
//! For each message: open a transaction, record the id in the inbox, call the handler with the
//! transaction (only if the id is new), commit, and only then store the offset
//! (`enable.auto.offset.store=false`; stored offsets are committed in the background and on
//! shutdown). A crash anywhere before the offset is stored redelivers the message, and the inbox
//! turns the redelivery into a duplicate. Partitions run in parallel, each in order, on a database
//! session of its own.
//!
//! ```no_run
//! use outbox_relay::consumer::{self, ConsumedMessage, ConsumerConfig, Handler, HandlerFuture};
//!
//! struct CountOrders;
//! impl Handler for CountOrders {
//!     fn handle<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>, m: &'a ConsumedMessage) -> HandlerFuture<'a> {
//!         Box::pin(async move {
//!             tx.execute("UPDATE totals SET orders = orders + 1", &[]).await?;
//!             Ok(())
//!         })
//!     }
//! }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::ClientContext;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::DbConfig;
use crate::inbox::{Inbox, InboxMessage, InboxOutcome};
use crate::retry::Backoff;
use crate::schema::SchemaName;

/// What a handler returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// A handler's failure; the message is retried in place, then dead-lettered (or the partition
/// stops, with [`PoisonPolicy::Stop`]).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The consumer's effect: runs inside the transaction that records the message id. It must not
/// commit or roll back.
pub trait Handler: Send + Sync + 'static {
    /// Applies the effect of `message` in `tx`.
    fn handle<'a>(&'a self, tx: &'a Transaction<'a>, message: &'a ConsumedMessage) -> HandlerFuture<'a>;
}

/// A message as the handler sees it.
#[derive(Debug, Clone)]
pub struct ConsumedMessage {
    /// The message id (from the id header).
    pub id: Uuid,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Payload.
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ConsumedMessage {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// What to do with a message whose handler keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonPolicy {
    /// Move it to `inbox_dead_letters` and go on with the partition.
    DeadLetter,
    /// Stop the runner with an error naming the message.
    Stop,
}

/// Test-only fault injection: crash right after the database commit, before the offset is stored.
#[doc(hidden)]
#[derive(Clone)]
pub struct CrashAfterCommit(pub Arc<dyn Fn(&ConsumedMessage) -> bool + Send + Sync>);

impl std::fmt::Debug for CrashAfterCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CrashAfterCommit")
    }
}

/// Runner configuration.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Consumer group.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// The inbox's consumer name (one per consuming service, stable across deployments).
    pub consumer_name: String,
    /// Schema holding the inbox.
    pub schema: SchemaName,
    /// The consumer's database.
    pub db: DbConfig,
    /// The header carrying the message id.
    pub id_header: String,
    /// Messages per transaction (1: one transaction per message).
    pub batch_size: usize,
    /// Handler attempts before the message is poison.
    pub max_attempts: u32,
    /// Delay between handler attempts (full jitter).
    pub backoff: Backoff,
    /// What happens to poison messages.
    pub poison_policy: PoisonPolicy,
    /// librdkafka properties (override the defaults).
    pub properties: Vec<(String, String)>,
    /// Inbox rows older than this are purged.
    pub retention: Duration,
    /// How often the purge runs.
    pub purge_interval: Duration,
    /// How long a graceful shutdown may take.
    pub shutdown_timeout: Duration,
    #[doc(hidden)]
    pub crash_after_commit: Option<CrashAfterCommit>,
}

impl ConsumerConfig {
    /// A configuration with the documented defaults.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
        consumer_name: impl Into<String>,
        schema: SchemaName,
        db: DbConfig,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics,
            consumer_name: consumer_name.into(),
            schema,
            db,
            id_header: crate::outbox::ID_HEADER.to_owned(),
            batch_size: 1,
            max_attempts: 5,
            backoff: Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(5) },
            poison_policy: PoisonPolicy::DeadLetter,
            properties: Vec::new(),
            retention: Duration::from_secs(7 * 24 * 3600),
            purge_interval: Duration::from_secs(3600),
            shutdown_timeout: Duration::from_secs(30),
            crash_after_commit: None,
        }
    }
}

/// Counters of a run.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Messages whose effect was applied.
    pub processed: AtomicU64,
    /// Redeliveries skipped.
    pub duplicates: AtomicU64,
    /// Same id, different payload: never applied.
    pub conflicts: AtomicU64,
    /// Messages moved to `inbox_dead_letters`.
    pub dead_lettered: AtomicU64,
    /// Handler failures (each attempt).
    pub handler_errors: AtomicU64,
    /// Inbox rows purged.
    pub purged: AtomicU64,
}

/// Why the runner stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The Kafka consumer could not be created or subscribed.
    #[error("the Kafka consumer could not start: {0} (check KAFKA_BROKERS and the -X properties)")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The consumer name is invalid.
    #[error(transparent)]
    Name(#[from] crate::inbox::InvalidConsumerName),
    /// A poison message under the `stop` policy.
    #[error("message {id} at {topic}/{partition}@{offset} kept failing ({error}); stopped as --poison-policy stop asks: fix the handler or the message, then restart")]
    Poison {
        /// Id.
        id: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// Last handler error.
        error: String,
    },
    /// A dead letter could not be written for a reason that will not pass by itself.
    #[error("writing an inbox dead letter failed permanently ({0}): check the consumer role's grants on inbox_dead_letters; the message was not acknowledged and is delivered again after a restart")]
    DeadLetterWrite(String),
    /// The test fault injector fired.
    #[error("crash injected after the database commit")]
    InjectedCrash,
}

struct RebalanceEvents(mpsc::UnboundedSender<Vec<(String, i32)>>);

impl ClientContext for RebalanceEvents {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(facility = fac, "librdkafka: {log_message}")
            }
            L::Warning => tracing::warn!(facility = fac, "librdkafka: {log_message}"),
            L::Notice | L::Info => tracing::info!(facility = fac, "librdkafka: {log_message}"),
            L::Debug => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }
}

impl ConsumerContext for RebalanceEvents {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<(String, i32)> =
                list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
            tracing::info!(partitions = ?revoked, "partitions revoked");
            let _ = self.0.send(revoked);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let assigned: Vec<(String, i32)> =
                    list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                tracing::info!(partitions = ?assigned, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

type KafkaConsumer = StreamConsumer<RebalanceEvents>;

struct Shared<H> {
    config: ConsumerConfig,
    inbox: Inbox,
    handler: Arc<H>,
    consumer: Arc<KafkaConsumer>,
    stats: Arc<ConsumerStats>,
    /// Cancelled to stop everything at once (poison under `stop`, injected crash).
    abort: CancellationToken,
    failure: std::sync::Mutex<Option<ConsumerError>>,
    dead_letter_sql: String,
}

struct Worker {
    tx: mpsc::UnboundedSender<ConsumedOrBad>,
    /// Messages handed over and not yet processed.
    depth: Arc<std::sync::atomic::AtomicUsize>,
    /// Cancelled when the partition is revoked: finish the message in hand, drop the rest.
    revoked: CancellationToken,
    paused: bool,
    task: JoinHandle<()>,
}

/// A partition is paused when this many messages wait for its worker, and resumed below
/// `RESUME_BELOW`: the poll loop never blocks, so it always serves rebalances and heartbeats.
const PAUSE_ABOVE: usize = 2_000;
const RESUME_BELOW: usize = 500;

/// A message, or why it has no usable id.
enum ConsumedOrBad {
    Ok(ConsumedMessage),
    NoId(ConsumedMessage, &'static str),
}

/// Runs until `shutdown` is cancelled (then finishes in-flight messages, commits offsets, leaves
/// the group) or a fatal error.
pub async fn run<H: Handler>(
    config: ConsumerConfig,
    handler: Arc<H>,
    shutdown: CancellationToken,
    stats: Arc<ConsumerStats>,
) -> Result<(), ConsumerError> {
    let inbox = Inbox::new(config.schema.clone(), &config.consumer_name)?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut kc = ClientConfig::new();
    kc.set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("socket.timeout.ms", "10000")
        // How long a fetch may wait for data. Apache Kafka answers a waiting fetch as soon as a
        // record arrives, so this only bounds idle polling there; a broker that does not answer
        // early (the test broker) makes it the floor of every message's latency (librdkafka's
        // default, 500 ms, put p50 commit-to-effect near 190 ms at 500 msg/s).
        .set("fetch.wait.max.ms", "100")
        // A consumer may start before its topic exists: notice it (and new partitions) in seconds.
        .set("topic.metadata.refresh.interval.ms", "5000");
    for (k, v) in &config.properties {
        kc.set(k, v);
    }
    let consumer: KafkaConsumer = kc.create_with_context(RebalanceEvents(events_tx))?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let abort = CancellationToken::new();
    let shared = Arc::new(Shared {
        dead_letter_sql: config.schema.qualify(include_str!("sql/inbox_dead_letter.sql")),
        config,
        inbox,
        handler,
        consumer: Arc::new(consumer),
        stats,
        abort: abort.clone(),
        failure: std::sync::Mutex::new(None),
    });
    let purge = tokio::spawn(purge_loop(shared.clone(), shutdown.clone()));
    let mut workers: HashMap<(String, i32), Worker> = HashMap::new();
    let mut backpressure = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = abort.cancelled() => break,
            revoked = events.recv() => release_revoked(&shared, &mut workers, revoked.unwrap_or_default()),
            _ = backpressure.tick() => {
                for ((topic, partition), w) in workers.iter_mut() {
                    if w.paused && w.depth.load(Ordering::Relaxed) < RESUME_BELOW {
                        let mut tpl = rdkafka::TopicPartitionList::new();
                        tpl.add_partition(topic, *partition);
                        if shared.consumer.resume(&tpl).is_ok() {
                            w.paused = false;
                        }
                    }
                }
            }
            m = shared.consumer.recv() => {
                let m = match m {
                    Ok(m) => decode(&m, &shared.config.id_header),
                    Err(e) => {
                        tracing::warn!(error = %e, "consume error; continuing");
                        continue;
                    }
                };
                // A revoke reported by the poll that returned this message must take effect before
                // it is handed out: if its partition was revoked and assigned again in that poll,
                // the old worker (about to drop what it holds) must not get it, or a new worker
                // would store later offsets past a message nobody applied.
                while let Ok(revoked) = events.try_recv() {
                    release_revoked(&shared, &mut workers, revoked);
                }
                let msg = match &m { ConsumedOrBad::Ok(x) | ConsumedOrBad::NoId(x, _) => x };
                let key = (msg.topic.clone(), msg.partition);
                let worker = workers.entry(key.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let depth = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                    let revoked = CancellationToken::new();
                    let task = tokio::spawn(partition_worker(shared.clone(), rx, depth.clone(), revoked.clone()));
                    Worker { tx, depth, revoked, paused: false, task }
                });
                worker.depth.fetch_add(1, Ordering::Relaxed);
                if worker.tx.send(m).is_err() {
                    tracing::warn!("a partition worker ended early; its messages are redelivered");
                }
                if !worker.paused && worker.depth.load(Ordering::Relaxed) > PAUSE_ABOVE {
                    let mut tpl = rdkafka::TopicPartitionList::new();
                    tpl.add_partition(&key.0, key.1);
                    if shared.consumer.pause(&tpl).is_ok() {
                        worker.paused = true;
                    }
                }
            }
        }
    }
    // Let the workers finish what they hold, then commit what was stored.
    let crashed =
        shared.failure.lock().expect("lock").as_ref().is_some_and(|e| matches!(e, ConsumerError::InjectedCrash));
    let tasks: Vec<JoinHandle<()>> = workers.into_values().map(|w| w.task).collect();
    let drain = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(shared.config.shutdown_timeout, drain).await.is_err() {
        tracing::warn!("shutdown deadline passed with messages in hand; they are redelivered after restart");
    }
    purge.abort();
    if !crashed {
        if let Err(e) = shared.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit");
        }
    }
    let failure = shared.failure.lock().expect("lock").take();
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Lets go of revoked partitions: each worker finishes the message in hand and drops the rest,
/// which the next owner (perhaps this consumer again) fetches from the committed offset.
fn release_revoked<H: Handler>(
    shared: &Shared<H>,
    workers: &mut HashMap<(String, i32), Worker>,
    revoked: Vec<(String, i32)>,
) {
    for key in revoked {
        if let Some(w) = workers.remove(&key) {
            w.revoked.cancel();
            // librdkafka keeps an application pause across revoke and re-assign: lift it, or the
            // partition would stay paused if it comes back.
            if w.paused {
                let mut tpl = rdkafka::TopicPartitionList::new();
                tpl.add_partition(&key.0, key.1);
                let _ = shared.consumer.resume(&tpl);
            }
        }
    }
}

fn decode(m: &BorrowedMessage<'_>, id_header: &str) -> ConsumedOrBad {
    let headers: Vec<(String, Vec<u8>)> = m
        .headers()
        .map(|h| h.iter().map(|x| (x.key.to_owned(), x.value.unwrap_or_default().to_vec())).collect())
        .unwrap_or_default();
    let id_value = headers.iter().find(|(k, _)| k == id_header).map(|(_, v)| v.clone());
    let mut msg = ConsumedMessage {
        id: Uuid::nil(),
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
    };
    match id_value {
        None => ConsumedOrBad::NoId(msg, "missing_id"),
        Some(v) => match std::str::from_utf8(&v).ok().and_then(|s| Uuid::parse_str(s).ok()) {
            Some(id) => {
                msg.id = id;
                ConsumedOrBad::Ok(msg)
            }
            None => ConsumedOrBad::NoId(msg, "invalid_id"),
        },
    }
}

async fn partition_worker<H: Handler>(
    shared: Arc<Shared<H>>,
    mut rx: mpsc::UnboundedReceiver<ConsumedOrBad>,
    depth: Arc<std::sync::atomic::AtomicUsize>,
    revoked: CancellationToken,
) {
    let mut db: Option<Client> = None;
    while let Some(first) = rx.recv().await {
        if shared.abort.is_cancelled() || revoked.is_cancelled() {
            return;
        }
        let mut batch = vec![first];
        while batch.len() < shared.config.batch_size {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let taken = batch.len();
        let last = match batch.last().expect("one at least") {
            ConsumedOrBad::Ok(m) | ConsumedOrBad::NoId(m, _) => (m.topic.clone(), m.partition, m.offset),
        };
        if process(&shared, &mut db, batch).await == Next::Stop {
            return;
        }
        depth.fetch_sub(taken, Ordering::Relaxed);
        // Only now, with the effects committed, may the offset move past these messages.
        // librdkafka stores `offset + 1` itself: pass the last processed message's own offset.
        if let Err(e) = shared.consumer.store_offset(&last.0, last.1, last.2) {
            tracing::debug!(topic = %last.0, partition = last.1, error = %e, "offset not stored (partition revoked?)");
        }
    }
}

/// What a partition worker does after a step. Every step that can fail says which, so that no
/// caller can treat an unwritten dead letter as handled (the offset would move past a message that
/// was neither applied nor recorded).
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The message is done with (applied, a duplicate, or recorded as a dead letter): its offset
    /// may be stored.
    Continue,
    /// The runner is stopping (shutdown, a crash injected, a dead letter that cannot be written,
    /// poison under `PoisonPolicy::Stop`): the offset must not move.
    Stop,
}

/// Processes a batch (in order).
async fn process<H: Handler>(shared: &Shared<H>, db: &mut Option<Client>, batch: Vec<ConsumedOrBad>) -> Next {
    let mut good = Vec::with_capacity(batch.len());
    for m in batch {
        match m {
            ConsumedOrBad::Ok(m) => good.push(m),
            ConsumedOrBad::NoId(m, reason) => {
                tracing::error!(topic = %m.topic, partition = m.partition, offset = m.offset, reason,
                    "message without a usable id: dead-lettered, never applied");
                if dead_letter(shared, db, &m, None, reason, "the message has no usable id header", 0).await
                    == Next::Stop
                {
                    return Next::Stop;
                }
            }
        }
    }
    if good.len() > 1 {
        match apply_batch(shared, db, &good).await {
            Ok(()) => return fire_crash(shared, good.last().expect("non-empty")),
            Err(e) => {
                tracing::warn!(error = %e, messages = good.len(), "batch failed; processing its messages one by one");
            }
        }
    }
    for m in &good {
        if apply_one(shared, db, m).await == Next::Stop || fire_crash(shared, m) == Next::Stop {
            return Next::Stop;
        }
    }
    Next::Continue
}

/// The test hook: stops the runner right after a commit, before the offset is stored.
fn fire_crash<H>(shared: &Shared<H>, m: &ConsumedMessage) -> Next {
    if let Some(f) = &shared.config.crash_after_commit {
        if (f.0)(m) {
            *shared.failure.lock().expect("lock") = Some(ConsumerError::InjectedCrash);
            shared.abort.cancel();
            return Next::Stop;
        }
    }
    Next::Continue
}

async fn session<'a>(shared_db: &DbConfig, db: &'a mut Option<Client>) -> Result<&'a mut Client, String> {
    if db.as_ref().is_none_or(Client::is_closed) {
        *db = Some(shared_db.connect().await.map_err(|e| e.to_string())?);
    }
    Ok(db.as_mut().expect("just set"))
}

fn inbox_message(m: &ConsumedMessage) -> InboxMessage<'_> {
    InboxMessage::new(m.id, m.payload.as_deref()).at(&m.topic, m.partition, m.offset)
}

/// One transaction, one dedup statement for the whole batch; any handler error rolls it all back.
async fn apply_batch<H: Handler>(
    shared: &Shared<H>,
    db: &mut Option<Client>,
    msgs: &[ConsumedMessage],
) -> Result<(), String> {
    let client = session(&shared.config.db, db).await?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let inbox_msgs: Vec<InboxMessage<'_>> = msgs.iter().map(inbox_message).collect();
    let outcomes = shared.inbox.record_batch(&tx, &inbox_msgs).await.map_err(|e| e.to_string())?;
    if outcomes.iter().any(|o| matches!(o, InboxOutcome::Conflict { .. })) {
        return Err("a conflicting redelivery in the batch".into());
    }
    let (mut processed, mut duplicates) = (0, 0);
    for (m, o) in msgs.iter().zip(&outcomes) {
        if *o == InboxOutcome::Processed {
            let began = std::time::Instant::now();
            shared.handler.handle(&tx, m).await.map_err(|e| e.to_string())?;
            crate::telemetry::handler_time(shared.inbox.consumer(), began.elapsed());
            processed += 1;
        } else {
            duplicates += 1;
        }
    }
    tx.commit().await.map_err(|e| e.to_string())?;
    shared.stats.processed.fetch_add(processed, Ordering::Relaxed);
    shared.stats.duplicates.fetch_add(duplicates, Ordering::Relaxed);
    crate::telemetry::inbox(shared.inbox.consumer(), processed, duplicates, 0);
    Ok(())
}

/// One message: dedup, handler, commit; handler errors retried in place, then poison.
async fn apply_one<H: Handler>(shared: &Shared<H>, db: &mut Option<Client>, m: &ConsumedMessage) -> Next {
    let mut attempt = 0u32;
    let mut db_failures = 0u32;
    loop {
        if shared.abort.is_cancelled() {
            return Next::Stop;
        }
        let result = async {
            let client = session(&shared.config.db, db).await.map_err(Step::Db)?;
            let tx = client.transaction().await.map_err(|e| Step::Db(e.to_string()))?;
            let outcome = shared.inbox.record(&tx, &inbox_message(m)).await.map_err(|e| Step::Db(e.to_string()))?;
            match outcome {
                InboxOutcome::Processed => {
                    let began = std::time::Instant::now();
                    let handled = shared.handler.handle(&tx, m).await;
                    crate::telemetry::handler_time(shared.inbox.consumer(), began.elapsed());
                    handled.map_err(|e| Step::Handler(e.to_string()))?;
                    tx.commit().await.map_err(|e| Step::Db(e.to_string()))?;
                    Ok(InboxOutcome::Processed)
                }
                InboxOutcome::Duplicate => {
                    tx.commit().await.map_err(|e| Step::Db(e.to_string()))?;
                    Ok(InboxOutcome::Duplicate)
                }
                conflict => Ok(conflict),
            }
        }
        .await;
        match result {
            Ok(InboxOutcome::Processed) => {
                shared.stats.processed.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::inbox(shared.inbox.consumer(), 1, 0, 0);
                return Next::Continue;
            }
            Ok(InboxOutcome::Duplicate) => {
                shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::inbox(shared.inbox.consumer(), 0, 1, 0);
                tracing::debug!(message_id = %m.id, topic = %m.topic, partition = m.partition, offset = m.offset, "duplicate skipped");
                return Next::Continue;
            }
            Ok(InboxOutcome::Conflict { .. }) => {
                shared.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::inbox(shared.inbox.consumer(), 0, 0, 1);
                tracing::error!(message_id = %m.id, topic = %m.topic, partition = m.partition, offset = m.offset,
                    "CONFLICT: this id was processed before with a different payload; not applied, dead-lettered for an operator");
                // Handled only once its dead letter is written: otherwise the offset must not move.
                return dead_letter(
                    shared,
                    db,
                    m,
                    Some(m.id),
                    "conflicting_payload",
                    "same message id, different payload digest",
                    1,
                )
                .await;
            }
            Err(Step::Handler(error)) => {
                attempt += 1;
                shared.stats.handler_errors.fetch_add(1, Ordering::Relaxed);
                if attempt >= shared.config.max_attempts {
                    return poison(shared, db, m, &error, attempt).await;
                }
                let delay = shared.config.backoff.delay(attempt - 1);
                tracing::warn!(message_id = %m.id, topic = %m.topic, partition = m.partition, offset = m.offset, attempt,
                    retry_in_ms = delay.as_millis() as u64, error = %error, "handler failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(Step::Db(error)) => {
                // The database, not the message: back off and try again, without counting it
                // against the message.
                *db = None;
                db_failures += 1;
                let delay = shared.config.backoff.delay(db_failures.min(10));
                tracing::warn!(message_id = %m.id, error = %error, retry_in_ms = delay.as_millis() as u64,
                    "inbox database unavailable; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

enum Step {
    Db(String),
    Handler(String),
}

async fn poison<H: Handler>(
    shared: &Shared<H>,
    db: &mut Option<Client>,
    m: &ConsumedMessage,
    error: &str,
    attempts: u32,
) -> Next {
    match shared.config.poison_policy {
        PoisonPolicy::DeadLetter => {
            tracing::error!(message_id = %m.id, topic = %m.topic, partition = m.partition, offset = m.offset, attempts,
                error = %error, "poison message dead-lettered; the partition goes on");
            dead_letter(shared, db, m, Some(m.id), "handler_failed", error, attempts as i32).await
        }
        PoisonPolicy::Stop => {
            *shared.failure.lock().expect("lock") = Some(ConsumerError::Poison {
                id: m.id.to_string(),
                topic: m.topic.clone(),
                partition: m.partition,
                offset: m.offset,
                error: error.to_owned(),
            });
            shared.abort.cancel();
            Next::Stop
        }
    }
}

/// Writes an inbox dead letter; retries with backoff while the failure is transient. Returns
/// [`Next::Stop`] (and the message is not acknowledged) when the runner is stopping or the failure
/// is permanent, which stops the runner with an error saying so.
async fn dead_letter<H: Handler>(
    shared: &Shared<H>,
    db: &mut Option<Client>,
    m: &ConsumedMessage,
    id: Option<Uuid>,
    reason: &str,
    error: &str,
    attempts: i32,
) -> Next {
    // jsonb cannot hold NUL: header bytes are kept as text with NUL escaped.
    let headers = serde_json::Value::Object(
        m.headers
            .iter()
            .map(|(k, v)| {
                (
                    k.replace('\0', "\\u0000"),
                    serde_json::Value::String(String::from_utf8_lossy(v).replace('\0', "\\u0000")),
                )
            })
            .collect(),
    );
    let mut failures = 0u32;
    loop {
        let written: Result<u64, (bool, String)> = async {
            let client = session(&shared.config.db, db).await.map_err(|e| (false, e))?;
            client
                .execute(
                    &shared.dead_letter_sql,
                    &[
                        &shared.inbox.consumer(),
                        &id,
                        &m.topic,
                        &m.partition,
                        &m.offset,
                        &m.key,
                        &headers,
                        &m.payload,
                        &reason,
                        &error,
                        &attempts,
                    ],
                )
                .await
                .map_err(|e| {
                    (
                        crate::classify::postgres(&e).disposition == crate::classify::Disposition::Permanent,
                        e.to_string(),
                    )
                })
        }
        .await;
        match written {
            Ok(_) => {
                shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::inbox_dead_lettered(shared.inbox.consumer(), reason);
                return Next::Continue;
            }
            Err((true, e)) => {
                tracing::error!(topic = %m.topic, partition = m.partition, offset = m.offset, error = %e,
                    "an inbox dead letter cannot be written; stopping");
                *shared.failure.lock().expect("lock") = Some(ConsumerError::DeadLetterWrite(e));
                shared.abort.cancel();
                return Next::Stop;
            }
            Err((false, e)) => {
                if shared.abort.is_cancelled() {
                    return Next::Stop;
                }
                *db = None;
                failures += 1;
                let delay = shared.config.backoff.delay(failures.min(10));
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "could not write an inbox dead letter; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn purge_loop<H: Handler>(shared: Arc<Shared<H>>, shutdown: CancellationToken) {
    loop {
        let mut db = None;
        if let Ok(client) = session(&shared.config.db, &mut db).await {
            match shared.inbox.purge(&*client, shared.config.retention, 10_000).await {
                Ok(n) => {
                    shared.stats.purged.fetch_add(n, Ordering::Relaxed);
                    if n > 0 {
                        tracing::info!(purged = n, "purged inbox rows past the retention");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "purging the inbox failed; will retry"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(shared.config.purge_interval) => {}
        }
    }
}
