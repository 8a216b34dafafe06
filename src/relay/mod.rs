//! The relay daemon: tails the outbox and publishes every committed row to Kafka at least once,
//! in per-key order.
//!
//! An instance owns lanes. Each owned lane has a database session of its own that holds the
//! lane's advisory lock and runs every statement of that lane ([`claim::LaneSession`]); a lane loop
//! ([`worker`]) reads the lane's head in sequence order, produces the batch pipelined, awaits the
//! acknowledgements and deletes what was acknowledged. A coordinator (this module) heartbeats the
//! instance in `relay_instances`, counts the live instances and takes or lets go of lanes so that
//! each holds its fair share; a listener session turns NOTIFY into wake-ups.

pub mod breaker;
pub mod claim;
pub mod envelope;
pub mod kafka;
mod lanes;
pub(crate) mod producer;
mod sweep;
pub(crate) mod worker;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use rdkafka::producer::Producer;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{ConnectError, DbConfig};
use crate::retry::Backoff;
use crate::schema::{self, MigrateError, SchemaName};
use claim::LaneSession;
use kafka::{KafkaConfigError, ProducerSettings};
use lanes::LaneSignals;
use worker::LaneExit;

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
    /// How often an idle lane looks for rows when no NOTIFY woke it.
    pub poll_interval: Duration,
    /// The most lanes this instance takes (default: its fair share).
    pub max_lanes: Option<u16>,
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
            poll_interval: Duration::from_secs(1),
            max_lanes: None,
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

/// Counters of one run, for callers that embed the relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows acknowledged by the broker and removed from the outbox.
    pub delivered: AtomicU64,
    /// Lanes taken over (including the first acquisitions).
    pub lanes_acquired: AtomicU64,
    /// Claim queries run (an idle relay runs few: it waits on NOTIFY).
    pub claims: AtomicU64,
    /// Time spent in claim queries, in microseconds (divide by `claims` for the mean).
    pub claim_micros: AtomicU64,
    /// Rows the sweep found behind a lane's claim cursor (no NOTIFY announced them).
    pub swept: AtomicU64,
    /// Archived rows and expired idempotency keys pruned.
    pub pruned: AtomicU64,
    /// Failed attempts recorded for a later retry.
    pub retried: AtomicU64,
    /// Rows moved to the dead letters.
    pub dead_lettered: AtomicU64,
    /// Records handed to the producer (attempts, successful or not).
    pub produce_attempts: AtomicU64,
    /// Lane sessions lost (statement errors, timeouts, closed connections).
    pub sessions_lost: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_opened: AtomicU64,
    /// Times it closed again.
    pub breaker_closed: AtomicU64,
    /// Records sent as half-open probes (the only produce attempts while the breaker is not closed).
    pub probes: AtomicU64,
    /// Rows acknowledged after an earlier row of their key failed in the same batch.
    pub order_hazards: AtomicU64,
    /// Acknowledgements without an offset (see `telemetry::ack_without_offset`).
    pub acks_without_offset: AtomicU64,
    /// Producer generations retired (a batch deadline passed, or the producer failed for good).
    pub producer_generations: AtomicU64,
    /// The latest retry delays chosen, as (attempt, delay), newest last; at most 1,000.
    pub retry_delays: std::sync::Mutex<std::collections::VecDeque<(u32, Duration)>>,
}

impl RelayStats {
    pub(crate) fn note_retry(&self, attempt: u32, delay: Duration) {
        let mut d = self.retry_delays.lock().expect("stats lock");
        if d.len() == 1000 {
            d.pop_front();
        }
        d.push_back((attempt, delay));
    }
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

struct OwnedLane {
    stop: CancellationToken,
    task: JoinHandle<LaneExit>,
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
    let lock_class: i32 = control
        .query_one("SELECT (hashtext('outbox-relay lanes ' || $1::text) & 2147483647)::int", &[&config.schema.as_str()])
        .await
        .map_err(RelayError::Startup)?
        .get(0);
    let producer = producer::ProducerSlot::new(config.producer.clone(), stats.clone())?;
    let mirror = match &config.dlq_topic {
        Some(_) => Some(producer::mirror_producer(&config.producer)?),
        None => None,
    };
    let signals = LaneSignals::new(info.lanes);
    let listener_stop = CancellationToken::new();
    let listener =
        tokio::spawn(listen(config.db.clone(), config.schema.notify_channel(), signals.clone(), listener_stop.clone()));
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

