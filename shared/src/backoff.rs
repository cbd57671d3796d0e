//! Retry pacing, one way for the whole workspace: a delay that starts at `initial`, doubles per
//! failure and stops growing at `max`. The delay is a pure function of the attempt number, so
//! tests assert exact values; callers that need jitter (many nodes cut off together must not
//! return together) pass their own random factor to [`Backoff::jittered`], which keeps `rand`
//! out of `shared` and the jitter-free path deterministic.
//!
//! [`Attempts`] is the counter around it for loops that retry: `next_delay` after a failure,
//! `reset` after a success (or after a connection that stayed healthy long enough).

use std::time::Duration;

/// Exponential delays from `initial`, doubling, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// Doubling stops here: `initial * 2^16` exceeds every cap in use, and the shift stays in range.
const MAX_DOUBLINGS: u32 = 16;

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max }
    }

    /// The delay before retry number `attempt` (0-based): `initial * 2^attempt`, at most `max`.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.initial
            .saturating_mul(1u32 << attempt.min(MAX_DOUBLINGS))
            .min(self.max)
    }

    /// [`delay`](Self::delay) scaled by `factor` (e.g. a random 0.75..=1.25), still at most
    /// `max`. A factor that is not a positive finite number counts as 1.
    pub fn jittered(&self, attempt: u32, factor: f64) -> Duration {
        let factor = if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            1.0
        };
        self.delay(attempt).mul_f64(factor).min(self.max)
    }

    /// A fresh counter over this policy.
    pub fn attempts(self) -> Attempts {
        Attempts {
            policy: self,
            failures: 0,
        }
    }
}

/// Consecutive failures of one retry loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts {
    policy: Backoff,
    failures: u32,
}

impl Attempts {
    /// Count one more failure and return how long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.policy.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// The loop succeeded (or stayed up long enough): the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_from_initial_and_caps() {
        // The node's hub-report pacing: 0.25 s doubling up to 10 s.
        let b = Backoff::new(MS(250), Duration::from_secs(10));
        let got: Vec<Duration> = (0..8).map(|a| b.delay(a)).collect();
        assert_eq!(
            got,
            vec![
                MS(250),
                MS(500),
                MS(1000),
                MS(2000),
                MS(4000),
                MS(8000),
                MS(10_000),
                MS(10_000)
            ]
        );
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10), "no overflow");
    }

    #[test]
    fn jitter_scales_but_never_passes_the_cap() {
        let b = Backoff::new(MS(500), Duration::from_secs(30));
        assert_eq!(b.jittered(0, 0.75), MS(375));
        assert_eq!(b.jittered(1, 1.25), MS(1250));
        assert_eq!(b.jittered(40, 1.25), Duration::from_secs(30));
        assert_eq!(b.jittered(0, f64::NAN), MS(500));
        assert_eq!(b.jittered(0, -1.0), MS(500));
    }

    #[test]
    fn attempts_count_up_and_reset() {
        let mut a = Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).attempts();
        let got: Vec<u64> = (0..7).map(|_| a.next_delay().as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(a.failures(), 7);
        a.reset();
        assert_eq!(a.next_delay(), Duration::from_secs(1));
    }
}
