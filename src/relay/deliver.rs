//! The produce side of a lane's batch: hand every row to the current producer generation,
//! pipelined, and collect what became of each (acknowledged, failed and why, held back to keep its
//! key's order); retire the generation when the batch deadline passes or it failed for good. Also
//! the best-effort mirror of dead letters to a DLQ topic.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, Producer};

use super::lane_session::{Acked, ClaimedRow, DeadLetter};
use super::producer::{Generation, SendError};
use super::{envelope, Shared};
use crate::classify::{self, reason, Classified, Disposition};
use crate::outbox::validate_topic;

/// What became of one row in a batch.
pub(super) enum Outcome {
    Acked(Acked),
    Failed {
        error: String,
        classified: Classified,
    },
    /// Not sent: an earlier row of its key was refused in this batch.
    Held,
}

/// Produces every row, pipelined, and waits for each acknowledgement; outcomes in row order.
/// The whole batch has one deadline (`--message-timeout`; librdkafka itself never gives up on a
/// record), so a lane never waits longer than that, however many rows it holds. When the deadline
/// passes, or the producer failed for good, the producer generation is retired (see
/// [`super::producer`]): what it still held fails and is sent again, so that a record that timed
/// out can never be overtaken by a later one of its key.
pub(super) async fn deliver(shared: &Shared, rows: &[ClaimedRow]) -> Vec<Outcome> {
    let generation = shared.producer.current();
    let deadline = tokio::time::Instant::now() + shared.config.producer.message_timeout;
    let mut pending = Vec::with_capacity(rows.len());
    // Keys with a row refused in this batch: their later rows are held, to keep key order.
    let mut refused_keys: HashSet<&str> = HashSet::new();
    // The queue stayed full until the deadline, or the generation was retired under this batch:
    // hold the rest (a record handed to a purged producer could overtake the purged ones).
    let mut hold_rest = false;
    for row in rows {
        if hold_rest || row.key.as_deref().is_some_and(|k| refused_keys.contains(k)) {
            pending.push(Sent::Held);
            continue;
        }
        let sent = match send_one(shared, &generation, row, deadline).await {
            // The producer queue stayed full until the deadline: this row fails, the rest of the
            // batch is held.
            Sent::QueueStayedFull => {
                hold_rest = true;
                Sent::Refused(
                    "the producer queue stayed full until the batch deadline".into(),
                    classify::kafka_code(RDKafkaErrorCode::QueueFull),
                )
            }
            other => other,
        };
        if let Sent::Retired = sent {
            hold_rest = true;
            pending.push(Sent::Held);
            continue;
        }
        if let Sent::Refused(..) = &sent {
            if let Some(k) = row.key.as_deref() {
                refused_keys.insert(k);
            }
        }
        pending.push(sent);
    }
    let mut outcomes = Vec::with_capacity(rows.len());
    let mut deadline_passed = false;
    for (row, p) in rows.iter().zip(pending) {
        let outcome = match p {
            // A record already acknowledged is taken even after the deadline (the inner future is
            // polled first).
            Sent::Queued(topic, fut) => match await_report(fut, deadline, &generation.producer).await {
                Report::Fatal => Outcome::Failed {
                    error:
                        "the producer failed for good before acknowledging; the row is sent again by its replacement"
                            .into(),
                    classified: classify::kafka_code(RDKafkaErrorCode::Fatal),
                },
                Report::Done(Ok(Ok(d))) => {
                    if d.offset < 0 {
                        shared.stats.acks_without_offset.fetch_add(1, Ordering::Relaxed);
                        crate::telemetry::ack_without_offset(&topic);
                        tracing::debug!(message_id = %row.id, topic = %topic, partition = d.partition, offset = d.offset,
                            "acknowledged without an offset");
                    }
                    Outcome::Acked(Acked {
                        seq: row.seq,
                        kafka_topic: topic,
                        partition: d.partition,
                        offset: d.offset,
                        acked_at: std::time::Instant::now(),
                    })
                }
                Report::Done(Ok(Err((e, _)))) => {
                    Outcome::Failed { error: describe(&e), classified: classify::kafka(&e) }
                }
                Report::Done(Err(_)) => Outcome::Failed {
                    error: "the producer was closed before acknowledging".into(),
                    classified: classify::kafka_code(RDKafkaErrorCode::Fail),
                },
                Report::Deadline => {
                    deadline_passed = true;
                    Outcome::Failed {
                        error: "no acknowledgement within --message-timeout; the producer is replaced and the row sent again"
                            .into(),
                        classified: classify::kafka_code(RDKafkaErrorCode::MessageTimedOut),
                    }
                }
            },
            Sent::Refused(error, classified) => Outcome::Failed { error, classified },
            Sent::Held | Sent::Retired | Sent::QueueStayedFull => Outcome::Held,
        };
        outcomes.push(outcome);
    }
    shared.stats.produce_attempts.fetch_add(rows.len() as u64, Ordering::Relaxed);
    if deadline_passed {
        shared.producer.retire(generation.number, "batch_deadline").await;
    } else if let Some((code, why)) = generation.producer.client().fatal_error() {
        if code == RDKafkaErrorCode::GaplessGuarantee {
            // A record was refused for good (its own report says why); the rest is collateral.
            tracing::warn!(error = %why, "a record was refused for good; replacing the Kafka producer");
        } else {
            // The producer itself cannot work (no idempotent-write permission, a broker without
            // idempotence): not the rows' fault but the broker's, so it counts as a failure and
            // feeds the breaker, instead of replacing producers as fast as batches come.
            tracing::error!(error_code = ?code, error = %why,
                "the Kafka producer failed for good; check the broker and the relay's ACLs (IdempotentWrite)");
            for o in outcomes.iter_mut() {
                if let Outcome::Failed { classified, .. } = o {
                    if classified.disposition == Disposition::Resend {
                        *classified = classify::producer_failed();
                    }
                }
            }
        }
        shared.producer.retire(generation.number, "fatal_error").await;
    }
    outcomes
}

