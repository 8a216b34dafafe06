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
/// schema, and the settings it has of its own.
#[derive(Debug, Clone)]
pub struct OutboxSpec {
    /// The name in metrics and logs.
    pub name: String,
    /// The database.
    pub db: DbConfig,
    /// The schema holding the outbox.
    pub schema: SchemaName,
    /// Settings of this outbox's own, over the instance's.
    pub overrides: Overrides,
}

/// Settings an outbox of `run --outbox-file` may have of its own; what it does not set is the
/// instance's (the command line's).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Rows read and produced per batch.
    pub batch_size: Option<usize>,
    /// Rows a lane may hold between claim and delete.
    pub max_in_flight: Option<usize>,
    /// Attempts before a row is dead-lettered.
    pub max_attempts: Option<u32>,
    /// The first retry delay ceiling.
    pub retry_base: Option<Duration>,
    /// The largest retry delay.
    pub retry_cap: Option<Duration>,
    /// What happens to later messages of a dead-lettered message's key.
    pub dead_letter_policy: Option<super::DeadLetterPolicy>,
    /// Prefix for every topic.
    pub topic_prefix: Option<String>,
    /// Topic renames (replace the instance's).
    pub topic_map: Option<HashMap<String, String>>,
    /// Archive delivered rows.
    pub archive: Option<bool>,
    /// The CloudEvents `ce_source`.
    pub source: Option<String>,
}

impl Overrides {
    fn apply(&self, c: &mut RelayConfig) {
        if let Some(v) = self.batch_size {
            c.batch_size = v;
        }
        if let Some(v) = self.max_in_flight {
            c.max_in_flight = v;
        }
        if let Some(v) = self.max_attempts {
            c.max_attempts = v;
        }
        if let Some(v) = self.retry_base {
            c.retry.base = v;
        }
        if let Some(v) = self.retry_cap {
            c.retry.cap = v;
        }
        if let Some(v) = self.dead_letter_policy {
            c.dead_letter_policy = v;
        }
        if let Some(v) = &self.topic_prefix {
            c.topic_prefix = v.clone();
        }
        if let Some(v) = &self.topic_map {
            c.topic_map = v.clone();
        }
        if let Some(v) = self.archive {
            c.archive = v;
        }
        if let Some(v) = &self.source {
            c.source = Some(v.clone());
        }
    }
}

/// One entry of the outbox file, as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    url: Option<String>,
    schema: String,
    batch_size: Option<usize>,
    max_in_flight: Option<usize>,
    max_attempts: Option<u32>,
    retry_base: Option<String>,
    retry_cap: Option<String>,
    dead_letter_policy: Option<String>,
    topic_prefix: Option<String>,
    topic_map: Option<HashMap<String, String>>,
    archive: Option<bool>,
    source: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboxFile {
    outbox: Vec<FileEntry>,
}

