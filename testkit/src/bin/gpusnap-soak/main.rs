//! `gpusnap-soak`: a thousand kills on a real file system (`tests/soak`).
//!
//! Several jobs and ranks snapshot concurrently through the real gpusnapd,
//! whose store lives on ext4; each round SIGKILLs the daemon, a trainer, or
//! both, at a random moment or parked exactly at a commit step
//! ([`stoppoint`]), restarts what was killed and checks ([`check`]) that
//! every commit a client was told of (within retention) is listed and
//! holds exactly the bytes its trainer registered, that nothing partial is
//! listed, that staging use is back to zero once no trainer is connected,
//! and that the daemon's descriptors and memory stay within stated bounds.
//!
//! ```text
//! gpusnap-soak run --daemon PATH --store DIR --work DIR [--kills 1000] [--seed S]
//!     [--jobs 2] [--ranks 2] [--keep 3] [--quiesce-every 10] [--max-wait-ms 600]
//!     [--pause-ms 5] [--smoke]
//! gpusnap-soak selftest --daemon PATH --store DIR --work DIR [--seed S]
//! gpusnap-soak trainer --socket PATH --log PATH --job J --rank R --world W --seed S [--pause-ms 5]
//! ```
//!
//! `run` prints the report and exits 1 when any check was violated (the
//! seed to replay is printed with them), 2 when the campaign could not run.
//! `--smoke` is 30 kills with short waits, for CI. `selftest` plants each
//! fault the checks look for and exits 1 unless every one is caught
//! ([`selftest`]). `trainer` is what `run` starts, once per (job, rank).

mod acklog;
mod campaign;
mod check;
mod daemon;
mod disk;
mod fleet;
mod procfs;
mod report;
mod rng;
mod selftest;
mod state;
mod stoppoint;
mod trainer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use campaign::Params;
use trainer::TrainerParams;

/// Most kills, jobs and ranks accepted, so a typo cannot start a run that
/// never ends.
const KILLS_MAX: u64 = 100_000;
const JOBS_MAX: u32 = 16;
const RANKS_MAX: u32 = 16;
/// The kills of `--smoke`.
const SMOKE_KILLS: u64 = 30;

/// Why the command line was refused, or the store cannot be used.
#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("{} is not on ext4 (file system magic {magic:#x}); tests/soak mounts an ext4 image for it", path.display())]
    NotExt4 { path: PathBuf, magic: i64 },
    #[error("statfs {}: {source}", path.display())]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

const USAGE: &str = "gpusnap-soak run --daemon PATH --store DIR --work DIR [--kills N] [--seed S] [--jobs J] [--ranks R] [--keep K] [--quiesce-every Q] [--max-wait-ms M] [--pause-ms P] [--smoke]\n       gpusnap-soak selftest --daemon PATH --store DIR --work DIR [--seed S]\n       gpusnap-soak trainer --socket PATH --log PATH --job J --rank R --world W --seed S [--pause-ms P]";

/// The flags, as (name, value) pairs; `--smoke` takes no value.
fn flags(args: &[String]) -> Result<Vec<(String, String)>, UsageError> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--smoke" {
            out.push((flag.clone(), String::new()));
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| UsageError::Usage(format!("{flag} needs a value\n{USAGE}")))?;
        out.push((flag.clone(), value.clone()));
    }
    Ok(out)
}

fn number(flag: &str, value: &str, max: u64) -> Result<u64, UsageError> {
    let n = value
        .parse::<u64>()
        .map_err(|_| UsageError::Usage(format!("{flag} takes a number, not {value:?}")))?;
    if n > max {
        return Err(UsageError::Usage(format!(
            "{flag} is at most {max}, not {n}"
        )));
    }
    Ok(n)
}

/// An index below `max`.
fn index(flag: &str, value: &str, max: u32) -> Result<u32, UsageError> {
    let n = number(flag, value, u64::from(max.saturating_sub(1)))?;
    u32::try_from(n).map_err(|_| UsageError::Usage(format!("{flag}: {n}")))
}

