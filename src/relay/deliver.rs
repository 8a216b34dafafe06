//! The produce side of a lane: its window of batches handed to the producer and not yet settled.
//!
//! A lane may claim and send its next rows while earlier ones await their acknowledgements. Every
//! batch in a window goes to one producer generation, and each record carries a ticket that routes
//! its delivery report back here ([`super::reports`]). A batch whose rows were all acknowledged is
//! settled alone, in order; any other outcome (a refusal, a failure, a deadline, a retired
//! producer) makes the window *troubled*: the lane claims nothing more, waits for every record in
//! the window to resolve, and settles them together, as one batch would have been. Per-key order
//! rests on the same argument as for one batch (see [`super::producer`]): within one generation
//! the broker stores, per partition, a prefix of what was sent, in order.
//!
//! Also the best-effort mirror of dead letters to a DLQ topic.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::time::Instant;

use super::lane_session::{Acked, ClaimedRow};
use super::producer::{Generation, SendError};
use super::reports::{DeliveryReport, Route};
use super::{envelope, Shared};
use crate::classify::{self, Classified, Disposition};
use crate::outbox::validate_topic;

/// How long the report of a record refused for good gets to arrive after its producer failed, so
/// that the record is dead-lettered with its own reason rather than sent again.
const FATAL_GRACE: Duration = Duration::from_millis(200);

/// What became of one row.
pub(super) enum Outcome {
    Acked(Acked),
    Failed {
        error: String,
        classified: Classified,
    },
    /// Not sent: an earlier row of its key was refused, or the rest of its batch was held back.
    Held,
}

enum Slot {
    /// With the producer; the report is awaited.
    Queued {
        topic: String,
        /// The message's span, when traces are on and it is sampled (`crate::traces`).
        span: Option<crate::traces::Span>,
    },
    Done(Outcome),
}

/// One claim's rows, sent together.
pub(super) struct Batch {
    pub(super) rows: Vec<ClaimedRow>,
    slots: Vec<Slot>,
    first_ticket: u32,
    unresolved: usize,
    deadline: Instant,
    /// A one-row probe of the half-open breaker.
    pub(super) probing: bool,
    /// The breaker was closed when the batch was sent: only then do failures count attempts.
    pub(super) breaker_was_closed: bool,
    /// The batch's span (`outbox batch`, linked to its sampled messages' spans); it ends when the
    /// batch is settled (dropped).
    _span: Option<crate::traces::Span>,
}

impl Batch {
    /// The rows with what became of each, in row order. Every slot must be resolved.
    pub(super) fn into_outcomes(self) -> (Vec<ClaimedRow>, Vec<Outcome>) {
        let outcomes = self
            .slots
            .into_iter()
            .map(|s| match s {
                Slot::Done(o) => o,
                Slot::Queued { .. } => unreachable!("a batch is settled only when every record is resolved"),
            })
            .collect();
        (self.rows, outcomes)
    }

    fn resolve(&mut self, i: usize, outcome: Outcome) -> bool {
        if !matches!(self.slots[i], Slot::Queued { .. }) {
            return false;
        }
        self.slots[i] = Slot::Done(outcome);
        self.unresolved -= 1;
        true
    }

    fn expire(&mut self, error: &str, classified: Classified) {
        for i in 0..self.slots.len() {
            self.resolve(i, Outcome::Failed { error: error.to_owned(), classified });
        }
    }
}

/// A lane's records in flight: the batches sent and not yet settled, on one producer generation.
pub(super) struct Window {
    route: Route,
    batches: VecDeque<Batch>,
    generation: Option<Arc<Generation>>,
    rows: usize,
    troubled: bool,
    /// When the window's producer was first seen failed for good.
    fatal_seen: Option<Instant>,
}

impl Window {
    pub(super) fn new(route: Route) -> Self {
        Self { route, batches: VecDeque::new(), generation: None, rows: 0, troubled: false, fatal_seen: None }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Rows in the window.
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Something in the window did not go through: claim nothing more; settle it whole.
    pub(super) fn troubled(&self) -> bool {
        self.troubled
    }

    /// Every record in the window has its outcome.
    pub(super) fn resolved(&self) -> bool {
        self.batches.iter().all(|b| b.unresolved == 0)
    }

    /// Some record waits for its report.
    pub(super) fn awaiting(&self) -> bool {
        !self.resolved()
    }

    /// The sequences in the window (a claim from below the window's rows must not take them again).
    pub(super) fn seqs(&self) -> impl Iterator<Item = i64> + '_ {
        self.batches.iter().flat_map(|b| b.rows.iter().map(|r| r.seq))
    }

