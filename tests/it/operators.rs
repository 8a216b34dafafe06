//! The operator's tools against real dead letters made by real failures: dlq list / show /
//! replay / discard / export, status, trace, /metrics, /readyz, and logs without secrets.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outbox_relay::outbox::{Outbox, OutboxMessage};
use uuid::Uuid;

use crate::support::cli::{cli, fails, free_port, http_get, metric, ok};
use crate::support::kafka::{create_topic, read_topic};
use crate::support::relay::{config, InProcess};
use crate::support::workload::wait_until_empty;
use crate::support::{connect, count, database_url, eventually, kafka_brokers, TestSchema};

/// Three oversized rows dead-lettered by a relay whose producer refuses records above 1,000 bytes,
/// next to five good rows. Returns the dead letters' ids by key.
async fn make_dead_letters(s: &TestSchema, topic: &str) -> Vec<(String, Uuid)> {
    let outbox = Outbox::new(s.name.clone());
    let mut client = connect().await;
    let tx = client.transaction().await.unwrap();
    let mut msgs = Vec::new();
    for k in ["big-a", "big-b", "big-c"] {
        msgs.push(OutboxMessage::builder(topic).key(k).payload(vec![b'x'; 2000]).build().unwrap());
    }
    for i in 0..5 {
        msgs.push(OutboxMessage::builder(topic).key(format!("ok-{i}")).payload(b"fine".to_vec()).build().unwrap());
    }
    let ids = outbox.enqueue_batch(&tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    let mut cfg = config(&s.name);
    cfg.archive = true;
    cfg.producer.properties = vec![("message.max.bytes".into(), "1000".into())];
    let relay = InProcess::start(cfg);
    wait_until_empty(s, Duration::from_secs(60)).await;
    let stats = relay.shutdown().await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 3);
    msgs.iter().zip(ids).take(3).map(|(m, id)| (m.key().unwrap().to_owned(), id)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_commands_work_on_real_dead_letters_and_refuse_bad_arguments() {
    let s = TestSchema::new(4).await;
    let topic = create_topic("ops-dlq", 1).await;
    let dead = make_dead_letters(&s, &topic).await;
    let schema = s.name.as_str();
    let c = connect().await;
    let (a, b) = (dead[0].1.to_string(), dead[1].1.to_string());

    // list, filtered list, show
    let all = ok(&cli(&["dlq", "list", "--schema", schema, "--json"]));
    assert_eq!(all.lines().count(), 3, "{all}");
    let one =
        ok(&cli(&["dlq", "list", "--schema", schema, "--json", "--key", "big-a", "--reason", "message_too_large"]));
    let v: serde_json::Value = serde_json::from_str(one.trim()).unwrap();
    assert_eq!(v["id"], a.as_str());
    assert_eq!(v["attempts"], 1);
    let human = ok(&cli(&["dlq", "list", "--schema", schema]));
    assert!(human.contains("message_too_large") && human.contains("big-c"), "{human}");
    let shown = ok(&cli(&["dlq", "show", &a, "--schema", schema]));
    assert!(shown.contains("message_too_large") && shown.contains(&"x".repeat(100)), "show includes the payload");

    // --dry-run changes nothing; a bulk change without --yes and without a terminal is refused.
    let dry = ok(&cli(&["dlq", "replay", "--schema", schema, "--all", "--dry-run"]));
    assert!(dry.contains("would replay 3"), "{dry}");
    fails(&cli(&["dlq", "replay", "--schema", schema, "--reason", "message_too_large"]), "add --yes");
    fails(&cli(&["dlq", "discard", "--schema", schema]), "give a filter");
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.dead_letters")).await, 3);
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await, 0);

    // Bad arguments: clear errors, non-zero exits.
    fails(&cli(&["dlq", "show", "not-a-uuid", "--schema", schema]), "is not a message id");
    fails(
        &cli(&["dlq", "replay", "--schema", schema, "--id", &Uuid::now_v7().to_string(), "--yes"]),
        "no relay dead letter with id",
    );
    fails(&cli(&["dlq", "list", "--schema", schema, "--since", "1h", "--until", "2h"]), "bad time range");
    fails(&cli(&["dlq", "list", "--schema", schema, "--since", "yesterday-ish"]), "neither an RFC 3339 time");
    fails(&cli(&["dlq", "list", "--schema", schema, "--inbox", "--id", "abc"]), "not an inbox dead-letter id");

    // replay one: back in the outbox with its id, attempts reset, audited; a relay with normal
    // limits delivers it.
    // The id as an argument, as `dlq show` takes it.
    let replayed = ok(&cli(&["dlq", "replay", &a, "--schema", schema, "--yes", "--why", "limit raised"]));
    assert!(replayed.contains("replayed 1"), "{replayed}");
    let back =
        c.query_one(&s.q("SELECT attempts, key FROM __SCHEMA__.messages WHERE id = $1"), &[&dead[0].1]).await.unwrap();
    assert_eq!((back.get::<_, i32>(0), back.get::<_, &str>(1)), (0, "big-a"));
    let mut cfg = config(&s.name);
    cfg.archive = true;
    let relay = InProcess::start(cfg);
    wait_until_empty(&s, Duration::from_secs(60)).await;
    relay.shutdown().await;
    let received = read_topic(&topic, 6, Duration::from_secs(30));
    assert!(received.iter().any(|r| r.id == dead[0].1), "the replayed message was delivered with its id");

    // discard one: gone, with an audit record.
    let discarded = ok(&cli(&["dlq", "discard", &b, "--schema", schema, "--yes", "--why", "obsolete"]));
    assert!(discarded.contains("discarded 1"), "{discarded}");
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.dead_letters")).await, 1);
    let audit = c
        .query(&s.q("SELECT action, actor, target, why, details->>'payload_bytes' FROM __SCHEMA__.audit_log ORDER BY audit_id"), &[])
        .await
        .unwrap();
    let rows: Vec<(String, String, String, Option<String>, Option<String>)> =
        audit.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str(), rows[0].2.as_str()), ("replay", "oncall-test", a.as_str()));
    assert_eq!(
        (rows[1].0.as_str(), rows[1].2.as_str(), rows[1].3.as_deref(), rows[1].4.as_deref()),
        ("discard", b.as_str(), Some("obsolete"), Some("2000"))
    );

    // export the rest with payloads.
    let file = std::env::temp_dir().join(format!("{schema}.jsonl"));
    let out = cli(&["dlq", "export", "--schema", schema, "-o", file.to_str().unwrap()]);
    ok(&out);
    let exported = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(exported.lines().count(), 1);
    assert!(exported.contains("big-c") && exported.contains(&"x".repeat(2000)));

    // status and trace tell the story.
    let status: serde_json::Value = serde_json::from_str(&ok(&cli(&["status", "--schema", schema, "--json"]))).unwrap();
    assert_eq!(status["backlog"], 0);
    assert_eq!(status["dead_letters_by_reason"][0], serde_json::json!(["message_too_large", 1]));
    let human_status = ok(&cli(&["status", "--schema", schema]));
    assert!(human_status.contains("dead letters: 1"), "{human_status}");
    let trace: serde_json::Value =
        serde_json::from_str(&ok(&cli(&["trace", &a, "--schema", schema, "--json"]))).unwrap();
    assert_eq!(trace["delivered"][0]["topic"], topic.as_str(), "{trace}");
    assert_eq!(trace["audit"][0]["action"], "replay");
    let t2 = ok(&cli(&["trace", &dead[2].1.to_string(), "--schema", schema]));
    assert!(t2.contains("dead-lettered") && t2.contains("message_too_large"), "{t2}");
    fails(&cli(&["trace", "12345", "--schema", schema]), "is not a message id");
    // Not found is not success, and a script can tell it from a failure: exit 3.
    let unknown = Uuid::now_v7().to_string();
    for args in [
        vec!["trace", unknown.as_str(), "--schema", schema],
        vec!["trace", unknown.as_str(), "--schema", schema, "--json"],
        vec!["dlq", "show", unknown.as_str(), "--schema", schema],
        vec!["dlq", "show", "--id", unknown.as_str(), "--schema", schema],
        vec!["dlq", "replay", unknown.as_str(), "--schema", schema, "--yes"],
    ] {
        let out = cli(&args);
        fails(&out, &unknown);
        assert_eq!(out.status.code(), Some(3), "{args:?} exits 3 for not found");
    }
    let out = cli(&["trace", &a, "--schema", "no_such_schema"]);
    assert!(!out.status.success() && out.status.code() != Some(3), "a missing schema is a failure, not 'not found'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_dead_letters_are_replayed_by_republishing_and_then_applied() {
    use outbox_relay::consumer::{self, ConsumedMessage, ConsumerConfig, ConsumerStats, Handler, HandlerFuture};
    use std::sync::Arc;
    struct Blockable(String);
    impl Handler for Blockable {
        fn handle<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>, m: &'a ConsumedMessage) -> HandlerFuture<'a> {
            Box::pin(async move {
                let blocked: i64 = tx
                    .query_one(&format!("SELECT count(*) FROM {}.blocked WHERE id = $1", self.0), &[&m.id])
                    .await?
                    .get(0);
                if blocked > 0 {
                    return Err("blocked by the test".into());
                }
                tx.execute(&format!("INSERT INTO {}.applied VALUES ($1)", self.0), &[&m.id]).await?;
                Ok(())
            })
        }
    }
    let s = TestSchema::new(2).await;
    let c = connect().await;
    c.batch_execute(&s.q("CREATE TABLE __SCHEMA__.blocked (id uuid); CREATE TABLE __SCHEMA__.applied (id uuid);"))
        .await
        .unwrap();
    let topic = create_topic("ops-inbox", 1).await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    c.execute(&s.q("INSERT INTO __SCHEMA__.blocked VALUES ($1)"), &[&ids[1]]).await.unwrap();
    for id in &ids {
        c.execute(
            &s.q("INSERT INTO __SCHEMA__.messages (id, topic, key, payload) VALUES ($1, $2, 'k', '\\x01')"),
            &[id, &topic],
        )
        .await
        .unwrap();
    }
    let relay = InProcess::start(config(&s.name));
    wait_until_empty(&s, Duration::from_secs(60)).await;
    relay.shutdown().await;
    let mut cfg = ConsumerConfig::new(
        kafka_brokers(),
        crate::support::unique_name("g"),
        vec![topic.clone()],
        "ops",
        s.name.clone(),
        outbox_relay::db::DbConfig::parse(&database_url()).unwrap(),
    );
    cfg.max_attempts = 2;
    cfg.backoff = outbox_relay::retry::Backoff { base: Duration::from_millis(10), cap: Duration::from_millis(50) };
    let stop = tokio_util::sync::CancellationToken::new();
    let stats = Arc::new(ConsumerStats::default());
    let task = tokio::spawn(consumer::run(cfg, Arc::new(Blockable(s.name.ident())), stop.clone(), stats.clone()));
    let st = &stats;
    eventually(Duration::from_secs(60), Duration::from_millis(50), || async move {
        match st.processed.load(Ordering::Relaxed) + st.dead_lettered.load(Ordering::Relaxed) {
            n if n >= 3 => Ok(()),
            n => Err(format!("{n} of 3 messages processed or dead-lettered")),
        }
    })
    .await;
    let listed = ok(&cli(&["dlq", "list", "--inbox", "--schema", s.name.as_str(), "--json"]));
    let v: serde_json::Value = serde_json::from_str(listed.trim()).unwrap();
    assert_eq!(v["reason"], "handler_failed");
    assert_eq!(v["message_id"], ids[1].to_string());
    let dl = v["id"].as_str().unwrap().to_owned();
    // The operator fixes the cause, then replays.
    c.execute(&s.q("DELETE FROM __SCHEMA__.blocked"), &[]).await.unwrap();
    let out = ok(&cli(&["dlq", "replay", "--inbox", "--schema", s.name.as_str(), "--id", &dl, "--yes"]));
    assert!(out.contains("replayed 1"), "{out}");
    let (cr, sql) = (&c, &s.q("SELECT count(*) FROM __SCHEMA__.applied"));
    eventually(Duration::from_secs(60), Duration::from_millis(100), || async move {
        match count(cr, sql).await {
            n if n >= 3 => Ok(()),
            n => Err(format!("{n} of 3 applied: the replayed message was not")),
        }
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(count(&c, &s.q("SELECT count(DISTINCT id) FROM __SCHEMA__.applied")).await, 3);
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.inbox_dead_letters")).await, 0);
    assert_eq!(
        count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.audit_log WHERE source = 'inbox' AND action = 'replay'")).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_a_run_and_readyz_follows_the_broker() {
    use rdkafka::mocking::MockCluster;
    let mock = MockCluster::new(1).unwrap();
    let topic = crate::support::unique_name("metrics").replace('_', "-");
    mock.create_topic(&topic, 2, 1).unwrap();
    let s = TestSchema::new(2).await;
    let port = free_port();
    let mut relay = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    relay
        .args(["run", "--schema", s.name.as_str(), "--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--heartbeat-interval", "300ms", "--message-timeout", "2s", "--breaker-cooldown", "500ms"])
        .args(["--backlog-interval", "300ms"])
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BROKERS", mock.bootstrap_servers())
        .env("OUTBOX_LOG", "warn")
        .stdin(std::process::Stdio::null());
    let mut relay = crate::support::relay::RelayProcess { child: relay.spawn().unwrap() };

    eventually(Duration::from_secs(30), Duration::from_millis(200), || async move {
        match http_get(port, "/readyz").await {
            Some((200, _)) => Ok(()),
            other => Err(format!("not ready: {other:?}")),
        }
    })
    .await;
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));
    // The container health check command asks the same endpoints.
    let probe = |ready: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
        c.args(["health", "--addr", &format!("127.0.0.1:{port}")]);
        if ready {
            c.arg("--ready");
        }
        c.output().unwrap()
    };
    assert!(probe(false).status.success());
    assert!(probe(true).status.success());
    let c = connect().await;
    // A slow broker (500 ms per request) while writing, so that a backlog builds and the gauge
    // has something to show falling.
    mock.broker_round_trip_time(1, Duration::from_millis(500)).unwrap();
    let writer = {
        let (s_name, topic) = (s.name.clone(), topic.clone());
        tokio::spawn(async move {
            let c = connect().await;
            for _ in 0..20 {
                c.execute(
                    &s_name.qualify("SELECT __SCHEMA__.enqueue($1, 'k' || g, '\\x01') FROM generate_series(1, 250) g"),
                    &[&topic],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let label = format!("topic=\"{topic}\"");
    let mut seen = Vec::new();
    let mut max_backlog = 0.0f64;
    let start = Instant::now();
    while !writer.is_finished() || count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.messages")).await > 0 {
        if let Some((200, body)) = http_get(port, "/metrics").await {
            seen.push(metric(&body, "outbox_relay_delivered_total", &label));
            max_backlog = max_backlog.max(metric(&body, "outbox_relay_backlog_rows", ""));
        }
        if writer.is_finished() {
            mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(90));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The backlog gauge is refreshed every --backlog-interval: wait for its next reading.
    let (body, _) = eventually(Duration::from_secs(15), Duration::from_millis(250), || async {
        let (_, body) = http_get(port, "/metrics").await.ok_or("no /metrics answer")?;
        match metric(&body, "outbox_relay_backlog_rows", "") {
            0.0 => Ok(body),
            n => Err(format!("the backlog gauge still reads {n}")),
        }
    })
    .await;
    let delivered = metric(&body, "outbox_relay_delivered_total", &label);
    let backlog_end = metric(&body, "outbox_relay_backlog_rows", "");
    let moving = seen.windows(2).filter(|w| w[1] > w[0]).count();
    println!("figures: scrapes {}, delivered_total rose in {moving} of them, ended at {delivered}; backlog max {max_backlog}, end {backlog_end}", seen.len());
    assert_eq!(delivered, 5000.0);
    assert!(moving >= 2, "the counter moved during the run: {seen:?}");
    assert!(max_backlog > 0.0, "the backlog gauge was seen above zero during the run");
    assert_eq!(backlog_end, 0.0, "the backlog gauge fell to zero");
    assert!(body.contains("outbox_relay_commit_to_ack_seconds_bucket"));
    // Every outbox figure carries the outbox's name (here its schema).
    let outbox = format!("outbox=\"{}\"", s.name);
    assert_eq!(metric(&body, "outbox_relay_lanes_owned", &outbox), 2.0, "lanes owned of the outbox");
    assert_eq!(metric(&body, "outbox_relay_delivered_total", &outbox), 5000.0, "delivered of the outbox");

    // Broker down: unready; back: ready again.
    mock.broker_down(1).unwrap();
    let (unready, unready_after) = eventually(Duration::from_secs(30), Duration::from_millis(200), || async move {
        match http_get(port, "/readyz").await {
            Some((503, body)) => Ok(body),
            other => Err(format!("still ready with the broker down: {other:?}")),
        }
    })
    .await;
    assert!(unready.contains("broker"), "{unready}");
    let probe_down = probe(true);
    assert!(!probe_down.status.success(), "health --ready fails while unready");
    assert!(String::from_utf8_lossy(&probe_down.stderr).contains("503"));
    mock.broker_up(1).unwrap();
    let (_, ready_after) = eventually(Duration::from_secs(30), Duration::from_millis(200), || async move {
        match http_get(port, "/readyz").await {
            Some((200, _)) => Ok(()),
            other => Err(format!("not ready again after the broker came back: {other:?}")),
        }
    })
    .await;
    println!(
        "figures: unready {unready_after:?} after the broker went down, ready again {ready_after:?} after it came back",
    );
    assert_eq!(relay.terminate(Duration::from_secs(30)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_carries_a_payload_or_a_password() {
    const PAYLOAD_SECRET: &str = "card=4111111111111111;cvv=123;SECRET-PAYLOAD-TOKEN";
    const PASSWORD: &str = "Sup3r-Secret-Pw";
    let s = TestSchema::new(2).await;
    let topic = create_topic("ops-secret", 1).await;
    let c = connect().await;
    // One that goes through, one too large that fails and is dead-lettered (error paths log too),
    // and a secret-looking header.
    c.execute(
        &s.q("SELECT __SCHEMA__.enqueue($1, 'k1', convert_to($2, 'UTF8'), jsonb_build_object('x-auth', $2::text))"),
        &[&topic, &PAYLOAD_SECRET],
    )
    .await
    .unwrap();
    c.execute(&s.q("INSERT INTO __SCHEMA__.messages (id, topic, key, payload) VALUES (gen_random_uuid(), $1, 'k2', convert_to(repeat($2, 100), 'UTF8'))"), &[&topic, &PAYLOAD_SECRET]).await.unwrap();
    // The test server trusts every connection, so the password is carried but not checked.
    let url = database_url().replacen("postgres://postgres@", &format!("postgres://postgres:{PASSWORD}@"), 1);
    assert!(url.contains(PASSWORD));
    let mut relay = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    relay
        .args([
            "run",
            "--schema",
            s.name.as_str(),
            "--log-json",
            "--metrics-addr",
            "off",
            "--heartbeat-interval",
            "300ms",
        ])
        .args(["-X", "message.max.bytes=1000"])
        .env("DATABASE_URL", &url)
        .env("KAFKA_BROKERS", kafka_brokers())
        .env("OUTBOX_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = relay.spawn().unwrap();
    let mut proc = crate::support::relay::RelayProcess { child };
    wait_until_empty(&s, Duration::from_secs(60)).await;
    let _ = Command::new("kill").args(["-TERM", &proc.pid().to_string()]).status();
    let out = std::mem::replace(&mut proc.child, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
    // A command that fails to connect, with the password in its URL.
    let bad = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["status", "--schema", s.name.as_str()])
        .env("DATABASE_URL", format!("postgres://postgres:{PASSWORD}@127.0.0.1:1/x"))
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let bad_err = String::from_utf8_lossy(&bad.stderr).into_owned();
    let lines = logs.lines().count();
    println!(
        "figures: {lines} log lines at debug level checked; dead letters {}",
        count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.dead_letters")).await
    );
    assert!(lines > 5, "the relay logged: {logs}");
    assert!(logs.contains("message dead-lettered"), "the failure path ran: {logs}");
    for (i, line) in logs.lines().enumerate() {
        assert!(
            !line.contains("SECRET-PAYLOAD-TOKEN") && !line.contains("4111111111111111"),
            "line {i} carries the payload: {line}"
        );
        assert!(!line.contains(PASSWORD), "line {i} carries the password: {line}");
    }
    assert!(!bad.status.success());
    assert!(bad_err.contains("127.0.0.1:1"), "the error says where it failed: {bad_err}");
    assert!(!bad_err.contains(PASSWORD), "the error hides the password: {bad_err}");
}

/// While a session holds an old snapshot, the outbox's deleted rows cannot be cleaned up and
/// every claim slows down: `status` names that session (pid, application, state, age, a query
/// prefix) and the outbox's dead tuples, and stops naming it once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_session_that_holds_the_oldest_snapshot() {
    let s = TestSchema::new(2).await;
    let schema = s.name.as_str();
    let holder = outbox_relay::db::DbConfig::parse(&database_url())
        .unwrap()
        .with_application_name("nightly-report")
        .connect()
        .await
        .unwrap();
    let pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class").await.unwrap();
    // Rows delivered meanwhile stay as dead tuples.
    let c = connect().await;
    c.batch_execute(&s.q("INSERT INTO __SCHEMA__.messages (id, topic, key, payload, headers)
                          SELECT gen_random_uuid(), 't', 'k', '\\x01', '{}' FROM generate_series(1, 500);
                          DELETE FROM __SCHEMA__.messages;"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status: serde_json::Value = serde_json::from_str(&ok(&cli(&["status", "--schema", schema, "--json"]))).unwrap();
    let holders = status["oldest_snapshots"].as_array().unwrap().clone();
    let ours = holders.iter().find(|h| h["pid"] == pid).cloned();
    let human = ok(&cli(&["status", "--schema", schema]));
    holder.batch_execute("COMMIT").await.unwrap();
    let after: serde_json::Value = serde_json::from_str(&ok(&cli(&["status", "--schema", schema, "--json"]))).unwrap();
    let still_listed = after["oldest_snapshots"].as_array().unwrap().iter().any(|h| h["pid"] == pid);
    println!(
        "figures: holders {holders:?}; dead tuples {}; listed after commit {still_listed}",
        status["outbox_dead_tuples"]
    );
    let ours = ours.expect("the session holding the snapshot is named");
    assert_eq!(ours["kind"], "session");
    assert_eq!(ours["name"], "nightly-report");
    assert_eq!(ours["state"], "idle in transaction");
    assert!(ours["age_seconds"].as_f64().unwrap() >= 1.0, "{ours}");
    assert!(ours["query_prefix"].as_str().unwrap().starts_with("BEGIN ISOLATION LEVEL REPEATABLE READ"), "{ours}");
    assert!(human.contains("nightly-report") && human.contains(&pid.to_string()), "{human}");
    assert!(!still_listed, "a committed transaction holds nothing");
}
