//! What watches a `load` run while it goes: the daemons' resident memory,
//! sampled from `/proc/<pid>/status` every 100 ms by a thread of its own,
//! and the rule the watchdog applies to every trainer's unanswered request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How often the daemons' VmRSS is read.
pub const RSS_PERIOD: Duration = Duration::from_millis(100);

/// A field of `/proc/<pid>/status` given in kB (`VmRSS`, `VmHWM`), in
/// bytes; `None` when the process or the field is not there.
pub fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&text, field).map(|kib| kib * 1024)
}

/// `field:   1234 kB` from a `/proc/<pid>/status` text, in KiB.
pub fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let kib = words.next()?.parse().ok()?;
        (words.next() == Some("kB")).then_some(kib)
    })
}

/// One process's sampled resident memory.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RssStats {
    /// The largest VmRSS sampled.
    pub max_bytes: u64,
    /// Samples taken (the process was there and had the field).
    pub samples: u64,
}

/// Samples the VmRSS of some processes until stopped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<RssStats>>>,
}

impl RssSampler {
    /// Starts sampling `pids` every [`RSS_PERIOD`].
    pub fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut stats = vec![RssStats::default(); pids.len()];
            while !flag.load(Ordering::Relaxed) {
                let next = Instant::now() + RSS_PERIOD;
                for (pid, s) in pids.iter().zip(stats.iter_mut()) {
                    if let Some(rss) = status_bytes(*pid, "VmRSS") {
                        s.max_bytes = s.max_bytes.max(rss);
                        s.samples += 1;
                    }
                }
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            stats
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread (within one period) and returns each pid's stats,
    /// in the order given to [`RssSampler::start`].
    pub fn finish(mut self) -> Vec<RssStats> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request a trainer announced and has not had answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub since: Instant,
    /// `register`, `snapshot`, `commit`, `restore`.
    pub what: String,
    pub step: u64,
}

/// How long `pending` has gone unanswered at `now`, when that is more than
/// `bound` (the watchdog's rule: more than the bound fails the run).
pub fn overdue(pending: Option<&Pending>, now: Instant, bound: Duration) -> Option<Duration> {
    let waited = now.saturating_duration_since(pending?.since);
    (waited > bound).then_some(waited)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kib() {
        let text = "Name:\tgpusnapd\nVmHWM:\t  204800 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n";
        assert_eq!(parse_status_kib(text, "VmRSS"), Some(10240));
        assert_eq!(parse_status_kib(text, "VmHWM"), Some(204_800));
        assert_eq!(parse_status_kib(text, "Threads"), None, "no kB unit");
        assert_eq!(parse_status_kib(text, "VmSwap"), None);
        assert_eq!(parse_status_kib("VmRSSx: 1 kB\n", "VmRSS"), None);
    }

    #[test]
    fn this_process_has_a_resident_size_and_the_sampler_sees_it() {
        let me = std::process::id();
        let rss = status_bytes(me, "VmRSS").expect("our own VmRSS");
        assert!(rss > 0);
        let sampler = RssSampler::start(vec![me, u32::MAX]);
        std::thread::sleep(RSS_PERIOD * 3);
        let stats = sampler.finish();
        assert!(stats[0].samples >= 1 && stats[0].max_bytes > 0);
        assert_eq!(stats[1].samples, 0, "no such process");
    }

    #[test]
    fn only_a_request_older_than_the_bound_is_overdue() {
        let now = Instant::now();
        let bound = Duration::from_secs(30);
        let at = |ago: u64| Pending {
            since: now - Duration::from_secs(ago),
            what: "snapshot".into(),
            step: 3,
        };
        assert_eq!(overdue(None, now, bound), None);
        assert_eq!(overdue(Some(&at(30)), now, bound), None, "the bound itself");
        assert_eq!(
            overdue(Some(&at(31)), now, bound),
            Some(Duration::from_secs(31))
        );
    }
}
