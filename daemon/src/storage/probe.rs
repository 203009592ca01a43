//! Chooses the data-file backend for a directory, with a reason to log.
//!
//! `Auto` tries, in order: an O_DIRECT file in the directory (create, ask the
//! kernel for the file's O_DIRECT alignment with `statx(STATX_DIOALIGN)`
//! where it answers, one aligned 4096-byte write, remove), refused with
//! EINVAL on some file systems (ramfs, FUSE, older tmpfs) or by an alignment
//! the store's 4096 bytes do not meet, then falls back to buffered I/O; then an
//! io_uring ring with the kernel's opcodes checked, the whole buffer pool
//! registered and the probe file registered and written through it, refused
//! by seccomp (EPERM), `kernel.io_uring_disabled`, old kernels (ENOSYS) or
//! RLIMIT_MEMLOCK (ENOMEM), then falls back to the `pwrite` pool.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::uring::{Ring, UringFile};
use super::{BackendKind, DataFile, IoBuf, IoOp, OpKind, RawRegion, StorageError};
use crate::buffer_pool::{BufferPool, IO_ALIGN_BYTES};

/// The backend asked for in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// The best that works here.
    #[default]
    Auto,
    /// io_uring or fail.
    IoUring,
    /// The O_DIRECT `pwrite` pool or fail.
    Pwrite,
    /// Buffered `pwrite` and fdatasync; works everywhere.
    Buffered,
}

/// The backend chosen, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub backend: BackendKind,
    pub reason: String,
}

/// Chooses the backend for data files under `dir` and logs the choice.
pub fn choose(
    dir: &Path,
    choice: BackendChoice,
    pool: &BufferPool,
) -> Result<Chosen, StorageError> {
    let chosen = decide(
        dir,
        choice,
        || ProbeFile::create(dir),
        |probe| probe.write_through_uring(pool),
    )?;
    tracing::info!(backend = %chosen.backend, reason = %chosen.reason, "storage backend chosen");
    Ok(chosen)
}

/// The decision, apart from the probes. `odirect` answers `Ok(Err(why))`
/// when the file system refuses O_DIRECT and `Err` when the directory is
/// unusable whatever the backend.
fn decide<T>(
    dir: &Path,
    choice: BackendChoice,
    odirect: impl FnOnce() -> Result<Result<T, String>, StorageError>,
    uring: impl FnOnce(T) -> Result<(), String>,
) -> Result<Chosen, StorageError> {
    let chosen = |backend, reason: String| Ok(Chosen { backend, reason });
    let unavailable = |backend, reason| Err(StorageError::BackendUnavailable { backend, reason });
    let refused = |why: String| {
        format!(
            "O_DIRECT refused by the file system at {}: {why}",
            dir.display()
        )
    };
    let no_uring = |why: String| format!("io_uring unavailable at {}: {why}", dir.display());
    match choice {
        BackendChoice::Buffered => chosen(
            BackendKind::Buffered,
            "buffered I/O chosen by configuration".to_owned(),
        ),
        BackendChoice::Pwrite => match odirect()? {
            Ok(_) => chosen(
                BackendKind::Pwrite,
                format!(
                    "pwrite chosen by configuration; O_DIRECT works at {}",
                    dir.display()
                ),
            ),
            Err(why) => unavailable(BackendKind::Pwrite, refused(why)),
        },
        BackendChoice::IoUring => match odirect()? {
            Err(why) => unavailable(BackendKind::IoUring, refused(why)),
            Ok(probe) => match uring(probe) {
                Ok(()) => chosen(
                    BackendKind::IoUring,
                    format!(
                        "io_uring chosen by configuration; it works at {}",
                        dir.display()
                    ),
                ),
                Err(why) => unavailable(BackendKind::IoUring, no_uring(why)),
            },
        },
        BackendChoice::Auto => match odirect()? {
            Err(why) => chosen(BackendKind::Buffered, refused(why)),
            Ok(probe) => match uring(probe) {
                Ok(()) => chosen(
                    BackendKind::IoUring,
                    format!(
                        "io_uring with O_DIRECT, registered buffers and a registered file works at {}",
                        dir.display()
                    ),
                ),
                Err(why) => chosen(BackendKind::Pwrite, no_uring(why)),
            },
        },
    }
}

/// A probe file opened with O_DIRECT and written once; removed on drop.
#[derive(Debug)]
struct ProbeFile {
    file: File,
    path: PathBuf,
    /// Room for one aligned block anywhere inside.
    block: Vec<u8>,
}

