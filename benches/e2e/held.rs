//! Section 7 (a snapshot held open) of the e2e benchmarks (see main.rs).

use super::*;

/// One arm of section 7: a database of its own (a held snapshot holds back cleanup only in its
/// own database), 16 lanes, paced writers, the relay with `--archive`; every `window` the claim
/// count and time, the outbox's dead tuples and its table and index sizes.
pub(super) struct ArmWindow {
    claims: u64,
    claim_micros: u64,
    dead_tuples: i64,
    table_bytes: i64,
    index_bytes: i64,
}

pub(super) struct ArmResult {
    windows: Vec<ArmWindow>,
    /// commit→ack p50, p99 (ms) and rows, per window of commit time.
    per_window: Vec<(f64, f64, i64)>,
    lag: Histogram<u64>,
    /// How long after its commit the late row was acknowledged (None: not delivered).
    late_ms: Option<f64>,
}

/// Each arm's writers: fsync'd single-message commits from two databases at once fell to about
/// 260/s per arm on this machine (writer lag of minutes), so the writers commit without waiting
/// for the disk; the relay's own statements are unchanged.
const HELD_WRITERS: Writers = Writers { sessions: 8, durable: false };

pub(super) async fn held_snapshot_arm(
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
        async move { paced_writers(&db, &s, &topic, rate, n, HELD_WRITERS).await }
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
    let writes = writers.await??;
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
    // commit→ack per window of commit time (track_commit_timestamp): p50, p99 (ms) and rows.
    let per_window = observer
        .query(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY lat), percentile_disc(0.99) WITHIN GROUP (ORDER BY lat), count(*)
             FROM (SELECT floor(extract(epoch FROM committed - min(committed) OVER ())::float8 / $1::float8) AS w,
                          (extract(epoch FROM delivered_at - committed) * 1000)::float8 AS lat
                   FROM (SELECT d.delivered_at, pg_xact_commit_timestamp(w.xid::xid) AS committed
                         FROM unnest($2::uuid[], $3::text[]) AS w(id, xid) JOIN outbox.delivered d USING (id)) c) d
             GROUP BY w ORDER BY w",
            &[&window.as_secs_f64(), &writes.ids, &writes.xids],
        )
        .await?
        .iter()
        .map(|r| (r.get::<_, f64>(0), r.get::<_, f64>(1), r.get::<_, i64>(2)))
        .collect();
    drop(observer);
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")).await?;
    Ok(ArmResult { windows, per_window, lag: writes.lag, late_ms })
}

/// Section 7: the same load on two databases at once, one with a REPEATABLE READ transaction held
/// open for the whole run; per window, commit→ack, claims and their mean time, dead tuples, and
/// the outbox's table and index sizes.
pub(super) async fn held_snapshot(ctx: &mut Ctx, rate: f64, total: Duration, window: Duration) -> Res<()> {
    ctx.say(&format!(
        "\n## 7. Held snapshot ({rate:.0} msg/s on each of two databases at once, 16 lanes, {} each, {} min; \
         one database has a REPEATABLE READ transaction open throughout)\n",
        HELD_WRITERS.describe(),
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
