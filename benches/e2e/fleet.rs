//! Section 11 of the e2e benchmarks (see main.rs): many tenant outboxes served by two instances
//! on a session budget, and a tenant with one new row while another drains a backlog.

use outbox_relay::relay::OutboxSpec;

use super::*;

/// One instance of the fleet, in this process.
struct Instance {
    stop: CancellationToken,
    stats: Arc<RelayStats>,
    task: tokio::task::JoinHandle<Result<Arc<RelayStats>, relay::RelayError>>,
}

/// Lane locks held on the database, by any instance.
async fn lane_locks(c: &tokio_postgres::Client) -> Res<i64> {
    Ok(c.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        &[],
    )
    .await?
    .get(0))
}

/// Sessions per instance (named `outbox-relay <instance> <job>`), largest first.
async fn sessions_per_instance(c: &tokio_postgres::Client) -> Res<Vec<i64>> {
    Ok(c.query(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'outbox-relay %-%'
         GROUP BY split_part(application_name, ' ', 2) ORDER BY 1 DESC",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// One session writes single-message transactions at `rate`, each into the next idle tenant,
/// `n` of them or until `stop`; returns per tenant what it wrote.
async fn idle_tenant_rows(
    db: &DbConfig,
    idle: &[SchemaName],
    topic: &str,
    rate: f64,
    n: usize,
    stop: &CancellationToken,
) -> Res<Vec<(SchemaName, Writes)>> {
    let c = db.connect().await?;
    let mut per: Vec<Writes> = (0..idle.len())
        .map(|_| Ok(Writes { lag: Histogram::<u64>::new(3)?, ids: Vec::new(), xids: Vec::new() }))
        .collect::<Res<_>>()?;
    let t0 = Instant::now() + Duration::from_millis(100);
    for i in 0..n {
        if stop.is_cancelled() {
            break;
        }
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let t = i % idle.len();
        let sql =
            idle[t].qualify("SELECT __SCHEMA__.enqueue_json($1, $2, $3::text::jsonb), pg_current_xact_id()::text");
        let row = c.query_one(&sql, &[&topic, &format!("key-{i}"), &order_event(i)]).await?;
        per[t].lag.record(Instant::now().saturating_duration_since(due).as_micros().max(1) as u64)?;
        per[t].ids.push(row.get(0));
        per[t].xids.push(row.get(1));
    }
    Ok(idle.iter().cloned().zip(per).filter(|(_, w)| !w.ids.is_empty()).collect())
}

/// commit→ack of every row written, over all the tenants.
async fn latency_of(c: &tokio_postgres::Client, written: &[(SchemaName, Writes)]) -> Res<Histogram<u64>> {
    let mut all = Histogram::<u64>::new(3)?;
    for (s, w) in written {
        all.add(commit_to_ack(c, s, w).await?)?;
    }
    Ok(all)
}

/// Section 11: `tenants` schemas of 16 lanes, two instances of `budget` lane sessions each; a
/// single row now and then into idle tenants, first alone, then while tenant 0 drains a
/// `backlog`-row backlog (three rounds).
pub(super) async fn many_tenants(ctx: &mut Ctx, tenants: usize, backlog: usize, budget: u16) -> Res<()> {
    ctx.say(&format!(
        "\n## 11. Many outboxes ({tenants} tenant schemas of 16 lanes, 2 instances in one process, `--max-sessions {budget}`)\n"
    ));
    let setup = Instant::now();
    let mut schemas = Vec::with_capacity(tenants);
    for i in 0..tenants {
        schemas.push(ctx.schema(&format!("tenant{i}"), 16).await?);
    }
    eprintln!("fleet: {tenants} schemas migrated in {:.1} s", setup.elapsed().as_secs_f64());
    let busy_topic = ctx.topic("tenants-busy", 4).await?;
    let idle_topic = ctx.topic("tenants-idle", 4).await?;
    let specs: Vec<OutboxSpec> = schemas
        .iter()
        .map(|s| OutboxSpec {
            name: "tenants".into(),
            db: ctx.db.clone(),
            schema: s.clone(),
            overrides: Default::default(),
        })
        .collect();
    let mut base = ctx.relay_config(&schemas[0]);
    base.archive = true;
    base.max_sessions = Some(budget);
    // The defaults, not the other sections' short timers: every outbox heartbeats on the
    // database's control session.
    base.heartbeat_interval = Duration::from_secs(1);
    base.instance_timeout = Duration::from_secs(5);
    let start = Instant::now();
    let instances: Vec<Instance> = (0..2)
        .map(|_| {
            let mut config = base.clone();
            config.instance_id = Uuid::now_v7();
            let (stop, stats) = (CancellationToken::new(), Arc::new(RelayStats::default()));
            let task = tokio::spawn(relay::run_fleet(config, specs.clone(), Vec::new(), stop.clone(), stats.clone()));
            Instance { stop, stats, task }
        })
        .collect();
    let c = ctx.db.connect().await?;
    let want = (tenants * 16) as i64;
    loop {
        let held = lane_locks(&c).await?;
        if held >= want {
            break;
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err(format!("the two instances took {held} of {want} lanes in 300 s").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = start.elapsed();
    // The instances balance: wait until neither holds more than its half.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sessions = sessions_per_instance(&c).await?;
    let lanes_each: Vec<u64> = instances.iter().map(|i| i.stats.lanes_acquired.load(Ordering::Relaxed)).collect();
    ctx.say(&format!(
        "All {want} lanes held {:.1} s after start (lanes acquired per instance, counting takeovers: {lanes_each:?}). \
         PostgreSQL sessions per instance (`pg_stat_activity`, all jobs: {budget} lane sessions at most, plus control, \
         background and LISTEN): **{sessions:?}**, against {} with a session per lane and per outbox.\n",
        took.as_secs_f64(),
        tenants * (8 + 2),
    ));
    ctx.say("| phase | single rows into idle tenants (20/s) | commit→ack p50 / p99 / p99.9 / max (ms) | writer lag p99 (ms) | backlog |");
    ctx.say("|---|---|---|---|---|");
    let idle: Vec<SchemaName> = schemas[1..].to_vec();
    let n = (20.0 * ctx.window.as_secs_f64()) as usize;
    let quiet = idle_tenant_rows(&ctx.db, &idle, &idle_topic, 20.0, n, &CancellationToken::new()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h = latency_of(&c, &quiet).await?;
    let lag = quiet.iter().map(|(_, w)| w.lag_p99_ms()).fold(0.0, f64::max);
    ctx.say(&format!("| no backlog anywhere (10 s) | {} rows | {} | {lag:.1} | |", h.len(), pct(&h)));
    let mut rounds = Vec::new();
    for round in 0..3 {
        // The idle tenants' rows go in from when the backlog's writing begins until it is drained.
        let stop = CancellationToken::new();
        let writer = {
            let (db, idle, topic, stop) = (ctx.db.clone(), idle.clone(), idle_topic.clone(), stop.clone());
            tokio::spawn(async move { idle_tenant_rows(&db, &idle, &topic, 20.0, 1_000_000, &stop).await })
        };
        let began = Instant::now();
        preload(ctx, &schemas[0], &busy_topic, backlog, 200).await?;
        let loaded = began.elapsed();
        while pending_rows(&c, &schemas[0]).await? > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drained = began.elapsed();
        stop.cancel();
        let written = writer.await??;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let h = latency_of(&c, &written).await?;
        let lag = written.iter().map(|(_, w)| w.lag_p99_ms()).fold(0.0, f64::max);
        eprintln!(
            "fleet: round {round}: {backlog} written in {:.1} s, drained {:.1} s after the first write; idle rows {}",
            loaded.as_secs_f64(),
            drained.as_secs_f64(),
            pct(&h)
        );
        rounds.push((h, lag, (loaded, drained)));
    }
    let p99s: Vec<f64> = rounds.iter().map(|(h, _, _)| h.value_at_quantile(0.99) as f64 / 1000.0).collect();
    let (lo, hi) = (p99s.iter().copied().fold(f64::MAX, f64::min), p99s.iter().copied().fold(0.0, f64::max));
    let ((h, lag, (loaded, drained)), _, _) = median_of_3(rounds, |r| r.0.value_at_quantile(0.99) as f64);
    ctx.say(&format!(
        "| while tenant 0's {backlog} rows are written and drained (median of 3 by p99; p99 spread {lo:.1}–{hi:.1} ms) \
         | {} rows | {} | {lag:.1} | written in {:.1} s, empty {:.1} s after the writing began |",
        h.len(),
        pct(&h),
        loaded.as_secs_f64(),
        drained.as_secs_f64()
    ));
    for i in instances {
        i.stop.cancel();
        i.task.await??;
    }
    for s in &schemas {
        ctx.forget(s, &[]).await?;
    }
    ctx.delete_topics(&[&busy_topic, &idle_topic]).await?;
    Ok(())
}
