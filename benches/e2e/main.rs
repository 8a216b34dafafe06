//! End-to-end benchmarks against real PostgreSQL and a real broker, each with a baseline measured
//! in the same run. Run through `bash scripts/bench.sh [--short]`, which provisions the services
//! (PostgreSQL with fsync on) and prints the tables; they are also written to
//! `target/bench/results.md`.
//!
//! 1. Throughput: relay vs raw claim+delete (PostgreSQL alone) vs raw produce (broker alone).
//! 2. The sustained peak (writers on this machine), and commit→ack at half of it.
//! 3. Backlog drain, and the latency of rows written during the drain.
//! 4. Inbox cost: consumer throughput without inbox, per-message inbox, batch inbox; 0% and 50%
//!    duplicates.
//! 5. Scaling: 1, 2 and 4 relay instances on one database.
//! 6. Gentle rates: claims per delivered row and commit→ack at 200/s and 1,000/s.
//!
//! Latencies run from each row's commit (`track_commit_timestamp` in the benchmark cluster) to the
//! broker's acknowledgement (the archive's `delivered_at`) and to the commit of the consumer's
//! effect; writers are open loop, so a writer that falls behind shows as lag, not as a lower rate.
//! Rates are measured over windows of at least 10 s (full mode), three times.
//! 7. Held snapshot: the same load on two databases at once, one with a transaction held open.
//! 8. The consumer's share: commit→effect through the inbox consumer at 1,000/s and at half the
//!    peak.
//! 9. Reconciliation: `reconcile` of 1,000,000 archived deliveries against one consumer.
//! 10. Compression: the producer's `compression.type` (none, lz4, zstd) on order JSON, produce
//!     alone and relay.
//! 11. Many outboxes: 200 tenant schemas on two instances with a session budget; a single row in
//!     an idle tenant while another drains a backlog.
//! 12. Traces: the relay's throughput with traces off and on (1% sampled, exported).
//!
//! This file holds the shared pieces (services, schemas, payloads, paced writers) and `main`;
//! `throughput.rs` sections 1, 5 and 10, `latency.rs` 2, 3 and 6, `inbox.rs` 4, `held.rs` 7, `reconcile.rs` 9, `fleet.rs` 11, `traces.rs` 12.

#![allow(missing_docs)]

// The relay runs in this process: the same allocator as the `outbox-relay` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use outbox_relay::consumer::{self, ConsumedMessage, ConsumerConfig, ConsumerStats, Handler, HandlerFuture};
use outbox_relay::db::DbConfig;
use outbox_relay::relay::lane_session::ClaimedRow;
use outbox_relay::relay::{self, envelope, RelayConfig, RelayStats};
use outbox_relay::schema::{self, SchemaName};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

mod fleet;
mod held;
mod inbox;
mod latency;
mod reconcile;
mod throughput;
mod traces;

struct Ctx {
    db: DbConfig,
    brokers: String,
    short: bool,
    /// How long each rate is measured (10 s in full mode).
    window: Duration,
    out: String,
    run_id: String,
    /// The producer's `compression.type` for the section running (section 10), over
    /// BENCH_COMPRESSION.
    codec: Option<String>,
}

impl Ctx {
    fn size(&self, short: usize, full: usize) -> usize {
        if self.short {
            short
        } else {
            full
        }
    }

    /// Writes the dirty pages of the sections before out of the way (a CHECKPOINT), so that the
    /// next section's commits do not wait behind them.
    async fn quiesce(&self) -> Res<()> {
        self.db.connect().await?.batch_execute("CHECKPOINT").await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(())
    }

    fn say(&mut self, line: &str) {
        println!("{line}");
        self.out.push_str(line);
        self.out.push('\n');
    }

    async fn schema(&self, name: &str, lanes: u16) -> Res<SchemaName> {
        let s = SchemaName::new(&format!("bench_{}_{}", name, self.run_id))?;
        let mut c = self.db.connect().await?;
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", s.ident())).await?;
        schema::migrate(&mut c, &s, Some(lanes)).await?;
        Ok(s)
    }

