//! `gpusnapctl remote`: the S3 remote tier, for operators.
//!
//! * `list`: what the bucket holds per job and step: ranks with a
//!   manifest, data bytes, the `COMPLETE` marker (there, valid), complete
//!   or not ([`list`]).
//! * `verify`: every object of a job's complete steps read back with ranged
//!   GETs and checked against the marker's digests and the manifests' chunk
//!   CRCs ([`verify`]).
//! * `pull`: one rank's snapshot of a complete step downloaded, verified,
//!   into a local store root ([`pull`]).
//! * `push`: local committed snapshots uploaded, then the step's marker
//!   written if every rank is there ([`push`]).
//!
//! Every subcommand reads the bucket, the prefix and the credentials from
//! the daemon's config file (`--config`, the `[remote]` table), through the
//! daemon's own library (`gpusnapd::remote`), so it sees exactly what the
//! daemon sees. Progress bars go to stderr, only when stderr is a terminal
//! and `--json` is not given.

mod list;
mod pull;
mod push;
mod verify;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use gpusnapd::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use gpusnapd::remote::marker::RankEntry;
use gpusnapd::remote::{RemoteConfig, RemoteError, Tier};
use gpusnapd::store::{FormatVersion, Layout, Manifest, SnapshotId, StoreError};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Exit status of a command interrupted by Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;
/// How long an interrupted command waits for the aborts of its unfinished
/// multipart uploads before it exits.
const ABORT_GRACE: Duration = Duration::from_secs(3);

/// The options every remote subcommand takes.
#[derive(Args, Debug)]
pub struct TierArgs {
    /// The daemon's config file; its [remote] table names the endpoint,
    /// bucket, prefix and credentials.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// How long one failing request is retried before the command gives
    /// up, in seconds (the daemon's own remote.retry_deadline_s is for a
    /// background uploader; an operator waits less).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    retry_deadline_s: u64,
}

#[derive(Subcommand, Debug)]
pub enum RemoteCommand {
    /// List the jobs in the bucket, and per step: the ranks with a
    /// manifest, the data bytes, the COMPLETE marker, complete or not.
    List {
        #[command(flatten)]
        tier: TierArgs,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
    },
    /// Read back every object of a job's steps (default: every step with a
    /// COMPLETE marker) and check it against the marker and the manifests'
    /// chunk CRCs; exit 0 only if every object is intact.
    Verify {
        #[command(flatten)]
        tier: TierArgs,
        #[arg(long)]
        job: String,
        /// Only this step.
        #[arg(long)]
        step: Option<u64>,
    },
    /// Download one rank's snapshot of a complete step (default: the
    /// newest) into a local store root, every chunk verified; prints its
    /// directory. The daemon of that root must not be running.
    Pull {
        #[command(flatten)]
        tier: TierArgs,
        #[arg(long)]
        job: String,
        #[arg(long)]
        rank: u32,
        /// The step (default: the newest complete step).
        #[arg(long)]
        step: Option<u64>,
        /// The local store root to download into (created if missing).
        #[arg(long)]
        root: PathBuf,
        /// The uid recorded as the job's owner if the pull creates the
        /// job's directory (default: your uid).
        #[arg(long)]
        owner_uid: Option<u32>,
    },
    /// Upload local committed snapshots the bucket does not have yet
    /// (default: the newest of each rank), then write each step's COMPLETE
    /// marker if every rank of it is there.
    Push {
        #[command(flatten)]
        tier: TierArgs,
        /// The local store root (default: the config's store.root).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Only this rank.
        #[arg(long)]
        rank: Option<u32>,
        /// This step instead of each rank's newest.
        #[arg(long)]
        step: Option<u64>,
    },
}

/// Why a remote subcommand could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Refused(String),
    #[error("{}", tier_message(.endpoint, .bucket, .source))]
    Tier {
        endpoint: String,
        bucket: String,
        #[source]
        source: Box<RemoteError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("interrupted")]
    Interrupted,
}

/// A tier error's message, naming the endpoint and bucket when the error
/// itself does not.
fn tier_message(endpoint: &str, bucket: &str, source: &RemoteError) -> String {
    match source {
        RemoteError::Refused { .. }
        | RemoteError::BucketMissing { .. }
        | RemoteError::Unavailable { .. } => source.to_string(),
        other => format!("remote {endpoint} (bucket {bucket}): {other}"),
    }
}

/// Runs one remote subcommand.
pub fn run(command: &RemoteCommand, json: bool) -> Result<ExitCode, Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gpusnapctl")
        .build()
        .map_err(Error::Runtime)?;
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let out = Output { json };
    let outcome = runtime.block_on(async {
        let work = async {
            match command {
                RemoteCommand::List { tier, job } => {
                    let remote = Remote::open(tier, stopping_rx.clone(), None)?;
                    list::run(&remote, job.as_deref(), out).await
                }
                RemoteCommand::Verify { tier, job, step } => {
                    let remote = Remote::open(tier, stopping_rx.clone(), None)?;
                    verify::run(&remote, job, *step, out).await
                }
                RemoteCommand::Pull {
                    tier,
                    job,
                    rank,
                    step,
                    root,
                    owner_uid,
                } => {
                    let remote = Remote::open(tier, stopping_rx.clone(), None)?;
                    let want = pull::Want {
                        job,
                        rank: *rank,
                        step: *step,
                        root,
                        owner_uid: *owner_uid,
                    };
                    pull::run(&remote, &want, out).await
                }
                RemoteCommand::Push {
                    tier,
                    root,
                    job,
                    rank,
                    step,
                } => {
                    let select = push::Select {
                        job: job.as_deref(),
                        rank: *rank,
                        step: *step,
                    };
                    push::run(tier, root.as_deref(), &select, stopping_rx.clone(), out).await
                }
            }
        };
        tokio::select! {
            result = work => result,
            _ = tokio::signal::ctrl_c() => {
                // Retries end; the dropped transfer aborts its open
                // multipart upload in the background, given a moment.
                let _ = stopping_tx.send(true);
                tokio::time::sleep(ABORT_GRACE).await;
                Err(Error::Interrupted)
            }
        }
    });
    // A download's writer thread ends once its channel closes; not waited
    // for past this.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Err(Error::Interrupted) => {
            eprintln!("gpusnapctl: interrupted");
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
        other => other,
    }
}

