//! The launcher against a fake `gpusnapd`: this same executable, which
//! acts as the daemon when started as `launcher --config PATH` (the
//! launcher's command line). The fake listens on the config's socket and
//! metrics address and obeys a `[fake]` table: exit at start, never
//! listen, exit with a code on SIGTERM, or ignore SIGTERM. So every path
//! of start, stop, kill, restart and drop is driven for real, including
//! the ones the real daemon never takes on purpose.
//!
//! `harness = false`: libtest would refuse the fake's `--config`, so
//! `main` runs the tests itself (a name given on the command line filters).

use std::io::{Read as _, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use gpusnapd_testkit::{Defaults, Launch, LaunchError, SOCKET_PATH_MAX, Settings, Waits};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;

/// What the launcher must not pass on; set in this process before any test.
const INHERITED: [(&str, &str); 2] = [("RUST_LOG", "trace"), ("NOTIFY_SOCKET", "/nowhere")];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, config] = args.as_slice()
        && flag == "--config"
    {
        fake::run(Path::new(config));
    }
    for (name, value) in INHERITED {
        // SAFETY: no other thread exists yet (the tests run after this, on
        // this thread), so nothing reads the environment concurrently.
        unsafe { std::env::set_var(name, value) };
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-'));
    let tests: [(&str, fn()); 10] = [
        (
            "a_daemon_starts_once_its_socket_answers_on_the_settings_it_was_given",
            a_daemon_starts_once_its_socket_answers_on_the_settings_it_was_given,
        ),
        (
            "stop_returns_the_exit_status_and_spawn_starts_it_again_on_the_same_socket",
            stop_returns_the_exit_status_and_spawn_starts_it_again_on_the_same_socket,
        ),
        (
            "a_failing_exit_on_sigterm_is_reported_not_hidden",
            a_failing_exit_on_sigterm_is_reported_not_hidden,
        ),
        (
            "a_daemon_that_ignores_sigterm_is_killed_after_the_deadline_and_grace",
            a_daemon_that_ignores_sigterm_is_killed_after_the_deadline_and_grace,
        ),
        (
            "a_daemon_that_exits_at_start_is_an_error_carrying_its_log",
            a_daemon_that_exits_at_start_is_an_error_carrying_its_log,
        ),
        (
            "a_daemon_that_never_listens_is_killed_when_the_start_wait_ends",
            a_daemon_that_never_listens_is_killed_when_the_start_wait_ends,
        ),
        (
            "dropping_a_running_daemon_kills_and_reaps_it",
            dropping_a_running_daemon_kills_and_reaps_it,
        ),
        (
            "kill_reaps_with_sigkill_and_a_second_spawn_while_running_is_refused",
            kill_reaps_with_sigkill_and_a_second_spawn_while_running_is_refused,
        ),
        (
            "a_deep_scratch_directory_gets_a_short_socket_removed_with_the_daemon",
            a_deep_scratch_directory_gets_a_short_socket_removed_with_the_daemon,
        ),
        (
            "settings_without_a_shutdown_deadline_are_refused_before_anything_runs",
            settings_without_a_shutdown_deadline_are_refused_before_anything_runs,
        ),
    ];
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, test) in tests {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(name);
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ------------------------------------------------------------ the tests

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("testkit-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch dir")
}

/// The test defaults plus `fake` keys (TOML values).
fn settings(fake: &[(&str, &str)]) -> Settings {
    let mut s = Defaults::load().expect("defaults").config;
    for (key, value) in fake {
        s.set_toml("fake", key, value).expect("fake key");
    }
    s
}

fn waits() -> Waits {
    Defaults::load().expect("defaults").waits
}

fn launch(dir: &Path, settings: Settings, waits: Waits) -> Launch {
    Launch::new(&std::env::current_exe().expect("exe"), dir, settings, waits)
}

/// Whether `pid` names a live or unreaped process.
fn exists(pid: u32) -> bool {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, None).is_ok()
}

/// The pid the fake wrote into its log at start.
fn logged_pid(log: &str) -> u32 {
    log.lines()
        .find_map(|l| l.strip_prefix("fake gpusnapd: pid "))
        .expect("the fake logs its pid")
        .trim()
        .parse()
        .expect("a pid")
}

