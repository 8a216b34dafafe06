//! `reconcile` against real deliveries and a real consumer: it finds exactly the messages a
//! consumer skipped (by construction), tells dead-lettered and in-flight ones apart, refuses bad
//! input, and `--replay-missing` makes the next run clean.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use outbox_relay::consumer::{self, ConsumedMessage, ConsumerConfig, ConsumerStats, Handler, HandlerFuture};
use outbox_relay::outbox::{Outbox, OutboxMessage};
use uuid::Uuid;

use crate::support::cli::{cli, fails, ok};
use crate::support::kafka::create_topic;
use crate::support::relay::{config, InProcess};
use crate::support::workload::wait_until_empty;
use crate::support::{connect, count, database_url, eventually, kafka_brokers, TestSchema};

/// Applies each message (a row in `applied`), except the ids in `blocked`, which fail.
struct Effects(String);

impl Handler for Effects {
    fn handle<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>, m: &'a ConsumedMessage) -> HandlerFuture<'a> {
        Box::pin(async move {
            let blocked: i64 =
                tx.query_one(&format!("SELECT count(*) FROM {}.blocked WHERE id = $1", self.0), &[&m.id]).await?.get(0);
            if blocked > 0 {
                return Err("blocked by the test".into());
            }
            tx.execute(&format!("INSERT INTO {}.applied VALUES ($1)", self.0), &[&m.id]).await?;
            Ok(())
        })
    }
}

