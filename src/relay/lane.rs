//! One lane's delivery loop: claim the lane's pending rows in sequence order from its cursor,
//! produce the batch ([`super::deliver`]), then in one statement each: delete what was
//! acknowledged, record failed attempts, move dead letters; decide what a failure means for the row
//! (retry, dead letter, leave it) and for the breaker.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::breaker::{BreakerState, Permit};
use super::deliver::{deliver, mirror_to_dlq, Outcome};
use super::lane_session::{Acked, ClaimedRow, DeadLetter, FailedAttempt, LaneSession};
use super::{lanes, DeadLetterPolicy, Shared};
use crate::classify::{reason, Classified, Disposition};

/// Why a lane loop ended.
#[derive(Debug)]
pub(crate) enum LaneExit {
    /// Asked to stop (shutdown or rebalance) and finished its batch.
    Released,
    /// Its session is gone, or a statement failed or timed out; the lock goes with the session.
    SessionLost(String),
}

pub(crate) async fn run_lane(
    shared: Arc<Shared>,
    lane: i16,
    session: LaneSession,
    stop: CancellationToken,
) -> LaneExit {
    let mut wake = shared.signals.subscribe(lane);
    // Where the lane's pending rows start, as far as this loop knows: every row below it was
    // delivered or dead-lettered, or committed late and is announced by its NOTIFY or the sweep.
    let mut cursor = lanes::FROM_START;
    // The next claim reads the whole lane (from its start, no upper bound): after a wait that no
    // NOTIFY ended, so that rows written without one are found.
    let mut full_claim = true;
    let _published = CursorGuard { shared: &shared, lane };
    let mut breaker_changes = shared.breaker.subscribe();
    let full_batch = shared.config.batch_size as i64;
    // After a batch with failures the lane sends one row at a time until one gets through, so a
    // flaky broker cannot acknowledge a later row of a key while an earlier one fails.
    let mut cautious = false;
    loop {
        if stop.is_cancelled() {
            return LaneExit::Released;
        }
        if session.closed().is_cancelled() {
            return LaneExit::SessionLost("the lane's database session closed".into());
        }
        let permit = shared.breaker.permit();
        if let Permit::Wait(d) = permit {
            tokio::select! {
                _ = stop.cancelled() => return LaneExit::Released,
                _ = breaker_changes.changed() => {}
                _ = tokio::time::sleep(d.max(Duration::from_millis(10))) => {}
            }
            continue;
        }
        let probing = permit == Permit::Probe;
        wake.borrow_and_update();
        let range = shared.signals.claim_range(lane, cursor, std::mem::take(&mut full_claim));
        shared.stats.claims.fetch_add(1, Ordering::Relaxed);
        let limit = if probing || cautious { 1 } else { full_batch };
        let claim_started = std::time::Instant::now();
        let claimed_rows = session.claim(range.from, range.to, limit).await;
        let took = claim_started.elapsed();
        shared.stats.claim_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        crate::telemetry::claim_time(took);
        let rows = match claimed_rows {
            Ok(rows) => rows,
            Err(e) => {
                if probing {
                    shared.breaker.release_probe();
                }
                return LaneExit::SessionLost(format!("claim failed: {e}"));
            }
        };
        // Order first: the lane goes no further than its first row that waits for a retry.
        let ready = rows.iter().take_while(|r| !r.waiting).count();
        if ready == 0 {
            // Nothing in the range, or a head that waits for its retry: claim from there again.
            cursor = rows.first().map_or(range.from, |head| head.seq);
            shared.signals.publish_cursor(lane, cursor);
            if probing {
                shared.breaker.release_probe();
            }
            let wait = rows
                .first()
                .map(|head| Duration::from_millis(head.wait_ms.max(1) as u64).min(shared.config.poll_interval))
                .unwrap_or(shared.config.poll_interval);
            match wait_for_work(&stop, &session, &mut wake, wait).await {
                Woken::Exit(exit) => return exit,
                Woken::Timer => full_claim = true,
                Woken::Notified => {}
            }
            continue;
        }
        let claimed = rows.len();
        let all_rows = &rows[..];
        let rows = &rows[..ready];
        let breaker_was_closed = !probing && shared.breaker.state() == BreakerState::Closed;
        if probing {
            shared.stats.probes.fetch_add(rows.len() as u64, Ordering::Relaxed);
        }
        let outcomes = deliver(&shared, rows).await;

        let mut acked = Vec::with_capacity(outcomes.len());
        let mut failed = Vec::new();
        let mut dead = Vec::new();
        let mut untouched = Vec::new();
        let mut broker_failure = false;
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Outcome::Acked(a) => acked.push(a),
                Outcome::Held => {}
                Outcome::Failed { error, classified } => {
                    broker_failure |= classified.blames_broker;
                    match decide(&shared, row, &classified, breaker_was_closed) {
                        Decision::DeadLetter(why) => {
                            crate::telemetry::dead_lettered(&row.topic, why);
                            tracing::warn!(lane, message_id = %row.id, topic = %row.topic, attempts = row.attempts + 1,
                                reason = why, error_class = classified.class, error = %error, "message dead-lettered");
                            dead.push(DeadLetter {
                                seq: row.seq,
                                reason: why.to_owned(),
                                error_class: classified.class.to_owned(),
                                error,
                            });
                        }
                        Decision::Retry(delay) => {
                            tracing::warn!(lane, message_id = %row.id, topic = %row.topic, attempt = row.attempts + 1,
                                retry_in_ms = delay.as_millis() as u64, error_class = classified.class, error = %error,
                                "delivery failed; will retry");
                            shared.stats.note_retry(row.attempts.max(0) as u32, delay);
                            crate::telemetry::retried(&row.topic, classified.class);
                            failed.push(FailedAttempt { seq: row.seq, error, delay_ms: delay.as_millis() as i64 });
                        }
                        Decision::Untouched => untouched.push(row.seq),
                    }
                }
            }
        }
        note_order_hazards(&shared, lane, rows, &acked, &failed, &dead, &untouched);
        if broker_failure {
            shared.breaker.on_failure();
        } else if !acked.is_empty() {
            shared.breaker.on_success();
        } else if probing {
            shared.breaker.release_probe();
        }
        cautious = broker_failure || !failed.is_empty();

        // Completing the batch is not interrupted by a stop: what the broker acknowledged is
        // removed before the lane is let go, or redelivered by its next owner.
        if let Err(e) = session.complete(&acked).await {
            return LaneExit::SessionLost(format!("deleting {} acknowledged rows failed: {e}", acked.len()));
        }
        shared.stats.delivered.fetch_add(acked.len() as u64, Ordering::Relaxed);
        record_delivery(rows, &acked);
        cursor = next_cursor(all_rows, &acked, &dead);
        if let Err(e) = session.record_failures(&failed).await {
            return LaneExit::SessionLost(format!("recording {} failed attempts failed: {e}", failed.len()));
        }
        shared.stats.retried.fetch_add(failed.len() as u64, Ordering::Relaxed);
        if !dead.is_empty() {
            let park = shared.config.dead_letter_policy == DeadLetterPolicy::ParkKey;
            if let Err(e) = session.dead_letter(&dead, park, shared.config.instance_id).await {
                return LaneExit::SessionLost(format!("moving {} dead letters failed: {e}", dead.len()));
            }
            shared.stats.dead_lettered.fetch_add(dead.len() as u64, Ordering::Relaxed);
            if let Some(dlq) = &shared.config.dlq_topic {
                mirror_to_dlq(&shared, dlq, rows, &dead);
            }
        }
        shared.signals.publish_cursor(lane, cursor);
        // Drained: the claim found fewer rows than it asked for and every one went out. A row
        // committed since sends its NOTIFY after that claim began (the channel was marked seen
        // before it), so wait for one rather than run a claim that finds nothing.
        if claimed < limit as usize && acked.len() == claimed {
            match wait_for_work(&stop, &session, &mut wake, shared.config.poll_interval).await {
                Woken::Exit(exit) => return exit,
                Woken::Timer => full_claim = true,
                Woken::Notified => {}
            }
        }
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

