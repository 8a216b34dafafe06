//! Sections 2 (sustained peak, latency at half of it, commit→effect), 3 (backlog drain) and 6
//! (gentle rates) of the e2e benchmarks (see main.rs). Every latency is measured from the row's
//! commit (`track_commit_timestamp`): to the broker's acknowledgement (the archive's
//! `delivered_at`), and to the commit of the consumer's effect.

use super::*;

/// The consumer's effect: one row per message, committed with the inbox record.
pub(super) struct Effects(pub(super) String);

impl Handler for Effects {
    fn handle<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>, m: &'a ConsumedMessage) -> HandlerFuture<'a> {
        Box::pin(async move {
            tx.execute(&format!("INSERT INTO {} VALUES ($1)", self.0), &[&m.id]).await?;
            Ok(())
        })
    }
}

/// One paced run against a running relay: what it cost and how long rows waited.
pub(super) struct PacedRun {
    /// Claims run per delivered row.
    pub(super) claims_per_row: f64,
    pub(super) ack: Histogram<u64>,
    /// Commit to the consumer's effect (empty without a consumer).
    pub(super) effect: Histogram<u64>,
    pub(super) writes: Writes,
    /// The largest backlog seen during the run.
    pub(super) max_backlog: i64,
}

/// `rate` msg/s for `secs` from `w`, the relay running with `--archive` (16 lanes, 4 partitions);
/// with `consumer`, the inbox consumer applies every message. Waits for the outbox to drain.
pub(super) async fn paced_run(
    ctx: &Ctx,
    name: &str,
    rate: f64,
    secs: f64,
    w: Writers,
    consumer: bool,
) -> Res<PacedRun> {
    let s = ctx.schema(name, 16).await?;
    let topic = ctx.topic(name, 4).await?;
    let mut rc = ctx.relay_config(&s);
    rc.archive = true;
    let relay = start_relay(rc);
    relay.wait_lanes(16).await;
    let effects = format!("{}.effects", s.ident());
    let running_consumer = if consumer {
        ctx.db.connect().await?.batch_execute(&format!("CREATE TABLE {effects} (id uuid)")).await?;
        let mut cc = ConsumerConfig::new(
            ctx.brokers.clone(),
            format!("{name}-{}", ctx.run_id),
            vec![topic.clone()],
            "bench",
            s.clone(),
            ctx.db.clone(),
        );
        cc.batch_size = 200;
        if let Ok(v) = std::env::var("BENCH_FETCH_WAIT_MS") {
            cc.properties.push(("fetch.wait.max.ms".into(), v));
        }
        let stop = CancellationToken::new();
        let stats = Arc::new(ConsumerStats::default());
        let task = tokio::spawn(consumer::run(cc, Arc::new(Effects(effects.clone())), stop.clone(), stats.clone()));
        // Group join and partition assignment before the clock starts.
        let warm = Instant::now();
        while stats.processed.load(Ordering::Relaxed) == 0 && warm.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        Some((stop, stats, task))
    } else {
        tokio::time::sleep(Duration::from_millis(500)).await;
        None
    };
    let (claims0, delivered0) =
        (relay.stats.claims.load(Ordering::Relaxed), relay.stats.delivered.load(Ordering::Relaxed));
    let n = (rate * secs) as usize;
    let sampler = {
        let (db, s) = (ctx.db.clone(), s.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let c = db.connect().await?;
                let mut max = 0i64;
                while !stop.is_cancelled() {
                    max = max.max(pending_rows(&c, &s).await?);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Ok::<i64, Box<dyn std::error::Error + Send + Sync>>(max)
            }
        });
        (stop, task)
    };
    let writes = paced_writers(&ctx.db, &s, &topic, rate, n, w).await?;
    let c = ctx.db.connect().await?;
    let backlog_at_end = pending_rows(&c, &s).await?;
    sampler.0.cancel();
    let max_backlog = sampler.1.await??.max(backlog_at_end);
    let deadline = Instant::now() + Duration::from_secs(120);
    while pending_rows(&c, &s).await? > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let claims = relay.stats.claims.load(Ordering::Relaxed) - claims0;
    let delivered = relay.stats.delivered.load(Ordering::Relaxed) - delivered0;
    let mut effect = Histogram::<u64>::new(3)?;
    if let Some((stop, stats, task)) = running_consumer {
        let deadline = Instant::now() + Duration::from_secs(120);
        while stats.processed.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        task.await??;
        effect = commit_to_effect(&c, &effects, &writes).await?;
    }
    relay.stop().await?;
    let ack = commit_to_ack(&c, &s, &writes).await?;
    ctx.forget(&s, &[&topic]).await?;
    Ok(PacedRun { claims_per_row: claims as f64 / delivered.max(1) as f64, ack, effect, writes, max_backlog })
}

fn p99_ms(h: &Histogram<u64>) -> f64 {
    h.value_at_quantile(0.99) as f64 / 1000.0
}

