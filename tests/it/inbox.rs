//! The inbox and the consumer runner against PostgreSQL and the broker: effects applied once
//! through redeliveries, restarts, crashes between commit and offset, racing consumers, poison.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::consumer::{
    self, ConsumedMessage, ConsumerConfig, ConsumerStats, CrashAfterCommit, Handler, HandlerFuture, PoisonPolicy,
};
use outbox_relay::db::DbConfig;
use outbox_relay::inbox::{Inbox, InboxMessage, InboxOutcome};
use outbox_relay::retry::Backoff;
use rand::Rng;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::kafka::create_topic;
use crate::support::{connect, count, database_url, eventually, kafka_brokers, unique_name, TestSchema};

/// Applies an effect: one row per application, so a second application would show.
struct Effects {
    table: String,
    consumer: String,
}

impl Handler for Effects {
    fn handle<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>, m: &'a ConsumedMessage) -> HandlerFuture<'a> {
        Box::pin(async move {
            let payload = std::str::from_utf8(m.payload.as_deref().unwrap_or_default())?;
            if payload == "poison" {
                return Err("this message always fails".into());
            }
            let amount: i64 = payload.parse().unwrap_or(1);
            tx.execute(
                &format!("INSERT INTO {} (consumer, message_id, amount) VALUES ($1, $2, $3)", self.table),
                &[&self.consumer, &m.id, &amount],
            )
            .await?;
            Ok(())
        })
    }
}

async fn effects_table(s: &TestSchema) -> String {
    let c = connect().await;
    c.batch_execute(&s.q("CREATE TABLE __SCHEMA__.effects (consumer text, message_id uuid, amount bigint)"))
        .await
        .unwrap();
    format!("{}.effects", s.name.ident())
}