/// Reads `run --outbox-file`: one `[[outbox]]` table per outbox (`name`, `schema`, optionally
/// `url`, which defaults to `default_db`, and the settings of [`Overrides`]).
pub fn read_outbox_file(path: &std::path::Path, default_db: Option<&DbConfig>) -> Result<Vec<OutboxSpec>, String> {
    let at = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read --outbox-file {at}: {e}"))?;
    let file: OutboxFile = toml::from_str(&text).map_err(|e| format!("--outbox-file {at}: {e}"))?;
    let duration = |name: &str, field: &str, v: &Option<String>| -> Result<Option<Duration>, String> {
        v.as_deref()
            .map(|d| {
                humantime::parse_duration(d)
                    .map_err(|e| format!("--outbox-file {at}: outbox {name}: {field} {d:?}: {e}"))
            })
            .transpose()
    };
    let mut out = Vec::new();
    for e in file.outbox {
        let n = e.name.as_str();
        let mut spec = OutboxSpec::parse(&format!("{n}={}#{}", e.url.as_deref().unwrap_or(""), e.schema), default_db)
            .map_err(|m| format!("--outbox-file {at}: {}", m.replace("--outbox ", "outbox ")))?;
        let bad = |what: String| format!("--outbox-file {at}: outbox {n}: {what}");
        if e.batch_size.is_some_and(|b| !(1..=100_000).contains(&b)) {
            return Err(bad("batch_size must be from 1 to 100000".into()));
        }
        if e.max_in_flight.is_some_and(|b| !(1..=1_000_000).contains(&b)) {
            return Err(bad("max_in_flight must be from 1 to 1000000".into()));
        }
        if e.max_attempts == Some(0) {
            return Err(bad("max_attempts must be at least 1".into()));
        }
        for (from, to) in e.topic_map.iter().flatten() {
            for t in [from, to] {
                crate::outbox::validate_topic(t).map_err(|x| bad(format!("topic_map {from:?} = {to:?}: {x}")))?;
            }
        }
        spec.overrides = Overrides {
            batch_size: e.batch_size,
            max_in_flight: e.max_in_flight,
            max_attempts: e.max_attempts,
            retry_base: duration(n, "retry_base", &e.retry_base)?,
            retry_cap: duration(n, "retry_cap", &e.retry_cap)?,
            dead_letter_policy: e.dead_letter_policy.as_deref().map(str::parse).transpose().map_err(bad)?,
            topic_prefix: e.topic_prefix,
            topic_map: e.topic_map,
            archive: e.archive,
            source: e.source,
        };
        out.push(spec);
    }
    Ok(out)
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
        Ok(Self { name: name.to_owned(), db, schema, overrides: Overrides::default() })
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
        spec.overrides.apply(&mut config);
        let source = config.source.clone().unwrap_or_else(|| format!("/outbox-relay/{}", spec.schema));
        let signals = LaneSignals::new(info.lanes);
        let channel = spec.schema.notify_channel();
        database.add_outbox(channel.clone(), signals.clone());
        let label = OutboxLabel::new(&spec.name, &format!("{}/{}", spec.db.target(), spec.schema));
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
        let spec = OutboxSpec {
            name: d.pattern.clone(),
            db: d.db.clone(),
            schema: schema.clone(),
            overrides: Overrides::default(),
        };
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
    fn an_outbox_file_gives_each_outbox_its_own_settings_and_bad_ones_say_where() {
        let dir = std::env::temp_dir().join(format!("outbox-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let d = DbConfig::parse("postgres://relay@db0/app").unwrap();
        let good = write(
            "good.toml",
            r#"
[[outbox]]
name = "orders"
schema = "outbox"
batch_size = 200
retry_base = "50ms"
dead_letter_policy = "park-key"
topic_map = { "orders" = "orders.v2" }

[[outbox]]
name = "eu"
url = "postgres://relay@db-eu/app"
schema = "eu_outbox"
"#,
        );
        let specs = read_outbox_file(&good, Some(&d)).unwrap();
        assert_eq!(specs.len(), 2);
        let mut c = RelayConfig::new(d.clone(), specs[0].schema.clone(), "b:9092");
        specs[0].overrides.apply(&mut c);
        assert_eq!((c.batch_size, c.retry.base), (200, Duration::from_millis(50)));
        assert_eq!(c.dead_letter_policy, super::super::DeadLetterPolicy::ParkKey);
        assert_eq!(c.topic_for("orders"), "orders.v2");
        assert_eq!(specs[1].db.target(), "db-eu:5432/app");
        for (text, says) in [
            ("[[outbox]]\nname = \"a\"\nschema = \"s\"\nbatch = 3\n", "unknown field"),
            ("[[outbox]]\nname = \"a\"\nschema = \"s\"\nretry_cap = \"soon\"\n", "outbox a: retry_cap"),
            ("[[outbox]]\nname = \"a\"\nschema = \"s\"\nbatch_size = 0\n", "outbox a: batch_size"),
            ("[[outbox]]\nname = \"a\"\nschema = \"s\"\ndead_letter_policy = \"drop\"\n", "unknown dead-letter policy"),
            ("[[outbox]]\nname = \"a\"\nschema = \"Bad\"\n", "outbox a"),
        ] {
            let e = read_outbox_file(&write("bad.toml", text), Some(&d)).unwrap_err();
            assert!(e.contains("bad.toml") && e.contains(says), "{text}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
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
