//! The outboxes one instance serves: those named (`run --outbox NAME=URL#schema`, or the one of
//! `--schema`) and those a pattern finds (`--schema-pattern 'tenant_%'`, looked for again every
//! `--discover-interval`, so a tenant schema created later is picked up and a dropped one let go).
//!
//! Every outbox has a coordinator of its own (heartbeat and lane balancing in its schema, as with
//! one outbox), and they share what there is one of: per instance the producer, the breaker, the
//! dead-letter mirror, `/metrics` and `/readyz`; per database the control, background and LISTEN
//! sessions and, under `--max-sessions`, the lane sessions ([`super::database`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::Producer;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::coordinator::Coordinator;
use super::database::Database;
use super::{breaker, lane_session, producer, LaneSignals, RelayConfig, RelayError, RelayStats, Shared};
use crate::db::DbConfig;
use crate::health::Health;
use crate::schema::{self, SchemaName};
use crate::telemetry::OutboxLabel;

/// One outbox to serve: its name (the `outbox` label of its metrics and log lines), database and
/// schema.
#[derive(Debug, Clone)]
pub struct OutboxSpec {
    /// The name in metrics and logs.
    pub name: String,
    /// The database.
    pub db: DbConfig,
    /// The schema holding the outbox.
    pub schema: SchemaName,
}

impl OutboxSpec {
    /// Parses `NAME=URL#SCHEMA` (`NAME=#SCHEMA`: on `default_db`).
    pub fn parse(spec: &str, default_db: Option<&DbConfig>) -> Result<Self, String> {
        let usage =
            "use NAME=URL#SCHEMA, for example orders=postgres://relay@db1/app#outbox (NAME=#SCHEMA: on --database-url)";
        let (name, rest) = spec.split_once('=').ok_or_else(|| format!("--outbox {spec:?}: no name; {usage}"))?;
        let (url, schema) = rest.rsplit_once('#').ok_or_else(|| format!("--outbox {name}: no #SCHEMA; {usage}"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            return Err(format!("--outbox {name:?}: a name is letters, digits, '_', '-' and '.'; {usage}"));
        }
        let schema = SchemaName::new(schema).map_err(|e| format!("--outbox {name}: {e}"))?;
        let db = if url.is_empty() {
            default_db.cloned().ok_or_else(|| format!("--outbox {name}: no URL and no --database-url; {usage}"))?
        } else {
            DbConfig::parse(url).map_err(|e| format!("--outbox {name}: {e}"))?
        };
        Ok(Self { name: name.to_owned(), db, schema })
    }
}

/// Schemas to look for on a database: every schema whose name matches `pattern` (SQL `LIKE`).
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The database.
    pub db: DbConfig,
    /// The `LIKE` pattern; also the `outbox` label of what it finds.
    pub pattern: String,
    /// Install or upgrade the outbox of a matching schema that is not at this version, instead of
    /// passing it by with an error.
    pub migrate: bool,
}

/// What every outbox of the instance shares.
struct Instance {
    base: RelayConfig,
    health: Arc<Health>,
    breaker: Arc<breaker::Breaker>,
    producer: Arc<producer::ProducerSlot>,
    mirror: Option<rdkafka::producer::FutureProducer>,
    stats: Arc<RelayStats>,
    databases: HashMap<String, Arc<Database>>,
}

/// An outbox being served.
struct Served {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    database: Arc<Database>,
    channel: String,
    label: OutboxLabel,
}

/// Where an outbox is: its database and schema.
type Place = (String, SchemaName);

impl Instance {
    fn database(&mut self, db: &DbConfig) -> Arc<Database> {
        let c = &self.base;
        self.databases
            .entry(db_key(db))
            .or_insert_with(|| Database::start(db.clone(), c.max_sessions, c.db_call_timeout, c.instance_id))
            .clone()
    }