/// Where the next claim starts after a batch: at the first claimed row still pending (it failed,
/// waits for a retry, or was held back), or past the last claimed row when none is. Rows below it
/// are gone, or committed late (announced by their NOTIFY, or found by the sweep).
fn next_cursor(claimed: &[ClaimedRow], acked: &[Acked], dead: &[DeadLetter]) -> i64 {
    let done: HashSet<i64> = acked.iter().map(|a| a.seq).chain(dead.iter().map(|d| d.seq)).collect();
    match claimed.iter().find(|r| !done.contains(&r.seq)) {
        Some(pending) => pending.seq,
        None => claimed.last().map_or(lanes::FROM_START, |r| r.seq + 1),
    }
}

/// How a wait for work ended.
enum Woken {
    /// A NOTIFY (or the sweep) named the lane.
    Notified,
    /// The wait ran out: the next claim is a full one, which finds rows no NOTIFY announced.
    Timer,
    /// The lane must end.
    Exit(LaneExit),
}

/// Waits for a NOTIFY naming the lane, or `poll` at most.
async fn wait_for_work(
    stop: &CancellationToken,
    session: &LaneSession,
    wake: &mut tokio::sync::watch::Receiver<u64>,
    poll: Duration,
) -> Woken {
    tokio::select! {
        _ = stop.cancelled() => Woken::Exit(LaneExit::Released),
        _ = session.closed().cancelled() => Woken::Exit(LaneExit::SessionLost("the lane's database session closed".into())),
        _ = wake.changed() => Woken::Notified,
        _ = tokio::time::sleep(poll) => Woken::Timer,
    }
}

