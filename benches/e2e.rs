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

/// Raw PostgreSQL: the relay's own claim and delete statements, one session per lane, no Kafka.
async fn claim_delete_rate(ctx: &Ctx, s: &SchemaName, lanes: i16, n: usize) -> Res<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let db = ctx.db.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let c = db.connect().await?;
            let claim = c.prepare(&s.qualify(include_str!("../src/sql/claim.sql"))).await?;
            let delete = c.prepare(&s.qualify(include_str!("../src/sql/delete_acked.sql"))).await?;
            let mut done = 0u64;
            // From a cursor, as the relay's lanes claim.
            let mut from = i64::MIN;
            loop {
                let rows = c.query(&claim, &[&lane, &1000i64, &from, &i64::MAX]).await?;
                if rows.is_empty() {
                    return Ok::<u64, Box<dyn std::error::Error + Send + Sync>>(done);
                }
                let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                from = seqs[seqs.len() - 1] + 1;
                c.execute(&delete, &[&lane, &seqs]).await?;
                done += seqs.len() as u64;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    assert_eq!(total as usize, n);
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Raw broker: the same records (envelope headers included), pipelined, no PostgreSQL.
async fn produce_rate(ctx: &Ctx, topic: &str, n: usize, payloads: &[Vec<u8>]) -> Res<f64> {
    let settings = outbox_relay::relay::kafka::ProducerSettings {
        brokers: ctx.brokers.clone(),
        message_timeout: Duration::from_secs(30),
        properties: tuning_properties(),
    };
    let producer: FutureProducer = settings.create()?;
    let row = ClaimedRow {
        seq: 0,
        id: Uuid::now_v7(),
        topic: topic.to_owned(),
        key: None,
        payload: None,
        headers: Vec::new(),
        malformed: None,
        message_type: None,
        content_type: Some("application/octet-stream".into()),
        correlation_id: None,
        traceparent: None,
        created_at: chrono::Utc::now(),
        attempts: 0,
        waiting: false,
        wait_ms: 0,
        age_ms: 0,
    };
    let start = Instant::now();
    let mut pending = std::collections::VecDeque::with_capacity(n);
    for i in 0..n {
        let mut r = row.clone();
        r.id = Uuid::now_v7();
        let key = format!("key-{}", i % 1000);
        let mut record = FutureRecord::to(topic).key(key.as_bytes()).payload(payloads[i % payloads.len()].as_slice());
        // BENCH_NO_HEADERS=1 measures what the envelope headers cost the broker path.
        if std::env::var_os("BENCH_NO_HEADERS").is_none() {
            record = record.headers(envelope::headers(&r, "/bench"));
        }
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((_, rec)) => {
                    record = rec;
                    if let Some(f) = pending.pop_front() {
                        ack(f).await?;
                    }
                }
            }
        }
    }
    for f in pending {
        ack(f).await?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// One acknowledgement, within a minute: the relay's producer settings never time a record out
/// inside librdkafka, so a broker gone away would otherwise hang the benchmark.
async fn ack(f: rdkafka::producer::DeliveryFuture) -> Res<()> {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .map_err(|_| "no acknowledgement within 60 s: is the broker up?")??
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// The relay draining `n` rows committed in one go while it already runs.
async fn relay_rate(ctx: &Ctx, s: &SchemaName, topic: &str, n: usize, size: usize, instances: usize) -> Res<f64> {
    let relays: Vec<Running> = (0..instances).map(|_| start_relay(ctx.relay_config(s))).collect();
    for r in &relays {
        r.wait_lanes(1).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await; // let the instances balance their lanes
    let start = Instant::now();
    preload(ctx, s, topic, n, size).await?;
    let total = || relays.iter().map(|r| r.stats.delivered.load(Ordering::Relaxed)).sum::<u64>();
    while total() < n as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    for r in relays {
        r.stop().await?;
    }
    Ok(rate)
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

struct EffectTimes(String);

impl Handler for EffectTimes {
    fn handle<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>, m: &'a ConsumedMessage) -> HandlerFuture<'a> {
        Box::pin(async move {
            let text = std::str::from_utf8(m.payload.as_deref().unwrap_or_default())?;
            let scheduled: i64 = text.split(':').next().unwrap_or("0").parse()?;
            tx.execute(&format!("INSERT INTO {} VALUES ($1, $2, clock_timestamp())", self.0), &[&m.id, &scheduled])
                .await?;
            Ok(())
        })
    }
}

/// Latency at a fixed write rate, open loop: message i is due at t0 + i/rate, and its payload
/// carries that due time, so a stalled writer shows up as latency instead of hiding it.
async fn latency_at(ctx: &Ctx, rate: f64, secs: f64) -> Res<(Histogram<u64>, Histogram<u64>, Histogram<u64>, usize)> {
    let s = ctx.schema(&format!("lat{}", rate as u64), 16).await?;
    let topic = ctx.topic(&format!("lat{}", rate as u64), 4).await?;
    let effects = format!("{}.effects", s.ident());
    ctx.db
        .connect()
        .await?
        .batch_execute(&format!("CREATE TABLE {effects} (id uuid, scheduled_us bigint, applied_at timestamptz)"))
        .await?;
    let mut rc = ctx.relay_config(&s);
    rc.archive = true;
    let relay = start_relay(rc);
    relay.wait_lanes(16).await;
    let mut cc = ConsumerConfig::new(
        ctx.brokers.clone(),
        format!("lat-{}", ctx.run_id),
        vec![topic.clone()],
        "bench",
        s.clone(),
        ctx.db.clone(),
    );
    cc.batch_size = 200;
    let cstop = CancellationToken::new();
    let cstats = Arc::new(ConsumerStats::default());
    let consumer =
        tokio::spawn(consumer::run(cc, Arc::new(EffectTimes(effects.clone())), cstop.clone(), cstats.clone()));
    tokio::time::sleep(Duration::from_secs(6)).await; // group join
    let n = (rate * secs) as usize;
    // The payload carries the message's due time, so the consumer can measure from it.
    let epoch0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64 + 200_000;
    let lag = paced_writers(ctx, &s, &topic, rate, n, 8, move |_, due| {
        format!("{}:{}", epoch0 + due.as_micros() as i64, "x".repeat(180))
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while cstats.processed.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cstop.cancel();
    consumer.await??;
    relay.stop().await?;
    let c = ctx.db.connect().await?;
    let mut ack = Histogram::<u64>::new(3)?;
    for r in c
        .query(
            &s.qualify(
                "SELECT (extract(epoch FROM delivered_at - created_at) * 1e6)::bigint FROM __SCHEMA__.delivered",
            ),
            &[],
        )
        .await?
    {
        ack.record(r.get::<_, i64>(0).max(1) as u64)?;
    }
    let mut effect = Histogram::<u64>::new(3)?;
    for r in c
        .query(&format!("SELECT (extract(epoch FROM applied_at) * 1e6)::bigint - scheduled_us FROM {effects}"), &[])
        .await?
    {
        effect.record(r.get::<_, i64>(0).max(1) as u64)?;
    }
    let applied = effect.len() as usize;
    Ok((ack, effect, lag, applied))
}

/// A gentle, steady rate: what each delivered row costs (claims run per row) and how long it
/// waits (commit→ack from the archive, whose `delivered_at` is the acknowledgement). Eight writers,
/// one message per transaction, open loop; no consumer.
async fn gentle_rate(ctx: &Ctx, rate: f64, secs: f64, run: usize) -> Res<(f64, Histogram<u64>, Histogram<u64>)> {
    let s = ctx.schema(&format!("gentle{}r{run}", rate as u64), 16).await?;
    let topic = ctx.topic(&format!("gentle{}r{run}", rate as u64), 4).await?;
    let mut rc = ctx.relay_config(&s);
    rc.archive = true;
    let relay = start_relay(rc);
    relay.wait_lanes(16).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (claims0, delivered0) =
        (relay.stats.claims.load(Ordering::Relaxed), relay.stats.delivered.load(Ordering::Relaxed));
    let n = (rate * secs) as usize;
    let lag = paced_writers(ctx, &s, &topic, rate, n, 8, |i, _| {
        format!(
            "{{\"order\":{i},\"customer\":\"c-{}\",\"amount_cents\":{},\"note\":\"{}\"}}",
            i % 997,
            i * 37 % 9_900,
            "x".repeat(120)
        )
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while backlog(ctx, &s).await? > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let claims = relay.stats.claims.load(Ordering::Relaxed) - claims0;
    let delivered = relay.stats.delivered.load(Ordering::Relaxed) - delivered0;
    relay.stop().await?;
    let mut ack = Histogram::<u64>::new(3)?;
    let c = ctx.db.connect().await?;
    let sql =
        s.qualify("SELECT (extract(epoch FROM delivered_at - created_at) * 1e6)::bigint FROM __SCHEMA__.delivered");
    for r in c.query(&sql, &[]).await? {
        ack.record(r.get::<_, i64>(0).max(1) as u64)?;
    }
    Ok((claims as f64 / delivered.max(1) as f64, ack, lag))
}

/// `writers` sessions commit `n` messages (one per transaction, `enqueue`) at `rate` in all, open
/// loop: message `i` is due at `t0 + i / rate`, and a writer that falls behind shows up in the
/// returned histogram of how late each commit was (µs), not as a lower rate.
async fn paced_writers(
    ctx: &Ctx,
    s: &SchemaName,
    topic: &str,
    rate: f64,
    n: usize,
    writers: usize,
    payload: impl Fn(usize, Duration) -> String + Send + Sync + Clone + 'static,
) -> Res<Histogram<u64>> {
    paced_writers_on(&ctx.db, s, topic, rate, n, writers, payload).await
}

/// [`paced_writers`] on any database.
async fn paced_writers_on(
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

/// How many single-message transactions per second 8 writers commit (closed loop, 3 s).
async fn writer_capacity(ctx: &Ctx) -> Res<f64> {
    let s = ctx.schema("writers", 16).await?;
    let stop_at = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (db, s) = (ctx.db.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let c = db.connect().await?;
            let stmt = c
                .prepare(&s.qualify("SELECT __SCHEMA__.enqueue('t', $1, convert_to(repeat('x', 200), 'UTF8'))"))
                .await?;
            let mut n = 0u64;
            while Instant::now() < stop_at {
                c.execute(&stmt, &[&format!("key-{w}-{n}")]).await?;
                n += 1;
            }
            Ok::<u64, Box<dyn std::error::Error + Send + Sync>>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / 3.0)
}

/// Consumer throughput over `m` records (`dup_share` of them repeated), in one of three modes.
async fn inbox_rate(ctx: &Ctx, mode: &str, m: usize, dup_share: f64) -> Res<f64> {
    let s = ctx.schema(&format!("inbox_{mode}_{}", (dup_share * 100.0) as u32), 4).await?;
    let topic = ctx.topic(&format!("inbox-{mode}-{}", (dup_share * 100.0) as u32), 4).await?;
    let table = format!("{}.effects", s.ident());
    ctx.db.connect().await?.batch_execute(&format!("CREATE TABLE {table} (id uuid, amount bigint)")).await?;
    // The records, straight to the broker as the relay would send them.
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &ctx.brokers).set("linger.ms", "5").create()?;
    let distinct = ((m as f64) * (1.0 - dup_share)).round() as usize;
    let ids: Vec<Uuid> = (0..distinct).map(|_| Uuid::now_v7()).collect();
    let mut pending = Vec::with_capacity(m);
    for i in 0..m {
        let id = ids[i % distinct].to_string();
        let key = format!("k{}", i % 100);
        let h = OwnedHeaders::new().insert(Header { key: "ce_id", value: Some(id.as_str()) });
        pending.push(
            producer
                .send_result(FutureRecord::to(&topic).key(key.as_str()).payload("7").headers(h))
                .map_err(|(e, _)| e)?,
        );
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    let start = Instant::now();
    if mode == "none" {
        // Baseline: the same effect in a transaction per message, offsets stored after commit, no dedup.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &ctx.brokers)
            .set("group.id", format!("none-{}", ctx.run_id))
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[&topic])?;
        let mut c = ctx.db.connect().await?;
        let stmt = c.prepare(&format!("INSERT INTO {table} VALUES ($1, $2)")).await?;
        let mut seen = 0;
        let mut first: Option<Instant> = None;
        while seen < m {
            let Some(msg) = consumer.poll(Duration::from_millis(100)) else { continue };
            let msg = msg?;
            first.get_or_insert_with(Instant::now);
            let id: Uuid = msg
                .headers()
                .and_then(|h| h.iter().next())
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
                .unwrap_or_default();
            let tx = c.transaction().await?;
            tx.execute(&stmt, &[&id, &7i64]).await?;
            tx.commit().await?;
            consumer.store_offset_from_message(&msg)?;
            seen += 1;
        }
        // Time from the first record on, like the runner modes below (group join excluded).
        return Ok(m as f64 / first.map_or(start, |f| f).elapsed().as_secs_f64());
    }
    struct Effect(String);
    impl Handler for Effect {
        fn handle<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>, m: &'a ConsumedMessage) -> HandlerFuture<'a> {
            Box::pin(async move {
                tx.execute(&format!("INSERT INTO {} VALUES ($1, 7)", self.0), &[&m.id]).await?;
                Ok(())
            })
        }
    }
    let mut cc = ConsumerConfig::new(
        ctx.brokers.clone(),
        format!("{mode}-{}-{}", ctx.run_id, (dup_share * 100.0) as u32),
        vec![topic],
        "bench",
        s.clone(),
        ctx.db.clone(),
    );
    cc.batch_size = if mode == "batch" { 200 } else { 1 };
    let stop = CancellationToken::new();
    let stats = Arc::new(ConsumerStats::default());
    let task = tokio::spawn(consumer::run(cc, Arc::new(Effect(table)), stop.clone(), stats.clone()));
    let seen = || stats.processed.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed);
    while seen() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = Instant::now();
    while seen() < m as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = m as f64 / first.elapsed().as_secs_f64();
    assert_eq!(stats.processed.load(Ordering::Relaxed) as usize, distinct, "effects applied once each");
    stop.cancel();
    task.await??;
    Ok(rate)
}

/// Section 1: throughput at 200 B and 2 KiB against both baselines; the relay's rate at 200 B.
async fn throughput(ctx: &mut Ctx, n: usize) -> Res<f64> {
    ctx.say(&format!("## 1. Throughput ({n} messages, 16 lanes, 4 partitions)\n"));
    ctx.say("| payload | claim+delete alone (msg/s) | produce alone (msg/s) | relay (msg/s) | relay / min(both) |");
    ctx.say("|---|---|---|---|---|");
    let mut peak = 0.0;
    for size in [200usize, 2048] {
        let s = ctx.schema(&format!("cd{size}"), 16).await?;
        let topic = ctx.topic(&format!("cd{size}"), 4).await?;
        preload(ctx, &s, &topic, n, size).await?;
        // The produce-alone baseline sends the very payloads the relay sends.
        let sample: Vec<Vec<u8>> = ctx
            .db
            .connect()
            .await?
            .query(&s.qualify("SELECT payload FROM __SCHEMA__.messages LIMIT 1000"), &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mean = sample.iter().map(Vec::len).sum::<usize>() / sample.len().max(1);
        let cd = claim_delete_rate(ctx, &s, 16, n).await?;
        let prod = produce_rate(ctx, &ctx.topic(&format!("prod{size}"), 4).await?, n, &sample).await?;
        let s2 = ctx.schema(&format!("relay{size}"), 16).await?;
        let rl = relay_rate(ctx, &s2, &topic, n, size, 1).await?;
        if size == 200 {
            peak = rl;
        }
        ctx.say(&format!(
            "| {size} B (JSON, mean {mean} B) | {cd:.0} | {prod:.0} | {rl:.0} | {:.2} |",
            rl / cd.min(prod)
        ));
    }
    Ok(peak)
}

/// Section 6: at 200/s and 1,000/s, claims per delivered row and commit→ack, three runs of `secs`
/// each; the median run (by p99) and the spread of the three.
async fn gentle_rates(ctx: &mut Ctx, secs: f64) -> Res<()> {
    ctx.say(&format!(
        "\n## 6. Gentle rates (16 lanes, 8 writer connections, one message per transaction, JSON ~200 B; {secs:.0} s runs, median of 3 by p99, spread)\n"
    ));
    ctx.say("| rate | claims per delivered row (3 runs) | commit→ack p50 / p99 / p99.9 / max (ms), median run | p99 of the 3 runs (ms) | writer lag p99 (ms) |");
    ctx.say("|---|---|---|---|---|");
    for rate in [200.0, 1000.0] {
        let mut runs = Vec::new();
        for r in 0..3 {
            runs.push(gentle_rate(ctx, rate, secs, r).await?);
        }
        let claims: Vec<String> = runs.iter().map(|(c, _, _)| format!("{c:.2}")).collect();
        let mut p99s: Vec<f64> = runs.iter().map(|(_, a, _)| a.value_at_quantile(0.99) as f64 / 1000.0).collect();
        runs.sort_by_key(|(_, a, _)| a.value_at_quantile(0.99));
        let (_, ack, lag) = &runs[1];
        p99s.sort_by(f64::total_cmp);
        ctx.say(&format!(
            "| {rate:.0}/s | {} | {} | {:.1} – {:.1} | {:.2} |",
            claims.join(", "),
            pct(ack),
            p99s[0],
            p99s[2],
            lag.value_at_quantile(0.99) as f64 / 1000.0
        ));
    }
    Ok(())
}

/// One arm of section 7: a database of its own (a held snapshot holds back cleanup only in its
/// own database), 16 lanes, paced writers, the relay with `--archive`; every `window` the claim
/// count and time, the outbox's dead tuples and its table and index sizes.
struct ArmWindow {
    claims: u64,
    claim_micros: u64,
    dead_tuples: i64,
    table_bytes: i64,
    index_bytes: i64,
}

struct ArmResult {
    windows: Vec<ArmWindow>,
    /// commit→ack p50, p99 (ms) and rows, per window of commit time.
    per_window: Vec<(f64, f64, i64)>,
    lag: Histogram<u64>,
    /// How long after its commit the late row was acknowledged (None: not delivered).
    late_ms: Option<f64>,
}

async fn held_snapshot_arm(
    ctx: &Ctx,
    name: &str,
    hold: bool,
    rate: f64,
    total: Duration,
    window: Duration,
) -> Res<ArmResult> {
    let dbname = format!("bench_{name}_{}", ctx.run_id);
    let admin = ctx.db.connect().await?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {dbname}")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {dbname}")).await?;
    let url = std::env::var("DATABASE_URL")?;
    let (base, query) = url.split_once('?').map_or((url.as_str(), ""), |(b, q)| (b, q));
    let base = &base[..base.rfind('/').ok_or("DATABASE_URL has no database name")?];
    let url = if query.is_empty() { format!("{base}/{dbname}") } else { format!("{base}/{dbname}?{query}") };
    let db = DbConfig::parse(&url)?.with_statement_timeout(None);
    let s = SchemaName::new("outbox")?;
    schema::migrate(&mut db.connect().await?, &s, Some(16)).await?;
    let topic = ctx.topic(&format!("held{name}"), 4).await?;
    let mut holder = db.connect().await?;
    let held = if hold {
        let tx =
            holder.build_transaction().isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        tx.query_one("SELECT count(*) FROM pg_class", &[]).await?;
        Some(tx)
    } else {
        None
    };
    let mut rc = ctx.relay_config(&s);
    rc.db = db.clone();
    rc.archive = true;
    let relay = start_relay(rc);
    relay.wait_lanes(16).await;
    let n = (rate * total.as_secs_f64()) as usize;
    let writers = tokio::spawn({
        let (db, s, topic) = (db.clone(), s.clone(), topic.clone());
        async move {
            paced_writers_on(&db, &s, &topic, rate, n, 4, |i, _| {
                format!(
                    "{{\"order\":{i},\"customer\":\"c-{}\",\"amount_cents\":{},\"note\":\"{}\"}}",
                    i % 997,
                    i * 37 % 9_900,
                    "x".repeat(120)
                )
            })
            .await
        }
    });
    // A late row: its transaction takes its sequence number halfway through the run and commits a
    // second later, after about `rate` later rows went out; how long after its commit it is acked.
    let late = tokio::spawn({
        let (db, s, topic) = (db.clone(), s.clone(), topic.clone());
        async move {
            tokio::time::sleep(total / 2).await;
            let mut c = db.connect().await?;
            let tx = c.transaction().await?;
            let id: Uuid = tx
                .query_one(&s.qualify("SELECT __SCHEMA__.enqueue($1, 'late-probe', '\\x01')"), &[&topic])
                .await?
                .get(0);
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.commit().await?;
            let committed = chrono::Utc::now();
            Ok::<(Uuid, chrono::DateTime<chrono::Utc>), Box<dyn std::error::Error + Send + Sync>>((id, committed))
        }
    });
    let observer = db.connect().await?;
    let mut windows = Vec::new();
    let started = Instant::now();
    let (mut claims0, mut micros0) = (0, 0);
    let mut next = started + window;
    while next <= started + total + Duration::from_millis(500) {
        tokio::time::sleep_until(next.into()).await;
        next += window;
        let claims = relay.stats.claims.load(Ordering::Relaxed);
        let micros = relay.stats.claim_micros.load(Ordering::Relaxed);
        let r = observer
            .query_one(
                "SELECT coalesce(n_dead_tup, 0), pg_relation_size(relid), pg_indexes_size(relid)
                 FROM pg_stat_user_tables WHERE relid = 'outbox.messages'::regclass",
                &[],
            )
            .await?;
        windows.push(ArmWindow {
            claims: claims - claims0,
            claim_micros: micros - micros0,
            dead_tuples: r.get(0),
            table_bytes: r.get(1),
            index_bytes: r.get(2),
        });
        (claims0, micros0) = (claims, micros);
    }
    let lag = writers.await??;
    let deadline = Instant::now() + Duration::from_secs(120);
    while observer.query_one("SELECT count(*) FROM outbox.messages", &[]).await?.get::<_, i64>(0) > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await?;
    if let Some(tx) = held {
        tx.rollback().await?;
    }
    let (late_id, late_committed) = late.await??;
    let late_ms: Option<f64> =
        observer.query_opt("SELECT delivered_at FROM outbox.delivered WHERE id = $1", &[&late_id]).await?.map(|r| {
            (r.get::<_, chrono::DateTime<chrono::Utc>>(0) - late_committed).num_microseconds().unwrap_or(0) as f64
                / 1000.0
        });
    // commit→ack per window of commit time: p50, p99 (ms) and rows.
    let per_window = observer
        .query(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY lat), percentile_disc(0.99) WITHIN GROUP (ORDER BY lat), count(*)
             FROM (SELECT floor(extract(epoch FROM created_at - min(created_at) OVER ())::float8 / $1::float8) AS w,
                          (extract(epoch FROM delivered_at - created_at) * 1000)::float8 AS lat
                   FROM outbox.delivered) d
             GROUP BY w ORDER BY w",
            &[&window.as_secs_f64()],
        )
        .await?
        .iter()
        .map(|r| (r.get::<_, f64>(0), r.get::<_, f64>(1), r.get::<_, i64>(2)))
        .collect();
    drop(observer);
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")).await?;
    Ok(ArmResult { windows, per_window, lag, late_ms })
}

/// Section 7: the same load on two databases at once, one with a REPEATABLE READ transaction held
/// open for the whole run; per window, commit→ack, claims and their mean time, dead tuples, and
/// the outbox's table and index sizes.
async fn held_snapshot(ctx: &mut Ctx, rate: f64, total: Duration, window: Duration) -> Res<()> {
    ctx.say(&format!(
        "\n## 7. Held snapshot ({rate:.0} msg/s on each of two databases at once, 16 lanes, 4 writers each, {} min; \
         one database has a REPEATABLE READ transaction open throughout)\n",
        total.as_secs() / 60
    ));
    let (free, held) = tokio::join!(
        held_snapshot_arm(ctx, "free", false, rate, total, window),
        held_snapshot_arm(ctx, "held", true, rate, total, window)
    );
    let (free, held) = (free?, held?);
    let (fw, fl, flag) = (&free.windows, &free.per_window, &free.lag);
    let (hw, hl, hlag) = (&held.windows, &held.per_window, &held.lag);
    ctx.say("| window (min) | rows acked: free / held | commit→ack p50 / p99 (ms), no snapshot | held snapshot | p99 held / free | claims, mean claim time (µs): free / held | dead tuples: free / held | table + indexes (MB): free / held |");
    ctx.say("|---|---|---|---|---|---|---|---|");
    let mb = |w: &ArmWindow| (w.table_bytes + w.index_bytes) as f64 / 1e6;
    for i in 0..fw.len().min(hw.len()) {
        let (f, h) = (&fw[i], &hw[i]);
        let (fp, hp) = (fl.get(i).copied().unwrap_or_default(), hl.get(i).copied().unwrap_or_default());
        ctx.say(&format!(
            "| {:.1}–{:.1} | {} / {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} | {} , {:.0} / {} , {:.0} | {} / {} | {:.1} / {:.1} |",
            (i as f64) * window.as_secs_f64() / 60.0,
            (i as f64 + 1.0) * window.as_secs_f64() / 60.0,
            fp.2,
            hp.2,
            fp.0,
            fp.1,
            hp.0,
            hp.1,
            hp.1 / fp.1.max(0.001),
            f.claims,
            f.claim_micros as f64 / f.claims.max(1) as f64,
            h.claims,
            h.claim_micros as f64 / h.claims.max(1) as f64,
            f.dead_tuples,
            h.dead_tuples,
            mb(f),
            mb(h)
        ));
    }
    if let (Some(f), Some(h)) = (fw.last(), hw.last()) {
        ctx.say(&format!(
            "\nAt the end: outbox table {:.1} MB + indexes {:.1} MB without a snapshot, {:.1} MB + {:.1} MB with one. \
             Writer lag p99: {:.1} ms / {:.1} ms.",
            f.table_bytes as f64 / 1e6,
            f.index_bytes as f64 / 1e6,
            h.table_bytes as f64 / 1e6,
            h.index_bytes as f64 / 1e6,
            flag.value_at_quantile(0.99) as f64 / 1000.0,
            hlag.value_at_quantile(0.99) as f64 / 1000.0
        ));
    }
    let late = |ms: Option<f64>| ms.map_or("NOT DELIVERED".to_owned(), |m| format!("{m:.1} ms"));
    ctx.say(&format!(
        "\nA late row (its transaction took its sequence number halfway through and committed 1 s later, after \
         about {rate:.0} later rows): acknowledged {} after its commit without a snapshot, {} with one.",
        late(free.late_ms),
        late(held.late_ms)
    ));
    Ok(())
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
        peak = throughput(&mut ctx, n).await?;
    }

    // 2. Latency.
    if run(2) {
        let secs = if short { 8.0 } else { 20.0 };
        let writers_max = writer_capacity(&ctx).await?;
        let base = peak.min(writers_max);
        ctx.say(&format!(
        "\n## 2. Latency at a fixed write rate ({secs:.0} s each, open loop, 200 B, 8 writers; relay peak {peak:.0}/s, \
         8 writers commit at most {writers_max:.0}/s, so rates are shares of {base:.0}/s)\n"
    ));
        ctx.say("| rate | of peak | commit→ack recorded p50 / p99 / p99.9 / max (ms) | commit→effect p50 / p99 / p99.9 / max (ms) | writer lag p99 (ms) | effects |");
        ctx.say("|---|---|---|---|---|---|");
        for share in [0.25, 0.5, 0.75] {
            let rate = base * share;
            let (ack, effect, lag, applied) = latency_at(&ctx, rate, secs).await?;
            ctx.say(&format!(
                "| {rate:.0}/s | {:.0}% | {} | {} | {:.2} | {applied} |",
                share * 100.0,
                pct(&ack),
                pct(&effect),
                if lag.is_empty() { 0.0 } else { lag.value_at_quantile(0.99) as f64 / 1000.0 }
            ));
        }
    }
    // 3. Backlog drain.
    if run(3) {
        let drain_n = ctx.size(100_000, 500_000);
        ctx.say(&format!("\n## 3. Backlog drain ({drain_n} rows of 200 B written while the relay was stopped)\n"));
        let s = ctx.schema("drain", 16).await?;
        let topic = ctx.topic("drain", 4).await?;
        preload(&ctx, &s, &topic, drain_n, 200).await?;
        let mut rc = ctx.relay_config(&s);
        rc.archive = true;
        let started = Instant::now();
        let relay = start_relay(rc);
        let (db, s2, t2) = (ctx.db.clone(), s.clone(), topic.clone());
        let probe = tokio::spawn(async move {
            let c = db.connect().await?;
            let mut ids = Vec::new();
            for _ in 0..10_000 {
                let id: Uuid =
                    c.query_one(&s2.qualify("SELECT __SCHEMA__.enqueue($1, 'probe', '\\x01')"), &[&t2]).await?.get(0);
                ids.push(id);
                tokio::time::sleep(Duration::from_millis(50)).await;
                if c.query_one(&s2.qualify("SELECT count(*) FROM __SCHEMA__.messages"), &[]).await?.get::<_, i64>(0)
                    == 0
                {
                    break;
                }
            }
            Ok::<Vec<Uuid>, Box<dyn std::error::Error + Send + Sync>>(ids)
        });
        while backlog(&ctx, &s).await? > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drained = started.elapsed();
        let ids = probe.await??;
        relay.stop().await?;
        let mut during = Histogram::<u64>::new(3)?;
        for r in c.query(&s.qualify("SELECT (extract(epoch FROM delivered_at - created_at) * 1e6)::bigint FROM __SCHEMA__.delivered WHERE id = ANY($1)"), &[&ids]).await? {
        during.record(r.get::<_, i64>(0).max(1) as u64)?;
    }
        ctx.say(
            "| rows | drain time (s) | rows/s | new rows during the drain: commit→ack p50 / p99 / p99.9 / max (ms) |",
        );
        ctx.say("|---|---|---|---|");
        ctx.say(&format!(
            "| {drain_n} | {:.2} | {:.0} | {} ({} rows) |",
            drained.as_secs_f64(),
            drain_n as f64 / drained.as_secs_f64(),
            pct(&during),
            during.len()
        ));
    }
    // 4. Inbox cost.
    if run(4) {
        let m = ctx.size(10_000, 40_000);
        ctx.say(&format!("\n## 4. Inbox cost ({m} records, 4 partitions; msg/s from the first record)\n"));
        ctx.say("| duplicates | no inbox (baseline) | per-message inbox | batch inbox (200) | per-message / baseline | batch / baseline |");
        ctx.say("|---|---|---|---|---|---|");
        for dup in [0.0, 0.5] {
            let none = inbox_rate(&ctx, "none", m, dup).await?;
            let single = inbox_rate(&ctx, "single", m, dup).await?;
            let batch = inbox_rate(&ctx, "batch", m, dup).await?;
            ctx.say(&format!(
                "| {:.0}% | {none:.0} | {single:.0} | {batch:.0} | {:.2} | {:.2} |",
                dup * 100.0,
                single / none,
                batch / none
            ));
        }
    }
    // 5. Scaling.
    if run(5) {
        let k = ctx.size(30_000, 150_000);
        ctx.say(&format!("\n## 5. Scaling ({k} rows of 200 B, 16 lanes, instances in one process on this machine)\n"));
        ctx.say("| instances | msg/s | vs 1 |");
        ctx.say("|---|---|---|");
        let mut one = 0.0;
        for instances in [1usize, 2, 4] {
            let s = ctx.schema(&format!("scale{instances}"), 16).await?;
            let topic = ctx.topic(&format!("scale{instances}"), 4).await?;
            let r = relay_rate(&ctx, &s, &topic, k, 200, instances).await?;
            if instances == 1 {
                one = r;
            }
            ctx.say(&format!("| {instances} | {r:.0} | {:.2} |", r / one));
        }
    }

    // 6. Gentle rates: work per row and latency where users feel it.
    if run(6) {
        gentle_rates(&mut ctx, if short { 10.0 } else { 20.0 }).await?;
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
        held_snapshot(&mut ctx, rate, total, total / 10).await?;
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
