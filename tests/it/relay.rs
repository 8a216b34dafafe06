//! The relay against PostgreSQL and the broker: at-least-once, per-key order, restarts,
//! several instances, the commit-order gap, idle behaviour.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::outbox::{Outbox, OutboxMessage};
use rand::Rng;
use uuid::Uuid;

use crate::support::kafka::{create_topic, figures, read_topic};
use crate::support::relay::{config, InProcess, RelayProcess};
use crate::support::workload::{wait_until_empty, write_concurrently, write_paced};
use crate::support::{connect, count, eventually, TestSchema};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_from_8_concurrent_writers_all_arrive_in_key_order() {
    let s = TestSchema::new(16).await;
    let topic = create_topic("relay-8w", 4).await;
    let relay = InProcess::start(config(&s.name));
    let committed = write_concurrently(&s, &topic, 8, 50_000 / 8).await;
    wait_until_empty(&s, Duration::from_secs(180)).await;
    let stats = relay.shutdown().await;

    let received = read_topic(&topic, committed.len(), Duration::from_secs(120));
    let f = figures(&committed, &received);
    println!("figures: {f:?}");
    assert_eq!(f.committed, 50_000);
    assert_eq!(f.distinct, 50_000, "distinct ids at Kafka = rows committed");
    assert_eq!(f.lost, 0);
    assert_eq!(f.order_violations, 0, "per key, first arrivals follow sequence order");
    assert_eq!(f.duplicates, 0, "no failures, no restarts: no duplicates");
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 50_000);

    // The envelope: CloudEvents binary mode.
    let r = &received[0];
    assert_eq!(r.headers["ce_specversion"], "1.0");
    assert_eq!(r.headers["ce_id"], r.id.to_string());
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["ce_source"], format!("/outbox-relay/{}", s.name));
    assert_eq!(r.headers["ce_type"], topic);
    assert!(r.headers["ce_time"].ends_with('Z'));
}

/// Records in a topic so far (high watermarks summed).
fn received_count(topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", crate::support::kafka_brokers()).create().unwrap();
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).map(|(lo, hi)| hi - lo).unwrap_or(0))
        .sum()
}

/// Who holds which lane right now: lane -> application names of the sessions holding its lock.
async fn lane_holders(c: &tokio_postgres::Client, s: &TestSchema) -> HashMap<i32, Vec<String>> {
    // The relay's own formula: if it changes, this still finds the holders.
    let class = i64::from(outbox_relay::relay::lane_session::lane_lock_class(c, &s.name).await.unwrap());
    let rows = c
        .query(
            "SELECT l.objid::bigint::int, coalesce(a.application_name, '')
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = $1::bigint::oid",
            &[&class],
        )
        .await
        .unwrap();
    let mut out: HashMap<i32, Vec<String>> = HashMap::new();
    for r in rows {
        out.entry(r.get(0)).or_default().push(r.get(1));
    }
    out
}

