//! The consumer runner's configuration, statistics and errors.

use std::sync::atomic::AtomicU64;
#[cfg(feature = "testing")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "testing")]
use super::ConsumedMessage;
use crate::db::DbConfig;
use crate::pool::PoolSettings;
use crate::retry::Backoff;
use crate::schema::SchemaName;

/// What to do with a message whose handler keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonPolicy {
    /// Move it to `inbox_dead_letters` and go on with the partition.
    DeadLetter,
    /// Stop the runner with an error naming the message.
    Stop,
}

/// Fault injection (feature `testing`): crash right after the database commit, before the offset
/// is stored, when the function says so.
#[cfg(feature = "testing")]
#[derive(Clone)]
pub struct CrashAfterCommit(pub Arc<dyn Fn(&ConsumedMessage) -> bool + Send + Sync>);

#[cfg(feature = "testing")]
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
    /// The sessions the partition workers share (each takes one for a batch and gives it back):
    /// at most 16 by default, however many partitions the runner is assigned; a worker waits up
    /// to `wait_timeout` for one, then backs off and retries like any unavailable database.
    pub pool: PoolSettings,
    /// Fault injection for tests and the soak (feature `testing`).
    #[cfg(feature = "testing")]
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
            pool: PoolSettings { max_size: 16, wait_timeout: Duration::from_secs(30) },
            #[cfg(feature = "testing")]
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
    /// The inbox database refused a message's statements the same way several times.
    #[error("the inbox database refused {attempts} times in a row ({class}: {error}): check the consumer role's grants (`outbox-relay grants --for consumer --role <role>`) and that the schema is migrated (`outbox-relay migrate`), then restart; the message was not acknowledged")]
    DatabaseRefused {
        /// The error's class.
        class: &'static str,
        /// The last error.
        error: String,
        /// Refusals in a row.
        attempts: u32,
    },
    /// The test fault injector fired (feature `testing`).
    #[doc(hidden)]
    #[error("crash injected after the database commit")]
    InjectedCrash,
}
