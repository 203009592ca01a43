//! The few things asked of the OS: process CPU time, dropping the page
//! cache, the file-system type of a directory, and the host's names.

use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// `statfs` magic of tmpfs (linux/magic.h).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// User + system CPU seconds of this process so far, all threads included
/// (`getrusage(RUSAGE_SELF)`).
pub fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the duration of the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    assert_eq!(
        rc, 0,
        "getrusage(RUSAGE_SELF) cannot fail with a valid pointer"
    );
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// `sync`, then drops clean page-cache pages (`echo 1 >
/// /proc/sys/vm/drop_caches`). Needs root; the error says why it failed.
pub fn drop_page_cache() -> io::Result<()> {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"1")
}

/// Whether `dir` lives on tmpfs (memory, where O_DIRECT and disk
/// throughput mean nothing).
pub fn is_tmpfs(dir: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string and `st` a writable statfs,
    // both alive for the duration of the call.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is i64 on x86_64 glibc but narrower on other targets"
    )]
    let f_type = i64::from(st.f_type);
    Ok(f_type == TMPFS_MAGIC)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn mem_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|line| {
        let kib = line
            .strip_prefix("MemAvailable:")?
            .trim()
            .strip_suffix("kB")?;
        kib.trim().parse::<u64>().ok()?.checked_mul(1024)
    })
}

/// The bracketed choice of a /sys/kernel/mm/transparent_hugepage file
/// (`madvise` from `always [madvise] never`), or `unknown`.
pub fn thp_setting(file: &str) -> String {
    let text = proc_line(&format!("/sys/kernel/mm/transparent_hugepage/{file}"));
    text.split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map_or(text.clone(), |(choice, _)| choice.to_owned())
}

/// `uname -n`.
pub fn host() -> String {
    proc_line("/proc/sys/kernel/hostname")
}

/// `uname -r`.
pub fn kernel() -> String {
    proc_line("/proc/sys/kernel/osrelease")
}

fn proc_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Now, UTC, as `2026-11-25T14:03:07Z`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

/// Unix seconds as an RFC 3339 UTC time (days to civil date after Howard
/// Hinnant's `civil_from_days`).
fn utc_from_unix(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Shift the epoch to 0000-03-01 so leap days fall at the end of an era year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_seconds_become_utc_dates() {
        assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_from_unix(1_795_615_387), "2026-11-25T14:03:07Z");
    }

    #[test]
    fn cpu_time_moves_forward() {
        let before = cpu_seconds();
        let mut x = 0u64;
        for i in 0..10_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds() >= before);
    }
}
