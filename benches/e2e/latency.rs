//! Sections 2 (latency at shares of the peak), 3 (backlog drain) and 6 (gentle rates) of the e2e benchmarks (see main.rs).

use super::*;

pub(super) struct EffectTimes(String);

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
pub(super) async fn latency_at(
    ctx: &Ctx,
    rate: f64,
    secs: f64,
) -> Res<(Histogram<u64>, Histogram<u64>, Histogram<u64>, usize)> {
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
    let lag = paced_writers(&ctx.db, &s, &topic, rate, n, 8, move |_, due| {
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
pub(super) async fn gentle_rate(
    ctx: &Ctx,
    rate: f64,
    secs: f64,
    run: usize,
) -> Res<(f64, Histogram<u64>, Histogram<u64>)> {
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
    let lag = paced_writers(&ctx.db, &s, &topic, rate, n, 8, |i, _| {
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

/// How many single-message transactions per second 8 writers commit (closed loop, 3 s).
pub(super) async fn writer_capacity(ctx: &Ctx) -> Res<f64> {
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

/// Section 2: latency at 25, 50 and 75% of the lower of the relay's peak and what 8 writers commit.
pub(super) async fn latency(ctx: &mut Ctx, peak: f64) -> Res<()> {
    let short = ctx.short;
    let secs = if short { 8.0 } else { 20.0 };
    let writers_max = writer_capacity(ctx).await?;
    let base = peak.min(writers_max);
    ctx.say(&format!(
        "\n## 2. Latency at a fixed write rate ({secs:.0} s each, open loop, 200 B, 8 writers; relay peak {peak:.0}/s, \
         8 writers commit at most {writers_max:.0}/s, so rates are shares of {base:.0}/s)\n"
    ));
    ctx.say("| rate | of peak | commit→ack recorded p50 / p99 / p99.9 / max (ms) | commit→effect p50 / p99 / p99.9 / max (ms) | writer lag p99 (ms) | effects |");
    ctx.say("|---|---|---|---|---|---|");
    for share in [0.25, 0.5, 0.75] {
        let rate = base * share;
        let (ack, effect, lag, applied) = latency_at(ctx, rate, secs).await?;
        ctx.say(&format!(
            "| {rate:.0}/s | {:.0}% | {} | {} | {:.2} | {applied} |",
            share * 100.0,
            pct(&ack),
            pct(&effect),
            if lag.is_empty() { 0.0 } else { lag.value_at_quantile(0.99) as f64 / 1000.0 }
        ));
    }
    Ok(())
}

/// Section 3: a backlog written while the relay was stopped, drained; and the latency of rows
/// written during the drain.
pub(super) async fn drain(ctx: &mut Ctx) -> Res<()> {
    let c = ctx.db.connect().await?;
    let drain_n = ctx.size(100_000, 500_000);
    ctx.say(&format!("\n## 3. Backlog drain ({drain_n} rows of 200 B written while the relay was stopped)\n"));
    let s = ctx.schema("drain", 16).await?;
    let topic = ctx.topic("drain", 4).await?;
    preload(ctx, &s, &topic, drain_n, 200).await?;
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
            if c.query_one(&s2.qualify("SELECT count(*) FROM __SCHEMA__.messages"), &[]).await?.get::<_, i64>(0) == 0 {
                break;
            }
        }
        Ok::<Vec<Uuid>, Box<dyn std::error::Error + Send + Sync>>(ids)
    });
    while backlog(ctx, &s).await? > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed();
    let ids = probe.await??;
    relay.stop().await?;
    let mut during = Histogram::<u64>::new(3)?;
    for r in c.query(&s.qualify("SELECT (extract(epoch FROM delivered_at - created_at) * 1e6)::bigint FROM __SCHEMA__.delivered WHERE id = ANY($1)"), &[&ids]).await? {
        during.record(r.get::<_, i64>(0).max(1) as u64)?;
    }
    ctx.say("| rows | drain time (s) | rows/s | new rows during the drain: commit→ack p50 / p99 / p99.9 / max (ms) |");
    ctx.say("|---|---|---|---|");
    ctx.say(&format!(
        "| {drain_n} | {:.2} | {:.0} | {} ({} rows) |",
        drained.as_secs_f64(),
        drain_n as f64 / drained.as_secs_f64(),
        pct(&during),
        during.len()
    ));
    Ok(())
}

/// Section 6: at 200/s and 1,000/s, claims per delivered row and commit→ack, three runs of `secs`
/// each; the median run (by p99) and the spread of the three.
pub(super) async fn gentle_rates(ctx: &mut Ctx, secs: f64) -> Res<()> {
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
