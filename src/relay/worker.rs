//! One lane's delivery loop: read the head of the lane in sequence order, produce the whole batch
//! pipelined, await every acknowledgement, then delete what was acknowledged in one statement.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

use super::claim::{Acked, ClaimedRow, FailedAttempt, LaneSession};
use super::{envelope, Shared};
use crate::outbox::validate_topic;

/// Why a lane loop ended.
#[derive(Debug)]
pub(crate) enum LaneExit {
    /// Asked to stop (shutdown or rebalance) and finished its batch.
    Released,
    /// Its session is gone; the lock went with it.
    SessionLost(String),
}

/// What became of one row in a batch.
enum Outcome {
    Acked(Acked),
    Failed { seq: i64, error: String },
}

pub(crate) async fn run_lane(
    shared: Arc<Shared>,
    lane: i16,
    session: LaneSession,
    stop: CancellationToken,
) -> LaneExit {
    let mut wake = shared.wake.clone();
    let batch = shared.config.batch_size as i64;
    loop {
        if stop.is_cancelled() {
            return LaneExit::Released;
        }
        if session.closed().is_cancelled() {
            return LaneExit::SessionLost("the lane's database session closed".into());
        }
        wake.borrow_and_update();
        shared.stats.claims.fetch_add(1, Ordering::Relaxed);
        let rows = match session.claim(batch).await {
            Ok(rows) => rows,
            Err(e) => return LaneExit::SessionLost(format!("claim failed: {e}")),
        };
        // Order first: the lane goes no further than its first row that waits for a retry.
        let ready = rows.iter().take_while(|r| !r.waiting).count();
        if ready == 0 {
            let wait = rows
                .first()
                .map(|head| Duration::from_millis(head.wait_ms.max(1) as u64).min(shared.config.poll_interval))
                .unwrap_or(shared.config.poll_interval);
            tokio::select! {
                _ = stop.cancelled() => return LaneExit::Released,
                _ = session.closed().cancelled() => {
                    return LaneExit::SessionLost("the lane's database session closed".into());
                }
                _ = wake.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let rows = &rows[..ready];
        let outcomes = deliver(&shared, rows).await;
        let mut acked = Vec::with_capacity(outcomes.len());
        let mut failed = Vec::new();
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Outcome::Acked(a) => acked.push(a),
                Outcome::Failed { seq, error } => {
                    let delay = shared.config.retry.delay(row.attempts.max(0) as u32);
                    tracing::warn!(lane, message_id = %row.id, topic = %row.topic, attempt = row.attempts + 1,
                        retry_in_ms = delay.as_millis() as u64, error = %error, "delivery failed; will retry");
                    failed.push(FailedAttempt { seq, error, delay_ms: delay.as_millis() as i64 });
                }
            }
        }
        // Completing the batch is not interrupted by a stop: what the broker acknowledged is
        // removed before the lane is let go, or redelivered by its next owner.
        if let Err(e) = session.complete(&acked).await {
            return LaneExit::SessionLost(format!("deleting {} acknowledged rows failed: {e}", acked.len()));
        }
        shared.stats.delivered.fetch_add(acked.len() as u64, Ordering::Relaxed);
        if let Err(e) = session.record_failures(&failed).await {
            return LaneExit::SessionLost(format!("recording {} failed attempts failed: {e}", failed.len()));
        }
        tracing::debug!(lane, delivered = acked.len(), failed = failed.len(), "batch done");
    }
}

/// Produces every row, pipelined, and waits for each acknowledgement; outcomes in row order.
async fn deliver(shared: &Shared, rows: &[ClaimedRow]) -> Vec<Outcome> {
    let mut pending = Vec::with_capacity(rows.len());
    for row in rows {
        pending.push(send_one(shared, row).await);
    }
    let mut outcomes = Vec::with_capacity(rows.len());
    for (row, p) in rows.iter().zip(pending) {
        let outcome = match p {
            Sent::Queued(topic, fut) => match fut.await {
                Ok(Ok(d)) => {
                    Outcome::Acked(Acked { seq: row.seq, kafka_topic: topic, partition: d.partition, offset: d.offset })
                }
                Ok(Err((e, _))) => Outcome::Failed { seq: row.seq, error: describe(&e) },
                Err(_) => {
                    Outcome::Failed { seq: row.seq, error: "the producer was closed before acknowledging".into() }
                }
            },
            Sent::Refused(error) => Outcome::Failed { seq: row.seq, error },
        };
        outcomes.push(outcome);
    }
    outcomes
}

enum Sent {
    Queued(String, rdkafka::producer::DeliveryFuture),
    Refused(String),
}

async fn send_one(shared: &Shared, row: &ClaimedRow) -> Sent {
    if let Some(reason) = &row.malformed {
        return Sent::Refused(format!("malformed row: {reason}"));
    }
    let topic = shared.config.topic_for(&row.topic);
    if let Err(e) = validate_topic(&topic) {
        return Sent::Refused(format!("malformed row: {e}"));
    }
    let headers = envelope::headers(row, &shared.source);
    let mut record = FutureRecord::<[u8], [u8]>::to(&topic).headers(headers);
    if let Some(k) = &row.key {
        record = record.key(k.as_bytes());
    }
    if let Some(p) = &row.payload {
        record = record.payload(p.as_slice());
    }
    let deadline = tokio::time::Instant::now() + shared.config.producer.message_timeout;
    loop {
        match shared.producer.send_result(record) {
            Ok(fut) => return Sent::Queued(topic.clone(), fut),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                // librdkafka's queue is full: wait for acknowledgements to make room.
                if tokio::time::Instant::now() >= deadline {
                    return Sent::Refused("the producer queue stayed full for message.timeout.ms".into());
                }
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Sent::Refused(describe(&e)),
        }
    }
}

/// An error for `last_error` and the logs: the Kafka error, never the payload.
fn describe(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("kafka {code:?}: {e}"),
        None => format!("kafka: {e}"),
    }
}