/// Delivery metrics for a completed batch: per topic counts and write-to-ack latencies.
fn record_delivery(rows: &[ClaimedRow], acked: &[Acked]) {
    if acked.is_empty() {
        return;
    }
    crate::telemetry::batch_size(rows.len());
    let now = chrono::Utc::now();
    let mut per_topic: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut rows_by_seq = rows.iter().peekable();
    for a in acked {
        *per_topic.entry(a.kafka_topic.as_str()).or_default() += 1;
        // Both lists are in sequence order.
        while let Some(r) = rows_by_seq.next_if(|r| r.seq < a.seq) {
            let _ = r;
        }
        if let Some(r) = rows_by_seq.peek() {
            if r.seq == a.seq {
                let acked_at = now - chrono::Duration::from_std(a.acked_at.elapsed()).unwrap_or_default();
                crate::telemetry::commit_to_ack((acked_at - r.created_at).to_std().unwrap_or_default());
            }
        }
    }
    for (topic, n) in per_topic {
        crate::telemetry::delivered(topic, n);
    }
}

/// Counts (and logs) rows acknowledged in a batch after an earlier row of the same key and topic
/// failed in it: the later one arrived first. The cautious lane makes this rare; it cannot be
/// undone once it happened, so it is made visible.
fn note_order_hazards(
    shared: &Shared,
    lane: i16,
    rows: &[ClaimedRow],
    acked: &[Acked],
    failed: &[FailedAttempt],
    dead: &[DeadLetter],
    untouched: &[i64],
) {
    if failed.is_empty() && dead.is_empty() && untouched.is_empty() {
        return;
    }
    let failed_seqs: HashSet<i64> =
        failed.iter().map(|f| f.seq).chain(dead.iter().map(|d| d.seq)).chain(untouched.iter().copied()).collect();
    let acked_seqs: HashSet<i64> = acked.iter().map(|a| a.seq).collect();
    let mut failed_keys: HashSet<(&str, &str)> = HashSet::new();
    for r in rows {
        let Some(key) = r.key.as_deref() else { continue };
        if failed_seqs.contains(&r.seq) {
            failed_keys.insert((key, r.topic.as_str()));
        } else if acked_seqs.contains(&r.seq) && failed_keys.contains(&(key, r.topic.as_str())) {
            shared.stats.order_hazards.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(lane, message_id = %r.id, topic = %r.topic,
                "order hazard: acknowledged while an earlier message of its key failed in the same batch");
        }
    }
}

enum Decision {
    Retry(Duration),
    DeadLetter(&'static str),
    /// Leave the row as it is: the failure says nothing about the row (broker down while the
    /// breaker probes), so no retry counter is burned.
    Untouched,
}

fn decide(shared: &Shared, row: &ClaimedRow, c: &Classified, breaker_was_closed: bool) -> Decision {
    match c.disposition {
        Disposition::Permanent => return Decision::DeadLetter(c.reason),
        // The record was dropped with a retired producer: nothing to count against the row.
        Disposition::Resend => return Decision::Untouched,
        Disposition::Retry => {}
    }
    if c.blames_broker && !breaker_was_closed {
        return Decision::Untouched;
    }
    let attempts = row.attempts + 1;
    if attempts >= shared.config.max_attempts as i32 {
        return Decision::DeadLetter(reason::RETRIES_EXHAUSTED);
    }
    if let Some(max_age) = shared.config.max_age {
        if row.age_ms > max_age.as_millis() as i64 {
            return Decision::DeadLetter(reason::MAX_AGE_EXCEEDED);
        }
    }
    Decision::Retry(shared.config.retry.delay(row.attempts.max(0) as u32))
}
