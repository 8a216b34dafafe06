//! One partition's worker: takes the messages the poll loop hands it, applies each in a
//! transaction with the inbox (one at a time or in batches), stores the offset only after the
//! commit, retries a failing handler in place, and dead-letters poison and id-less messages.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdkafka::consumer::Consumer;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::dead_letter::{dead_letter, poison};
use super::{ConsumedMessage, ConsumedOrBad, ConsumerError, Handler, Shared};
use crate::inbox::{InboxMessage, InboxOutcome};
use crate::pool::{self, Pool, Pooled};

pub(super) async fn partition_worker<H: Handler>(
    shared: Arc<Shared<H>>,
    mut rx: mpsc::UnboundedReceiver<ConsumedOrBad>,
    depth: Arc<std::sync::atomic::AtomicUsize>,
    revoked: CancellationToken,
) {
    while let Some(first) = rx.recv().await {
        if shared.abort.is_cancelled() || revoked.is_cancelled() {
            return;
        }
        let mut batch = vec![first];
        while batch.len() < shared.config.batch_size {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let taken = batch.len();
        let last = match batch.last().expect("one at least") {
            ConsumedOrBad::Ok(m) | ConsumedOrBad::NoId(m, _) => (m.topic.clone(), m.partition, m.offset),
        };
        // A session for this batch only, given back after it: the partitions share the pool's.
        let mut db: Option<Pooled> = None;
        let next = process(&shared, &mut db, batch).await;
        drop(db);
        if next == Next::Stop {
            return;
        }
        depth.fetch_sub(taken, Ordering::Relaxed);
        // Only now, with the effects committed, may the offset move past these messages.
        // librdkafka stores `offset + 1` itself: pass the last processed message's own offset.
        if let Err(e) = shared.consumer.store_offset(&last.0, last.1, last.2) {
            tracing::debug!(topic = %last.0, partition = last.1, error = %e, "offset not stored (partition revoked?)");
        }
    }
}

/// What a partition worker does after a step. Every step that can fail says which, so that no
/// caller can treat an unwritten dead letter as handled (the offset would move past a message that
/// was neither applied nor recorded).
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// The message is done with (applied, a duplicate, or recorded as a dead letter): its offset
    /// may be stored.
    Continue,
    /// The runner is stopping (shutdown, a crash injected, a dead letter that cannot be written,
    /// poison under `PoisonPolicy::Stop`): the offset must not move.
    Stop,
}

/// Processes a batch (in order).
async fn process<H: Handler>(shared: &Shared<H>, db: &mut Option<Pooled>, batch: Vec<ConsumedOrBad>) -> Next {
    let mut good = Vec::with_capacity(batch.len());
    for m in batch {
        match m {
            ConsumedOrBad::Ok(m) => good.push(m),
            ConsumedOrBad::NoId(m, reason) => {
                tracing::error!(topic = %m.topic, partition = m.partition, offset = m.offset, reason,
                    "message without a usable id: dead-lettered, never applied");
                if dead_letter(shared, db, &m, None, reason, "the message has no usable id header", 0).await
                    == Next::Stop
                {
                    return Next::Stop;
                }
            }
        }
    }
    if good.len() > 1 {
        match apply_batch(shared, db, &good).await {
            Ok(()) => return fire_crash(shared, good.last().expect("non-empty")),
            Err(e) => {
                tracing::warn!(error = %e, messages = good.len(), "batch failed; processing its messages one by one");
            }
        }
    }
    for m in &good {
        if apply_one(shared, db, m).await == Next::Stop || fire_crash(shared, m) == Next::Stop {
            return Next::Stop;
        }
    }
    Next::Continue
}

/// The test hook (feature `testing`): stops the runner right after a commit, before the offset is
/// stored.
#[cfg(feature = "testing")]
fn fire_crash<H>(shared: &Shared<H>, m: &ConsumedMessage) -> Next {
    if let Some(f) = &shared.config.crash_after_commit {
        if (f.0)(m) {
            *shared.failure.lock().expect("lock") = Some(ConsumerError::InjectedCrash);
            shared.abort.cancel();
            return Next::Stop;
        }
    }
    Next::Continue
}

#[cfg(not(feature = "testing"))]
fn fire_crash<H>(_: &Shared<H>, _: &ConsumedMessage) -> Next {
    Next::Continue
}

/// The worker's session for this step: the one it holds, or one from the pool.
pub(super) async fn session<'a>(pool: &Pool, db: &'a mut Option<Pooled>) -> Result<&'a mut Client, String> {
    if db.as_ref().is_none_or(|c| c.is_closed()) {
        *db = Some(pool.get().await.map_err(|e| e.to_string())?);
    }
    Ok(&mut **db.as_mut().expect("just set"))
}

/// After an error that may have left the session unusable: close it rather than give it back.
pub(super) fn drop_session(db: &mut Option<Pooled>) {
    if let Some(s) = db.take() {
        pool::discard(s);
    }
}

fn inbox_message(m: &ConsumedMessage) -> InboxMessage<'_> {
    InboxMessage::new(m.id, m.payload.as_deref()).at(&m.topic, m.partition, m.offset).sequenced(m.lane(), m.seq())
}