    /// Checks the outbox's schema and starts its coordinator.
    async fn start(&mut self, spec: &OutboxSpec) -> Result<Served, RelayError> {
        let database = self.database(&spec.db);
        // The control session, or the error that says why there is none.
        let control = match database.control.get().await {
            Some(c) => c,
            None => Arc::new(spec.db.connect().await?),
        };
        let info = schema::check_installed(&*control, &spec.schema).await?;
        let lock_class = lane_session::lane_lock_class(&*control, &spec.schema).await.map_err(RelayError::Startup)?;
        let mut config = self.base.clone();
        config.db = spec.db.clone();
        config.schema = spec.schema.clone();
        let source = config.source.clone().unwrap_or_else(|| format!("/outbox-relay/{}", spec.schema));
        let signals = LaneSignals::new(info.lanes);
        let channel = spec.schema.notify_channel();
        database.add_outbox(channel.clone(), signals.clone());
        let label = OutboxLabel { name: spec.name.clone(), part: format!("{}/{}", spec.db.target(), spec.schema) };
        let shared = Arc::new(Shared {
            health: self.health.clone(),
            config: config.clone(),
            breaker: self.breaker.clone(),
            producer: self.producer.clone(),
            mirror: self.mirror.clone(),
            signals,
            source,
            stats: self.stats.clone(),
            label: label.clone(),
        });
        let coordinator = Coordinator::new(shared, database.clone(), lock_class, info.lanes);
        let stop = CancellationToken::new();
        let span = tracing::info_span!("outbox", outbox = %spec.name, schema = %spec.schema);
        span.in_scope(|| {
            tracing::info!(instance = %config.instance_id, lanes = info.lanes, batch_size = config.batch_size,
                database = %spec.db.target(), "serving the outbox")
        });
        let task = tokio::spawn(coordinate(coordinator, config, stop.clone()).instrument(span));
        Ok(Served { stop, task, database, channel, label })
    }
}

/// Ticks one outbox's coordinator until `stop`, then shuts it down.
async fn coordinate(mut coordinator: Coordinator, config: RelayConfig, stop: CancellationToken) {
    let mut tick = tokio::time::interval(config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                // A stuck control session (blackholed network) must not wedge the coordinator.
                if tokio::time::timeout(config.db_call_timeout, coordinator.tick()).await.is_err() {
                    tracing::warn!(timeout_ms = config.db_call_timeout.as_millis() as u64,
                        "coordinator step timed out; dropping the control session");
                    coordinator.drop_control().await;
                }
            }
        }
    }
    coordinator.shutdown().await;
}

/// What identifies a database for sharing sessions: where it is and who logs in.
fn db_key(db: &DbConfig) -> String {
    format!("{}@{}", db.user().unwrap_or(""), db.target())
}

