//! The capture requests of a registered connection: `Begin` (a slot, a
//! skip, a wait under policy block, or a stream through the ring),
//! `ChunkFilled` (one ring chunk of a stream), `Captured` (the slot goes to
//! the lane) and `Abort`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpusnap_proto::{BusyPolicy, ErrorKind, ReplyBody};

use crate::metrics::SnapshotOutcome;
use crate::ranks::RankKey;
use crate::server::Daemon;
use crate::server::conn::{
    Activity, Capture, Conn, Handled, StreamCapture, stopping, until_stopping,
};
use crate::server::errors::Refusal;
use crate::store::SnapshotId;

impl Conn {
    pub(super) async fn begin(&mut self, step: u64) -> Handled {
        let (session, activity) = self.registered()?;
        match activity {
            Activity::Idle => {}
            Activity::Capturing(capture) => {
                return Err(Refusal::protocol(format!(
                    "begin of step {step} while step {} is being captured",
                    capture.step()
                )));
            }
            Activity::Lent(_) => {
                return Err(Refusal::protocol(
                    "begin while a restored slot is not released",
                ));
            }
        }
        let core = Arc::clone(&session.core);
        self.refuse_if_stopping()?;
        let job = core.key.job.clone();
        let daemon = Arc::clone(&self.daemon);
        let key = core.key.clone();
        let have = tokio::task::spawn_blocking(move || already_have(&daemon, &key, step))
            .await
            .map_err(|e| self.blocking_failed(&format!("checking step {step}"), e))??;
        if let Some(reason) = have {
            self.daemon
                .metrics
                .count_snapshot(&job, SnapshotOutcome::Skipped);
            return Ok(ReplyBody::Skipped { step, reason });
        }
        let staging = Arc::clone(&core.staging);
        let policy = staging.info().policy;
        let waiting = Instant::now();
        if let Some(slot) = staging.claim_capturing(step) {
            if policy == BusyPolicy::Block {
                self.observe_slot_wait(&job, waiting);
            }
            let index = slot.index();
            self.set_activity(Activity::Capturing(Capture::Slot(slot)));
            return Ok(ReplyBody::Slot { step, slot: index });
        }
        match policy {
            BusyPolicy::Skip => {
                self.daemon
                    .metrics
                    .count_snapshot(&job, SnapshotOutcome::Skipped);
                Ok(ReplyBody::Skipped {
                    step,
                    reason: format!(
                        "every staging slot ({}) is still persisting an earlier step (policy skip)",
                        staging.info().slots
                    ),
                })
            }
            BusyPolicy::Block => {
                let waited = self
                    .wait_for_slot(&staging, || staging.claim_capturing(step))
                    .await;
                self.observe_slot_wait(&job, waiting);
                let slot = waited?;
                let index = slot.index();
                self.set_activity(Activity::Capturing(Capture::Slot(slot)));
                Ok(ReplyBody::Slot { step, slot: index })
            }
            BusyPolicy::Stream => {
                let Some(in_flight) = self.daemon.engine.track(&core.key, step) else {
                    self.daemon
                        .metrics
                        .count_snapshot(&job, SnapshotOutcome::Skipped);
                    return Ok(ReplyBody::Skipped {
                        step,
                        reason: format!("step {step} is already being persisted"),
                    });
                };
                let feed = self
                    .daemon
                    .engine
                    .start_stream(Arc::clone(&core), in_flight)
                    .map_err(|e| Refusal::io("starting the stream thread", &e))?;
                let chunks = staging.info().chunk_count();
                self.daemon
                    .metrics
                    .streamed_snapshots_total
                    .with_label_values(&[job.as_str()])
                    .inc();
                tracing::info!(
                    conn = self.id,
                    job,
                    step,
                    chunks,
                    "every slot busy; streaming the capture through the ring"
                );
                self.set_activity(Activity::Capturing(Capture::Stream(StreamCapture {
                    step,
                    feed,
                    next_seq: 0,
                    chunks,
                })));
                Ok(ReplyBody::Stream { step, chunks })
            }
        }
    }

    fn observe_slot_wait(&self, job: &str, since: Instant) {
        self.daemon
            .metrics
            .slot_wait_seconds
            .with_label_values(&[job])
            .observe(since.elapsed().as_secs_f64());
    }

