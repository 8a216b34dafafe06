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

/// Sessions of each of `instances` (named `outbox-relay <instance> <job>`), in that order.
async fn sessions_of(c: &tokio_postgres::Client, instances: &[Uuid]) -> Res<Vec<i64>> {
    let mut out = Vec::with_capacity(instances.len());
    for id in instances {
        let like = format!("outbox-relay {id} %");
        out.push(
            c.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1", &[&like]).await?.get(0),
        );
    }
    Ok(out)
}

/// Starts an instance serving `specs`.
fn start_instance(base: &relay::RelayConfig, specs: Vec<OutboxSpec>) -> (Uuid, Instance) {
    let mut config = base.clone();
    config.instance_id = Uuid::now_v7();
    let id = config.instance_id;
    let (stop, stats) = (CancellationToken::new(), Arc::new(RelayStats::default()));
    let task = tokio::spawn(relay::run_fleet(config, specs, Vec::new(), stop.clone(), stats.clone()));
    (id, Instance { stop, stats, task })
}

/// One round: single rows into the idle tenants from when `busy`'s backlog begins to be written
/// until it is drained; their commit→ack, the writer's lag, and how long writing and draining took.
async fn round_with_backlog(
    ctx: &Ctx,
    c: &tokio_postgres::Client,
    idle: &[SchemaName],
    idle_topic: &str,
    busy: &SchemaName,
    busy_topic: &str,
    backlog: usize,
) -> Res<Round> {
    let stop = CancellationToken::new();
    let writer = {
        let (db, idle, topic, stop) = (ctx.db.clone(), idle.to_vec(), idle_topic.to_owned(), stop.clone());
        tokio::spawn(async move { idle_tenant_rows(&db, &idle, &topic, 20.0, 1_000_000, &stop).await })
    };
    let began = Instant::now();
    preload(ctx, busy, busy_topic, backlog, 200).await?;
    let loaded = began.elapsed();
    while pending_rows(c, busy).await? > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = began.elapsed();
    stop.cancel();
    let written = writer.await??;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h = latency_of(c, &written).await?;
    let lag = written.iter().map(|(_, w)| w.lag_p99_ms()).fold(0.0, f64::max);
    Ok(Round { h, lag, loaded, drained })
}

/// What one round measured.
struct Round {
    h: Histogram<u64>,
    lag: f64,
    loaded: Duration,
    drained: Duration,
}

impl Round {
    fn p99_ms(&self) -> f64 {
        self.h.value_at_quantile(0.99) as f64 / 1000.0
    }

