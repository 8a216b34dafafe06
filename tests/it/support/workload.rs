//! Workloads the tests share: concurrent writers, waiting for the outbox to drain.

use std::time::Duration;

use outbox_relay::outbox::{Outbox, OutboxMessage};
use rand::Rng;
use uuid::Uuid;

use outbox_relay::schema::SchemaName;
use tokio_postgres::Client;

use super::{connect, count, TestSchema};

/// Writes `per_writer` rows from each of `writers` concurrent writers, in transactions of 1 to
/// 40 rows; each writer owns its keys (`w<n>-k<m>`), as a business entity's row lock would make
/// it. Returns (id, key) per writer in write order, concatenated.
pub async fn write_concurrently(s: &TestSchema, topic: &str, writers: usize, per_writer: usize) -> Vec<(Uuid, String)> {
    write_paced(s, topic, writers, per_writer, Duration::ZERO).await
}

/// [`write_concurrently`] with a pause after each transaction, to spread writes over time.
pub async fn write_paced(
    s: &TestSchema,
    topic: &str,
    writers: usize,
    per_writer: usize,
    pause: Duration,
) -> Vec<(Uuid, String)> {
    write_paced_on(&super::database_url(), &s.name, topic, writers, per_writer, pause).await
}

/// [`write_paced`] into `schema` of the database at `url`.
pub async fn write_paced_on(
    url: &str,
    schema: &SchemaName,
    topic: &str,
    writers: usize,
    per_writer: usize,
    pause: Duration,
) -> Vec<(Uuid, String)> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let outbox = Outbox::new(schema.clone());
        let topic = topic.to_owned();
        let db = outbox_relay::db::DbConfig::parse(url).expect("the URL parses");
        tasks.push(tokio::spawn(async move {
            let mut client = db.connect().await.expect("connect to PostgreSQL");
            let mut written = Vec::with_capacity(per_writer);
            let mut n = 0;
            while n < per_writer {
                let size = rand::rng().random_range(1..=40).min(per_writer - n);
                let batch: Vec<OutboxMessage> = (n..n + size)
                    .map(|i| {
                        OutboxMessage::builder(topic.as_str())
                            .key(format!("w{w}-k{}", i % 25))
                            .json(&serde_json::json!({ "writer": w, "n": i }))
                            .build()
                            .unwrap()
                    })
                    .collect();
                let tx = client.transaction().await.unwrap();
                let ids = outbox.enqueue_batch(&tx, &batch).await.unwrap();
                tx.commit().await.unwrap();
                for (id, m) in ids.into_iter().zip(&batch) {
                    written.push((id, m.key().unwrap().to_owned()));
                }
                n += size;
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            written
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

pub async fn wait_until_empty(s: &TestSchema, within: Duration) -> Duration {
    wait_until_empty_on(&connect().await, &s.name, within, Duration::from_millis(100)).await
}

/// [`wait_until_empty`] on any client and schema (a test's own server), looking every `poll`.
pub async fn wait_until_empty_on(c: &Client, schema: &SchemaName, within: Duration, poll: Duration) -> Duration {
    let sql = schema.qualify("SELECT count(*) FROM __SCHEMA__.messages");
    let sql = &sql;
    let (_, took) = super::eventually(within, poll, || async move {
        match count(c, sql).await {
            0 => Ok(()),
            left => Err(format!("{left} rows still in the outbox")),
        }
    })
    .await;
    took
}
