//! Shared test support: service endpoints, throwaway schemas, a TCP proxy.

#![allow(dead_code)]

pub mod cli;
pub mod kafka;
pub mod pg_tls;
pub mod proxy;
pub mod relay;
pub mod workload;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use outbox_relay::db::DbConfig;
use outbox_relay::schema::{self, SchemaName};
use tokio_postgres::Client;

/// Waits until `look` reports done (`Ok`), looking every `poll`; panics after `within` with what the
/// last look reported (`Err`). Returns the value and how long it took. The tests' one wait-until
/// loop.
pub async fn eventually<R, F, Fut>(within: Duration, poll: Duration, mut look: F) -> (R, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<R, String>>,
{
    let start = std::time::Instant::now();
    loop {
        match look().await {
            Ok(r) => return (r, start.elapsed()),
            Err(status) => assert!(start.elapsed() < within, "not within {within:?}: {status}"),
        }
        tokio::time::sleep(poll).await;
    }
}

/// The PostgreSQL URL the tests use. Missing is a failure, not a skip.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run the tests with `bash scripts/test.sh`, which provisions PostgreSQL and the broker",
    )
}

/// The broker list the tests use. Missing is a failure, not a skip.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").expect(
        "KAFKA_BROKERS is not set: run the tests with `bash scripts/test.sh`, which provisions PostgreSQL and the broker",
    )
}

/// A fresh client on the test database.
pub async fn connect() -> Client {
    DbConfig::parse(&database_url()).expect("DATABASE_URL parses").connect().await.expect("connect to PostgreSQL")
}

/// A name no other test (in this or another run) uses.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::random();
    format!("{prefix}_{}_{n}_{r:08x}", std::process::id())
}

/// A schema of its own for one test, migrated, dropped when the test ends (also on failure).
pub struct TestSchema {
    pub name: SchemaName,
    pub lanes: u16,
}

impl TestSchema {
    pub async fn new(lanes: u16) -> Self {
        let name = SchemaName::new(&unique_name("t")).unwrap();
        let mut client = connect().await;
        let report = schema::migrate(&mut client, &name, Some(lanes)).await.expect("migrate test schema");
        assert_eq!(report.lanes, lanes);
        Self { name, lanes }
    }

    /// A name without installing anything (for migrate tests).
    pub fn empty() -> Self {
        Self { name: SchemaName::new(&unique_name("t")).unwrap(), lanes: 0 }
    }

    pub fn q(&self, sql: &str) -> String {
        self.name.qualify(sql)
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        clean_up(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name.ident()));
    }
}

/// Runs `sql` on the test database from a `Drop` (which runs inside the test's runtime: on a
/// thread of its own), ignoring failures.
pub fn clean_up(sql: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            if let Ok(c) = DbConfig::parse(&database_url()).unwrap().connect().await {
                let _ = c.batch_execute(&sql).await;
            }
        });
    })
    .join();
}

/// Counts rows of a query returning one bigint.
pub async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}
