//! What a relay instance is configured with, and the documented defaults (written once, here:
//! the command line's defaults restate these values for `--help`).

use std::collections::HashMap;
use std::time::Duration;

use uuid::Uuid;

use super::breaker;
use super::kafka::ProducerSettings;
use crate::db::DbConfig;
use crate::retry::Backoff;
use crate::schema::SchemaName;

/// Everything a relay instance is configured with.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The database.
    pub db: DbConfig,
    /// The schema holding the outbox.
    pub schema: SchemaName,
    /// The Kafka producer.
    pub producer: ProducerSettings,
    /// Rows read and produced per batch.
    pub batch_size: usize,
    /// Rows a lane may hold between claim and delete (sent and awaiting acknowledgements, or
    /// acknowledged and not yet deleted): it claims and sends its next rows while earlier ones are
    /// out, up to this many. It also bounds what a crash of the instance can send twice per lane.
    pub max_in_flight: usize,
    /// How often an idle lane looks for rows when no NOTIFY woke it.
    pub poll_interval: Duration,
    /// The most lanes this instance takes (default: its fair share).
    pub max_lanes: Option<u16>,
    /// The most PostgreSQL sessions its lanes use per database (default: one per lane). With a
    /// budget, one session holds the locks of, and runs the statements of, several lanes, of one
    /// outbox or of several on that database.
    pub max_sessions: Option<u16>,
    /// The most rows a lane claims per statement on a session it shares with other lanes (under
    /// `max_sessions`). A session's replies come back in order, and the driver hands each one to
    /// its lane a piece at a time, so a lane's claim waits until every reply before it on the
    /// session was taken in: a smaller claim keeps an idle lane's one-row claim from waiting
    /// behind a busy lane's large one (BENCHMARKS.md, table 11).
    pub shared_batch_size: usize,
    /// How often the instance heartbeats and rebalances lanes.
    pub heartbeat_interval: Duration,
    /// An instance whose heartbeat is older than this counts as dead.
    pub instance_timeout: Duration,
    /// How long a graceful shutdown may take.
    pub shutdown_timeout: Duration,
    /// The CloudEvents `ce_source` (default `/outbox-relay/<schema>`).
    pub source: Option<String>,
    /// Prefix for every topic.
    pub topic_prefix: String,
    /// Topic renames applied before the prefix.
    pub topic_map: HashMap<String, String>,
    /// Move delivered rows to `delivered` instead of deleting them.
    pub archive: bool,
    /// How long archived rows (and remembered idempotency keys) are kept.
    pub archive_retention: Duration,
    /// Delays between delivery attempts of a row.
    pub retry: Backoff,
    /// Attempts before a row is dead-lettered as `retries_exhausted`.
    pub max_attempts: u32,
    /// A row older than this is dead-lettered as `max_age_exceeded` instead of retried.
    pub max_age: Option<Duration>,
    /// What happens to later messages of a dead-lettered message's key.
    pub dead_letter_policy: DeadLetterPolicy,
    /// Mirror dead letters to this Kafka topic too.
    pub dlq_topic: Option<String>,
    /// The circuit breaker around the broker.
    pub breaker: breaker::BreakerSettings,
    /// How long one database statement of a lane may take before the lane drops its session.
    pub db_call_timeout: Duration,
    /// How often archived rows and expired idempotency keys are pruned.
    pub maintenance_interval: Duration,
    /// How often the sweep looks below each lane's claim cursor for rows no NOTIFY announced.
    pub sweep_interval: Duration,
    /// Serve `/metrics`, `/healthz` and `/readyz` here.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `/readyz` fails when the head of an owned lane is older than this.
    pub stuck_threshold: Duration,
    /// How often the backlog gauges are read (the count reads the whole outbox).
    pub backlog_interval: Duration,
    /// Warn when the oldest snapshot held on the database is older than this.
    pub horizon_warn: Duration,
    /// How often `--schema-pattern` looks for schemas created or dropped since.
    pub discover_interval: Duration,
    /// This instance's id.
    pub instance_id: Uuid,
}

impl RelayConfig {
    /// A configuration with the documented defaults.
    pub fn new(db: DbConfig, schema: SchemaName, brokers: impl Into<String>) -> Self {
        Self {
            db,
            schema,
            producer: ProducerSettings {
                brokers: brokers.into(),
                message_timeout: Duration::from_secs(30),
                properties: Vec::new(),
            },
            batch_size: 1000,
            max_in_flight: 2000,
            poll_interval: Duration::from_secs(1),
            max_lanes: None,
            max_sessions: None,
            shared_batch_size: 200,
            heartbeat_interval: Duration::from_secs(1),
            instance_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            source: None,
            topic_prefix: String::new(),
            topic_map: HashMap::new(),
            archive: false,
            archive_retention: Duration::from_secs(7 * 24 * 3600),
            retry: Backoff { base: Duration::from_millis(200), cap: Duration::from_secs(60) },
            max_attempts: 20,
            max_age: None,
            dead_letter_policy: DeadLetterPolicy::Skip,
            dlq_topic: None,
            breaker: breaker::BreakerSettings::default(),
            db_call_timeout: Duration::from_secs(35),
            maintenance_interval: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(30),
            metrics_addr: None,
            stuck_threshold: Duration::from_secs(300),
            backlog_interval: Duration::from_secs(5),
            horizon_warn: Duration::from_secs(300),
            discover_interval: Duration::from_secs(30),
            instance_id: Uuid::now_v7(),
        }
    }

    /// The Kafka topic a row written for `topic` goes to.
    pub fn topic_for(&self, topic: &str) -> String {
        let mapped = self.topic_map.get(topic).map(String::as_str).unwrap_or(topic);
        format!("{}{mapped}", self.topic_prefix)
    }
}

/// What happens to the later messages of a key whose message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterPolicy {
    /// Later messages of the key go on (the one documented exception to per-key order).
    Skip,
    /// Later messages of the key wait until an operator replays or discards the dead letter.
    ParkKey,
}

impl std::str::FromStr for DeadLetterPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip" => Ok(Self::Skip),
            "park-key" => Ok(Self::ParkKey),
            other => Err(format!("unknown dead-letter policy {other:?}: use skip or park-key")),
        }
    }
}
