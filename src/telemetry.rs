//! Every metric the product emits, defined in one place: name, unit, help, labels. Labels are
//! few and bounded (outbox, topic, reason, error class, consumer); never a message id.
//!
//! Every relay metric but the breaker's and the producer's (one of each per instance) carries
//! `outbox`: the name an outbox was given (`run --outbox NAME=...`, the schema for `--schema`),
//! or for the schemas a `--schema-pattern` found, the pattern, so that a thousand tenants make
//! one series, not a thousand. Under one such name the gauges are the sum of its schemas' parts
//! (the ages: the largest part).
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `outbox_relay_delivered_total` | counter | outbox, topic | rows acknowledged by the broker and removed |
//! | `outbox_relay_retried_total` | counter | outbox, topic, error_class | failed attempts recorded for a retry |
//! | `outbox_relay_dead_lettered_total` | counter | outbox, topic, reason | rows moved to the dead letters |
//! | `outbox_relay_backlog_rows` | gauge | outbox | pending rows in the outbox |
//! | `outbox_relay_oldest_pending_seconds` | gauge | outbox | age of the oldest pending row |
//! | `outbox_relay_commit_to_ack_seconds` | histogram | outbox | row written to broker acknowledgement |
//! | `outbox_relay_batch_size` | histogram | outbox | rows per produced batch |
//! | `outbox_relay_breaker_state` | gauge | | 0 closed, 1 half-open, 2 open |
//! | `outbox_relay_lanes_owned` | gauge | outbox | lanes this instance owns |
//! | `outbox_relay_acks_without_offset_total` | counter | outbox, topic | acknowledgements that carry no offset |
//! | `outbox_relay_producer_replaced_total` | counter | reason | producer generations retired |
//! | `outbox_relay_outbox_dead_tuples` | gauge | outbox | dead row versions in the outbox table |
//! | `outbox_relay_snapshot_horizon_seconds` | gauge | outbox | age of the oldest snapshot held on the database |
//! | `outbox_relay_reconcile_missing` | gauge | outbox, consumer | missing messages the newest `reconcile` found |
//! | `outbox_relay_reconcile_age_seconds` | gauge | outbox, consumer | how long ago the newest `reconcile` ran |
//! | `outbox_relay_claim_seconds` | histogram | outbox | time one claim query took |
//! | `outbox_relay_sweep_found_total` | counter | outbox | rows the sweep found behind a lane's claim cursor |
//! | `outbox_inbox_processed_total` | counter | consumer | effects applied |
//! | `outbox_inbox_duplicates_total` | counter | consumer | redeliveries skipped |
//! | `outbox_inbox_conflicts_total` | counter | consumer | same id, other payload |
//! | `outbox_inbox_dead_lettered_total` | counter | consumer, reason | poison messages |
//! | `outbox_inbox_handler_seconds` | histogram | consumer | handler time |

use std::collections::HashMap;
use std::sync::Mutex;
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

/// Gauges of which several outboxes under one name (the schemas one `--schema-pattern` found)
/// each report a part: metric and labels → how the parts add up (the largest, or the sum) and
/// part (the schema) → value.
type Parts = HashMap<(&'static str, Vec<(&'static str, String)>), (bool, HashMap<String, f64>)>;
static PARTS: Mutex<Option<Parts>> = Mutex::new(None);

/// Sets `part`'s share of a gauge and the gauge to the sum (or the largest) of its parts.
fn gauge_part(metric: &'static str, labels: Vec<(&'static str, String)>, part: &str, value: Option<f64>, max: bool) {
    let mut guard = PARTS.lock().expect("gauge parts lock");
    let parts = guard.get_or_insert_with(HashMap::new);
    let (max, of) = parts.entry((metric, labels.clone())).or_insert_with(|| (max, HashMap::new()));
    let max = *max;
    match value {
        Some(v) => of.insert(part.to_owned(), v),
        None => of.remove(part),
    };
    let total = if max { of.values().copied().fold(0.0, f64::max) } else { of.values().sum() };
    let labels: Vec<metrics::Label> = labels.into_iter().map(|(k, v)| metrics::Label::new(k, v)).collect();
    metrics::gauge!(metric, labels).set(total);
}

/// Which outbox a figure is of: the name it carries (`outbox` label) and the part of that name
/// it is (its schema); with the handles of the histograms recorded per row or per claim, made
/// once, so the hot path builds no label.
#[derive(Clone)]
pub struct OutboxLabel {
    /// The `outbox` label.
    pub name: String,
    /// The schema, one part of the name.
    pub part: String,
    commit_to_ack: metrics::Histogram,
    batch_size: metrics::Histogram,
    claim: metrics::Histogram,
}

impl std::fmt::Debug for OutboxLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxLabel").field("name", &self.name).field("part", &self.part).finish()
    }
}

impl OutboxLabel {
    /// The label of outbox `name`, part `part` (after the recorder is installed: the handles are
    /// the recorder's).
    pub fn new(name: &str, part: &str) -> Self {
        let h = |metric: &'static str| metrics::histogram!(metric, "outbox" => name.to_owned());
        Self {
            name: name.to_owned(),
            part: part.to_owned(),
            commit_to_ack: h("outbox_relay_commit_to_ack_seconds"),
            batch_size: h("outbox_relay_batch_size"),
            claim: h("outbox_relay_claim_seconds"),
        }
    }