/// Runs a relay instance over `outboxes` and what `discover` finds until `shutdown` is
/// cancelled, then shuts every outbox down gracefully (in parallel, each within
/// `shutdown_timeout`). `base` holds the settings every outbox shares; its `db` and `schema` are
/// replaced per outbox. An outbox named here that cannot start (not reachable, not migrated)
/// stops the instance with its error; a schema a pattern found that cannot start is reported and
/// tried again at the next look.
pub async fn run_fleet(
    base: RelayConfig,
    outboxes: Vec<OutboxSpec>,
    discover: Vec<Discovery>,
    shutdown: CancellationToken,
    stats: Arc<RelayStats>,
) -> Result<Arc<RelayStats>, RelayError> {
    if outboxes.is_empty() && discover.is_empty() {
        return Err(RelayError::Outboxes("no outbox to serve: give --schema, --outbox or --schema-pattern".into()));
    }
    let mut places: Vec<Place> = outboxes.iter().map(|o| (db_key(&o.db), o.schema.clone())).collect();
    places.sort();
    if let Some(w) = places.windows(2).find(|w| w[0] == w[1]) {
        return Err(RelayError::Outboxes(format!("schema {} of {} is named twice", w[0].1, w[0].0)));
    }
    let producer = Arc::new(producer::ProducerSlot::new(base.producer.clone(), stats.clone())?);
    let mirror = match &base.dlq_topic {
        Some(_) => Some(producer::mirror_producer(&base.producer)?),
        None => None,
    };
    let health = Arc::new(Health::new(base.stuck_threshold));
    let server_stop = CancellationToken::new();
    if let Some(addr) = base.metrics_addr {
        let handle = crate::health::install_recorder();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| RelayError::Metrics(format!("cannot listen on --metrics-addr {addr}: {e}")))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(crate::health::serve(listener, Some(handle), health.clone(), server_stop.clone()));
    }
    let mut instance = Instance {
        breaker: Arc::new(breaker::Breaker::new(base.breaker, stats.clone())),
        base,
        health: health.clone(),
        producer: producer.clone(),
        mirror,
        stats: stats.clone(),
        databases: HashMap::new(),
    };
    let probe = tokio::spawn(probe_broker(producer.clone(), health.clone(), server_stop.clone()));
    let mut served: HashMap<Place, Served> = HashMap::new();
    let mut failed = None;
    for spec in &outboxes {
        match instance.start(spec).await {
            Ok(s) => {
                served.insert((db_key(&spec.db), spec.schema.clone()), s);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if failed.is_none() {
        tracing::info!(instance = %instance.base.instance_id, outboxes = served.len(), "relay started");
        let mut look = tokio::time::interval(instance.base.discover_interval);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Schemas a pattern found that could not start, so each is reported once until it changes.
        let mut refused: HashMap<Place, String> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = look.tick(), if !discover.is_empty() => {
                    for d in &discover {
                        discover_once(&mut instance, d, &mut served, &mut refused).await;
                    }
                }
            }
        }
    }
    // Every outbox at once: each finishes its batches and lets go of its lanes.
    for s in served.values() {
        s.stop.cancel();
    }
    for (_, s) in served.drain() {
        let _ = s.task.await;
        s.database.remove_outbox(&s.channel);
    }
    for d in instance.databases.values() {
        d.stop().await;
    }
    server_stop.cancel();
    let _ = probe.await;
    let last = producer.current();
    if last.producer.in_flight_count() > 0 {
        let _ = tokio::task::spawn_blocking(move || last.producer.flush(Duration::from_secs(5))).await;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    tracing::info!(instance = %instance.base.instance_id, delivered = stats.delivered.load(Ordering::Relaxed), "relay stopped");
    Ok(stats)
}

/// One look for the schemas `d` matches: starts those not served yet, stops those gone.
async fn discover_once(
    instance: &mut Instance,
    d: &Discovery,
    served: &mut HashMap<Place, Served>,
    refused: &mut HashMap<Place, String>,
) {
    let key = db_key(&d.db);
    let database = instance.database(&d.db);
    let Some(control) = database.control.get().await else { return };
    let found = match control.query(include_str!("../sql/discover_schemas.sql"), &[&d.pattern]).await {
        Ok(rows) => rows.iter().map(|r| r.get::<_, String>("schema")).collect::<Vec<_>>(),
        Err(e) => {
            tracing::warn!(pattern = %d.pattern, error = %e, "looking for outbox schemas failed; will look again");
            return;
        }
    };
    // The query returns only names an outbox schema can have.
    let now: Vec<SchemaName> = found.iter().filter_map(|n| SchemaName::new(n).ok()).collect();
    // Gone: the schema was dropped (or renamed).
    let gone: Vec<Place> = served
        .keys()
        .filter(|(k, s)| *k == key && !now.contains(s) && matches_like(s.as_str(), &d.pattern))
        .cloned()
        .collect();
    for place in gone {
        let s = served.remove(&place).expect("listed");
        tracing::info!(schema = %place.1, pattern = %d.pattern, "the schema is gone; no longer serving it");
        s.stop.cancel();
        let _ = s.task.await;
        s.database.remove_outbox(&s.channel);
        instance.health.forget(&s.label.part);
        s.label.forget();
    }
    for schema in now {
        let place = (key.clone(), schema.clone());
        if served.contains_key(&place) {
            continue;
        }
        if d.migrate {
            if let Err(e) = migrate(&d.db, &schema).await {
                if refused.insert(place.clone(), e.clone()).as_ref() != Some(&e) {
                    tracing::error!(schema = %schema, error = %e, "could not migrate a matching schema; will try again");
                }
                continue;
            }
        }
        let spec = OutboxSpec { name: d.pattern.clone(), db: d.db.clone(), schema: schema.clone() };
        match instance.start(&spec).await {
            Ok(s) => {
                refused.remove(&place);
                served.insert(place, s);
            }
            Err(e) => {
                let why = e.to_string();
                if refused.insert(place, why.clone()).as_ref() != Some(&why) {
                    tracing::error!(schema = %schema, pattern = %d.pattern, error = %why,
                        "a schema matching --schema-pattern cannot be served; migrate it (`outbox-relay migrate --schema-pattern`) or run with --migrate; will look again");
                }
            }
        }
    }
}

/// Installs or upgrades the outbox in `schema` (for `--migrate`), in a session of its own.
async fn migrate(db: &DbConfig, schema: &SchemaName) -> Result<(), String> {
    let mut c = db.connect().await.map_err(|e| e.to_string())?;
    let report = schema::migrate(&mut c, schema, None).await.map_err(|e| e.to_string())?;
    if !report.applied.is_empty() {
        tracing::info!(schema = %schema, applied = ?report.applied, "migrated a schema --schema-pattern found");
    }
    Ok(())
}

/// SQL `LIKE` without escapes: `%` any run, `_` any one character.
fn matches_like(s: &str, pattern: &str) -> bool {
    fn go(s: &[char], p: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('%', rest)) => (0..=s.len()).any(|i| go(&s[i..], rest)),
            Some(('_', rest)) => !s.is_empty() && go(&s[1..], rest),
            Some((c, rest)) => s.first() == Some(c) && go(&s[1..], rest),
        }
    }
    go(&s.chars().collect::<Vec<_>>(), &pattern.chars().collect::<Vec<_>>())
}

