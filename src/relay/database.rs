//! What the outboxes of one database share in an instance: a control session (heartbeats, lane
//! balancing, gauges), a background session (sweeps, pruning), one LISTEN session for every
//! outbox's channel, and under a session budget the pool of lane sessions. So the sessions an
//! instance holds on a database are bounded by the budget plus three, however many outboxes and
//! lanes it serves there.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::lane_session::LaneConn;
use super::lanes::LaneSignals;
use super::listener::reconnect_policy;
use crate::db::{ConnectError, DbConfig};

/// One session several tasks send statements on (the driver pipelines them), opened when first
/// asked for and again after it broke.
pub(crate) struct SessionSlot {
    db: DbConfig,
    what: &'static str,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl SessionSlot {
    fn new(db: DbConfig, what: &'static str) -> Self {
        Self { db, what, client: tokio::sync::Mutex::new(None) }
    }

    /// The session, opened (three tries, jittered backoff) if there is none or it broke; `None`
    /// when the database cannot be reached now.
    pub(crate) async fn get(&self) -> Option<Arc<Client>> {
        use backon::Retryable;
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_some_and(|c| c.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            let db = self.db.clone();
            let what = self.what;
            let connect = (|| db.connect())
                .retry(reconnect_policy().with_max_times(3))
                .sleep(tokio::time::sleep)
                .notify(|e, after| {
                    tracing::warn!(error = %e, session = what, retry_in_ms = after.as_millis() as u64, "session unavailable; retrying")
                });
            match connect.await {
                Ok(c) => *slot = Some(Arc::new(c)),
                Err(e) => {
                    tracing::warn!(error = %e, session = what, "session unavailable; lanes keep running, this work waits");
                    return None;
                }
            }
        }
        slot.clone()
    }

    /// Drops the session (a statement on it failed or timed out); the next [`get`](Self::get)
    /// opens another.
    pub(crate) async fn reset(&self) {
        *self.client.lock().await = None;
    }
}

/// The lane sessions of every outbox of one database, at most `budget` of them: a new lane goes
/// on a new session while below the budget, else on the one serving the fewest lanes.
pub(crate) struct SessionPool {
    db: DbConfig,
    budget: usize,
    call_timeout: std::time::Duration,
    instance: uuid::Uuid,
    sessions: tokio::sync::Mutex<Vec<Arc<LaneConn>>>,
    opened: std::sync::atomic::AtomicUsize,
}

impl SessionPool {
    /// The session the next lane goes on.
    pub(crate) async fn pick(&self) -> Result<Arc<LaneConn>, ConnectError> {
        let mut sessions = self.sessions.lock().await;
        sessions.retain(|c| !c.closed().is_cancelled());
        if sessions.len() < self.budget {
            let n = self.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let db = self.db.clone().with_application_name(&format!("outbox-relay {} lane session {n}", self.instance));
            let conn = LaneConn::open(&db, self.call_timeout).await?;
            sessions.push(conn.clone());
            return Ok(conn);
        }
        Ok(sessions.iter().min_by_key(|c| c.lanes()).expect("a budget of at least one").clone())
    }

    /// Takes `conn` out of the pool (it is gone or retired).
    pub(crate) async fn forget(&self, conn: &Arc<LaneConn>) {
        self.sessions.lock().await.retain(|c| !Arc::ptr_eq(c, conn));
    }

    /// The sessions open now.
    pub(crate) async fn len(&self) -> usize {
        self.sessions.lock().await.len()
    }
}

/// The channels the database's LISTEN session follows, and whose lanes each one wakes.
type Channels = Arc<RwLock<HashMap<String, LaneSignals>>>;

/// What the outboxes of one database share in this instance.
pub(crate) struct Database {
    /// Heartbeats, lane balancing and gauges of every outbox here.
    pub(crate) control: SessionSlot,
    /// Sweeps and pruning, which may take long: apart from the control session, so that no
    /// heartbeat waits for them.
    pub(crate) background: SessionSlot,
    /// The lane sessions under a budget (`None`: each lane has a session of its own).
    pub(crate) pool: Option<SessionPool>,
    channels: Channels,
    /// Asks the LISTEN task to follow a channel it did not follow yet.
    follow: tokio::sync::mpsc::UnboundedSender<String>,
    stop: CancellationToken,
    listener: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Database {
    /// Starts the database's LISTEN task (it follows no channel until an outbox is added).
    pub(crate) fn start(
        db: DbConfig,
        budget: Option<u16>,
        call_timeout: std::time::Duration,
        instance: uuid::Uuid,
    ) -> Arc<Self> {
        let channels: Channels = Default::default();
        let (follow, asked) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        // Each session names its instance and its job, so operators (and pg_stat_activity) see who holds what.
        let named = |what: &str| db.clone().with_application_name(&format!("outbox-relay {instance} {what}"));
        let listener = tokio::spawn(super::listener::listen(named("listen"), channels.clone(), asked, stop.clone()));
        Arc::new(Self {
            control: SessionSlot::new(named("control"), "control"),
            background: SessionSlot::new(named("background"), "background"),
            pool: budget.map(|b| SessionPool {
                db,
                budget: usize::from(b.max(1)),
                call_timeout,
                instance,
                sessions: Default::default(),
                opened: Default::default(),
            }),
            channels,
            follow,
            stop,
            listener: std::sync::Mutex::new(Some(listener)),
        })
    }

    /// Follows an outbox's NOTIFY channel, waking `signals`' lanes.
    pub(crate) fn add_outbox(&self, channel: String, signals: LaneSignals) {
        self.channels.write().expect("channels lock").insert(channel.clone(), signals);
        let _ = self.follow.send(channel);
    }

    /// Stops following an outbox's channel (it stopped).
    pub(crate) fn remove_outbox(&self, channel: &str) {
        self.channels.write().expect("channels lock").remove(channel);
    }

    /// Stops the LISTEN task.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let task = self.listener.lock().expect("listener lock").take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}