    pub(super) async fn chunk_filled(&mut self, step: u64, seq: u64) -> Handled {
        let stream = match &mut self.phase {
            super::conn::Phase::Registered(_, Activity::Capturing(Capture::Stream(s))) => s,
            _ => return Err(Refusal::protocol("chunk_filled without a streamed capture")),
        };
        if step != stream.step || seq != stream.next_seq || seq >= stream.chunks {
            return Err(Refusal::protocol(format!(
                "chunk_filled step {step} seq {seq}; expected step {} seq {} of {}",
                stream.step, stream.next_seq, stream.chunks
            )));
        }
        let stopped = || {
            Refusal::new(
                ErrorKind::Storage,
                format!(
                    "the streamed snapshot of step {step} stopped at chunk {seq}; its failed event says why"
                ),
            )
        };
        match stream.feed.filled.try_send(seq) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                return Err(Refusal::protocol("more chunks filled than the ring holds"));
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                drop(self.take_activity());
                return Err(stopped());
            }
        }
        stream.next_seq += 1;
        let mut shutdown = self.daemon.shutdown.subscribe();
        let wait = tokio::select! {
            wait = tokio::time::timeout(crate::persist::STREAM_CHUNK_WAIT, stream.feed.taken.recv()) => wait,
            () = until_stopping(&mut shutdown) => {
                // The stream's source fails as its feed is dropped: nothing
                // of the step is committed.
                drop(self.take_activity());
                return Err(stopping("waited for the stream to take a ring chunk"));
            }
        };
        match wait {
            Ok(Some(taken)) => {
                assert_eq!(taken, seq, "the engine takes ring chunks in order");
                Ok(ReplyBody::ChunkFree { step, seq })
            }
            // The stream failed (its Failed event says why) or stalled.
            Ok(None) | Err(_) => {
                drop(self.take_activity());
                Err(stopped())
            }
        }
    }

    pub(super) fn captured(&mut self, step: u64, capture_ns: u64, stall_ns: u64) -> Handled {
        let core = Arc::clone(&self.registered()?.0.core);
        match self.take_activity() {
            Activity::Capturing(Capture::Slot(slot)) if slot.step() == step => {
                let persisting = slot.into_persisting();
                let Some(in_flight) = self.daemon.engine.track(&core.key, step) else {
                    drop(persisting);
                    return Err(Refusal::new(
                        ErrorKind::Busy,
                        format!("step {step} is already being persisted"),
                    ));
                };
                let (session, _) = self.registered()?;
                session
                    .lane
                    .persist(persisting, in_flight)
                    .map_err(|e| Refusal::lane(&e))?;
            }
            Activity::Capturing(Capture::Stream(stream)) if stream.step == step => {
                if stream.next_seq != stream.chunks {
                    stream.feed.abort();
                    return Err(Refusal::protocol(format!(
                        "captured after {} of {} chunks",
                        stream.next_seq, stream.chunks
                    )));
                }
                // The engine has every chunk; dropping the feed is fine.
            }
            other => {
                self.set_activity(other);
                return Err(Refusal::protocol(format!(
                    "captured for step {step}, which is not being captured"
                )));
            }
        }
        let job = core.key.job.as_str();
        let m = &self.daemon.metrics;
        m.capture_seconds
            .with_label_values(&[job])
            .observe(Duration::from_nanos(capture_ns).as_secs_f64());
        m.stall_seconds
            .with_label_values(&[job])
            .observe(Duration::from_nanos(stall_ns).as_secs_f64());
        Ok(ReplyBody::Accepted { step })
    }

    pub(super) fn abort(&mut self, step: u64, reason: &str) -> Handled {
        let core = Arc::clone(&self.registered()?.0.core);
        match self.take_activity() {
            Activity::Capturing(Capture::Slot(slot)) if slot.step() == step => {
                drop(slot);
                self.daemon
                    .metrics
                    .count_snapshot(&core.key.job, SnapshotOutcome::Aborted);
            }
            Activity::Capturing(Capture::Stream(stream)) if stream.step == step => {
                stream.feed.abort();
                drop(stream);
            }
            other => {
                self.set_activity(other);
                return Err(Refusal::protocol(format!(
                    "abort for step {step}, which is not being captured"
                )));
            }
        }
        tracing::info!(
            conn = self.id,
            step,
            reason,
            "capture aborted by the client"
        );
        Ok(ReplyBody::Aborted { step })
    }
}

/// Why `step` of `key` cannot be captured again, if it cannot: it is in
/// flight, or committed. A storage error while looking is refused with its
/// errno, never taken for "not committed".
pub(super) fn already_have(
    daemon: &Daemon,
    key: &RankKey,
    step: u64,
) -> Result<Option<String>, Refusal> {
    if daemon.ranks.is_in_flight(key, step) {
        return Ok(Some(format!("step {step} is already being persisted")));
    }
    let dir = SnapshotId::new(key.job.clone(), key.rank, step)
        .map_err(|e| Refusal::new(ErrorKind::InvalidRegistration, e.to_string()))?
        .dir(daemon.store.root());
    match daemon.store.storage().metadata(&dir) {
        Ok(Some(_)) => Ok(Some(format!(
            "step {step} is already committed; committed snapshots are never overwritten"
        ))),
        Ok(None) => Ok(None),
        Err(e) => {
            let e = crate::store::StoreError::from(e);
            tracing::error!(%key, step, error = %e, "cannot tell whether the step is committed; refusing the snapshot");
            Err(Refusal::store(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use gpusnap_proto::OsError;

    #[test]
    fn a_storage_error_while_checking_a_step_is_refused_not_taken_for_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.store.root = dir.path().join("root");
        config.metrics.listen = String::new();
        let daemon = Daemon::open(config).expect("daemon");
        assert_eq!(
            daemon.store.job_dirs(),
            crate::store::JobDirs::Claimed,
            "the daemon's commits never make a job directory"
        );
        let key = RankKey::new("j", 0);
        assert_eq!(already_have(&daemon, &key, 1), Ok(None));
        // The rank's directory is a file: looking up its step fails with
        // ENOTDIR (as root too), which must not read as "not committed".
        let job_dir = daemon.store.root().join("j");
        std::fs::create_dir_all(&job_dir).expect("mkdir");
        std::fs::write(job_dir.join("0"), b"not a directory").expect("write");
        let refused = already_have(&daemon, &key, 1).expect_err("refused");
        assert_eq!(refused.kind, ErrorKind::Storage, "{refused:?}");
        assert_eq!(refused.os_error, Some(OsError::from_raw(libc::ENOTDIR)));
        assert!(daemon.ranks.start(&key, 2));
        assert!(
            already_have(&daemon, &key, 2)
                .expect("in flight is known without the disk")
                .is_some_and(|r| r.contains("being persisted"))
        );
    }
}
