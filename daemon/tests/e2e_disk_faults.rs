//! Real disk faults under the real daemon, each while it runs: the
//! snapshot being written fails with a clear, typed error, what was
//! committed stays listed, verified and restorable, the daemon keeps
//! serving, and once the fault is gone snapshots commit again without a
//! restart (save after an ext4 abort, below). Root only for the three
//! that make a small ext4 file system in an image file and loop-mount it
//! as the store's disk (unmounted by a guard however the test ends;
//! `mount -o loop` detaches the loop device once the file system lets go
//! of it).
//!
//! * **Full mid-snapshot** (`ENOSPC`): after a snapshot commits, a filler
//!   file leaves less room than the next one needs, twice: first less than
//!   its data file (the `fallocate` that reserves it fails), then room for
//!   the data file but not its manifest (the data is written and synced,
//!   then the manifest's write fails). Each time the trainer is told
//!   (`SnapshotFailed`, kind `Storage`, `os_error` `ENOSPC`, the file named),
//!   nothing of the failed step is left or listed, the committed snapshot
//!   still lists, verifies and restores byte for byte, and the daemon
//!   answers. With the filler gone the next snapshot commits, on the same
//!   daemon and connection.
//! * **Remounted read-only mid-run** (`EROFS`): `mount -o remount,ro` of
//!   the store's file system between two snapshots (the kernel refuses it,
//!   `EBUSY`, while a file is open for writing, so it is done while no
//!   persist runs: the daemon holds only its directory descriptors then).
//!   The next snapshot and a new job's claim fail with `EROFS`; the
//!   committed snapshots restore, the newest from the hot tier and an older
//!   one from the read-only disk. `remount,rw`, and the failed step is
//!   snapshotted again and commits.
//! * **Made read-only by the kernel mid-write** (`EROFS`): while step 2's
//!   data file is open for writing (its fdatasync slowed by the test-only
//!   latency backend, so the window is certain), an ext4 error as a bad
//!   write raises it (`/sys/fs/ext4/<dev>/trigger_fs_error`): the journal
//!   aborts and the file system goes read-only with the file open. The
//!   snapshot fails (`EROFS`, at the data write or its fdatasync, naming
//!   the file), step 1 still restores and verifies, the daemon answers. An
//!   aborted ext4 cannot be remounted writable; it must be unmounted and
//!   checked, and the daemon holds the store root open, so this one fault
//!   is undone by a stop, `e2fsck` and a start: start-up recovery removes
//!   what step 2 left, step 1 restores from disk, the next step commits.
//! * **The store's directory removed** (`rm -rf`, as an operator might):
//!   first the whole root. The next snapshot fails naming the removed root
//!   (`ENOENT`), and so do a listing, a restore and a new registration:
//!   nothing says "no snapshots" while the store is gone, since a trainer
//!   told that starts over. The daemon keeps answering `status`. Once the
//!   directory is made again the daemon uses it (the storage layer reopens
//!   a root whose held descriptor was removed, `storage/root.rs`); it is
//!   empty, so the disk, which decides what exists, has no snapshot (the
//!   hot tier's copy of a snapshot removed from disk is never restored:
//!   listing and restore agree), and the job's claim is gone with its
//!   directory: a commit fails (`JobMissing`, naming the job's directory)
//!   until the trainer registers again, which claims the job anew, and then
//!   snapshots commit. Then only the job's directory is removed, with the
//!   same outcome.
//!
//! Each test prints how long it took; the file runs in well under a minute.

mod daemon;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use daemon::{Daemon, State, client, dir_names, snapshot_committed, verify_all, wait_rank_free};
use gpusnap::proto::{ErrorKind, OsError, RestoreSource};
use gpusnap::{Error, SnapshotOutcome, Step};

/// Bytes of a file system block of the test disks (`mkfs.ext4 -b`).
const BLOCK: u64 = 4096;