    async fn topic(&self, name: &str, partitions: i32) -> Res<String> {
        let t = format!("bench-{name}-{}", self.run_id);
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create()?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        admin.create_topics([&NewTopic::new(&t, partitions, TopicReplication::Fixed(1))], &opts).await?;
        Ok(t)
    }

    /// Drops a run's schema and deletes its topic once its figures are read, so that later runs
    /// meet neither its tables (autovacuum, catalog) nor its records (the test broker keeps every
    /// record in memory).
    async fn forget(&self, s: &SchemaName, topics: &[&str]) -> Res<()> {
        self.db.connect().await?.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", s.ident())).await?;
        self.delete_topics(topics).await
    }

    async fn delete_topics(&self, topics: &[&str]) -> Res<()> {
        if topics.is_empty() {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create()?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for r in admin.delete_topics(topics, &opts).await? {
            if let Err((t, e)) = r {
                eprintln!("note: could not delete topic {t}: {e}");
            }
        }
        Ok(())
    }

    fn relay_config(&self, s: &SchemaName) -> RelayConfig {
        let mut c = RelayConfig::new(self.db.clone(), s.clone(), self.brokers.clone());
        c.producer.properties.extend(self.tuning_properties());
        c.heartbeat_interval = Duration::from_millis(300);
        c.instance_timeout = Duration::from_secs(3);
        // BENCH_MAX_SESSIONS: the relay's lanes on that many sessions (`--max-sessions`).
        c.max_sessions = std::env::var("BENCH_MAX_SESSIONS").ok().and_then(|v| v.parse().ok());
        c
    }
}

impl Ctx {
    /// Producer settings a tuning run tries instead of the relay's defaults, for the relay and for
    /// the produce-alone baseline alike: BENCH_LINGER_MS (`linger.ms`), BENCH_COMPRESSION
    /// (`compression.type`, unless the section sets its own codec).
    fn tuning_properties(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if let Ok(l) = std::env::var("BENCH_LINGER_MS") {
            p.push(("linger.ms".into(), l));
        }
        if let Some(c) = self.codec.clone().or_else(|| std::env::var("BENCH_COMPRESSION").ok()) {
            p.push(("compression.type".into(), c));
        }
        p
    }
}

/// An order event as JSON of about `size` bytes: ids, amounts, a currency, a time, a short hash
/// and order lines (their number grows with `size`); it compresses about as much as real events
/// do, unlike a run of one repeated byte.
const ORDER_JSON: &str = "json_build_object(
    'order_id', g, 'customer_id', 'cust-' || (g * 7919 % 100003), 'amount_cents', g * 37 % 99000,
    'currency', (ARRAY['EUR','USD','GBP','SEK'])[g % 4 + 1],
    'placed_at', now() - (g % 86400) * interval '1 second', 'ref', md5(g::text),
    'lines', (SELECT json_agg(json_build_object('sku', 'SKU-' || ((g + i) * 31 % 5000), 'qty', (g + i) % 5 + 1,
                                                'price_cents', (g * i * 13) % 20000))
              FROM generate_series(1, greatest(1, ($2::int - 230) / 55)) i))::text";

/// Inserts `n` rows of `size`-byte payloads over `keys` keys in one statement.
async fn preload(ctx: &Ctx, s: &SchemaName, topic: &str, n: usize, size: usize) -> Res<()> {
    let c = ctx.db.connect().await?;
    c.batch_execute("SET statement_timeout = 0").await?;
    for start in (0..n).step_by(100_000) {
        let m = (n - start).min(100_000) as i64;
        c.execute(
            &s.qualify(
                &format!(
                    "INSERT INTO __SCHEMA__.messages (id, topic, key, payload, content_type)
                     SELECT gen_random_uuid(), $1, 'key-' || (g % 1000), convert_to({ORDER_JSON}, 'UTF8'), 'application/json'
                     FROM generate_series(1, $3::bigint) g"
                ),
            ),
            &[&topic, &(size as i32), &m],
        )
        .await?;
    }
    c.batch_execute(&s.qualify("ANALYZE __SCHEMA__.messages")).await?;
    Ok(())
}

