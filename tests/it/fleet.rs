//! Many outboxes, one relay fleet: outboxes on two databases served by two instances on a
//! session budget, a killed instance's lanes of every outbox taken over; schemas found by pattern,
//! later ones too, and one that is not migrated refused with a message (or migrated when asked).

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use outbox_relay::db::DbConfig;
use outbox_relay::schema::{self, SchemaName};
use tokio_postgres::Client;

use crate::support::kafka::{create_topic, figures, read_topic};
use crate::support::relay::RelayProcess;
use crate::support::workload::{wait_until_empty_on, write_paced_on};
use crate::support::{connect, database_url, unique_name};

/// A database of its own on the test server, dropped when the test ends.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn new() -> Self {
        let name = unique_name("fleetdb");
        connect().await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let base = database_url();
        let (head, tail) = base.rsplit_once('/').expect("the test URL names a database");
        let query = tail.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
        Self { url: format!("{head}/{name}{query}"), name }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        crate::support::clean_up(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// One outbox of the test: where it is, its topic.
struct TestOutbox {
    url: String,
    schema: SchemaName,
    topic: String,
}

impl TestOutbox {
    async fn new(url: &str, lanes: u16, topic: &str) -> Self {
        let schema = SchemaName::new(&unique_name("t")).unwrap();
        let mut c = DbConfig::parse(url).unwrap().connect().await.unwrap();
        schema::migrate(&mut c, &schema, Some(lanes)).await.unwrap();
        Self { url: url.to_owned(), schema, topic: topic.to_owned() }
    }

    async fn client(&self) -> Client {
        DbConfig::parse(&self.url).unwrap().connect().await.unwrap()
    }
}

/// The instance of a lane session's application name (`outbox-relay <instance> lane ...`).
fn instance_of(app: &str) -> String {
    app.split_whitespace().nth(1).unwrap_or(app).to_owned()
}

/// Per instance: the lanes of `b` it holds, and the sessions holding them.
async fn holders(b: &TestOutbox) -> (HashMap<String, usize>, HashMap<String, HashSet<i32>>, usize) {
    let c = b.client().await;
    let class = i64::from(outbox_relay::relay::lane_session::lane_lock_class(&c, &b.schema).await.unwrap());
    let rows = c
        .query(
            "SELECT l.objid::bigint::int, coalesce(a.application_name, ''), l.pid
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = $1::bigint::oid
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&class],
        )
        .await
        .unwrap();
    let mut lanes: HashMap<String, usize> = HashMap::new();
    let mut sessions: HashMap<String, HashSet<i32>> = HashMap::new();
    for r in &rows {
        let inst = instance_of(r.get(1));
        *lanes.entry(inst.clone()).or_default() += 1;
        sessions.entry(inst).or_default().insert(r.get(2));
    }
    let distinct_lanes = rows.iter().map(|r| r.get::<_, i32>(0)).collect::<HashSet<_>>().len();
    (lanes, sessions, distinct_lanes)
}

