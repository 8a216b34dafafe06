//! The relay daemon: tails the outbox and publishes every committed row to Kafka at least once,
//! in per-key order.
//!
//! An instance owns lanes. Each owned lane has a database session that holds the lane's advisory
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
//! | `coordinator.rs` | heartbeat, lane balancing, gauges, periodic tasks |
//! | `lane.rs` | the lane loop: claim past what is in flight, produce, hand outcomes on |
//! | `settle.rs` | what outcomes mean: delete what was acknowledged; retry, dead-letter or leave what failed |
//! | `deliver.rs` | a lane's window of records in flight and their outcomes |
//! | `completions.rs` | deleting acknowledged rows beside the lane's claims |
//! | `lane_session.rs` | a lane's session (its own or shared) and its statements |
//! | `lanes.rs` | wake-ups and claim ranges shared between listener, sweep and lane loops |
//! | `listener.rs` | the LISTEN session |
//! | `sweep.rs` | the look below the lanes' cursors for rows no NOTIFY announced |
//! | `maintenance.rs` | pruning the archive and idempotency keys |
//! | `producer.rs`, `reports.rs`, `kafka.rs`, `envelope.rs` | producer generations, delivery reports routed to lanes, librdkafka settings, headers |
//! | `breaker.rs` | the circuit breaker |
//! | `stats.rs` | [`RelayStats`] |

pub mod breaker;
mod completions;
mod config;
mod coordinator;
mod deliver;
pub mod envelope;
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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::Producer;
use tokio_util::sync::CancellationToken;

use crate::db::ConnectError;
use crate::schema::{self, MigrateError};
pub use config::{DeadLetterPolicy, RelayConfig};
use coordinator::Coordinator;
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
}

/// What a lane loop shares with the others.
pub(crate) struct Shared {
    pub(crate) health: Arc<crate::health::Health>,
    pub(crate) config: RelayConfig,
    pub(crate) breaker: breaker::Breaker,
    pub(crate) producer: producer::ProducerSlot,
    /// The dead-letter mirror's own producer (with `--dlq-topic`).
    pub(crate) mirror: Option<rdkafka::producer::FutureProducer>,
    pub(crate) signals: LaneSignals,
    pub(crate) source: String,
    pub(crate) stats: Arc<RelayStats>,
}

/// Runs a relay instance until `shutdown` is cancelled, then shuts down gracefully: stops
/// claiming, finishes in-flight batches, releases its lanes and deregisters, within
/// `shutdown_timeout`.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<Arc<RelayStats>, RelayError> {
    run_with_stats(config, shutdown, Arc::new(RelayStats::default())).await
}

/// [`run`], counting into `stats` as it goes.
pub async fn run_with_stats(
    config: RelayConfig,
    shutdown: CancellationToken,
    stats: Arc<RelayStats>,
) -> Result<Arc<RelayStats>, RelayError> {
    let control = config.db.connect().await?;
    let info = schema::check_installed(&control, &config.schema).await?;
    let lock_class = lane_session::lane_lock_class(&control, &config.schema).await.map_err(RelayError::Startup)?;
    let producer = producer::ProducerSlot::new(config.producer.clone(), stats.clone())?;
    let mirror = match &config.dlq_topic {
        Some(_) => Some(producer::mirror_producer(&config.producer)?),
        None => None,
    };
    let signals = LaneSignals::new(info.lanes);
    let listener_stop = CancellationToken::new();
    let listener = tokio::spawn(listener::listen(
        config.db.clone(),
        config.schema.notify_channel(),
        signals.clone(),
        listener_stop.clone(),
    ));
    let source = config.source.clone().unwrap_or_else(|| format!("/outbox-relay/{}", config.schema));
    let health = Arc::new(crate::health::Health::new(config.stuck_threshold));
    let server_stop = CancellationToken::new();
    if let Some(addr) = config.metrics_addr {
        let handle = crate::health::install_recorder();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| RelayError::Metrics(format!("cannot listen on --metrics-addr {addr}: {e}")))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(crate::health::serve(listener, Some(handle), health.clone(), server_stop.clone()));
    }
    let shared = Arc::new(Shared {
        health: health.clone(),
        config: config.clone(),
        breaker: breaker::Breaker::new(config.breaker, stats.clone()),
        producer,
        mirror,
        signals,
        source,
        stats: stats.clone(),
    });
    tracing::info!(instance = %config.instance_id, schema = %config.schema, lanes = info.lanes,
        batch_size = config.batch_size, "relay started");

    let mut coordinator = Coordinator::new(shared.clone(), control, lock_class, info.lanes);
    let probe = tokio::spawn(probe_broker(shared.clone(), server_stop.clone()));
    let mut tick = tokio::time::interval(config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                // A stuck control session (blackholed network) must not wedge the coordinator.
                if tokio::time::timeout(config.db_call_timeout, coordinator.tick()).await.is_err() {
                    tracing::warn!(timeout_ms = config.db_call_timeout.as_millis() as u64,
                        "coordinator step timed out; dropping the control session");
                    coordinator.drop_control();
                }
            }
        }
    }
    coordinator.shutdown().await;
    listener_stop.cancel();
    let _ = listener.await;
    server_stop.cancel();
    let _ = probe.await;
    let last = shared.producer.current();
    if last.producer.in_flight_count() > 0 {
        let _ = tokio::task::spawn_blocking(move || last.producer.flush(Duration::from_secs(5))).await;
    }
    tracing::info!(instance = %config.instance_id, delivered = stats.delivered.load(Ordering::Relaxed), "relay stopped");
    Ok(stats)
}

/// Checks every few seconds that the broker answers a metadata request (for /readyz).
async fn probe_broker(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let s = shared.clone();
        let ok = tokio::task::spawn_blocking(move || {
            s.producer.current().producer.client().fetch_metadata(None, Duration::from_secs(3)).is_ok()
        })
        .await
        .unwrap_or(false);
        shared.health.set_broker_ok(ok);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