/// Section 6: at 200/s and 1,000/s, claims per delivered row and commit→ack; three runs of `secs`
/// each, the median run by p99 and the spread of the three.
pub(super) async fn gentle_rates(ctx: &mut Ctx, secs: f64) -> Res<()> {
    let w = Writers::FSYNCED;
    ctx.say(&format!(
        "\n## 6. Gentle rates (16 lanes, 4 partitions, {}, JSON ~200 B; {secs:.0} s runs; median of 3 by p99, with the spread)\n",
        w.describe()
    ));
    ctx.say("| rate | claims per delivered row (3 runs) | commit→ack p50 / p99 / p99.9 / max (ms), median run | p99 of the 3 runs (ms) | writer lag p99 (ms) |");
    ctx.say("|---|---|---|---|---|");
    // BENCH_GENTLE_RATES=1000 picks rates (tuning runs).
    let rates: Vec<f64> = std::env::var("BENCH_GENTLE_RATES")
        .map(|v| v.split(',').filter_map(|r| r.parse().ok()).collect())
        .unwrap_or_else(|_| vec![200.0, 1000.0]);
    for rate in rates {
        let mut runs = Vec::new();
        for r in 0..3 {
            runs.push(paced_run(ctx, &format!("gentle{}r{r}", rate as u64), rate, secs, w, false).await?);
        }
        let claims: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.claims_per_row)).collect();
        let (median, lo, hi) = median_of_3(runs, |r| p99_ms(&r.ack));
        ctx.say(&format!(
            "| {rate:.0}/s | {} | {} | {lo:.1} – {hi:.1} | {:.2} |",
            claims.join(", "),
            pct(&median.ack),
            median.writes.lag_p99_ms()
        ));
    }
    Ok(())
}

/// Whether the relay kept up with an offered rate: the writers kept their schedule, and the
/// backlog stayed under a second of traffic.
fn kept_up(run: &PacedRun, rate: f64) -> bool {
    run.writes.lag_p99_ms() < 100.0 && (run.max_backlog as f64) < rate
}

/// Section 2: the sustained peak (the highest offered rate the relay keeps up with while the
/// writers run on this machine, found by doubling then bisecting), and commit→ack at half of it
/// (median of 3). Returns that half.
pub(super) async fn peak_and_latency(ctx: &mut Ctx, secs: f64) -> Res<f64> {
    // Fsync'd single-message commits from 16 sessions reach a few thousand per second here, far
    // below the relay's peak: the search's writers commit without waiting for the disk.
    let fast = Writers { sessions: 16, durable: false };
    ctx.say(&format!("\n## 2. Sustained peak and latency (16 lanes, 4 partitions, JSON ~200 B; {secs:.0} s runs)\n"));
    ctx.say(&format!(
        "Peak search ({}): a rate is kept up with when the writers keep their schedule (lag p99 < 100 ms) and the \
         backlog stays under one second of traffic.\n",
        fast.describe()
    ));
    ctx.say("| offered | kept up | max backlog | writer lag p99 (ms) | commit→ack p50 / p99 (ms) |");
    ctx.say("|---|---|---|---|---|");
    let (mut ok, mut bad) = (0.0f64, f64::INFINITY);
    let mut rate = 4000.0;
    for trial in 0..8 {
        let run = paced_run(ctx, &format!("peak{trial}"), rate, secs, fast, false).await?;
        let kept = kept_up(&run, rate);
        ctx.say(&format!(
            "| {rate:.0}/s | {} | {} | {:.1} | {:.2} / {:.2} |",
            if kept { "yes" } else { "no" },
            run.max_backlog,
            run.writes.lag_p99_ms(),
            run.ack.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms(&run.ack)
        ));
        if kept {
            ok = rate;
        } else {
            bad = rate;
        }
        rate = if bad.is_infinite() { rate * 2.0 } else { (ok + bad) / 2.0 };
        if bad.is_finite() && bad - ok < bad * 0.1 {
            break;
        }
    }
    ctx.say(&format!("\nSustained peak: **{ok:.0} msg/s** (the lowest rate not kept up with: {bad:.0}/s).\n"));

    let half = (ok / 2.0).max(100.0);
    ctx.say("| rate | writers | commit→ack p50 / p99 / p99.9 / max (ms), median of 3 by p99 | p99 of the 3 (ms) | writer lag p99 (ms) |");
    ctx.say("|---|---|---|---|---|");
    let mut runs = Vec::new();
    for r in 0..3 {
        runs.push(paced_run(ctx, &format!("half{r}"), half, secs, fast, false).await?);
    }
    let (median, lo, hi) = median_of_3(runs, |r| p99_ms(&r.ack));
    ctx.say(&format!(
        "| {half:.0}/s (50% of peak) | {} | {} | {lo:.1} – {hi:.1} | {:.2} |",
        fast.describe(),
        pct(&median.ack),
        median.writes.lag_p99_ms()
    ));

    Ok(half)
}

