//! Retry delays: capped exponential backoff with full jitter.
//!
//! Full jitter, `random(0, min(cap, base * 2^attempt))`, both backs off and spreads the retries of
//! many rows and many instances over the whole interval, so that a recovering broker or database
//! is not hit by a synchronised wave of retries (the thundering herd).

use std::time::Duration;

use rand::Rng;

/// The shape of a backoff: first ceiling and cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// No delay exceeds this.
    pub cap: Duration,
}

impl Backoff {
    /// The ceiling for `attempt` (0-based): `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u64.checked_shl(attempt.min(62)).unwrap_or(u64::MAX);
        let ms = (self.base.as_millis() as u64).saturating_mul(factor);
        Duration::from_millis(ms).min(self.cap)
    }

    /// A delay drawn uniformly from `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_under_the_cap_and_vary() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(5) };
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(10), Duration::from_secs(5));
        assert_eq!(b.ceiling(200), Duration::from_secs(5));
        let draws: Vec<Duration> = (0..200).map(|_| b.delay(6)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(5)));
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 50, "full jitter spreads delays: {} distinct of 200", distinct.len());
    }
}