fn small(flag: &str, value: &str, max: u32) -> Result<u32, UsageError> {
    let n = number(flag, value, u64::from(max))?;
    if n == 0 {
        return Err(UsageError::Usage(format!("{flag} must be at least 1")));
    }
    u32::try_from(n).map_err(|_| UsageError::Usage(format!("{flag}: {n}")))
}

/// A seed from the clock and the pid when none is given.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let low = u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or(0);
    low ^ (u64::from(std::process::id()) << 40)
}

fn parse_run(args: &[String]) -> Result<Params, UsageError> {
    let mut p = Params {
        daemon: PathBuf::new(),
        store: PathBuf::new(),
        work: PathBuf::new(),
        kills: 1000,
        seed: fresh_seed(),
        jobs: 2,
        ranks: 2,
        keep: 3,
        quiesce_every: 10,
        max_wait_ms: 600,
        pause_ms: 5,
        smoke: false,
    };
    let mut kills = None;
    let mut max_wait = None;
    for (flag, value) in flags(args)? {
        match flag.as_str() {
            "--daemon" => p.daemon = PathBuf::from(value),
            "--store" => p.store = PathBuf::from(value),
            "--work" => p.work = PathBuf::from(value),
            "--kills" => kills = Some(number(&flag, &value, KILLS_MAX)?),
            "--seed" => p.seed = number(&flag, &value, u64::MAX)?,
            "--jobs" => p.jobs = small(&flag, &value, JOBS_MAX)?,
            "--ranks" => p.ranks = small(&flag, &value, RANKS_MAX)?,
            "--keep" => p.keep = u64::from(small(&flag, &value, 100)?),
            "--quiesce-every" => p.quiesce_every = number(&flag, &value, KILLS_MAX)?,
            "--max-wait-ms" => max_wait = Some(number(&flag, &value, 60_000)?),
            "--pause-ms" => p.pause_ms = number(&flag, &value, 10_000)?,
            "--smoke" => p.smoke = true,
            _ => return Err(UsageError::Usage(format!("unknown flag {flag}\n{USAGE}"))),
        }
    }
    if p.daemon.as_os_str().is_empty()
        || p.store.as_os_str().is_empty()
        || p.work.as_os_str().is_empty()
    {
        return Err(UsageError::Usage(format!(
            "--daemon, --store and --work are required\n{USAGE}"
        )));
    }
    p.kills = kills.unwrap_or(if p.smoke { SMOKE_KILLS } else { 1000 });
    p.max_wait_ms = max_wait.unwrap_or(if p.smoke { 300 } else { 600 });
    if p.kills == 0 {
        return Err(UsageError::Usage("--kills must be at least 1".to_owned()));
    }
    Ok(p)
}

fn parse_trainer(args: &[String]) -> Result<TrainerParams, UsageError> {
    let mut socket = None;
    let mut log = None;
    let mut job = None;
    let mut rank = None;
    let mut world = None;
    let mut seed = None;
    let mut pause_ms = 5;
    for (flag, value) in flags(args)? {
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value)),
            "--log" => log = Some(PathBuf::from(value)),
            "--job" => job = Some(index(&flag, &value, JOBS_MAX)?),
            "--rank" => rank = Some(index(&flag, &value, RANKS_MAX)?),
            "--world" => world = Some(small(&flag, &value, RANKS_MAX)?),
            "--seed" => seed = Some(number(&flag, &value, u64::MAX)?),
            "--pause-ms" => pause_ms = number(&flag, &value, 10_000)?,
            _ => return Err(UsageError::Usage(format!("unknown flag {flag}\n{USAGE}"))),
        }
    }
    let (Some(socket), Some(log), Some(job), Some(rank), Some(world), Some(seed)) =
        (socket, log, job, rank, world, seed)
    else {
        return Err(UsageError::Usage(USAGE.to_owned()));
    };
    Ok(TrainerParams {
        socket,
        job,
        rank,
        world,
        seed,
        log,
        pause: Duration::from_millis(pause_ms),
    })
}