/// Checks every few seconds that the broker answers a metadata request (for /readyz).
async fn probe_broker(producer: Arc<producer::ProducerSlot>, health: Arc<Health>, stop: CancellationToken) {
    loop {
        let p = producer.clone();
        let ok = tokio::task::spawn_blocking(move || {
            p.current().producer.client().fetch_metadata(None, Duration::from_secs(3)).is_ok()
        })
        .await
        .unwrap_or(false);
        health.set_broker_ok(ok);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_specs_parse_and_bad_ones_say_what_to_write() {
        let d = DbConfig::parse("postgres://relay@db0/app").unwrap();
        let o = OutboxSpec::parse("orders=postgres://relay@db1/shop#outbox", Some(&d)).unwrap();
        assert_eq!((o.name.as_str(), o.schema.as_str(), o.db.target()), ("orders", "outbox", "db1:5432/shop".into()));
        let o = OutboxSpec::parse("billing=#billing_outbox", Some(&d)).unwrap();
        assert_eq!(o.db.target(), "db0:5432/app");
        for bad in ["orders", "orders=postgres://x/y", "=#outbox", "a b=#outbox", "x=#Bad-Schema"] {
            let e = OutboxSpec::parse(bad, Some(&d)).unwrap_err();
            assert!(e.contains("--outbox"), "{bad}: {e}");
        }
        assert!(OutboxSpec::parse("x=#outbox", None).unwrap_err().contains("no --database-url"));
    }

    #[test]
    fn like_patterns_match_as_postgres_does() {
        assert!(matches_like("tenant_042", "tenant_%"));
        assert!(matches_like("tenantx", "tenant_"));
        assert!(!matches_like("other_1", "tenant_%"));
        assert!(matches_like("a", "%"));
        assert!(!matches_like("ab", "a"));
    }
}