/// How results are printed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    pub json: bool,
}

impl Output {
    /// A byte progress bar on stderr of `total` bytes, hidden with `--json`
    /// or when stderr is not a terminal.
    pub fn bytes_bar(self, total: u64, message: impl Into<String>) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(total), self.draw_target());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(message.into());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    /// A spinner on stderr for work of unknown progress (`bytes` known
    /// only as a total), hidden as [`Output::bytes_bar`].
    pub fn spinner(self, message: impl Into<String>) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(None, self.draw_target());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(message.into());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    fn draw_target(self) -> ProgressDrawTarget {
        if self.json || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        }
    }
}

/// The tier of a config's `[remote]` table.
#[derive(Debug)]
pub(crate) struct Remote {
    pub tier: Tier,
    pub config: Config,
}

impl Remote {
    /// Loads `args.config` and opens its tier (no request is sent yet).
    /// `journal_root`: where open multipart uploads are journalled (a store
    /// root), for an upload a kill cuts short to be aborted by the daemon's
    /// next start there.
    pub fn open(
        args: &TierArgs,
        stopping: tokio::sync::watch::Receiver<bool>,
        journal_root: Option<&Path>,
    ) -> Result<Remote, Error> {
        let config = Config::load(&args.config, true)?;
        Remote::with_config(args, config, stopping, journal_root)
    }

    /// As [`Remote::open`], of a config already loaded from `args.config`.
    pub fn with_config(
        args: &TierArgs,
        config: Config,
        stopping: tokio::sync::watch::Receiver<bool>,
        journal_root: Option<&Path>,
    ) -> Result<Remote, Error> {
        let r = &config.remote;
        if !r.enabled {
            return Err(Error::Refused(format!(
                "{}: the remote tier is not enabled ([remote] enabled = false or no [remote] table)",
                args.config.display()
            )));
        }
        let tier = Tier::open(r, None, stopping, journal_root).map_err(|e| tier_error(r, e))?;
        let mut remote = Remote { tier, config };
        remote.tier.bucket = remote
            .tier
            .bucket
            .clone()
            .with_retry_deadline(Duration::from_secs(args.retry_deadline_s));
        Ok(remote)
    }

    /// `e`, naming this tier's endpoint and bucket.
    pub fn error(&self, e: RemoteError) -> Error {
        tier_error(&self.config.remote, e)
    }

    pub fn endpoint(&self) -> &str {
        self.tier.bucket.endpoint()
    }

    pub fn bucket(&self) -> &str {
        self.tier.bucket.name()
    }

    pub fn prefix(&self) -> &str {
        &self.config.remote.prefix
    }
}

fn tier_error(config: &RemoteConfig, source: RemoteError) -> Error {
    Error::Tier {
        endpoint: config.endpoint.clone(),
        bucket: config.bucket.clone(),
        source: Box::new(source),
    }
}

/// Refuses a job name that is not a store's (and so not a key segment).
pub(crate) fn check_job(job: &str) -> Result<(), Error> {
    gpusnapd::store::paths::validate_job(job)
        .map_err(|e| Error::Refused(format!("job {job:?}: {e}")))
}

/// The manifest object of `id`, parsed and checked to describe `id`, with
/// its layout and SHA-256; checked against `expected` (the marker's entry)
/// when given: the daemon's own check, in the format this build writes.
pub(crate) async fn fetch_manifest(
    tier: &Tier,
    id: &SnapshotId,
    expected: Option<&RankEntry>,
) -> Result<(Manifest, Layout, String), RemoteError> {
    gpusnapd::remote::transfer::remote_manifest(tier, FormatVersion::CURRENT, id, expected).await
}

/// Ranks as short ranges: `0-3,5,7-8`; `-` for none.
pub(crate) fn ranks_text(ranks: impl IntoIterator<Item = u32>) -> String {
    let mut ranks: Vec<u32> = ranks.into_iter().collect();
    ranks.sort_unstable();
    ranks.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut iter = ranks.into_iter().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end.wrapping_add(1))) && end != u32::MAX {
            end += 1;
            iter.next();
        }
        parts.push(if end == start {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(",")
    }
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    crate::print_json(value);
}

#[cfg(test)]
mod tests {
    use super::ranks_text;

    #[test]
    fn ranks_print_as_ranges() {
        assert_eq!(ranks_text([]), "-");
        assert_eq!(ranks_text([0]), "0");
        assert_eq!(ranks_text([3, 0, 1, 2, 5, 7, 8]), "0-3,5,7-8");
        assert_eq!(
            ranks_text([u32::MAX, u32::MAX - 1]),
            format!("{}-{}", u32::MAX - 1, u32::MAX)
        );
    }
}
