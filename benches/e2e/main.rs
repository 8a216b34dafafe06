//! End-to-end benchmarks against real PostgreSQL and a real broker, each with a baseline measured
//! in the same run. Run through `bash scripts/bench.sh [--short]`, which provisions the services
//! (PostgreSQL with fsync on) and prints the tables; they are also written to
//! `target/bench/results.md`.
//!
//! 1. Throughput: relay vs raw claim+delete (PostgreSQL alone) vs raw produce (broker alone).
//! 2. Latency at 25/50/75% of the relay's peak: commit to recorded ack, commit to consumer effect
//!    (measured from each message's scheduled send time: no coordinated omission).
//! 3. Backlog drain, and the latency of rows written during the drain.
//! 4. Inbox cost: consumer throughput without inbox, per-message inbox, batch inbox; 0% and 50%
//!    duplicates.
//! 5. Scaling: 1, 2 and 4 relay instances on one database.
//! 6. Gentle rates: claims per delivered row and commit→ack at 200/s and 1,000/s.
//! 7. Held snapshot: the same load on two databases at once, one with a transaction held open.
//!
//! This file holds the shared pieces (services, schemas, payloads, paced writers) and `main`;
//! `throughput.rs` sections 1 and 5, `latency.rs` 2, 3 and 6, `inbox.rs` 4, `held.rs` 7.

#![allow(missing_docs)]

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

mod held;
mod inbox;
mod latency;
mod throughput;

struct Ctx {
    db: DbConfig,
    brokers: String,
    short: bool,
    out: String,
    run_id: String,
}

impl Ctx {
    fn size(&self, short: usize, full: usize) -> usize {
        if self.short {
            short
        } else {
            full
        }
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

    fn relay_config(&self, s: &SchemaName) -> RelayConfig {
        let mut c = RelayConfig::new(self.db.clone(), s.clone(), self.brokers.clone());
        c.producer.properties.extend(tuning_properties());
        c.heartbeat_interval = Duration::from_millis(300);
        c.instance_timeout = Duration::from_secs(3);
        c
    }
}

/// Producer settings a tuning run tries instead of the relay's defaults, for the relay and for the
/// produce-alone baseline alike: BENCH_LINGER_MS (`linger.ms`), BENCH_COMPRESSION
/// (`compression.type`).
fn tuning_properties() -> Vec<(String, String)> {
    let mut p = Vec::new();
    if let Ok(l) = std::env::var("BENCH_LINGER_MS") {
        p.push(("linger.ms".into(), l));
    }
    if let Ok(c) = std::env::var("BENCH_COMPRESSION") {
        p.push(("compression.type".into(), c));
    }
    p
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

async fn backlog(ctx: &Ctx, s: &SchemaName) -> Res<i64> {
    let c = ctx.db.connect().await?;
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

/// `writers` sessions commit `n` messages (one per transaction, `enqueue`) at `rate` in all, open
/// loop: message `i` is due at `t0 + i / rate`, and a writer that falls behind shows up in the
/// returned histogram of how late each commit was (µs), not as a lower rate.
async fn paced_writers(
    db: &DbConfig,
    s: &SchemaName,
    topic: &str,
    rate: f64,
    n: usize,
    writers: usize,
    payload: impl Fn(usize, Duration) -> String + Send + Sync + Clone + 'static,
) -> Res<Histogram<u64>> {
    let t0 = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (db, s, topic, payload) = (db.clone(), s.clone(), topic.to_owned(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let c = db.connect().await?;
            let stmt = c.prepare(&s.qualify("SELECT __SCHEMA__.enqueue($1, $2, convert_to($3, 'UTF8'))")).await?;
            let mut lags = Vec::new();
            let mut i = w;
            while i < n {
                let due = Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until((t0 + due).into()).await;
                c.execute(&stmt, &[&topic, &format!("key-{}", i % 1000), &payload(i, due)]).await?;
                lags.push(Instant::now().saturating_duration_since(t0 + due).as_micros() as u64);
                i += writers;
            }
            Ok::<Vec<u64>, Box<dyn std::error::Error + Send + Sync>>(lags)
        }));
    }
    let mut lag = Histogram::<u64>::new(3)?;
    for t in tasks {
        for l in t.await?? {
            lag.record(l.max(1))?;
        }
    }
    Ok(lag)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Res<()> {
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
    let mut ctx = Ctx { db, brokers, short, out: String::new(), run_id };
    let c = ctx.db.connect().await?;
    let fsync: String = c.query_one("SHOW fsync", &[]).await?.get(0);
    let sync: String = c.query_one("SHOW synchronous_commit", &[]).await?.get(0);
    ctx.say(&format!(
        "# outbox-relay benchmarks ({} mode; PostgreSQL fsync={fsync}, synchronous_commit={sync})\n",
        if short { "short" } else { "full" }
    ));

    // 1. Throughput (also gives the peak the latency rates are shares of).
    let n = ctx.size(30_000, 150_000);
    let mut peak = 0.0;
    if run(1) || run(2) {
        peak = throughput::throughput(&mut ctx, n).await?;
    }

    // 2. Latency.
    if run(2) {
        latency::latency(&mut ctx, peak).await?;
    }
    // 3. Backlog drain.
    if run(3) {
        latency::drain(&mut ctx).await?;
    }
    // 4. Inbox cost.
    if run(4) {
        inbox::inbox_cost(&mut ctx).await?;
    }
    // 5. Scaling.
    if run(5) {
        throughput::scaling(&mut ctx).await?;
    }
    // 6. Gentle rates: work per row and latency where users feel it.
    if run(6) {
        latency::gentle_rates(&mut ctx, if short { 10.0 } else { 20.0 }).await?;
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
        let rate: f64 = std::env::var("BENCH_HELD_RATE").ok().and_then(|r| r.parse().ok()).unwrap_or(1000.0);
        let total = Duration::from_secs_f64(minutes * 60.0);
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
