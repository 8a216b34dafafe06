//! What happens to a lane's rows once their outcomes are in: a batch all of whose rows were
//! acknowledged is deleted (or archived); a troubled window is settled as one, once every record in
//! it has its outcome: delete what was acknowledged, record failed attempts, move dead letters,
//! decide what each failure means for its row (retry, dead letter, leave it) and for the breaker,
//! and move the lane's cursor back to the first row still pending.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};

use super::deliver::{retire_failed, Batch, Outcome};
use super::lane::{LaneExit, LaneState};
use super::lane_session::{Acked, ClaimedRow, DeadLetter, FailedAttempt, LaneSession};
use super::{envelope, DeadLetterPolicy, Shared};
use crate::classify::{reason, Classified, Disposition};

/// A batch whose every row was acknowledged: a success for the breaker, and rows to delete.
pub(super) fn acknowledged(shared: &Shared, batch: Batch) -> (Vec<ClaimedRow>, Vec<Acked>) {
    let (rows, outcomes) = batch.into_outcomes();
    let acked: Vec<Acked> = outcomes
        .into_iter()
        .filter_map(|o| match o {
            Outcome::Acked(a) => Some(a),
            _ => None,
        })
        .collect();
    shared.breaker.on_success();
    (rows, acked)
}

/// Deletes (or archives) a settled window's acknowledged rows in one statement.
async fn complete(
    shared: &Shared,
    session: &LaneSession,
    rows: &[ClaimedRow],
    acked: &[Acked],
) -> Result<(), LaneExit> {
    if let Err(e) = session.complete(acked).await {
        return Err(LaneExit::SessionLost(format!("deleting {} acknowledged rows failed: {e}", acked.len())));
    }
    shared.stats.delivered.fetch_add(acked.len() as u64, Ordering::Relaxed);
    record_delivery(&shared.label, rows, acked);
    Ok(())
}

/// A troubled window, settled as one batch once every record in it has its outcome.
pub(super) async fn settle_window(
    shared: &Arc<Shared>,
    lane: i16,
    session: &LaneSession,
    batches: Vec<Batch>,
    generation: Option<Arc<super::producer::Generation>>,
    st: &mut LaneState,
) -> Result<(), LaneExit> {
    let mut rows = Vec::new();
    let mut outcomes = Vec::new();
    let mut was_closed = Vec::new();
    let mut probing = false;
    for b in batches {
        probing |= b.probing;
        let closed = b.breaker_was_closed;
        let (r, o) = b.into_outcomes();
        was_closed.extend(std::iter::repeat_n(closed, r.len()));
        rows.extend(r);
        outcomes.extend(o);
    }
    // A producer that failed for good is replaced before anything is sent again; whose fault it
    // was decides what its collateral counts as.
    if let Some(generation) = &generation {
        retire_failed(shared, generation, &mut outcomes).await;
    }
    let mut acked = Vec::with_capacity(outcomes.len());
    let mut failed = Vec::new();
    let mut dead = Vec::new();
    let mut untouched = Vec::new();
    let mut broker_failure = false;
    for ((row, outcome), breaker_was_closed) in rows.iter().zip(outcomes).zip(was_closed) {
        match outcome {
            Outcome::Acked(a) => acked.push(a),
            Outcome::Held => {}
            Outcome::Failed { error, classified } => {
                broker_failure |= classified.blames_broker;
                match decide(shared, row, &classified, breaker_was_closed) {
                    Decision::DeadLetter(why) => {
                        crate::telemetry::dead_lettered(&shared.label, &row.topic, why);
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
                        crate::telemetry::retried(&shared.label, &row.topic, classified.class);
                        failed.push(FailedAttempt { seq: row.seq, error, delay_ms: delay.as_millis() as i64 });
                    }
                    Decision::Untouched => untouched.push(row.seq),
                }
            }
        }
    }
    note_order_hazards(shared, lane, &rows, &acked, &failed, &dead, &untouched);
    if broker_failure {
        shared.breaker.on_failure();
    } else if !acked.is_empty() {
        shared.breaker.on_success();
    } else if probing {
        shared.breaker.release_probe();
    }
    st.cautious = broker_failure || !failed.is_empty();

    complete(shared, session, &rows, &acked).await?;
    // The next claim starts at the first row still pending (failed, waiting, held back).
    let done: HashSet<i64> = acked.iter().map(|a| a.seq).chain(dead.iter().map(|d| d.seq)).collect();
    if let Some(pending) = rows.iter().map(|r| r.seq).filter(|s| !done.contains(s)).min() {
        st.cursor = st.cursor.min(pending);
    }
    if let Err(e) = session.record_failures(&failed).await {
        return Err(LaneExit::SessionLost(format!("recording {} failed attempts failed: {e}", failed.len())));
    }
    shared.stats.retried.fetch_add(failed.len() as u64, Ordering::Relaxed);
    if !dead.is_empty() {
        let park = shared.config.dead_letter_policy == DeadLetterPolicy::ParkKey;
        if let Err(e) = session.dead_letter(&dead, park, shared.config.instance_id).await {
            return Err(LaneExit::SessionLost(format!("moving {} dead letters failed: {e}", dead.len())));
        }
        shared.stats.dead_lettered.fetch_add(dead.len() as u64, Ordering::Relaxed);
        if let Some(dlq) = &shared.config.dlq_topic {
            mirror_to_dlq(shared, dlq, &rows, &dead);
        }
    }
    Ok(())
}

/// Delivery metrics for a completed batch: per topic counts and write-to-ack latencies.
pub(super) fn record_delivery(label: &crate::telemetry::OutboxLabel, rows: &[ClaimedRow], acked: &[Acked]) {
    if acked.is_empty() {
        return;
    }
    crate::telemetry::batch_size(label, rows.len());
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
                crate::telemetry::commit_to_ack(label, (acked_at - r.created_at).to_std().unwrap_or_default());
            }
        }
    }
    for (topic, n) in per_topic {
        crate::telemetry::delivered(label, topic, n);
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

/// Mirrors dead letters to the DLQ topic, best effort: the table is the record of truth.
fn mirror_to_dlq(shared: &Arc<Shared>, dlq: &str, rows: &[ClaimedRow], dead: &[DeadLetter]) {
    let Some(mirror) = &shared.mirror else { return };
    for d in dead {
        let Some(row) = rows.iter().find(|r| r.seq == d.seq) else { continue };
        let headers: OwnedHeaders = envelope::headers(row, &shared.source)
            .insert(Header { key: "outbox_dlq_reason", value: Some(d.reason.as_str()) })
            .insert(Header { key: "outbox_dlq_error_class", value: Some(d.error_class.as_str()) })
            .insert(Header { key: "outbox_dlq_original_topic", value: Some(row.topic.as_str()) });
        // A payload too large for the topic is too large for the DLQ as well: send the envelope.
        let payload = if d.reason == reason::MESSAGE_TOO_LARGE { None } else { row.payload.as_deref() };
        let record = envelope::record(dlq, row.key.as_deref().map(str::as_bytes), payload, headers);
        let id = row.id;
        match mirror.send_result(record) {
            Ok(fut) => {
                tokio::spawn(async move {
                    if let Ok(Err((e, _))) = fut.await {
                        tracing::warn!(message_id = %id, error = %e, "mirroring a dead letter to the DLQ topic failed; it stays in the dead_letters table");
                    }
                });
            }
            Err((e, _)) => tracing::warn!(message_id = %id, error = %e,
                "mirroring a dead letter to the DLQ topic failed; it stays in the dead_letters table"),
        }
    }
}
