//! The coordinator: heartbeats the instance in `relay_instances`, counts the live instances, takes
//! or lets go of lanes so that each holds its fair share, starts the lane loops, and runs the
//! periodic work (backlog and horizon gauges, pruning, the sweep) in tasks of their own.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::database::Database;
use super::lane::{self, LaneExit};
use super::lane_session::{LaneConn, LaneOf, LaneSession};
use super::{breaker, lanes, maintenance, sweep, RelayConfig, Shared};

pub(super) struct OwnedLane {
    stop: CancellationToken,
    task: JoinHandle<LaneExit>,
    /// The session the lane shares with others under `--max-sessions` (none: a session of its
    /// own, whose end lets go of the lock).
    shared_session: Option<Arc<LaneConn>>,
}

/// One outbox's coordinator in this instance.
pub(super) struct Coordinator {
    shared: Arc<Shared>,
    /// The sessions it shares with the other outboxes of its database.
    database: Arc<Database>,
    lock_class: i32,
    lanes_total: u16,
    owned: BTreeMap<i16, OwnedLane>,
    registered: bool,
    next_maintenance: tokio::time::Instant,
    pruning: Option<JoinHandle<()>>,
    next_sweep: tokio::time::Instant,
    sweeping: Option<JoinHandle<()>>,
    last_backlog: tokio::time::Instant,
    horizon_warned: bool,
}