/// A small ext4 file system in an image file, loop-mounted; unmounted
/// (lazily, so a straggling descriptor cannot make it fail) when dropped,
/// before its scratch directory goes.
struct LoopDisk {
    image: PathBuf,
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDisk {
    /// A fresh `mib` MiB ext4 (4 KiB blocks, none reserved for root, so
    /// the daemon, root here, gets no more than [`LoopDisk::free_blocks`]).
    fn new(mib: u64) -> LoopDisk {
        let dir = daemon::scratch();
        let image = dir.path().join("disk.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mkdir mount point");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .expect("image file");
        run(
            "mkfs.ext4",
            &["-F", "-q", "-b", "4096", "-m", "0"],
            &[&image],
        );
        let disk = LoopDisk {
            image,
            mount,
            _dir: dir,
        };
        disk.mount();
        disk
    }

    /// Mounts the image, read-only on the first file system error.
    fn mount(&self) {
        run(
            "mount",
            &["-o", "loop,errors=remount-ro"],
            &[&self.image, &self.mount],
        );
    }

    /// A file system error as the kernel raises it on a bad write (ext4's
    /// `trigger_fs_error`): the journal aborts and, with
    /// `errors=remount-ro`, the file system goes read-only at once, files
    /// open for writing or not. Only an unmount undoes it.
    fn fail_like_a_bad_write(&self) {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.mount)
            .output()
            .expect("findmnt");
        let source = String::from_utf8(out.stdout).expect("utf-8");
        let device = Path::new(source.trim())
            .file_name()
            .expect("the loop device");
        let trigger = Path::new("/sys/fs/ext4")
            .join(device)
            .join("trigger_fs_error");
        std::fs::write(&trigger, "gpusnap e2e: a bad write").expect("trigger_fs_error");
    }

    /// Unmounts, repairs (`e2fsck -fy`: 0 or 1, errors corrected) and
    /// mounts again.
    fn repair(&self) {
        run("umount", &[], &[&self.mount]);
        let fsck = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(&self.image)
            .output()
            .expect("e2fsck");
        assert!(
            matches!(fsck.status.code(), Some(0 | 1)),
            "e2fsck: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        self.mount();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mount.join(name)
    }

    /// `mount -o remount,<how>` of the file system.
    fn remount(&self, how: &str) {
        run("mount", &["-o", &format!("remount,{how}")], &[&self.mount]);
    }

    /// Blocks a new file can still get: `f_bavail`, which leaves out
    /// ext4's reserve for metadata (2% of the disk, at most 4096 blocks)
    /// that `f_bfree` counts.
    fn free_blocks(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.mount).expect("statvfs");
        assert_eq!(st.fragment_size(), BLOCK, "the disk's block size");
        st.blocks_available()
    }

    /// Fills the disk with files under `filler/` until exactly `free`
    /// blocks are left: one reservation of what should leave that, then
    /// (should it have cost fewer blocks) one block at a time.
    fn leave_free(&self, free: u64) {
        let dir = self.path("filler");
        std::fs::create_dir_all(&dir).expect("mkdir filler");
        let now = self.free_blocks();
        assert!(now > free + 1, "{now} blocks free, {free} wanted");
        reserve(&dir.join("big"), (now - free - 1) * BLOCK);
        for i in 0..64 {
            let now = self.free_blocks();
            if now <= free {
                break;
            }
            reserve(&dir.join(format!("block-{i}")), BLOCK);
        }
        assert_eq!(self.free_blocks(), free, "the filler leaves exactly that");
    }

