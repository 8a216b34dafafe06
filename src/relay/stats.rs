//! Counters of one relay run, for callers that embed the relay (tests and benchmarks read them).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Counters of one run, for callers that embed the relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows acknowledged by the broker and removed from the outbox.
    pub delivered: AtomicU64,
    /// Lanes taken over (including the first acquisitions).
    pub lanes_acquired: AtomicU64,
    /// Claim queries run (an idle relay runs few: it waits on NOTIFY).
    pub claims: AtomicU64,
    /// Time spent in claim queries, in microseconds (divide by `claims` for the mean).
    pub claim_micros: AtomicU64,
    /// Rows the sweep found behind a lane's claim cursor (no NOTIFY announced them).
    pub swept: AtomicU64,
    /// Archived rows and expired idempotency keys pruned.
    pub pruned: AtomicU64,
    /// Failed attempts recorded for a later retry.
    pub retried: AtomicU64,
    /// Rows moved to the dead letters.
    pub dead_lettered: AtomicU64,
    /// Records handed to the producer (attempts, successful or not).
    pub produce_attempts: AtomicU64,
    /// Lane sessions lost (statement errors, timeouts, closed connections).
    pub sessions_lost: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_opened: AtomicU64,
    /// Times it closed again.
    pub breaker_closed: AtomicU64,
    /// Records sent as half-open probes (the only produce attempts while the breaker is not closed).
    pub probes: AtomicU64,
    /// Rows acknowledged after an earlier row of their key failed in the same batch.
    pub order_hazards: AtomicU64,
    /// Acknowledgements without an offset (see `telemetry::ack_without_offset`).
    pub acks_without_offset: AtomicU64,
    /// Producer generations retired (a batch deadline passed, or the producer failed for good).
    pub producer_generations: AtomicU64,
    /// The latest retry delays chosen, as (attempt, delay), newest last; at most 1,000 (feature
    /// `testing`: the tests check the jitter with them).
    #[cfg(feature = "testing")]
    pub retry_delays: std::sync::Mutex<std::collections::VecDeque<(u32, Duration)>>,
}

impl RelayStats {
    #[cfg(feature = "testing")]
    pub(crate) fn note_retry(&self, attempt: u32, delay: Duration) {
        let mut d = self.retry_delays.lock().expect("stats lock");
        if d.len() == 1000 {
            d.pop_front();
        }
        d.push_back((attempt, delay));
    }

    #[cfg(not(feature = "testing"))]
    pub(crate) fn note_retry(&self, _: u32, _: Duration) {}
}