impl ProbeFile {
    /// `Ok(Err(why))` if the file system refuses O_DIRECT.
    fn create(dir: &Path) -> Result<Result<ProbeFile, String>, StorageError> {
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let n = PROBES.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".gpusnap-probe-{}-{n}", std::process::id()));
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        let file = match opened {
            Ok(file) => file,
            Err(e) if refuses_o_direct(&e) => return Ok(Err(format!("open: {e}"))),
            Err(e) => return Err(StorageError::io("create probe file", &path, e)),
        };
        if let Some(why) = dio_alignment_refusal(&file, &path)? {
            drop(file);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), "removing the probe file: {e}");
            }
            return Ok(Err(why));
        }
        let mut probe = ProbeFile {
            file,
            path,
            block: vec![0xA5; 2 * IO_ALIGN_BYTES],
        };
        let Some(block) = aligned_block(&mut probe.block) else {
            return Err(StorageError::io(
                "align probe buffer for",
                &probe.path,
                io::Error::other("no aligned block in the probe buffer"),
            ));
        };
        match probe.file.write_at(block, 0) {
            Ok(IO_ALIGN_BYTES) => Ok(Ok(probe)),
            Ok(n) => Ok(Err(format!(
                "an aligned {IO_ALIGN_BYTES}-byte write wrote {n} bytes"
            ))),
            Err(e) if refuses_o_direct(&e) => Ok(Err(format!("aligned write: {e}"))),
            Err(e) => Err(StorageError::io("write probe file", &probe.path, e)),
        }
    }

    /// Sets up a fresh ring as data files do and writes one block through it.
    fn write_through_uring(mut self, pool: &BufferPool) -> Result<(), String> {
        let ring = Ring::build(pool, 1).map_err(|e| format!("ring setup: {e}"))?;
        let file = self
            .file
            .try_clone()
            .map_err(|e| format!("dup probe file: {e}"))?;
        let path = self.path.clone();
        let block = aligned_block(&mut self.block).ok_or("no aligned block")?;
        // SAFETY: `block` borrows `self.block`, which outlives `data_file`:
        // that is dropped (after waiting for the op) before `self` is.
        let region = unsafe { RawRegion::new(block.as_mut_ptr(), block.len()) };
        let mut data_file = UringFile::with_ring(ring, false, file, &path, 1)
            .map_err(|e| format!("register file: {e}"))?;
        data_file.submit(IoOp {
            kind: OpKind::Write,
            offset: 0,
            len: IO_ALIGN_BYTES,
            buf: IoBuf::Borrowed(region),
            tag: 0,
        });
        let done = data_file.reap(1);
        drop(data_file);
        let done = done.map_err(|e| format!("waiting for the write: {e}"))?;
        match done.into_iter().next().map(|c| c.result) {
            Some(Ok(IO_ALIGN_BYTES)) => Ok(()),
            Some(Ok(n)) => Err(format!("a {IO_ALIGN_BYTES}-byte write wrote {n} bytes")),
            Some(Err(e)) => Err(format!("write: {e}")),
            None => Err("the probe write never completed".to_owned()),
        }
    }
}

impl Drop for ProbeFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "removing the probe file: {e}");
        }
    }
}

/// Why the O_DIRECT alignment the kernel reports for `file` is one the
/// store cannot meet (it aligns offsets, lengths and memory to
/// [`IO_ALIGN_BYTES`]), or `None` when it can or the kernel does not say
/// (before Linux 6.1, or a file system that does not report it: the probe
/// write decides then).
fn dio_alignment_refusal(file: &File, path: &Path) -> Result<Option<String>, StorageError> {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero is a valid `statx` (integers only).
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an open descriptor, an empty NUL-terminated path with
    // AT_EMPTY_PATH (the descriptor itself), and a valid out-pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &raw mut stx,
        )
    };
    if rc != 0 {
        return Err(StorageError::io("statx", path, io::Error::last_os_error()));
    }
    Ok(refusal_of(
        stx.stx_mask & libc::STATX_DIOALIGN != 0,
        stx.stx_dio_mem_align,
        stx.stx_dio_offset_align,
    ))
}

/// The decision of [`dio_alignment_refusal`] on what statx reported.
fn refusal_of(reported: bool, mem_align: u32, offset_align: u32) -> Option<String> {
    let meets = |align: u32| {
        usize::try_from(align).is_ok_and(|a| a > 0 && IO_ALIGN_BYTES.is_multiple_of(a))
    };
    if !reported {
        None
    } else if offset_align == 0 {
        Some("statx reports no O_DIRECT support for this file".to_owned())
    } else if !meets(mem_align) || !meets(offset_align) {
        Some(format!(
            "O_DIRECT needs {mem_align}-byte memory and {offset_align}-byte offset alignment; the store aligns to {IO_ALIGN_BYTES}"
        ))
    } else {
        None
    }
}

/// The first 4096-aligned block inside `space`.
fn aligned_block(space: &mut [u8]) -> Option<&mut [u8]> {
    let at = space.as_ptr().align_offset(IO_ALIGN_BYTES);
    space.get_mut(at..at.checked_add(IO_ALIGN_BYTES)?)
}