    /// The lowest sequence in the window.
    pub(super) fn lowest(&self) -> Option<i64> {
        self.seqs().min()
    }

    /// The earliest deadline of a batch still awaiting reports.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.batches.iter().filter(|b| b.unresolved > 0).map(|b| b.deadline).min()
    }

    /// The next report.
    pub(super) async fn report(&mut self) -> Option<DeliveryReport> {
        self.route.recv().await
    }

    /// Applies every report already there.
    pub(super) fn take_reports(&mut self, shared: &Shared) {
        while let Some(r) = self.route.try_recv() {
            self.apply(shared, r);
        }
    }

    /// Applies one delivery report to its row.
    pub(super) fn apply(&mut self, shared: &Shared, report: DeliveryReport) {
        let Some(batch) =
            self.batches.iter_mut().find(|b| (report.ticket.wrapping_sub(b.first_ticket) as usize) < b.slots.len())
        else {
            return;
        };
        let i = report.ticket.wrapping_sub(batch.first_ticket) as usize;
        let Slot::Queued { topic, span } = &mut batch.slots[i] else { return };
        let row = &batch.rows[i];
        if let Some(mut span) = span.take() {
            match &report.result {
                Ok((partition, offset)) => {
                    span.set(opentelemetry::KeyValue::new("messaging.destination.partition.id", i64::from(*partition)));
                    span.set(opentelemetry::KeyValue::new("messaging.kafka.offset", *offset));
                }
                Err(e) => span.fail(&describe(e)),
            }
        }
        let outcome = match report.result {
            Ok((partition, offset)) => {
                if offset < 0 {
                    shared.stats.acks_without_offset.fetch_add(1, Ordering::Relaxed);
                    crate::telemetry::ack_without_offset(&shared.label, topic);
                    tracing::debug!(message_id = %row.id, topic = %topic, partition, offset, "acknowledged without an offset");
                }
                Outcome::Acked(Acked {
                    seq: row.seq,
                    kafka_topic: topic.clone(),
                    partition,
                    offset,
                    acked_at: report.at,
                })
            }
            Err(e) => {
                self.troubled = true;
                Outcome::Failed { error: describe(&e), classified: classify::kafka(&e) }
            }
        };
        batch.resolve(i, outcome);
    }

    /// The oldest batch, if every one of its rows was acknowledged: it is settled on its own.
    pub(super) fn pop_acknowledged(&mut self) -> Option<Batch> {
        if self.troubled || self.batches.front().is_none_or(|b| b.unresolved > 0) {
            return None;
        }
        let batch = self.batches.pop_front().expect("checked");
        self.rows -= batch.rows.len();
        self.let_go_if_empty();
        Some(batch)
    }

    /// Every batch, once all are resolved (a troubled window is settled whole), and the
    /// generation they went to.
    pub(super) fn take_all(&mut self) -> (Vec<Batch>, Option<Arc<Generation>>) {
        debug_assert!(self.resolved());
        let all: Vec<Batch> = self.batches.drain(..).collect();
        let generation = self.generation.clone();
        self.rows = 0;
        self.troubled = false;
        self.let_go_if_empty();
        (all, generation)
    }

    fn let_go_if_empty(&mut self) {
        if self.batches.is_empty() {
            self.generation = None;
            self.fatal_seen = None;
        }
    }

    /// Batches past their deadline: what they still wait for failed as timed out. Returns the
    /// generation to retire, if any batch expired.
    pub(super) fn expire(&mut self, now: Instant) -> Option<u64> {
        let mut expired = false;
        for b in self.batches.iter_mut().filter(|b| b.unresolved > 0 && b.deadline <= now) {
            b.expire(
                "no acknowledgement within --message-timeout; the producer is replaced and the row sent again",
                classify::kafka_code(RDKafkaErrorCode::MessageTimedOut),
            );
            expired = true;
        }
        if expired {
            self.troubled = true;
        }
        expired.then(|| self.generation.as_ref().map(|g| g.number)).flatten()
    }

    /// Whether the window's producer failed for good. What it still holds would only fail when it
    /// is replaced, so after a short grace for the refused record's own report the rest fails
    /// now; the settling of the window replaces the producer ([`retire_failed`]).
    pub(super) fn check_failed_producer(&mut self, now: Instant) {
        let Some(generation) = self.generation.as_ref() else { return };
        if generation.failed_for_good().is_none() {
            return;
        }
        let since = *self.fatal_seen.get_or_insert(now);
        self.troubled = true;
        if now < since + FATAL_GRACE {
            return;
        }
        for b in self.batches.iter_mut().filter(|b| b.unresolved > 0) {
            b.expire(
                "the producer failed for good before acknowledging; the row is sent again by its replacement",
                classify::kafka_code(RDKafkaErrorCode::Fatal),
            );
        }
    }

    /// Hands a claim's rows to the producer, pipelined: one ticket per row, one deadline for the
    /// batch (`--message-timeout`; librdkafka itself never gives up on a record). A row whose key
    /// had a row refused before it in the batch is held, and so is the rest of the batch when the
    /// producer queue stays full until the deadline or the generation was retired under it: a
    /// record handed to a purged producer could overtake the purged ones.
    pub(super) async fn send(
        &mut self,
        shared: &Shared,
        rows: Vec<ClaimedRow>,
        probing: bool,
        breaker_was_closed: bool,
    ) {
        self.take_reports(shared);
        let generation = match &self.generation {
            Some(g) => g.clone(),
            None => {
                let g = current_generation(shared).await;
                self.generation = Some(g.clone());
                g
            }
        };
        let deadline = Instant::now() + shared.config.producer.message_timeout;
        let mut slots = Vec::with_capacity(rows.len());
        let mut first_ticket = None;
        let mut refused_keys: HashSet<&str> = HashSet::new();
        // A failure already known in the window: nothing more goes out until it is settled.
        let mut hold_rest = self.troubled;
        let mut unresolved = 0;
        for row in &rows {
            let (ticket, opaque) = self.route.ticket();
            first_ticket.get_or_insert(ticket);
            if hold_rest || row.key.as_deref().is_some_and(|k| refused_keys.contains(k)) {
                slots.push(Slot::Done(Outcome::Held));
                continue;
            }
            let slot = match send_one(shared, &generation, row, opaque, deadline).await {
                Sent::Queued(topic, span) => {
                    unresolved += 1;
                    Slot::Queued { topic, span }
                }
                Sent::Refused(error, classified) => {
                    if let Some(k) = row.key.as_deref() {
                        refused_keys.insert(k);
                    }
                    Slot::Done(Outcome::Failed { error, classified })
                }
                Sent::QueueStayedFull => {
                    hold_rest = true;
                    Slot::Done(Outcome::Failed {
                        error: "the producer queue stayed full until the batch deadline".into(),
                        classified: classify::kafka_code(RDKafkaErrorCode::QueueFull),
                    })
                }
                Sent::Retired => {
                    hold_rest = true;
                    Slot::Done(Outcome::Held)
                }
            };
            slots.push(slot);
        }
        if slots.iter().any(|s| matches!(s, Slot::Done(_))) {
            self.troubled = true;
        }
        shared.stats.produce_attempts.fetch_add(unresolved as u64, Ordering::Relaxed);
        self.rows += rows.len();
        let linked: Vec<_> = slots
            .iter()
            .filter_map(|s| match s {
                Slot::Queued { span: Some(span), .. } => span.context(),
                _ => None,
            })
            .collect();
        let span = crate::traces::Span::linked(
            "outbox batch",
            linked,
            vec![
                opentelemetry::KeyValue::new("outbox.lane", i64::from(rows.first().map_or(0, |r| r.lane))),
                opentelemetry::KeyValue::new("outbox.rows", rows.len() as i64),
            ],
        );
        self.batches.push_back(Batch {
            rows,
            slots,
            first_ticket: first_ticket.unwrap_or(0),
            unresolved,
            deadline,
            probing,
            breaker_was_closed,
            _span: span,
        });
    }
}

