//! Writers in other languages on the SQL contract: the example order services in
//! examples/python and examples/node run as processes against the test's schema, and the relay
//! delivers every message they committed, in per-key order, and none that they rolled back.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use uuid::Uuid;

use crate::support::kafka::{create_topic, figures, read_topic};
use crate::support::relay::{config, InProcess};
use crate::support::workload::wait_until_empty;
use crate::support::{connect, count, database_url, TestSchema};

const ORDERS: usize = 200;
const MESSAGE_TYPE: &str = "com.example.order.created";
const ROLLED_BACK_KEY: &str = "customer-rolled-back";
const REFUSED_KEY: &str = "customer-refused";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/writers-setup.sh` once per test binary (the script itself serialises test
/// processes running it at once). A runtime that cannot be provisioned is a failure, with the
/// script's message.
fn provisioned() -> Result<(), String> {
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    SETUP
        .get_or_init(|| {
            let out = std::process::Command::new("bash")
                .arg("scripts/writers-setup.sh")
                .current_dir(root())
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run bash scripts/writers-setup.sh: {e}"))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                print!("{stdout}");
                Ok(())
            } else {
                Err(format!("bash scripts/writers-setup.sh failed ({}):\n{stdout}{stderr}", out.status))
            }
        })
        .clone()
}

/// One example writer: how to start it and which business table it writes.
struct Writer {
    language: &'static str,
    program: PathBuf,
    script: &'static str,
    table: &'static str,
}

fn python() -> Writer {
    Writer {
        language: "python",
        program: root().join("target/writers/venv/bin/python"),
        script: "examples/python/order_service.py",
        table: "py_orders",
    }
}

fn node() -> Writer {
    Writer {
        language: "node",
        program: PathBuf::from("node"),
        script: "examples/node/order_service.mjs",
        table: "node_orders",
    }
}

/// What a writer reported, line by line.
#[derive(Debug, Default)]
struct Reported {
    committed: Vec<(Uuid, String)>,
    rolled_back: Vec<String>,
    refused: Vec<(String, String)>,
}

fn parse(language: &str, stdout: &str) -> Reported {
    let mut r = Reported::default();
    for line in stdout.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["committed", id, key] => {
                let id = id.parse().unwrap_or_else(|e| panic!("{language}: not a message id in {line:?}: {e}"));
                r.committed.push((id, (*key).to_owned()));
            }
            ["rolled_back", key] => r.rolled_back.push((*key).to_owned()),
            ["refused", sqlstate, key] => r.refused.push(((*sqlstate).to_owned(), (*key).to_owned())),
            _ => panic!("{language}: unexpected output line {line:?}"),
        }
    }
    r
}

/// Runs the writer on `schema` and `topic` until it exits (killed after 120 s); panics unless it
/// exits 0.
async fn run_writer(w: &Writer, schema: &str, topic: &str) -> Reported {
    let mut cmd = tokio::process::Command::new(&w.program);
    cmd.arg(w.script)
        .args(["--schema", schema, "--topic", topic, "--orders", &ORDERS.to_string()])
        .env("DATABASE_URL", database_url())
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("{}: cannot start {}: {e}", w.language, w.program.display()));
    // On the timeout the child is dropped, which kills it.
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{}: {} still running after 120 s: killed", w.language, w.script))
        .unwrap_or_else(|e| panic!("{}: waiting for {}: {e}", w.language, w.script));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {} exited with {}:\n{stdout}{stderr}", w.language, w.script, out.status);
    parse(w.language, &stdout)
}

async fn writer_messages_all_arrive_and_rolled_back_ones_never(w: Writer) {
    if let Err(setup) = tokio::task::block_in_place(provisioned) {
        panic!("{}: the runtime for the example writers is not provisioned: {setup}", w.language);
    }
    let s = TestSchema::new(8).await;
    let topic = create_topic(&format!("writer-{}", w.language), 4).await;

    let reported = run_writer(&w, s.name.as_str(), &topic).await;
    assert_eq!(reported.committed.len(), ORDERS, "{}: committed lines", w.language);
    let ids: HashSet<Uuid> = reported.committed.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), ORDERS, "{}: every committed message has an id of its own", w.language);
    assert_eq!(reported.rolled_back, [ROLLED_BACK_KEY], "{}: rolled_back lines", w.language);
    assert_eq!(reported.refused, [("OB001".to_owned(), REFUSED_KEY.to_owned())], "{}: refused lines", w.language);

    let relay = InProcess::start(config(&s.name));
    wait_until_empty(&s, Duration::from_secs(120)).await;
    let stats = relay.shutdown().await;
    let received = read_topic(&topic, ORDERS, Duration::from_secs(60));

    let f = figures(&reported.committed, &received);
    let with_key = |key: &str| received.iter().filter(|r| r.key.as_deref() == Some(key)).count();
    let (rolled_back_records, refused_records) = (with_key(ROLLED_BACK_KEY), with_key(REFUSED_KEY));
    let c = connect().await;
    let orders = count(&c, &s.q(&format!("SELECT count(*) FROM __SCHEMA__.{}", w.table))).await;
    println!(
        "figures: {}: {f:?}; records with the rolled-back key {rolled_back_records}, with the refused key \
         {refused_records}; orders in the table {orders}; delivered by the relay {}",
        w.language,
        stats.delivered.load(Ordering::Relaxed)
    );
    assert_eq!(f.committed, ORDERS);
    assert_eq!(f.distinct, ORDERS, "{}: distinct ids at Kafka = messages committed", w.language);
    assert_eq!(f.lost, 0, "{}: committed messages missing at Kafka", w.language);
    assert_eq!(f.order_violations, 0, "{}: per key, arrivals follow commit order", w.language);
    assert_eq!(f.duplicates, 0, "{}: no failures, no restarts: no duplicates", w.language);
    assert_eq!(rolled_back_records, 0, "{}: the rolled-back order's message was delivered", w.language);
    assert_eq!(refused_records, 0, "{}: the refused order's message was delivered", w.language);
    assert_eq!(f.records, ORDERS, "{}: the topic holds the committed messages and nothing else", w.language);
    assert_eq!(stats.delivered.load(Ordering::Relaxed), ORDERS as u64, "{}: delivered by the relay", w.language);

    // The business write and the message go together: the orders in the table are exactly those
    // the delivered messages name.
    assert_eq!(orders, ORDERS as i64, "{}: orders in {}", w.language, w.table);
    let sql = s.q(&format!("SELECT id FROM __SCHEMA__.{}", w.table));
    let in_table: HashSet<Uuid> =
        c.query(&sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get(0)).collect();
    let mut in_messages = HashSet::new();
    for r in &received {
        assert_eq!(r.headers["content-type"], "application/json", "{}: content type", w.language);
        assert_eq!(r.headers["ce_type"], MESSAGE_TYPE, "{}: ce_type", w.language);
        assert_eq!(r.headers["x-source"], format!("{}-order-service", w.language), "{}: header", w.language);
        let payload: serde_json::Value = serde_json::from_slice(&r.payload)
            .unwrap_or_else(|e| panic!("{}: payload of {} is not JSON: {e}", w.language, r.id));
        assert_eq!(payload["customer"].as_str(), r.key.as_deref(), "{}: payload's customer = key", w.language);
        let order_id = payload["order_id"].as_str().and_then(|s| s.parse::<Uuid>().ok());
        in_messages.insert(order_id.unwrap_or_else(|| panic!("{}: no order id in message {}", w.language, r.id)));
    }
    assert_eq!(in_table, in_messages, "{}: orders in the table = orders the messages name", w.language);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_writer_messages_all_arrive_and_rolled_back_ones_never() {
    writer_messages_all_arrive_and_rolled_back_ones_never(python()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_writer_messages_all_arrive_and_rolled_back_ones_never() {
    writer_messages_all_arrive_and_rolled_back_ones_never(node()).await;
}
