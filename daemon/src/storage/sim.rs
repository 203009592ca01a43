//! An in-memory file system that models what survives a power cut.
//!
//! Every inode keeps two states: the *live* one that reads see, and the
//! *durable* one that a reboot after power loss would show. Only the calls
//! that make things durable on a strict POSIX file system move live state
//! into durable state:
//!
//! * a file's bytes and length become durable at its `fdatasync`
//!   ([`DataFile::sync_data`]) or, for small files, inside
//!   [`Storage::write_file_synced`];
//! * a directory's entries (creations, renames, removals) become durable at
//!   the `fsync` of that directory ([`Storage::sync_dir`]): its durable entry
//!   map is replaced by its live one. A rename across directories is
//!   therefore durable only once both parents were synced after it.
//!
//! [`SimStorage::durable_image`] is the file system after a reboot: only the
//! inodes reachable from the root through durable entries, each with its
//! durable content. [`SimStorage::cut_power_after`] makes the N-th mutating
//! operation from then on, and every later one, fail with EIO and do
//! nothing, so a test can cut a commit at every step and check each image.
//!
//! Data files do their copies at submit time and park the completions until
//! `reap`; there is never anything in the "kernel".
//!
//! The simulator reports [`BackendKind::Buffered`] as its backend: it models
//! page-cache semantics (bytes reach the durable image only at fdatasync)
//! and asks no alignment of transfers, as the buffered backend does. It has
//! no backend value of its own, so a manifest never names a test backend.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use gpusnap_proto::convert::{to_u64, to_usize};

use super::{
    BackendKind, Completion, DataFile, DirEntry, IoOp, Metadata, OpKind, Storage, StorageError,
};

/// The backend the simulator imitates (see the module doc).
const IMITATES: BackendKind = BackendKind::Buffered;

type Ino = u64;

/// The inode of `/`.
const ROOT_INO: Ino = 0;

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The error every operation gets once the power is cut.
fn power_loss() -> io::Error {
    tracing::debug!("simulated power loss: operation refused");
    errno(libc::EIO)
}

