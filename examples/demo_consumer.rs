//! Demo consumer: keeps per-customer order totals, applying each `orders.created` message exactly
//! once with the inbox and the consumer runner. Stop it with SIGTERM/SIGINT; it then prints its
//! counters as one line: `consumer: processed N duplicates N conflicts N dead_lettered N`.
//!
//! ```sh
//! DATABASE_URL=... KAFKA_BROKERS=... cargo run --example demo_consumer
//! ```
//! Environment: `DATABASE_URL`, `KAFKA_BROKERS`, `OUTBOX_SCHEMA` (default `outbox`, where the
//! inbox lives), `DEMO_TOPIC` (default `demo.orders`), `DEMO_GROUP` (default `demo-totals`),
//! `DEMO_BATCH` (messages per transaction, default 100), `OUTBOX_LOG` (log level, default `warn`).
//!
//! For fault tests (`scripts/soak.sh`), both off by default:
//! - `DEMO_CRASH_ON_SIGUSR1=1`: SIGUSR1 arms a crash; the runner then stops right after its next
//!   database commit, before the offset is stored, and the process exits with status 3. The
//!   messages of that commit are delivered again after a restart; the inbox must skip them.
//! - `DEMO_KAFKA_PROPERTIES`: librdkafka properties, `name=value` separated by spaces or commas
//!   (such as `session.timeout.ms=6000`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use outbox_relay::consumer::{
    self, ConsumedMessage, ConsumerConfig, ConsumerError, ConsumerStats, CrashAfterCommit, Handler, HandlerFuture,
};
use outbox_relay::db::DbConfig;
use outbox_relay::schema::SchemaName;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

/// The effect: add the order to its customer's totals.
struct CustomerTotals;

impl Handler for CustomerTotals {
    fn handle<'a>(&'a self, tx: &'a Transaction<'a>, message: &'a ConsumedMessage) -> HandlerFuture<'a> {
        Box::pin(async move {
            let order: serde_json::Value = serde_json::from_slice(message.payload.as_deref().unwrap_or_default())?;
            let customer = order["customer"].as_str().ok_or("order without a customer")?;
            let amount = order["amount_cents"].as_i64().ok_or("order without an amount")?;
            tx.execute(
                "INSERT INTO demo.customer_totals (customer, orders, amount_cents) VALUES ($1, 1, $2)
                 ON CONFLICT (customer) DO UPDATE
                 SET orders = demo.customer_totals.orders + 1, amount_cents = demo.customer_totals.amount_cents + $2",
                &[&customer, &amount],
            )
            .await?;
            Ok(())
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Log lines (rebalances, retries, dead letters) to standard error, at OUTBOX_LOG's level
    // (`warn` by default), when the crate is built with the daemon's logging.
    #[cfg(feature = "relay")]
    {
        let filter = tracing_subscriber::EnvFilter::try_from_env("OUTBOX_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    // Spans of each handled message when OTEL_EXPORTER_OTLP_ENDPOINT is set; flushed at exit.
    let _traces = match outbox_relay::traces::Settings::from_env("outbox-demo-consumer")? {
        Some(s) => Some(outbox_relay::traces::install(&s)?),
        None => None,
    };
    // Installed first, so that a SIGUSR1 never finds the default action (terminate) in place.
    let crash_armed = Arc::new(AtomicBool::new(false));
    let crash_on_sigusr1 = std::env::var("DEMO_CRASH_ON_SIGUSR1").is_ok_and(|v| v == "1");
    if crash_on_sigusr1 {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let armed = crash_armed.clone();
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                eprintln!("consumer: SIGUSR1: crash armed for after the next commit");
                armed.store(true, Ordering::SeqCst);
            }
        });
    }
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let brokers = std::env::var("KAFKA_BROKERS").map_err(|_| "set KAFKA_BROKERS")?;
    let schema: SchemaName = std::env::var("OUTBOX_SCHEMA").unwrap_or_else(|_| "outbox".into()).parse()?;
    let topic = std::env::var("DEMO_TOPIC").unwrap_or_else(|_| "demo.orders".into());
    let group = std::env::var("DEMO_GROUP").unwrap_or_else(|_| "demo-totals".into());
    let batch: usize = std::env::var("DEMO_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let db = DbConfig::parse(&url)?;
    db.connect()
        .await?
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS demo;
             CREATE TABLE IF NOT EXISTS demo.customer_totals (
                 customer text PRIMARY KEY, orders bigint NOT NULL, amount_cents bigint NOT NULL)",
        )
        .await?;
    let mut config = ConsumerConfig::new(brokers, group, vec![topic], "demo-totals", schema, db);
    config.batch_size = batch;
    if let Ok(props) = std::env::var("DEMO_KAFKA_PROPERTIES") {
        for p in props.split([' ', ',']).filter(|p| !p.is_empty()) {
            let (name, value) = p.split_once('=').ok_or("DEMO_KAFKA_PROPERTIES: name=value expected")?;
            config.properties.push((name.to_owned(), value.to_owned()));
        }
    }
    if crash_on_sigusr1 {
        let armed = crash_armed.clone();
        config.crash_after_commit = Some(CrashAfterCommit(Arc::new(move |m: &ConsumedMessage| {
            let fire = armed.swap(false, Ordering::SeqCst);
            if fire {
                eprintln!(
                    "consumer: crashing after the commit of {} ({}/{}@{}), before its offset is stored",
                    m.id, m.topic, m.partition, m.offset
                );
            }
            fire
        })));
    }
    let stop = CancellationToken::new();
    // DEMO_METRICS_ADDR (host:port): serve the inbox's metrics (outbox_inbox_*) on /metrics.
    #[cfg(feature = "relay")]
    if let Ok(addr) = std::env::var("DEMO_METRICS_ADDR") {
        let handle = outbox_relay::health::install_recorder();
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on DEMO_METRICS_ADDR {addr}: {e}"))?;
        let health = Arc::new(outbox_relay::health::Health::new(std::time::Duration::from_secs(300)));
        tokio::spawn(outbox_relay::health::serve(listener, Some(handle), health, stop.clone()));
    }
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (signal(SignalKind::terminate()).unwrap(), signal(SignalKind::interrupt()).unwrap());
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        signal_stop.cancel();
    });
    let stats = Arc::new(ConsumerStats::default());
    let result = consumer::run(config, Arc::new(CustomerTotals), stop, stats.clone()).await;
    println!(
        "consumer: processed {} duplicates {} conflicts {} dead_lettered {}",
        stats.processed.load(Ordering::Relaxed),
        stats.duplicates.load(Ordering::Relaxed),
        stats.conflicts.load(Ordering::Relaxed),
        stats.dead_lettered.load(Ordering::Relaxed)
    );
    if let Err(ConsumerError::InjectedCrash) = result {
        eprintln!("consumer: exiting after the injected crash (status 3)");
        std::process::exit(3);
    }
    result?;
    Ok(())
}