/// Section 8: commit→effect through the inbox consumer (batch 200) at 1,000/s (fsync'd writers)
/// and at `half_peak` (writers without synchronous commit); median of 3 by p99. BENCH_FETCH_WAIT_MS
/// tries another `fetch.wait.max.ms` for the consumer.
pub(super) async fn consumer_share(ctx: &mut Ctx, secs: f64, half_peak: Option<f64>) -> Res<()> {
    let fetch_wait = std::env::var("BENCH_FETCH_WAIT_MS").ok();
    ctx.say(&format!(
        "\n## 8. The consumer's share: commit→effect (the inbox consumer, batch 200, applies every message; \
         fetch.wait.max.ms {}; {secs:.0} s runs)\n",
        fetch_wait.as_deref().unwrap_or("default")
    ));
    ctx.say("| rate | writers | commit→ack p50 / p99 / p99.9 / max (ms) | commit→effect p50 / p99 / p99.9 / max (ms), median of 3 by p99 | p99 commit→effect of the 3 (ms) | writer lag p99 (ms) |");
    ctx.say("|---|---|---|---|---|---|");
    let fast = Writers { sessions: 16, durable: false };
    let mut rates = vec![(1000.0, Writers::FSYNCED)];
    rates.extend(half_peak.map(|h| (h, fast)));
    for (rate, w) in rates {
        let mut runs = Vec::new();
        for r in 0..3 {
            runs.push(paced_run(ctx, &format!("eff{}r{r}", rate as u64), rate, secs, w, true).await?);
        }
        let (median, lo, hi) = median_of_3(runs, |r| p99_ms(&r.effect));
        ctx.say(&format!(
            "| {rate:.0}/s | {} | {} | {} ({} applied) | {lo:.1} – {hi:.1} | {:.2} |",
            w.describe(),
            pct(&median.ack),
            pct(&median.effect),
            median.effect.len(),
            median.writes.lag_p99_ms()
        ));
    }
    Ok(())
}

/// Section 3: a backlog written while the relay was stopped, drained; and the latency of rows
/// written during the drain (one every 50 ms).
pub(super) async fn drain(ctx: &mut Ctx) -> Res<()> {
    let drain_n = ctx.size(100_000, 500_000);
    ctx.say(&format!(
        "\n## 3. Backlog drain ({drain_n} rows of ~200 B JSON written while the relay was stopped; median of 3)\n"
    ));
    ctx.say("| run | relay start to lanes taken (s) | drain time from lanes taken (s) | rows/s | new rows during the drain: commit→ack p50 / p99 / p99.9 / max (ms) |");
    ctx.say("|---|---|---|---|---|");
    let mut runs = Vec::new();
    for run in 0..3 {
        let s = ctx.schema(&format!("drain{run}"), 16).await?;
        let topic = ctx.topic(&format!("drain{run}"), 4).await?;
        preload(ctx, &s, &topic, drain_n, 200).await?;
        let mut rc = ctx.relay_config(&s);
        rc.archive = true;
        let launched = Instant::now();
        let relay = start_relay(rc);
        relay.wait_lanes(16).await;
        let started = Instant::now();
        let startup = started - launched;
        let probe = {
            let (db, s, topic) = (ctx.db.clone(), s.clone(), topic.clone());
            tokio::spawn(async move {
                let c = db.connect().await?;
                let stmt = c
                    .prepare(&s.qualify("SELECT __SCHEMA__.enqueue($1, 'probe', '\\x01'), pg_current_xact_id()::text"))
                    .await?;
                let mut w = Writes { lag: Histogram::<u64>::new(3)?, ids: Vec::new(), xids: Vec::new() };
                loop {
                    let r = c.query_one(&stmt, &[&topic]).await?;
                    w.ids.push(r.get(0));
                    w.xids.push(r.get(1));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if pending_rows(&c, &s).await? == 0 {
                        return Ok::<Writes, Box<dyn std::error::Error + Send + Sync>>(w);
                    }
                }
            })
        };
        let c = ctx.db.connect().await?;
        while pending_rows(&c, &s).await? > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drained = started.elapsed();
        let probes = probe.await??;
        relay.stop().await?;
        let during = commit_to_ack(&c, &s, &probes).await?;
        ctx.forget(&s, &[&topic]).await?;
        ctx.say(&format!(
            "| {} | {:.2} | {:.2} | {:.0} | {} ({} rows) |",
            run + 1,
            startup.as_secs_f64(),
            drained.as_secs_f64(),
            drain_n as f64 / drained.as_secs_f64(),
            pct(&during),
            during.len()
        ));
        runs.push(drained.as_secs_f64());
    }
    let (median, lo, hi) = median_of_3(runs, |d| *d);
    ctx.say(&format!(
        "\nMedian drain {median:.2} s ({:.0} rows/s), spread {lo:.2} – {hi:.2} s.",
        drain_n as f64 / median
    ));
    Ok(())
}