/// Waits (30 s at most) until every lane of every outbox is held, evenly, by `instances`
/// instances; returns per database URL and instance the lane sessions seen.
async fn wait_for_spread(
    boxes: &[TestOutbox],
    lanes: usize,
    instances: usize,
    what: &str,
) -> HashMap<(String, String), usize> {
    let since = Instant::now();
    loop {
        let mut even = true;
        let mut sessions: HashMap<(String, String), HashSet<i32>> = HashMap::new();
        let mut seen = Vec::new();
        for b in boxes {
            let (per, s, distinct) = holders(b).await;
            even &= distinct == lanes && per.len() == instances && per.values().all(|n| *n == lanes / instances);
            for (inst, pids) in s {
                sessions.entry((b.url.clone(), inst)).or_default().extend(pids);
            }
            seen.push(per);
        }
        if even {
            return sessions.into_iter().map(|(k, v)| (k, v.len())).collect();
        }
        assert!(since.elapsed() < Duration::from_secs(30), "{what}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fleet_serves_outboxes_on_two_databases_within_its_session_budget_and_takes_over_a_killed_instance() {
    const LANES: usize = 8;
    const BUDGET: usize = 3;
    let other = TestDatabase::new().await;
    let main = database_url();
    let boxes = vec![
        TestOutbox::new(&main, LANES as u16, &create_topic("fleet-a", 4).await).await,
        TestOutbox::new(&main, LANES as u16, &create_topic("fleet-b", 4).await).await,
        TestOutbox::new(&other.url, LANES as u16, &create_topic("fleet-c", 4).await).await,
    ];
    let specs: Vec<String> = ["a", "b", "c"]
        .iter()
        .zip(&boxes)
        .map(|(n, b)| {
            let url = if b.url == main { String::new() } else { b.url.clone() };
            format!("{n}={url}#{}", b.schema)
        })
        .collect();
    let mut args: Vec<&str> = Vec::new();
    for s in &specs {
        args.extend(["--outbox", s.as_str()]);
    }
    args.extend(["--max-sessions", "3", "--batch-size", "200", "--max-in-flight", "400"]);

    let mut first = RelayProcess::start_with(&args, Stdio::inherit());
    wait_for_spread(&boxes, LANES, 1, "one instance did not take every lane of every outbox").await;
    let writers: Vec<_> = boxes
        .iter()
        .map(|b| {
            let (url, schema, topic) = (b.url.clone(), b.schema.clone(), b.topic.clone());
            tokio::spawn(async move { write_paced_on(&url, &schema, &topic, 2, 1_500, Duration::from_millis(2)).await })
        })
        .collect();
    let mut second = RelayProcess::start_with(&args, Stdio::inherit());
    let sessions_two = wait_for_spread(&boxes, LANES, 2, "the two instances did not share every outbox").await;
    // Lane sessions per instance and database: at most the budget, for all the outboxes there.
    assert!(sessions_two.values().all(|n| *n <= BUDGET), "lane sessions above the budget: {sessions_two:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    first.kill9();
    let killed = Instant::now();
    let sessions_after = wait_for_spread(&boxes, LANES, 1, "the killed instance's lanes were not taken over").await;
    let takeover = killed.elapsed();
    assert!(sessions_after.values().all(|n| *n <= BUDGET), "lane sessions above the budget: {sessions_after:?}");

    let mut committed = Vec::new();
    for w in writers {
        committed.push(w.await.unwrap());
    }
    for b in &boxes {
        wait_until_empty_on(&b.client().await, &b.schema, Duration::from_secs(180), Duration::from_millis(100)).await;
    }
    // Every session the survivor holds on each database (they are named `outbox-relay
    // <instance> <job>`): its lanes' plus control, background and LISTEN.
    let mut all_sessions = Vec::new();
    for url in [&main, &other.url] {
        let c = DbConfig::parse(url).unwrap().connect().await.unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name LIKE 'outbox-relay %-%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        all_sessions.push(n);
    }
    assert_eq!(second.terminate(Duration::from_secs(30)), Some(0));
    for (i, b) in boxes.iter().enumerate() {
        let received = read_topic(&b.topic, committed[i].len(), Duration::from_secs(120));
        let f = figures(&committed[i], &received);
        println!(
            "figures: outbox {i}: committed {}, distinct {}, duplicates {}, lost {}, order violations {}; \
             lane sessions with two instances {sessions_two:?}, after the kill {sessions_after:?} (takeover {takeover:?}); \
             relay sessions per database at the end {all_sessions:?}",
            f.committed, f.distinct, f.duplicates, f.lost, f.order_violations
        );
        assert_eq!(f.committed, 3_000);
        assert_eq!(f.lost, 0);
        assert_eq!(f.distinct, f.committed);
        assert_eq!(f.order_violations, 0);
        assert!(f.duplicates <= (LANES / 2) * 400, "duplicates {} above the killed instance's bound", f.duplicates);
    }
    // Budget plus control, background and LISTEN, on the main database (two outboxes) as on the other.
    assert!(all_sessions.iter().all(|n| *n as usize <= BUDGET + 3), "relay sessions per database: {all_sessions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_a_pattern_finds_are_served_later_ones_too_and_an_unmigrated_one_is_refused_until_migrated() {
    let prefix = unique_name("fd");
    let pattern = format!("{prefix}_%");
    let topic = create_topic("fleet-found", 2).await;
    let url = database_url();
    let make = |name: &str| SchemaName::new(&format!("{prefix}_{name}")).unwrap();
    let (early, later, plain) = (make("early"), make("later"), make("plain"));
    let mut c = connect().await;
    schema::migrate(&mut c, &early, Some(2)).await.unwrap();
    let log_path = std::env::temp_dir().join(format!("{prefix}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let args = ["--schema-pattern", pattern.as_str(), "--discover-interval", "300ms"];
    let mut relay = RelayProcess::start_with(&args, Stdio::from(log));

    let first = write_paced_on(&url, &early, &topic, 1, 50, Duration::ZERO).await;
    wait_until_empty_on(&c, &early, Duration::from_secs(30), Duration::from_millis(100)).await;
    // A tenant created while the relay runs.
    schema::migrate(&mut c, &later, Some(2)).await.unwrap();
    let second = write_paced_on(&url, &later, &topic, 1, 50, Duration::ZERO).await;
    wait_until_empty_on(&c, &later, Duration::from_secs(30), Duration::from_millis(100)).await;
    // A matching schema without an outbox: refused with a message, the others go on.
    c.batch_execute(&format!("CREATE SCHEMA {}", plain.ident())).await.unwrap();
    let said = |what: &'static str| {
        let path = log_path.clone();
        async move {
            crate::support::eventually(Duration::from_secs(20), Duration::from_millis(100), || {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                async move {
                    if text.contains(what) {
                        Ok(())
                    } else {
                        Err(text)
                    }
                }
            })
            .await
        }
    };
    said("cannot be served; migrate it").await;
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(text.contains(plain.as_str()), "the refusal names the schema: {text}");
    let third = write_paced_on(&url, &early, &topic, 1, 20, Duration::ZERO).await;
    wait_until_empty_on(&c, &early, Duration::from_secs(30), Duration::from_millis(100)).await;
    assert_eq!(relay.terminate(Duration::from_secs(30)), Some(0));
    let refusals = std::fs::read_to_string(&log_path).unwrap().matches("cannot be served; migrate it").count();
    assert_eq!(refusals, 1, "the refusal is said once, not at every look");

    // With --migrate the same schema gets its outbox and is served.
    let mut relay = RelayProcess::start_with(&[&args[..], &["--migrate"]].concat(), Stdio::inherit());
    let version = |s: SchemaName| {
        let c = &c;
        async move { outbox_relay::schema::check_installed(c, &s).await.is_ok() }
    };
    crate::support::eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
        if version(plain.clone()).await {
            Ok(())
        } else {
            Err("not migrated yet".to_owned())
        }
    })
    .await;
    let fourth = write_paced_on(&url, &plain, &topic, 1, 30, Duration::ZERO).await;
    wait_until_empty_on(&c, &plain, Duration::from_secs(30), Duration::from_millis(100)).await;
    assert_eq!(relay.terminate(Duration::from_secs(30)), Some(0));

    let committed: Vec<_> = [first, second, third, fourth].concat();
    let received = read_topic(&topic, committed.len(), Duration::from_secs(60));
    let f = figures(&committed, &received);
    println!(
        "figures: committed {} over three schemas found by pattern, distinct {}, lost {}, order violations {}",
        f.committed, f.distinct, f.lost, f.order_violations
    );
    assert_eq!(f.committed, 150);
    assert_eq!((f.lost, f.distinct, f.order_violations), (0, 150, 0));
    for s in [early, later, plain] {
        let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", s.ident())).await;
    }
    let _ = std::fs::remove_file(&log_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_outbox_of_an_outbox_file_keeps_settings_of_its_own() {
    let main = database_url();
    let (ta, tb) = (create_topic("fleet-file-a", 2).await, create_topic("fleet-file-b", 2).await);
    let a = TestOutbox::new(&main, 2, &ta).await;
    let b = TestOutbox::new(&main, 2, &tb).await;
    // Both write to the topic "orders"; each outbox's own topic map sends it elsewhere.
    let path = std::env::temp_dir().join(format!("{}.toml", a.schema));
    std::fs::write(
        &path,
        format!(
            "[[outbox]]\nname = \"a\"\nschema = \"{}\"\nbatch_size = 7\ntopic_map = {{ \"orders\" = \"{ta}\" }}\n\n\
             [[outbox]]\nname = \"b\"\nschema = \"{}\"\nmax_attempts = 3\ntopic_map = {{ \"orders\" = \"{tb}\" }}\n",
            a.schema, b.schema
        ),
    )
    .unwrap();
    let path_text = path.display().to_string();
    let mut relay = RelayProcess::start_with(&["--outbox-file", path_text.as_str()], Stdio::inherit());
    let wa = write_paced_on(&main, &a.schema, "orders", 1, 40, Duration::ZERO).await;
    let wb = write_paced_on(&main, &b.schema, "orders", 1, 30, Duration::ZERO).await;
    let c = connect().await;
    for o in [&a, &b] {
        wait_until_empty_on(&c, &o.schema, Duration::from_secs(60), Duration::from_millis(100)).await;
    }
    assert_eq!(relay.terminate(Duration::from_secs(30)), Some(0));
    let (fa, fb) = (
        figures(&wa, &read_topic(&ta, 40, Duration::from_secs(30))),
        figures(&wb, &read_topic(&tb, 30, Duration::from_secs(30))),
    );
    println!(
        "figures: outbox a to its topic: distinct {} of {}; outbox b: distinct {} of {}",
        fa.distinct, fa.committed, fb.distinct, fb.committed
    );
    assert_eq!((fa.distinct, fa.lost, fa.order_violations, fa.records - fa.duplicates), (40, 0, 0, 40));
    assert_eq!((fb.distinct, fb.lost, fb.order_violations, fb.records - fb.duplicates), (30, 0, 0, 30));
    let _ = std::fs::remove_file(&path);
}
