//! [`Storage`] on the real file system.
//!
//! Every path is resolved beneath the root without following a symbolic
//! link ([`Beneath`]: `openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, and the `*at` calls on a parent directory opened
//! that way): a link planted at a job, rank or step directory or at a file
//! makes that operation fail with a refusal naming the path
//! ([`StorageError::Beneath`], `ELOOP`), never reach outside the root. A
//! path not under the root is refused the same way. The root itself may be
//! a link (the operator's choice): it is resolved once, at
//! [`OsStorage::open`], and again only if the directory is removed from
//! under the running daemon ([`Root`]: every operation then fails with
//! [`StorageError::Root`], naming the root, until a directory is there
//! again, which is then used without a restart).
//!
//! Data files go through the backend [`probe::choose`] picked when the
//! storage was opened, on the `File` the beneath-open returned. Data files
//! are created with `O_EXCL` and their space reserved with `fallocate`, so
//! a full disk fails the create rather than a write later. The
//! `pwrite`/buffered backends share one [`IoWorkers`] pool per storage,
//! started with the first such data file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use gpusnap_proto::convert::to_u64;
use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, OFlag};
use nix::sys::stat::Mode;

use super::beneath::{Beneath, Kind, PathRefused};
use super::probe::{self, BackendChoice};
use super::root::Root;
use super::threaded::{IO_WORKERS, IoWorkers, ThreadedFile};
use super::uring::UringFile;
use super::{BackendKind, DataFile, DirEntry, Metadata, Storage, StorageError};
use crate::buffer_pool::BufferPool;

/// Permissions of the files the store creates.
const FILE_MODE: Mode = Mode::from_bits_truncate(0o640);
/// Permissions of the directories the store creates, before the umask (as
/// `std::fs::create_dir` makes them).
const DIR_MODE: Mode = Mode::from_bits_truncate(0o777);

/// The real file system under `root`, with the data-file backend chosen there.
#[derive(Debug)]
pub struct OsStorage {
    root: Root,
    backend: BackendKind,
    reason: String,
    pool: BufferPool,
    /// The `pwrite`/`pread` workers, started with the first threaded file.
    workers: Mutex<Option<Arc<IoWorkers>>>,
}

impl OsStorage {
    /// Creates `root` if missing, opens it (following links in the root's
    /// own path, once: where the store lives is the operator's choice),
    /// checks that the kernel resolves paths beneath it (`openat2`, Linux
    /// 5.6+), and chooses the data-file backend for it.
    pub fn open(
        root: &Path,
        choice: BackendChoice,
        pool: BufferPool,
    ) -> Result<OsStorage, StorageError> {
        std::fs::create_dir_all(root).map_err(|e| StorageError::io("create_dir_all", root, e))?;
        let held = Root::open(root)?;
        let chosen = probe::choose(root, choice, &pool)?;
        Ok(OsStorage {
            root: held,
            backend: chosen.backend,
            reason: chosen.reason,
            pool,
            workers: Mutex::new(None),
        })
    }

    /// Why the backend was chosen.
    pub fn backend_reason(&self) -> &str {
        &self.reason
    }

    /// The directory this storage was opened on.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The storage's worker pool, started on first use.
    pub(crate) fn workers(&self, path: &Path) -> Result<Arc<IoWorkers>, StorageError> {
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = workers.as_ref() {
            return Ok(Arc::clone(w));
        }
        let started = IoWorkers::start(IO_WORKERS)
            .map_err(|e| StorageError::io("start I/O workers for", path, e))?;
        *workers = Some(Arc::clone(&started));
        Ok(started)
    }

