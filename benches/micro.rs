//! Micro-benchmarks of the hot paths: the Kafka envelope of one row, building and validating a
//! message, and (with DATABASE_URL, as `scripts/bench.sh` provides) one claim statement.

#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use outbox_relay::outbox::OutboxMessage;
use outbox_relay::relay::envelope;
use outbox_relay::relay::lane_session::ClaimedRow;
use uuid::Uuid;

fn row() -> ClaimedRow {
    ClaimedRow {
        lane: 0,
        seq: 1,
        id: Uuid::now_v7(),
        topic: "orders.created".into(),
        key: Some("customer-42".into()),
        payload: Some(vec![b'x'; 200]).into(),
        headers: vec![("x-tenant".into(), "acme".into())],
        malformed: None,
        message_type: Some("com.example.order.created".into()),
        content_type: Some("application/json".into()),
        correlation_id: Some("req-1".into()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        created_at: chrono::Utc::now(),
        attempts: 0,
        waiting: false,
        wait_ms: 0,
        age_ms: 0,
        xid: None,
    }
}

fn envelope_encoding(c: &mut Criterion) {
    let r = row();
    c.bench_function("envelope headers for one row", |b| {
        b.iter(|| envelope::headers(std::hint::black_box(&r), "/outbox-relay/outbox"))
    });
}

fn message_building(c: &mut Criterion) {
    let order = serde_json::json!({"order_id": 42, "customer": "customer-42", "amount_cents": 1999});
    c.bench_function("build and validate a JSON message", |b| {
        b.iter(|| {
            OutboxMessage::builder("orders.created")
                .key("customer-42")
                .json(std::hint::black_box(&order))
                .message_type("com.example.order.created")
                .header("x-tenant", "acme")
                .build()
                .unwrap()
        })
    });
}

fn claim_sql(c: &mut Criterion) {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("claim SQL benchmark not run: DATABASE_URL is not set (run `bash scripts/bench.sh`)");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (client, stmt) = rt.block_on(async {
        let db = outbox_relay::db::DbConfig::parse(&url).unwrap();
        let mut client = db.connect().await.unwrap();
        let s = outbox_relay::schema::SchemaName::new("bench_micro_claim").unwrap();
        client.batch_execute("DROP SCHEMA IF EXISTS bench_micro_claim CASCADE").await.unwrap();
        outbox_relay::schema::migrate(&mut client, &s, Some(16)).await.unwrap();
        client
            .batch_execute(
                "INSERT INTO bench_micro_claim.messages (id, topic, key, payload)
                 SELECT gen_random_uuid(), 't', 'key-' || (g % 1000), convert_to(repeat('x', 200), 'UTF8')
                 FROM generate_series(1, 200000) g;
                 ANALYZE bench_micro_claim.messages;",
            )
            .await
            .unwrap();
        let stmt = client.prepare(&s.qualify(include_str!("../src/sql/claim.sql"))).await.unwrap();
        (client, stmt)
    });
    c.bench_function("claim 1000 rows of a lane (200,000 pending)", |b| {
        let none: Vec<i64> = Vec::new();
        b.iter(|| {
            rt.block_on(async {
                client.query(&stmt, &[&3i16, &1000i64, &i64::MIN, &i64::MAX, &none]).await.unwrap().len()
            })
        })
    });
    rt.block_on(client.batch_execute("DROP SCHEMA bench_micro_claim CASCADE")).unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = envelope_encoding, message_building, claim_sql
}
criterion_main!(benches);