    let mut coordinator = Coordinator {
        shared: shared.clone(),
        control: Some(control),
        lock_class,
        lanes_total: info.lanes,
        owned: BTreeMap::new(),
        registered: false,
        next_maintenance: tokio::time::Instant::now() + config.maintenance_interval,
        pruning: None,
        next_sweep: tokio::time::Instant::now() + config.sweep_interval,
        sweeping: None,
        horizon_warned: false,
        last_backlog: tokio::time::Instant::now() - Duration::from_secs(60),
    };
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
                    coordinator.control = None;
                }
            }
        }
    }

    tracing::info!(instance = %config.instance_id, lanes = coordinator.owned.len(), "shutting down: finishing in-flight batches");
    let graceful = tokio::time::timeout(config.shutdown_timeout, coordinator.release_all()).await;
    if graceful.is_err() {
        tracing::warn!(
            timeout_ms = config.shutdown_timeout.as_millis() as u64,
            "shutdown deadline passed with batches in flight; their rows stay in the outbox and are delivered again"
        );
    }
    if tokio::time::timeout(Duration::from_secs(5), coordinator.deregister()).await.is_err() {
        tracing::warn!("could not deregister in time; the instance row expires by itself");
    }
    if let Some(sweeping) = coordinator.sweeping.take() {
        sweeping.abort();
    }
    if let Some(pruning) = coordinator.pruning.take() {
        pruning.abort();
    }
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

struct Coordinator {
    shared: Arc<Shared>,
    control: Option<Client>,
    lock_class: i32,
    lanes_total: u16,
    owned: BTreeMap<i16, OwnedLane>,
    registered: bool,
    next_maintenance: tokio::time::Instant,
    pruning: Option<JoinHandle<()>>,
    next_sweep: tokio::time::Instant,
    sweeping: Option<JoinHandle<()>>,
    last_backlog: tokio::time::Instant,
    horizon_warned: bool,
}

impl Coordinator {
    fn config(&self) -> &RelayConfig {
        &self.shared.config
    }

