//! One lane's delivery loop: claim the lane's pending rows in sequence order from its cursor and
//! hand them to the producer, and keep claiming past what is in flight while earlier rows await
//! their acknowledgements, within a bounded window ([`super::deliver`]). A batch all of whose rows
//! were acknowledged is deleted (or archived) at once; when anything in the window fails, the lane
//! claims nothing more until every record in the window has its outcome, then settles them
//! together: delete what was acknowledged, record failed attempts, move dead letters, decide what a
//! failure means for the row (retry, dead letter, leave it) and for the breaker, and claim again
//! from the first row still pending.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::breaker::{BreakerState, Permit};
use super::completions::Completions;
use super::deliver::Window;
use super::lane_session::{ClaimedRow, LaneSession};
use super::settle::{acknowledged, settle_window};
use super::{lanes, Shared};

/// Why a lane loop ended.
#[derive(Debug)]
pub(crate) enum LaneExit {
    /// Asked to stop (shutdown or rebalance) and settled what it had in flight.
    Released,
    /// Its session is gone, or a statement failed or timed out; the lock goes with the session.
    SessionLost(String),
}

/// What the loop knows between iterations.
pub(super) struct LaneState {
    /// Where the next claim starts: every row below it was delivered or dead-lettered, is in the
    /// window, or committed late (announced by its NOTIFY or found by the sweep).
    pub(super) cursor: i64,
    /// One past the highest sequence this loop handed to the producer. Every row in the window or
    /// still being deleted is below it, so a claim's rows below it are checked against those; the
    /// cursor alone does not say so, as a claim from below it that read only such rows moves the
    /// cursor back to go on from where that claim stopped.
    pub(super) taken_to: i64,
    /// The next claim reads the whole lane (from its start, no upper bound): after a wait that no
    /// NOTIFY ended, so that rows written without one are found.
    pub(super) full_claim: bool,
    /// Rows may be there to claim: a NOTIFY came, or the last claim was full.
    pub(super) more: bool,
    /// The head waits for its retry until then.
    pub(super) retry_at: Option<Instant>,
    /// The breaker said to wait until then.
    pub(super) breaker_until: Option<Instant>,
    /// After a failure the lane sends one row at a time, with nothing else in flight, until one
    /// gets through: a flaky broker is not sent whole windows that will be purged and sent again.
    pub(super) cautious: bool,
    /// Idle waits in a row that ended in a full read finding nothing: each doubles the next wait,
    /// up to the sweep interval (see [`idle_wait`]).
    pub(super) idle_reads: u32,
    /// The latest transactions the lane looked below its cursor for (`claim.sql`): all their
    /// rows below were taken then, so a large transaction spanning many claims is looked for once.
    pub(super) looked_below: std::collections::VecDeque<i64>,
}

/// How many transactions a lane remembers having looked below its cursor for.
const LOOKED_BELOW: usize = 32;