/// How waiting for one delivery report ended.
enum Report {
    /// The report (or the producer closed it).
    Done(Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>),
    /// The batch deadline passed first.
    Deadline,
    /// The producer failed for good first: what it still holds would only fail when it is
    /// replaced, so waiting for the deadline would only delay the rows behind.
    Fatal,
}

/// Waits for one delivery report until the batch deadline, checking meanwhile (every 50 ms) that
/// the producer has not failed for good. A report already there is taken even past the deadline.
async fn await_report(
    mut report: rdkafka::producer::DeliveryFuture,
    deadline: tokio::time::Instant,
    producer: &FutureProducer,
) -> Report {
    let mut check = tokio::time::interval(Duration::from_millis(50));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            r = &mut report => return Report::Done(r),
            _ = tokio::time::sleep_until(deadline) => return Report::Deadline,
            _ = check.tick() => {
                if producer.client().fatal_error().is_some() {
                    // The refused record's own report follows the failure closely: give it a
                    // moment, so that it is dead-lettered with its reason rather than sent again.
                    return match tokio::time::timeout(Duration::from_millis(200), &mut report).await {
                        Ok(r) => Report::Done(r),
                        Err(_) => Report::Fatal,
                    };
                }
            }
        }
    }
}

enum Sent {
    Queued(String, rdkafka::producer::DeliveryFuture),
    Refused(String, Classified),
    /// Not sent: held back to keep key order.
    Held,
    /// Not sent: the generation was retired (replaced) under the batch.
    Retired,
    /// Not sent: librdkafka's queue stayed full until the batch deadline.
    QueueStayedFull,
}

fn malformed(why: String) -> Sent {
    Sent::Refused(format!("malformed row: {why}"), classify::malformed_row())
}

async fn send_one(shared: &Shared, generation: &Generation, row: &ClaimedRow, deadline: tokio::time::Instant) -> Sent {
    if let Some(why) = &row.malformed {
        return malformed(why.clone());
    }
    let topic = shared.config.topic_for(&row.topic);
    if let Err(e) = validate_topic(&topic) {
        return malformed(e.to_string());
    }
    let headers = envelope::headers(row, &shared.source);
    let mut record = envelope::record(&topic, row.key.as_deref().map(str::as_bytes), row.payload.as_deref(), headers);
    loop {
        match generation.send(record) {
            Ok(fut) => return Sent::Queued(topic.clone(), fut),
            Err(SendError::Retired) => return Sent::Retired,
            Err(SendError::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                // librdkafka's queue is full: wait for acknowledgements to make room.
                if tokio::time::Instant::now() >= deadline {
                    return Sent::QueueStayedFull;
                }
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(SendError::Kafka(e, _)) => return Sent::Refused(describe(&e), classify::kafka(&e)),
        }
    }
}

/// Mirrors dead letters to the DLQ topic, best effort: the table is the record of truth.
pub(super) fn mirror_to_dlq(shared: &Arc<Shared>, dlq: &str, rows: &[ClaimedRow], dead: &[DeadLetter]) {
    for d in dead {
        let Some(row) = rows.iter().find(|r| r.seq == d.seq) else { continue };
        let mut headers = envelope::headers(row, &shared.source);
        headers = headers
            .insert(Header { key: "outbox_dlq_reason", value: Some(d.reason.as_str()) })
            .insert(Header { key: "outbox_dlq_error_class", value: Some(d.error_class.as_str()) })
            .insert(Header { key: "outbox_dlq_original_topic", value: Some(row.topic.as_str()) });
        let headers: OwnedHeaders = headers;
        // A payload too large for the topic is too large for the DLQ as well: send the envelope.
        let payload = if d.reason == reason::MESSAGE_TOO_LARGE { None } else { row.payload.as_deref() };
        let record = envelope::record(dlq, row.key.as_deref().map(str::as_bytes), payload, headers);
        let id = row.id;
        let Some(mirror) = &shared.mirror else { return };
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

/// An error for `last_error` and the logs: the Kafka error, never the payload.
fn describe(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("kafka {code:?}: {e}"),
        None => format!("kafka: {e}"),
    }
}