#[derive(Debug, Clone, Default)]
struct FileNode {
    live: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
struct DirNode {
    live: BTreeMap<String, Ino>,
    durable: BTreeMap<String, Ino>,
}

#[derive(Debug, Clone)]
enum Node {
    File(FileNode),
    Dir(DirNode),
}

/// Path components below `/`.
type Comps = Vec<String>;

/// Splits an absolute path into its names. `.` is skipped; `..`, relative
/// paths and non-UTF-8 names are refused with EINVAL.
fn components(path: &Path) -> io::Result<Comps> {
    let mut comps = Vec::new();
    let mut absolute = false;
    for c in path.components() {
        match c {
            Component::RootDir => absolute = true,
            Component::CurDir => {}
            Component::Normal(name) => {
                let name = name.to_str().ok_or_else(|| errno(libc::EINVAL))?;
                comps.push(name.to_owned());
            }
            Component::ParentDir | Component::Prefix(_) => return Err(errno(libc::EINVAL)),
        }
    }
    if absolute {
        Ok(comps)
    } else {
        Err(errno(libc::EINVAL))
    }
}

/// The parent's components and the last name; `/` itself has none (EBUSY,
/// as Linux answers for operations on the root).
fn split_last(mut comps: Comps) -> io::Result<(Comps, String)> {
    let name = comps.pop().ok_or_else(|| errno(libc::EBUSY))?;
    Ok((comps, name))
}

struct State {
    nodes: HashMap<Ino, Node>,
    next_ino: Ino,
    /// Mutating operations performed (attempted and not refused by a cut).
    ops_done: u64,
    /// `ops_done` value at which the power goes out.
    cut_at: Option<u64>,
}

impl State {
    fn empty() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, Node::Dir(DirNode::default()));
        State {
            nodes,
            next_ino: ROOT_INO + 1,
            ops_done: 0,
            cut_at: None,
        }
    }

    /// Counts one mutating operation, or refuses it if the power is out.
    fn begin_op(&mut self) -> io::Result<()> {
        if self.cut_at.is_some_and(|cut| self.ops_done >= cut) {
            return Err(power_loss());
        }
        self.ops_done += 1;
        Ok(())
    }

    fn alloc(&mut self, node: Node) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        ino
    }

    fn node(&self, ino: Ino) -> io::Result<&Node> {
        // A missing inode would be a bug of this module; report it as EIO
        // rather than panicking inside storage code.
        self.nodes.get(&ino).ok_or_else(|| errno(libc::EIO))
    }

    fn dir(&self, ino: Ino) -> io::Result<&DirNode> {
        match self.node(ino)? {
            Node::Dir(d) => Ok(d),
            Node::File(_) => Err(errno(libc::ENOTDIR)),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> io::Result<&mut DirNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(Node::File(_)) => Err(errno(libc::ENOTDIR)),
            None => Err(errno(libc::EIO)),
        }
    }

    fn file(&self, ino: Ino) -> io::Result<&FileNode> {
        match self.node(ino)? {
            Node::File(f) => Ok(f),
            Node::Dir(_) => Err(errno(libc::EISDIR)),
        }
    }

    fn file_mut(&mut self, ino: Ino) -> io::Result<&mut FileNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(f)) => Ok(f),
            Some(Node::Dir(_)) => Err(errno(libc::EISDIR)),
            None => Err(errno(libc::EIO)),
        }
    }

    /// Follows live entries from `/`.
    fn lookup(&self, comps: &[String]) -> io::Result<Ino> {
        let mut ino = ROOT_INO;
        for name in comps {
            ino = *self
                .dir(ino)?
                .live
                .get(name)
                .ok_or_else(|| errno(libc::ENOENT))?;
        }
        Ok(ino)
    }

    /// Adds a new live entry `name` in the directory at `parent`.
    fn create(&mut self, parent: &[String], name: String, node: Node) -> io::Result<Ino> {
        let pino = self.lookup(parent)?;
        if self.dir(pino)?.live.contains_key(&name) {
            return Err(errno(libc::EEXIST));
        }
        let ino = self.alloc(node);
        self.dir_mut(pino)?.live.insert(name, ino);
        Ok(ino)
    }

    fn rename(&mut self, from: Comps, to: Comps) -> io::Result<()> {
        if to.starts_with(&from) && to.len() > from.len() {
            // Moving a directory below itself.
            return Err(errno(libc::EINVAL));
        }
        let (from_parent, from_name) = split_last(from)?;
        let (to_parent, to_name) = split_last(to)?;
        let from_pino = self.lookup(&from_parent)?;
        let src = *self
            .dir(from_pino)?
            .live
            .get(&from_name)
            .ok_or_else(|| errno(libc::ENOENT))?;
        let to_pino = self.lookup(&to_parent)?;
        if let Some(&dst) = self.dir(to_pino)?.live.get(&to_name) {
            if dst == src {
                // Same inode (also `from == to`): rename(2) does nothing.
                return Ok(());
            }
            match (self.node(src)?, self.node(dst)?) {
                (Node::Dir(_), Node::Dir(d)) if !d.live.is_empty() => {
                    return Err(errno(libc::ENOTEMPTY));
                }
                (Node::Dir(_), Node::File(_)) => return Err(errno(libc::ENOTDIR)),
                (Node::File(_), Node::Dir(_)) => return Err(errno(libc::EISDIR)),
                _ => {}
            }
        }
        self.dir_mut(from_pino)?.live.remove(&from_name);
        self.dir_mut(to_pino)?.live.insert(to_name, src);
        Ok(())
    }

    fn remove_dir_all(&mut self, comps: Comps) -> io::Result<()> {
        let (parent, name) = split_last(comps)?;
        let pino = self.lookup(&parent)?;
        let ino = *self
            .dir(pino)?
            .live
            .get(&name)
            .ok_or_else(|| errno(libc::ENOENT))?;
        // Like std::fs::remove_dir_all, refuse a file.
        self.dir(ino)?;
        // The subtree's inodes stay in the table: durable entries may still
        // name them until the parent is synced.
        self.dir_mut(pino)?.live.remove(&name);
        Ok(())
    }

    /// The state after a reboot: what is reachable through durable entries,
    /// with durable content, as both live and durable state.
    fn durable_image(&self) -> State {
        let mut nodes = HashMap::new();
        let mut seen = HashSet::new();
        let mut queue = VecDeque::from([ROOT_INO]);
        while let Some(ino) = queue.pop_front() {
            if !seen.insert(ino) {
                continue;
            }
            let Some(node) = self.nodes.get(&ino) else {
                continue;
            };
            let image = match node {
                Node::File(f) => Node::File(FileNode {
                    live: f.durable.clone(),
                    durable: f.durable.clone(),
                }),
                Node::Dir(d) => {
                    queue.extend(d.durable.values().copied());
                    Node::Dir(DirNode {
                        live: d.durable.clone(),
                        durable: d.durable.clone(),
                    })
                }
            };
            nodes.insert(ino, image);
        }
        State {
            nodes,
            next_ino: self.next_ino,
            ops_done: 0,
            cut_at: None,
        }
    }
}

