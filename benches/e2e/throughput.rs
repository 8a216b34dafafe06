//! Sections 1 (throughput against the baselines) and 5 (scaling) of the e2e benchmarks (see
//! main.rs). Every rate is measured over a window of `Ctx::window` (10 s in full mode) after a
//! second of warm-up, three times; tables give the median and the spread.

use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::*;

/// A rate measured over a window, and whether the rows ran out before the window ended (then the
/// rate is over the time it took).
#[derive(Clone, Copy)]
pub(super) struct Rate {
    pub(super) per_s: f64,
    pub(super) ran_out: bool,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0}{}", self.per_s, if self.ran_out { "*" } else { "" })
    }
}

/// Counts `done` over the window after the warm-up, or until `left` says nothing is left.
async fn windowed<F, G, Fut>(ctx: &Ctx, done: F, left: G) -> Res<Rate>
where
    F: Fn() -> u64,
    G: Fn() -> Fut,
    Fut: std::future::Future<Output = Res<bool>>,
{
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start, n0) = (Instant::now(), done());
    let mut ran_out = false;
    while start.elapsed() < ctx.window {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !left().await? {
            ran_out = true;
            break;
        }
    }
    Ok(Rate { per_s: (done() - n0) as f64 / start.elapsed().as_secs_f64(), ran_out })
}

/// Raw PostgreSQL: the relay's own claim and delete statements, one session per lane, no Kafka,
/// over `n` preloaded rows.
pub(super) async fn claim_delete_rate(ctx: &Ctx, s: &SchemaName, lanes: i16) -> Res<Rate> {
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(lanes as usize));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let (db, s, done, running, stop) = (ctx.db.clone(), s.clone(), done.clone(), running.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let c = db.connect().await?;
            let claim = c.prepare(&s.qualify(include_str!("../../src/sql/claim.sql"))).await?;
            let delete = c.prepare(&s.qualify(include_str!("../../src/sql/delete_acked.sql"))).await?;
            // From a cursor, as the relay's lanes claim.
            let mut from = i64::MIN;
            // The transactions already looked below for, as the relay's lanes remember them.
            let mut looked: Vec<i64> = Vec::new();
            while !stop.is_cancelled() {
                let rows = c.query(&claim, &[&lane, &1000i64, &from, &i64::MAX, &looked]).await?;
                if rows.is_empty() {
                    break;
                }
                for x in rows.iter().filter_map(|r| r.get::<_, Option<i64>>("xid")) {
                    if !looked.contains(&x) {
                        looked.push(x);
                    }
                }
                let keep = looked.len().saturating_sub(32);
                looked.drain(..keep);
                let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                from = seqs[seqs.len() - 1] + 1;
                c.execute(&delete, &[&lane, &seqs]).await?;
                done.fetch_add(seqs.len() as u64, Ordering::Relaxed);
            }
            running.fetch_sub(1, Ordering::Relaxed);
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    let rate = windowed(
        ctx,
        || done.load(Ordering::Relaxed),
        || async { Ok(running.load(Ordering::Relaxed) == lanes as usize) },
    )
    .await?;
    stop.cancel();
    for t in tasks {
        t.await??;
    }
    Ok(rate)
}

/// Counts delivery reports: the fastest way librdkafka reports, one callback per record.
#[derive(Default)]
struct CountingContext {
    acked: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    /// Bytes sent to the brokers so far, from librdkafka's statistics (when they are on).
    tx_bytes: std::sync::atomic::AtomicI64,
}