/// Rows still in the outbox.
async fn pending_rows(c: &tokio_postgres::Client, s: &SchemaName) -> Res<i64> {
    Ok(c.query_one(&s.qualify("SELECT count(*) FROM __SCHEMA__.messages"), &[]).await?.get(0))
}

struct Running {
    stop: CancellationToken,
    stats: Arc<RelayStats>,
    task: tokio::task::JoinHandle<Result<Arc<RelayStats>, relay::RelayError>>,
}

fn start_relay(cfg: RelayConfig) -> Running {
    let stop = CancellationToken::new();
    let stats = Arc::new(RelayStats::default());
    let task = tokio::spawn(relay::run_with_stats(cfg, stop.clone(), stats.clone()));
    Running { stop, stats, task }
}

impl Running {
    async fn wait_lanes(&self, n: u64) {
        while self.stats.lanes_acquired.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    async fn stop(self) -> Res<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

fn pct(h: &Histogram<u64>) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

/// How the benchmark's writers commit.
#[derive(Clone, Copy, Debug)]
struct Writers {
    /// Sessions, each committing one message per transaction.
    sessions: usize,
    /// `synchronous_commit` of the writers' own sessions: off when fsync'd single-message
    /// commits cannot keep the schedule (said in each table that uses it).
    durable: bool,
}

impl Writers {
    const FSYNCED: Writers = Writers { sessions: 8, durable: true };

    fn describe(&self) -> String {
        format!(
            "{} writer sessions, one message per transaction, {}",
            self.sessions,
            if self.durable { "fsync'd commits" } else { "writers with synchronous_commit=off" }
        )
    }
}

/// What paced writers did: how late each commit was (µs), and each message's id and
/// transaction, so that latencies are measured from the commit itself.
struct Writes {
    lag: Histogram<u64>,
    ids: Vec<Uuid>,
    xids: Vec<String>,
}

impl Writes {
    fn lag_p99_ms(&self) -> f64 {
        if self.lag.is_empty() {
            0.0
        } else {
            self.lag.value_at_quantile(0.99) as f64 / 1000.0
        }
    }
}

/// An order event of about 200 bytes, varied in every field.
fn order_event(i: usize) -> String {
    format!(
        "{{\"order\":{i},\"customer\":\"c-{}\",\"amount_cents\":{},\"currency\":\"{}\",\"ref\":\"{:016x}\",\"note\":\"{}\"}}",
        i % 997,
        i * 37 % 99_000,
        ["EUR", "USD", "GBP", "SEK"][i % 4],
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ["gift wrap", "leave at the door", "call before delivery", "", "fragile: glass"][i % 5].repeat(1 + i % 3)
    )
}

/// `w.sessions` sessions commit `n` messages (one per transaction, `enqueue`) at `rate` in all,
/// open loop: message `i` is due at `t0 + i / rate`, and a writer that falls behind shows up in the
/// lag histogram, not as a lower rate (no coordinated omission).
async fn paced_writers(db: &DbConfig, s: &SchemaName, topic: &str, rate: f64, n: usize, w: Writers) -> Res<Writes> {
    let t0 = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for k in 0..w.sessions {
        let (db, s, topic) = (db.clone(), s.clone(), topic.to_owned());
        tasks.push(tokio::spawn(async move {
            let c = db.connect().await?;
            if !w.durable {
                c.batch_execute("SET synchronous_commit = off").await?;
            }
            let stmt = c
                .prepare(
                    &s.qualify("SELECT __SCHEMA__.enqueue_json($1, $2, $3::text::jsonb), pg_current_xact_id()::text"),
                )
                .await?;
            let mut out = Vec::new();
            let mut i = k;
            while i < n {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let row = c.query_one(&stmt, &[&topic, &format!("key-{}", i % 1000), &order_event(i)]).await?;
                let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
                out.push((row.get::<_, Uuid>(0), row.get::<_, String>(1), lag));
                i += w.sessions;
            }
            Ok::<Vec<(Uuid, String, u64)>, Box<dyn std::error::Error + Send + Sync>>(out)
        }));
    }
    let mut writes = Writes { lag: Histogram::<u64>::new(3)?, ids: Vec::with_capacity(n), xids: Vec::with_capacity(n) };
    for t in tasks {
        for (id, xid, lag) in t.await?? {
            writes.lag.record(lag.max(1))?;
            writes.ids.push(id);
            writes.xids.push(xid);
        }
    }
    Ok(writes)
}

/// From each message's commit (`track_commit_timestamp`) to the broker's acknowledgement (the
/// archive's `delivered_at`), µs.
async fn commit_to_ack(c: &tokio_postgres::Client, s: &SchemaName, w: &Writes) -> Res<Histogram<u64>> {
    let sql = s.qualify(
        "SELECT (extract(epoch FROM d.delivered_at - pg_xact_commit_timestamp(w.xid::xid)) * 1e6)::bigint
         FROM unnest($1::uuid[], $2::text[]) AS w(id, xid) JOIN __SCHEMA__.delivered d USING (id)",
    );
    histogram(c.query(&sql, &[&w.ids, &w.xids]).await?)
}

/// From each message's commit to the commit of the consumer's effect (the effect row's own
/// transaction), µs.
async fn commit_to_effect(c: &tokio_postgres::Client, effects: &str, w: &Writes) -> Res<Histogram<u64>> {
    let sql = format!(
        "SELECT (extract(epoch FROM pg_xact_commit_timestamp(e.xmin) - pg_xact_commit_timestamp(w.xid::xid)) * 1e6)::bigint
         FROM unnest($1::uuid[], $2::text[]) AS w(id, xid) JOIN {effects} e USING (id)"
    );
    histogram(c.query(&sql, &[&w.ids, &w.xids]).await?)
}

fn histogram(rows: Vec<tokio_postgres::Row>) -> Res<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3)?;
    for r in rows {
        h.record(r.get::<_, i64>(0).max(1) as u64)?;
    }
    Ok(h)
}

