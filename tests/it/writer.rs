//! The writer API and the SQL contract against a real PostgreSQL server.

use outbox_relay::db::DbConfig;
use outbox_relay::outbox::{idempotent_id, EnqueueError, InvalidMessage, Outbox, OutboxMessage};
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::support::{connect, count, database_url, proxy::Proxy, TestSchema};

fn message(key: &str, n: usize) -> OutboxMessage {
    OutboxMessage::builder("orders.events")
        .key(key)
        .json(&serde_json::json!({ "order": key, "n": n }))
        .message_type("com.example.order.changed")
        .build()
        .unwrap()
}

#[tokio::test]
async fn rolled_back_transaction_leaves_no_outbox_row() {
    let s = TestSchema::new(8).await;
    let mut client = connect().await;
    client.batch_execute(&s.q("CREATE TABLE __SCHEMA__.orders (id int PRIMARY KEY, state text)")).await.unwrap();
    let outbox = Outbox::new(s.name.clone());

    let tx = client.transaction().await.unwrap();
    tx.execute(&s.q("INSERT INTO __SCHEMA__.orders VALUES (1, 'paid')"), &[]).await.unwrap();
    let id = outbox.enqueue(&tx, &message("order-1", 1)).await.unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(count(&client, &s.q("SELECT count(*) FROM __SCHEMA__.orders")).await, 0);
    assert_eq!(
        count(&client, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await,
        0,
        "message {id} survived a rollback"
    );
}

#[tokio::test]
async fn committed_transaction_leaves_exactly_one_row() {
    let s = TestSchema::new(8).await;
    let mut client = connect().await;
    let outbox = Outbox::new(s.name.clone());
    let msg = OutboxMessage::builder("orders.events")
        .key("order-7")
        .payload(vec![1u8, 2, 3])
        .header("x-tenant", "acme")
        .correlation_id("req-123")
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .build()
        .unwrap();
    let tx = client.transaction().await.unwrap();
    let id = outbox.enqueue(&tx, &msg).await.unwrap();
    tx.commit().await.unwrap();

    let rows = client
        .query(
            &s.q("SELECT id, topic, key, payload, headers, content_type, correlation_id, traceparent, lane, attempts
                  FROM __SCHEMA__.messages"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.get::<_, Uuid>(0), id);
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(r.get::<_, &str>(1), "orders.events");
    assert_eq!(r.get::<_, &str>(2), "order-7");
    assert_eq!(r.get::<_, Vec<u8>>(3), vec![1, 2, 3]);
    assert_eq!(r.get::<_, serde_json::Value>(4), serde_json::json!({"x-tenant": "acme"}));
    assert_eq!(r.get::<_, &str>(5), "application/octet-stream");
    assert_eq!(r.get::<_, &str>(6), "req-123");
    assert!(r.get::<_, &str>(7).starts_with("00-4bf9"));
    let lane: i16 = r.get(8);
    assert!((0..8).contains(&lane), "lane {lane} outside 0..8");
    assert_eq!(r.get::<_, i32>(9), 0);
}

#[tokio::test]
async fn same_idempotency_key_twice_gives_one_row_and_the_same_id() {
    let s = TestSchema::new(8).await;
    let mut client = connect().await;
    let outbox = Outbox::new(s.name.clone());
    let keyed = |n: usize| {
        OutboxMessage::builder("payments").key("acct-9").json(&n).idempotency_key("pay-request-1").build().unwrap()
    };

    // Twice in separate transactions through the Rust API.
    let mut ids = Vec::new();
    for n in 0..2 {
        let tx = client.transaction().await.unwrap();
        ids.push(outbox.enqueue(&tx, &keyed(n)).await.unwrap());
        tx.commit().await.unwrap();
    }
    // Twice inside one batch, and once more through SQL.
    let tx = client.transaction().await.unwrap();
    let batch_ids = outbox.enqueue_batch(&tx, &[keyed(2), message("other", 0), keyed(3)]).await.unwrap();
    tx.commit().await.unwrap();
    let sql_id: Uuid = client
        .query_one(
            &s.q("SELECT __SCHEMA__.enqueue_json('payments', 'acct-9', '1', idempotency_key => 'pay-request-1')"),
            &[],
        )
        .await
        .unwrap()
        .get(0);

    assert_eq!(ids[0], ids[1]);
    assert_eq!(batch_ids[0], ids[0]);
    assert_eq!(batch_ids[2], ids[0]);
    assert_eq!(sql_id, ids[0], "SQL and Rust derive the same id from one key");
    assert_eq!(ids[0], idempotent_id("pay-request-1"));
    assert_eq!(count(&client, &s.q("SELECT count(*) FROM __SCHEMA__.messages WHERE key = 'acct-9'")).await, 1);
    assert_eq!(count(&client, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await, 2);
    // Still a no-op after the row is gone (delivered): the key is remembered for a window.
    client.execute(&s.q("DELETE FROM __SCHEMA__.messages"), &[]).await.unwrap();
    let tx = client.transaction().await.unwrap();
    assert_eq!(outbox.enqueue(&tx, &keyed(4)).await.unwrap(), ids[0]);
    tx.commit().await.unwrap();
    assert_eq!(count(&client, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await, 0);
}

#[tokio::test]
async fn sql_and_rust_derive_equal_ids_for_long_and_unicode_keys() {
    let s = TestSchema::new(4).await;
    let client = connect().await;
    // Lengths around SHA-1's 55/56/64-byte block edges, and multi-byte characters.
    let mut keys: Vec<String> =
        [0usize, 1, 39, 40, 41, 47, 48, 55, 56, 63, 64, 65, 119, 120, 200].iter().map(|n| "k".repeat(n + 1)).collect();
    keys.push("Bestellung-Über-€-🚀".into());
    for key in keys {
        let sql: Uuid = client.query_one(&s.q("SELECT __SCHEMA__.idempotent_id($1)"), &[&key]).await.unwrap().get(0);
        assert_eq!(sql, idempotent_id(&key), "key of {} bytes", key.len());
    }
}

#[tokio::test]
async fn batch_of_10000_messages_enqueues_in_one_round_trip() {
    let s = TestSchema::new(16).await;
    let target = {
        let cfg = DbConfig::parse(&database_url()).unwrap();
        let port = cfg.config().get_ports()[0];
        format!("127.0.0.1:{port}")
    };
    let proxy = Proxy::start(target).await;
    let via_proxy = {
        let url = database_url();
        let cfg = DbConfig::parse(&url).unwrap();
        let port = cfg.config().get_ports()[0];
        url.replace(&format!(":{port}/"), &format!(":{}/", proxy.port))
    };
    let mut client = DbConfig::parse(&via_proxy).unwrap().connect().await.unwrap();
    let outbox = Outbox::new(s.name.clone());
    let messages: Vec<OutboxMessage> = (0..10_000).map(|i| message(&format!("order-{}", i % 500), i)).collect();

    let tx = client.transaction().await.unwrap();
    let before = proxy.round_trips();
    let ids = outbox.enqueue_batch(&tx, &messages).await.unwrap();
    let trips = proxy.round_trips() - before;

    // The counter itself: an ordinary query (prepare, then execute) is two round trips.
    let before_control = proxy.round_trips();
    tx.query("SELECT $1::int", &[&1i32]).await.unwrap();
    let control = proxy.round_trips() - before_control;
    tx.commit().await.unwrap();

    assert_eq!(control, 2, "the proxy counts round trips");
    assert_eq!(trips, 1, "enqueue_batch of 10,000 took {trips} round trips");
    assert_eq!(ids.len(), 10_000);
    let direct = connect().await;
    assert_eq!(count(&direct, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await, 10_000);
    // Sequence order is the order given: per key, n rises with seq.
    let out_of_order = count(
        &direct,
        &s.q("SELECT count(*) FROM (SELECT (convert_from(payload, 'UTF8')::jsonb->>'n')::int AS n,
                     lag((convert_from(payload, 'UTF8')::jsonb->>'n')::int) OVER (PARTITION BY key ORDER BY seq) AS prev
              FROM __SCHEMA__.messages) t WHERE n < prev"),
    )
    .await;
    assert_eq!(out_of_order, 0);
    let distinct_ids = count(&direct, &s.q("SELECT count(DISTINCT id) FROM __SCHEMA__.messages")).await;
    assert_eq!(distinct_ids, 10_000);
}

#[tokio::test]
async fn every_bad_input_is_rejected_by_the_rust_api_and_writes_nothing() {
    let s = TestSchema::new(4).await;
    let mut client = connect().await;
    let outbox = Outbox::new(s.name.clone()).with_max_payload_bytes(1000);
    let good = || OutboxMessage::builder("t").key("k").payload(vec![0u8; 10]);

    let refused: Vec<(&str, InvalidMessage)> = vec![
        ("empty topic", OutboxMessage::builder("").build().unwrap_err()),
        ("bad topic", OutboxMessage::builder("a topic").build().unwrap_err()),
        ("bad header", good().header("bad\u{1}name", "v").build().unwrap_err()),
        ("reserved header", good().header("ce_id", "v").build().unwrap_err()),
        ("non-UTF-8 key", good().key_bytes(b"\xff").build().unwrap_err()),
        ("non-UTF-8 header", good().header_bytes(b"\xc0", b"v").build().unwrap_err()),
    ];
    assert!(matches!(refused[0].1, InvalidMessage::EmptyTopic));
    assert!(matches!(refused[1].1, InvalidMessage::InvalidTopic { .. }));
    assert!(matches!(refused[2].1, InvalidMessage::InvalidHeaderName { .. }));
    assert!(matches!(refused[3].1, InvalidMessage::ReservedHeaderName { .. }));
    assert!(matches!(refused[4].1, InvalidMessage::NotUtf8 { field: "key" }));
    assert!(matches!(refused[5].1, InvalidMessage::NotUtf8 { field: "header name" }));

    // Oversize payload: refused at enqueue, and a whole batch with it writes nothing.
    let tx = client.transaction().await.unwrap();
    let batch = vec![good().build().unwrap(), good().payload(vec![0u8; 1001]).build().unwrap()];
    match outbox.enqueue_batch(&tx, &batch).await {
        Err(EnqueueError::Invalid { index: 1, source: InvalidMessage::PayloadTooLarge { size: 1001, max: 1000 } }) => {}
        other => panic!("expected PayloadTooLarge at index 1, got {other:?}"),
    }
    tx.commit().await.unwrap();
    assert_eq!(count(&client, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await, 0);
}

#[tokio::test]
async fn every_bad_input_is_rejected_by_the_sql_functions_with_its_sqlstate() {
    let s = TestSchema::new(4).await;
    let client = connect().await;
    client
        .execute(&s.q("UPDATE __SCHEMA__.settings SET value = '1000' WHERE name = 'max_payload_bytes'"), &[])
        .await
        .unwrap();
    let cases: &[(&str, &str)] = &[
        ("SELECT __SCHEMA__.enqueue('', 'k', '\\x00')", "OB001"),
        ("SELECT __SCHEMA__.enqueue('a topic', 'k', '\\x00')", "OB001"),
        ("SELECT __SCHEMA__.enqueue('..', 'k', '\\x00')", "OB001"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', convert_to(repeat('x', 1001), 'UTF8'))", "OB002"),
        ("SELECT __SCHEMA__.enqueue_json('t', 'k', jsonb_build_object('x', repeat('x', 1000)))", "OB002"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00', '{\"\": \"v\"}')", "OB003"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00', jsonb_build_object(E'a\\nb', 'v'))", "OB003"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00', '{\"ce_id\": \"v\"}')", "OB003"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00', '{\"n\": 1}')", "OB003"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00', '[]')", "OB003"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00', '{}', '')", "OB004"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00', correlation_id => '')", "OB005"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00', traceparent => '00-xyz')", "OB006"),
        ("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00', idempotency_key => '')", "OB007"),
    ];
    for (sql, code) in cases {
        let err = client.query_one(&s.q(sql), &[]).await.expect_err(sql);
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code(), &SqlState::from_code(code), "{sql}: {}", db.message());
        assert!(db.message().starts_with("outbox: "), "{sql}: {}", db.message());
        assert!(db.hint().is_some(), "{sql}: an error says what to do");
    }
    // Non-UTF-8 where text is required: the server refuses bytes that are not text.
    let err =
        client.query_one(&s.q("SELECT __SCHEMA__.enqueue('t', convert_from('\\xff', 'UTF8'), '\\x00')"), &[]).await;
    assert_eq!(err.unwrap_err().code(), Some(&SqlState::CHARACTER_NOT_IN_REPERTOIRE));
    assert_eq!(count(&client, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await, 0);
    // And a good call still works and returns a v7 id.
    let id: Uuid = client.query_one(&s.q("SELECT __SCHEMA__.enqueue('t', 'k', '\\x00')"), &[]).await.unwrap().get(0);
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(count(&client, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await, 1);
}

#[tokio::test]
async fn insert_statement_notifies_the_relay_once() {
    let s = TestSchema::new(4).await;
    let mut listener_client = {
        let (client, mut conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            use futures::StreamExt;
            while let Some(Ok(msg)) = stream.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                    let _ = tx.send(n.channel().to_owned());
                }
            }
        });
        (client, rx)
    };
    listener_client.0.batch_execute(&format!("LISTEN \"{}\"", s.name.notify_channel())).await.unwrap();

    let mut writer = connect().await;
    let outbox = Outbox::new(s.name.clone());
    let messages: Vec<OutboxMessage> = (0..100).map(|i| message("k", i)).collect();
    for _ in 0..2 {
        let tx = writer.transaction().await.unwrap();
        outbox.enqueue_batch(&tx, &messages).await.unwrap();
        tx.commit().await.unwrap();
    }
    // A round trip on the listener's connection flushes any notification already sent to it.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    listener_client.0.batch_execute("SELECT 1").await.unwrap();
    let mut got = Vec::new();
    while let Ok(channel) = listener_client.1.try_recv() {
        got.push(channel);
    }
    assert_eq!(got, vec![s.name.notify_channel(); 2], "one NOTIFY per 100-row statement");
}
