//! The unhappy path: broker outages, retryable and permanent produce errors, dead letters,
//! PostgreSQL sessions killed and the server restarted, blackholed connections.
//! librdkafka's mock cluster and the TCP proxy inject the faults; everything else is real.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::db::DbConfig;
use outbox_relay::outbox::{Outbox, OutboxMessage};
use outbox_relay::relay::{DeadLetterPolicy, RelayConfig};
use outbox_relay::retry::Backoff;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use uuid::Uuid;

use crate::support::kafka::{create_topic, figures, read_topic, read_topic_from};
use crate::support::pg_tls::TlsPostgres;
use crate::support::proxy::Proxy;
use crate::support::relay::{config, InProcess};
use crate::support::workload::{wait_until_empty, wait_until_empty_on, write_concurrently, write_paced};
use crate::support::{connect, count, database_url, eventually, unique_name, TestSchema};

fn mock_with_topic(partitions: i32) -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, String) {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique_name("mock").replace('_', "-");
    mock.create_topic(&topic, partitions, 1).expect("mock topic");
    (mock, topic)
}

/// A relay configuration against librdkafka's mock cluster. The mock appends a produce request
/// without checking the idempotent producer's sequence numbers, so with several requests of a
/// partition in flight, a failed request followed by a successful one makes librdkafka believe the
/// failed one was written too (see `mock_cluster_acknowledges_a_row_it_never_wrote...`). A real
/// broker refuses the second request instead. One request in flight keeps the mock honest; it is
/// set for the mock only, never for the relay's own defaults.
fn mock_config(s: &TestSchema, mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>) -> RelayConfig {
    let mut cfg = config(&s.name);
    cfg.producer.brokers = mock.bootstrap_servers();
    cfg.producer.properties.push(("max.in.flight.requests.per.connection".into(), "1".into()));
    cfg
}

/// Keys of the test schema's lanes: `lanes[n]` is a key that lands in lane `n`.
async fn key_per_lane(s: &TestSchema) -> Vec<String> {
    let c = connect().await;
    let mut keys: Vec<Option<String>> = vec![None; s.lanes as usize];
    for i in 0..1000 {
        let key = format!("lane-key-{i}");
        let lane: i16 = c.query_one(&s.q("SELECT __SCHEMA__.lane_of($1)"), &[&key]).await.unwrap().get(0);
        keys[lane as usize].get_or_insert(key);
        if keys.iter().all(Option::is_some) {
            break;
        }
    }
    keys.into_iter().map(|k| k.expect("a key for every lane")).collect()
}

async fn enqueue_one(s: &TestSchema, topic: &str, key: &str) -> Uuid {
    let mut c = connect().await;
    let tx = c.transaction().await.unwrap();
    let m = OutboxMessage::builder(topic).key(key).payload(b"x".to_vec()).build().unwrap();
    let id = Outbox::new(s.name.clone()).enqueue(&tx, &m).await.unwrap();
    tx.commit().await.unwrap();
    id
}