impl ClientContext for CountingContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.tx_bytes.store(statistics.tx_bytes, Ordering::Relaxed);
    }
}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Raw broker: the same records (envelope headers included) from one thread, pipelined, reports
/// by callback, no PostgreSQL. Also returns the bytes sent to the broker per record (requests
/// included, so after compression).
pub(super) async fn produce_rate(ctx: &Ctx, topic: &str, payloads: Arc<Vec<Vec<u8>>>) -> Res<(Rate, f64)> {
    let mut properties = ctx.tuning_properties();
    properties.push(("statistics.interval.ms".into(), "500".into()));
    let settings = outbox_relay::relay::kafka::ProducerSettings {
        brokers: ctx.brokers.clone(),
        message_timeout: Duration::from_secs(30),
        properties,
    };
    let producer: Arc<ThreadedProducer<CountingContext>> =
        Arc::new(settings.client_config()?.create_with_context(CountingContext::default())?);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (producer, stop, topic) = (producer.clone(), stop.clone(), topic.to_owned());
        std::thread::spawn(move || {
            let mut row = bench_row(&topic);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                row.id = Uuid::now_v7();
                let key = format!("key-{}", i % 1000);
                let headers = envelope::headers(&row, "/bench");
                let mut record =
                    BaseRecord::to(&topic).key(key.as_bytes()).payload(payloads[i % payloads.len()].as_slice());
                // BENCH_NO_HEADERS=1 measures what the envelope headers cost the broker path.
                if std::env::var_os("BENCH_NO_HEADERS").is_none() {
                    record = record.headers(headers);
                }
                while let Err((_, r)) = producer.send(record) {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                i += 1;
            }
        })
    };
    let ctx_ref = producer.context().clone();
    let rate = windowed(ctx, || ctx_ref.acked.load(Ordering::Relaxed), || async { Ok(true) }).await?;
    stop.store(true, Ordering::Relaxed);
    sender.join().map_err(|_| "the produce-alone sender panicked")?;
    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(60))).await??;
    if ctx_ref.failed.load(Ordering::Relaxed) > 0 {
        return Err(format!("{} records failed in produce-alone", ctx_ref.failed.load(Ordering::Relaxed)).into());
    }
    // One more statistics tick after the flush counts the last requests.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let per_record =
        ctx_ref.tx_bytes.load(Ordering::Relaxed) as f64 / ctx_ref.acked.load(Ordering::Relaxed).max(1) as f64;
    Ok((rate, per_record))
}

/// A row the envelope can be built from (for produce-alone).
pub(super) fn bench_row(topic: &str) -> ClaimedRow {
    ClaimedRow {
        lane: 0,
        seq: 0,
        id: Uuid::now_v7(),
        topic: topic.to_owned(),
        key: None,
        payload: None.into(),
        headers: Vec::new(),
        malformed: None,
        message_type: None,
        content_type: Some("application/json".into()),
        correlation_id: None,
        traceparent: None,
        created_at: chrono::Utc::now(),
        attempts: 0,
        waiting: false,
        wait_ms: 0,
        age_ms: 0,
        xid: None,
    }
}

/// The relay draining preloaded rows: its rate over the window once it has its lanes.
pub(super) async fn relay_rate(ctx: &Ctx, s: &SchemaName, instances: usize) -> Res<Rate> {
    let relays: Vec<Running> = (0..instances).map(|_| start_relay(ctx.relay_config(s))).collect();
    for r in &relays {
        r.wait_lanes(1).await;
    }
    let total = || relays.iter().map(|r| r.stats.delivered.load(Ordering::Relaxed)).sum::<u64>();
    let c = ctx.db.connect().await?;
    let rate = windowed(ctx, total, || async { Ok(pending_rows(&c, s).await? > 0) }).await?;
    for r in relays {
        r.stop().await?;
    }
    Ok(rate)
}

/// Rows to preload so that a path measured at about `rate` rows/s does not run out within the
/// warm-up and the window.
fn rows_for(ctx: &Ctx, rate: f64) -> usize {
    ((rate * (ctx.window.as_secs_f64() + 2.0)) as usize).max(10_000)
}