fn a_daemon_starts_once_its_socket_answers_on_the_settings_it_was_given() {
    let dir = scratch();
    let mut s = settings(&[]);
    s.set_toml("staging", "budget_bytes", "\"8MiB\"")
        .expect("override");
    let daemon = launch(dir.path(), s, waits()).start().expect("start");
    assert!(daemon.is_running());
    assert_eq!(daemon.socket(), dir.path().join("gpusnapd.sock"));
    assert_eq!(daemon.root(), dir.path().join("store"));
    assert_eq!(daemon.config_path(), dir.path().join("gpusnapd.toml"));
    assert!(daemon.metrics_addr().starts_with("127.0.0.1:"));
    std::os::unix::net::UnixStream::connect(daemon.socket()).expect("socket answers");

    // The config on disk is the settings, with the endpoints filled in.
    let written: toml::Table =
        toml::from_str(&std::fs::read_to_string(daemon.config_path()).expect("config"))
            .expect("TOML");
    assert_eq!(
        written["daemon"]["socket"].as_str(),
        daemon.socket().to_str()
    );
    assert_eq!(
        written["metrics"]["listen"].as_str(),
        Some(daemon.metrics_addr())
    );
    assert_eq!(written["store"]["root"].as_str(), daemon.root().to_str());
    assert_eq!(written["staging"]["budget_bytes"].as_str(), Some("8MiB"));
    assert_eq!(written["store"]["queue_depth"].as_integer(), Some(16));

    assert_eq!(daemon.metric("fake_up").expect("scrape"), Some(1.0));
    assert_eq!(daemon.metric("fake_down").expect("scrape"), None);
    assert_eq!(daemon.http_get("/nope").expect("get").0, 404);
    let log = daemon.log();
    assert!(log.contains("fake gpusnapd: listening"), "{log}");
    for (name, _) in INHERITED {
        assert!(
            log.contains(&format!("fake gpusnapd: {name} unset")),
            "{log}"
        );
    }
}

fn stop_returns_the_exit_status_and_spawn_starts_it_again_on_the_same_socket() {
    let dir = scratch();
    let mut daemon = launch(dir.path(), settings(&[]), waits())
        .start()
        .expect("start");
    let first = daemon.pid().expect("pid");
    let status = daemon.stop().expect("stop");
    assert!(status.success(), "{status}");
    assert!(!daemon.is_running());
    assert!(!exists(first), "pid {first} reaped");
    assert!(matches!(daemon.stop(), Err(LaunchError::NotRunning)));

    daemon.spawn().expect("start again");
    let second = daemon.pid().expect("pid");
    assert_ne!(first, second);
    std::os::unix::net::UnixStream::connect(daemon.socket()).expect("socket answers");
    assert!(daemon.stop().expect("stop").success());
    assert_eq!(
        daemon.log().matches("fake gpusnapd: listening").count(),
        2,
        "one log, appended"
    );
}

fn a_failing_exit_on_sigterm_is_reported_not_hidden() {
    let dir = scratch();
    let mut daemon = launch(dir.path(), settings(&[("exit_on_sigterm", "3")]), waits())
        .start()
        .expect("start");
    let status = daemon.stop().expect("stop");
    assert_eq!(status.code(), Some(3));
}

