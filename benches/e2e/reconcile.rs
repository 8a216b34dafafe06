//! Section 9 (reconciliation) of the e2e benchmarks (see main.rs).

use outbox_relay::ops::reconcile::{self, ReconcileRequest};

use super::*;

/// Section 9: `reconcile` of `n` archived deliveries against one consumer whose inbox holds all
/// but 1,000 of them (100 more dead-lettered), with the inbox in the archive's database (one
/// statement stages the window) and given apart (the archive read page by page into another
/// session); three runs each, median and spread. The figures are checked on every run.
pub(super) async fn reconcile_cost(ctx: &mut Ctx, n: i64) -> Res<()> {
    let s = ctx.schema("reconcile", 16).await?;
    let c = ctx.db.connect().await?;
    c.batch_execute(reconcile::SESSION_SETTINGS).await?;
    let (missing, dead) = (1_000i64, 100i64);
    let fill = Instant::now();
    c.batch_execute(&s.qualify(&format!(
        "INSERT INTO __SCHEMA__.delivered
             (id, seq, lane, topic, key, created_at, attempts, kafka_topic, kafka_partition, kafka_offset, delivered_at)
         SELECT gen_random_uuid(), g, g % 16, 'orders', 'k' || g % 10000, now() - interval '2 hours', 1, 'orders',
                g % 4, g / 4, now() - interval '1 hour' + g * interval '1 microsecond' * 3000
         FROM generate_series(1, {n}) g;
         INSERT INTO __SCHEMA__.inbox (consumer, message_id, topic, kafka_partition, kafka_offset, processed_at)
         SELECT 'billing', id, kafka_topic, kafka_partition, kafka_offset, delivered_at + interval '20 ms'
         FROM __SCHEMA__.delivered WHERE seq % ({n} / {missing}) <> 7;
         DELETE FROM __SCHEMA__.inbox i USING __SCHEMA__.delivered d
         WHERE i.message_id = d.id AND d.seq % ({n} / {dead}) = 3;
         INSERT INTO __SCHEMA__.inbox_dead_letters (consumer, message_id, topic, kafka_partition, kafka_offset, reason, attempts)
         SELECT 'billing', id, kafka_topic, kafka_partition, kafka_offset, 'handler_failed', 5
         FROM __SCHEMA__.delivered WHERE seq % ({n} / {dead}) = 3;
         ANALYZE __SCHEMA__.delivered; ANALYZE __SCHEMA__.inbox; ANALYZE __SCHEMA__.inbox_dead_letters;"
    )))
    .await?;
    ctx.say(&format!(
        "\n## 9. Reconciliation ({n} deliveries in the archive over {:.0} min, one consumer that processed all but \
         {missing} and dead-lettered {dead}; filled in {:.0} s; three runs each, median and spread)\n",
        (n as f64 * 3000.0) / 1e6 / 60.0,
        fill.elapsed().as_secs_f64()
    ));
    ctx.say("| inbox | time to reconcile (s) | spread (s) | deliveries per second |");
    ctx.say("|---|---|---|---|");
    let req = ReconcileRequest {
        consumers: vec!["billing".into()],
        since: chrono::Utc::now() - chrono::Duration::hours(2),
        until: chrono::Utc::now(),
        grace: Duration::from_secs(0),
        topic: None,
        list_limit: 100,
    };
    let apart = ctx.db.connect().await?;
    apart.batch_execute(reconcile::SESSION_SETTINGS).await?;
    for (label, inbox) in
        [("same database (one statement stages the window)", None), ("given apart (paged)", Some(&apart))]
    {
        let mut runs = Vec::new();
        for _ in 0..3 {
            let r = reconcile::reconcile(&c, inbox, &s, &req, &mut |_| {}).await?;
            let t = &r.consumers[0];
            if (t.delivered, t.processed, t.dead_lettered, t.missing) != (n, n - missing - dead, dead, missing) {
                return Err(format!("reconcile found {t:?}, not what the bench wrote").into());
            }
            runs.push(r.elapsed_seconds);
        }
        let (median, lo, hi) = median_of_3(runs, |x| *x);
        ctx.say(&format!("| {label} | {median:.2} | {lo:.2}–{hi:.2} | {:.0} |", n as f64 / median));
    }
    Ok(())
}