/// Waits (30 s at most from `since`) until all `lanes` are held, evenly, by exactly `instances`
/// instances; returns lanes per instance.
async fn wait_for_spread(
    c: &tokio_postgres::Client,
    s: &TestSchema,
    lanes: u16,
    instances: usize,
    since: Instant,
    failure: &str,
) -> HashMap<String, usize> {
    loop {
        let holders = lane_holders(c, s).await;
        let mut per: HashMap<String, usize> = HashMap::new();
        for h in holders.values() {
            *per.entry(instance_of(&h[0])).or_default() += 1;
        }
        let even = lanes as usize / instances;
        if holders.len() == lanes as usize && per.len() == instances && per.values().all(|n| *n == even) {
            return per;
        }
        assert!(since.elapsed() < Duration::from_secs(30), "{failure}: {per:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn instance_of(application_name: &str) -> String {
    application_name.split_whitespace().nth(1).unwrap_or("?").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_survive_relay_kill_9_at_random_moments() {
    const KILLS: usize = 10;
    const BATCH: usize = 200;
    const IN_FLIGHT: usize = 400;
    let s = TestSchema::new(8).await;
    let topic = create_topic("relay-kill", 4).await;
    let schema = s.name.clone();
    let topic_w = topic.clone();
    let s_ref = Arc::new(s);
    let writer_schema = s_ref.clone();
    // Writers keep committing (about 900 rows/s) while the relay is killed and restarted.
    let writers =
        tokio::spawn(async move { write_paced(&writer_schema, &topic_w, 4, 5_000, Duration::from_millis(90)).await });

    let relay_flags =
        ["--batch-size".to_owned(), BATCH.to_string(), "--max-in-flight".to_owned(), IN_FLIGHT.to_string()];
    let relay_flags: Vec<&str> = relay_flags.iter().map(String::as_str).collect();
    let mut max_backlog = 0;
    let c = connect().await;
    for kill in 0..KILLS {
        let mut relay = RelayProcess::start(&schema, &relay_flags);
        let alive_ms = rand::rng().random_range(700..2_500);
        tokio::time::sleep(Duration::from_millis(alive_ms)).await;
        max_backlog = max_backlog.max(count(&c, &s_ref.q("SELECT count(*) FROM __SCHEMA__.messages")).await);
        relay.kill9();
        let delivered_so_far = received_count(&topic);
        println!(
            "kill {}: relay pid {} killed after {alive_ms} ms; records at Kafka so far {delivered_so_far}",
            kill + 1,
            relay.pid()
        );
        // A backlog builds while no relay runs, so the next one starts busy.
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(200..1_000))).await;
    }
    let committed = writers.await.unwrap();
    let mut relay = RelayProcess::start(&schema, &relay_flags);
    let recovery = wait_until_empty(&s_ref, Duration::from_secs(180)).await;
    // The outbox may be empty already (the last relay drained it): wait until this one runs (it
    // holds the lanes), so that what is asserted is its graceful stop, not its start.
    wait_for_spread(&c, &s_ref, 8, 1, Instant::now(), "the last relay did not take its lanes").await;
    assert_eq!(relay.terminate(Duration::from_secs(30)), Some(0));

    let received = read_topic(&topic, committed.len(), Duration::from_secs(120));
    let f = figures(&committed, &received);
    // Each kill can leave at most what every lane had in flight acknowledged but not deleted.
    let bound = KILLS * 8 * IN_FLIGHT;
    println!(
        "figures: rows committed {}, distinct ids at Kafka {}, duplicates {} (bound {bound}), rows lost {}, \
         order violations {}, max backlog {max_backlog}, final drain {recovery:?}",
        f.committed, f.distinct, f.duplicates, f.lost, f.order_violations
    );
    assert_eq!(f.committed, 20_000);
    assert_eq!(f.lost, 0, "rows lost");
    assert_eq!(f.distinct, f.committed);
    assert!(f.duplicates <= bound, "duplicates {} above what was in flight ({bound})", f.duplicates);
    assert_eq!(f.order_violations, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_lanes_and_take_over_a_killed_ones() {
    const LANES: u16 = 12;
    const BATCH: usize = 200;
    let s = Arc::new(TestSchema::new(LANES).await);
    let topic = create_topic("relay-3i", 4).await;
    let args = ["--batch-size", "200"];
    let mut relays: Vec<RelayProcess> = (0..3).map(|_| RelayProcess::start(&s.name, &args)).collect();

    // Sample lane ownership all along: never two holders for one lane.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (s, sampling) = (s.clone(), sampling.clone());
        tokio::spawn(async move {
            let c = connect().await;
            let (mut samples, mut double) = (0, 0);
            while sampling.load(Ordering::Relaxed) {
                for holders in lane_holders(&c, &s).await.values() {
                    if holders.len() > 1 {
                        double += 1;
                    }
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (samples, double)
        })
    };

    let c = connect().await;
    // Wait until the three share the lanes evenly (4 each).
    let start = Instant::now();
    let spread = wait_for_spread(&c, &s, LANES, 3, start, "lanes not spread over 3 instances").await;
    println!("spread over 3 instances: {spread:?} after {:?}", start.elapsed());

    let topic_w = topic.clone();
    let sw = s.clone();
    let writers = tokio::spawn(async move { write_concurrently(&sw, &topic_w, 4, 5_000).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim_pid = relays[1].pid();
    relays[1].kill9();
    let killed_at = Instant::now();
    // The survivors take the dead one's lanes: all lanes held, by two instances, 6 each.
    wait_for_spread(&c, &s, LANES, 2, killed_at, "lanes of the killed instance not taken over").await;
    let takeover = killed_at.elapsed();
    let committed = writers.await.unwrap();
    wait_until_empty(&s, Duration::from_secs(180)).await;
    sampling.store(false, Ordering::Relaxed);
    let (samples, double) = sampler.await.unwrap();
    for (i, r) in relays.iter_mut().enumerate() {
        if i != 1 {
            assert_eq!(r.terminate(Duration::from_secs(30)), Some(0));
        }
    }

    let received = read_topic(&topic, committed.len(), Duration::from_secs(120));
    let f = figures(&committed, &received);
    let bound = (LANES as usize / 3) * BATCH;
    println!(
        "figures: killed pid {victim_pid}; takeover {takeover:?}; ownership samples {samples}, lanes with two holders {double}; \
         committed {}, distinct {}, duplicates {} (bound {bound}), lost {}, order violations {}",
        f.committed, f.distinct, f.duplicates, f.lost, f.order_violations
    );
    assert!(samples > 10);
    assert_eq!(double, 0, "a lane had two holders");
    assert_eq!(f.lost, 0);
    assert_eq!(f.distinct, f.committed);
    assert!(f.duplicates <= bound, "duplicates {} above the killed instance's in-flight bound {bound}", f.duplicates);
    assert_eq!(f.order_violations, 0);
}

/// Sessions per instance that hold lane locks: instance -> distinct backend pids.
async fn lock_sessions(c: &tokio_postgres::Client, s: &TestSchema) -> HashMap<String, usize> {
    let class = i64::from(outbox_relay::relay::lane_session::lane_lock_class(c, &s.name).await.unwrap());
    let rows = c
        .query(
            "SELECT coalesce(a.application_name, ''), count(DISTINCT l.pid)
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = $1::bigint::oid
             GROUP BY 1",
            &[&class],
        )
        .await
        .unwrap();
    let mut out: HashMap<String, usize> = HashMap::new();
    for r in rows {
        *out.entry(instance_of(r.get(0))).or_default() += r.get::<_, i64>(1) as usize;
    }
    out
}

/// On a session it shares with other lanes (`--max-sessions`) a lane claims at most
/// `--shared-batch-size` rows per statement, so its reply holds up the other lanes' replies there
/// for less; on a session of its own it claims `--batch-size`. Same rows, same lanes, the session
/// budget the only difference: the claims it took are counted, and every row is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_on_a_shared_lane_session_are_capped_and_on_a_session_of_its_own_are_not() {
    const ROWS: usize = 3_000;
    const SHARED_BATCH: usize = 25;
    let mut claims = Vec::new();
    for sessions in [1u16, 2] {
        let s = TestSchema::new(2).await;
        let topic = create_topic("relay-shared-claims", 2).await;
        let mut cfg = config(&s.name);
        cfg.batch_size = 1000;
        cfg.max_in_flight = 2000;
        cfg.max_sessions = Some(sessions);
        cfg.shared_batch_size = SHARED_BATCH;
        let relay = InProcess::start(cfg);
        relay.wait_lanes(2, Duration::from_secs(30)).await;
        let before = relay.stats.claims.load(Ordering::Relaxed);
        let c = connect().await;
        c.execute(
            &s.q("SELECT __SCHEMA__.enqueue($1, 'key-' || g, '\\x00') FROM generate_series(1, $2::int) g"),
            &[&topic, &(ROWS as i32)],
        )
        .await
        .unwrap();
        wait_until_empty(&s, Duration::from_secs(120)).await;
        let stats = relay.shutdown().await;
        let took = stats.claims.load(Ordering::Relaxed) - before;
        let received = read_topic(&topic, ROWS, Duration::from_secs(60));
        let distinct: HashSet<Uuid> = received.iter().map(|r| r.id).collect();
        println!(
            "--max-sessions {sessions}: {took} claims for {ROWS} rows, {} records at Kafka ({} distinct)",
            received.len(),
            distinct.len()
        );
        assert_eq!(distinct.len(), ROWS, "rows not delivered with --max-sessions {sessions}");
        // No fault, so no row goes twice. A claim from below the cursor after the lane's last
        // batch was acknowledged used to take that batch again while its delete was pending (it
        // did in about half the runs on busy cores).
        assert_eq!(received.len(), ROWS, "rows sent twice with no fault, --max-sessions {sessions}");
        claims.push(took);
    }
    // Two lanes on one session: each claim of at most 25 rows, so at least 3,000 / 25.
    assert!(claims[0] >= (ROWS / SHARED_BATCH) as u64, "shared session: {} claims for {ROWS} rows", claims[0]);
    // A session per lane: claims of up to 1,000 rows, plus empty ones (idle reads every 0.5 s
    // and more, wake-ups), whose number grows with how long a loaded machine takes to drain:
    // under half the capped count, with room for a slow run (4–12 measured, 18 under load).
    assert!(
        claims[1] < (ROWS / SHARED_BATCH / 2) as u64,
        "sessions of their own: {} claims for {ROWS} rows",
        claims[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_on_a_session_budget_are_balanced_let_go_and_taken_over() {
    const LANES: u16 = 16;
    const IN_FLIGHT: usize = 400;
    let s = Arc::new(TestSchema::new(LANES).await);
    let topic = create_topic("relay-budget", 4).await;
    let args = ["--batch-size", "200", "--max-in-flight", "400", "--max-sessions", "2"];
    let c = connect().await;
    // One instance takes every lane on two sessions.
    let mut first = RelayProcess::start(&s.name, &args);
    let start = Instant::now();
    wait_for_spread(&c, &s, LANES, 1, start, "one instance did not take all lanes").await;
    let sessions_alone = lock_sessions(&c, &s).await;
    assert!(sessions_alone.values().all(|n| *n <= 2), "more than 2 lock sessions: {sessions_alone:?}");

    let topic_w = topic.clone();
    let sw = s.clone();
    let writers = tokio::spawn(async move { write_concurrently(&sw, &topic_w, 4, 4_000).await });
    // A second one: the first lets go of half its lanes on sessions that stay open (unlock),
    // the second takes them.
    let mut second = RelayProcess::start(&s.name, &args);
    let joined = Instant::now();
    wait_for_spread(&c, &s, LANES, 2, joined, "lanes not shared by the two instances").await;
    let balanced = joined.elapsed();
    let sessions_two = lock_sessions(&c, &s).await;
    assert!(sessions_two.values().all(|n| *n <= 2), "more than 2 lock sessions: {sessions_two:?}");
    let holders = lane_holders(&c, &s).await;
    assert!(holders.values().all(|h| h.len() == 1), "a lane with two holders: {holders:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    first.kill9();
    let killed_at = Instant::now();
    wait_for_spread(&c, &s, LANES, 1, killed_at, "the killed instance's lanes were not taken over").await;
    let takeover = killed_at.elapsed();
    let sessions_after = lock_sessions(&c, &s).await;
    assert!(sessions_after.values().all(|n| *n <= 2), "more than 2 lock sessions: {sessions_after:?}");
    let committed = writers.await.unwrap();
    wait_until_empty(&s, Duration::from_secs(180)).await;
    assert_eq!(second.terminate(Duration::from_secs(30)), Some(0));

    let received = read_topic(&topic, committed.len(), Duration::from_secs(120));
    let f = figures(&committed, &received);
    let bound = (LANES as usize / 2) * IN_FLIGHT;
    println!(
        "figures: lock sessions alone {sessions_alone:?}, two instances {sessions_two:?} (balanced in {balanced:?}), \
         after the kill {sessions_after:?} (takeover {takeover:?}); committed {}, distinct {}, duplicates {} (bound \
         {bound}), lost {}, order violations {}",
        f.committed, f.distinct, f.duplicates, f.lost, f.order_violations
    );
    assert_eq!(f.committed, 16_000);
    assert_eq!(f.lost, 0);
    assert_eq!(f.distinct, f.committed);
    assert!(f.duplicates <= bound, "duplicates {} above the killed instance's in-flight bound {bound}", f.duplicates);
    assert_eq!(f.order_violations, 0);
}

/// One transaction takes its sequence number first (a row of `late-key`) and stays open while
/// `later` rows of seven other keys commit and go out; then it commits (`without_notify`: with
/// triggers off, as a logical-replication apply writes) and the outbox drains. Returns every
/// committed row, the late one last, and its id.
async fn commit_one_late(
    s: &TestSchema,
    topic: &str,
    later: usize,
    without_notify: bool,
) -> (Vec<(Uuid, String)>, Uuid) {
    let outbox = Outbox::new(s.name.clone());
    let msg = |k: &str| OutboxMessage::builder(topic).key(k).payload(b"x".to_vec()).build().unwrap();
    let mut slow = connect().await;
    let slow_tx = slow.transaction().await.unwrap();
    if without_notify {
        slow_tx.batch_execute("SET LOCAL session_replication_role = replica").await.unwrap();
    }
    let late_id = outbox.enqueue(&slow_tx, &msg("late-key")).await.unwrap(); // takes the lowest seq
    let mut fast = connect().await;
    let mut committed = vec![];
    for i in 0..later {
        let tx = fast.transaction().await.unwrap();
        let id = outbox.enqueue(&tx, &msg(&format!("k{}", i % 7))).await.unwrap();
        tx.commit().await.unwrap();
        committed.push((id, format!("k{}", i % 7)));
    }
    // The later rows go out while the early one is still uncommitted.
    wait_until_empty(s, Duration::from_secs(60)).await;
    let before = read_topic(topic, later, Duration::from_secs(60));
    assert!(!before.iter().any(|r| r.id == late_id), "the uncommitted row was sent");
    slow_tx.commit().await.unwrap();
    committed.push((late_id, "late-key".into()));
    wait_until_empty(s, Duration::from_secs(60)).await;
    (committed, late_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_after_later_rows_is_still_delivered() {
    // One lane, so the late row and the others share a lane head.
    let s = TestSchema::new(1).await;
    let topic = create_topic("relay-gap", 1).await;
    let mut cfg = config(&s.name);
    // The lane claims from a cursor past the late row's sequence: only its NOTIFY can bring the
    // lane back to it in this test.
    cfg.sweep_interval = Duration::from_secs(600);
    let relay = InProcess::start(cfg);
    let (committed, late_id) = commit_one_late(&s, &topic, 200, false).await;
    let stats = relay.shutdown().await;

    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    println!("figures: {f:?}, found by the sweep {}", stats.swept.load(Ordering::Relaxed));
    assert!(received.iter().any(|r| r.id == late_id), "the late-committing row was skipped");
    assert_eq!(f.lost, 0);
    assert_eq!(f.distinct, 201);
    assert_eq!(stats.swept.load(Ordering::Relaxed), 0);
}

/// Rows written while no relay ran have no NOTIFY left to announce them. A lane reads from its
/// start when it takes over, and that read tells it how far the lane goes: it claims the rest
/// batch after batch instead of one batch per poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_on_a_backlog_claims_it_batch_after_batch_without_notifies() {
    let s = TestSchema::new(2).await;
    let topic = create_topic("relay-backlog", 2).await;
    let outbox = Outbox::new(s.name.clone());
    let mut c = connect().await;
    let tx = c.transaction().await.unwrap();
    let messages: Vec<OutboxMessage> = (0..5_000)
        .map(|i| OutboxMessage::builder(topic.as_str()).key(format!("k{}", i % 40)).json(&i).build().unwrap())
        .collect();
    let ids = outbox.enqueue_batch(&tx, &messages).await.unwrap();
    tx.commit().await.unwrap();
    let committed: Vec<(Uuid, String)> =
        ids.into_iter().zip(messages.iter().map(|m| m.key().unwrap().to_owned())).collect();

    let mut cfg = config(&s.name);
    cfg.batch_size = 250;
    // Without its bound, a lane would claim one batch and then wait this long for a NOTIFY.
    cfg.poll_interval = Duration::from_secs(600);
    let relay = InProcess::start(cfg);
    wait_until_empty(&s, Duration::from_secs(60)).await;
    let stats = relay.shutdown().await;
    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    println!("figures: {f:?}, claims {}", stats.claims.load(Ordering::Relaxed));
    assert_eq!((f.distinct, f.lost, f.order_violations), (5_000, 0, 0));
}

/// A transaction whose first row the claim cursor passed while it was open (later rows of other
/// transactions committed first and were claimed) becomes visible all at once: a claim from the
/// cursor sees its later row, and must take its first row too, before it, or a key the
/// transaction wrote twice would go out in the wrong order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_from_the_cursor_takes_a_late_transaction_from_its_first_row() {
    let s = TestSchema::new(1).await;
    let outbox = Outbox::new(s.name.clone());
    let msg = |k: &str| OutboxMessage::builder("t").key(k).payload(b"x".to_vec()).build().unwrap();
    let seq_of = |id: Uuid| {
        let sql = s.q("SELECT seq FROM __SCHEMA__.messages WHERE id = $1");
        async move { connect().await.query_one(&sql, &[&id]).await.unwrap().get::<_, i64>(0) }
    };
    let db = outbox_relay::db::DbConfig::parse(&crate::support::database_url()).unwrap();
    let control = connect().await;
    let class = outbox_relay::relay::lane_session::lane_lock_class(&control, &s.name).await.unwrap();
    let session = outbox_relay::relay::lane_session::LaneSession::try_acquire(
        &db,
        &s.name,
        class,
        0,
        false,
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    .expect("the lane is free");

    let mut open = connect().await;
    let open_tx = open.transaction().await.unwrap();
    let first = outbox.enqueue(&open_tx, &msg("order-1")).await.unwrap();
    let mut other = connect().await;
    let tx = other.transaction().await.unwrap();
    let others = outbox.enqueue_batch(&tx, &[msg("order-2"), msg("order-3")]).await.unwrap();
    tx.commit().await.unwrap();
    // The relay's claim sees the committed rows only; its cursor moves past them, and so past the
    // open transaction's first row.
    let seen: Vec<Uuid> =
        session.claim(i64::MIN, i64::MAX, 100, &[]).await.unwrap().rows.iter().map(|r| r.id).collect();
    assert_eq!(seen, others);
    let cursor = seq_of(others[1]).await + 1;
    connect().await.execute(&s.q("DELETE FROM __SCHEMA__.messages WHERE id = ANY($1)"), &[&others]).await.unwrap();
    let second = outbox.enqueue(&open_tx, &msg("order-1")).await.unwrap();
    open_tx.commit().await.unwrap();
    assert!(seq_of(first).await < cursor && seq_of(second).await >= cursor);

    let claimed: Vec<Uuid> =
        session.claim(cursor, i64::MAX, 100, &[]).await.unwrap().rows.iter().map(|r| r.id).collect();
    assert_eq!(claimed, vec![first, second], "the transaction's rows, from its first, in order");
}

/// A late row that no NOTIFY announces (written with triggers disabled, as a logical-replication
/// apply or a restore does) sits below the lane's claim cursor: the sweep finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_row_without_a_notify_is_found_by_the_sweep() {
    let s = TestSchema::new(1).await;
    let topic = create_topic("relay-sweep", 1).await;
    let mut cfg = config(&s.name);
    cfg.sweep_interval = Duration::from_secs(1);
    // A lane that waited a whole poll interval reads its whole lane: not in this test.
    cfg.poll_interval = Duration::from_secs(600);
    let relay = InProcess::start(cfg);
    relay.wait_lanes(1, Duration::from_secs(30)).await;
    let (committed, late_id) = commit_one_late(&s, &topic, 100, true).await;
    let stats = relay.shutdown().await;

    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    let swept = stats.swept.load(Ordering::Relaxed);
    println!("figures: {f:?}, found by the sweep {swept}");
    assert!(received.iter().any(|r| r.id == late_id), "the row written without a NOTIFY was skipped");
    assert_eq!((f.lost, f.distinct), (0, 101));
    assert!(swept >= 1, "the row was delivered, but not through the sweep");
}

/// While another session holds an old snapshot, deleted rows cannot be cleaned up. A lane claims
/// from its cursor, so its index scans do not walk them: index entries read per delivered row
/// stay a handful (claiming from the lane's start read about a thousand here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_do_not_walk_rows_deleted_under_a_held_snapshot() {
    let s = TestSchema::new(1).await;
    let topic = create_topic("relay-horizon", 1).await;
    let mut cfg = config(&s.name);
    cfg.sweep_interval = Duration::from_secs(600);
    cfg.backlog_interval = Duration::from_secs(600);
    let relay = InProcess::start(cfg);
    relay.wait_lanes(1, Duration::from_secs(30)).await;

    let mut holder = connect().await;
    let held = holder
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    held.query_one("SELECT count(*) FROM pg_class", &[]).await.unwrap();
    let c = connect().await;
    let index_reads = || async {
        tokio::time::sleep(Duration::from_millis(1500)).await; // statistics reach pg_stat within a second
        c.query_one(
            "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelid = $1::text::regclass",
            &[&format!("{}.messages_lane_seq", s.name.ident())],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let before = index_reads().await;
    let mut committed = Vec::new();
    for i in 0..2000 {
        let key = format!("k{}", i % 20);
        let id: Uuid =
            c.query_one(&s.q("SELECT __SCHEMA__.enqueue($1, $2, '\\x01')"), &[&topic, &key]).await.unwrap().get(0);
        committed.push((id, key));
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Counting the outbox would read the index itself: wait on the relay's own count instead.
    let stats = &relay.stats;
    eventually(Duration::from_secs(60), Duration::from_millis(50), || async move {
        match stats.delivered.load(Ordering::Relaxed) {
            n if n >= 2000 => Ok(()),
            n => Err(format!("the relay delivered {n} of 2000 rows")),
        }
    })
    .await;
    let stats = relay.shutdown().await;
    let reads = index_reads().await - before;
    let dead: i64 = c
        .query_one(
            &s.q("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = '__SCHEMA__.messages'::regclass"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    held.rollback().await.unwrap();
    let claims = stats.claims.load(Ordering::Relaxed);
    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    let per_row = reads as f64 / committed.len() as f64;
    println!("figures: 2000 rows under a held snapshot, {claims} claims, {reads} index entries read ({per_row:.1} a row), {dead} dead tuples; {f:?}");
    assert_eq!((f.distinct, f.lost, f.order_violations), (2000, 0, 0));
    assert!(dead >= 1000, "the held snapshot kept only {dead} deleted rows: the test did not hold the horizon");
    assert!(per_row < 10.0, "{reads} index entries read for 2000 rows: claims walk the deleted rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_relay_waits_on_notify_and_sends_new_rows_promptly() {
    let s = TestSchema::new(4).await;
    let topic = create_topic("relay-idle", 1).await;
    let mut cfg = config(&s.name);
    cfg.poll_interval = Duration::from_secs(600); // only NOTIFY can wake it in this test
    let relay = InProcess::start(cfg);
    // Let it take its lanes and settle.
    let c = connect().await;
    relay.wait_lanes(4, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claims_before = relay.stats.claims.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_claims = relay.stats.claims.load(Ordering::Relaxed) - claims_before;

    let written_at = Instant::now();
    let id: Uuid = c.query_one(&s.q("SELECT __SCHEMA__.enqueue($1, 'k', '\\x01')"), &[&topic]).await.unwrap().get(0);
    let received = read_topic(&topic, 1, Duration::from_secs(60));
    let latency = written_at.elapsed();
    relay.shutdown().await;
    println!(
        "figures: claims in 3 s idle = {idle_claims}; commit-to-consumer with a 600 s poll interval = {latency:?}"
    );
    assert!(idle_claims <= 4, "an idle relay ran {idle_claims} claims in 3 s: a busy loop");
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].id, id);
    // With a 600 s poll interval, only the NOTIFY explains an arrival within a minute.
    assert!(latency < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_batches_and_exits_0() {
    let s = Arc::new(TestSchema::new(4).await);
    let topic = create_topic("relay-term", 2).await;
    let mut relay = RelayProcess::start(&s.name, &["--batch-size", "100"]);
    let (sw, tw) = (s.clone(), topic.clone());
    let writers = tokio::spawn(async move { write_concurrently(&sw, &tw, 2, 3_000).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let code = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "graceful shutdown exits 0");
    let c = connect().await;
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.relay_instances")).await, 0, "deregistered");
    assert!(lane_holders(&c, &s).await.is_empty(), "lanes released");

    let committed = writers.await.unwrap();
    let relay2 = InProcess::start(config(&s.name));
    wait_until_empty(&s, Duration::from_secs(120)).await;
    relay2.shutdown().await;
    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    println!("figures: {f:?}");
    assert_eq!(f.lost, 0);
    assert_eq!(f.duplicates, 0, "a graceful stop deletes what it delivered: nothing is sent twice");
    assert_eq!(f.order_violations, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_runs_under_a_role_with_only_the_documented_grants() {
    let s = TestSchema::new(4).await;
    let topic = create_topic("relay-role", 1).await;
    let admin = connect().await;
    let role = format!("relay_{}", s.name.as_str());
    admin.batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN")).await.unwrap();
    let grants = outbox_relay::schema::grants_sql(&s.name, &role, outbox_relay::schema::GrantsFor::Relay);
    admin.batch_execute(&grants).await.unwrap();

    for i in 0..300 {
        admin
            .execute(&s.q("SELECT __SCHEMA__.enqueue($1, $2, '\\x01')"), &[&topic, &format!("k{}", i % 5)])
            .await
            .unwrap();
    }
    let url = crate::support::database_url().replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let mut cfg = config(&s.name);
    cfg.db = outbox_relay::db::DbConfig::parse(&url).unwrap();
    cfg.archive = true;
    let relay = InProcess::start(cfg);
    let waited = wait_until_empty(&s, Duration::from_secs(60)).await;
    let stats = relay.shutdown().await;
    let archived = count(&admin, &s.q("SELECT count(*) FROM __SCHEMA__.delivered")).await;
    // The role cannot write outbox rows itself: it has no INSERT on messages.
    let as_role = outbox_relay::db::DbConfig::parse(&url).unwrap().connect().await.unwrap();
    let denied = as_role.execute(&s.q("SELECT __SCHEMA__.enqueue('t', 'k', '\\x01')"), &[]).await;
    admin.batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\"")).await.ok();
    println!(
        "figures: delivered {} as role {role} in {waited:?}, archived {archived}",
        stats.delivered.load(Ordering::Relaxed)
    );
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 300);
    assert_eq!(archived, 300, "every delivered row archived with its partition and offset");
    assert!(denied.is_err(), "the relay role holds only what the relay needs");
    let received = read_topic(&topic, 300, Duration::from_secs(60));
    let distinct: HashSet<Uuid> = received.iter().map(|r| r.id).collect();
    assert_eq!(distinct.len(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_and_idempotency_keys_are_pruned_by_age() {
    let s = TestSchema::new(2).await;
    let topic = create_topic("relay-prune", 1).await;
    let c = connect().await;
    for i in 0..50 {
        c.execute(
            &s.q("SELECT __SCHEMA__.enqueue($1, 'k', '\\x01', idempotency_key => $2)"),
            &[&topic, &format!("req-{i}")],
        )
        .await
        .unwrap();
    }
    let mut cfg = config(&s.name);
    cfg.archive = true;
    cfg.archive_retention = Duration::from_secs(3600);
    cfg.maintenance_interval = Duration::from_millis(300);
    let relay = InProcess::start(cfg);
    wait_until_empty(&s, Duration::from_secs(60)).await;
    // Age half of the archive and of the keys past their windows.
    c.batch_execute(&s.q("UPDATE __SCHEMA__.delivered SET delivered_at = now() - interval '2 hours'
           WHERE seq IN (SELECT seq FROM __SCHEMA__.delivered ORDER BY seq LIMIT 25);
         UPDATE __SCHEMA__.idempotency_keys SET created_at = now() - interval '8 days'
           WHERE id IN (SELECT id FROM __SCHEMA__.idempotency_keys LIMIT 20);"))
        .await
        .unwrap();
    let stats = &relay.stats;
    eventually(Duration::from_secs(30), Duration::from_millis(100), || async move {
        match stats.pruned.load(Ordering::Relaxed) {
            n if n >= 45 => Ok(()),
            n => Err(format!("pruned {n} of 45")),
        }
    })
    .await;
    relay.shutdown().await;
    let archive_left = count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.delivered")).await;
    let keys_left = count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.idempotency_keys")).await;
    println!("figures: archive 50 -> {archive_left}, idempotency keys 50 -> {keys_left}");
    assert_eq!(archive_left, 25, "only rows past the retention are pruned");
    assert_eq!(keys_left, 30, "only keys past the idempotency window are pruned");
}

/// An idempotency key outlives its window while its message is still pending or dead-lettered:
/// a writer retrying after the window then gets the same id back instead of an aborted business
/// transaction (primary key) or a second message. Keys of delivered messages go with the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_kept_while_their_message_is_pending_or_dead_lettered() {
    let s = TestSchema::new(2).await;
    let c = connect().await;
    let enqueue = s.q("SELECT __SCHEMA__.enqueue('keys-topic', 'k', '\\x01', idempotency_key => $1)");
    let mut ids = Vec::new();
    for i in 0..30 {
        let id: Uuid = c.query_one(&enqueue, &[&format!("req-{i}")]).await.unwrap().get(0);
        ids.push(id);
    }
    let (pending, rest) = ids.split_at(10);
    let (dead, delivered) = rest.split_at(10);
    // Ten become dead letters, ten are gone as delivered rows are; all keys are past the window.
    c.execute(
        &s.q("WITH gone AS (DELETE FROM __SCHEMA__.messages WHERE id = ANY($1) RETURNING *)
              INSERT INTO __SCHEMA__.dead_letters (id, seq, lane, topic, key, payload, headers, created_at,
                                                   attempts, reason, error_class)
              SELECT id, seq, lane, topic, key, payload, headers, created_at, 1, 'record_rejected', 'kafka.record_rejected'
              FROM gone"),
        &[&dead.to_vec()],
    )
    .await
    .unwrap();
    c.execute(&s.q("DELETE FROM __SCHEMA__.messages WHERE id = ANY($1)"), &[&delivered.to_vec()]).await.unwrap();
    c.execute(&s.q("UPDATE __SCHEMA__.idempotency_keys SET created_at = now() - interval '8 days'"), &[])
        .await
        .unwrap();

    // A relay that takes no lanes: only its maintenance runs, and the pending rows stay pending.
    let mut cfg = config(&s.name);
    cfg.max_lanes = Some(0);
    cfg.maintenance_interval = Duration::from_millis(200);
    let relay = InProcess::start(cfg);
    eventually(Duration::from_secs(30), Duration::from_millis(100), || async {
        let pruned = relay.stats.pruned.load(Ordering::Relaxed);
        if pruned >= 10 {
            Ok(())
        } else {
            Err(format!("pruned {pruned} of 10"))
        }
    })
    .await;
    // A few more maintenance passes, so that a wrong prune would have had its chance.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = relay.shutdown().await;
    let pruned = stats.pruned.load(Ordering::Relaxed);
    let kept: Vec<Uuid> = c
        .query(&s.q("SELECT id FROM __SCHEMA__.idempotency_keys"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    // Writers retry every request after the window.
    let mut same_id = 0;
    let mut failed = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        match c.query_one(&enqueue, &[&format!("req-{i}")]).await {
            Ok(row) => same_id += usize::from(row.get::<_, Uuid>(0) == *id),
            Err(e) => failed.push(format!("req-{i}: {e}")),
        }
    }
    let pending_rows = count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await;
    println!(
        "figures: keys pruned {pruned}, kept {}, retried requests answered with their id {same_id}, failed {}, pending rows {pending_rows}",
        kept.len(),
        failed.len()
    );
    assert_eq!(pruned, 10, "only the keys of delivered messages are pruned");
    assert!(pending.iter().chain(dead).all(|id| kept.contains(id)), "pending and dead-lettered keys are kept");
    assert!(failed.is_empty(), "no retried request aborts: {failed:?}");
    assert_eq!(same_id, 30, "every retry returns the id of its first write");
    assert_eq!(
        pending_rows, 20,
        "10 still pending + 10 re-enqueued after their delivered message's window; none twice"
    );
}

/// At a gentle rate a row wakes only its own lane, and a lane that sent everything it found waits
/// for the next NOTIFY instead of running a claim that finds nothing: about one claim per row,
/// however many lanes there are. (Before: every NOTIFY woke all 16 lanes, about 17 claims a row.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_at_a_gentle_rate_costs_about_one_claim() {
    let s = TestSchema::new(16).await;
    let topic = create_topic("relay-claims", 4).await;
    let mut cfg = config(&s.name);
    cfg.poll_interval = Duration::from_secs(600); // only NOTIFY wakes a lane in this test
    let relay = InProcess::start(cfg);
    relay.wait_lanes(16, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claims_before = relay.stats.claims.load(Ordering::Relaxed);
    // 200 single-row transactions, 10 ms apart, keys spread over every lane.
    let c = connect().await;
    let mut committed = Vec::new();
    for i in 0..200 {
        let key = format!("k{}", i % 50);
        let id: Uuid =
            c.query_one(&s.q("SELECT __SCHEMA__.enqueue($1, $2, '\\x01')"), &[&topic, &key]).await.unwrap().get(0);
        committed.push((id, key));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_until_empty(&s, Duration::from_secs(60)).await;
    let stats = relay.shutdown().await;
    let claims = stats.claims.load(Ordering::Relaxed) - claims_before;
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    let per_row = claims as f64 / delivered as f64;
    println!("figures: 16 lanes, 200 rows 10 ms apart: claims {claims}, delivered {delivered}, claims per row {per_row:.2}; {f:?}");
    assert_eq!(delivered, 200);
    assert_eq!((f.distinct, f.lost, f.order_violations), (200, 0, 0));
    assert!(per_row <= 1.5, "{claims} claims for {delivered} rows: idle lanes are being woken");
}