pub(crate) async fn run_lane(
    shared: Arc<Shared>,
    lane: i16,
    session: LaneSession,
    stop: CancellationToken,
) -> LaneExit {
    let mut wake = shared.signals.subscribe(lane);
    let mut window = Window::new(shared.producer.router().open());
    let mut st = LaneState {
        cursor: lanes::FROM_START,
        taken_to: lanes::FROM_START,
        full_claim: true,
        more: true,
        retry_at: None,
        breaker_until: None,
        cautious: false,
        looked_below: std::collections::VecDeque::with_capacity(LOOKED_BELOW),
        idle_reads: 0,
    };
    let _published = CursorGuard { shared: &shared, lane };
    let mut breaker_changes = shared.breaker.subscribe();
    let mut failed_check = tokio::time::interval(Duration::from_millis(50));
    failed_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max_in_flight = shared.config.max_in_flight.max(1);
    let mut completions = Completions::new(&session);
    loop {
        if session.closed().is_cancelled() {
            return LaneExit::SessionLost("the lane's database session closed".into());
        }
        window.take_reports(&shared);
        while let Some(batch) = window.pop_acknowledged() {
            let (rows, acked) = acknowledged(&shared, batch);
            completions.push(rows, acked).await;
            st.cautious = false;
        }
        if window.troubled() && window.resolved() {
            // Deletes stay in order: what was acknowledged before goes first.
            if let Err(e) = completions.drain(&shared).await {
                return LaneExit::SessionLost(e);
            }
            let (batches, generation) = window.take_all();
            if let Err(exit) = settle_window(&shared, lane, &session, batches, generation, &mut st).await {
                return exit;
            }
            st.more = true;
        }
        shared.signals.publish_cursor(lane, window.lowest().map_or(st.cursor, |w| w.min(st.cursor)));
        let stopping = stop.is_cancelled();
        if stopping && window.is_empty() {
            // Completing is not interrupted by a stop: what the broker acknowledged is removed
            // before the lane is let go, or redelivered by its next owner.
            return match completions.drain(&shared).await {
                Ok(()) => LaneExit::Released,
                Err(e) => LaneExit::SessionLost(e),
            };
        }

        let held = window.rows() + completions.rows();
        let room = held < max_in_flight && !window.troubled() && (!st.cautious || window.is_empty());
        if !stopping && room && st.more && st.retry_at.is_none() && st.breaker_until.is_none() {
            // With records in flight the lane goes on only while the breaker is closed; a probe
            // or a wait is for a lane with nothing in flight.
            let permit = if window.is_empty() {
                shared.breaker.permit()
            } else if shared.breaker.state() == BreakerState::Closed {
                Permit::Go
            } else {
                Permit::Wait(Duration::ZERO)
            };
            match permit {
                Permit::Wait(d) if window.is_empty() => {
                    st.breaker_until = Some(Instant::now() + d.max(Duration::from_millis(10)));
                }
                Permit::Wait(_) => {}
                Permit::Go | Permit::Probe => {
                    let probing = permit == Permit::Probe;
                    // On a shared session a claim's reply holds up every later one there.
                    let batch = if session.shared() {
                        shared.config.batch_size.min(shared.config.shared_batch_size.max(1))
                    } else {
                        shared.config.batch_size
                    };
                    let limit = if probing || st.cautious { 1 } else { batch.min(max_in_flight - held) };
                    wake.borrow_and_update();
                    if let Err(exit) = claim_and_send(
                        &shared,
                        lane,
                        &session,
                        &mut window,
                        completions.held(),
                        &mut st,
                        limit,
                        probing,
                    )
                    .await
                    {
                        return exit;
                    }
                    continue;
                }
            }
        }

        let idle = window.is_empty() && !st.more && st.retry_at.is_none();
        let deadline = window.deadline();
        tokio::select! {
            biased;
            _ = session.closed().cancelled() => {
                return LaneExit::SessionLost("the lane's database session closed".into());
            }
            _ = stop.cancelled(), if !stopping => {}
            done = completions.next(&shared), if !completions.is_empty() => {
                if let Err(e) = done {
                    return LaneExit::SessionLost(e);
                }
            }
            report = window.report(), if window.awaiting() => {
                if let Some(r) = report {
                    window.apply(&shared, r);
                }
            }
            _ = sleep_until_some(deadline), if deadline.is_some() => {
                if let Some(number) = window.expire(Instant::now()) {
                    shared.producer.retire(number, "batch_deadline").await;
                }
            }
            _ = failed_check.tick(), if window.awaiting() => window.check_failed_producer(Instant::now()),
            _ = wake.changed(), if !st.more || st.retry_at.is_some() => {
                st.more = true;
                st.retry_at = None;
                st.idle_reads = 0;
            }
            _ = sleep_until_some(st.retry_at), if st.retry_at.is_some() => {
                st.retry_at = None;
                st.more = true;
                st.full_claim = true;
            }
            _ = breaker_changes.changed() => st.breaker_until = None,
            _ = sleep_until_some(st.breaker_until), if st.breaker_until.is_some() => st.breaker_until = None,
            _ = tokio::time::sleep(idle_wait(&shared.config, st.idle_reads)), if idle => {
                // No NOTIFY for a whole wait: read the whole lane, for rows written without one.
                st.more = true;
                st.full_claim = true;
                st.idle_reads = st.idle_reads.saturating_add(1);
            }
        }
    }
}