/// Section 1: throughput at 200 B and 2 KiB against both baselines, three runs each; returns the
/// relay's median rate at 200 B.
pub(super) async fn throughput(ctx: &mut Ctx) -> Res<f64> {
    ctx.say(&format!(
        "## 1. Throughput (16 lanes, 4 partitions; each rate over {:.0} s after 1 s of warm-up; median of 3, spread)\n",
        ctx.window.as_secs_f64()
    ));
    ctx.say("| payload | claim+delete alone (msg/s) | produce alone (msg/s) | relay (msg/s) | relay / min(both), median run | ratio of the 3 runs |");
    ctx.say("|---|---|---|---|---|---|");
    let mut peak = 0.0;
    for size in [200usize, 2048] {
        // A first short claim+delete run sizes the preloads.
        let probe = ctx.schema(&format!("probe{size}"), 16).await?;
        let probe_topic = ctx.topic(&format!("probe{size}"), 4).await?;
        preload(ctx, &probe, &probe_topic, 50_000, size).await?;
        let sample: Arc<Vec<Vec<u8>>> = Arc::new(
            ctx.db
                .connect()
                .await?
                .query(&probe.qualify("SELECT payload FROM __SCHEMA__.messages LIMIT 1000"), &[])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        );
        let mean = sample.iter().map(Vec::len).sum::<usize>() / sample.len().max(1);
        ctx.forget(&probe, &[&probe_topic]).await?;
        let mut runs = Vec::new();
        let mut cd_guess = 150_000.0f64;
        for run in 0..3 {
            let s = ctx.schema(&format!("cd{size}r{run}"), 16).await?;
            let topic = ctx.topic(&format!("cd{size}r{run}"), 4).await?;
            preload(ctx, &s, &topic, rows_for(ctx, cd_guess), size).await?;
            let cd = claim_delete_rate(ctx, &s, 16).await?;
            ctx.forget(&s, &[]).await?;
            let prod_topic = ctx.topic(&format!("prod{size}r{run}"), 4).await?;
            let (prod, _) = produce_rate(ctx, &prod_topic, sample.clone()).await?;
            ctx.delete_topics(&[&prod_topic]).await?;
            let s2 = ctx.schema(&format!("relay{size}r{run}"), 16).await?;
            preload(ctx, &s2, &topic, rows_for(ctx, prod.per_s.min(cd.per_s) * 1.1), size).await?;
            let rl = relay_rate(ctx, &s2, 1).await?;
            ctx.forget(&s2, &[&topic]).await?;
            cd_guess = cd.per_s * 1.2;
            runs.push((cd, prod, rl));
        }
        let ratio = |r: &(Rate, Rate, Rate)| r.2.per_s / r.0.per_s.min(r.1.per_s);
        let ratios: Vec<String> = runs.iter().map(|r| format!("{:.2}", ratio(r))).collect();
        let (m, _, _) = median_of_3(runs, ratio);
        if size == 200 {
            peak = m.2.per_s;
        }
        ctx.say(&format!(
            "| {size} B (JSON, mean {mean} B) | {} | {} | {} | **{:.2}** | {} |",
            m.0,
            m.1,
            m.2,
            ratio(&m),
            ratios.join(", ")
        ));
    }
    ctx.say("\n(* the rows ran out before the window ended: the rate is over the time they lasted.)");
    Ok(peak)
}

/// Payloads as the relay would send them: `n` rows of `size`-byte order JSON, read back from a
/// scratch schema.
async fn sample_payloads(ctx: &Ctx, size: usize, n: usize) -> Res<Arc<Vec<Vec<u8>>>> {
    let probe = ctx.schema(&format!("sample{size}"), 1).await?;
    preload(ctx, &probe, "sample", n, size).await?;
    let rows = ctx.db.connect().await?.query(&probe.qualify("SELECT payload FROM __SCHEMA__.messages"), &[]).await?;
    ctx.forget(&probe, &[]).await?;
    Ok(Arc::new(rows.iter().map(|r| r.get(0)).collect()))
}