/// Produces records straight to the broker, as the relay would (ce_id header), in order.
async fn produce(topic: &str, records: &[(Option<Uuid>, String, String)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut pending = Vec::with_capacity(records.len());
    for (id, key, payload) in records {
        let id_text = id.map(|i| i.to_string());
        let mut headers = OwnedHeaders::new();
        if let Some(t) = &id_text {
            headers = headers.insert(Header { key: "ce_id", value: Some(t.as_str()) });
        }
        if payload == "poison" {
            // Binary header bytes from another producer (jsonb cannot hold NUL).
            headers = headers.insert(Header { key: "trace-bin", value: Some(&[0u8, 1, 2][..]) });
        }
        let record = FutureRecord::to(topic).key(key.as_str()).payload(payload.as_str()).headers(headers);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for p in pending {
        p.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

struct Running {
    stop: CancellationToken,
    stats: Arc<ConsumerStats>,
    task: JoinHandle<Result<(), consumer::ConsumerError>>,
}

fn config(s: &TestSchema, topic: &str, group: &str, name: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(
        kafka_brokers(),
        group,
        vec![topic.to_owned()],
        name,
        s.name.clone(),
        DbConfig::parse(&database_url()).unwrap(),
    );
    c.backoff = Backoff { base: Duration::from_millis(10), cap: Duration::from_millis(100) };
    c.shutdown_timeout = Duration::from_secs(20);
    c
}

fn start(config: ConsumerConfig, table: &str) -> Running {
    let stop = CancellationToken::new();
    let stats = Arc::new(ConsumerStats::default());
    let handler = Arc::new(Effects { table: table.to_owned(), consumer: config.consumer_name.clone() });
    let task = tokio::spawn(consumer::run(config, handler, stop.clone(), stats.clone()));
    Running { stop, stats, task }
}

impl Running {
    fn seen(&self) -> u64 {
        self.stats.processed.load(Ordering::Relaxed)
            + self.stats.duplicates.load(Ordering::Relaxed)
            + self.stats.conflicts.load(Ordering::Relaxed)
            + self.stats.dead_lettered.load(Ordering::Relaxed)
    }

    async fn wait_seen(&self, n: u64, within: Duration) {
        let start = Instant::now();
        while self.seen() < n {
            assert!(start.elapsed() < within, "consumer saw {} of {n} in {within:?}", self.seen());
            assert!(!self.task.is_finished(), "consumer stopped early");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) -> Arc<ConsumerStats> {
        self.stop.cancel();
        self.task.await.unwrap().expect("consumer ran without error");
        self.stats
    }
}

async fn effect_figures(s: &TestSchema, consumer: &str) -> (i64, i64) {
    let c = connect().await;
    let applied =
        count(&c, &s.q(&format!("SELECT count(*) FROM __SCHEMA__.effects WHERE consumer = '{consumer}'"))).await;
    let distinct = count(
        &c,
        &s.q(&format!("SELECT count(DISTINCT message_id) FROM __SCHEMA__.effects WHERE consumer = '{consumer}'")),
    )
    .await;
    (applied, distinct)
}

fn messages(n: usize) -> Vec<(Option<Uuid>, String, String)> {
    (0..n).map(|i| (Some(Uuid::now_v7()), format!("k{}", i % 40), (i % 7 + 1).to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_delivered_twice_and_replayed_from_offset_0_apply_once() {
    let s = TestSchema::new(2).await;
    let table = effects_table(&s).await;
    let topic = create_topic("inbox-twice", 4).await;
    let msgs = messages(10_000);
    produce(&topic, &msgs).await;
    produce(&topic, &msgs).await; // every message delivered twice

    let mut cfg = config(&s, &topic, &unique_name("g"), "billing");
    cfg.batch_size = 100;
    let first = start(cfg.clone(), &table);
    first.wait_seen(20_000, Duration::from_secs(180)).await;
    let a = first.stop().await;
    // A restart that reads everything again from offset 0 (a new group).
    cfg.group_id = unique_name("g");
    let again = start(cfg, &table);
    again.wait_seen(20_000, Duration::from_secs(180)).await;
    let b = again.stop().await;

    let (applied, distinct) = effect_figures(&s, "billing").await;
    let dups = a.duplicates.load(Ordering::Relaxed) + b.duplicates.load(Ordering::Relaxed);
    println!(
        "figures: records consumed 40000, effects applied {applied}, distinct {distinct}, duplicates counted {dups}, \
              processed {} + {}",
        a.processed.load(Ordering::Relaxed),
        b.processed.load(Ordering::Relaxed)
    );
    assert_eq!(applied, 10_000, "effects applied");
    assert_eq!(distinct, 10_000);
    assert_eq!(dups, 30_000, "duplicates counted = the rest");
    assert_eq!(b.processed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_crashing_between_db_commit_and_offset_store_applies_nothing_twice() {
    let s = TestSchema::new(2).await;
    let table = effects_table(&s).await;
    let topic = create_topic("inbox-crash", 2).await;
    let msgs = messages(2_000);
    produce(&topic, &msgs).await;
    let group = unique_name("g");
    let mut crashes = 0;
    let mut redelivered = 0;
    let start_all = Instant::now();
    // Commits seen across all runs: a crash after every 150th, so that ten crashes happen before
    // the 2,000 messages run out (a random 1-in-120 chance fell short of ten about once in thirty
    // runs, and then nothing was left to crash on).
    let commits = Arc::new(AtomicU64::new(0));
    loop {
        let crashed = Arc::new(AtomicU64::new(0));
        let mut cfg = config(&s, &topic, &group, "ledger");
        if crashes < 10 {
            // Crash right after the commit of a message, before its offset is stored.
            let (c, seen) = (crashed.clone(), commits.clone());
            cfg.crash_after_commit = Some(CrashAfterCommit(Arc::new(move |_m| {
                if seen.fetch_add(1, Ordering::Relaxed) % 150 == 149 {
                    c.fetch_add(1, Ordering::Relaxed);
                    true
                } else {
                    false
                }
            })));
        }
        let r = start(cfg, &table);
        let done = loop {
            if r.task.is_finished() {
                break false;
            }
            let (applied, _) = effect_figures(&s, "ledger").await;
            if applied >= 2_000 && crashes >= 10 {
                break true;
            }
            assert!(start_all.elapsed() < Duration::from_secs(240), "stuck: {applied} applied after {crashes} crashes");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let stats = r.stats.clone();
        redelivered += stats.duplicates.load(Ordering::Relaxed);
        if done {
            r.stop().await;
            break;
        }
        let result = r.task.await.unwrap();
        assert!(matches!(result, Err(consumer::ConsumerError::InjectedCrash)), "{result:?}");
        crashes += crashed.load(Ordering::Relaxed);
        let (applied, _) = effect_figures(&s, "ledger").await;
        if applied >= 2_000 && crashes >= 10 {
            break;
        }
    }
    let (applied, distinct) = effect_figures(&s, "ledger").await;
    println!(
        "figures: crashes between commit and offset {crashes}, redeliveries seen as duplicates {redelivered}, \
              effects applied {applied}, distinct {distinct}, duplicate effects {}",
        applied - distinct
    );
    assert!(crashes >= 10);
    assert_eq!(applied, 2_000);
    assert_eq!(applied - distinct, 0, "duplicate effects");
    assert!(redelivered >= crashes, "each crash redelivered at least the message it crashed on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_of_one_group_racing_on_the_same_ids_apply_each_once() {
    let s = TestSchema::new(2).await;
    let table = effects_table(&s).await;
    let topic = create_topic("inbox-race", 4).await;
    // Every id twice, under different keys, so its copies land in different partitions and
    // likely at different consumers at the same moment.
    let base = messages(3_000);
    let mut records = base.clone();
    records.extend(base.iter().map(|(id, k, p)| (*id, format!("{k}-copy"), p.clone())));
    produce(&topic, &records).await;
    let group = unique_name("g");
    let a = start(config(&s, &topic, &group, "shipping"), &table);
    a.wait_seen(500, Duration::from_secs(60)).await;
    let b = start(config(&s, &topic, &group, "shipping"), &table); // rebalance
    eventually(Duration::from_secs(120), Duration::from_millis(50), || async {
        let seen = a.seen() + b.seen();
        if seen >= 4_000 {
            Ok(())
        } else {
            Err(format!("the two consumers saw {seen} of 4000"))
        }
    })
    .await;
    let sa = a.stop().await; // another rebalance: b takes everything
    eventually(Duration::from_secs(120), Duration::from_millis(100), || async {
        let (applied, _) = effect_figures(&s, "shipping").await;
        if applied >= 3_000 {
            Ok(())
        } else {
            Err(format!("applied {applied} of 3000"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sb = b.stop().await;
    let (applied, distinct) = effect_figures(&s, "shipping").await;
    println!("figures: consumer a processed {} dup {}, consumer b processed {} dup {}; effects applied {applied}, distinct {distinct}",
        sa.processed.load(Ordering::Relaxed), sa.duplicates.load(Ordering::Relaxed),
        sb.processed.load(Ordering::Relaxed), sb.duplicates.load(Ordering::Relaxed));
    assert!(
        sb.processed.load(Ordering::Relaxed) + sb.duplicates.load(Ordering::Relaxed) > 0,
        "both consumers took part"
    );
    assert_eq!(applied, 3_000);
    assert_eq!(applied - distinct, 0, "duplicate effects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_missing_id_and_conflicting_payload_are_dead_lettered_and_the_partition_goes_on() {
    let s = TestSchema::new(2).await;
    let table = effects_table(&s).await;
    let topic = create_topic("inbox-poison", 1).await;
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let records = vec![
        (Some(ids[0]), "k".to_string(), "1".to_string()),
        (Some(ids[1]), "k".into(), "poison".into()),
        (Some(ids[2]), "k".into(), "2".into()),
        (None, "k".into(), "3".into()),
        (Some(ids[3]), "k".into(), "4".into()),
        (Some(ids[0]), "k".into(), "999".into()), // same id as the first, other payload
        (Some(ids[4]), "k".into(), "5".into()),
    ];
    produce(&topic, &records).await;
    let mut cfg = config(&s, &topic, &unique_name("g"), "audit");
    cfg.max_attempts = 3;
    let r = start(cfg, &table);
    r.wait_seen(7, Duration::from_secs(60)).await;
    let stats = r.stop().await;
    let c = connect().await;
    let dead: Vec<(Option<Uuid>, String, i32, i64)> = c
        .query(&s.q("SELECT message_id, reason, attempts, kafka_offset FROM __SCHEMA__.inbox_dead_letters ORDER BY kafka_offset"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let applied: Vec<i64> = c
        .query(&s.q("SELECT amount FROM __SCHEMA__.effects ORDER BY amount"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    println!(
        "figures: effects {applied:?}; dead letters {dead:?}; handler errors {}, conflicts {}",
        stats.handler_errors.load(Ordering::Relaxed),
        stats.conflicts.load(Ordering::Relaxed)
    );
    assert_eq!(applied, vec![1, 2, 4, 5], "everything but the poison, the id-less and the conflicting one");
    assert_eq!(dead.len(), 3);
    assert_eq!((dead[0].0, dead[0].1.as_str(), dead[0].2), (Some(ids[1]), "handler_failed", 3));
    assert_eq!((dead[1].0, dead[1].1.as_str()), (None, "missing_id"));
    assert_eq!((dead[2].0, dead[2].1.as_str()), (Some(ids[0]), "conflicting_payload"));
    assert_eq!(stats.handler_errors.load(Ordering::Relaxed), 3);
    assert_eq!(stats.conflicts.load(Ordering::Relaxed), 1);
    let payload: Vec<u8> = c
        .query_one(&s.q("SELECT payload FROM __SCHEMA__.inbox_dead_letters WHERE reason = 'handler_failed'"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(payload, b"poison", "the dead letter keeps the payload for a replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_under_the_stop_policy_stops_the_runner_and_says_which_message() {
    let s = TestSchema::new(2).await;
    let table = effects_table(&s).await;
    let topic = create_topic("inbox-stop", 1).await;
    let bad = Uuid::now_v7();
    produce(
        &topic,
        &[
            (Some(Uuid::now_v7()), "k".into(), "1".into()),
            (Some(bad), "k".into(), "poison".into()),
            (Some(Uuid::now_v7()), "k".into(), "2".into()),
        ],
    )
    .await;
    let mut cfg = config(&s, &topic, &unique_name("g"), "strict");
    cfg.max_attempts = 2;
    cfg.poison_policy = PoisonPolicy::Stop;
    let r = start(cfg, &table);
    let result =
        tokio::time::timeout(Duration::from_secs(60), r.task).await.expect("the runner stops by itself").unwrap();
    let err = result.expect_err("poison under stop is an error");
    assert!(err.to_string().contains(&bad.to_string()), "{err}");
    let (applied, _) = effect_figures(&s, "strict").await;
    assert_eq!(applied, 1, "nothing after the poison message is applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_applies_the_same_effects_as_single_mode() {
    let s = TestSchema::new(2).await;
    let table = effects_table(&s).await;
    let topic = create_topic("inbox-batch", 4).await;
    let msgs = messages(3_000);
    let mut records = msgs.clone();
    records.extend(msgs.iter().step_by(2).cloned()); // half of them twice
    produce(&topic, &records).await;
    let single = start(config(&s, &topic, &unique_name("g"), "single"), &table);
    let mut bcfg = config(&s, &topic, &unique_name("g"), "batched");
    bcfg.batch_size = 200;
    let batched = start(bcfg, &table);
    single.wait_seen(4_500, Duration::from_secs(180)).await;
    batched.wait_seen(4_500, Duration::from_secs(180)).await;
    let (ss, bs) = (single.stop().await, batched.stop().await);
    let c = connect().await;
    let sum = |name: &str| {
        s.q(&format!("SELECT coalesce(sum(amount), 0)::bigint FROM __SCHEMA__.effects WHERE consumer = '{name}'"))
    };
    let (sum_single, sum_batched) = (count(&c, &sum("single")).await, count(&c, &sum("batched")).await);
    let diff = count(
        &c,
        &s.q("SELECT count(*) FROM ((SELECT message_id, amount FROM __SCHEMA__.effects WHERE consumer = 'single'
                               EXCEPT SELECT message_id, amount FROM __SCHEMA__.effects WHERE consumer = 'batched')
                              UNION ALL
                              (SELECT message_id, amount FROM __SCHEMA__.effects WHERE consumer = 'batched'
                               EXCEPT SELECT message_id, amount FROM __SCHEMA__.effects WHERE consumer = 'single')) d"),
    )
    .await;
    println!("figures: single processed {} dup {}, batched processed {} dup {}; sums {sum_single} / {sum_batched}; rows differing {diff}",
        ss.processed.load(Ordering::Relaxed), ss.duplicates.load(Ordering::Relaxed),
        bs.processed.load(Ordering::Relaxed), bs.duplicates.load(Ordering::Relaxed));
    assert_eq!(effect_figures(&s, "single").await, (3_000, 3_000));
    assert_eq!(effect_figures(&s, "batched").await, (3_000, 3_000));
    assert_eq!(sum_single, sum_batched);
    assert_eq!(diff, 0, "the same effects, message by message");
    assert_eq!(bs.duplicates.load(Ordering::Relaxed), 1_500);
}

#[tokio::test]
async fn inbox_reports_processed_duplicate_and_conflict_in_the_callers_transaction() {
    let s = TestSchema::new(2).await;
    let mut c = connect().await;
    let inbox = Inbox::new(s.name.clone(), "svc").unwrap();
    let id = Uuid::now_v7();
    let tx = c.transaction().await.unwrap();
    assert_eq!(inbox.record(&tx, &InboxMessage::new(id, Some(b"a"))).await.unwrap(), InboxOutcome::Processed);
    tx.rollback().await.unwrap(); // the caller's choice: nothing recorded
    let tx = c.transaction().await.unwrap();
    assert_eq!(inbox.record(&tx, &InboxMessage::new(id, Some(b"a"))).await.unwrap(), InboxOutcome::Processed);
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    assert_eq!(inbox.record(&tx, &InboxMessage::new(id, Some(b"a"))).await.unwrap(), InboxOutcome::Duplicate);
    assert!(matches!(
        inbox.record(&tx, &InboxMessage::new(id, Some(b"b"))).await.unwrap(),
        InboxOutcome::Conflict { .. }
    ));
    let other = Uuid::now_v7();
    let batch =
        [InboxMessage::new(other, Some(b"x")), InboxMessage::new(id, Some(b"a")), InboxMessage::new(other, Some(b"x"))];
    let outcomes = inbox.record_batch(&tx, &batch).await.unwrap();
    assert_eq!(outcomes, vec![InboxOutcome::Processed, InboxOutcome::Duplicate, InboxOutcome::Duplicate]);
    tx.commit().await.unwrap();
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.inbox")).await, 2);
    // Retention: rows older than the window go, in chunks.
    c.execute(
        &s.q("UPDATE __SCHEMA__.inbox SET processed_at = now() - interval '8 days' WHERE message_id = $1"),
        &[&id],
    )
    .await
    .unwrap();
    let purged = inbox.purge(&c, Duration::from_secs(7 * 24 * 3600), 1).await.unwrap();
    assert_eq!(purged, 1);
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.inbox")).await, 1);
}

#[tokio::test]
async fn inbox_purge_command_deletes_only_rows_past_the_retention() {
    let s = TestSchema::new(2).await;
    let c = connect().await;
    c.batch_execute(&s.q("INSERT INTO __SCHEMA__.inbox (consumer, message_id, processed_at)
         SELECT 'svc', gen_random_uuid(), now() - interval '10 days' FROM generate_series(1, 2500);
         INSERT INTO __SCHEMA__.inbox (consumer, message_id)
         SELECT 'svc', gen_random_uuid() FROM generate_series(1, 100);
         INSERT INTO __SCHEMA__.inbox (consumer, message_id, processed_at)
         SELECT 'other', gen_random_uuid(), now() - interval '10 days' FROM generate_series(1, 50);"))
        .await
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args([
            "inbox",
            "purge",
            "--schema",
            s.name.as_str(),
            "--consumer",
            "svc",
            "--older-than",
            "7days",
            "--chunk",
            "1000",
        ])
        .env("DATABASE_URL", database_url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("purged 2500"), "{stdout}");
    assert!(stderr.contains("purged 1000 rows so far"), "progress is shown: {stderr}");
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.inbox WHERE consumer = 'svc'")).await, 100);
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.inbox WHERE consumer = 'other'")).await, 50);
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["inbox", "purge", "--schema", s.name.as_str(), "--consumer", "svc", "--older-than", "seven days"])
        .env("DATABASE_URL", database_url())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--older-than"));
}

/// Orders applied by the demo consumer so far, and their amount.
/// Makes `table` refuse inserts the way a missing INSERT grant does (SQLSTATE 42501), until the
/// trigger `refuse` is dropped.
async fn refuse_inserts(c: &tokio_postgres::Client, s: &TestSchema, table: &str) {
    c.batch_execute(&s.q(&format!(
        "CREATE OR REPLACE FUNCTION __SCHEMA__.refuse() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'permission denied for table {table}' USING ERRCODE = '42501'; END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON __SCHEMA__.{table}
           FOR EACH ROW EXECUTE FUNCTION __SCHEMA__.refuse();"
    )))
    .await
    .unwrap();
}

async fn applied(c: &tokio_postgres::Client) -> (i64, i64) {
    c.query_opt(
        "SELECT coalesce(sum(orders), 0)::bigint, coalesce(sum(amount_cents), 0)::bigint FROM demo.customer_totals",
        &[],
    )
    .await
    .ok()
    .flatten()
    .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
    .unwrap_or((0, 0))
}

/// The example consumer binary (built with the examples: `scripts/test.sh` builds them first).
fn demo_consumer_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("examples").join("demo_consumer");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --all-features --examples` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_process_killed_with_sigkill_repeatedly_applies_each_effect_once() {
    let s = TestSchema::new(2).await;
    let topic = create_topic("inbox-kill9", 2).await;
    let c = connect().await;
    c.batch_execute("CREATE SCHEMA IF NOT EXISTS demo; DROP TABLE IF EXISTS demo.customer_totals;").await.unwrap();
    // 3,000 orders of known amounts, as the relay would publish them.
    let orders: Vec<(Option<Uuid>, String, String)> = (0..3000)
        .map(|i| {
            let customer = format!("customer-{}", i % 23);
            let payload =
                serde_json::json!({ "order_id": i, "customer": customer, "amount_cents": 100 + i }).to_string();
            (Some(Uuid::now_v7()), customer, payload)
        })
        .collect();
    produce(&topic, &orders).await;
    let expected_amount: i64 = (0..3000).map(|i| 100 + i as i64).sum();
    let group = crate::support::unique_name("kill9");
    let spawn = |metrics_port: Option<u16>| {
        let mut cmd = std::process::Command::new(demo_consumer_bin());
        cmd.env("DATABASE_URL", database_url())
            .env("KAFKA_BROKERS", kafka_brokers())
            .env("OUTBOX_SCHEMA", s.name.as_str())
            .env("DEMO_TOPIC", &topic)
            .env("DEMO_GROUP", &group)
            .env("DEMO_BATCH", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(port) = metrics_port {
            cmd.env("DEMO_METRICS_ADDR", format!("127.0.0.1:{port}"));
        }
        cmd.spawn().unwrap()
    };
    let mut kills = 0;
    let start = Instant::now();
    while kills < 4 {
        let mut child = spawn(None);
        // Let it join the group and apply some, then kill it mid-stream.
        let before = applied(&c).await.0;
        while applied(&c).await.0 <= before + 50 {
            assert!(start.elapsed() < Duration::from_secs(240), "the consumer made no progress");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..300))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        if applied(&c).await.0 >= 3000 {
            break;
        }
    }
    // The last one also serves its metrics, as the compose stack's demo consumer does.
    let port = crate::support::cli::free_port();
    let mut last = spawn(Some(port));
    while applied(&c).await.0 < 3000 {
        assert!(start.elapsed() < Duration::from_secs(300), "not all orders applied: {:?}", applied(&c).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, text) = crate::support::cli::http_get(port, "/metrics").await.expect("the consumer serves /metrics");
    assert_eq!(code, 200);
    assert!(
        crate::support::cli::metric(&text, "outbox_inbox_processed_total", "consumer=\"demo-totals\"") > 0.0,
        "the last consumer applied orders, its counter says none: {text}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = std::process::Command::new("kill").args(["-TERM", &last.id().to_string()]).status();
    last.wait().unwrap();
    let (orders_applied, amount) = applied(&c).await;
    let recorded = count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.inbox WHERE consumer = 'demo-totals'")).await;
    println!("figures: consumer killed with SIGKILL {kills} times; effects applied {orders_applied} of 3000, amount {amount} of {expected_amount}, inbox rows {recorded}");
    c.batch_execute("DROP TABLE IF EXISTS demo.customer_totals").await.unwrap();
    assert!(kills >= 3);
    assert_eq!(orders_applied, 3000, "each order applied exactly once");
    assert_eq!(amount, expected_amount, "no effect applied twice, none lost");
    assert_eq!(recorded, 3000);
}

/// A conflicting redelivery is handled only once its dead letter is written. When that write is
/// refused (as a missing grant would refuse it), the runner stops without moving the offset, so
/// the next run sees the message again and dead-letters it: nothing is skipped unrecorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_whose_dead_letter_cannot_be_written_is_not_acknowledged() {
    let s = TestSchema::new(2).await;
    let table = effects_table(&s).await;
    let topic = create_topic("inbox-conflict-dl", 1).await;
    let (first, other) = (Uuid::now_v7(), Uuid::now_v7());
    produce(
        &topic,
        &[
            (Some(first), "k".to_string(), "1".to_string()),
            (Some(first), "k".into(), "999".into()), // same id, other payload
            (Some(other), "k".into(), "2".into()),
        ],
    )
    .await;
    let c = connect().await;
    // The dead-letter table refuses writes the way a missing INSERT grant does (SQLSTATE 42501).
    refuse_inserts(&c, &s, "inbox_dead_letters").await;
    let group = unique_name("g");
    let r = start(config(&s, &topic, &group, "audit"), &table);
    let first_run =
        tokio::time::timeout(Duration::from_secs(60), r.task).await.expect("the runner stops by itself").unwrap();
    let err = first_run.expect_err("an unwritable dead letter stops the runner");
    let dead_after_first = count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.inbox_dead_letters")).await;

    // The operator restores the grant; the same group carries on from its committed offset.
    c.batch_execute(&s.q("DROP TRIGGER refuse ON __SCHEMA__.inbox_dead_letters")).await.unwrap();
    let r = start(config(&s, &topic, &group, "audit"), &table);
    let start_at = Instant::now();
    while count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.effects")).await < 2 {
        assert!(start_at.elapsed() < Duration::from_secs(60), "the second run did not apply the last message");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = r.stop().await;
    let dead: Vec<(Option<Uuid>, String)> = c
        .query(&s.q("SELECT message_id, reason FROM __SCHEMA__.inbox_dead_letters"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let (applied, distinct) = effect_figures(&s, "audit").await;
    println!(
        "figures: first run stopped with {err}; dead letters after it {dead_after_first}; after the second run {dead:?}, \
         effects {applied} ({distinct} distinct), conflicts seen by the second run {}",
        stats.conflicts.load(Ordering::Relaxed)
    );
    assert!(matches!(err, consumer::ConsumerError::DeadLetterWrite(_)), "{err}");
    assert_eq!(dead_after_first, 0);
    assert_eq!(
        dead,
        vec![(Some(first), "conflicting_payload".to_owned())],
        "the conflict was redelivered and recorded"
    );
    assert_eq!(stats.conflicts.load(Ordering::Relaxed), 1);
    assert_eq!((applied, distinct), (2, 2), "the first and the last message, each once");
}

/// The inbox table refuses writes the way a missing grant does: the runner does not retry
/// forever in silence; it stops, says what to check, and acknowledges nothing, so a second run
/// after the fix applies every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_the_database_keeps_refusing_stops_the_runner_and_says_what_to_check() {
    let s = TestSchema::new(2).await;
    let table = effects_table(&s).await;
    let topic = create_topic("inbox-refused", 1).await;
    produce(&topic, &messages(3)).await;
    let c = connect().await;
    refuse_inserts(&c, &s, "inbox").await;
    let group = unique_name("g");
    let r = start(config(&s, &topic, &group, "refused"), &table);
    let first_run =
        tokio::time::timeout(Duration::from_secs(60), r.task).await.expect("the runner stops by itself").unwrap();
    let err = first_run.expect_err("a refusing inbox stops the runner");
    let (applied_first, _) = effect_figures(&s, "refused").await;

    c.batch_execute(&s.q("DROP TRIGGER refuse ON __SCHEMA__.inbox")).await.unwrap();
    let r = start(config(&s, &topic, &group, "refused"), &table);
    r.wait_seen(3, Duration::from_secs(60)).await;
    r.stop().await;
    let (applied, distinct) = effect_figures(&s, "refused").await;
    println!("figures: first run stopped with {err}; effects after it {applied_first}; after the fix {applied} ({distinct} distinct)");
    assert!(matches!(err, consumer::ConsumerError::DatabaseRefused { class: "pg.privilege_or_schema", .. }), "{err}");
    assert!(err.to_string().contains("grants"), "the error says what to check: {err}");
    assert_eq!(applied_first, 0);
    assert_eq!((applied, distinct), (3, 3), "each message applied once after the fix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_workers_share_a_bounded_pool_of_sessions() {
    let s = TestSchema::new(2).await;
    let table = effects_table(&s).await;
    let topic = create_topic("inbox-pool", 8).await;
    let msgs = messages(4_000);
    produce(&topic, &msgs).await;
    let app = unique_name("pooltest");
    let mut cfg = config(&s, &topic, &unique_name("g"), "pooled");
    cfg.db = cfg.db.with_application_name(&app);
    cfg.pool.max_size = 2;
    let running = start(cfg, &table);
    // Sample the runner's sessions while its eight partition workers apply the messages.
    let watcher = connect().await;
    let mut most = 0i64;
    let started = Instant::now();
    while running.seen() < 4_000 {
        assert!(started.elapsed() < Duration::from_secs(180), "consumer saw {} of 4000", running.seen());
        assert!(!running.task.is_finished(), "consumer stopped early");
        let open =
            count(&watcher, &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'")).await;
        most = most.max(open);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = running.stop().await;
    println!(
        "figures: 8 partitions, pool of 2: most sessions seen {most}, processed {}, effects {:?}",
        stats.processed.load(Ordering::Relaxed),
        effect_figures(&s, "pooled").await
    );
    assert_eq!(effect_figures(&s, "pooled").await, (4_000, 4_000), "every effect applied once");
    assert!(most >= 1, "the sampler saw the runner's sessions");
    assert!(most <= 2, "at most the pool's size of sessions open at once, saw {most}");
}