/// How long an idle lane waits for a NOTIFY before it reads its whole lane: `--poll-interval`,
/// doubled after each such read that found nothing, up to `--sweep-interval`. A read from the
/// lane's start walks every row deleted under the oldest snapshot on the database: after an hour
/// of a held snapshot, 82,000 per lane (0.3 to 3 s each); sixteen idle lanes doing it every second
/// kept two cores busy, their claims passed `--db-call-timeout`, and the lanes that lost their
/// sessions began again with the same read. Rows written without a NOTIFY on an idle lane now
/// wait at most the sweep interval (30 s), as late rows below a busy lane's cursor already did.
pub(super) fn idle_wait(config: &super::RelayConfig, idle_reads: u32) -> Duration {
    let cap = config.sweep_interval.max(config.poll_interval);
    config.poll_interval.saturating_mul(1u32 << idle_reads.min(16)).min(cap)
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Claims up to `limit` rows from the cursor (past what is in flight) and sends the ready ones.
#[allow(clippy::too_many_arguments)]
async fn claim_and_send(
    shared: &Shared,
    lane: i16,
    session: &LaneSession,
    window: &mut Window,
    deleting: &HashSet<i64>,
    st: &mut LaneState,
    limit: usize,
    probing: bool,
) -> Result<(), LaneExit> {
    let range = shared.signals.claim_range(lane, st.cursor, std::mem::take(&mut st.full_claim));
    // A claim from below what this loop took (a late row, a full read, a cursor moved back to go
    // on reading below) also meets the rows in the window: ask for that many more, and leave them
    // out (and acknowledged ones not deleted yet).
    let below = range.from < st.cursor.max(st.taken_to) && !(window.is_empty() && deleting.is_empty());
    let ask = if below { limit + window.rows() } else { limit };
    shared.stats.claims.fetch_add(1, Ordering::Relaxed);
    let claim_started = std::time::Instant::now();
    let claimed = session.claim(range.from, range.to, ask as i64, st.looked_below.make_contiguous()).await;
    let took = claim_started.elapsed();
    shared.stats.claim_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    crate::telemetry::claim_time(&shared.label, took);
    let claimed = match claimed {
        Ok(c) => {
            if let Some(top) = c.lane_top {
                shared.signals.raise_lane_bound(lane, top);
            }
            c.rows
        }
        Err(e) => {
            if probing {
                shared.breaker.release_probe();
            }
            return Err(LaneExit::SessionLost(format!("claim failed: {e}")));
        }
    };
    // The claim read its range up to `ask` rows (`full`: it may hold more), and below it the rows
    // of the same transactions; rows below the cursor may be in the window already.
    let full = claimed.iter().filter(|r| r.seq >= range.from).count() >= ask;
    let last_read = claimed.last().map(|r| r.seq);
    note_looked_below(&mut st.looked_below, &claimed, range.from, ask);
    let mut rows = claimed;
    if !(window.is_empty() && deleting.is_empty()) && rows.first().is_some_and(|r| r.seq < st.taken_to) {
        let in_window: HashSet<i64> = window.seqs().collect();
        rows.retain(|r| !in_window.contains(&r.seq) && !deleting.contains(&r.seq));
    }
    // Order first: the lane goes no further than its first row that waits for a retry.
    let ready = rows.iter().take_while(|r| !r.waiting).count().min(limit);
    let next = rows.get(ready);
    // Where the next claim starts: at the first row read and not taken, or past what this claim
    // read (every row below is taken, in the window, or not yet visible and announced later).
    st.cursor = match (next, last_read) {
        (Some(next), _) => next.seq,
        (None, Some(last)) if full => last + 1,
        (None, Some(last)) => st.cursor.max(last + 1),
        (None, None) => st.cursor,
    };
    match next {
        Some(head) if head.waiting => {
            st.more = false;
            let wait = Duration::from_millis(head.wait_ms.max(1) as u64).min(shared.config.poll_interval);
            st.retry_at = Some(Instant::now() + wait);
        }
        Some(_) => st.more = true,
        None => st.more = full,
    }
    rows.truncate(ready);
    if let Some(last) = rows.last() {
        st.taken_to = st.taken_to.max(last.seq + 1);
    }
    if rows.is_empty() {
        if probing {
            shared.breaker.release_probe();
        }
        return Ok(());
    }
    st.idle_reads = 0;
    if probing {
        shared.stats.probes.fetch_add(rows.len() as u64, Ordering::Relaxed);
    }
    let breaker_was_closed = !probing && shared.breaker.state() == BreakerState::Closed;
    window.send(shared, rows, probing, breaker_was_closed).await;
    Ok(())
}

/// Remembers the transactions this claim looked below its start for, unless the look may have
/// stopped at its limit.
fn note_looked_below(looked: &mut std::collections::VecDeque<i64>, claimed: &[ClaimedRow], from: i64, ask: usize) {
    let mut below: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    for r in claimed.iter().filter(|r| r.seq < from) {
        *below.entry(r.xid.unwrap_or_default()).or_default() += 1;
    }
    for xid in claimed.iter().filter(|r| r.seq >= from).filter_map(|r| r.xid) {
        if below.get(&xid).copied().unwrap_or(0) >= ask || looked.contains(&xid) {
            continue;
        }
        if looked.len() == LOOKED_BELOW {
            looked.pop_front();
        }
        looked.push_back(xid);
    }
}

/// Takes the lane's cursor back to the start when its loop ends, so the sweep leaves it alone.
struct CursorGuard<'a> {
    shared: &'a Shared,
    lane: i16,
}

impl Drop for CursorGuard<'_> {
    fn drop(&mut self) {
        self.shared.signals.publish_cursor(self.lane, lanes::FROM_START);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_lane_reads_its_whole_lane_less_often_up_to_the_sweep_interval() {
        let mut c = super::super::RelayConfig::new(
            crate::db::DbConfig::parse("postgres://localhost/x").unwrap(),
            crate::schema::SchemaName::default(),
            "localhost:9092",
        );
        c.poll_interval = Duration::from_secs(1);
        c.sweep_interval = Duration::from_secs(30);
        let waits: Vec<u64> = (0..8).map(|n| idle_wait(&c, n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(idle_wait(&c, u32::MAX), Duration::from_secs(30));
        // A poll interval above the sweep interval is kept as it is.
        c.poll_interval = Duration::from_secs(600);
        assert_eq!(idle_wait(&c, 0), Duration::from_secs(600));
    }
}
