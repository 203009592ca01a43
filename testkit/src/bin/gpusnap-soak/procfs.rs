//! What `/proc` says about the daemon: its open file descriptors, its
//! resident memory, and which of its persist threads are asleep (parked in
//! a `[testing] delays` sleep: the stop point a kill aims at).

use std::path::PathBuf;

/// The sleep system calls `std::thread::sleep` makes, by number.
#[cfg(target_arch = "x86_64")]
const SLEEP_SYSCALLS: [u64; 2] = [35, 230];
#[cfg(target_arch = "aarch64")]
const SLEEP_SYSCALLS: [u64; 2] = [101, 115];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("gpusnap-soak knows the sleep system call numbers of x86_64 and aarch64 only");

/// Name prefixes of the daemon's persist threads (lanes and streams).
const PERSIST_THREADS: [&str; 2] = ["persist-", "stream-"];

/// Why `/proc` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has no {field} line", path.display())]
    Missing { path: PathBuf, field: &'static str },
}

/// One look at the daemon's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub fds: u64,
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

fn io(path: PathBuf) -> impl FnOnce(std::io::Error) -> ProcError {
    move |source| ProcError::Io { path, source }
}

/// The open descriptors and `VmRSS`/`VmHWM` of `pid`.
pub fn usage(pid: u32) -> Result<Usage, ProcError> {
    let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let fds = std::fs::read_dir(&fd_dir).map_err(io(fd_dir.clone()))?;
    let fds = u64::try_from(fds.count()).unwrap_or(u64::MAX);
    let status_path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&status_path).map_err(io(status_path.clone()))?;
    let kib = |field: &'static str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|k| k * 1024)
            .ok_or(ProcError::Missing {
                path: status_path.clone(),
                field,
            })
    };
    Ok(Usage {
        fds,
        rss_bytes: kib("VmRSS:")?,
        hwm_bytes: kib("VmHWM:")?,
    })
}

/// The persist threads of `pid` asleep in a system call only the
/// `[testing]` delays make there, each as (thread id, its voluntary
/// context switches so far): one sleep is one such pair, and the next sleep
/// of the same thread has a higher count. A thread that ends while it is
/// looked at is left out.
pub fn parked_persist_threads(pid: u32) -> Result<Vec<(u32, u64)>, ProcError> {
    let task_dir = PathBuf::from(format!("/proc/{pid}/task"));
    let tasks = std::fs::read_dir(&task_dir).map_err(io(task_dir.clone()))?;
    let mut parked = Vec::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !PERSIST_THREADS.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        let Ok(syscall) = std::fs::read_to_string(dir.join("syscall")) else {
            continue;
        };
        let number = syscall
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok());
        if !number.is_some_and(|n| SLEEP_SYSCALLS.contains(&n)) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(switches) = switches {
            parked.push((tid, switches));
        }
    }
    Ok(parked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_descriptors_and_memory() {
        let u = usage(std::process::id()).expect("usage");
        assert!(u.fds >= 3, "{u:?}");
        assert!(u.rss_bytes > 0 && u.hwm_bytes >= u.rss_bytes, "{u:?}");
    }

    #[test]
    fn a_sleeping_persist_thread_is_seen_parked_and_a_busy_one_is_not() {
        let pid = std::process::id();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sleeper = std::thread::Builder::new()
            .name("persist-test".to_owned())
            .spawn(|| std::thread::sleep(std::time::Duration::from_millis(600)))
            .expect("spawn");
        let spin = std::sync::Arc::clone(&stop);
        let spinner = std::thread::Builder::new()
            .name("stream-test".to_owned())
            .spawn(move || {
                while !spin.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
            .expect("spawn");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let parked = parked_persist_threads(pid).expect("parked");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sleeper.join().expect("join");
        spinner.join().expect("join");
        assert_eq!(parked.len(), 1, "the sleeper, not the spinner: {parked:?}");
        assert!(parked_persist_threads(pid).expect("parked").is_empty());
    }
}
