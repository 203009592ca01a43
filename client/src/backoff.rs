//! The client's one way to wait between retries: pauses that start at
//! `start` and double up to `max`, never past `deadline`.
//!
//! Retries nest (a registration refused as busy reconnects, a reconnect
//! retries a missing socket, the handshake retries a reset), so each loop
//! is handed its caller's deadline rather than starting a fresh bound of
//! its own: a registration retries for at most its one bound, not the sum
//! of every level's (the replies of the try in progress have their own
//! bound, the call timeout).

use std::time::{Duration, Instant};

/// Pauses for one retry loop (`Backoff { start, max, deadline }`; `next`
/// is the pause to come).
#[derive(Debug, Clone)]
pub struct Backoff {
    max: Duration,
    deadline: Instant,
    next: Duration,
}

impl Backoff {
    /// The shortest pause: a `start` below it is raised to it, so that a
    /// zero start never turns the loop into a busy spin until the deadline.
    pub const PAUSE_MIN: Duration = Duration::from_millis(1);

    /// Pauses of `start` (at least [`Backoff::PAUSE_MIN`]), doubling up to
    /// `max` (at least `start`), until `deadline`.
    pub fn new(start: Duration, max: Duration, deadline: Instant) -> Backoff {
        let start = start.max(Self::PAUSE_MIN);
        Backoff {
            max: max.max(start),
            deadline,
            next: start,
        }
    }

    /// When retrying stops.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The next pause, cut to what is left before the deadline (so the last
    /// try happens at the deadline); `None` once it has passed.
    pub fn next_pause(&mut self) -> Option<Duration> {
        let left = self.deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        let pause = self.next.min(left);
        self.next = (self.next * 2).min(self.max);
        Some(pause)
    }

    /// Sleeps the next pause and returns true, or returns false at once
    /// when the deadline has passed (time to give up).
    pub fn pause(&mut self) -> bool {
        match self.next_pause() {
            Some(pause) => {
                std::thread::sleep(pause);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_max_and_stop_at_the_deadline() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(5), ms(20), Instant::now() + Duration::from_secs(60));
        let pauses: Vec<Duration> = (0..5).map(|_| b.next_pause().expect("before")).collect();
        assert_eq!(pauses, vec![ms(5), ms(10), ms(20), ms(20), ms(20)]);

        // The last pause is cut to the deadline; after it there is none.
        let mut b = Backoff::new(ms(40), ms(40), Instant::now() + ms(60));
        let started = Instant::now();
        assert!(b.pause());
        assert!(b.pause(), "a cut pause to the deadline");
        let took = started.elapsed();
        assert!(took >= ms(60) && took < ms(60) + ms(500), "{took:?}");
        assert!(!b.pause(), "past the deadline");
        assert!(b.expired());

        let mut past = Backoff::new(ms(1), ms(1), Instant::now());
        assert_eq!(past.next_pause(), None);
    }

    #[test]
    fn a_zero_start_pauses_at_least_a_millisecond_and_still_doubles() {
        let ms = Duration::from_millis;
        let far = Instant::now() + Duration::from_secs(60);
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO, far);
        let pauses: Vec<Duration> = (0..3).map(|_| b.next_pause().expect("before")).collect();
        assert_eq!(pauses, vec![ms(1), ms(1), ms(1)], "max is at least start");
        let mut b = Backoff::new(Duration::ZERO, ms(4), far);
        let pauses: Vec<Duration> = (0..4).map(|_| b.next_pause().expect("before")).collect();
        assert_eq!(pauses, vec![ms(1), ms(2), ms(4), ms(4)]);
        // Against a near deadline, a zero start sleeps instead of spinning:
        // about 50 pauses of 1 ms or more, not millions of tries.
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO, Instant::now() + ms(50));
        let mut tries = 0;
        while b.pause() {
            tries += 1;
        }
        assert!((1..=60).contains(&tries), "{tries} tries in 50 ms");
    }
}
