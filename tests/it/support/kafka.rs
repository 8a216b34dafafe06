//! Kafka helpers for tests: topics of their own, and reading everything a topic holds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::TopicPartitionList;
use uuid::Uuid;

use super::{kafka_brokers, unique_name};

/// Creates a topic with a unique name and `partitions` partitions.
pub async fn create_topic(prefix: &str, partitions: i32) -> String {
    create_topic_with(prefix, partitions, &[]).await
}

/// [`create_topic`] with topic configs (`max.message.bytes`, ...).
pub async fn create_topic_with(prefix: &str, partitions: i32, configs: &[(&str, &str)]) -> String {
    let name = unique_name(prefix).replace('_', "-");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", kafka_brokers()).create().expect("admin client");
    let mut topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let res = admin.create_topics([&topic], &opts).await.expect("create topic");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e:?}"));
    }
    name
}

/// One record as the tests look at it.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: Uuid,
    pub key: Option<String>,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` from the beginning of every partition until `expected` distinct ids were seen
/// (or more records than that, when duplicates arrive), or `within` passed.
pub fn read_topic(topic: &str, expected: usize, within: Duration) -> Vec<Received> {
    read_topic_from(&kafka_brokers(), topic, expected, within)
}

/// [`read_topic`] from another cluster (the mock cluster of a fault test).
pub fn read_topic_from(brokers: &str, topic: &str, expected: usize, within: Duration) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let partitions = md.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let deadline = Instant::now() + within;
    let mut quiet_since: Option<Instant> = None;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet_since = None;
                let headers: HashMap<String, String> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (x.key.to_owned(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let id = headers.get("ce_id").and_then(|s| s.parse().ok()).expect("every record has a ce_id");
                ids.insert(id);
                out.push(Received {
                    id,
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    partition: m.partition(),
                    offset: m.offset(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(e)) => panic!("consume {topic}: {e}"),
            None => {
                // Once every id is in, wait a moment more for duplicates still on their way.
                if ids.len() >= expected {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_millis(600) {
                        break;
                    }
                }
            }
        }
    }
    out
}

/// The delivery figures every reliability test reports.
#[derive(Debug, Default)]
pub struct Figures {
    pub committed: usize,
    pub records: usize,
    pub distinct: usize,
    pub duplicates: usize,
    pub lost: usize,
    pub order_violations: usize,
}

/// Compares what was committed (ids in sequence order, with keys) with what the topic holds:
/// distinct ids, duplicates, lost rows, and per key whether the first arrival of each message
/// follows sequence order (arrival = partition offset; one key lives in one partition).
pub fn figures(committed: &[(Uuid, String)], received: &[Received]) -> Figures {
    let mut first_offset: HashMap<Uuid, (i32, i64)> = HashMap::new();
    for r in received {
        let e = first_offset.entry(r.id).or_insert((r.partition, r.offset));
        if r.offset < e.1 {
            *e = (r.partition, r.offset);
        }
    }
    let committed_ids: std::collections::HashSet<Uuid> = committed.iter().map(|(id, _)| *id).collect();
    let lost = committed_ids.iter().filter(|id| !first_offset.contains_key(id)).count();
    let mut last_by_key: HashMap<&str, (i32, i64)> = HashMap::new();
    let mut order_violations = 0;
    for (id, key) in committed {
        if let Some(&pos) = first_offset.get(id) {
            if let Some(prev) = last_by_key.get(key.as_str()) {
                if prev.0 != pos.0 || prev.1 > pos.1 {
                    order_violations += 1;
                }
            }
            last_by_key.insert(key.as_str(), pos);
        }
    }
    let distinct = first_offset.keys().filter(|id| committed_ids.contains(id)).count();
    Figures {
        committed: committed.len(),
        records: received.len(),
        distinct,
        duplicates: received.len() - first_offset.len(),
        lost,
        order_violations,
    }
}
