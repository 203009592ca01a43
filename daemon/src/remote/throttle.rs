//! The upload bandwidth cap: one token bucket shared by every upload of the
//! daemon. A transfer of `n` bytes takes `n / rate` seconds of the bucket's
//! time; the bucket may run ahead of the clock by at most one burst, so
//! after an idle period the next parts go out at once, and over any longer
//! span the average is at most the rate.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A byte-rate limiter; `unlimited` when the rate is 0.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_s: u64,
    burst: Duration,
    /// When the bytes granted so far have all "drained" at the rate.
    drained_at: Mutex<Instant>,
}

impl Throttle {
    /// At most `bytes_per_s` (0: no cap), bursts of `burst_bytes`.
    pub fn new(bytes_per_s: u64, burst_bytes: u64) -> Throttle {
        let burst = if bytes_per_s == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(burst_bytes as f64 / bytes_per_s as f64)
        };
        Throttle {
            bytes_per_s,
            burst,
            drained_at: Mutex::new(Instant::now()),
        }
    }

    /// How long a caller about to send `bytes` at `now` must wait first,
    /// and the bytes are booked.
    pub fn book(&self, bytes: u64, now: Instant) -> Duration {
        if self.bytes_per_s == 0 {
            return Duration::ZERO;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64);
        let mut drained = self
            .drained_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let start = (*drained).max(now);
        *drained = start + cost;
        // The bucket may be ahead of the clock by one burst.
        (start + cost).saturating_duration_since(now + self.burst.max(cost))
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.book(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cap_never_waits() {
        let t = Throttle::new(0, 1 << 20);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(t.book(1 << 30, now), Duration::ZERO);
        }
    }

    #[test]
    fn the_average_rate_is_the_cap_after_one_burst() {
        // 10 MB/s, bursts of 1 MB: 100 MB booked at one instant must wait
        // about 9.9 s for the last megabyte.
        let t = Throttle::new(10_000_000, 1_000_000);
        let now = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..100 {
            let wait = t.book(1_000_000, now);
            assert!(wait >= last, "waits grow as bytes are booked");
            last = wait;
        }
        let expected = Duration::from_secs_f64(9.9);
        assert!(
            last.abs_diff(expected) < Duration::from_millis(5),
            "the last of 100 MB at 10 MB/s waits {last:?}"
        );
        // Once the clock has caught up, the next part goes at once.
        assert_eq!(
            t.book(1_000_000, now + Duration::from_secs(11)),
            Duration::ZERO
        );
    }
}