    fn data_file(
        &self,
        file: File,
        path: &Path,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError> {
        if self.backend == BackendKind::IoUring {
            let dup = file
                .try_clone()
                .map_err(|e| StorageError::io("dup", path, e))?;
            match UringFile::new(dup, path, &self.pool, queue_depth) {
                Ok(f) => return Ok(Box::new(f)),
                // The probe saw a ring work; this thread may still lack one
                // (e.g. RLIMIT_MEMLOCK counts every ring's pinned pool).
                Err(e) => tracing::warn!("{e}; falling back to pwrite for this file"),
            }
        }
        let backend = match self.backend {
            BackendKind::Buffered => BackendKind::Buffered,
            _ => BackendKind::Pwrite,
        };
        Ok(Box::new(ThreadedFile::new(
            file,
            path,
            backend,
            queue_depth,
            self.workers(path)?,
        )))
    }

    fn direct_flags(&self) -> OFlag {
        if self.backend.is_direct() {
            OFlag::O_DIRECT
        } else {
            OFlag::empty()
        }
    }

    /// The root directory to resolve beneath now ([`Root::current`]: the
    /// one opened at start, or the one made again after it was removed).
    fn beneath(&self) -> Result<Arc<Beneath>, StorageError> {
        Ok(self.root.current()?)
    }

    /// Opens an existing file beneath the root for reading.
    fn open_read(&self, path: &Path, flags: OFlag) -> Result<File, StorageError> {
        Ok(self
            .beneath()?
            .open_file(path, OFlag::O_RDONLY | flags, None)?)
    }

    /// Creates a new file beneath the root (failing if anything, a link
    /// included, is there) for writing.
    fn create_new(&self, path: &Path, flags: OFlag) -> Result<File, StorageError> {
        Ok(self.beneath()?.open_file(
            path,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | flags,
            Some(FILE_MODE),
        )?)
    }
}

/// fallocate of `len` bytes from 0, retried on EINTR; a file system without
/// fallocate gets none.
fn reserve(file: &File, path: &Path, len: u64) -> Result<(), StorageError> {
    let len = libc::off_t::try_from(len).map_err(|_| {
        StorageError::io("fallocate", path, io::Error::from_raw_os_error(libc::EFBIG))
    })?;
    loop {
        match nix::fcntl::fallocate(file.as_fd(), FallocateFlags::empty(), 0, len) {
            Ok(()) | Err(Errno::EOPNOTSUPP) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(StorageError::io("fallocate", path, e.into())),
        }
    }
}

impl Storage for OsStorage {
    fn backend(&self) -> BackendKind {
        self.backend
    }

    fn create_dir(&self, path: &Path) -> Result<(), StorageError> {
        Ok(self.beneath()?.create_dir(path, DIR_MODE)?)
    }

