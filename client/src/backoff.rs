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
    /// Pauses of `start`, doubling up to `max` (at least `start`), until
    /// `deadline`.
    pub fn new(start: Duration, max: Duration, deadline: Instant) -> Backoff {
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
}