/// The in-memory power-loss file system. Clones share one file system;
/// [`SimStorage::durable_image`] makes an independent one.
#[derive(Clone)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for SimStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("SimStorage")
            .field("inodes", &st.nodes.len())
            .field("ops_done", &st.ops_done)
            .field("cut_at", &st.cut_at)
            .finish()
    }
}

impl SimStorage {
    /// An empty file system holding `root` and its ancestors, all durable.
    /// Only the normal names of `root` are used (`/a/./b` is `/a/b`, and a
    /// relative path is taken from `/`).
    pub fn new(root: &Path) -> Self {
        let mut st = State::empty();
        let mut dir = ROOT_INO;
        for c in root.components() {
            let Component::Normal(name) = c else { continue };
            let name = name.to_string_lossy().into_owned();
            let child = st.alloc(Node::Dir(DirNode::default()));
            if let Some(Node::Dir(d)) = st.nodes.get_mut(&dir) {
                d.live.insert(name.clone(), child);
                d.durable.insert(name, child);
            }
            dir = child;
        }
        SimStorage {
            state: Arc::new(Mutex::new(st)),
        }
    }

    /// What a reboot after a power cut right now would show, as a new,
    /// independent file system (with no cut armed and an op count of 0).
    pub fn durable_image(&self) -> SimStorage {
        let image = self.lock().durable_image();
        SimStorage {
            state: Arc::new(Mutex::new(image)),
        }
    }

    /// Cuts the power before a later mutating operation: counting from this
    /// call, 0-based, mutating operation number `ops` and every one after it
    /// fail with EIO and change nothing. `cut_power_after(0)` cuts at once.
    /// The mutating operations are create_dir, create_data_file, each
    /// submitted write, set_len, sync_data, write_file_synced, sync_dir,
    /// rename and remove_dir_all; reads always work on the live state.
    pub fn cut_power_after(&self, ops: u64) {
        let mut st = self.lock();
        st.cut_at = Some(st.ops_done.saturating_add(ops));
    }

    /// Mutating operations performed so far (those refused by a power cut
    /// are not counted; those that failed for another reason are).
    pub fn ops_count(&self) -> u64 {
        self.lock().ops_done
    }

    /// Whether an armed power cut has been reached.
    pub fn power_is_cut(&self) -> bool {
        let st = self.lock();
        st.cut_at.is_some_and(|cut| st.ops_done >= cut)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the locked state and names `op` and `path` in its error.
    fn with<T>(
        &self,
        op: &'static str,
        path: &Path,
        f: impl FnOnce(&mut State) -> io::Result<T>,
    ) -> Result<T, StorageError> {
        f(&mut self.lock()).map_err(|e| StorageError::io(op, path, e))
    }
}

impl Storage for SimStorage {
    fn backend(&self) -> BackendKind {
        IMITATES
    }

    fn create_dir(&self, path: &Path) -> Result<(), StorageError> {
        self.with("mkdir", path, |st| {
            st.begin_op()?;
            let (parent, name) = split_last(components(path)?)?;
            st.create(&parent, name, Node::Dir(DirNode::default()))
                .map(drop)
        })
    }