fn a_daemon_that_ignores_sigterm_is_killed_after_the_deadline_and_grace() {
    let dir = scratch();
    let mut s = settings(&[("ignore_sigterm", "true")]);
    s.set_toml("daemon", "shutdown_deadline_s", "0")
        .expect("deadline");
    let waits = Waits {
        stop_grace: Duration::from_millis(300),
        ..waits()
    };
    let mut daemon = launch(dir.path(), s, waits).start().expect("start");
    let pid = daemon.pid().expect("pid");
    let t = Instant::now();
    match daemon.stop() {
        Err(LaunchError::StopTimeout { limit, .. }) => {
            assert_eq!(limit, Duration::from_millis(300));
        }
        other => panic!("stop of a daemon ignoring SIGTERM: {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(!daemon.is_running());
    assert!(!exists(pid), "pid {pid} killed and reaped");
}

fn a_daemon_that_exits_at_start_is_an_error_carrying_its_log() {
    let dir = scratch();
    match launch(dir.path(), settings(&[("exit_at_start", "7")]), waits()).start() {
        Err(LaunchError::ExitedAtStart { status, log }) => {
            assert_eq!(status.code(), Some(7));
            assert!(log.contains("fake gpusnapd: exiting at start"), "{log}");
        }
        other => panic!("a daemon exiting at start: {other:?}"),
    }
}

fn a_daemon_that_never_listens_is_killed_when_the_start_wait_ends() {
    let dir = scratch();
    let waits = Waits {
        start: Duration::from_millis(500),
        ..waits()
    };
    match launch(dir.path(), settings(&[("never_listen", "true")]), waits).start() {
        Err(LaunchError::StartTimeout { wait, log, .. }) => {
            assert_eq!(wait, Duration::from_millis(500));
            let pid = logged_pid(&log);
            assert!(!exists(pid), "pid {pid} killed and reaped");
        }
        other => panic!("a daemon that never listens: {other:?}"),
    }
}

fn dropping_a_running_daemon_kills_and_reaps_it() {
    let dir = scratch();
    let daemon = launch(dir.path(), settings(&[("ignore_sigterm", "true")]), waits())
        .start()
        .expect("start");
    let pid = daemon.pid().expect("pid");
    assert!(exists(pid));
    drop(daemon);
    assert!(!exists(pid), "pid {pid} left behind");
}

fn kill_reaps_with_sigkill_and_a_second_spawn_while_running_is_refused() {
    let dir = scratch();
    let mut daemon = launch(dir.path(), settings(&[]), waits())
        .start()
        .expect("start");
    let pid = daemon.pid().expect("pid");
    assert!(matches!(
        daemon.spawn(),
        Err(LaunchError::AlreadyRunning { pid: p }) if p == pid
    ));
    let status = daemon.kill().expect("kill");
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    assert!(!exists(pid));
    daemon.spawn().expect("start again on the same root");
    assert!(daemon.stop().expect("stop").success());
}

fn a_deep_scratch_directory_gets_a_short_socket_removed_with_the_daemon() {
    let dir = scratch();
    let deep: PathBuf = dir.path().join("d".repeat(SOCKET_PATH_MAX));
    std::fs::create_dir(&deep).expect("mkdir");
    let daemon = launch(&deep, settings(&[]), waits())
        .start()
        .expect("start");
    let socket = daemon.socket().to_path_buf();
    assert!(!socket.starts_with(&deep), "{}", socket.display());
    assert!(socket.as_os_str().len() <= SOCKET_PATH_MAX);
    std::os::unix::net::UnixStream::connect(&socket).expect("socket answers");
    let parent = socket.parent().expect("parent").to_path_buf();
    drop(daemon);
    assert!(!parent.exists(), "{} left behind", parent.display());
}

fn settings_without_a_shutdown_deadline_are_refused_before_anything_runs() {
    let dir = scratch();
    match launch(dir.path(), Settings::default(), waits()).start() {
        Err(LaunchError::Settings(e)) => {
            assert!(e.to_string().contains("daemon.shutdown_deadline_s"), "{e}");
        }
        other => panic!("settings without a deadline: {other:?}"),
    }
    assert!(!dir.path().join("gpusnapd.toml").exists());
}

// ------------------------------------------------------------ the fake

mod fake {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Serves until SIGTERM; never returns.
    pub fn run(config: &Path) -> ! {
        let text = std::fs::read_to_string(config).expect("fake: config");
        let config: toml::Table = toml::from_str(&text).expect("fake: TOML");
        let fake = config.get("fake").and_then(toml::Value::as_table);
        let key = |k: &str| fake.and_then(|t| t.get(k));
        eprintln!("fake gpusnapd: pid {}", std::process::id());
        for (name, _) in INHERITED {
            if std::env::var_os(name).is_none() {
                eprintln!("fake gpusnapd: {name} unset");
            }
        }
        if let Some(code) = key("exit_at_start").and_then(toml::Value::as_integer) {
            eprintln!("fake gpusnapd: exiting at start");
            std::process::exit(i32::try_from(code).expect("exit code"));
        }
        // SIGTERM stays blocked: ignored, or taken by `sigwait` below.
        let mut term = SigSet::empty();
        term.add(Signal::SIGTERM);
        term.thread_block().expect("fake: block SIGTERM");
        if key("never_listen").and_then(toml::Value::as_bool) == Some(true) {
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        if key("ignore_sigterm").and_then(toml::Value::as_bool) != Some(true) {
            let code = key("exit_on_sigterm")
                .and_then(toml::Value::as_integer)
                .map_or(0, |c| i32::try_from(c).expect("exit code"));
            std::thread::spawn(move || {
                term.wait().expect("fake: sigwait");
                eprintln!("fake gpusnapd: SIGTERM, exiting with {code}");
                std::process::exit(code);
            });
        }
        let string = |table: &str, k: &str| {
            config[table][k]
                .as_str()
                .expect("fake: a string key")
                .to_owned()
        };
        let socket = PathBuf::from(string("daemon", "socket"));
        let _ = std::fs::remove_file(&socket);
        let metrics = std::net::TcpListener::bind(string("metrics", "listen")).expect("fake: bind");
        std::thread::spawn(move || {
            for conn in metrics.incoming() {
                serve_http(conn.expect("fake: accept"));
            }
        });
        let listener = UnixListener::bind(&socket).expect("fake: bind socket");
        eprintln!("fake gpusnapd: listening on {}", socket.display());
        for conn in listener.incoming() {
            drop(conn.expect("fake: accept"));
        }
        unreachable!("incoming() never ends");
    }

    fn serve_http(mut conn: std::net::TcpStream) {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            if conn.read_exact(&mut byte).is_err() {
                return;
            }
            request.extend_from_slice(&byte);
        }
        let request = String::from_utf8_lossy(&request);
        let reply = if request.starts_with("GET /metrics ") {
            let body = "# HELP fake_up the fake is up\nfake_up 1\n";
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned()
        };
        let _ = conn.write_all(reply.as_bytes());
    }
}
