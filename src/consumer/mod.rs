//! A consumer runner around rdkafka that applies each message's effect exactly once.
//!
//! For each message: open a transaction, record the id in the inbox, call the handler with the
//! transaction (only if the id is new), commit, and only then store the offset
//! (`enable.auto.offset.store=false`; stored offsets are committed in the background and on
//! shutdown). A crash anywhere before the offset is stored redelivers the message, and the inbox
//! turns the redelivery into a duplicate. Partitions run in parallel, each in order, on sessions
//! from a shared pool.
//!
//! This module is the poll loop (assignments, revocations, pausing a partition whose worker falls
//! behind); `handler.rs` is what an application implements, `config.rs` the settings, statistics
//! and errors, `partition.rs` a partition's worker (apply, then store the offset), `dead_letter.rs`
//! what is recorded for a message that cannot be applied.
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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::ClientContext;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::inbox::Inbox;
use crate::pool::Pool;

mod config;
mod dead_letter;
mod handler;
mod partition;

#[cfg(feature = "testing")]
pub use config::CrashAfterCommit;
pub use config::{ConsumerConfig, ConsumerError, ConsumerStats, PoisonPolicy};
pub use handler::{ConsumedMessage, Handler, HandlerError, HandlerFuture};
use partition::{partition_worker, purge_loop};

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
    /// The sessions the partition workers and the purge share.
    pool: Pool,
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
        // record arrives, so there this only bounds idle polling (an idle consumer sends about 100
        // fetches a second to each broker; raise it with a property if that matters more than
        // latency). A broker that does not answer early (the test broker) makes it the floor of
        // every message's latency: at 625 msg/s, 100 ms put p50 commit-to-effect at 58 ms and
        // 10 ms at 25 ms (BENCHMARKS.md, table 8); librdkafka's default, 500 ms, near 190 ms.
        .set("fetch.wait.max.ms", "10")
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
        dead_letter_sql: config.schema.qualify(include_str!("../sql/inbox_dead_letter.sql")),
        pool: Pool::new(config.db.clone(), config.pool),
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
        None => ConsumedOrBad::NoId(msg, crate::classify::inbox_reason::MISSING_ID),
        Some(v) => match std::str::from_utf8(&v).ok().and_then(|s| Uuid::parse_str(s).ok()) {
            Some(id) => {
                msg.id = id;
                ConsumedOrBad::Ok(msg)
            }
            None => ConsumedOrBad::NoId(msg, crate::classify::inbox_reason::INVALID_ID),
        },
    }
}