/// The median of three runs by `key`, and the spread of `key` over the three.
fn median_of_3<T>(mut runs: Vec<T>, key: impl Fn(&T) -> f64) -> (T, f64, f64) {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let (lo, hi) = (key(&runs[0]), key(&runs[runs.len() - 1]));
    (runs.swap_remove(runs.len() / 2), lo, hi)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Res<()> {
    // BENCH_LOG=info (or any filter) shows the relay's own log lines.
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let short = std::env::args().any(|a| a == "--short");
    // --only N[,N]: run only these sections (tuning runs).
    let only: Vec<u32> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    let run = |n: u32| only.is_empty() || only.contains(&n);
    let db = DbConfig::parse(
        &std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set: run `bash scripts/bench.sh`")?,
    )?
    .with_statement_timeout(None);
    let brokers =
        std::env::var("KAFKA_BROKERS").map_err(|_| "KAFKA_BROKERS is not set: run `bash scripts/bench.sh`")?;
    let run_id =
        format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() % 0xfffff);
    let window = Duration::from_secs(if short { 3 } else { 10 });
    let mut ctx = Ctx { db, brokers, short, window, out: String::new(), run_id, codec: None };
    let c = ctx.db.connect().await?;
    let fsync: String = c.query_one("SHOW fsync", &[]).await?.get(0);
    let sync: String = c.query_one("SHOW synchronous_commit", &[]).await?.get(0);
    ctx.say(&format!(
        "# outbox-relay benchmarks ({} mode; PostgreSQL fsync={fsync}, synchronous_commit={sync})\n",
        if short { "short" } else { "full" }
    ));

    let secs = ctx.window.as_secs_f64();
    // The latency sections first, on a cluster that has not yet written millions of rows: run
    // after the throughput sections, their fsync'd commits waited behind the checkpoints and
    // vacuums those left (writer lag p99 at 200/s went from 4 ms to 49 ms). Every section starts
    // after a CHECKPOINT.
    // 6. Gentle rates: work per row and latency where users feel it.
    if run(6) {
        ctx.quiesce().await?;
        latency::gentle_rates(&mut ctx, secs).await?;
    }
    // 2. Sustained peak and latency at half of it (BENCH_HALF_PEAK skips the search).
    let mut half_peak = std::env::var("BENCH_HALF_PEAK").ok().and_then(|v| v.parse().ok());
    if run(2) && half_peak.is_none() {
        ctx.quiesce().await?;
        half_peak = Some(latency::peak_and_latency(&mut ctx, secs).await?);
    }
    // 8. The consumer's share: commit→effect.
    if run(8) {
        ctx.quiesce().await?;
        latency::consumer_share(&mut ctx, secs, half_peak).await?;
    }
    // 1. Throughput against the same-run baselines.
    let mut relay_rate = 40_000.0;
    if run(1) {
        ctx.quiesce().await?;
        relay_rate = throughput::throughput(&mut ctx).await?;
    }
    // 3. Backlog drain.
    if run(3) {
        ctx.quiesce().await?;
        latency::drain(&mut ctx).await?;
    }
    // 4. Inbox cost.
    if run(4) {
        ctx.quiesce().await?;
        inbox::inbox_cost(&mut ctx).await?;
    }
    // 5. Scaling.
    if run(5) {
        ctx.quiesce().await?;
        throughput::scaling(&mut ctx, relay_rate).await?;
    }
    // 9. Reconciliation (BENCH_RECONCILE_ROWS deliveries, 1,000,000 by default, 100,000 with --short).
    if run(9) {
        let default = if short { 100_000 } else { 1_000_000 };
        let rows = std::env::var("BENCH_RECONCILE_ROWS").ok().and_then(|r| r.parse().ok()).unwrap_or(default);
        ctx.quiesce().await?;
        reconcile::reconcile_cost(&mut ctx, rows).await?;
    }
    // 10. Compression: none, lz4 and zstd, interleaved.
    if run(10) {
        ctx.quiesce().await?;
        throughput::compression(&mut ctx).await?;
    }
    // 11. Many outboxes: BENCH_TENANTS schemas (200; 20 with --short), a backlog of
    // BENCH_TENANT_BACKLOG rows (200,000; 20,000 with --short), BENCH_FLEET_SESSIONS lane
    // sessions per instance (16), BENCH_FLEET_BATCH a --batch-size of every instance, BENCH_FLEET_PRODUCER
    // librdkafka properties of every instance.
    if run(11) {
        let tenants = std::env::var("BENCH_TENANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(ctx.size(20, 200));
        let backlog = std::env::var("BENCH_TENANT_BACKLOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(ctx.size(20_000, 200_000));
        ctx.quiesce().await?;
        let budget = std::env::var("BENCH_FLEET_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
        fleet::many_tenants(&mut ctx, tenants, backlog, budget).await?;
    }
    // 12. What traces cost the relay.
    if run(12) {
        ctx.quiesce().await?;
        traces::tracing_cost(&mut ctx).await?;
    }
    // 7. Held snapshot: BENCH_HELD_MINUTES long (10 by default, 2 with --short), ten windows.
    if run(7) {
        let minutes: f64 = match std::env::var("BENCH_HELD_MINUTES") {
            Ok(m) => m.parse().map_err(|_| format!("BENCH_HELD_MINUTES={m:?} is not a number of minutes"))?,
            Err(_) => {
                if short {
                    2.0
                } else {
                    10.0
                }
            }
        };
        let rate: f64 = std::env::var("BENCH_HELD_RATE").ok().and_then(|r| r.parse().ok()).unwrap_or(500.0);
        let total = Duration::from_secs_f64(minutes * 60.0);
        ctx.quiesce().await?;
        held::held_snapshot(&mut ctx, rate, total, total / 10).await?;
    }

    std::fs::create_dir_all("target/bench")?;
    std::fs::write("target/bench/results.md", &ctx.out)?;
    // Leave nothing behind.
    let c = ctx.db.connect().await?;
    let schemas: Vec<String> = c
        .query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench\\_%' || $1", &[&ctx.run_id])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for sch in schemas {
        c.batch_execute(&format!("DROP SCHEMA \"{sch}\" CASCADE")).await?;
    }
    Ok(())
}