/// The JSON of a `reconcile` run, and its exit code.
fn reconcile(args: &[&str]) -> (serde_json::Value, Option<i32>) {
    let out = cli(&[&["reconcile", "--json"], args].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("reconcile printed no JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    });
    (v, out.status.code())
}

fn total(v: &serde_json::Value, field: &str) -> i64 {
    v["consumers"][0][field].as_i64().unwrap_or_else(|| panic!("no {field} in {v}"))
}

fn missing_ids(v: &serde_json::Value) -> BTreeSet<Uuid> {
    v["missing"].as_array().unwrap().iter().map(|m| Uuid::parse_str(m["id"].as_str().unwrap()).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_exactly_the_skipped_messages_and_replaying_them_makes_it_clean() {
    const N: usize = 200;
    let s = TestSchema::new(4).await;
    let schema = s.name.as_str();
    let c = connect().await;
    c.batch_execute(&s.q("CREATE TABLE __SCHEMA__.blocked (id uuid); CREATE TABLE __SCHEMA__.applied (id uuid);"))
        .await
        .unwrap();
    let topic = create_topic("reconcile", 2).await;
    let outbox = Outbox::new(s.name.clone());
    let mut w = connect().await;
    let tx = w.transaction().await.unwrap();
    let msgs: Vec<OutboxMessage> = (0..N)
        .map(|i| OutboxMessage::builder(&topic).key(format!("k{}", i % 20)).payload(format!("m{i}")).build().unwrap())
        .collect();
    let ids = outbox.enqueue_batch(&tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    // Four the consumer cannot process: dead-lettered at the consumer, not missing.
    let dead: BTreeSet<Uuid> = ids.iter().step_by(61).copied().collect();
    assert_eq!(dead.len(), 4);
    for id in &dead {
        c.execute(&s.q("INSERT INTO __SCHEMA__.blocked VALUES ($1)"), &[id]).await.unwrap();
    }
    let mut cfg = config(&s.name);
    cfg.archive = true;
    let relay = InProcess::start(cfg);
    wait_until_empty(&s, Duration::from_secs(60)).await;
    relay.shutdown().await;

    let mut ccfg = ConsumerConfig::new(
        kafka_brokers(),
        crate::support::unique_name("g"),
        vec![topic.clone()],
        "billing",
        s.name.clone(),
        outbox_relay::db::DbConfig::parse(&database_url()).unwrap(),
    );
    ccfg.max_attempts = 2;
    ccfg.backoff = outbox_relay::retry::Backoff { base: Duration::from_millis(10), cap: Duration::from_millis(50) };
    let stop = tokio_util::sync::CancellationToken::new();
    let stats = Arc::new(ConsumerStats::default());
    let task = tokio::spawn(consumer::run(ccfg, Arc::new(Effects(s.name.ident())), stop.clone(), stats.clone()));
    let st = &stats;
    eventually(Duration::from_secs(60), Duration::from_millis(50), || async move {
        match st.processed.load(Ordering::Relaxed) + st.dead_lettered.load(Ordering::Relaxed) {
            n if n as usize >= N => Ok(()),
            n => Err(format!("{n} of {N} messages processed or dead-lettered")),
        }
    })
    .await;
    // The inbox recorded each message's lane and sequence as the relay archived them.
    assert_eq!(
        count(
            &c,
            &s.q("SELECT count(*) FROM __SCHEMA__.inbox i JOIN __SCHEMA__.delivered d ON d.id = i.message_id \
                  WHERE i.outbox_lane = d.lane AND i.outbox_seq = d.seq")
        )
        .await,
        (N - dead.len()) as i64
    );

    // By construction, the consumer "skipped" five: their inbox rows go (as if a rogue consumer had
    // committed offsets past them). And one it processed that this relay never delivered.
    let skipped: BTreeSet<Uuid> = ids.iter().skip(3).step_by(37).copied().filter(|id| !dead.contains(id)).collect();
    assert_eq!(skipped.len(), 6);
    let skipped_vec: Vec<Uuid> = skipped.iter().copied().collect();
    let gone = c
        .execute(
            &s.q("DELETE FROM __SCHEMA__.inbox WHERE consumer = 'billing' AND message_id = ANY($1)"),
            &[&skipped_vec],
        )
        .await
        .unwrap();
    assert_eq!(gone, 6);
    c.execute(
        &s.q("INSERT INTO __SCHEMA__.inbox (consumer, message_id, topic) VALUES ('billing', $1, $2)"),
        &[&Uuid::now_v7(), &topic],
    )
    .await
    .unwrap();

    // A message archived twice (delivered again) counts once.
    c.execute(
        &s.q("INSERT INTO __SCHEMA__.delivered SELECT id, seq, lane, topic, key, created_at, attempts, kafka_topic, \
              kafka_partition, kafka_offset, delivered_at + interval '1 second' FROM __SCHEMA__.delivered WHERE id = $1"),
        &[&ids[10]],
    )
    .await
    .unwrap();
    let (v, code) = reconcile(&["--schema", schema, "--consumer", "billing", "--since", "1h", "--grace", "0s"]);
    assert_eq!(code, Some(4), "missing messages must exit 4: {v}");
    assert_eq!(total(&v, "delivered"), N as i64);
    assert_eq!(total(&v, "processed"), (N - dead.len() - skipped.len()) as i64);
    assert_eq!(total(&v, "dead_lettered"), dead.len() as i64);
    assert_eq!(total(&v, "missing"), skipped.len() as i64);
    assert_eq!(total(&v, "in_flight"), 0);
    assert_eq!(total(&v, "unknown"), 1);
    assert_eq!(missing_ids(&v), skipped, "exactly the skipped ids, no more");
    // The same through a second session (the consumers' database given apart: the archive is
    // read page by page and staged there).
    let (remote, _) = reconcile(&[
        "--schema",
        schema,
        "--consumer",
        "billing",
        "--since",
        "1h",
        "--grace",
        "0s",
        "--inbox-database-url",
        &database_url(),
    ]);
    assert_eq!(remote["consumers"], v["consumers"]);
    assert_eq!(missing_ids(&remote), skipped);
    // Inside the grace period they are in flight, not missing.
    let (v, code) = reconcile(&["--schema", schema, "--consumer", "billing", "--since", "1h", "--grace", "1h"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!((total(&v, "missing"), total(&v, "in_flight")), (0, skipped.len() as i64));
    // The human table says the same.
    let human = cli(&["reconcile", "--schema", schema, "--consumer", "billing", "--since", "1h", "--grace", "0s"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("missing for consumer \"billing\""), "{text}");
    assert!(skipped.iter().all(|id| text.contains(&id.to_string())), "{text}");
    fails(&human, "--replay-missing");

    // Bad input is refused, saying what to do.
    fails(&cli(&["reconcile", "--schema", schema, "--consumer", "biling"]), "this database's inbox knows \"billing\"");
    fails(
        &cli(&["reconcile", "--schema", schema, "--consumer", "billing", "--since", "1h", "--until", "2h"]),
        "bad window",
    );
    let empty = TestSchema::new(2).await;
    c.execute(
        &empty.q("INSERT INTO __SCHEMA__.inbox (consumer, message_id) VALUES ('billing', $1)"),
        &[&Uuid::now_v7()],
    )
    .await
    .unwrap();
    fails(&cli(&["reconcile", "--schema", empty.name.as_str(), "--consumer", "billing"]), "run --archive");

    // A dry run sends nothing; the replay re-publishes the six, and the consumer applies them.
    let replay = |extra: &[&str]| {
        let base = ["reconcile", "--schema", schema, "--consumer", "billing", "--since", "1h", "--grace", "0s"];
        ok(&cli(&[&base[..], &["--replay-missing"], extra].concat()))
    };
    let dry = replay(&["--dry-run"]);
    assert!(dry.contains("would re-publish 6"), "{dry}");
    let replayed = replay(&["--yes", "--why", "test"]);
    assert!(replayed.contains("re-published 6"), "{replayed}");
    let (cr, sql) = (&c, &s.q("SELECT count(*) FROM __SCHEMA__.inbox WHERE consumer = 'billing'"));
    let want = N - dead.len() + 1;
    eventually(Duration::from_secs(60), Duration::from_millis(100), || async move {
        match count(cr, sql).await {
            n if n as usize >= want => Ok(()),
            n => Err(format!("{n} inbox rows: the re-published messages were not all processed")),
        }
    })
    .await;
    let (v, code) = reconcile(&["--schema", schema, "--consumer", "billing", "--since", "1h", "--grace", "0s"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!((total(&v, "missing"), total(&v, "processed")), (0, (N - dead.len()) as i64));
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.audit_log WHERE source = 'reconcile' AND action = 'replay'"))
            .await,
        6
    );
    // Status shows the newest run per consumer: nothing missing.
    let status: serde_json::Value = serde_json::from_str(&ok(&cli(&["status", "--schema", schema, "--json"]))).unwrap();
    let last = &status["reconciliations"][0];
    assert_eq!((last["consumer"].as_str(), last["missing"].as_i64()), (Some("billing"), Some(0)), "{status}");
}