/// Refuses a store that is not on ext4.
fn require_ext4(path: &std::path::Path) -> Result<(), UsageError> {
    let fs = nix::sys::statfs::statfs(path).map_err(|source| UsageError::Statfs {
        path: path.to_path_buf(),
        source,
    })?;
    if fs.filesystem_type() != nix::sys::statfs::EXT4_SUPER_MAGIC {
        return Err(UsageError::NotExt4 {
            path: path.to_path_buf(),
            magic: fs.filesystem_type().0,
        });
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("trainer") => match parse_trainer(&args[1..]) {
            Ok(p) => match trainer::run(&p) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("gpusnap-soak trainer: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("gpusnap-soak: {e}");
                ExitCode::from(2)
            }
        },
        Some("run") => run(&args[1..]),
        Some("selftest") => selftest(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// What `run` and `selftest` need before they start: the store on ext4,
/// this executable (the trainers), and `GPUSNAP_TESTING=1` for the daemon.
fn prepare(store: &std::path::Path) -> Result<PathBuf, String> {
    let parent = store.parent().unwrap_or(store).to_path_buf();
    let checked = if store.exists() {
        store.to_path_buf()
    } else {
        parent
    };
    require_ext4(&checked).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    // SAFETY: called from `main`'s thread before the campaign or the
    // self-test starts any other thread, so nothing reads the environment
    // while it changes. The daemon accepts its `[testing]` table (the stop
    // points' delays) only with this set.
    unsafe { std::env::set_var("GPUSNAP_TESTING", "1") };
    Ok(exe)
}

fn selftest(args: &[String]) -> ExitCode {
    let mut p = selftest::SelfTestParams {
        daemon: PathBuf::new(),
        store: PathBuf::new(),
        work: PathBuf::new(),
        seed: fresh_seed(),
    };
    let parsed = flags(args).and_then(|flags| {
        for (flag, value) in flags {
            match flag.as_str() {
                "--daemon" => p.daemon = PathBuf::from(value),
                "--store" => p.store = PathBuf::from(value),
                "--work" => p.work = PathBuf::from(value),
                "--seed" => p.seed = number(&flag, &value, u64::MAX)?,
                _ => return Err(UsageError::Usage(format!("unknown flag {flag}\n{USAGE}"))),
            }
        }
        if p.daemon.as_os_str().is_empty()
            || p.store.as_os_str().is_empty()
            || p.work.as_os_str().is_empty()
        {
            return Err(UsageError::Usage(format!(
                "--daemon, --store and --work are required\n{USAGE}"
            )));
        }
        Ok(())
    });
    if let Err(e) = parsed {
        eprintln!("gpusnap-soak: {e}");
        return ExitCode::from(2);
    }
    let exe = match prepare(&p.store) {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("gpusnap-soak: {e}");
            return ExitCode::from(2);
        }
    };
    match selftest::run(&p, exe) {
        Ok(outcome) => {
            for (plant, caught) in &outcome.plants {
                println!(
                    "self-test: {plant}: {}",
                    if *caught { "caught" } else { "NOT CAUGHT" }
                );
            }
            for v in &outcome.clean_state_violations {
                println!("self-test: the clean state reported: {v}");
            }
            if outcome.passed() {
                println!(
                    "self-test: {} planted faults, each caught; the clean state passes",
                    outcome.plants.len()
                );
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("gpusnap-soak: the self-test could not run: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> ExitCode {
    let params = match parse_run(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gpusnap-soak: {e}");
            return ExitCode::from(2);
        }
    };
    let exe = match prepare(&params.store) {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("gpusnap-soak: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "gpusnap-soak: seed {} ({} kills, {} jobs x {} ranks); replay with --seed {}",
        params.seed, params.kills, params.jobs, params.ranks, params.seed
    );
    let seed = params.seed;
    match campaign::run(params, exe) {
        Ok(report) => {
            print!("{}", report.render());
            if report.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("gpusnap-soak: the campaign could not go on: {e} (seed {seed})");
            ExitCode::from(2)
        }
    }
}