impl Coordinator {
    pub(super) fn new(shared: Arc<Shared>, database: Arc<Database>, lock_class: i32, lanes_total: u16) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            database,
            lock_class,
            lanes_total,
            owned: BTreeMap::new(),
            registered: false,
            next_maintenance: now + shared.config.maintenance_interval,
            pruning: None,
            next_sweep: now + shared.config.sweep_interval,
            sweeping: None,
            horizon_warned: false,
            last_backlog: now - Duration::from_secs(60),
            shared,
        }
    }

    /// Forgets the control session (it timed out); the next step opens another.
    pub(super) async fn drop_control(&self) {
        self.database.control.reset().await;
    }

    /// Lets every lane finish its batch and go (within `shutdown_timeout`), deregisters, and stops
    /// the periodic tasks.
    pub(super) async fn shutdown(&mut self) {
        let config = self.shared.config.clone();
        tracing::info!(instance = %config.instance_id, lanes = self.owned.len(), "shutting down: finishing in-flight batches");
        if tokio::time::timeout(config.shutdown_timeout, self.release_all()).await.is_err() {
            tracing::warn!(
                timeout_ms = config.shutdown_timeout.as_millis() as u64,
                "shutdown deadline passed with batches in flight; their rows stay in the outbox and are delivered again"
            );
        }
        if tokio::time::timeout(Duration::from_secs(5), self.deregister()).await.is_err() {
            tracing::warn!("could not deregister in time; the instance row expires by itself");
        }
        for task in [self.sweeping.take(), self.pruning.take()].into_iter().flatten() {
            task.abort();
        }
    }

    fn config(&self) -> &RelayConfig {
        &self.shared.config
    }

    async fn control(&self) -> Option<Arc<Client>> {
        self.database.control.get().await
    }

    pub(super) async fn tick(&mut self) {
        self.reap().await;
        crate::telemetry::lanes_owned(&self.shared.label, self.owned.len());
        crate::telemetry::breaker_state(self.shared.breaker.state().as_gauge());
        self.shared.health.set_lanes(&self.shared.label.part, self.owned.len());
        self.shared.health.set_breaker_open(self.shared.breaker.state() == breaker::BreakerState::Open);
        let live = match self.heartbeat().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed; will retry");
                self.shared.health.set_db_ok(&self.shared.label.part, false);
                self.database.control.reset().await;
                return;
            }
        };
        self.shared.health.set_db_ok(&self.shared.label.part, true);
        // The backlog count reads the whole outbox: every few seconds (--backlog-interval) is enough.
        if self.last_backlog.elapsed() >= self.config().backlog_interval {
            self.last_backlog = tokio::time::Instant::now();
            if let Err(e) = self.observe_backlog().await {
                tracing::debug!(error = %e, "backlog query failed");
            }
        }
        // The first heartbeat only registers, so instances starting together see each other
        // before taking lanes.
        if !self.registered {
            self.registered = true;
            return;
        }
        // Pruning can take long (a large archive, many kept keys): in a task of its own with a
        // session of its own, so the heartbeat never waits for it.
        if tokio::time::Instant::now() >= self.next_maintenance && self.pruning.as_ref().is_none_or(|t| t.is_finished())
        {
            self.next_maintenance = tokio::time::Instant::now() + self.config().maintenance_interval;
            let task = maintenance::prune(self.shared.clone(), self.database.clone());
            self.pruning = Some(tokio::spawn(task.instrument(tracing::Span::current())));
        }
        if tokio::time::Instant::now() >= self.next_sweep && self.sweeping.as_ref().is_none_or(|t| t.is_finished()) {
            self.next_sweep = tokio::time::Instant::now() + self.config().sweep_interval;
            let task = sweep::sweep(self.shared.clone(), self.database.clone());
            self.sweeping = Some(tokio::spawn(task.instrument(tracing::Span::current())));
        }
        let fair = (self.lanes_total as usize).div_ceil(live.max(1) as usize);
        let target = self.config().max_lanes.map_or(fair, |m| fair.min(m as usize));
        if self.owned.len() > target {
            self.release_extra(target).await;
        } else if self.owned.len() < target {
            if let Err(e) = self.acquire(target).await {
                tracing::warn!(error = %e, "taking lanes failed; will retry");
            }
        }
    }

    async fn reap(&mut self) {
        let finished: Vec<i16> = self.owned.iter().filter(|(_, l)| l.task.is_finished()).map(|(k, _)| *k).collect();
        for lane in finished {
            let owned = self.owned.remove(&lane).expect("listed");
            let exit = owned.task.await;
            self.unlock_shared(lane, owned.shared_session).await;
            match exit {
                Ok(LaneExit::Released) => {}
                Ok(LaneExit::SessionLost(why)) => {
                    self.shared.stats.sessions_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(lane, reason = %why, "lane session lost; delivery for the lane stopped, will try to take it again")
                }
                Err(e) => tracing::error!(lane, error = %e, "lane task failed"),
            }
        }
    }

    async fn heartbeat(&mut self) -> Result<i64, String> {
        self.heartbeat_inner().await.map_err(|e| e.to_string())?.ok_or_else(|| "no control session".to_owned())
    }

    async fn heartbeat_inner(&mut self) -> Result<Option<i64>, tokio_postgres::Error> {
        let lanes: Vec<i16> = self.owned.keys().copied().collect();
        let id = self.config().instance_id;
        let timeout_ms = self.config().instance_timeout.as_millis() as i64;
        let schema = self.config().schema.clone();
        let host = hostname();
        let breaker = self.shared.breaker.state().as_str();
        let Some(control) = self.control().await else { return Ok(None) };
        control
            .execute(
                &schema.qualify(include_str!("../sql/heartbeat.sql")),
                &[&id, &host, &(std::process::id() as i32), &env!("CARGO_PKG_VERSION"), &lanes, &breaker],
            )
            .await?;
        control.execute(&schema.qualify(include_str!("../sql/reap_instances.sql")), &[&timeout_ms]).await?;
        let live: i64 = control
            .query_one(&schema.qualify(include_str!("../sql/live_instances.sql")), &[&timeout_ms, &id])
            .await?
            .get("live");
        Ok(Some(live))
    }

    async fn acquire(&mut self, target: usize) -> Result<(), tokio_postgres::Error> {
        let lock_class = self.lock_class;
        let Some(control) = self.control().await else { return Ok(()) };
        let taken: Vec<i32> = control
            .query(include_str!("../sql/taken_lanes.sql"), &[&i64::from(lock_class)])
            .await?
            .iter()
            .map(|r| r.get("lane"))
            .collect();
        let mut free: Vec<i16> = (0..self.lanes_total as i16)
            .filter(|l| !taken.contains(&i32::from(*l)) && !self.owned.contains_key(l))
            .collect();
        // Instances racing for the same free lanes start at different places.
        free.shuffle(&mut rand::rng());
        free.truncate(target.saturating_sub(self.owned.len()));
        if self.database.pool.is_some() {
            self.acquire_shared(free).await;
            return Ok(());
        }
        // The sessions open at once: opening them one after another took a relay started on a
        // backlog 4-6 s to reach its 16 lanes, while the first lanes' work slowed every connect.
        // A lane another instance took in the meantime comes back `None`; the next tick tries others.
        let cfg = self.shared.config.clone();
        let opened = futures::future::join_all(free.into_iter().map(|lane| {
            // The session names its instance and lane, so operators (and pg_stat_activity) see who holds what.
            let db = cfg.db.clone().with_application_name(&format!("outbox-relay {} lane {lane}", cfg.instance_id));
            let cfg = cfg.clone();
            async move {
                (
                    lane,
                    LaneSession::try_acquire(&db, &cfg.schema, lock_class, lane, cfg.archive, cfg.db_call_timeout)
                        .await,
                )
            }
        }))
        .await;
        for (lane, result) in opened {
            match result {
                Ok(Some(session)) => {
                    let stop = CancellationToken::new();
                    let run = lane::run_lane(self.shared.clone(), lane, session, stop.clone());
                    let task = tokio::spawn(run.instrument(tracing::Span::current()));
                    self.owned.insert(lane, OwnedLane { stop, task, shared_session: None });
                    self.shared.stats.lanes_acquired.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(lane, instance = %cfg.instance_id, "lane acquired");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(lane, error = %e, "could not open a session for a lane; will retry"),
            }
        }
        Ok(())
    }

    /// Takes `free` lanes on the database's pool of lane sessions (at most `--max-sessions` of
    /// them, shared with the other outboxes there). Each lock is taken on the session that will
    /// run the lane's statements.
    async fn acquire_shared(&mut self, free: Vec<i16>) {
        let cfg = self.shared.config.clone();
        let pool = self.database.pool.as_ref().expect("a pool");
        for lane in free {
            let conn = match pool.pick().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(lane, error = %e, "could not open a lane session; will retry");
                    return;
                }
            };
            let of = LaneOf { schema: &cfg.schema, lock_class: self.lock_class, archive: cfg.archive, lane };
            match LaneSession::try_acquire_on(&conn, of).await {
                Ok(Some(session)) => {
                    let stop = CancellationToken::new();
                    let run = lane::run_lane(self.shared.clone(), lane, session, stop.clone());
                    let task = tokio::spawn(run.instrument(tracing::Span::current()));
                    self.owned.insert(lane, OwnedLane { stop, task, shared_session: Some(conn) });
                    self.shared.stats.lanes_acquired.fetch_add(1, Ordering::Relaxed);
                    let sessions = pool.len().await;
                    tracing::info!(lane, instance = %cfg.instance_id, sessions, "lane acquired");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(lane, error = %e, "could not take a lane's lock; will retry"),
            }
        }
    }

    /// After a lane on a shared session ended: lets go of its lock on that session (queued behind
    /// every statement the lane sent there). A session that is gone leaves the pool (the server
    /// released its locks); one that cannot let go in time is retired: every lane on it (of any
    /// outbox) stops, so that it closes with the last of them and the server releases the lock.
    async fn unlock_shared(&mut self, lane: i16, conn: Option<Arc<LaneConn>>) {
        let Some(conn) = conn else { return };
        let pool = self.database.pool.as_ref().expect("a pool");
        let failed = match conn.closed().is_cancelled() {
            true => None,
            false => conn.unlock(self.lock_class, lane).await.err(),
        };
        if let Some(e) = &failed {
            tracing::warn!(lane, error = %e, "could not let go of a lane's lock; retiring its session and the lanes on it");
            conn.retire();
        }
        if conn.closed().is_cancelled() {
            pool.forget(&conn).await;
        }
    }

    /// Backlog gauges, and the age of the oldest head among this instance's lanes (for /readyz).
    /// A lane's head is looked for from its claim cursor, so that this does not walk the rows
    /// deleted under an old snapshot either.
    async fn observe_backlog(&mut self) -> Result<(), tokio_postgres::Error> {
        let running: HashMap<i16, i64> = self.shared.signals.cursors().into_iter().collect();
        let lanes: Vec<i16> = self.owned.keys().copied().collect();
        let from: Vec<i64> = lanes.iter().map(|l| running.get(l).copied().unwrap_or(lanes::FROM_START)).collect();
        let schema = self.config().schema.clone();
        let Some(control) = self.control().await else { return Ok(()) };
        let row = control.query_one(&schema.qualify(include_str!("../sql/backlog.sql")), &[&lanes, &from]).await?;
        let (rows, oldest, head): (i64, f64, f64) = (row.get("pending"), row.get("oldest_s"), row.get("head_s"));
        crate::telemetry::backlog(&self.shared.label, rows, Duration::from_secs_f64(oldest.max(0.0)));
        self.shared.health.set_oldest_head(&self.shared.label.part, Duration::from_secs_f64(head.max(0.0)));
        self.observe_horizon().await
    }

    /// The outbox's dead tuples, the age of the oldest snapshot on the database, and what the
    /// newest reconciliation of each consumer found, as metrics;
    /// a warning (once, until it clears) when that snapshot is older than `--horizon-warn`. The
    /// relay stays ready: it is not at fault, and its claims do not slow down (they start at each lane's
    /// cursor), but the outbox table and its indexes grow while it lasts.
    async fn observe_horizon(&mut self) -> Result<(), tokio_postgres::Error> {
        let schema = self.config().schema.clone();
        let warn_after = self.config().horizon_warn;
        let Some(control) = self.control().await else { return Ok(()) };
        let control = &*control;
        let dead = crate::horizon::dead_tuples(control, &schema).await?;
        let oldest = crate::horizon::snapshot_holders(control, 1).await?.into_iter().next();
        let age = oldest.as_ref().and_then(|h| h.age_seconds).unwrap_or(0.0).max(0.0);
        crate::telemetry::queue_health(&self.shared.label, dead, Duration::from_secs_f64(age));
        for r in crate::ops::reconcile::last_reconciliations(control, &schema).await? {
            crate::telemetry::reconciliation(
                &self.shared.label,
                &r.found.consumer,
                r.found.missing,
                Duration::from_secs_f64(r.age_seconds.max(0.0)),
            );
        }
        match oldest {
            Some(h) if age > warn_after.as_secs_f64() => {
                if !self.horizon_warned {
                    self.horizon_warned = true;
                    tracing::warn!(kind = %h.kind, pid = ?h.pid, application = %h.name, client = %h.client,
                        state = %h.state, age_s = age as u64, dead_tuples = dead,
                        "an old snapshot holds back the cleanup of delivered rows, so the outbox table grows: \
                         end that transaction (`outbox-relay status` names it; pg_terminate_backend(pid)), or drop \
                         the replication slot");
                }
            }
            _ => self.horizon_warned = false,
        }
        Ok(())
    }

    async fn release_extra(&mut self, target: usize) {
        while self.owned.len() > target {
            let (lane, owned) = self.owned.pop_last().expect("more than target");
            owned.stop.cancel();
            let _ = owned.task.await;
            self.unlock_shared(lane, owned.shared_session).await;
            tracing::info!(lane, instance = %self.shared.config.instance_id, "lane released to balance instances");
        }
    }

    async fn release_all(&mut self) {
        for owned in self.owned.values() {
            owned.stop.cancel();
        }
        while let Some((lane, owned)) = self.owned.pop_first() {
            let _ = owned.task.await;
            self.unlock_shared(lane, owned.shared_session).await;
            tracing::debug!(lane, "lane released");
        }
    }

    async fn deregister(&mut self) {
        let id = self.config().instance_id;
        let sql = self.config().schema.qualify(include_str!("../sql/deregister.sql"));
        if let Some(control) = self.control().await {
            if let Err(e) = control.execute(&sql, &[&id]).await {
                tracing::warn!(error = %e, "could not deregister; the row expires by itself");
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".to_owned())
}