    fn sync_dir(&self, path: &Path) -> Result<(), StorageError> {
        self.with("fsync directory", path, |st| {
            st.begin_op()?;
            let ino = st.lookup(&components(path)?)?;
            let dir = st.dir_mut(ino)?;
            dir.durable = dir.live.clone();
            Ok(())
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError> {
        self.with("rename", from, |st| {
            st.begin_op()?;
            st.rename(components(from)?, components(to)?)
        })
    }

    fn remove_dir_all(&self, path: &Path) -> Result<(), StorageError> {
        self.with("remove_dir_all", path, |st| {
            st.begin_op()?;
            st.remove_dir_all(components(path)?)
        })
    }

    fn read_dir(&self, path: &Path) -> Result<Vec<DirEntry>, StorageError> {
        self.with("read_dir", path, |st| {
            let ino = st.lookup(&components(path)?)?;
            st.dir(ino)?
                .live
                .iter()
                .map(|(name, &child)| {
                    Ok(DirEntry {
                        name: name.clone(),
                        is_dir: matches!(st.node(child)?, Node::Dir(_)),
                    })
                })
                .collect()
        })
    }

    fn metadata(&self, path: &Path) -> Result<Option<Metadata>, StorageError> {
        self.with("stat", path, |st| {
            let ino = match st.lookup(&components(path)?) {
                Ok(ino) => ino,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            Ok(Some(match st.node(ino)? {
                Node::File(f) => Metadata {
                    is_dir: false,
                    len: len_u64(&f.live),
                },
                Node::Dir(_) => Metadata {
                    is_dir: true,
                    len: 0,
                },
            }))
        })
    }

    fn create_data_file(
        &self,
        path: &Path,
        len_bytes: u64,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError> {
        let ino = self.with("create data file", path, |st| {
            st.begin_op()?;
            let (parent, name) = split_last(components(path)?)?;
            // fallocate without KEEP_SIZE: the space reads as zeros and the
            // file is `len_bytes` long (live only, until fdatasync).
            let len = to_usize(len_bytes);
            let node = Node::File(FileNode {
                live: vec![0; len],
                durable: Vec::new(),
            });
            st.create(&parent, name, node)
        })?;
        Ok(Box::new(SimDataFile::new(
            self,
            ino,
            path,
            true,
            queue_depth,
        )))
    }

    fn open_data_file(
        &self,
        path: &Path,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError> {
        let ino = self.with("open data file", path, |st| {
            let ino = st.lookup(&components(path)?)?;
            st.file(ino)?;
            Ok(ino)
        })?;
        Ok(Box::new(SimDataFile::new(
            self,
            ino,
            path,
            false,
            queue_depth,
        )))
    }

    fn write_file_synced(&self, path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
        self.with("write synced file", path, |st| {
            st.begin_op()?;
            let (parent, name) = split_last(components(path)?)?;
            let node = Node::File(FileNode {
                live: bytes.to_vec(),
                durable: bytes.to_vec(),
            });
            st.create(&parent, name, node).map(drop)
        })
    }

    fn read_file_limited(&self, path: &Path, limit_bytes: u64) -> Result<Vec<u8>, StorageError> {
        let st = self.lock();
        let file = components(path)
            .and_then(|comps| st.lookup(&comps))
            .and_then(|ino| st.file(ino))
            .map_err(|e| StorageError::io("read file", path, e))?;
        let len = len_u64(&file.live);
        if len > limit_bytes {
            return Err(StorageError::TooLarge {
                path: path.to_path_buf(),
                len,
                limit_bytes,
            });
        }
        Ok(file.live.clone())
    }

    fn read_at(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.with("pread", path, |st| {
            let ino = st.lookup(&components(path)?)?;
            let live = &st.file(ino)?.live;
            let start = to_usize(offset).min(live.len());
            let end = start.saturating_add(len).min(live.len());
            Ok(live
                .get(start..end)
                .ok_or_else(|| errno(libc::EIO))?
                .to_vec())
        })
    }
}

fn len_u64(bytes: &[u8]) -> u64 {
    to_u64(bytes.len())
}

/// A data file of a [`SimStorage`]: the inode, shared with the file system,
/// and the completions waiting for `reap`.
#[derive(Debug)]
struct SimDataFile {
    fs: SimStorage,
    ino: Ino,
    path: PathBuf,
    writable: bool,
    queue_depth: usize,
    done: VecDeque<Completion>,
}

impl SimDataFile {
    fn new(fs: &SimStorage, ino: Ino, path: &Path, writable: bool, queue_depth: usize) -> Self {
        SimDataFile {
            fs: fs.clone(),
            ino,
            path: path.to_path_buf(),
            writable,
            queue_depth,
            done: VecDeque::new(),
        }
    }

    /// Performs `op` on the live bytes; returns the bytes transferred.
    fn perform(&self, op: &mut IoOp) -> io::Result<usize> {
        let mut st = self.fs.lock();
        if op.kind == OpKind::Write {
            st.begin_op()?;
            if !self.writable {
                return Err(errno(libc::EBADF));
            }
        }
        if op.len > op.buf.capacity() {
            // Checked before any copy: the buffer could not hold the op.
            return Err(errno(libc::EINVAL));
        }
        let offset = to_usize(op.offset);
        match op.kind {
            OpKind::Write => {
                let end = offset
                    .checked_add(op.len)
                    .ok_or_else(|| errno(libc::EFBIG))?;
                let file = st.file_mut(self.ino)?;
                if file.live.len() < end {
                    file.live.resize(end, 0);
                }
                let dst = file
                    .live
                    .get_mut(offset..end)
                    .ok_or_else(|| errno(libc::EIO))?;
                // SAFETY: `op.len <= op.buf.capacity()` was checked above, so
                // the source range lies inside the buffer: a pool buffer this
                // op owns, or a RawRegion whose creator promised it readable
                // until the op completes (it completes inside this call). It
                // cannot overlap `dst`, which lives in the simulator's own
                // Vec and is `op.len` long. A raw copy, as the kernel makes:
                // a region may be staging memory another process writes, so
                // no slice is formed over it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        op.buf.as_mut_ptr().cast_const(),
                        dst.as_mut_ptr(),
                        op.len,
                    );
                }
                Ok(op.len)
            }
            OpKind::Read => {
                let live = &st.file(self.ino)?.live;
                let start = offset.min(live.len());
                let end = start.saturating_add(op.len).min(live.len());
                let src = live.get(start..end).ok_or_else(|| errno(libc::EIO))?;
                // SAFETY: `src.len() <= op.len <= op.buf.capacity()`, so the
                // destination range lies inside the buffer: a pool buffer
                // this op owns exclusively, or a RawRegion whose creator
                // promised it writable until the op completes. It cannot
                // overlap `src`, the simulator's Vec. A raw copy, as the
                // kernel makes: a region may be staging memory another
                // process maps, so no slice is formed over it.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), op.buf.as_mut_ptr(), src.len());
                }
                Ok(src.len())
            }
        }
    }
}

impl DataFile for SimDataFile {
    fn backend(&self) -> BackendKind {
        IMITATES
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn submit(&mut self, mut op: IoOp) {
        let result = self.perform(&mut op);
        self.done.push_back(Completion { op, result });
    }

    fn reap(&mut self, _at_least: usize) -> Result<Vec<Completion>, StorageError> {
        // Everything completed at submit time.
        Ok(self.done.drain(..).collect())
    }

    fn set_len(&mut self, len: u64) -> Result<(), StorageError> {
        let writable = self.writable;
        let ino = self.ino;
        self.fs.with("ftruncate", &self.path, |st| {
            st.begin_op()?;
            if !writable {
                return Err(errno(libc::EINVAL));
            }
            let len = to_usize(len);
            st.file_mut(ino)?.live.resize(len, 0);
            Ok(())
        })
    }

    fn sync_data(&mut self) -> Result<(), StorageError> {
        let ino = self.ino;
        self.fs.with("fdatasync", &self.path, |st| {
            st.begin_op()?;
            let file = st.file_mut(ino)?;
            file.durable = file.live.clone();
            Ok(())
        })
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use super::*;
    use crate::buffer_pool::BufferPool;
    use crate::storage::IoBuf;

    const ROOT: &str = "/snap/root";

    fn root() -> PathBuf {
        PathBuf::from(ROOT)
    }

    fn errno_of<T>(r: Result<T, StorageError>) -> Option<i32> {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.raw_os_error(),
        }
    }

    /// Writes `data` at offset 0 through a pool buffer and checks the
    /// completion; the file is padded to whole 4096-byte blocks.
    fn write_padded(file: &mut dyn DataFile, data: &[u8]) -> io::Result<usize> {
        let pool = BufferPool::new(2 * 4096, 4096).expect("pool");
        let mut lease = pool
            .lease(1, crate::storage::os::tests::soon())
            .expect("lease");
        let mut buf = lease.take().expect("buffer");
        let mut written = 0;
        for (i, chunk) in data.chunks(4096).enumerate() {
            buf.space_mut().fill(0);
            buf.space_mut()[..chunk.len()].copy_from_slice(chunk);
            let op = IoOp {
                kind: OpKind::Write,
                offset: u64::try_from(i * 4096).expect("offset"),
                len: 4096,
                buf: IoBuf::Pooled(buf),
                tag: u64::try_from(i).expect("tag"),
            };
            file.submit(op);
            assert_eq!(file.in_flight(), 1);
            let mut done = file.reap(1).expect("reap");
            assert_eq!(done.len(), 1);
            let c = done.pop().expect("completion");
            assert_eq!(c.op.tag, u64::try_from(i).expect("tag"));
            written += c.result?;
            let IoBuf::Pooled(b) = c.op.buf else {
                panic!("pool buffer did not come back")
            };
            buf = b;
        }
        Ok(written)
    }

    /// The store's commit protocol for one snapshot.
    fn commit(fs: &SimStorage, step: u64, data: &[u8]) -> Result<(), StorageError> {
        let partial = root().join(format!("step-{step}.partial"));
        fs.create_dir(&partial)?;
        let data_path = partial.join("data.bin");
        let padded = data.len().div_ceil(4096) * 4096;
        let mut file = fs.create_data_file(&data_path, u64::try_from(padded).expect("len"), 4)?;
        write_padded(file.as_mut(), data).map_err(|e| StorageError::io("write", &data_path, e))?;
        file.set_len(u64::try_from(data.len()).expect("len"))?;
        file.sync_data()?;
        drop(file);
        fs.write_file_synced(&partial.join("manifest.json"), b"{\"ok\":true}")?;
        fs.sync_dir(&partial)?;
        fs.rename(&partial, &root().join(format!("step-{step}")))?;
        fs.sync_dir(&root())
    }

    fn names(fs: &SimStorage, dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs
            .read_dir(dir)
            .expect("read_dir")
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        names
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 251).expect("byte"))
            .collect()
    }

    #[test]
    fn root_and_its_ancestors_exist_durably() {
        let fs = SimStorage::new(&root());
        let image = fs.durable_image();
        for fs in [&fs, &image] {
            assert!(
                fs.metadata(Path::new("/snap"))
                    .expect("stat")
                    .expect("exists")
                    .is_dir
            );
            assert!(fs.metadata(&root()).expect("stat").expect("exists").is_dir);
            assert_eq!(names(fs, &root()), Vec::<String>::new());
        }
        assert_eq!(fs.backend(), BackendKind::Buffered);
    }

    #[test]
    fn written_but_unsynced_file_is_empty_after_power_loss() {
        let fs = SimStorage::new(&root());
        let path = root().join("f");
        let mut file = fs.create_data_file(&path, 4096, 2).expect("create");
        fs.sync_dir(&root()).expect("sync root");
        assert_eq!(
            write_padded(file.as_mut(), &payload(4096)).expect("write"),
            4096
        );
        assert_eq!(
            fs.read_file_limited(&path, 1 << 20).expect("read"),
            payload(4096)
        );
        let image = fs.durable_image();
        assert_eq!(image.read_file_limited(&path, 1 << 20).expect("read"), b"");

        // Without the directory fsync the file is not there at all.
        let fs = SimStorage::new(&root());
        let mut file = fs.create_data_file(&path, 4096, 2).expect("create");
        write_padded(file.as_mut(), &payload(4096)).expect("write");
        file.sync_data().expect("fdatasync");
        assert_eq!(fs.durable_image().metadata(&path).expect("stat"), None);
    }

    #[test]
    fn synced_data_in_a_directory_never_fsynced_is_gone() {
        let fs = SimStorage::new(&root());
        let dir = root().join("d");
        fs.create_dir(&dir).expect("mkdir");
        fs.write_file_synced(&dir.join("m"), b"manifest")
            .expect("write");
        let mut file = fs
            .create_data_file(&dir.join("data"), 0, 1)
            .expect("create");
        write_padded(file.as_mut(), &payload(100)).expect("write");
        file.sync_data().expect("fdatasync");
        fs.sync_dir(&dir).expect("fsync d");
        // `d` itself was never made durable in the root.
        assert_eq!(fs.durable_image().metadata(&dir).expect("stat"), None);
        fs.sync_dir(&root()).expect("fsync root");
        let image = fs.durable_image();
        assert_eq!(
            image.read_file_limited(&dir.join("m"), 64).expect("read"),
            b"manifest"
        );
        let mut padded = payload(100);
        padded.resize(4096, 0);
        assert!(
            image
                .read_file_limited(&dir.join("data"), 1 << 20)
                .expect("read")
                == padded
        );
    }

    #[test]
    fn full_commit_protocol_is_durable() {
        let fs = SimStorage::new(&root());
        let data = payload(10_000);
        commit(&fs, 7, &data).expect("commit");
        let image = fs.durable_image();
        assert_eq!(names(&image, &root()), ["step-7"]);
        let step = root().join("step-7");
        assert_eq!(names(&image, &step), ["data.bin", "manifest.json"]);
        assert_eq!(
            image
                .read_file_limited(&step.join("data.bin"), 1 << 20)
                .expect("read"),
            data
        );
        assert_eq!(
            image.metadata(&step.join("data.bin")).expect("stat"),
            Some(Metadata {
                is_dir: false,
                len: 10_000
            })
        );
        // The image is independent of the original.
        fs.remove_dir_all(&step).expect("rm");
        assert!(image.metadata(&step).expect("stat").is_some());
    }

    #[test]
    fn rename_before_parent_fsync_is_not_durable() {
        let fs = SimStorage::new(&root());
        let a = root().join("a");
        let b = root().join("b");
        fs.create_dir(&a).expect("mkdir");
        fs.sync_dir(&root()).expect("fsync");
        fs.rename(&a, &b).expect("rename");
        assert_eq!(names(&fs, &root()), ["b"]);
        assert_eq!(names(&fs.durable_image(), &root()), ["a"]);
        fs.sync_dir(&root()).expect("fsync");
        assert_eq!(names(&fs.durable_image(), &root()), ["b"]);
    }

    #[test]
    fn cross_directory_rename_needs_both_parents_synced() {
        let fs = SimStorage::new(&root());
        let (x, y) = (root().join("x"), root().join("y"));
        fs.create_dir(&x).expect("mkdir");
        fs.create_dir(&y).expect("mkdir");
        fs.write_file_synced(&x.join("f"), b"1").expect("write");
        fs.sync_dir(&x).expect("fsync");
        fs.sync_dir(&root()).expect("fsync");
        fs.rename(&x.join("f"), &y.join("f")).expect("rename");
        fs.sync_dir(&y).expect("fsync y");
        let image = fs.durable_image();
        assert_eq!(names(&image, &x), ["f"]);
        assert_eq!(names(&image, &y), ["f"]);
        fs.sync_dir(&x).expect("fsync x");
        let image = fs.durable_image();
        assert!(names(&image, &x).is_empty());
        assert_eq!(
            image.read_file_limited(&y.join("f"), 8).expect("read"),
            b"1"
        );
    }

    #[test]
    fn removal_is_durable_only_after_parent_fsync() {
        let fs = SimStorage::new(&root());
        let d = root().join("d");
        fs.create_dir(&d).expect("mkdir");
        fs.write_file_synced(&d.join("f"), b"x").expect("write");
        fs.sync_dir(&d).expect("fsync");
        fs.sync_dir(&root()).expect("fsync");
        fs.remove_dir_all(&d).expect("rm");
        assert_eq!(fs.metadata(&d).expect("stat"), None);
        assert_eq!(
            fs.durable_image()
                .read_file_limited(&d.join("f"), 8)
                .expect("read"),
            b"x"
        );
        fs.sync_dir(&root()).expect("fsync");
        assert_eq!(fs.durable_image().metadata(&d).expect("stat"), None);
    }

    #[test]
    fn power_cut_fails_that_op_and_later_ones_and_changes_nothing() {
        let fs = SimStorage::new(&root());
        let path = root().join("f");
        let mut file = fs.create_data_file(&path, 0, 2).expect("create");
        assert_eq!(fs.ops_count(), 1);
        fs.cut_power_after(2);
        assert!(!fs.power_is_cut());
        fs.create_dir(&root().join("a")).expect("op 0 after arming");
        write_padded(file.as_mut(), &payload(4096)).expect("op 1 after arming");
        assert!(fs.power_is_cut());
        assert_eq!(fs.ops_count(), 3);
        let eio = Some(libc::EIO);
        assert_eq!(errno_of(fs.create_dir(&root().join("b"))), eio);
        assert_eq!(errno_of(fs.sync_dir(&root())), eio);
        assert_eq!(
            errno_of(fs.rename(&root().join("a"), &root().join("c"))),
            eio
        );
        assert_eq!(errno_of(fs.remove_dir_all(&root().join("a"))), eio);
        assert_eq!(errno_of(fs.write_file_synced(&root().join("m"), b"m")), eio);
        assert_eq!(errno_of(fs.create_data_file(&root().join("g"), 1, 1)), eio);
        assert_eq!(errno_of(file.set_len(1)), eio);
        assert_eq!(errno_of(file.sync_data()), eio);
        let err = write_padded(file.as_mut(), &[9; 4096]).expect_err("write after cut");
        assert_eq!(err.raw_os_error(), eio);
        assert_eq!(fs.ops_count(), 3);
        // Nothing changed; reads still work on the live state.
        assert_eq!(names(&fs, &root()), ["a", "f"]);
        assert_eq!(
            fs.read_file_limited(&path, 1 << 20).expect("read"),
            payload(4096)
        );
        // Only creations were made, none synced: the image is empty.
        assert!(names(&fs.durable_image(), &root()).is_empty());
    }

    #[test]
    fn commit_cut_at_every_op_leaves_either_nothing_or_the_whole_snapshot() {
        let data = payload(9000);
        let base = SimStorage::new(&root());
        commit(&base, 1, &data).expect("first commit");
        let before = base.ops_count();
        commit(&base, 2, &data).expect("second commit");
        let count = base.ops_count() - before;
        assert!(
            count >= 9,
            "the protocol has at least 9 mutating ops, got {count}"
        );

        for k in 0..=count {
            let fs = SimStorage::new(&root());
            commit(&fs, 1, &data).expect("first commit");
            let start = fs.ops_count();
            fs.cut_power_after(k);
            let result = commit(&fs, 2, &data);
            if k < count {
                assert_eq!(errno_of(result), Some(libc::EIO), "cut at {k}");
                assert_eq!(fs.ops_count() - start, k, "cut at {k}");
            } else {
                result.expect("commit with the cut after its last op");
            }
            let image = fs.durable_image();
            let listed = names(&image, &root());
            assert!(
                listed.contains(&"step-1".to_owned()),
                "cut at {k}: {listed:?}"
            );
            let committed = listed.contains(&"step-2".to_owned());
            assert_eq!(committed, k == count, "cut at {k}: {listed:?}");
            for step in ["step-1", "step-2"]
                .iter()
                .filter(|s| listed.contains(&s.to_string()))
            {
                let dir = root().join(step);
                assert_eq!(
                    image
                        .read_file_limited(&dir.join("data.bin"), 1 << 20)
                        .expect("data"),
                    data
                );
                assert_eq!(
                    image
                        .read_file_limited(&dir.join("manifest.json"), 64)
                        .expect("manifest"),
                    b"{\"ok\":true}"
                );
            }
        }
    }

    #[test]
    fn errors_mirror_the_os() {
        let fs = SimStorage::new(&root());
        let a = root().join("a");
        fs.create_dir(&a).expect("mkdir");
        assert_eq!(errno_of(fs.create_dir(&a)), Some(libc::EEXIST));
        assert_eq!(
            errno_of(fs.create_dir(&root().join("x/y"))),
            Some(libc::ENOENT)
        );
        assert!(
            fs.create_dir(&root().join("x/y"))
                .expect_err("enoent")
                .is_not_found()
        );
        fs.write_file_synced(&a.join("m"), b"12345").expect("write");
        assert_eq!(
            errno_of(fs.write_file_synced(&a.join("m"), b"")),
            Some(libc::EEXIST)
        );
        assert_eq!(
            errno_of(fs.create_data_file(&a.join("m"), 0, 1)),
            Some(libc::EEXIST)
        );
        assert_eq!(errno_of(fs.create_dir(&a.join("m/z"))), Some(libc::ENOTDIR));

        // rename onto a non-empty directory, an empty one, a missing one.
        let b = root().join("b");
        fs.create_dir(&b).expect("mkdir");
        fs.create_dir(&b.join("inner")).expect("mkdir");
        assert_eq!(errno_of(fs.rename(&a, &b)), Some(libc::ENOTEMPTY));
        fs.remove_dir_all(&b.join("inner")).expect("rm");
        fs.rename(&a, &b).expect("rename over an empty directory");
        fs.rename(&b, &a).expect("rename to a new name");
        assert_eq!(
            errno_of(fs.rename(&b, &root().join("c"))),
            Some(libc::ENOENT)
        );
        assert_eq!(errno_of(fs.rename(&a, &a.join("sub"))), Some(libc::EINVAL));

        assert_eq!(fs.metadata(&root().join("nothing")).expect("stat"), None);
        assert_eq!(
            fs.metadata(&a.join("m")).expect("stat"),
            Some(Metadata {
                is_dir: false,
                len: 5
            })
        );
        match fs.read_file_limited(&a.join("m"), 4) {
            Err(StorageError::TooLarge {
                len: 5,
                limit_bytes: 4,
                ..
            }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(
            fs.read_file_limited(&a.join("m"), 5).expect("read"),
            b"12345"
        );
        assert_eq!(fs.read_at(&a.join("m"), 3, 10).expect("read"), b"45");
        assert_eq!(fs.read_at(&a.join("m"), 10, 10).expect("read"), b"");
        assert_eq!(errno_of(fs.read_file_limited(&a, 10)), Some(libc::EISDIR));
        assert_eq!(errno_of(fs.read_dir(&a.join("m"))), Some(libc::ENOTDIR));
        assert_eq!(
            errno_of(fs.remove_dir_all(&a.join("m"))),
            Some(libc::ENOTDIR)
        );
        assert_eq!(
            errno_of(fs.open_data_file(&a.join("nope"), 1)),
            Some(libc::ENOENT)
        );
        assert_eq!(
            errno_of(fs.create_dir(Path::new("relative"))),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn reads_through_borrowed_memory_stop_at_eof() {
        let fs = SimStorage::new(&root());
        fs.write_file_synced(&root().join("m"), b"hello world")
            .expect("write");
        let mut file = fs.open_data_file(&root().join("m"), 2).expect("open");
        assert_eq!(file.queue_depth(), 2);
        let mut dst = vec![0u8; 16];
        // SAFETY: `dst` outlives the op, which completes inside `submit`, and
        // nothing else touches it until the completion is reaped.
        let region = unsafe { crate::storage::RawRegion::new(dst.as_mut_ptr(), dst.len()) };
        file.submit(IoOp {
            kind: OpKind::Read,
            offset: 6,
            len: 16,
            buf: IoBuf::Borrowed(region),
            tag: 3,
        });
        let done = file.reap(1).expect("reap");
        assert_eq!(file.in_flight(), 0);
        let [c] = done.as_slice() else {
            panic!("one completion")
        };
        assert_eq!(c.result.as_ref().expect("read"), &5);
        assert_eq!(&dst[..5], b"world");
        // The opened file is read-only.
        let err = write_padded(file.as_mut(), b"x").expect_err("write to read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