/// Section 10: the producer's `compression.type` (none, lz4, zstd) on order JSON at 200 B and
/// 2 KiB: produce alone (rate, bytes sent per record) and the relay draining a backlog, the
/// codecs interleaved within each of three rounds so that the machine's drift hits them alike.
pub(super) async fn compression(ctx: &mut Ctx) -> Res<()> {
    ctx.say(&format!(
        "\n## 10. Compression (16 lanes, 4 partitions; rates over {:.0} s after 1 s of warm-up; median of 3 rounds, spread)\n",
        ctx.window.as_secs_f64()
    ));
    ctx.say("| payload | compression.type | produce alone (msg/s) | bytes sent per record | relay (msg/s) | relay vs none, median (3 rounds) |");
    ctx.say("|---|---|---|---|---|---|");
    const CODECS: [&str; 3] = ["none", "lz4", "zstd"];
    for (size, guess) in [(200usize, 60_000.0f64), (2048, 30_000.0)] {
        let sample = sample_payloads(ctx, size, 1000).await?;
        let mean = sample.iter().map(Vec::len).sum::<usize>() / sample.len().max(1);
        // runs[codec][round] = (produce alone, bytes per record, relay)
        let mut runs: Vec<Vec<(Rate, f64, Rate)>> = vec![Vec::new(); CODECS.len()];
        let mut guess = [guess; 3];
        for round in 0..3 {
            for (i, codec) in CODECS.iter().enumerate() {
                ctx.codec = Some(codec.to_string());
                let prod_topic = ctx.topic(&format!("cprod{size}{codec}r{round}"), 4).await?;
                let (prod, bytes) = produce_rate(ctx, &prod_topic, sample.clone()).await?;
                ctx.delete_topics(&[&prod_topic]).await?;
                let s = ctx.schema(&format!("crelay{size}{codec}r{round}"), 16).await?;
                let topic = ctx.topic(&format!("crelay{size}{codec}r{round}"), 4).await?;
                preload(ctx, &s, &topic, rows_for(ctx, guess[i] * 1.2), size).await?;
                ctx.quiesce().await?;
                let rl = relay_rate(ctx, &s, 1).await?;
                ctx.forget(&s, &[&topic]).await?;
                guess[i] = rl.per_s;
                eprintln!("compression {size} B {codec} round {round}: produce {prod} msg/s, {bytes:.0} B/record, relay {rl} msg/s");
                runs[i].push((prod, bytes, rl));
            }
        }
        ctx.codec = None;
        for (i, codec) in CODECS.iter().enumerate() {
            let vs_none: Vec<f64> = (0..3).map(|r| runs[i][r].2.per_s / runs[0][r].2.per_s).collect();
            let mut sorted = vs_none.clone();
            sorted.sort_by(f64::total_cmp);
            let (prod, plo, phi) = median_of_3(runs[i].clone(), |r| r.0.per_s);
            let (rl, rlo, rhi) = median_of_3(runs[i].clone(), |r| r.2.per_s);
            let (by, _, _) = median_of_3(runs[i].clone(), |r| r.1);
            ctx.say(&format!(
                "| {size} B (mean {mean} B) | {codec} | {} ({plo:.0}–{phi:.0}) | {:.0} | {} ({rlo:.0}–{rhi:.0}) | **{:.2}** ({:.2}–{:.2}) |",
                prod.0, by.1, rl.2, sorted[1], sorted[0], sorted[2]
            ));
        }
    }
    Ok(())
}

/// Section 5: 1, 2 and 4 relay instances on one database.
pub(super) async fn scaling(ctx: &mut Ctx, per_instance_guess: f64) -> Res<()> {
    ctx.say(&format!(
        "\n## 5. Scaling (200 B, 16 lanes, instances in one process on this machine; rate over {:.0} s)\n",
        ctx.window.as_secs_f64()
    ));
    ctx.say("| instances | msg/s | vs 1 |");
    ctx.say("|---|---|---|");
    let mut one = 0.0;
    for instances in [1usize, 2, 4] {
        let s = ctx.schema(&format!("scale{instances}"), 16).await?;
        let topic = ctx.topic(&format!("scale{instances}"), 4).await?;
        preload(ctx, &s, &topic, rows_for(ctx, per_instance_guess * 1.3), 200).await?;
        let r = relay_rate(ctx, &s, instances).await?;
        ctx.forget(&s, &[&topic]).await?;
        if instances == 1 {
            one = r.per_s;
        }
        ctx.say(&format!("| {instances} | {r} | {:.2} |", r.per_s / one));
    }
    Ok(())
}
