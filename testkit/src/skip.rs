//! Root-only and CUDA tests: run where they can, fail where skipping is
//! forbidden, and otherwise skip in a way that is counted.
//!
//! The protocol (the Python conftest follows it too): when not root, with
//! `GPUSNAP_REQUIRE_ROOT=1` the test panics; otherwise it prints
//! `skipped: <reason>` to stderr and, when `GPUSNAP_SKIP_LOG` names a file,
//! appends the line `<test name>\t<reason>` to it, and returns. `tests/run`
//! runs as root, sets both and counts the log's lines. A CUDA test without
//! a usable driver does the same under its own switch,
//! `GPUSNAP_REQUIRE_CUDA=1`, which `tests/run` sets where it built the
//! project's CUDA driver double and a GPU machine's suite sets always.

use std::io::Write as _;
use std::path::Path;

/// Set to `1`: a root-only test that is not root fails instead of skipping.
pub const REQUIRE_ROOT_ENV: &str = "GPUSNAP_REQUIRE_ROOT";
/// A file every skip appends one line to.
pub const SKIP_LOG_ENV: &str = "GPUSNAP_SKIP_LOG";
/// Set to `1`: a CUDA test without a usable CUDA driver fails instead of
/// skipping.
pub const REQUIRE_CUDA_ENV: &str = "GPUSNAP_REQUIRE_CUDA";

/// What a root-only test does here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Run,
    Fail,
    Skip,
}

fn verdict(is_root: bool, required: bool) -> Verdict {
    match (is_root, required) {
        (true, _) => Verdict::Run,
        (false, true) => Verdict::Fail,
        (false, false) => Verdict::Skip,
    }
}

/// Whether `GPUSNAP_REQUIRE_ROOT` asks for root; a value other than `1`,
/// `0` or empty is a mistake worth stopping for.
fn root_required(value: Option<&std::ffi::OsStr>) -> bool {
    required(REQUIRE_ROOT_ENV, value)
}

/// Whether switch `name` (with `value`) forbids skipping.
fn required(name: &str, value: Option<&std::ffi::OsStr>) -> bool {
    match value.map(|v| v.to_str()) {
        None => false,
        Some(Some("1")) => true,
        Some(Some("0" | "")) => false,
        Some(other) => {
            panic!("{name}={other:?}: set it to 1, or 0 (or leave it unset)")
        }
    }
}

/// For a test that needs a CUDA device: true when `unavailable` is `None`
/// (a device is usable), so the test goes on. Otherwise (`unavailable`
/// says why not: no driver, no device, a driver too old) it fails the
/// test under `GPUSNAP_REQUIRE_CUDA=1`, or records the skip and returns
/// false: the caller returns then.
#[track_caller]
pub fn cuda_or_skip(unavailable: Option<&str>) -> bool {
    let Some(reason) = unavailable else {
        return true;
    };
    if required(
        REQUIRE_CUDA_ENV,
        std::env::var_os(REQUIRE_CUDA_ENV).as_deref(),
    ) {
        panic!("needs a CUDA device, and {REQUIRE_CUDA_ENV}=1 forbids skipping: {reason}");
    }
    let log = std::env::var_os(SKIP_LOG_ENV);
    record_skip(
        &test_name(),
        &format!("no CUDA device: {reason}"),
        log.as_deref().map(Path::new),
    );
    false
}

/// True when this process is root, so the root-only test that calls it
/// can go on. Otherwise it fails the test (panics) under
/// `GPUSNAP_REQUIRE_ROOT=1`, or records the skip (stderr, and the
/// `GPUSNAP_SKIP_LOG` file) and returns false: the caller returns then.
/// `reason` says what needs root ("mounting a small tmpfs").
#[track_caller]
pub fn root_or_skip(reason: &str) -> bool {
    let is_root = nix::unistd::geteuid().is_root();
    match verdict(
        is_root,
        root_required(std::env::var_os(REQUIRE_ROOT_ENV).as_deref()),
    ) {
        Verdict::Run => true,
        Verdict::Fail => {
            panic!("needs root, and {REQUIRE_ROOT_ENV}=1 forbids skipping: {reason}")
        }
        Verdict::Skip => {
            let log = std::env::var_os(SKIP_LOG_ENV);
            record_skip(&test_name(), reason, log.as_deref().map(Path::new));
            false
        }
    }
}

/// The running test's name: libtest names each test's thread after it.
fn test_name() -> String {
    std::thread::current()
        .name()
        .map_or_else(|| "<unnamed thread>".to_owned(), str::to_owned)
}

/// Prints the skip and appends it to `log`; a log that cannot be written
/// fails the test, since the skip would go uncounted.
fn record_skip(test: &str, reason: &str, log: Option<&Path>) {
    eprintln!("skipped: {reason}");
    let Some(log) = log else {
        return;
    };
    let line = format!("{test}\t{}\n", reason.replace(['\t', '\n'], " "));
    // One write of one short line on an O_APPEND file: lines from tests
    // running at once do not interleave.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .unwrap_or_else(|e| panic!("{SKIP_LOG_ENV}={}: {e}", log.display()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn root_runs_and_anyone_else_fails_or_skips_as_required() {
        assert_eq!(verdict(true, true), Verdict::Run);
        assert_eq!(verdict(true, false), Verdict::Run);
        assert_eq!(verdict(false, true), Verdict::Fail);
        assert_eq!(verdict(false, false), Verdict::Skip);
    }

    #[test]
    fn only_one_requires_root() {
        assert!(!root_required(None));
        assert!(!root_required(Some(OsStr::new(""))));
        assert!(!root_required(Some(OsStr::new("0"))));
        assert!(root_required(Some(OsStr::new("1"))));
    }

    #[test]
    fn a_usable_cuda_device_runs_without_a_word() {
        assert!(cuda_or_skip(None));
    }

    #[test]
    #[should_panic(expected = "GPUSNAP_REQUIRE_ROOT=Some(\"yes\")")]
    fn another_value_of_require_root_is_refused() {
        root_required(Some(OsStr::new("yes")));
    }

    #[test]
    fn a_skip_appends_one_line_naming_the_test_and_its_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("skips.log");
        record_skip("a::b", "mounting\ta tmpfs", Some(&log));
        record_skip("c", "switching uids", Some(&log));
        record_skip("d", "not logged", None);
        assert_eq!(
            std::fs::read_to_string(&log).expect("log"),
            "a::b\tmounting a tmpfs\nc\tswitching uids\n"
        );
    }

    #[test]
    fn the_test_name_is_the_thread_libtest_runs_it_on() {
        assert_eq!(
            test_name(),
            "skip::tests::the_test_name_is_the_thread_libtest_runs_it_on"
        );
    }

    #[test]
    fn root_runs_here_or_the_skip_is_recorded() {
        // Whichever this process is, the answer matches geteuid (and under
        // GPUSNAP_REQUIRE_ROOT=1 a non-root run panics here, as it should).
        assert_eq!(
            root_or_skip("checking the protocol"),
            nix::unistd::geteuid().is_root()
        );
    }
}