/// The generation a new window sends with: the current one, replaced first if it already failed
/// for good (another lane's record was refused; the next send would only be refused too).
async fn current_generation(shared: &Shared) -> Arc<Generation> {
    let generation = shared.producer.current();
    if generation.failed_for_good().is_some() {
        retire_failed(shared, &generation, &mut []).await;
        return shared.producer.current();
    }
    generation
}

/// Retires a generation that failed for good, saying why. A record refused for good
/// (`enable.gapless.guarantee`) is the record's fault, and its report says why; the rest is
/// collateral and sent again. A producer that cannot work at all (no IdempotentWrite permission, a
/// broker without idempotence) is the broker's: the collateral counts as a failure and feeds the
/// breaker, instead of replacing producers as fast as batches come.
pub(super) async fn retire_failed(shared: &Shared, generation: &Generation, outcomes: &mut [Outcome]) {
    let Some((code, why)) = generation.failed_for_good() else { return };
    if code == RDKafkaErrorCode::GaplessGuarantee {
        tracing::warn!(error = %why, "a record was refused for good; replacing the Kafka producer");
    } else {
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

enum Sent {
    Queued(String, Option<crate::traces::Span>),
    Refused(String, Classified),
    /// Not sent: the generation was retired (replaced) under the batch.
    Retired,
    /// Not sent: librdkafka's queue stayed full until the batch deadline.
    QueueStayedFull,
}

fn malformed(why: String) -> Sent {
    Sent::Refused(format!("malformed row: {why}"), classify::malformed_row())
}

async fn send_one(
    shared: &Shared,
    generation: &Generation,
    row: &ClaimedRow,
    opaque: usize,
    deadline: Instant,
) -> Sent {
    if let Some(why) = &row.malformed {
        return malformed(why.clone());
    }
    let topic = shared.config.topic_for(&row.topic);
    if let Err(e) = validate_topic(&topic) {
        return malformed(e.to_string());
    }
    let span = publish_span(row, &topic);
    let traceparent = span.as_ref().and_then(|s| s.traceparent());
    let headers =
        envelope::with_traceparent(row, &shared.source, traceparent.as_deref().or(row.traceparent.as_deref()));
    let mut record =
        envelope::routed_record(&topic, row.key.as_deref().map(str::as_bytes), row.payload.as_deref(), headers, opaque);
    loop {
        match generation.send(record) {
            Ok(()) => return Sent::Queued(topic.clone(), span),
            Err(SendError::Retired) => return Sent::Retired,
            Err(SendError::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                // librdkafka's queue is full: wait for acknowledgements to make room.
                if Instant::now() >= deadline {
                    return Sent::QueueStayedFull;
                }
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(SendError::Kafka(e, _)) => return Sent::Refused(describe(&e), classify::kafka(&e)),
        }
    }
}

/// The message's span (`outbox publish`), a child of the writer's `traceparent`, from the row's
/// write to its acknowledgement; `None` when traces are off.
fn publish_span(row: &ClaimedRow, topic: &str) -> Option<crate::traces::Span> {
    use opentelemetry::KeyValue;
    let written: std::time::SystemTime = row.created_at.into();
    let mut span = crate::traces::Span::start(
        "outbox publish",
        opentelemetry::trace::SpanKind::Producer,
        row.traceparent.as_deref(),
        Some(written),
        || {
            vec![
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.destination.name", topic.to_owned()),
                KeyValue::new("messaging.message.id", row.id.to_string()),
                KeyValue::new("outbox.lane", i64::from(row.lane)),
                KeyValue::new("outbox.seq", row.seq),
                KeyValue::new("outbox.attempt", i64::from(row.attempts) + 1),
            ]
        },
    )?;
    // The claim is `age_ms` after the write (the row's age when it was read).
    span.event_at("claimed", written + std::time::Duration::from_millis(row.age_ms.max(0) as u64));
    span.event("produced");
    Some(span)
}

/// An error for `last_error` and the logs: the Kafka error, never the payload.
fn describe(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("kafka {code:?}: {e}"),
        None => format!("kafka: {e}"),
    }
}
