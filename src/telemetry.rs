//! Every metric the product emits, defined in one place: name, unit, help, labels. Labels are
//! few and bounded (topic, reason, error class, consumer); never a message id.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `outbox_relay_delivered_total` | counter | topic | rows acknowledged by the broker and removed |
//! | `outbox_relay_retried_total` | counter | topic, error_class | failed attempts recorded for a retry |
//! | `outbox_relay_dead_lettered_total` | counter | topic, reason | rows moved to the dead letters |
//! | `outbox_relay_backlog_rows` | gauge | | pending rows in the outbox |
//! | `outbox_relay_oldest_pending_seconds` | gauge | | age of the oldest pending row |
//! | `outbox_relay_commit_to_ack_seconds` | histogram | | row written to broker acknowledgement |
//! | `outbox_relay_batch_size` | histogram | | rows per produced batch |
//! | `outbox_relay_breaker_state` | gauge | | 0 closed, 1 half-open, 2 open |
//! | `outbox_relay_lanes_owned` | gauge | | lanes this instance owns |
//! | `outbox_relay_acks_without_offset_total` | counter | topic | acknowledgements that carry no offset |
//! | `outbox_relay_producer_replaced_total` | counter | reason | producer generations retired |
//! | `outbox_relay_outbox_dead_tuples` | gauge | | dead row versions in the outbox table |
//! | `outbox_relay_snapshot_horizon_seconds` | gauge | | age of the oldest snapshot held on the database |
//! | `outbox_relay_reconcile_missing` | gauge | consumer | missing messages the newest `reconcile` found |
//! | `outbox_relay_reconcile_age_seconds` | gauge | consumer | how long ago the newest `reconcile` ran |
//! | `outbox_relay_claim_seconds` | histogram | | time one claim query took |
//! | `outbox_relay_sweep_found_total` | counter | | rows the sweep found behind a lane's claim cursor |
//! | `outbox_inbox_processed_total` | counter | consumer | effects applied |
//! | `outbox_inbox_duplicates_total` | counter | consumer | redeliveries skipped |
//! | `outbox_inbox_conflicts_total` | counter | consumer | same id, other payload |
//! | `outbox_inbox_dead_lettered_total` | counter | consumer, reason | poison messages |
//! | `outbox_inbox_handler_seconds` | histogram | consumer | handler time |

use std::time::Duration;

/// Declares every metric's unit and help text to the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "outbox_relay_delivered_total",
        Unit::Count,
        "Rows acknowledged by the broker and removed from the outbox"
    );
    describe_counter!("outbox_relay_retried_total", Unit::Count, "Failed delivery attempts recorded for a later retry");
    describe_counter!("outbox_relay_dead_lettered_total", Unit::Count, "Rows moved to the dead letters");
    describe_gauge!("outbox_relay_backlog_rows", Unit::Count, "Pending rows in the outbox");
    describe_gauge!("outbox_relay_oldest_pending_seconds", Unit::Seconds, "Age of the oldest pending row");
    describe_histogram!(
        "outbox_relay_commit_to_ack_seconds",
        Unit::Seconds,
        "Time from the row's write to the broker's acknowledgement"
    );
    describe_histogram!("outbox_relay_batch_size", Unit::Count, "Rows per produced batch");
    describe_gauge!("outbox_relay_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open");
    describe_gauge!("outbox_relay_lanes_owned", Unit::Count, "Lanes this instance owns");
    describe_counter!(
        "outbox_relay_acks_without_offset_total",
        Unit::Count,
        "Acknowledgements without an offset: implied by a later record's acknowledgement, or a duplicate the broker recognised"
    );
    describe_counter!(
        "outbox_relay_producer_replaced_total",
        Unit::Count,
        "Kafka producers retired (batch deadline passed, or a permanent record failure), their records sent again"
    );
    describe_gauge!(
        "outbox_relay_outbox_dead_tuples",
        Unit::Count,
        "Dead row versions in the outbox table, not yet cleaned up by vacuum"
    );
    describe_gauge!(
        "outbox_relay_snapshot_horizon_seconds",
        Unit::Seconds,
        "Age of the oldest snapshot held on the database (it keeps deleted outbox rows from being cleaned up)"
    );
    describe_gauge!(
        "outbox_relay_reconcile_missing",
        Unit::Count,
        "Delivered messages the consumer had not processed, as the newest `outbox-relay reconcile` found"
    );
    describe_gauge!(
        "outbox_relay_reconcile_age_seconds",
        Unit::Seconds,
        "How long ago the newest `outbox-relay reconcile` of the consumer ran"
    );
    describe_histogram!("outbox_relay_claim_seconds", Unit::Seconds, "Time one claim query of a lane took");
    describe_counter!(
        "outbox_relay_sweep_found_total",
        Unit::Count,
        "Rows the sweep found behind a lane's claim cursor (no NOTIFY announced them)"
    );
    describe_counter!("outbox_inbox_processed_total", Unit::Count, "Messages whose effect was applied");
    describe_counter!("outbox_inbox_duplicates_total", Unit::Count, "Redeliveries skipped by the inbox");
    describe_counter!("outbox_inbox_conflicts_total", Unit::Count, "Messages with a known id and another payload");
    describe_counter!(
        "outbox_inbox_dead_lettered_total",
        Unit::Count,
        "Consumed messages moved to the inbox dead letters"
    );
    describe_histogram!("outbox_inbox_handler_seconds", Unit::Seconds, "Time the consumer's handler took");
}