/// The test broker's artifact, reproduced on purpose: with two produce requests of one partition
/// in flight, the mock fails the first (a retryable error) and appends the second; librdkafka then
/// takes the first as written (an implicit acknowledgement, delivery report Ok without an offset)
/// and the relay deletes a row the mock never stored. A real broker would refuse the second request
/// (OUT_OF_ORDER_SEQUENCE_NUMBER). The relay counts such acknowledgements, and the archive shows the
/// row without an offset. With one request in flight, the same sequence loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_cluster_acknowledges_a_row_it_never_wrote_when_requests_overlap() {
    let mut figures_by_mode = Vec::new();
    for in_flight in [5, 1] {
        let (mock, topic) = mock_with_topic(1);
        let s = TestSchema::new(2).await;
        let keys = key_per_lane(&s).await;
        let mut cfg = config(&s.name);
        cfg.producer.brokers = mock.bootstrap_servers();
        cfg.producer.properties.push(("max.in.flight.requests.per.connection".into(), in_flight.to_string()));
        cfg.producer.message_timeout = Duration::from_secs(20);
        cfg.archive = true;
        let relay = InProcess::start(cfg);
        relay.wait_lanes(2, Duration::from_secs(30)).await;
        // Warm the producer (metadata, producer id) so that the two rows below are sent at once.
        enqueue_one(&s, &topic, &keys[0]).await;
        wait_until_empty(&s, Duration::from_secs(30)).await;
        // The next produce request fails with a retryable error, answered after 2 s; the second row
        // goes out (from the other lane) while the first request is still waiting for its answer.
        mock.broker_round_trip_time(1, Duration::from_millis(2000)).unwrap();
        mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS]);
        let first = enqueue_one(&s, &topic, &keys[0]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = enqueue_one(&s, &topic, &keys[1]).await;
        wait_until_empty(&s, Duration::from_secs(60)).await;
        let stats = relay.shutdown().await;
        // Read at full speed (the round-trip time applies to the reader too).
        mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
        let received = read_topic_from(&mock.bootstrap_servers(), &topic, 3, Duration::from_secs(30));
        let at_mock: std::collections::HashSet<Uuid> = received.iter().map(|r| r.id).collect();
        let archived: i64 = connect()
            .await
            .query_one(&s.q("SELECT kafka_offset FROM __SCHEMA__.delivered WHERE id = $1"), &[&first])
            .await
            .unwrap()
            .get(0);
        let f = (
            in_flight,
            at_mock.contains(&first),
            at_mock.contains(&second),
            archived,
            stats.acks_without_offset.load(Ordering::Relaxed),
        );
        println!(
            "figures: max.in.flight {in_flight}: first row at the mock {}, second {}, first archived at offset {},              acknowledgements without offset {}",
            f.1, f.2, f.3, f.4
        );
        figures_by_mode.push(f);
    }
    let (_, first_stored, second_stored, archived, no_offset) = figures_by_mode[0];
    assert!(second_stored, "the second request was appended");
    assert!(!first_stored, "the mock never stored the first row, yet librdkafka acknowledged it");
    assert!(archived < 0, "the archive shows the acknowledgement without an offset: {archived}");
    assert_eq!(no_offset, 1, "and the relay counted it");
    let (_, first_stored, second_stored, archived, no_offset) = figures_by_mode[1];
    assert!(first_stored && second_stored, "one request in flight: both rows stored");
    assert!(archived >= 0);
    assert_eq!(no_offset, 0);
}