    fn row(&self, phase: &str, spread: (f64, f64), backlog: usize) -> String {
        format!(
            "| {phase} (median of 3 by p99; p99 spread {:.1}–{:.1} ms) | {} rows | {} | {:.1} | {backlog} written in {:.1} s, \
             empty {:.1} s after the writing began |",
            spread.0,
            spread.1,
            self.h.len(),
            pct(&self.h),
            self.lag,
            self.loaded.as_secs_f64(),
            self.drained.as_secs_f64()
        )
    }
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
/// `backlog`-row backlog on the same instances ("shared"), and, as the baseline of the same
/// round, while a tenant of two other instances of their own drains one ("apart"): same machine,
/// same load, only the instances (sessions, producer) are not shared. Three rounds.
pub(super) async fn many_tenants(ctx: &mut Ctx, tenants: usize, backlog: usize, budget: u16) -> Res<()> {
    ctx.say(&format!(
        "\n## 11. Many outboxes ({tenants} tenant schemas of 16 lanes, 2 instances in one process, `--max-sessions {budget}`)\n"
    ));
    let setup = Instant::now();
    let mut schemas = Vec::with_capacity(tenants);
    for i in 0..tenants {
        schemas.push(ctx.schema(&format!("tenant{i}"), 16).await?);
    }
    let apart = ctx.schema("tenantapart", 16).await?;
    eprintln!("fleet: {} schemas migrated in {:.1} s", tenants + 1, setup.elapsed().as_secs_f64());
    let busy_topic = ctx.topic("tenants-busy", 4).await?;
    let idle_topic = ctx.topic("tenants-idle", 4).await?;
    let db = ctx.db.clone();
    let spec = |name: &str, s: &SchemaName| OutboxSpec {
        name: name.into(),
        db: db.clone(),
        schema: s.clone(),
        overrides: Default::default(),
    };
    let specs: Vec<OutboxSpec> = schemas.iter().map(|s| spec("tenants", s)).collect();
    let mut base = ctx.relay_config(&schemas[0]);
    base.archive = true;
    base.max_sessions = Some(budget);
    // The defaults, not the other sections' short timers: every outbox heartbeats on the
    // database's control session.
    base.heartbeat_interval = Duration::from_secs(1);
    base.instance_timeout = Duration::from_secs(5);
    if let Some(b) = std::env::var("BENCH_FLEET_BATCH").ok().and_then(|v| v.parse().ok()) {
        base.batch_size = b;
        ctx.say(&format!("`--batch-size {b}` on every instance.\n"));
    }
    // BENCH_FLEET_PRODUCER="name=value,...": librdkafka properties of every instance (`-X`).
    if let Ok(props) = std::env::var("BENCH_FLEET_PRODUCER") {
        for p in props.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').ok_or_else(|| format!("BENCH_FLEET_PRODUCER: {p:?} is not name=value"))?;
            base.producer.properties.push((k.to_owned(), v.to_owned()));
        }
        ctx.say(&format!("Producer properties of every instance: `{props}`.\n"));
    }
    let start = Instant::now();
    let (ids, instances): (Vec<Uuid>, Vec<Instance>) = (0..4)
        .map(|i| {
            if i < 2 {
                start_instance(&base, specs.clone())
            } else {
                start_instance(&base, vec![spec("apart", &apart)])
            }
        })
        .unzip();
    let c = ctx.db.connect().await?;
    let want = ((tenants + 1) * 16) as i64;
    loop {
        let held = lane_locks(&c).await?;
        if held >= want {
            break;
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err(format!("the instances took {held} of {want} lanes in 300 s").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = start.elapsed();
    // The instances balance: wait until neither holds more than its half.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sessions = sessions_of(&c, &ids[..2]).await?;
    let lanes_each: Vec<u64> = instances[..2].iter().map(|i| i.stats.lanes_acquired.load(Ordering::Relaxed)).collect();
    ctx.say(&format!(
        "All {} lanes held {:.1} s after start (lanes acquired per instance, counting takeovers: {lanes_each:?}). \
         PostgreSQL sessions per instance (`pg_stat_activity`, all jobs: {budget} lane sessions at most, plus control, \
         background and LISTEN): **{sessions:?}**, against {} with a session per lane and per outbox.\n",
        tenants * 16,
        took.as_secs_f64(),
        tenants * (8 + 2),
    ));
    ctx.say(
        "Two more instances in the same process serve one more tenant, `apart`, alone: the baseline. Each round \
         writes a backlog into tenant 0 (on the idle tenants' instances: **shared**), then one into `apart` \
         (**apart**: the same machine and load, other sessions and another producer), and single rows go into idle \
         tenants throughout. The ratio shared/apart of the round's p99 says what sharing costs an idle tenant, \
         apart from what the machine's saturation costs it.\n",
    );
    ctx.say("| phase | single rows into idle tenants (20/s) | commit→ack p50 / p99 / p99.9 / max (ms) | writer lag p99 (ms) | backlog |");
    ctx.say("|---|---|---|---|---|");
    let idle: Vec<SchemaName> = schemas[1..].to_vec();
    let n = (20.0 * ctx.window.as_secs_f64()) as usize;
    let quiet = idle_tenant_rows(&ctx.db, &idle, &idle_topic, 20.0, n, &CancellationToken::new()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h = latency_of(&c, &quiet).await?;
    let lag = quiet.iter().map(|(_, w)| w.lag_p99_ms()).fold(0.0, f64::max);
    ctx.say(&format!("| no backlog anywhere (10 s) | {} rows | {} | {lag:.1} | |", h.len(), pct(&h)));
    let (mut shared, mut alone, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let s = round_with_backlog(ctx, &c, &idle, &idle_topic, &schemas[0], &busy_topic, backlog).await?;
        let a = round_with_backlog(ctx, &c, &idle, &idle_topic, &apart, &busy_topic, backlog).await?;
        eprintln!(
            "fleet: round {round}: idle rows shared {} (drained in {:.1} s), apart {} (drained in {:.1} s)",
            pct(&s.h),
            s.drained.as_secs_f64(),
            pct(&a.h),
            a.drained.as_secs_f64()
        );
        ratios.push(s.p99_ms() / a.p99_ms().max(0.001));
        shared.push(s);
        alone.push(a);
    }
    let (s, s_lo, s_hi) = median_of_3(shared, Round::p99_ms);
    let (a, a_lo, a_hi) = median_of_3(alone, Round::p99_ms);
    let (r, r_lo, r_hi) = median_of_3(ratios, |r| *r);
    ctx.say(&s.row("**shared**: tenant 0's backlog on the same instances", (s_lo, s_hi), backlog));
    ctx.say(&a.row("**apart**: `apart`'s backlog on instances of its own", (a_lo, a_hi), backlog));
    ctx.say(&format!(
        "\nIdle tenants' p99, shared / apart in the same round: **{r:.2}** (median of 3; spread {r_lo:.2}–{r_hi:.2}).\n"
    ));
    for i in instances {
        i.stop.cancel();
        i.task.await??;
    }
    for s in schemas.iter().chain([&apart]) {
        ctx.forget(s, &[]).await?;
    }
    ctx.delete_topics(&[&busy_topic, &idle_topic]).await?;
    Ok(())
}
