//! A pool of PostgreSQL sessions for work that needs a session now and then rather than one of
//! its own for its whole life: the consumer runner's partition workers take one per batch, so a
//! consumer of 64 partitions does not hold 64 sessions. Sessions come from [`DbConfig::connect`]
//! (the same TLS, keepalives, statement timeout and setup as every other session of the product).
//!
//! The relay's lane sessions are not pooled: each holds its lane's advisory lock for as long as it
//! owns the lane, so a session is the lane's ownership, not a resource to share.

use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult, Timeouts};
use deadpool::Runtime;
use tokio_postgres::Client;

use crate::db::{ConnectError, DbConfig};

/// How many sessions a pool opens at most, and how long a caller waits for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Sessions open at most.
    pub max_size: usize,
    /// How long a caller waits for a free session before the wait fails (and is retried by the
    /// caller like any unavailable database).
    pub wait_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings { max_size: 8, wait_timeout: Duration::from_secs(30) }
    }
}

/// Opens sessions and hands back the ones still alive.
#[derive(Debug)]
pub struct Sessions(DbConfig);

impl managed::Manager for Sessions {
    type Type = Client;
    type Error = ConnectError;

    async fn create(&self) -> Result<Client, ConnectError> {
        self.0.connect().await
    }

    async fn recycle(&self, client: &mut Client, _: &Metrics) -> RecycleResult<ConnectError> {
        // A session the server ended (restart, `pg_terminate_backend`) is dropped, not reused.
        if client.is_closed() {
            return Err(RecycleError::message("the session was closed"));
        }
        Ok(())
    }
}

/// A session lent by a [`Pool`]; it goes back when dropped. [`discard`] drops it for good
/// (after an error that may have left it unusable).
pub type Pooled = Object<Sessions>;

/// A pool of sessions to one database.
#[derive(Debug, Clone)]
pub struct Pool(managed::Pool<Sessions>);

impl Pool {
    /// A pool that opens sessions lazily, as callers ask for them.
    pub fn new(db: DbConfig, settings: PoolSettings) -> Pool {
        let pool = managed::Pool::builder(Sessions(db))
            .max_size(settings.max_size.max(1))
            .timeouts(Timeouts { wait: Some(settings.wait_timeout), create: None, recycle: None })
            .runtime(Runtime::Tokio1)
            .build()
            .expect("a pool with a runtime and a size always builds");
        Pool(pool)
    }

    /// A session: a free one, a new one if the pool is not full, or the next one given back.
    pub async fn get(&self) -> Result<Pooled, ConnectError> {
        self.0.get().await.map_err(|e| match e {
            PoolError::Backend(e) => e,
            PoolError::Timeout(_) => ConnectError::PoolExhausted(self.0.status().max_size),
            other => ConnectError::Pool(other.to_string()),
        })
    }
}

/// Drops a lent session for good instead of giving it back.
pub fn discard(session: Pooled) {
    let _ = Object::take(session);
}
