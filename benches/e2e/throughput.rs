//! Sections 1 (throughput against the baselines) and 5 (scaling) of the e2e benchmarks (see main.rs).

use super::*;

/// Raw PostgreSQL: the relay's own claim and delete statements, one session per lane, no Kafka.
pub(super) async fn claim_delete_rate(ctx: &Ctx, s: &SchemaName, lanes: i16, n: usize) -> Res<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let db = ctx.db.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let c = db.connect().await?;
            let claim = c.prepare(&s.qualify(include_str!("../../src/sql/claim.sql"))).await?;
            let delete = c.prepare(&s.qualify(include_str!("../../src/sql/delete_acked.sql"))).await?;
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
pub(super) async fn produce_rate(ctx: &Ctx, topic: &str, n: usize, payloads: &[Vec<u8>]) -> Res<f64> {
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
pub(super) async fn ack(f: rdkafka::producer::DeliveryFuture) -> Res<()> {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .map_err(|_| "no acknowledgement within 60 s: is the broker up?")??
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// The relay draining `n` rows committed in one go while it already runs.
pub(super) async fn relay_rate(
    ctx: &Ctx,
    s: &SchemaName,
    topic: &str,
    n: usize,
    size: usize,
    instances: usize,
) -> Res<f64> {
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

/// Section 1: throughput at 200 B and 2 KiB against both baselines; the relay's rate at 200 B.
pub(super) async fn throughput(ctx: &mut Ctx, n: usize) -> Res<f64> {
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

/// Section 5: 1, 2 and 4 relay instances on one database.
pub(super) async fn scaling(ctx: &mut Ctx) -> Res<()> {
    let k = ctx.size(30_000, 150_000);
    ctx.say(&format!("\n## 5. Scaling ({k} rows of 200 B, 16 lanes, instances in one process on this machine)\n"));
    ctx.say("| instances | msg/s | vs 1 |");
    ctx.say("|---|---|---|");
    let mut one = 0.0;
    for instances in [1usize, 2, 4] {
        let s = ctx.schema(&format!("scale{instances}"), 16).await?;
        let topic = ctx.topic(&format!("scale{instances}"), 4).await?;
        let r = relay_rate(ctx, &s, &topic, k, 200, instances).await?;
        if instances == 1 {
            one = r;
        }
        ctx.say(&format!("| {instances} | {r:.0} | {:.2} |", r / one));
    }
    Ok(())
}
