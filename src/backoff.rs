//! The one doubling backoff used by every retry loop: Redis connects and commands, acks,
//! dead-letter writes, entry retries and worker restarts.

use std::time::Duration;

/// A delay that doubles with each consecutive failure, from `first` up to `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) const fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            failures: 0,
        }
    }

    /// The delay for Redis retry loops: 100 ms doubling to 5 s.
    pub(crate) const fn redis() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The delay after `failures` consecutive failures (1 = the first): `first * 2^(failures - 1)`,
    /// capped at `max`; zero failures is no delay.
    pub(crate) fn delay_after(first: Duration, max: Duration, failures: u64) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(32) as u32;
        first
            .saturating_mul(2u32.saturating_pow(doublings))
            .min(max)
    }

    /// Counts one more failure and returns the delay to wait before trying again.
    pub(crate) fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Backoff::delay_after(self.first, self.max, u64::from(self.failures))
    }

    /// A success: the next failure waits `first` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_first_to_max() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<u128> = (0..6).map(|_| b.fail().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.fail(), Duration::from_millis(100));
    }

    #[test]
    fn delay_after_is_zero_for_no_failure_and_never_overflows() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(Backoff::delay_after(first, max, 0), Duration::ZERO);
        assert_eq!(Backoff::delay_after(first, max, 1), first);
        assert_eq!(Backoff::delay_after(first, max, 3), Duration::from_secs(4));
        assert_eq!(Backoff::delay_after(first, max, u64::MAX), max);
        let huge = Duration::from_secs(u64::MAX / 4);
        assert_eq!(Backoff::delay_after(huge, Duration::MAX, 40), Duration::MAX);
    }
}