    /// Removes the filler.
    fn clear_filler(&self) {
        std::fs::remove_dir_all(self.path("filler")).expect("remove the filler");
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// A new file of `bytes`, its blocks allocated.
fn reserve(path: &Path, bytes: u64) {
    let file = std::fs::File::create_new(path).expect("filler file");
    let len = i64::try_from(bytes).expect("length");
    nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, len)
        .expect("fallocate filler");
}

/// Runs `program` with `flags` then `paths`; panics unless it succeeds.
fn run(program: &str, flags: &[&str], paths: &[&Path]) {
    let out = Command::new(program)
        .args(flags)
        .args(paths)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {flags:?} {paths:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Snapshots `step`, which is captured and then fails: its kind, OS error
/// and message.
fn snapshot_fails(c: &mut gpusnap::Client, step: u64) -> (ErrorKind, Option<OsError>, String) {
    assert!(matches!(
        c.snapshot(step).expect("captured"),
        SnapshotOutcome::Captured(_)
    ));
    match c.wait_committed(step) {
        Err(Error::SnapshotFailed {
            step: failed,
            kind,
            os_error,
            message,
        }) => {
            assert_eq!(failed, step);
            (kind, os_error, message)
        }
        other => panic!("step {step} should fail: {other:?}"),
    }
}

/// Restores `step` into `state` (zeroed first) and checks every byte
/// against `fill(seed)`; where it came from.
fn restores(c: &mut gpusnap::Client, state: &State, step: Step, seed: u64) -> RestoreSource {
    state.zero();
    let r = c
        .restore(step)
        .expect("restore")
        .unwrap_or_else(|| panic!("a snapshot for {step:?}"));
    assert_eq!(r.step, seed, "restored step");
    assert_eq!(state.differs_from(seed), None, "bytes of step {seed}");
    r.source
}

/// The steps the daemon lists for `job`.
fn listed(c: &mut gpusnap::Client, job: &str) -> Vec<u64> {
    c.list_job(Some(job))
        .expect("list")
        .snapshots
        .iter()
        .map(|s| s.step)
        .collect()
}

/// A first registration of `job` (made at its first snapshot), which
/// claims the job and fails: the OS error and message.
fn claim_fails(daemon: &Daemon, job: &str) -> (Option<OsError>, String) {
    let mut c = client(daemon, job, 0, 1);
    let t = gpusnap::HostTensor::zeros(gpusnap::Dtype::U8, [4096]).expect("tensor");
    c.register_host("t", &t).expect("register");
    match c.snapshot(1) {
        Err(Error::Storage { os_error, message }) => (os_error, message),
        other => panic!("registering {job}: {other:?}"),
    }
}

/// The daemon answers `status`, and settles with nothing in flight (a
/// failed step's in-flight mark goes just after its `Failed` event) and
/// no staging held beyond the live registrations'.
fn answers(daemon: &Daemon) {
    daemon::staging_settled(daemon);
}

fn done(test: &str, started: Instant) {
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_disk_filled_mid_snapshot_fails_that_snapshot_and_recovers_when_emptied() {
    if !gpusnapd_testkit::root_or_skip("loop-mounting a small ext4 needs root (CI runs as root)") {
        return;
    }
    daemon::allow_testing_table();
    let started = Instant::now();
    let disk = LoopDisk::new(96);
    let root = disk.path("store");
    let daemon = Daemon::start_with_root(daemon::scratch(), root.clone(), &[]);
    let state = State::new(6, 8 << 20);
    let mut c = client(&daemon, "full", 0, 1);
    state.register(&mut c);
    state.fill(1);
    snapshot_committed(&mut c, 1);
    let rank_dir = root.join("full").join("0");
    let data = std::fs::metadata(rank_dir.join("step-1").join("state.safetensors"))
        .expect("step 1's data file");
    let data_blocks = data.len().div_ceil(BLOCK);

    // Less room than the data file: its reservation fails.
    disk.leave_free(data_blocks / 2);
    state.fill(2);
    let (kind, os_error, message) = snapshot_fails(&mut c, 2);
    assert_eq!(
        (kind, os_error),
        (ErrorKind::Storage, Some(OsError::ENOSPC))
    );
    assert!(
        message.contains("fallocate") && message.contains("step-2.partial/state.safetensors"),
        "{message}"
    );
    assert_eq!(
        dir_names(&rank_dir),
        ["step-1"],
        "nothing of step 2 is left"
    );
    disk.clear_filler();

    // Room for the step's directory and data file, not for its manifest:
    // the data is written and synced, then the manifest's write fails.
    disk.leave_free(1 + data_blocks);
    state.fill(3);
    let (kind, os_error, message) = snapshot_fails(&mut c, 3);
    assert_eq!(
        (kind, os_error),
        (ErrorKind::Storage, Some(OsError::ENOSPC))
    );
    assert!(
        message.contains("step-3.partial/MANIFEST.json"),
        "the manifest, after the data: {message}"
    );
    assert_eq!(
        dir_names(&rank_dir),
        ["step-1"],
        "nothing of step 3 is left"
    );
    assert_eq!(
        daemon.metric("gpusnap_snapshot_failures_total{errno=\"ENOSPC\",job=\"full\"}"),
        2.0
    );

    // Step 1 is intact: listed, verified on disk, restored; the daemon
    // answers.
    assert_eq!(listed(&mut c, "full"), [1]);
    assert_eq!(verify_all(&root), 1);
    assert_eq!(
        restores(&mut c, &state, Step::Latest, 1),
        RestoreSource::Memory
    );
    answers(&daemon);

    // Room again: the next snapshot commits on the same connection, and
    // step 1, no longer the hot one, restores from disk.
    disk.clear_filler();
    state.fill(4);
    snapshot_committed(&mut c, 4);
    assert_eq!(listed(&mut c, "full"), [1, 4]);
    assert_eq!(verify_all(&root), 2);
    assert_eq!(
        restores(&mut c, &state, Step::Latest, 4),
        RestoreSource::Memory
    );
    assert_eq!(
        restores(&mut c, &state, Step::At(1), 1),
        RestoreSource::Disk
    );
    done("full mid-snapshot", started);
}

#[test]
fn a_store_remounted_read_only_fails_snapshots_until_it_is_writable_again() {
    if !gpusnapd_testkit::root_or_skip("loop-mounting a small ext4 needs root (CI runs as root)") {
        return;
    }
    daemon::allow_testing_table();
    let started = Instant::now();
    let disk = LoopDisk::new(64);
    let root = disk.path("store");
    let daemon = Daemon::start_with_root(daemon::scratch(), root.clone(), &[]);
    let state = State::new(5, 4 << 20);
    let mut c = client(&daemon, "ro", 0, 1);
    state.register(&mut c);
    for step in [1, 2] {
        state.fill(step);
        snapshot_committed(&mut c, step);
    }

    // Between snapshots nothing is open for writing, so the kernel lets
    // the file system go read-only under the running daemon.
    disk.remount("ro");
    state.fill(3);
    let (kind, os_error, message) = snapshot_fails(&mut c, 3);
    assert_eq!((kind, os_error), (ErrorKind::Storage, Some(OsError::EROFS)));
    assert!(
        message.contains("step-3.partial") && message.contains("Read-only file system"),
        "{message}"
    );
    assert_eq!(
        daemon.metric("gpusnap_snapshot_failures_total{errno=\"EROFS\",job=\"ro\"}"),
        1.0
    );
    // A new job cannot be claimed either, and says why.
    let (os_error, message) = claim_fails(&daemon, "ro-new");
    assert_eq!(os_error, Some(OsError::EROFS), "{message}");
    assert!(message.contains(".claiming-ro-new"), "{message}");

    // What was committed restores: the newest from the hot tier, the
    // older one from the read-only disk; the store verifies; the daemon
    // answers.
    assert_eq!(listed(&mut c, "ro"), [1, 2]);
    assert_eq!(
        restores(&mut c, &state, Step::Latest, 2),
        RestoreSource::Memory
    );
    assert_eq!(
        restores(&mut c, &state, Step::At(1), 1),
        RestoreSource::Disk
    );
    assert_eq!(verify_all(&root), 2);
    answers(&daemon);

    // Writable again: the failed step is taken again and commits.
    disk.remount("rw");
    state.fill(3);
    snapshot_committed(&mut c, 3);
    assert_eq!(listed(&mut c, "ro"), [1, 2, 3]);
    assert_eq!(verify_all(&root), 3);
    assert_eq!(
        restores(&mut c, &state, Step::Latest, 3),
        RestoreSource::Memory
    );
    done("remounted read-only", started);
}

#[test]
fn a_store_directory_removed_under_the_daemon_fails_clearly_and_recovers_once_made_again() {
    daemon::allow_testing_table();
    let started = Instant::now();
    let daemon = Daemon::start(&[]);
    let root = daemon.root.clone();
    let state = State::new(4, 1 << 20);
    let mut c = client(&daemon, "gone", 0, 1);
    state.register(&mut c);
    state.fill(1);
    snapshot_committed(&mut c, 1);

    // The whole root, as `rm -rf` does it.
    std::fs::remove_dir_all(&root).expect("rm -rf the store root");
    let failing = Instant::now();
    // `Begin` already asks the disk whether the step is committed, and
    // the answer is the error.
    let root_name = root.display().to_string();
    match c.snapshot(2) {
        Err(Error::Storage {
            os_error: Some(OsError::ENOENT),
            message,
        }) => assert!(
            message.contains(&root_name) && message.contains("removed"),
            "{message}"
        ),
        other => panic!("a snapshot into a removed store: {other:?}"),
    }
    assert!(
        failing.elapsed() < Duration::from_secs(10),
        "fails at once, no hang"
    );
    answers(&daemon);
    match c.list_job(Some("gone")) {
        Err(Error::Storage {
            os_error: Some(OsError::ENOENT),
            message,
        }) => assert!(message.contains(&root_name), "{message}"),
        other => panic!("listing a removed store: {other:?}"),
    }
    match c.restore(Step::Latest) {
        Err(Error::Storage {
            os_error: Some(OsError::ENOENT),
            message,
        }) => assert!(message.contains(&root_name), "{message}"),
        other => panic!("restoring from a removed store must not say \"none\": {other:?}"),
    }
    let (os_error, message) = claim_fails(&daemon, "gone-new");
    assert_eq!(os_error, Some(OsError::ENOENT), "{message}");
    assert!(message.contains(&root_name), "{message}");
    assert!(!root.exists(), "the daemon does not make the root itself");

    // Made again (empty): the daemon uses it without a restart. The
    // snapshot on disk is gone, so nothing is listed or restored (not the
    // hot tier's copy either), and the job's claim went with its
    // directory: the commit fails naming it.
    std::fs::create_dir(&root).expect("mkdir the store root");
    assert_eq!(listed(&mut c, "gone"), Vec::<u64>::new());
    state.zero();
    assert!(c.restore(Step::Latest).expect("restore").is_none());
    let (kind, os_error, message) = snapshot_fails(&mut c, 2);
    assert_eq!((kind, os_error), (ErrorKind::Storage, None));
    let job_dir = root.join("gone").display().to_string();
    assert!(
        message.contains(&job_dir) && message.contains("registering the job again"),
        "{message}"
    );

    // Registering again claims the job anew, and snapshots commit.
    drop(c);
    wait_rank_free(&daemon, "gone", 0);
    let mut c = client(&daemon, "gone", 0, 1);
    state.register(&mut c);
    state.fill(2);
    snapshot_committed(&mut c, 2);
    assert_eq!(listed(&mut c, "gone"), [2]);
    assert_eq!(verify_all(&root), 1);
    assert_eq!(
        restores(&mut c, &state, Step::Latest, 2),
        RestoreSource::Memory
    );

    // Only the job's directory, this time: the same failure, the same
    // recovery.
    std::fs::remove_dir_all(root.join("gone")).expect("rm -rf the job");
    state.fill(3);
    let (kind, _, message) = snapshot_fails(&mut c, 3);
    assert_eq!(kind, ErrorKind::Storage);
    assert!(message.contains(&job_dir), "{message}");
    answers(&daemon);
    drop(c);
    wait_rank_free(&daemon, "gone", 0);
    let mut c = client(&daemon, "gone", 0, 1);
    state.register(&mut c);
    snapshot_committed(&mut c, 3);
    assert_eq!(listed(&mut c, "gone"), [3]);
    assert_eq!(verify_all(&root), 1);
    done("store directory removed", started);
}

#[test]
fn a_file_system_the_kernel_makes_read_only_mid_write_keeps_what_was_committed() {
    if !gpusnapd_testkit::root_or_skip("loop-mounting a small ext4 needs root (CI runs as root)") {
        return;
    }
    daemon::allow_testing_table();
    let started = Instant::now();
    let disk = LoopDisk::new(64);
    let root = disk.path("store");
    // Each data file's fdatasync waits a second first: a window in which
    // step 2's data file is open for writing (being written, or written
    // and not yet synced) when the file system fails.
    let mut daemon = Daemon::start_with_root(
        daemon::scratch(),
        root.clone(),
        &[(
            "testing",
            "delays",
            "[{ op = \"sync_data\", delay_ms = 1000 }]",
        )],
    );
    let state = State::new(5, 4 << 20);
    let mut c = client(&daemon, "abort", 0, 1);
    state.register(&mut c);
    state.fill(1);
    snapshot_committed(&mut c, 1);

    state.fill(2);
    assert!(matches!(
        c.snapshot(2).expect("captured"),
        SnapshotOutcome::Captured(_)
    ));
    let data = root.join("abort/0/step-2.partial/state.safetensors");
    daemon::wait_for("step 2's data file", Duration::from_secs(30), || {
        data.exists()
    });
    disk.fail_like_a_bad_write();
    match c.wait_committed(2) {
        Err(Error::SnapshotFailed {
            step: 2,
            kind: ErrorKind::Storage,
            os_error: Some(os_error),
            message,
        }) => {
            assert!(
                [OsError::EROFS, OsError::EIO].contains(&os_error),
                "{os_error}: {message}"
            );
            assert!(message.contains("step-2.partial"), "{message}");
            eprintln!("step 2, the file system made read-only under it: {message}");
        }
        other => panic!("step 2 on a file system gone read-only: {other:?}"),
    }
    // Step 1 restores (memory, then the read-only disk); the daemon answers.
    assert_eq!(listed(&mut c, "abort"), [1]);
    assert_eq!(
        restores(&mut c, &state, Step::Latest, 1),
        RestoreSource::Memory
    );
    answers(&daemon);
    assert_eq!(verify_all(&root), 1);

    // An aborted ext4 is writable again only once unmounted and checked,
    // and the daemon holds its store root open: stop it, repair, start it.
    drop(c);
    daemon.stop();
    disk.repair();
    daemon.restart();
    assert_eq!(
        dir_names(&root.join("abort/0")),
        ["step-1"],
        "start-up recovery removed what step 2 left"
    );
    assert_eq!(verify_all(&root), 1);
    let mut c = client(&daemon, "abort", 0, 1);
    state.register(&mut c);
    assert_eq!(
        restores(&mut c, &state, Step::Latest, 1),
        RestoreSource::Disk
    );
    state.fill(2);
    snapshot_committed(&mut c, 2);
    assert_eq!(listed(&mut c, "abort"), [1, 2]);
    done("made read-only by the kernel mid-write", started);
}
