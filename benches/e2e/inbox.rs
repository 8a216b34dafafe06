//! Section 4 (inbox cost) of the e2e benchmarks (see main.rs).

use super::*;

/// Consumer throughput over `m` records (`dup_share` of them repeated), in one of three modes.
pub(super) async fn inbox_rate(ctx: &Ctx, mode: &str, m: usize, dup_share: f64) -> Res<f64> {
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
        let rate = m as f64 / first.map_or(start, |f| f).elapsed().as_secs_f64();
        drop(consumer);
        ctx.forget(&s, &[&topic]).await?;
        return Ok(rate);
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
        vec![topic.clone()],
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
    ctx.forget(&s, &[&topic]).await?;
    Ok(rate)
}

/// Section 4: consumer throughput without an inbox, with one per message, with a batch one.
pub(super) async fn inbox_cost(ctx: &mut Ctx) -> Res<()> {
    let m = ctx.size(10_000, 40_000);
    ctx.say(&format!("\n## 4. Inbox cost ({m} records, 4 partitions; msg/s from the first record)\n"));
    ctx.say("| duplicates | no inbox (baseline) | per-message inbox | batch inbox (200) | per-message / baseline | batch / baseline |");
    ctx.say("|---|---|---|---|---|---|");
    for dup in [0.0, 0.5] {
        let none = inbox_rate(ctx, "none", m, dup).await?;
        let single = inbox_rate(ctx, "single", m, dup).await?;
        let batch = inbox_rate(ctx, "batch", m, dup).await?;
        ctx.say(&format!(
            "| {:.0}% | {none:.0} | {single:.0} | {batch:.0} | {:.2} | {:.2} |",
            dup * 100.0,
            single / none,
            batch / none
        ));
    }
    Ok(())
}
