//! A circuit breaker around the broker, shared by every lane of an instance.
//!
//! Closed: lanes claim and produce. After `failure_threshold` consecutive failed batches, or a
//! failure rate above `failure_rate` over the last `window` (with at least `min_volume` batches),
//! it opens: no lane claims, rows stay untouched, no retry counter is burned. After a cool-down
//! (with jitter, doubling on each failed probe up to `max_cooldown`) it half-opens and lets one lane
//! send a one-row probe; success closes it, failure opens it again.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use super::RelayStats;

/// Breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    /// Consecutive failed batches that open the breaker.
    pub failure_threshold: u32,
    /// Failure rate (0..1) over `window` that opens it.
    pub failure_rate: f64,
    /// The window for the rate.
    pub window: Duration,
    /// Fewest batches in the window before the rate counts.
    pub min_volume: u32,
    /// First cool-down.
    pub cooldown: Duration,
    /// Longest cool-down.
    pub max_cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_rate: 0.5,
            window: Duration::from_secs(30),
            min_volume: 20,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(60),
        }
    }
}

/// The breaker's state, as shown in logs, `status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Deliveries flow.
    Closed,
    /// Deliveries stopped until the cool-down ends.
    Open,
    /// One probe is allowed through.
    HalfOpen,
}

impl BreakerState {
    /// Lowercase name.
    pub fn as_str(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// As a gauge value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(&self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// What a lane may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Claim a full batch.
    Go,
    /// Claim a one-row probe; report its outcome (or `release_probe` if there was nothing to send).
    Probe,
    /// Do not claim; check again after this long (or when the state changes).
    Wait(Duration),
}

struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    outcomes: VecDeque<(Instant, bool)>,
    open_until: Instant,
    cooldown: Duration,
    probe_taken: bool,
}

/// The breaker.
pub struct Breaker {
    settings: BreakerSettings,
    stats: Arc<RelayStats>,
    inner: Mutex<Inner>,
    changes: watch::Sender<BreakerState>,
}

impl Breaker {
    /// A closed breaker, counting its transitions into `stats`.
    pub fn new(settings: BreakerSettings, stats: Arc<RelayStats>) -> Self {
        let (changes, _) = watch::channel(BreakerState::Closed);
        Self {
            settings,
            stats,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                outcomes: VecDeque::new(),
                open_until: Instant::now(),
                cooldown: settings.cooldown,
                probe_taken: false,
            }),
            changes,
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        let mut inner = self.inner.lock().expect("breaker lock");
        self.refresh(&mut inner);
        inner.state
    }

    /// State changes, for waiting lanes.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.changes.subscribe()
    }

    /// Asks whether a lane may claim.
    pub fn permit(&self) -> Permit {
        let mut inner = self.inner.lock().expect("breaker lock");
        self.refresh(&mut inner);
        match inner.state {
            BreakerState::Closed => Permit::Go,
            BreakerState::Open => Permit::Wait(inner.open_until.saturating_duration_since(Instant::now())),
            BreakerState::HalfOpen if !inner.probe_taken => {
                inner.probe_taken = true;
                Permit::Probe
            }
            BreakerState::HalfOpen => Permit::Wait(Duration::from_millis(200)),
        }
    }

    /// A probe found nothing to send: let another lane probe.
    pub fn release_probe(&self) {
        let mut inner = self.inner.lock().expect("breaker lock");
        inner.probe_taken = false;
    }

    /// A batch (or probe) reached the broker and was acknowledged.
    pub fn on_success(&self) {
        let mut inner = self.inner.lock().expect("breaker lock");
        inner.consecutive_failures = 0;
        self.record(&mut inner, true);
        if inner.state != BreakerState::Closed {
            inner.cooldown = self.settings.cooldown;
            inner.probe_taken = false;
            self.set(&mut inner, BreakerState::Closed);
        }
    }

    /// A batch (or probe) failed because the broker is unhealthy.
    pub fn on_failure(&self) {
        let mut inner = self.inner.lock().expect("breaker lock");
        inner.consecutive_failures += 1;
        self.record(&mut inner, false);
        match inner.state {
            BreakerState::HalfOpen => {
                inner.cooldown = (inner.cooldown * 2).min(self.settings.max_cooldown);
                self.open(&mut inner);
            }
            BreakerState::Closed => {
                let (total, failed) =
                    (inner.outcomes.len() as u32, inner.outcomes.iter().filter(|(_, ok)| !ok).count());
                let rate_trips =
                    total >= self.settings.min_volume && failed as f64 / total as f64 > self.settings.failure_rate;
                if inner.consecutive_failures >= self.settings.failure_threshold || rate_trips {
                    self.open(&mut inner);
                }
            }
            BreakerState::Open => {}
        }
    }

    fn record(&self, inner: &mut Inner, ok: bool) {
        let now = Instant::now();
        inner.outcomes.push_back((now, ok));
        while inner.outcomes.front().is_some_and(|(t, _)| now.duration_since(*t) > self.settings.window) {
            inner.outcomes.pop_front();
        }
    }

    fn open(&self, inner: &mut Inner) {
        // Jitter the cool-down (50% to 150%) so instances do not probe a recovering broker in step.
        let ms = inner.cooldown.as_millis() as u64;
        let jittered = Duration::from_millis(rand::rng().random_range(ms / 2..=ms + ms / 2));
        inner.open_until = Instant::now() + jittered;
        inner.probe_taken = false;
        inner.outcomes.clear();
        tracing::warn!(
            cooldown_ms = jittered.as_millis() as u64,
            consecutive_failures = inner.consecutive_failures,
            "circuit breaker open: the broker is failing; no claims until a probe succeeds"
        );
        self.set(inner, BreakerState::Open);
    }

    fn refresh(&self, inner: &mut Inner) {
        if inner.state == BreakerState::Open && Instant::now() >= inner.open_until {
            self.set(inner, BreakerState::HalfOpen);
        }
    }

    fn set(&self, inner: &mut Inner, state: BreakerState) {
        if inner.state != state {
            tracing::info!(from = inner.state.as_str(), to = state.as_str(), "circuit breaker state change");
            match state {
                BreakerState::Open if inner.state == BreakerState::Closed => {
                    self.stats.breaker_opened.fetch_add(1, Ordering::Relaxed);
                }
                BreakerState::Closed => {
                    self.stats.breaker_closed.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            inner.state = state;
            self.changes.send_replace(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> BreakerSettings {
        BreakerSettings {
            cooldown: Duration::from_millis(40),
            max_cooldown: Duration::from_millis(200),
            ..Default::default()
        }
    }

    // Paused time: the sleeps advance the clock exactly, without waiting.
    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_probes_once_and_closes_on_success() {
        let b = Breaker::new(quick(), Arc::default());
        for _ in 0..4 {
            b.on_failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.permit(), Permit::Wait(_)));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(b.permit(), Permit::Probe);
        assert!(matches!(b.permit(), Permit::Wait(_)), "only one probe at a time");
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(b.permit(), Permit::Probe);
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.permit(), Permit::Go);
    }

    #[test]
    fn opens_on_failure_rate_over_the_window() {
        let b = Breaker::new(BreakerSettings { failure_threshold: 1000, min_volume: 10, ..quick() }, Arc::default());
        for i in 0..20 {
            if i % 3 == 0 {
                b.on_success();
            } else {
                b.on_failure();
                b.on_success(); // breaks the consecutive run; only the rate can trip
                b.on_failure();
            }
            if b.state() == BreakerState::Open {
                return;
            }
        }
        panic!("a failure rate above 50% must open the breaker");
    }
}