/// One claim query took `d`.
pub fn claim_time(d: Duration) {
    metrics::histogram!("outbox_relay_claim_seconds").record(d.as_secs_f64());
}

/// The sweep found rows behind a lane's claim cursor.
pub fn sweep_found(n: u64) {
    metrics::counter!("outbox_relay_sweep_found_total").increment(n);
}

/// Rows of `topic` delivered.
pub fn delivered(topic: &str, n: u64) {
    metrics::counter!("outbox_relay_delivered_total", "topic" => topic.to_owned()).increment(n);
}

/// A failed attempt recorded for a retry.
pub fn retried(topic: &str, error_class: &'static str) {
    metrics::counter!("outbox_relay_retried_total", "topic" => topic.to_owned(), "error_class" => error_class)
        .increment(1);
}

/// A row dead-lettered.
pub fn dead_lettered(topic: &str, reason: &str) {
    metrics::counter!("outbox_relay_dead_lettered_total", "topic" => topic.to_owned(), "reason" => reason.to_owned())
        .increment(1);
}

/// The outbox's backlog and the age of its oldest row.
pub fn backlog(rows: i64, oldest: Duration) {
    metrics::gauge!("outbox_relay_backlog_rows").set(rows as f64);
    metrics::gauge!("outbox_relay_oldest_pending_seconds").set(oldest.as_secs_f64());
}

/// One row's write-to-acknowledgement latency.
pub fn commit_to_ack(latency: Duration) {
    metrics::histogram!("outbox_relay_commit_to_ack_seconds").record(latency.as_secs_f64());
}

/// A produced batch's size.
pub fn batch_size(rows: usize) {
    metrics::histogram!("outbox_relay_batch_size").record(rows as f64);
}

/// The breaker's state as a gauge.
pub fn breaker_state(gauge: f64) {
    metrics::gauge!("outbox_relay_breaker_state").set(gauge);
}

/// Lanes owned.
pub fn lanes_owned(n: usize) {
    metrics::gauge!("outbox_relay_lanes_owned").set(n as f64);
}

/// Acknowledgements of `topic` that carry no offset. On a real broker they are legitimate (a
/// record acknowledged implicitly by a later one, or a retry the broker recognised as a
/// duplicate); a test broker that does not check idempotent sequence numbers can produce them for
/// records it never wrote. The archive then holds offset -1 or -1001 for the row.
pub fn ack_without_offset(topic: &str) {
    metrics::counter!("outbox_relay_acks_without_offset_total", "topic" => topic.to_owned()).increment(1);
}

/// A producer generation retired, and why (`batch_deadline`, `fatal_error`).
pub fn producer_replaced(reason: &'static str) {
    metrics::counter!("outbox_relay_producer_replaced_total", "reason" => reason).increment(1);
}

/// The outbox's dead tuples and the age of the oldest snapshot on its database.
pub fn queue_health(dead_tuples: i64, horizon: Duration) {
    metrics::gauge!("outbox_relay_outbox_dead_tuples").set(dead_tuples as f64);
    metrics::gauge!("outbox_relay_snapshot_horizon_seconds").set(horizon.as_secs_f64());
}

/// What the newest reconciliation of `consumer` found, and how long ago it ran.
pub fn reconciliation(consumer: &str, missing: i64, age: Duration) {
    metrics::gauge!("outbox_relay_reconcile_missing", "consumer" => consumer.to_owned()).set(missing as f64);
    metrics::gauge!("outbox_relay_reconcile_age_seconds", "consumer" => consumer.to_owned()).set(age.as_secs_f64());
}

/// Inbox outcomes of `consumer`.
pub fn inbox(consumer: &str, processed: u64, duplicates: u64, conflicts: u64) {
    if processed > 0 {
        metrics::counter!("outbox_inbox_processed_total", "consumer" => consumer.to_owned()).increment(processed);
    }
    if duplicates > 0 {
        metrics::counter!("outbox_inbox_duplicates_total", "consumer" => consumer.to_owned()).increment(duplicates);
    }
    if conflicts > 0 {
        metrics::counter!("outbox_inbox_conflicts_total", "consumer" => consumer.to_owned()).increment(conflicts);
    }
}

/// A consumed message dead-lettered.
pub fn inbox_dead_lettered(consumer: &str, reason: &str) {
    metrics::counter!("outbox_inbox_dead_lettered_total", "consumer" => consumer.to_owned(), "reason" => reason.to_owned())
        .increment(1);
}

/// A handler call's duration.
pub fn handler_time(consumer: &str, took: Duration) {
    metrics::histogram!("outbox_inbox_handler_seconds", "consumer" => consumer.to_owned()).record(took.as_secs_f64());
}