fn refuses_o_direct(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use super::*;

    fn pool() -> BufferPool {
        BufferPool::new(4 * 65536, 65536).expect("pool")
    }

    #[test]
    fn auto_picks_io_uring_on_tmp_and_leaves_no_probe_file() {
        let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
        let chosen = choose(dir.path(), BackendChoice::Auto, &pool()).expect("choose");
        assert_eq!(chosen.backend, BackendKind::IoUring, "{}", chosen.reason);
        let left = std::fs::read_dir(dir.path()).expect("read_dir").count();
        assert_eq!(left, 0);
    }

    #[test]
    fn forced_choices_that_work_are_taken() {
        let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
        for (choice, kind) in [
            (BackendChoice::IoUring, BackendKind::IoUring),
            (BackendChoice::Pwrite, BackendKind::Pwrite),
            (BackendChoice::Buffered, BackendKind::Buffered),
        ] {
            let chosen = choose(dir.path(), choice, &pool()).expect("choose");
            assert_eq!(chosen.backend, kind);
        }
    }

    fn refused() -> Result<Result<(), String>, StorageError> {
        Ok(Err("EINVAL".to_owned()))
    }

    fn works() -> Result<Result<(), String>, StorageError> {
        Ok(Ok(()))
    }

    #[test]
    fn o_direct_alignment_the_store_cannot_meet_is_refused() {
        assert_eq!(
            refusal_of(false, 0, 0),
            None,
            "not reported: the write decides"
        );
        assert_eq!(refusal_of(true, 512, 512), None);
        assert_eq!(refusal_of(true, 4, 4096), None);
        assert!(
            refusal_of(true, 0, 0)
                .expect("no O_DIRECT")
                .contains("no O_DIRECT")
        );
        let why = refusal_of(true, 8192, 512).expect("memory too coarse");
        assert!(why.contains("8192-byte memory"), "{why}");
        assert!(refusal_of(true, 512, 16384).is_some());
        assert!(
            refusal_of(true, 3000, 512).is_some(),
            "4096 is not a multiple"
        );
        // The real file system here meets 4096.
        let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
        let probe = ProbeFile::create(dir.path())
            .expect("probe")
            .expect("O_DIRECT works in /tmp");
        assert_eq!(
            dio_alignment_refusal(&probe.file, &probe.path).expect("statx"),
            None
        );
    }

    #[test]
    fn auto_falls_back_with_the_reason() {
        let dir = Path::new("/x");
        let c = decide(dir, BackendChoice::Auto, refused, |_| Ok(())).expect("decide");
        assert_eq!(c.backend, BackendKind::Buffered);
        assert!(
            c.reason
                .contains("O_DIRECT refused by the file system at /x")
        );
        let c = decide(dir, BackendChoice::Auto, works, |_| Err("EPERM".into())).expect("x");
        assert_eq!(c.backend, BackendKind::Pwrite);
        assert!(c.reason.contains("EPERM"));
        let c = decide(dir, BackendChoice::Buffered, refused, |_| Err("x".into())).expect("x");
        assert_eq!(c.backend, BackendKind::Buffered);
    }

    #[test]
    fn forced_backends_that_do_not_work_are_errors() {
        let dir = Path::new("/x");
        let err = decide(dir, BackendChoice::Pwrite, refused, |_| Ok(())).expect_err("pwrite");
        assert!(matches!(
            err,
            StorageError::BackendUnavailable {
                backend: BackendKind::Pwrite,
                ..
            }
        ));
        let err = decide(dir, BackendChoice::IoUring, works, |_| Err("ENOMEM".into()))
            .expect_err("uring");
        assert!(matches!(
            err,
            StorageError::BackendUnavailable {
                backend: BackendKind::IoUring,
                ref reason,
            } if reason.contains("ENOMEM")
        ));
    }

    /// A ramfs mount refuses O_DIRECT (tmpfs accepts it since Linux 6.6).
    /// Needs root (the root-only protocol).
    #[test]
    fn o_direct_refusing_file_system_gets_buffered_or_an_error() {
        if !gpusnapd_testkit::root_or_skip("mounting ramfs needs root") {
            return;
        }
        let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
        let _mount = RamfsMount::new(dir.path()).expect("root mounts ramfs");
        let err = choose(dir.path(), BackendChoice::Pwrite, &pool()).expect_err("pwrite");
        assert!(
            matches!(err, StorageError::BackendUnavailable { .. }),
            "{err}"
        );
        let err = choose(dir.path(), BackendChoice::IoUring, &pool()).expect_err("uring");
        assert!(
            matches!(err, StorageError::BackendUnavailable { .. }),
            "{err}"
        );
        let c = choose(dir.path(), BackendChoice::Auto, &pool()).expect("auto");
        assert_eq!(c.backend, BackendKind::Buffered);
        assert!(c.reason.contains("O_DIRECT refused"), "{}", c.reason);
    }

    /// On /dev/shm (tmpfs) the probe must agree with what the kernel does.
    #[test]
    fn auto_on_dev_shm_agrees_with_the_kernel() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        let direct_ok = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("d"))
            .is_ok();
        let c = choose(dir.path(), BackendChoice::Auto, &pool()).expect("auto");
        assert_eq!(
            c.backend != BackendKind::Buffered,
            direct_ok,
            "{}",
            c.reason
        );
        let forced = choose(dir.path(), BackendChoice::Pwrite, &pool());
        assert_eq!(forced.is_ok(), direct_ok);
    }

    /// Without CAP_IPC_LOCK, registering a pool bigger than RLIMIT_MEMLOCK
    /// fails with ENOMEM: forced io_uring is refused, Auto takes pwrite.
    /// Capabilities are per thread, so only a scratch thread loses it. A
    /// limit too high to exceed is lowered for the test, which only root may
    /// do safely here: root's other threads keep CAP_IPC_LOCK, so the lower
    /// limit binds none of the tests running beside this one.
    #[test]
    fn pool_over_memlock_without_ipc_lock_falls_back_to_pwrite() {
        const MEMLOCK_TESTED_MAX: u64 = 256 << 20;
        let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid out-pointer for the call.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) };
        assert_eq!(rc, 0, "getrlimit: {}", io::Error::last_os_error());
        let _restore = if limit.rlim_cur > MEMLOCK_TESTED_MAX {
            if !gpusnapd_testkit::root_or_skip(
                "RLIMIT_MEMLOCK is too high to exceed, and only root lowers it without starving other tests",
            ) {
                return;
            }
            Some(MemlockLowered::to(limit, 64 << 20))
        } else {
            None
        };
        let memlock_bytes = usize::try_from(limit.rlim_cur.min(64 << 20)).expect("small");
        let pool = BufferPool::new(memlock_bytes + (4 << 20), 1 << 20).expect("pool");
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(
                    drop_ipc_lock_on_this_thread(),
                    "dropping a capability from one's own thread is always allowed"
                );
                let err = choose(dir.path(), BackendChoice::IoUring, &pool).expect_err("uring");
                assert!(
                    matches!(
                        err,
                        StorageError::BackendUnavailable {
                            backend: BackendKind::IoUring,
                            ..
                        }
                    ),
                    "{err}"
                );
                let c = choose(dir.path(), BackendChoice::Auto, &pool).expect("auto");
                assert_eq!(c.backend, BackendKind::Pwrite);
                assert!(c.reason.contains("io_uring unavailable"), "{}", c.reason);
            });
        });
    }

    /// RLIMIT_MEMLOCK lowered for a test; the old limit back on drop.
    struct MemlockLowered(libc::rlimit);

    impl MemlockLowered {
        fn to(old: libc::rlimit, bytes: u64) -> Self {
            let lower = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: old.rlim_max,
            };
            // SAFETY: `lower` is a valid rlimit for the call.
            let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const lower) };
            assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());
            MemlockLowered(old)
        }
    }

    impl Drop for MemlockLowered {
        fn drop(&mut self) {
            // SAFETY: the limit read at the start of the test, valid then.
            let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const self.0) };
            assert_eq!(rc, 0, "restoring RLIMIT_MEMLOCK");
        }
    }

    /// Clears CAP_IPC_LOCK from the calling thread's effective set.
    fn drop_ipc_lock_on_this_thread() -> bool {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
        const CAP_IPC_LOCK: u32 = 14;
        let mut header = Header {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        // SAFETY: capget fills one header and two data structs (version 3),
        // both valid and laid out as the kernel's.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
        if rc != 0 {
            return false;
        }
        data[0].effective &= !(1 << CAP_IPC_LOCK);
        // SAFETY: as above; capset reads them and changes only this thread.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
        rc == 0
    }

    struct RamfsMount(std::ffi::CString);

    impl RamfsMount {
        fn new(at: &Path) -> Option<Self> {
            use std::os::unix::ffi::OsStrExt;
            let target = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
            // SAFETY: all pointers are NUL-terminated strings alive for the
            // call; a null `data` is allowed for ramfs.
            let rc = unsafe {
                libc::mount(
                    c"none".as_ptr(),
                    target.as_ptr(),
                    c"ramfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            (rc == 0).then_some(RamfsMount(target))
        }
    }

    impl Drop for RamfsMount {
        fn drop(&mut self) {
            // SAFETY: the target is a NUL-terminated path we mounted on.
            let rc = unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
            assert_eq!(rc, 0, "umount ramfs");
        }
    }
}