/// A record the broker refuses for good (MESSAGE_TOO_LARGE, as a topic whose max.message.bytes is
/// below the producer's limit answers) must not let the later rows of its key through: under
/// park-key they wait with the parked key, and nothing of the key reaches Kafka. Without
/// `enable.gapless.guarantee`, librdkafka bumps the producer epoch after the refusal and sends the
/// rows behind it again, and they are stored.
///
/// The broker here is librdkafka's mock cluster answering what Apache Kafka answers: the refused
/// request, then OUT_OF_ORDER_SEQUENCE_NUMBER for the request behind it (built before the refusal
/// came back; its sequence number follows one that was never written). The mock does not check
/// sequence numbers itself, so the second answer is injected; the test broker (tansu) does not
/// enforce max.message.bytes at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_for_good_holds_back_the_later_rows_of_its_key() {
    let (mock, topic) = mock_with_topic(1);
    let s = TestSchema::new(1).await;
    let mut cfg = mock_config(&s, &mock);
    // One record per request, so that the refused record is alone in its request.
    cfg.producer.properties.push(("batch.num.messages".into(), "1".into()));
    cfg.dead_letter_policy = DeadLetterPolicy::ParkKey;
    let c = connect().await;
    let mut client = connect().await;
    let tx = client.transaction().await.unwrap();
    let outbox = Outbox::new(s.name.clone());
    let batch: Vec<OutboxMessage> = [10usize, 10, 10]
        .iter()
        .map(|n| OutboxMessage::builder(topic.as_str()).key("refused").payload(vec![7u8; *n]).build().unwrap())
        .collect();
    let ids = outbox.enqueue_batch(&tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
        ],
    );
    let relay = InProcess::start(cfg);
    let start = Instant::now();
    while count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.dead_letters")).await < 1 {
        if start.elapsed() > Duration::from_secs(30) {
            let rows = c
                .query(&s.q("SELECT key, attempts, last_error FROM __SCHEMA__.messages ORDER BY seq"), &[])
                .await
                .unwrap();
            let rows: Vec<(Option<String>, i32, Option<String>)> =
                rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
            panic!("the refused record was not dead-lettered: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Other keys flow meanwhile (through a new producer).
    let mut others = Vec::new();
    for _ in 0..5 {
        others.push((enqueue_one(&s, &topic, "other").await, "other".to_owned()));
    }
    let (c, sql) = (&c, &s.q("SELECT count(*) FROM __SCHEMA__.messages WHERE key = 'other'"));
    eventually(Duration::from_secs(30), Duration::from_millis(100), || async move {
        match count(c, sql).await {
            0 => Ok(()),
            n => Err(format!("{n} rows of other keys not delivered")),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = relay.shutdown().await;
    let waiting: Vec<Uuid> = c
        .query(&s.q("SELECT id FROM __SCHEMA__.messages WHERE key = 'refused' ORDER BY seq"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let dead = dead_letters(&c, &s).await;
    let received = read_topic_from(&mock.bootstrap_servers(), &topic, others.len(), Duration::from_secs(20));
    let of_refused_key = received.iter().filter(|r| r.key.as_deref() == Some("refused")).count();
    let f = figures(&others, &received);
    println!(
        "figures: dead letters {dead:?}; rows of the key still waiting {}, records of the key at Kafka {of_refused_key}; \
         other key: {} of {} delivered, order violations {}; producers replaced {}, order hazards {}",
        waiting.len(),
        f.distinct,
        f.committed,
        f.order_violations,
        stats.producer_generations.load(Ordering::Relaxed),
        stats.order_hazards.load(Ordering::Relaxed)
    );
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].0.as_deref(), dead[0].1.as_str()), (Some("refused"), "message_too_large"));
    assert_eq!(waiting, ids[1..].to_vec(), "the later rows of the key wait, parked");
    assert_eq!(of_refused_key, 0, "nothing of the refused key reached Kafka");
    assert_eq!((f.distinct, f.lost, f.order_violations), (5, 0, 0), "other keys flow");
    assert_eq!(stats.order_hazards.load(Ordering::Relaxed), 0);
}

/// Per-key order while the broker goes down and up again and again, with a batch deadline shorter
/// than the outages: every deadline replaces the producer, and what it held is sent again; a
/// timeout gives duplicates, never a reorder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_while_the_broker_flaps() {
    let (mock, topic) = mock_with_topic(2);
    let s = Arc::new(TestSchema::new(4).await);
    let mut cfg = mock_config(&s, &mock);
    cfg.producer.message_timeout = Duration::from_millis(700);
    cfg.breaker.failure_threshold = 3;
    cfg.breaker.cooldown = Duration::from_millis(300);
    cfg.breaker.max_cooldown = Duration::from_secs(1);
    cfg.retry = Backoff { base: Duration::from_millis(50), cap: Duration::from_millis(500) };
    cfg.max_attempts = 1000;
    let relay = InProcess::start(cfg);
    let writer = {
        let s = s.clone();
        let topic = topic.clone();
        tokio::spawn(async move { write_paced(&s, &topic, 3, 600, Duration::from_millis(200)).await })
    };
    // Six outages, 0.5 s apart: the first outlasts the batch deadline, the others last 0.3 to
    // 1.2 s; count those that began while rows were written.
    let mut flaps = 0;
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        flaps += usize::from(!writer.is_finished());
        mock.broker_down(1).unwrap();
        let outage = if i == 0 { 1500 } else { rand::random_range(300..1200) };
        tokio::time::sleep(Duration::from_millis(outage)).await;
        mock.broker_up(1).unwrap();
    }
    let committed = writer.await.unwrap();
    let recovery = wait_until_empty(&s, Duration::from_secs(120)).await;
    let stats = relay.shutdown().await;
    let received = read_topic_from(&mock.bootstrap_servers(), &topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    let dead = dead_letters(&connect().await, &s).await;
    println!(
        "figures: flaps {flaps}; committed {}, distinct {}, duplicates {}, lost {}, order violations {}; producers \
         replaced {}, breaker opened {}, retries {}, order hazards {}, recovery {recovery:?}",
        f.committed,
        f.distinct,
        f.duplicates,
        f.lost,
        f.order_violations,
        stats.producer_generations.load(Ordering::Relaxed),
        stats.breaker_opened.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed),
        stats.order_hazards.load(Ordering::Relaxed)
    );
    assert!(flaps >= 3, "the broker flapped while rows were written");
    assert!(stats.producer_generations.load(Ordering::Relaxed) >= 1, "deadlines passed and producers were replaced");
    assert_eq!(f.lost, 0);
    assert_eq!(f.distinct, f.committed);
    assert_eq!(f.order_violations, 0, "per key, first arrivals follow sequence order");
    assert_eq!(stats.order_hazards.load(Ordering::Relaxed), 0);
    assert!(dead.is_empty(), "flapping dead-letters nothing: {dead:?}");
}

async fn dead_letters(c: &tokio_postgres::Client, s: &TestSchema) -> Vec<(Option<String>, String, i32, String)> {
    c.query(&s.q("SELECT key, reason, attempts, error_class FROM __SCHEMA__.dead_letters ORDER BY seq"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_opens_then_closes_the_breaker_and_loses_nothing() {
    let (mock, topic) = mock_with_topic(4);
    let s = Arc::new(TestSchema::new(4).await);
    let mut cfg = mock_config(&s, &mock);
    cfg.producer.message_timeout = Duration::from_millis(1500);
    cfg.breaker.failure_threshold = 2;
    cfg.breaker.cooldown = Duration::from_millis(500);
    cfg.breaker.max_cooldown = Duration::from_secs(2);
    cfg.retry = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(2) };
    let relay = InProcess::start(cfg);
    let mut committed = write_concurrently(&s, &topic, 2, 250).await;
    wait_until_empty(&s, Duration::from_secs(60)).await;

    mock.broker_down(1).unwrap();
    let down_at = Instant::now();
    committed.extend(write_concurrently(&s, &topic, 2, 250).await);
    // Down for four times message.timeout.ms.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let opened = relay.stats.breaker_opened.load(Ordering::Relaxed);
    let c = connect().await;
    let backlog = count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await;
    mock.broker_up(1).unwrap();
    let outage = down_at.elapsed();
    let recovery = wait_until_empty(&s, Duration::from_secs(90)).await;
    let stats = relay.shutdown().await;

    let received = read_topic_from(&mock.bootstrap_servers(), &topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    let dead = dead_letters(&c, &s).await;
    let probes = stats.probes.load(Ordering::Relaxed);
    println!(
        "figures: outage {outage:?}, backlog at its end {backlog}, breaker opened {opened} / closed {}, probes while open {probes}, \
         retries recorded {}, recovery after broker up {recovery:?}; committed {}, distinct {}, duplicates {}, lost {}, \
         order violations {}, dead letters {}",
        stats.breaker_closed.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed),
        f.committed, f.distinct, f.duplicates, f.lost, f.order_violations, dead.len()
    );
    assert!(opened >= 1, "the breaker opened during the outage");
    assert!(stats.breaker_closed.load(Ordering::Relaxed) >= 1, "and closed after it");
    assert!(backlog > 0, "rows waited in the outbox during the outage");
    assert!(probes <= 20, "no retry storm: {probes} probes in a {outage:?} outage");
    assert_eq!(f.lost, 0);
    assert_eq!(f.distinct, f.committed);
    assert_eq!(f.order_violations, 0);
    assert!(dead.is_empty(), "an outage dead-letters nothing: {dead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_produce_errors_are_retried_with_growing_jittered_delays_in_key_order() {
    let (mock, topic) = mock_with_topic(2);
    let s = TestSchema::new(2).await;
    let cap = Duration::from_millis(1500);
    let mut cfg = mock_config(&s, &mock);
    cfg.producer.message_timeout = Duration::from_millis(400);
    // Keep the breaker out of this test: it is about per-row retries.
    cfg.breaker.failure_threshold = 10_000;
    cfg.breaker.min_volume = 10_000;
    cfg.retry = Backoff { base: Duration::from_millis(50), cap };
    cfg.max_attempts = 100;
    // The broker answers produce requests with a retryable error for a while.
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 60]);
    let relay = InProcess::start(cfg);
    let committed = write_concurrently(&s, &topic, 2, 100).await;
    wait_until_empty(&s, Duration::from_secs(120)).await;
    let stats = relay.shutdown().await;

    let dead = dead_letters(&connect().await, &s).await;
    let delays: Vec<(u32, Duration)> = stats.retry_delays.lock().unwrap().iter().copied().collect();
    let received = read_topic_from(&mock.bootstrap_servers(), &topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    let max_at = |a: u32| delays.iter().filter(|(n, _)| *n == a).map(|(_, d)| *d).max();
    let distinct: std::collections::HashSet<Duration> = delays.iter().map(|(_, d)| *d).collect();
    let deepest = delays.iter().map(|(n, _)| *n).max().unwrap_or(0);
    println!(
        "figures: retries {}, distinct delays {}, deepest attempt {deepest}, max delay at attempt 0 {:?}, at the deepest {:?}, \
         cap {cap:?}; committed {}, distinct {}, duplicates {}, lost {}, order violations {}",
        delays.len(), distinct.len(), max_at(0), max_at(deepest), f.committed, f.distinct, f.duplicates, f.lost, f.order_violations
    );
    assert!(delays.len() >= 5, "rows were retried: {}", delays.len());
    assert!(distinct.len() > 1, "jittered delays are not all equal");
    assert!(delays.iter().all(|(_, d)| *d <= cap), "every delay stays under the cap");
    for (attempt, d) in &delays {
        let ceiling = Duration::from_millis(50 * (1u64 << (*attempt).min(20))).min(cap);
        assert!(*d <= ceiling, "attempt {attempt}: delay {d:?} above its ceiling {ceiling:?}");
    }
    assert!(deepest >= 2, "some rows failed several times, so their delay ceilings grew");
    assert!(dead.is_empty(), "retryable errors dead-letter nothing: {dead:?}");
    assert_eq!(f.lost, 0);
    assert_eq!(f.distinct, f.committed);
    assert_eq!(f.order_violations, 0, "per-key order held through the retries");
}

/// Rows written by raw SQL that break the rules, next to good ones.
async fn insert_bad_rows(c: &tokio_postgres::Client, s: &TestSchema, topic: &str) {
    let big = vec![7u8; 1_500_000];
    let insert = s.q(
        "INSERT INTO __SCHEMA__.messages (id, topic, key, payload, headers) VALUES ($1, $2, $3, $4, $5::text::jsonb)",
    );
    let big_id = Uuid::now_v7();
    c.execute(&insert, &[&big_id, &topic, &"big", &big, &"{}"]).await.unwrap();
    // A dead letter of the same id from long ago: dead-lettering it again must not wedge the lane.
    c.execute(
        &s.q("INSERT INTO __SCHEMA__.dead_letters (id, seq, lane, topic, key, headers, created_at, attempts, reason, error_class)
              VALUES ($1, 0, 0, 'old', 'big', '{}', now() - interval '30 days', 9, 'retries_exhausted', 'kafka.timeout')"),
        &[&big_id],
    )
    .await
    .unwrap();
    c.execute(&insert, &[&Uuid::now_v7(), &"not a topic!", &"badtopic", &b"x".to_vec(), &"{}"]).await.unwrap();
    c.execute(&insert, &[&Uuid::now_v7(), &topic, &"badheaders", &b"x".to_vec(), &"{\"n\": 1}"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_dead_lettered_after_one_attempt_while_others_flow() {
    let s = TestSchema::new(4).await;
    let topic = create_topic("perm", 2).await;
    let c = connect().await;
    let mut committed = write_concurrently(&s, &topic, 1, 100).await;
    insert_bad_rows(&c, &s, &topic).await;
    committed.extend(write_concurrently(&s, &topic, 1, 100).await);
    let relay = InProcess::start(config(&s.name));
    wait_until_empty(&s, Duration::from_secs(60)).await;
    let stats = relay.shutdown().await;

    let dead = dead_letters(&c, &s).await;
    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    println!(
        "figures: dead letters {dead:?}; good rows committed {}, distinct {}, lost {}",
        f.committed, f.distinct, f.lost
    );
    let reason_of = |k: &str| dead.iter().find(|d| d.0.as_deref() == Some(k)).map(|d| (d.1.as_str(), d.2));
    assert_eq!(reason_of("big"), Some(("message_too_large", 1)));
    assert_eq!(reason_of("badtopic"), Some(("malformed_row", 1)));
    assert_eq!(reason_of("badheaders"), Some(("malformed_row", 1)));
    assert_eq!(dead.len(), 3);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 3);
    assert_eq!(f.lost, 0, "the good rows kept flowing");
    assert_eq!(f.distinct, 200);
    let errors: Vec<String> = c
        .query(&s.q("SELECT last_error FROM __SCHEMA__.dead_letters"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(errors.iter().all(|e| !e.is_empty()), "each dead letter says what failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_is_dead_lettered_after_one_attempt() {
    let (mock, topic) = mock_with_topic(1);
    let s = TestSchema::new(2).await;
    let mut cfg = mock_config(&s, &mock);
    cfg.producer.properties = vec![
        ("allow.auto.create.topics".into(), "false".into()),
        ("topic.metadata.propagation.max.ms".into(), "500".into()),
    ];
    let c = connect().await;
    let committed = write_concurrently(&s, &topic, 1, 50).await;
    c.execute(&s.q("SELECT __SCHEMA__.enqueue('no-such-topic', 'lost-key', '\\x01')"), &[]).await.unwrap();
    let relay = InProcess::start(cfg);
    wait_until_empty(&s, Duration::from_secs(60)).await;
    relay.shutdown().await;
    let dead = dead_letters(&c, &s).await;
    let received = read_topic_from(&mock.bootstrap_servers(), &topic, committed.len(), Duration::from_secs(30));
    let f = figures(&committed, &received);
    println!("figures: dead letters {dead:?}; others delivered {} of {}", f.distinct, f.committed);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, "unknown_topic");
    assert_eq!(dead[0].2, 1, "after one attempt");
    assert_eq!(f.lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_key_holds_later_rows_of_the_key_until_an_operator_acts() {
    // One lane: the rows written after the key was parked move the lane's claim cursor past the
    // parked ones, so only the discard's announcement brings the lane back to them.
    let s = TestSchema::new(1).await;
    let topic = create_topic("park", 2).await;
    let c = connect().await;
    let outbox = Outbox::new(s.name.clone()).with_max_payload_bytes(2_000_000);
    let msg = |key: &str, size: usize| {
        OutboxMessage::builder(topic.as_str()).key(key).payload(vec![1u8; size]).build().unwrap()
    };
    let mut batch = vec![msg("parked", 1_500_000)]; // too large for the producer: dead-lettered
    for i in 0..5 {
        batch.push(msg("parked", 10));
        batch.push(msg(&format!("free-{i}"), 10));
    }
    let mut client = connect().await;
    let tx = client.transaction().await.unwrap();
    let ids = outbox.enqueue_batch(&tx, &batch).await.unwrap();
    tx.commit().await.unwrap();

    let mut cfg = config(&s.name);
    cfg.dead_letter_policy = DeadLetterPolicy::ParkKey;
    cfg.sweep_interval = Duration::from_secs(600);
    let relay = InProcess::start(cfg);
    let (cr, left_sql, dead_sql) =
        (&c, &s.q("SELECT count(*) FROM __SCHEMA__.messages"), &s.q("SELECT count(*) FROM __SCHEMA__.dead_letters"));
    eventually(Duration::from_secs(30), Duration::from_millis(100), || async move {
        match (count(cr, left_sql).await, count(cr, dead_sql).await) {
            (5, 1) => Ok(()),
            (left, dead) => Err(format!("left {left}, dead {dead}")),
        }
    })
    .await;
    // Hold for a while: nothing of the parked key moves.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.messages WHERE key = 'parked'")).await;
    let parked = count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.parked_keys WHERE key = 'parked'")).await;
    // Other keys keep flowing while the key is parked.
    for i in 5..10 {
        outbox.enqueue(&c, &msg(&format!("free-{i}"), 10)).await.unwrap();
    }
    eventually(Duration::from_secs(30), Duration::from_millis(100), || async move {
        match count(cr, left_sql).await {
            n if n <= 5 => Ok(()),
            n => Err(format!("{n} rows left: rows of free keys wait behind a parked key")),
        }
    })
    .await;
    let free = read_topic(&topic, 10, Duration::from_secs(30));
    // The operator discards the dead letter, which unparks the key.
    let dead_id = ids[0].to_string();
    let audit = outbox_relay::ops::Audit { actor: "test".into(), why: Some("oversized".into()) };
    let discarded =
        outbox_relay::ops::discard(&mut client, &s.name, outbox_relay::ops::Source::Relay, &[dead_id], &audit)
            .await
            .unwrap();
    assert_eq!(discarded, 1);
    wait_until_empty(&s, Duration::from_secs(30)).await;
    relay.shutdown().await;
    let all = read_topic(&topic, 15, Duration::from_secs(30));
    let parked_order: Vec<Uuid> = all.iter().filter(|r| r.key.as_deref() == Some("parked")).map(|r| r.id).collect();
    let expected: Vec<Uuid> =
        ids.iter().zip(&batch).skip(1).filter(|(_, m)| m.key() == Some("parked")).map(|(id, _)| *id).collect();
    println!("figures: while parked, rows of the key waiting {waiting}, other keys delivered {}; after unparking {} delivered in order", free.len(), parked_order.len());
    assert_eq!(waiting, 5, "later rows of the parked key wait");
    assert_eq!(parked, 1);
    assert_eq!(free.len(), 10, "other keys flow");
    assert!(free.iter().all(|r| r.key.as_deref() != Some("parked")));
    assert_eq!(parked_order, expected, "after the operator acts they go, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_recovers_by_itself_from_killed_sessions_and_a_server_restart() {
    let server = TlsPostgres::start_with(false);
    let url = server.url("127.0.0.1", "sslmode=disable");
    let db = DbConfig::parse(&url).unwrap();
    let schema = outbox_relay::schema::SchemaName::new("restart_outbox").unwrap();
    let mut admin = db.connect().await.unwrap();
    outbox_relay::schema::migrate(&mut admin, &schema, Some(4)).await.unwrap();
    let topic = create_topic("pgfault", 2).await;
    let mut cfg = config(&schema);
    cfg.db = db.clone();
    cfg.batch_size = 20;
    cfg.max_in_flight = 40;
    let relay = InProcess::start(cfg);

    // Writers use idempotency keys, so a commit whose outcome a restart hid is simply retried.
    let writer_db = db.clone();
    let (schema_w, topic_w) = (schema.clone(), topic.clone());
    let writer = tokio::spawn(async move {
        let outbox = Outbox::new(schema_w);
        let mut committed = Vec::new();
        let mut client: Option<tokio_postgres::Client> = None;
        for n in 0..3000usize {
            let key = format!("k{}", n % 10);
            let m = OutboxMessage::builder(topic_w.as_str())
                .key(&key)
                .json(&n)
                .idempotency_key(format!("req-{n}"))
                .build()
                .unwrap();
            loop {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = writer_db.connect().await.ok();
                }
                let Some(c) = client.as_mut() else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let attempt = async {
                    let tx = c.transaction().await.map_err(|e| e.to_string())?;
                    let id = outbox.enqueue(&tx, &m).await.map_err(|e| e.to_string())?;
                    tx.commit().await.map_err(|e| e.to_string())?;
                    Ok::<Uuid, String>(id)
                };
                match attempt.await {
                    Ok(id) => {
                        committed.push((id, key.clone()));
                        break;
                    }
                    Err(_) => {
                        client = None;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            if n % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        }
        committed
    });

    let mut killed = 0u64;
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let c = db.connect().await.unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name LIKE 'outbox-relay%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        killed += n as u64;
        println!("round {round}: terminated {n} relay sessions");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acquired_before = relay.stats.lanes_acquired.load(Ordering::Relaxed);
    server.restart();
    let restarted_at = Instant::now();
    // Recovery: every lane owned again after the restart cut all sessions.
    let stats = &relay.stats;
    let (_, lanes_back) = eventually(Duration::from_secs(60), Duration::from_millis(50), || async move {
        match stats.lanes_acquired.load(Ordering::Relaxed) - acquired_before {
            n if n >= 4 => Ok(()),
            n => Err(format!("{n} of 4 lanes re-acquired after the restart")),
        }
    })
    .await;
    let committed = writer.await.unwrap();
    let db_ref = &db;
    eventually(Duration::from_secs(120), Duration::from_millis(200), || async move {
        match db_ref.connect().await {
            Ok(c) => match count(&c, "SELECT count(*) FROM restart_outbox.messages").await {
                0 => Ok(()),
                left => Err(format!("{left} rows left")),
            },
            Err(e) => Err(format!("cannot connect: {e}")),
        }
    })
    .await;
    let recovered = restarted_at.elapsed();
    let stats = relay.shutdown().await;
    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    println!(
        "figures: sessions terminated {killed}, lane sessions lost {}, all lanes owned again {lanes_back:?} after the restart, \
         outbox drained {recovered:?} after it; \
         committed {}, distinct {}, duplicates {}, lost {}, order violations {}",
        stats.sessions_lost.load(Ordering::Relaxed), f.committed, f.distinct, f.duplicates, f.lost, f.order_violations
    );
    assert!(killed > 0);
    assert!(stats.sessions_lost.load(Ordering::Relaxed) > 0);
    assert_eq!(f.committed, 3000);
    assert_eq!(f.lost, 0, "rows lost");
    // Each of the four interruptions can resend at most what a lane has in flight (40) per lane (4).
    assert!(f.duplicates <= 4 * 4 * 40, "duplicates {} beyond what was in flight", f.duplicates);
    assert_eq!(f.order_violations, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_database_connection_does_not_hang_the_relay() {
    let s = Arc::new(TestSchema::new(2).await);
    let topic = create_topic("blackhole", 1).await;
    let target = {
        let cfg = DbConfig::parse(&database_url()).unwrap();
        format!("127.0.0.1:{}", cfg.config().get_ports()[0])
    };
    let proxy = Proxy::start(target).await;
    let url = {
        let cfg = DbConfig::parse(&database_url()).unwrap();
        let port = cfg.config().get_ports()[0];
        database_url().replace(&format!(":{port}/"), &format!(":{}/", proxy.port))
    };
    let mut cfg = config(&s.name);
    cfg.db = DbConfig::parse(&url).unwrap().with_connect_timeout(Duration::from_secs(1));
    cfg.db_call_timeout = Duration::from_secs(2);
    cfg.heartbeat_interval = Duration::from_millis(300);
    cfg.poll_interval = Duration::from_millis(200);
    cfg.shutdown_timeout = Duration::from_secs(3);
    let relay = InProcess::start(cfg);
    let mut committed = write_concurrently(&s, &topic, 1, 200).await;
    wait_until_empty(&s, Duration::from_secs(30)).await;

    proxy.set_blackhole(true);
    let holed_at = Instant::now();
    // Writers go straight to the server; only the relay's path is cut.
    let (sw, tw) = (s.clone(), topic.clone());
    let writes = tokio::spawn(async move { write_paced(&sw, &tw, 1, 200, Duration::from_millis(20)).await });
    let lost_before = relay.stats.sessions_lost.load(Ordering::Relaxed);
    let detected = loop {
        if relay.stats.sessions_lost.load(Ordering::Relaxed) > lost_before {
            break holed_at.elapsed();
        }
        assert!(holed_at.elapsed() < Duration::from_secs(30), "the relay hung on a blackholed connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_blackhole(false);
    proxy.reset_connections();
    committed.extend(writes.await.unwrap());
    let recovered = wait_until_empty(&s, Duration::from_secs(60)).await;

    // A shutdown while the path is blackholed still ends within its deadlines.
    proxy.set_blackhole(true);
    let stop_at = Instant::now();
    relay.shutdown().await;
    let stopped = stop_at.elapsed();
    proxy.set_blackhole(false);
    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    println!(
        "figures: blackhole detected after {detected:?} (call timeout 2 s), drained {recovered:?} after it lifted, \
         shutdown under blackhole took {stopped:?}; committed {}, distinct {}, lost {}",
        f.committed, f.distinct, f.lost
    );
    assert!(detected < Duration::from_secs(15));
    assert!(stopped < Duration::from_secs(20), "shutdown hung: {stopped:?}");
    assert_eq!(f.lost, 0);
}

/// The lane's bookkeeping commits without waiting for the disk (`synchronous_commit = off`): a
/// PostgreSQL crash right after a burst can lose the delete of rows the broker acknowledged. They
/// come back and are delivered again (duplicates, which the inbox absorbs); nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_whose_delete_a_database_crash_lost_are_delivered_again() {
    let server = TlsPostgres::start_with(false);
    let db = DbConfig::parse(&server.url("127.0.0.1", "sslmode=disable")).unwrap();
    let schema = outbox_relay::schema::SchemaName::new("crash_outbox").unwrap();
    let mut admin = db.connect().await.unwrap();
    outbox_relay::schema::migrate(&mut admin, &schema, Some(4)).await.unwrap();
    let topic = create_topic("pgcrash", 2).await;
    // Widen the window in which an asynchronous commit is not yet on disk: the WAL writer waits
    // 10 s, and the relay's synchronous heartbeats (which flush the WAL before them) come every 2 s.
    admin.batch_execute("ALTER SYSTEM SET wal_writer_delay = '10s'").await.unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let mut cfg = config(&schema);
    cfg.db = db.clone();
    cfg.heartbeat_interval = Duration::from_secs(2);
    cfg.instance_timeout = Duration::from_secs(10);
    let relay = InProcess::start(cfg);

    // A burst, committed by the writer as usual (synchronously).
    let outbox = Outbox::new(schema.clone());
    let mut committed = Vec::new();
    for chunk in 0..10 {
        let batch: Vec<OutboxMessage> = (0..200)
            .map(|i| {
                OutboxMessage::builder(topic.as_str())
                    .key(format!("k{}", i % 20))
                    .json(&(chunk * 200 + i))
                    .build()
                    .unwrap()
            })
            .collect();
        let tx = admin.transaction().await.unwrap();
        let ids = outbox.enqueue_batch(&tx, &batch).await.unwrap();
        tx.commit().await.unwrap();
        committed.extend(ids.into_iter().zip(batch.iter().map(|m| m.key().unwrap().to_owned())));
    }
    // The moment the relay has deleted the last acknowledged row: crash the server.
    wait_until_empty_on(&admin, &schema, Duration::from_secs(60), Duration::from_millis(5)).await;
    server.crash_and_restart();
    let admin = db.connect().await.unwrap();
    let came_back: i64 =
        admin.query_one(&schema.qualify("SELECT count(*) FROM __SCHEMA__.messages"), &[]).await.unwrap().get(0);
    wait_until_empty_on(&admin, &schema, Duration::from_secs(90), Duration::from_millis(100)).await;
    let stats = relay.shutdown().await;
    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    println!(
        "figures: committed {}, rows back in the outbox after the crash {came_back}, distinct {}, duplicates {}, lost {}, \
         order violations {}; lane sessions lost {}",
        f.committed, f.distinct, f.duplicates, f.lost, f.order_violations, stats.sessions_lost.load(Ordering::Relaxed)
    );
    assert_eq!(f.lost, 0);
    assert_eq!(f.distinct, f.committed);
    assert_eq!(f.order_violations, 0);
    assert!(f.duplicates as i64 >= came_back, "every row that came back was delivered again");
}