    fn sync_dir(&self, path: &Path) -> Result<(), StorageError> {
        let dir = File::from(self.beneath()?.open_dir(path)?);
        dir.sync_all()
            .map_err(|e| StorageError::io("fsync directory", path, e))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError> {
        self.beneath()?.rename(from, to).map_err(|e| match e {
            super::beneath::BeneathError::Io { source, .. } => {
                StorageError::io_between("rename", from, to, source)
            }
            other => other.into(),
        })
    }

    fn remove_dir_all(&self, path: &Path) -> Result<(), StorageError> {
        Ok(self.beneath()?.remove_dir_all(path)?)
    }

    fn read_dir(&self, path: &Path) -> Result<Vec<DirEntry>, StorageError> {
        let mut out = Vec::new();
        for entry in self.beneath()?.read_dir(path)? {
            match entry.name.into_string() {
                Ok(name) => out.push(DirEntry {
                    name,
                    is_dir: entry.kind == Kind::Dir,
                }),
                Err(name) => {
                    tracing::warn!(dir = %path.display(), ?name, "skipping a non-UTF-8 name")
                }
            }
        }
        Ok(out)
    }

    /// A symbolic link at `path` is refused ([`PathRefused::Link`]), not
    /// reported as a file: the store makes none, so one is planted.
    fn metadata(&self, path: &Path) -> Result<Option<Metadata>, StorageError> {
        match self.beneath()?.lstat(path)? {
            None => Ok(None),
            Some(st) if st.kind == Kind::Symlink => Err(StorageError::Beneath(
                PathRefused::Link {
                    op: "stat",
                    path: path.to_path_buf(),
                    root: self.root().to_path_buf(),
                }
                .into(),
            )),
            Some(st) => Ok(Some(Metadata {
                is_dir: st.kind == Kind::Dir,
                len: st.len,
            })),
        }
    }

    fn create_data_file(
        &self,
        path: &Path,
        len_bytes: u64,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError> {
        let file = self.create_new(path, self.direct_flags())?;
        if len_bytes > 0
            && let Err(e) = reserve(&file, path, len_bytes)
        {
            // Leave no half-made file behind a failed create.
            drop(file);
            if let Ok(root) = self.beneath() {
                let _ = root.remove_file(path);
            }
            return Err(e);
        }
        self.data_file(file, path, queue_depth)
    }

    fn open_data_file(
        &self,
        path: &Path,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError> {
        let file = self.open_read(path, self.direct_flags())?;
        self.data_file(file, path, queue_depth)
    }

    fn write_file_synced(&self, path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
        let mut file = self.create_new(path, OFlag::empty())?;
        file.write_all(bytes)
            .map_err(|e| StorageError::io("write", path, e))?;
        file.sync_data()
            .map_err(|e| StorageError::io("fdatasync", path, e))
    }

    fn read_file_limited(&self, path: &Path, limit_bytes: u64) -> Result<Vec<u8>, StorageError> {
        let file = self.open_read(path, OFlag::empty())?;
        let len = file
            .metadata()
            .map_err(|e| StorageError::io("fstat", path, e))?
            .len();
        let too_large = |len| StorageError::TooLarge {
            path: path.to_path_buf(),
            len,
            limit_bytes,
        };
        if len > limit_bytes {
            return Err(too_large(len));
        }
        let capacity = usize::try_from(len).map_err(|_| too_large(len))?;
        let mut out = Vec::with_capacity(capacity);
        // One byte past the limit tells a file that grew since the fstat.
        file.take(limit_bytes.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| StorageError::io("read", path, e))?;
        let read = to_u64(out.len());
        if read > limit_bytes {
            return Err(too_large(read));
        }
        Ok(out)
    }

    fn read_at(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        let file = self.open_read(path, OFlag::empty())?;
        let mut out = vec![0; len];
        let mut filled = 0;
        while let Some(rest) = out.get_mut(filled..).filter(|r| !r.is_empty()) {
            let at = offset.checked_add(to_u64(filled)).ok_or_else(|| {
                StorageError::io_at(
                    "pread",
                    path,
                    offset,
                    io::Error::from_raw_os_error(libc::EINVAL),
                )
            })?;
            match file.read_at(rest, at) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StorageError::io_at("pread", path, at, e)),
            }
        }
        out.truncate(filled);
        Ok(out)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
pub(crate) mod tests {
    use std::alloc::Layout;

    use super::*;
    use crate::buffer_pool::IO_ALIGN_BYTES;
    use crate::storage::{Completion, IoBuf, IoOp, OpKind, RawRegion};

    const BLOCK_BYTES: usize = 65536;

    /// Zeroed, 4096-aligned heap memory for borrowed-buffer ops.
    pub(crate) struct Aligned {
        ptr: *mut u8,
        layout: Layout,
    }

    impl Aligned {
        pub(crate) fn new(len: usize) -> Self {
            let layout = Layout::from_size_align(len, IO_ALIGN_BYTES).expect("layout");
            // SAFETY: `len` is non-zero in every test using this.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            Aligned { ptr, layout }
        }

        pub(crate) fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the allocation is `layout.size()` initialised bytes,
            // borrowed exclusively through `&mut self`.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
        }

        /// # Safety
        /// `self` must outlive the op given the region, and not be accessed
        /// while it runs.
        pub(crate) unsafe fn region(&self, at: usize, len: usize) -> RawRegion {
            assert!(at + len <= self.layout.size());
            // SAFETY: in bounds (checked above); the caller keeps `self`
            // alive and untouched for the op.
            unsafe { RawRegion::new(self.ptr.add(at), len) }
        }
    }

    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr, self.layout) };
        }
    }

    fn pattern(i: usize, seed: usize) -> u8 {
        (i.wrapping_mul(31) ^ (i >> 12) ^ seed).to_le_bytes()[0]
    }

    /// Reaps until an op may be submitted and a pool buffer is free, handing
    /// each completion to `each` (which frees its buffer).
    fn wait_room(f: &mut dyn DataFile, pool: &BufferPool, mut each: impl FnMut(Completion)) {
        while f.in_flight() >= f.queue_depth() || (pool.free_count() == 0 && f.in_flight() > 0) {
            f.reap(1).expect("reap").into_iter().for_each(&mut each);
        }
    }

    /// A lease deadline no test reaches.
    pub(crate) fn soon() -> std::time::Instant {
        std::time::Instant::now() + std::time::Duration::from_secs(30)
    }

    fn check_write(c: Completion) {
        assert_eq!(
            c.result.as_ref().expect("write"),
            &BLOCK_BYTES,
            "tag {}",
            c.op.tag
        );
    }

    /// Writes a few MiB mixing pool and borrowed buffers at `queue_depth`,
    /// trims to an unaligned length, syncs, and reads it all back.
    pub(crate) fn round_trip(storage: &OsStorage, pool: &BufferPool, queue_depth: usize) {
        let blocks = 52;
        let total = blocks * BLOCK_BYTES;
        let file_len = total - 1000;
        let path = storage.root().join(format!("data-{queue_depth}"));
        let mut source = Aligned::new(total);
        for (i, b) in source.bytes().iter_mut().enumerate() {
            *b = pattern(i, queue_depth);
        }
        let expected = source.bytes().to_vec();
        let mut f = storage
            .create_data_file(&path, u64::try_from(total).expect("len"), queue_depth)
            .expect("create");
        let mut written = 0;
        for block in 0..blocks {
            wait_room(f.as_mut(), pool, |c| {
                check_write(c);
                written += 1;
            });
            let at = block * BLOCK_BYTES;
            let buf = if block % 2 == 0 {
                let mut b = pool.lease(1, soon()).expect("lease").take().expect("buf");
                b.space_mut()[..BLOCK_BYTES].copy_from_slice(&expected[at..at + BLOCK_BYTES]);
                IoBuf::Pooled(b)
            } else {
                // SAFETY: `source` outlives `f` and is only read meanwhile.
                IoBuf::Borrowed(unsafe { source.region(at, BLOCK_BYTES) })
            };
            f.submit(IoOp {
                kind: OpKind::Write,
                offset: u64::try_from(at).expect("offset"),
                len: BLOCK_BYTES,
                buf,
                tag: u64::try_from(block).expect("tag"),
            });
        }
        for c in f.reap(usize::MAX).expect("reap") {
            check_write(c);
            written += 1;
        }
        assert_eq!(f.in_flight(), 0);
        assert_eq!(written, blocks);
        f.set_len(u64::try_from(file_len).expect("len"))
            .expect("set_len");
        f.sync_data().expect("sync");
        drop(f);
        let meta = storage.metadata(&path).expect("stat").expect("exists");
        assert_eq!(meta.len, u64::try_from(file_len).expect("len"));

        let mut dest = Aligned::new(total);
        let mut f = storage.open_data_file(&path, queue_depth).expect("open");
        for block in 0..blocks {
            wait_room(f.as_mut(), pool, |c| check_read(c, file_len, &mut dest));
            let at = block * BLOCK_BYTES;
            let buf = if block % 2 == 0 {
                IoBuf::Pooled(pool.lease(1, soon()).expect("lease").take().expect("buf"))
            } else {
                // SAFETY: `dest` outlives `f` and is not touched until then.
                IoBuf::Borrowed(unsafe { dest.region(at, BLOCK_BYTES) })
            };
            f.submit(IoOp {
                kind: OpKind::Read,
                offset: u64::try_from(at).expect("offset"),
                len: BLOCK_BYTES,
                buf,
                tag: u64::try_from(block).expect("tag"),
            });
        }
        for c in f.reap(usize::MAX).expect("reap") {
            check_read(c, file_len, &mut dest);
        }
        drop(f);
        assert!(
            dest.bytes()[..file_len] == expected[..file_len],
            "data differs"
        );
        assert_eq!(
            storage.read_at(&path, 5, 7).expect("read_at"),
            &expected[5..12]
        );
    }

    fn check_read(c: Completion, file_len: usize, dest: &mut Aligned) {
        let at = usize::try_from(c.op.offset).expect("offset");
        let want = BLOCK_BYTES.min(file_len - at);
        assert_eq!(c.result.as_ref().expect("read"), &want, "at {at}");
        if let IoBuf::Pooled(b) = &c.op.buf {
            let mut b_data = vec![0; want];
            // SAFETY: the buffer is ours again; `want` <= its size.
            b_data.copy_from_slice(unsafe { std::slice::from_raw_parts(b.as_ptr(), want) });
            dest.bytes()[at..at + want].copy_from_slice(&b_data);
        }
    }

    /// Submits ops and drops the file without reaping: `Drop` must wait, so
    /// the data is all there afterwards.
    pub(crate) fn drop_with_ops_in_flight(storage: &OsStorage, pool: &BufferPool) {
        let path = storage.root().join("in-flight");
        let mut source = Aligned::new(8 * BLOCK_BYTES);
        source.bytes().fill(0x5A);
        let mut f = storage.create_data_file(&path, 0, 8).expect("create");
        for block in 0..8 {
            let buf = if block < 2 {
                let mut b = pool.lease(1, soon()).expect("lease").take().expect("buf");
                b.space_mut().fill(0x5A);
                IoBuf::Pooled(b)
            } else {
                // SAFETY: `source` outlives `f`.
                IoBuf::Borrowed(unsafe { source.region(block * BLOCK_BYTES, BLOCK_BYTES) })
            };
            f.submit(IoOp {
                kind: OpKind::Write,
                offset: u64::try_from(block * BLOCK_BYTES).expect("offset"),
                len: BLOCK_BYTES,
                buf,
                tag: 0,
            });
        }
        drop(f);
        let back = std::fs::read(&path).expect("read back");
        assert_eq!(back.len(), 8 * BLOCK_BYTES);
        assert!(back.iter().all(|&b| b == 0x5A));
        assert_eq!(pool.free_count(), pool.capacity());
    }

    fn buffered() -> (tempfile::TempDir, OsStorage) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = BufferPool::new(4 * 4096, 4096).expect("pool");
        let storage = OsStorage::open(dir.path(), BackendChoice::Auto, pool).expect("storage");
        (dir, storage)
    }

    #[test]
    fn open_creates_the_root_and_gives_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("a/b");
        let pool = BufferPool::new(4 * 4096, 4096).expect("pool");
        let storage = OsStorage::open(&root, BackendChoice::Buffered, pool).expect("open");
        assert!(root.is_dir());
        assert_eq!(storage.backend(), BackendKind::Buffered);
        assert!(!storage.backend_reason().is_empty());
    }

    #[test]
    fn small_files_directories_and_metadata() {
        let (dir, s) = buffered();
        let d = dir.path().join("d");
        s.create_dir(&d).expect("mkdir");
        assert!(s.create_dir(&d).is_err());
        s.write_file_synced(&d.join("m"), b"manifest")
            .expect("write");
        assert!(s.write_file_synced(&d.join("m"), b"again").is_err());
        s.sync_dir(&d).expect("sync_dir");
        assert_eq!(
            s.read_file_limited(&d.join("m"), 8).expect("read"),
            b"manifest"
        );
        assert_eq!(s.read_at(&d.join("m"), 4, 100).expect("read_at"), b"fest");
        assert_eq!(s.read_at(&d.join("m"), 100, 4).expect("read_at"), b"");
        s.rename(&d.join("m"), &d.join("n")).expect("rename");
        let mut entries = s.read_dir(dir.path()).expect("read_dir");
        entries.extend(s.read_dir(&d).expect("read_dir"));
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<_> = entries
            .iter()
            .map(|e| (e.name.as_str(), e.is_dir))
            .collect();
        assert_eq!(names, [("d", true), ("n", false)]);
        let meta = s.metadata(&d.join("n")).expect("stat").expect("exists");
        assert_eq!(
            meta,
            Metadata {
                is_dir: false,
                len: 8
            }
        );
        assert_eq!(s.metadata(&d.join("m")).expect("stat"), None);
        s.remove_dir_all(&d).expect("rm");
        assert_eq!(s.metadata(&d).expect("stat"), None);
        assert!(s.read_dir(&d).expect_err("gone").is_not_found());
    }

    #[test]
    fn read_file_limited_refuses_an_oversized_file() {
        let (dir, s) = buffered();
        let path = dir.path().join("big");
        s.write_file_synced(&path, &[1; 100]).expect("write");
        let err = s.read_file_limited(&path, 99).expect_err("too large");
        assert!(matches!(
            err,
            StorageError::TooLarge {
                len: 100,
                limit_bytes: 99,
                ..
            }
        ));
        assert_eq!(s.read_file_limited(&path, 100).expect("read").len(), 100);
    }

    #[test]
    fn a_root_removed_while_open_fails_every_operation_until_made_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("store");
        let pool = BufferPool::new(4 * 4096, 4096).expect("pool");
        let s = OsStorage::open(&root, BackendChoice::Buffered, pool).expect("open");
        let job = root.join("job");
        s.create_dir(&job).expect("mkdir");
        std::fs::remove_dir_all(&root).expect("operator removes the root");
        let failures = [
            s.create_dir(&job).expect_err("mkdir"),
            s.metadata(&job).expect_err("stat is not \"absent\""),
            s.read_dir(&root).expect_err("read_dir"),
            s.write_file_synced(&job.join("m"), b"x")
                .expect_err("write"),
            s.create_data_file(&job.join("d"), 4096, 2)
                .err()
                .expect("create"),
        ];
        for e in &failures {
            assert!(matches!(e, StorageError::Root(_)), "{e:?}");
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
            assert!(!e.is_not_found(), "a removed root is not an absent path");
            assert!(e.to_string().contains(&root.display().to_string()), "{e}");
        }
        assert!(
            !root.exists(),
            "gpusnapd does not make the root again itself"
        );
        std::fs::create_dir(&root).expect("operator makes it again");
        assert_eq!(s.metadata(&job).expect("stat"), None);
        s.create_dir(&job).expect("mkdir in the new root");
        s.write_file_synced(&job.join("m"), b"back").expect("write");
        assert_eq!(std::fs::read(job.join("m")).expect("read"), b"back");
    }

    #[test]
    fn create_data_file_on_an_existing_path_fails_with_eexist() {
        let (dir, s) = buffered();
        let path = dir.path().join("f");
        drop(s.create_data_file(&path, 8192, 4).expect("create"));
        assert_eq!(s.metadata(&path).expect("stat").map(|m| m.len), Some(8192));
        let err = s.create_data_file(&path, 8192, 4).err().expect("exists");
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "{err}");
        assert!(
            s.open_data_file(&dir.path().join("none"), 4)
                .err()
                .expect("none")
                .is_not_found()
        );
    }
}
