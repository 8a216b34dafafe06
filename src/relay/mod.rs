//! The relay daemon: tails the outbox and publishes every committed row to Kafka at least once,
//! in per-key order.
//!
//! An instance serves one outbox or several ([`fleet`]: `run --outbox`, `--schema-pattern`), on one
//! producer. Per outbox it owns lanes. Each owned lane has a database session that holds the lane's advisory
//! lock and runs every statement of that lane ([`lane_session::LaneSession`]): a session of its
//! own, or under `--max-sessions` one shared with other lanes of the instance; a
//! lane loop ([`lane`]) claims the lane's pending rows in sequence order from its cursor
//! ([`lanes`]), produces the batch pipelined, awaits the acknowledgements and deletes what was
//! acknowledged. The [`coordinator`] heartbeats the instance, takes or lets go of lanes so that each
//! instance holds its fair share, and runs the periodic work ([`maintenance`], [`sweep`]); the
//! [`listener`] turns NOTIFY into wake-ups. This module starts them and shuts them down.
//!
//! | file | concern |
//! |---|---|
//! | `config.rs` | [`RelayConfig`] and its defaults |
//! | `fleet.rs` | the outboxes an instance serves, found and started; what they share |
//! | `database.rs` | per database: control, background and LISTEN sessions, the lane session pool |
//! | `coordinator.rs` | per outbox: heartbeat, lane balancing, gauges, periodic tasks |
//! | `lane.rs` | the lane loop: claim past what is in flight, produce, hand outcomes on |
//! | `settle.rs` | what outcomes mean: delete what was acknowledged; retry, dead-letter or leave what failed |
//! | `deliver.rs` | a lane's window of records in flight and their outcomes |
//! | `completions.rs` | deleting acknowledged rows beside the lane's claims |
//! | `lane_session.rs` | a lane's session (its own or shared) and its statements |
//! | `lanes.rs` | wake-ups and claim ranges shared between listener, sweep and lane loops |
//! | `listener.rs` | the LISTEN session of a database, for all its outboxes |
//! | `sweep.rs` | the look below the lanes' cursors for rows no NOTIFY announced |
//! | `maintenance.rs` | pruning the archive and idempotency keys |
//! | `producer.rs`, `reports.rs`, `kafka.rs`, `envelope.rs` | producer generations, delivery reports routed to lanes, librdkafka settings, headers |
//! | `breaker.rs` | the circuit breaker |
//! | `stats.rs` | [`RelayStats`] |

pub mod breaker;
mod completions;
mod config;
mod coordinator;
mod database;
mod deliver;
pub mod envelope;
mod fleet;
pub mod kafka;
pub(crate) mod lane;
pub mod lane_session;
mod lanes;
mod listener;
mod maintenance;
pub(crate) mod producer;
mod reports;
mod settle;
mod stats;
mod sweep;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::db::ConnectError;
use crate::schema::MigrateError;
pub use config::{DeadLetterPolicy, RelayConfig};
pub use fleet::{read_outbox_file, run_fleet, Discovery, OutboxSpec, Overrides};
use kafka::KafkaConfigError;
use lanes::LaneSignals;
pub use stats::RelayStats;

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database could not be reached at start.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The schema is missing or at another version.
    #[error(transparent)]
    Schema(#[from] MigrateError),
    /// The producer configuration is refused.
    #[error(transparent)]
    Kafka(#[from] KafkaConfigError),
    /// A statement at start failed.
    #[error("relay start-up failed: {0}")]
    Startup(#[source] tokio_postgres::Error),
    /// The metrics endpoint could not be served.
    #[error("{0}")]
    Metrics(String),
    /// The outboxes asked for do not fit together.
    #[error("{0}")]
    Outboxes(String),
}

/// What a lane loop shares with the others: its outbox's configuration, signals and label, and
/// what every outbox of the instance shares (producer, breaker, health, counters).
pub(crate) struct Shared {
    pub(crate) health: Arc<crate::health::Health>,
    pub(crate) config: RelayConfig,
    pub(crate) breaker: Arc<breaker::Breaker>,
    pub(crate) producer: Arc<producer::ProducerSlot>,
    /// The dead-letter mirror's own producer (with `--dlq-topic`).
    pub(crate) mirror: Option<rdkafka::producer::FutureProducer>,
    pub(crate) signals: LaneSignals,
    pub(crate) source: String,
    pub(crate) stats: Arc<RelayStats>,
    /// The outbox's name in metrics (and its part of that name).
    pub(crate) label: crate::telemetry::OutboxLabel,
}

/// Runs a relay instance until `shutdown` is cancelled, then shuts down gracefully: stops
/// claiming, finishes in-flight batches, releases its lanes and deregisters, within
/// `shutdown_timeout`.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<Arc<RelayStats>, RelayError> {
    run_with_stats(config, shutdown, Arc::new(RelayStats::default())).await
}

/// [`run`], counting into `stats` as it goes: the one outbox of `config.db` and `config.schema`,
/// named by its schema.
pub async fn run_with_stats(
    config: RelayConfig,
    shutdown: CancellationToken,
    stats: Arc<RelayStats>,
) -> Result<Arc<RelayStats>, RelayError> {
    let one = OutboxSpec {
        name: config.schema.to_string(),
        db: config.db.clone(),
        schema: config.schema.clone(),
        overrides: Overrides::default(),
    };
    run_fleet(config, vec![one], Vec::new(), shutdown, stats).await
}