    async fn control(&mut self) -> Option<&Client> {
        if self.control.as_ref().is_some_and(|c| c.is_closed()) {
            self.control = None;
        }
        if self.control.is_none() {
            use backon::Retryable;
            let db = self.config().db.clone();
            let connect = (|| db.connect())
                .retry(reconnect_policy().with_max_times(3))
                .sleep(tokio::time::sleep)
                .notify(|e, after| {
                    tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64, "control session unavailable; retrying")
                });
            match connect.await {
                Ok(c) => self.control = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "control session unavailable; lanes keep running, rebalancing waits");
                    return None;
                }
            }
        }
        self.control.as_ref()
    }

    async fn tick(&mut self) {
        self.reap().await;
        crate::telemetry::lanes_owned(self.owned.len());
        crate::telemetry::breaker_state(self.shared.breaker.state().as_gauge());
        self.shared.health.set_lanes(self.owned.len());
        self.shared.health.set_breaker_open(self.shared.breaker.state() == breaker::BreakerState::Open);
        let live = match self.heartbeat().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed; will retry");
                self.shared.health.set_db_ok(false);
                self.control = None;
                return;
            }
        };
        self.shared.health.set_db_ok(true);
        // The backlog count reads the whole outbox: every few seconds (--backlog-interval) is enough.
        if self.last_backlog.elapsed() >= self.config().backlog_interval {
            self.last_backlog = tokio::time::Instant::now();
            if let Err(e) = self.observe_backlog().await {
                tracing::debug!(error = %e, "backlog query failed");
            }
        }
        // The first heartbeat only registers, so instances starting together see each other
        // before taking lanes.
        if !self.registered {
            self.registered = true;
            return;
        }
        // Pruning can take long (a large archive, many kept keys): in a task of its own with a
        // session of its own, so the heartbeat never waits for it.
        if tokio::time::Instant::now() >= self.next_maintenance && self.pruning.as_ref().is_none_or(|t| t.is_finished())
        {
            self.next_maintenance = tokio::time::Instant::now() + self.config().maintenance_interval;
            self.pruning = Some(tokio::spawn(prune(self.shared.clone())));
        }
        if tokio::time::Instant::now() >= self.next_sweep && self.sweeping.as_ref().is_none_or(|t| t.is_finished()) {
            self.next_sweep = tokio::time::Instant::now() + self.config().sweep_interval;
            self.sweeping = Some(tokio::spawn(sweep::sweep(self.shared.clone())));
        }
        let fair = (self.lanes_total as usize).div_ceil(live.max(1) as usize);
        let target = self.config().max_lanes.map_or(fair, |m| fair.min(m as usize));
        if self.owned.len() > target {
            self.release_extra(target).await;
        } else if self.owned.len() < target {
            if let Err(e) = self.acquire(target).await {
                tracing::warn!(error = %e, "taking lanes failed; will retry");
            }
        }
    }

    async fn reap(&mut self) {
        let finished: Vec<i16> = self.owned.iter().filter(|(_, l)| l.task.is_finished()).map(|(k, _)| *k).collect();
        for lane in finished {
            let owned = self.owned.remove(&lane).expect("listed");
            match owned.task.await {
                Ok(LaneExit::Released) => {}
                Ok(LaneExit::SessionLost(why)) => {
                    self.shared.stats.sessions_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(lane, reason = %why, "lane session lost; delivery for the lane stopped, will try to take it again")
                }
                Err(e) => tracing::error!(lane, error = %e, "lane task failed"),
            }
        }
    }

    async fn heartbeat(&mut self) -> Result<i64, String> {
        self.heartbeat_inner().await.map_err(|e| e.to_string())?.ok_or_else(|| "no control session".to_owned())
    }

    async fn heartbeat_inner(&mut self) -> Result<Option<i64>, tokio_postgres::Error> {
        let lanes: Vec<i16> = self.owned.keys().copied().collect();
        let id = self.config().instance_id;
        let timeout_ms = self.config().instance_timeout.as_millis() as i64;
        let schema = self.config().schema.clone();
        let host = hostname();
        let breaker = self.shared.breaker.state().as_str();
        let Some(control) = self.control().await else { return Ok(None) };
        control
            .execute(
                &schema.qualify(
                    "INSERT INTO __SCHEMA__.relay_instances (instance_id, hostname, pid, version, lanes, breaker_state)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (instance_id) DO UPDATE
                     SET heartbeat_at = now(), lanes = EXCLUDED.lanes, breaker_state = EXCLUDED.breaker_state",
                ),
                &[&id, &host, &(std::process::id() as i32), &env!("CARGO_PKG_VERSION"), &lanes, &breaker],
            )
            .await?;
        // Rows of instances gone for long are removed, so `status` shows the living.
        control
            .execute(
                &schema.qualify(
                    "DELETE FROM __SCHEMA__.relay_instances
                     WHERE heartbeat_at < now() - ($1::bigint * 3) * interval '1 millisecond'",
                ),
                &[&timeout_ms],
            )
            .await?;
        let live: i64 = control
            .query_one(
                &schema.qualify(
                    "SELECT count(*) FROM __SCHEMA__.relay_instances
                     WHERE heartbeat_at > now() - $1::bigint * interval '1 millisecond' OR instance_id = $2",
                ),
                &[&timeout_ms, &id],
            )
            .await?
            .get(0);
        Ok(Some(live))
    }

    async fn acquire(&mut self, target: usize) -> Result<(), tokio_postgres::Error> {
        let lock_class = self.lock_class;
        let Some(control) = self.control().await else { return Ok(()) };
        let taken: Vec<i32> = control
            .query(
                "SELECT objid::bigint::int FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 2
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND classid = $1::bigint::oid",
                &[&i64::from(lock_class)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut free: Vec<i16> = (0..self.lanes_total as i16)
            .filter(|l| !taken.contains(&i32::from(*l)) && !self.owned.contains_key(l))
            .collect();
        // Instances racing for the same free lanes start at different places.
        free.shuffle(&mut rand::rng());
        for lane in free {
            if self.owned.len() >= target {
                break;
            }
            let cfg = &self.shared.config;
            // The session names its instance and lane, so operators (and pg_stat_activity) see who holds what.
            let db = cfg.db.clone().with_application_name(&format!("outbox-relay {} lane {lane}", cfg.instance_id));
            match LaneSession::try_acquire(&db, &cfg.schema, lock_class, lane, cfg.archive, cfg.db_call_timeout).await {
                Ok(Some(session)) => {
                    let stop = CancellationToken::new();
                    let task = tokio::spawn(worker::run_lane(self.shared.clone(), lane, session, stop.clone()));
                    self.owned.insert(lane, OwnedLane { stop, task });
                    self.shared.stats.lanes_acquired.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(lane, instance = %cfg.instance_id, "lane acquired");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(lane, error = %e, "could not open a session for a lane; will retry");
                    break;
                }
            }
        }
        Ok(())
    }

    /// Backlog gauges, and the age of the oldest head among this instance's lanes (for /readyz).
    /// A lane's head is looked for from its claim cursor, so that this does not walk the rows
    /// deleted under an old snapshot either.
    async fn observe_backlog(&mut self) -> Result<(), tokio_postgres::Error> {
        let running: HashMap<i16, i64> = self.shared.signals.cursors().into_iter().collect();
        let lanes: Vec<i16> = self.owned.keys().copied().collect();
        let from: Vec<i64> = lanes.iter().map(|l| running.get(l).copied().unwrap_or(lanes::FROM_START)).collect();
        let schema = self.config().schema.clone();
        let Some(control) = self.control().await else { return Ok(()) };
        let row = control.query_one(&schema.qualify(include_str!("../sql/backlog.sql")), &[&lanes, &from]).await?;
        let (rows, oldest, head): (i64, f64, f64) = (row.get(0), row.get(1), row.get(2));
        crate::telemetry::backlog(rows, Duration::from_secs_f64(oldest.max(0.0)));
        self.shared.health.set_oldest_head(Duration::from_secs_f64(head.max(0.0)));
        self.observe_horizon().await
    }

    /// The outbox's dead tuples and the age of the oldest snapshot on the database, as metrics;
    /// a warning (once, until it clears) when that snapshot is older than `--horizon-warn`. The
    /// relay stays ready: it is not at fault, and its claims do not slow down (they start at each lane's
    /// cursor), but the outbox table and its indexes grow while it lasts.
    async fn observe_horizon(&mut self) -> Result<(), tokio_postgres::Error> {
        let schema = self.config().schema.clone();
        let warn_after = self.config().horizon_warn;
        let Some(control) = self.control().await else { return Ok(()) };
        let dead = crate::horizon::dead_tuples(control, &schema).await?;
        let oldest = crate::horizon::snapshot_holders(control, 1).await?.into_iter().next();
        let age = oldest.as_ref().and_then(|h| h.age_seconds).unwrap_or(0.0).max(0.0);
        crate::telemetry::queue_health(dead, Duration::from_secs_f64(age));
        match oldest {
            Some(h) if age > warn_after.as_secs_f64() => {
                if !self.horizon_warned {
                    self.horizon_warned = true;
                    tracing::warn!(kind = %h.kind, pid = ?h.pid, application = %h.name, client = %h.client,
                        state = %h.state, age_s = age as u64, dead_tuples = dead,
                        "an old snapshot holds back the cleanup of delivered rows, so the outbox table grows: \
                         end that transaction (`outbox-relay status` names it; pg_terminate_backend(pid)), or drop \
                         the replication slot");
                }
            }
            _ => self.horizon_warned = false,
        }
        Ok(())
    }

    async fn release_extra(&mut self, target: usize) {
        while self.owned.len() > target {
            let (lane, owned) = self.owned.pop_last().expect("more than target");
            owned.stop.cancel();
            let _ = owned.task.await;
            tracing::info!(lane, instance = %self.shared.config.instance_id, "lane released to balance instances");
        }
    }

    async fn release_all(&mut self) {
        for owned in self.owned.values() {
            owned.stop.cancel();
        }
        while let Some((lane, owned)) = self.owned.pop_first() {
            let _ = owned.task.await;
            tracing::debug!(lane, "lane released");
        }
    }

    async fn deregister(&mut self) {
        let id = self.config().instance_id;
        let sql = self.config().schema.qualify("DELETE FROM __SCHEMA__.relay_instances WHERE instance_id = $1");
        if let Some(control) = self.control().await {
            if let Err(e) = control.execute(&sql, &[&id]).await {
                tracing::warn!(error = %e, "could not deregister; the row expires by itself");
            }
        }
    }
}

/// Deletes archived rows past retention and idempotency keys past their window (whose message is
/// gone), in chunks so that no statement holds locks for long. Any instance may do it; doing it
/// twice is harmless.
async fn prune(shared: Arc<Shared>) {
    const CHUNK: i64 = 10_000;
    let config = &shared.config;
    let run = async {
        let client = config.db.connect().await.map_err(|e| e.to_string())?;
        let mut pruned = 0u64;
        if config.archive {
            let sql = config.schema.qualify(include_str!("../sql/prune_archive.sql"));
            let retention_s = config.archive_retention.as_secs() as i64;
            loop {
                let n = client.execute(&sql, &[&retention_s, &CHUNK]).await.map_err(|e| e.to_string())?;
                pruned += n;
                if n < CHUNK as u64 {
                    break;
                }
            }
        }
        let sql = config.schema.qualify(include_str!("../sql/prune_idempotency_keys.sql"));
        loop {
            let n = client.execute(&sql, &[&CHUNK]).await.map_err(|e| e.to_string())?;
            pruned += n;
            if n < CHUNK as u64 {
                break;
            }
        }
        Ok::<u64, String>(pruned)
    };
    match run.await {
        Ok(pruned) => {
            if pruned > 0 {
                tracing::info!(pruned, "pruned archived rows and expired idempotency keys");
            }
            shared.stats.pruned.fetch_add(pruned, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "pruning the archive and expired idempotency keys failed; will retry"),
    }
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

/// Reconnects with capped, jittered exponential backoff (200 ms doubling to 10 s, plus up to as
/// much again of jitter), so a restarting database is not hammered by every instance at once.
fn reconnect_policy() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
}

/// Turns NOTIFYs on the outbox's channel into wake-ups (and rewinds) of the lanes they name; reconnects with
/// backoff.
async fn listen(db: DbConfig, channel: String, signals: LaneSignals, stop: CancellationToken) {
    use backon::Retryable;
    loop {
        let connect = (|| db.listen(&channel))
            .retry(reconnect_policy().without_max_times())
            .sleep(tokio::time::sleep)
            .notify(|e, after| {
                tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64,
                    "could not LISTEN for new rows; lanes poll meanwhile")
            });
        let (_client, mut notes) = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect => match r {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        // Rows may have come while no one listened, late ones below a lane's cursor too.
        signals.announce_all();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = notes.recv() => match n {
                    Some(payload) => signals.announce_payload(&payload),
                    None => break,
                }
            }
        }
        tracing::warn!("the LISTEN session closed; lanes fall back to polling until it is back");
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".to_owned())
}