/// The runner's span of a message (`outbox process`), a child of the record's `traceparent`;
/// `None` when traces are off.
fn process_span<H>(shared: &Shared<H>, m: &ConsumedMessage) -> Option<crate::traces::Span> {
    use opentelemetry::KeyValue;
    crate::traces::Span::start(
        "outbox process",
        opentelemetry::trace::SpanKind::Consumer,
        m.header("traceparent"),
        None,
        || {
            vec![
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.destination.name", m.topic.clone()),
                KeyValue::new("messaging.destination.partition.id", i64::from(m.partition)),
                KeyValue::new("messaging.kafka.offset", m.offset),
                KeyValue::new("messaging.message.id", m.id.to_string()),
                KeyValue::new("messaging.consumer.group.name", shared.inbox.consumer().to_owned()),
            ]
        },
    )
}

/// Records on a message's span what became of it: the dedup outcome and the handler's time.
fn settle_span(span: Option<crate::traces::Span>, outcome: &'static str, handler: Option<std::time::Duration>) {
    if let Some(mut span) = span {
        span.set(opentelemetry::KeyValue::new("outbox.dedup", outcome));
        if let Some(d) = handler {
            span.set(opentelemetry::KeyValue::new("outbox.handler_ms", d.as_secs_f64() * 1000.0));
        }
        span.event("committed");
    }
}

/// One transaction, one dedup statement for the whole batch; any handler error rolls it all back.
async fn apply_batch<H: Handler>(
    shared: &Shared<H>,
    db: &mut Option<Pooled>,
    msgs: &[ConsumedMessage],
) -> Result<(), String> {
    let mut spans: Vec<Option<crate::traces::Span>> = msgs.iter().map(|m| process_span(shared, m)).collect();
    let mut took: Vec<Option<std::time::Duration>> = vec![None; msgs.len()];
    let client = session(&shared.pool, db).await?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let inbox_msgs: Vec<InboxMessage<'_>> = msgs.iter().map(inbox_message).collect();
    let outcomes = shared.inbox.record_batch(&tx, &inbox_msgs).await.map_err(|e| e.to_string())?;
    if outcomes.iter().any(|o| matches!(o, InboxOutcome::Conflict { .. })) {
        return Err("a conflicting redelivery in the batch".into());
    }
    let (mut processed, mut duplicates) = (0, 0);
    for (i, (m, o)) in msgs.iter().zip(&outcomes).enumerate() {
        if *o == InboxOutcome::Processed {
            let began = std::time::Instant::now();
            if let Err(e) = shared.handler.handle(&tx, m).await {
                if let Some(s) = spans[i].as_mut() {
                    s.fail("the handler failed: the batch was rolled back and its messages go one by one");
                }
                return Err(e.to_string());
            }
            took[i] = Some(began.elapsed());
            crate::telemetry::handler_time(shared.inbox.consumer(), began.elapsed());
            processed += 1;
        } else {
            duplicates += 1;
        }
    }
    tx.commit().await.map_err(|e| e.to_string())?;
    for ((span, o), t) in spans.iter_mut().zip(&outcomes).zip(took) {
        let outcome = if *o == InboxOutcome::Processed { "processed" } else { "duplicate" };
        settle_span(span.take(), outcome, t);
    }
    shared.stats.processed.fetch_add(processed, Ordering::Relaxed);
    shared.stats.duplicates.fetch_add(duplicates, Ordering::Relaxed);
    crate::telemetry::inbox(shared.inbox.consumer(), processed, duplicates, 0);
    Ok(())
}