    fn labels(&self) -> Vec<(&'static str, String)> {
        vec![("outbox", self.name.clone())]
    }

    /// Takes this outbox's parts out of every gauge (the instance stopped serving it).
    pub fn forget(&self) {
        let keys: Vec<_> = {
            let guard = PARTS.lock().expect("gauge parts lock");
            guard.as_ref().map_or(Vec::new(), |p| {
                p.iter()
                    .filter(|((_, l), (_, v))| l.first() == self.labels().first() && v.contains_key(&self.part))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
        };
        for (metric, labels) in keys {
            // The aggregation is the one the gauge was made with.
            gauge_part(metric, labels, &self.part, None, false);
        }
    }
}

/// One claim query took `d`.
pub fn claim_time(o: &OutboxLabel, d: Duration) {
    o.claim.record(d.as_secs_f64());
}

/// The sweep found rows behind a lane's claim cursor.
pub fn sweep_found(o: &OutboxLabel, n: u64) {
    metrics::counter!("outbox_relay_sweep_found_total", "outbox" => o.name.clone()).increment(n);
}

/// Rows of `topic` delivered.
pub fn delivered(o: &OutboxLabel, topic: &str, n: u64) {
    metrics::counter!("outbox_relay_delivered_total", "outbox" => o.name.clone(), "topic" => topic.to_owned())
        .increment(n);
}

/// A failed attempt recorded for a retry.
pub fn retried(o: &OutboxLabel, topic: &str, error_class: &'static str) {
    metrics::counter!("outbox_relay_retried_total", "outbox" => o.name.clone(), "topic" => topic.to_owned(),
        "error_class" => error_class)
    .increment(1);
}

/// A row dead-lettered.
pub fn dead_lettered(o: &OutboxLabel, topic: &str, reason: &str) {
    metrics::counter!("outbox_relay_dead_lettered_total", "outbox" => o.name.clone(), "topic" => topic.to_owned(),
        "reason" => reason.to_owned())
    .increment(1);
}

/// The outbox's backlog and the age of its oldest row.
pub fn backlog(o: &OutboxLabel, rows: i64, oldest: Duration) {
    gauge_part("outbox_relay_backlog_rows", o.labels(), &o.part, Some(rows as f64), false);
    gauge_part("outbox_relay_oldest_pending_seconds", o.labels(), &o.part, Some(oldest.as_secs_f64()), true);
}

/// One row's write-to-acknowledgement latency.
pub fn commit_to_ack(o: &OutboxLabel, latency: Duration) {
    o.commit_to_ack.record(latency.as_secs_f64());
}

/// A produced batch's size.
pub fn batch_size(o: &OutboxLabel, rows: usize) {
    o.batch_size.record(rows as f64);
}

/// The breaker's state as a gauge (one breaker per instance).
pub fn breaker_state(gauge: f64) {
    metrics::gauge!("outbox_relay_breaker_state").set(gauge);
}

/// Lanes of the outbox owned.
pub fn lanes_owned(o: &OutboxLabel, n: usize) {
    gauge_part("outbox_relay_lanes_owned", o.labels(), &o.part, Some(n as f64), false);
}

/// Acknowledgements of `topic` that carry no offset. On a real broker they are legitimate (a
/// record acknowledged implicitly by a later one, or a retry the broker recognised as a
/// duplicate); a test broker that does not check idempotent sequence numbers can produce them for
/// records it never wrote. The archive then holds offset -1 or -1001 for the row.
pub fn ack_without_offset(o: &OutboxLabel, topic: &str) {
    metrics::counter!("outbox_relay_acks_without_offset_total", "outbox" => o.name.clone(), "topic" => topic.to_owned())
        .increment(1);
}

/// A producer generation retired, and why (`batch_deadline`, `fatal_error`): one producer per
/// instance, whatever the outboxes.
pub fn producer_replaced(reason: &'static str) {
    metrics::counter!("outbox_relay_producer_replaced_total", "reason" => reason).increment(1);
}

/// The outbox's dead tuples and the age of the oldest snapshot on its database.
pub fn queue_health(o: &OutboxLabel, dead_tuples: i64, horizon: Duration) {
    gauge_part("outbox_relay_outbox_dead_tuples", o.labels(), &o.part, Some(dead_tuples as f64), false);
    gauge_part("outbox_relay_snapshot_horizon_seconds", o.labels(), &o.part, Some(horizon.as_secs_f64()), true);
}

/// What the newest reconciliation of `consumer` found, and how long ago it ran.
pub fn reconciliation(o: &OutboxLabel, consumer: &str, missing: i64, age: Duration) {
    let mut labels = o.labels();
    labels.push(("consumer", consumer.to_owned()));
    gauge_part("outbox_relay_reconcile_missing", labels.clone(), &o.part, Some(missing as f64), false);
    gauge_part("outbox_relay_reconcile_age_seconds", labels, &o.part, Some(age.as_secs_f64()), true);
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