/// One message: dedup, handler, commit; handler errors retried in place, then poison.
async fn apply_one<H: Handler>(shared: &Shared<H>, db: &mut Option<Pooled>, m: &ConsumedMessage) -> Next {
    let mut span = process_span(shared, m);
    // The handler's time, in microseconds (0: not run).
    let took = std::sync::atomic::AtomicU64::new(0);
    let mut attempt = 0u32;
    let mut db_failures = 0u32;
    loop {
        if shared.abort.is_cancelled() {
            return Next::Stop;
        }
        let result = async {
            let client = session(&shared.pool, db).await.map_err(Step::Unavailable)?;
            let tx = client.transaction().await.map_err(Step::db)?;
            let outcome = shared.inbox.record(&tx, &inbox_message(m)).await.map_err(|e| Step::db(e.0))?;
            match outcome {
                InboxOutcome::Processed => {
                    let began = std::time::Instant::now();
                    let handled = shared.handler.handle(&tx, m).await;
                    took.store(began.elapsed().as_micros().max(1) as u64, Ordering::Relaxed);
                    crate::telemetry::handler_time(shared.inbox.consumer(), began.elapsed());
                    handled.map_err(|e| Step::Handler(e.to_string()))?;
                    // A deferred constraint the handler's writes break fails here: the message's
                    // fault, retried in place and then poison like any handler failure.
                    tx.commit().await.map_err(|e| match crate::classify::postgres(&e).class {
                        "pg.constraint" | "pg.data" => Step::Handler(e.to_string()),
                        _ => Step::db(e),
                    })?;
                    Ok(InboxOutcome::Processed)
                }
                InboxOutcome::Duplicate => {
                    tx.commit().await.map_err(Step::db)?;
                    Ok(InboxOutcome::Duplicate)
                }
                conflict => Ok(conflict),
            }
        }
        .await;
        match result {
            Ok(InboxOutcome::Processed) => {
                shared.stats.processed.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::inbox(shared.inbox.consumer(), 1, 0, 0);
                let handler =
                    Some(took.load(Ordering::Relaxed)).filter(|t| *t > 0).map(std::time::Duration::from_micros);
                settle_span(span.take(), "processed", handler);
                return Next::Continue;
            }
            Ok(InboxOutcome::Duplicate) => {
                settle_span(span.take(), "duplicate", None);
                shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::inbox(shared.inbox.consumer(), 0, 1, 0);
                tracing::debug!(message_id = %m.id, topic = %m.topic, partition = m.partition, offset = m.offset, "duplicate skipped");
                return Next::Continue;
            }
            Ok(InboxOutcome::Conflict { .. }) => {
                if let Some(mut s) = span.take() {
                    s.set(opentelemetry::KeyValue::new("outbox.dedup", "conflict"));
                    s.fail("same message id, different payload: dead-lettered");
                }
                shared.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::inbox(shared.inbox.consumer(), 0, 0, 1);
                tracing::error!(message_id = %m.id, topic = %m.topic, partition = m.partition, offset = m.offset,
                    "CONFLICT: this id was processed before with a different payload; not applied, dead-lettered for an operator");
                // Handled only once its dead letter is written: otherwise the offset must not move.
                return dead_letter(
                    shared,
                    db,
                    m,
                    Some(m.id),
                    crate::classify::inbox_reason::CONFLICTING_PAYLOAD,
                    "same message id, different payload digest",
                    1,
                )
                .await;
            }
            Err(Step::Handler(error)) => {
                attempt += 1;
                shared.stats.handler_errors.fetch_add(1, Ordering::Relaxed);
                if attempt >= shared.config.max_attempts {
                    return poison(shared, db, m, &error, attempt).await;
                }
                let delay = shared.config.backoff.delay(attempt - 1);
                tracing::warn!(message_id = %m.id, topic = %m.topic, partition = m.partition, offset = m.offset, attempt,
                    retry_in_ms = delay.as_millis() as u64, error = %error, "handler failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(Step::Refused { class, error }) if db_failures + 1 >= REFUSED_ATTEMPTS => {
                // The same refusal every time (a missing grant, a schema not migrated): retrying
                // forever would only hide it. Stop, and say what to check.
                tracing::error!(message_id = %m.id, error_class = class, error = %error,
                    "the inbox database keeps refusing; stopping the consumer");
                *shared.failure.lock().expect("lock") =
                    Some(ConsumerError::DatabaseRefused { class, error, attempts: db_failures + 1 });
                shared.abort.cancel();
                return Next::Stop;
            }
            Err(Step::Unavailable(error) | Step::Refused { error, .. }) => {
                // The database, not the message: back off and try again, without counting it
                // against the message.
                drop_session(db);
                db_failures += 1;
                let delay = shared.config.backoff.delay(db_failures.min(10));
                tracing::warn!(message_id = %m.id, error = %error, retry_in_ms = delay.as_millis() as u64,
                    "inbox database unavailable or refusing; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// How many times in a row the database may refuse a message's inbox statement with a permanent
/// error (privilege, schema, data) before the runner stops; a refusal can be a migration running at
/// that moment, so a few tries with backoff come first.
const REFUSED_ATTEMPTS: u32 = 5;

/// Why applying one message failed.
enum Step {
    /// No session, or it broke: retried without end (the database comes back).
    Unavailable(String),
    /// The database refused the inbox's statement in a way that repeats (classified permanent).
    Refused { class: &'static str, error: String },
    /// The handler failed: counted against the message.
    Handler(String),
}

impl Step {
    /// A database error, classified where it enters.
    fn db(e: tokio_postgres::Error) -> Self {
        let c = crate::classify::postgres(&e);
        match c.disposition {
            crate::classify::Disposition::Permanent => {
                Step::Refused { class: c.class, error: crate::classify::describe_postgres(&e) }
            }
            _ => Step::Unavailable(format!("{}: {}", c.class, crate::classify::describe_postgres(&e))),
        }
    }
}

pub(super) async fn purge_loop<H: Handler>(shared: Arc<Shared<H>>, shutdown: CancellationToken) {
    loop {
        let mut db = None;
        if let Ok(client) = session(&shared.pool, &mut db).await {
            match shared.inbox.purge(&*client, shared.config.retention, 10_000).await {
                Ok(n) => {
                    shared.stats.purged.fetch_add(n, Ordering::Relaxed);
                    if n > 0 {
                        tracing::info!(purged = n, "purged inbox rows past the retention");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "purging the inbox failed; will retry"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(shared.config.purge_interval) => {}
        }
    }
}
