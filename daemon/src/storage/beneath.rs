//! Paths beneath the store root, resolved without ever following a
//! symbolic link.
//!
//! [`Beneath`] holds a descriptor of one directory (the store root, or the
//! remote tier's journal directory inside it), opened once. Every path it
//! is given must lie lexically under that directory and is taken relative
//! to it, name by name: a `..`, a `.` or an absolute part is refused
//! before any system call ([`PathRefused::NotPlain`]), a path elsewhere
//! too ([`PathRefused::OutsideRoot`]). Then:
//!
//! * files and directories are opened with `openat2(2)` from the held
//!   descriptor with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS` (files with `O_NOFOLLOW` too): a symbolic link at any
//!   component, the last one included, fails with `ELOOP`, and anything
//!   that would leave the directory with `EXDEV`; both are refusals
//!   ([`PathRefused::Link`], [`PathRefused::Escape`]) naming the path;
//! * operations on a name (`mkdirat`, `renameat`, `unlinkat`, `fstatat`
//!   with `AT_SYMLINK_NOFOLLOW`) run on the parent directory opened that
//!   way, and act on the name itself: a link there is created over,
//!   renamed, removed or looked at, never followed;
//! * [`Beneath::remove_dir_all`] removes a tree with those calls, name by
//!   name, opening each subdirectory beneath its parent: a link inside is
//!   unlinked, never descended into.
//!
//! So whoever plants a link under the root (at a job, rank or step
//! directory, at a data file) can make gpusnapd refuse that path, and
//! never make it create, write, read or remove anything outside the root.
//!
//! The root itself may be a symbolic link: where an operator puts the
//! store is their choice. [`Beneath::open`] resolves the root's own path
//! once, following links, and only what lies beneath it is constrained.
//!
//! `openat2` needs Linux 5.6 or newer, and a seccomp filter may refuse it
//! with `ENOSYS` on any kernel (systemd-nspawn's own filter does in
//! Debian 12). Then [`Beneath::open`] logs it once and resolves by a walk
//! instead ([`Resolver::Walk`]): one `openat` per name from the held
//! descriptor, each with `O_NOFOLLOW` (a directory's link is told apart
//! from a file by `fstatat` without following, and refused as `ELOOP`),
//! and a `..` refused as `EXDEV`. The names are plain already (checked
//! above), so the walk refuses exactly what `openat2` does; the unit tests
//! run the link cases through both.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::UnlinkatFlags;

/// How every path component beneath the directory is resolved.
const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_BENEATH
    .union(ResolveFlag::RESOLVE_NO_SYMLINKS)
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

/// Most directory levels [`Beneath::remove_dir_all`] descends. The store
/// is four levels deep (job, rank, step, file); a deeper tree is nothing
/// gpusnapd made, and is left for an operator.
pub const REMOVE_DEPTH_MAX: usize = 16;

/// Tries of an `openat2` the kernel answered `EAGAIN` (it could not rule
/// out a racing rename); plain names make that all but impossible.
const EAGAIN_TRIES: usize = 4;

/// A path gpusnapd will not resolve beneath its root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    #[error("{} is not beneath {}; gpusnapd only touches paths under its store root", .path.display(), .root.display())]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("{}: {component:?} is not a plain name; paths beneath {} are resolved name by name, without '..', '.' or an absolute part", .path.display(), .root.display())]
    NotPlain {
        path: PathBuf,
        root: PathBuf,
        component: String,
    },
    #[error("{op} {}: a symbolic link is in the way (at this path or a directory above it, beneath {}); gpusnapd never follows a link beneath its store root and refuses the path; remove the link", .path.display(), .root.display())]
    Link {
        op: &'static str,
        path: PathBuf,
        root: PathBuf,
    },
    #[error("{op} {}: resolving it would leave {}; refused", .path.display(), .root.display())]
    Escape {
        op: &'static str,
        path: PathBuf,
        root: PathBuf,
    },
    #[error("{op} {}: that is the directory itself, not a name beneath it", .path.display())]
    IsRoot { op: &'static str, path: PathBuf },
    #[error("remove {}: the tree is more than {REMOVE_DEPTH_MAX} directories deep; gpusnapd made no such tree and leaves it for an operator", .path.display())]
    TooDeep { path: PathBuf },
}

impl PathRefused {
    /// The errno a refusal is reported with: `ELOOP` for a link, `EXDEV`
    /// for an escape (what the kernel said), `EINVAL` for a path refused
    /// before any system call.
    pub fn errno(&self) -> Errno {
        match self {
            PathRefused::Link { .. } => Errno::ELOOP,
            PathRefused::Escape { .. } => Errno::EXDEV,
            PathRefused::OutsideRoot { .. }
            | PathRefused::NotPlain { .. }
            | PathRefused::IsRoot { .. }
            | PathRefused::TooDeep { .. } => Errno::EINVAL,
        }
    }
}

/// Errors of resolving and operating beneath a directory.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    #[error(transparent)]
    Refused(#[from] PathRefused),
    #[error("{op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl BeneathError {
    /// The OS error behind this one (a refusal's own errno included).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            BeneathError::Refused(r) => Some(r.errno() as i32),
            BeneathError::Io { source, .. } => source.raw_os_error(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, BeneathError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// What a name is, as `lstat` says (a link is never followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    fn of_mode(mode: libc::mode_t) -> Kind {
        let format = SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits());
        if format == SFlag::S_IFDIR {
            Kind::Dir
        } else if format == SFlag::S_IFREG {
            Kind::File
        } else if format == SFlag::S_IFLNK {
            Kind::Symlink
        } else {
            Kind::Other
        }
    }

    fn of_dirent(kind: nix::dir::Type) -> Kind {
        match kind {
            nix::dir::Type::Directory => Kind::Dir,
            nix::dir::Type::File => Kind::File,
            nix::dir::Type::Symlink => Kind::Symlink,
            nix::dir::Type::Fifo
            | nix::dir::Type::CharacterDevice
            | nix::dir::Type::BlockDevice
            | nix::dir::Type::Socket => Kind::Other,
        }
    }
}

/// A name's kind and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    pub len: u64,
}

/// One entry of a directory (never `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: OsString,
    pub kind: Kind,
}

/// A directory, and everything beneath it reached without following links.
#[derive(Debug)]
pub struct Beneath {
    path: PathBuf,
    fd: OwnedFd,
    resolver: Resolver,
}

/// How names beneath the directory are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`.
    Openat2,
    /// One `openat(O_NOFOLLOW)` per name, where `openat2` is refused.
    Walk,
}

/// A path beneath the directory, split into its plain names.
struct Rel<'p> {
    full: &'p Path,
    names: Vec<&'p OsStr>,
}

impl Rel<'_> {
    /// The path relative to the directory (`.` for the directory itself).
    fn relative(&self) -> PathBuf {
        if self.names.is_empty() {
            PathBuf::from(".")
        } else {
            self.names.iter().collect()
        }
    }
}

impl Beneath {
    /// Opens `root` (following links in its own path: the operator's
    /// choice) and checks that the kernel resolves beneath it.
    pub fn open(root: &Path) -> Result<Beneath, BeneathError> {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| BeneathError::Io {
            op: "open store root",
            path: root.to_path_buf(),
            source: e.into(),
        })?;
        let mut beneath = Beneath {
            path: root.to_path_buf(),
            fd,
            resolver: Resolver::Openat2,
        };
        match beneath.openat2(Path::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY, None) {
            Ok(_) => Ok(beneath),
            Err(Errno::ENOSYS) => {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| {
                    tracing::warn!(
                        root = %root.display(),
                        "openat2(2) is refused here (ENOSYS: an old kernel or a seccomp filter); resolving paths beneath the store root name by name with O_NOFOLLOW instead"
                    );
                });
                beneath.resolver = Resolver::Walk;
                Ok(beneath)
            }
            Err(e) => Err(io_error("openat2", root, e.into())),
        }
    }

    /// How this directory's paths are resolved.
    pub fn resolver(&self) -> Resolver {
        self.resolver
    }

    /// The directory's path, as it was given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the held directory was removed since it was opened (its
    /// link count is 0: `rmdir` of it, or of a tree holding it). An
    /// `fstat` of the held descriptor, no path lookup. Nothing can be made
    /// beneath a removed directory again (every create fails `ENOENT`).
    pub fn is_removed(&self) -> Result<bool, BeneathError> {
        let st = nix::sys::stat::fstat(&self.fd).map_err(called("fstat", &self.path))?;
        Ok(st.st_nlink == 0)
    }

    /// A [`Beneath`] of the directory at `path`, opened beneath this one
    /// (the journal's own directory).
    pub fn subdir(&self, path: &Path) -> Result<Beneath, BeneathError> {
        Ok(Beneath {
            path: path.to_path_buf(),
            fd: self.open_dir(path)?,
            resolver: self.resolver,
        })
    }

    /// Opens the file at `path` with `flags` (`O_NOFOLLOW` and `O_CLOEXEC`
    /// added); `mode` when `flags` may create it.
    pub fn open_file(
        &self,
        path: &Path,
        flags: OFlag,
        mode: Option<Mode>,
    ) -> Result<File, BeneathError> {
        let rel = self.split(path)?;
        let fd = self
            .openat2(&rel.relative(), flags, mode)
            .map_err(|e| self.failed("open", path, e))?;
        Ok(File::from(fd))
    }

    /// Opens the directory at `path` (for reading it, syncing it, or as
    /// the parent of an operation on a name).
    pub fn open_dir(&self, path: &Path) -> Result<OwnedFd, BeneathError> {
        let rel = self.split(path)?;
        self.dir_fd(&rel, rel.names.len())
            .map_err(|e| self.failed("open directory", path, e))
    }

    /// mkdir of `path`; fails with `EEXIST` if anything, a link included,
    /// is there.
    pub fn create_dir(&self, path: &Path, mode: Mode) -> Result<(), BeneathError> {
        let (parent, name) = self.parent_of("mkdir", path)?;
        nix::sys::stat::mkdirat(&parent, name, mode).map_err(called("mkdir", path))
    }

    /// rename(2) of `from` to `to`; a link at either is the name renamed
    /// or replaced, never followed.
    pub fn rename(&self, from: &Path, to: &Path) -> Result<(), BeneathError> {
        let (from_dir, from_name) = self.parent_of("rename", from)?;
        let (to_dir, to_name) = self.parent_of("rename", to)?;
        nix::fcntl::renameat(&from_dir, from_name, &to_dir, to_name).map_err(called("rename", from))
    }

    /// Removes the file (or link) at `path`.
    pub fn remove_file(&self, path: &Path) -> Result<(), BeneathError> {
        let (parent, name) = self.parent_of("unlink", path)?;
        nix::unistd::unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir)
            .map_err(called("unlink", path))
    }

    /// Removes `path` and everything below it. A link anywhere in the tree
    /// (`path` itself included) is unlinked, never descended into.
    pub fn remove_dir_all(&self, path: &Path) -> Result<(), BeneathError> {
        let (parent, name) = self.parent_of("remove", path)?;
        self.remove_entry(parent.as_fd(), name, path, 0)
    }

    /// The entries of the directory at `path`, `.` and `..` left out.
    pub fn read_dir(&self, path: &Path) -> Result<Vec<Entry>, BeneathError> {
        let fd = self.open_dir(path)?;
        entries(fd).map_err(called("read_dir", path))
    }

    /// What is at `path`, `None` if nothing is; a link is reported as
    /// [`Kind::Symlink`], never followed.
    pub fn lstat(&self, path: &Path) -> Result<Option<Stat>, BeneathError> {
        let rel = self.split(path)?;
        let Some((&name, parents)) = rel.names.split_last() else {
            let st = nix::sys::stat::fstat(&self.fd).map_err(called("stat", path))?;
            return Ok(Some(stat_of(&st)));
        };
        let parent = match self.dir_fd(&rel, parents.len()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(self.failed("stat", path, e)),
        };
        match nix::sys::stat::fstatat(&parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(stat_of(&st))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(called("stat", path)(e)),
        }
    }

    /// `path` as plain names below the directory.
    fn split<'p>(&self, path: &'p Path) -> Result<Rel<'p>, PathRefused> {
        let rest = path
            .strip_prefix(&self.path)
            .map_err(|_| PathRefused::OutsideRoot {
                path: path.to_path_buf(),
                root: self.path.clone(),
            })?;
        let mut names = Vec::new();
        for component in rest.components() {
            match component {
                Component::Normal(name) => names.push(name),
                Component::ParentDir
                | Component::CurDir
                | Component::RootDir
                | Component::Prefix(_) => {
                    return Err(PathRefused::NotPlain {
                        path: path.to_path_buf(),
                        root: self.path.clone(),
                        component: component.as_os_str().to_string_lossy().into_owned(),
                    });
                }
            }
        }
        Ok(Rel { full: path, names })
    }

    /// The parent directory of `path`, opened beneath, and its last name.
    fn parent_of<'p>(
        &self,
        op: &'static str,
        path: &'p Path,
    ) -> Result<(OwnedFd, &'p OsStr), BeneathError> {
        let rel = self.split(path)?;
        let Some((&name, parents)) = rel.names.split_last() else {
            return Err(PathRefused::IsRoot {
                op,
                path: path.to_path_buf(),
            }
            .into());
        };
        let parent = self
            .dir_fd(&rel, parents.len())
            .map_err(|e| self.failed(op, rel.full, e))?;
        Ok((parent, name))
    }

    /// The directory made of the first `depth` names of `rel`.
    fn dir_fd(&self, rel: &Rel<'_>, depth: usize) -> Result<OwnedFd, Errno> {
        let names = rel.names.get(..depth).unwrap_or(&rel.names);
        let relative: PathBuf = if names.is_empty() {
            PathBuf::from(".")
        } else {
            names.iter().collect()
        };
        self.openat2(&relative, OFlag::O_RDONLY | OFlag::O_DIRECTORY, None)
    }

    fn openat2(&self, relative: &Path, flags: OFlag, mode: Option<Mode>) -> Result<OwnedFd, Errno> {
        open_beneath(self.resolver, self.fd.as_fd(), relative, flags, mode)
    }

    /// One name of a tree being removed: unlinked if it is not a directory
    /// (a link is not), else emptied and removed.
    fn remove_entry(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        depth: usize,
    ) -> Result<(), BeneathError> {
        let st = nix::sys::stat::fstatat(parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(called("stat", path))?;
        if Kind::of_mode(st.st_mode) != Kind::Dir {
            return nix::unistd::unlinkat(parent, name, UnlinkatFlags::NoRemoveDir)
                .map_err(called("unlink", path));
        }
        if depth >= REMOVE_DEPTH_MAX {
            return Err(PathRefused::TooDeep {
                path: path.to_path_buf(),
            }
            .into());
        }
        // A link swapped in since the stat fails here with ELOOP.
        let dir = open_beneath(
            self.resolver,
            parent,
            Path::new(name),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            None,
        )
        .map_err(|e| self.failed("open directory", path, e))?;
        let children = {
            let dup = dir.try_clone().map_err(|e| io_error("dup", path, e))?;
            entries(dup).map_err(called("read_dir", path))?
        };
        for child in children {
            self.remove_entry(dir.as_fd(), &child.name, &path.join(&child.name), depth + 1)?;
        }
        nix::unistd::unlinkat(parent, name, UnlinkatFlags::RemoveDir).map_err(called("rmdir", path))
    }

    /// The error of resolving `path` with `openat2` for `op`: a refusal
    /// for a link (`ELOOP`: `RESOLVE_NO_SYMLINKS`, `O_NOFOLLOW`) or an
    /// escape (`EXDEV`: `RESOLVE_BENEATH`), else the OS error as it came.
    fn failed(&self, op: &'static str, path: &Path, errno: Errno) -> BeneathError {
        let path = path.to_path_buf();
        let root = self.path.clone();
        match errno {
            Errno::ELOOP => PathRefused::Link { op, path, root }.into(),
            Errno::EXDEV => PathRefused::Escape { op, path, root }.into(),
            _ => io_error(op, &path, errno.into()),
        }
    }
}

/// The error of a call on a name in a directory already resolved (its
/// errno is the call's own: a rename's `EXDEV` is two file systems).
fn called<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(Errno) -> BeneathError + 'p {
    move |errno| io_error(op, path, errno.into())
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> BeneathError {
    BeneathError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// `openat2(dir, relative, flags | O_CLOEXEC)` resolved beneath `dir`
/// without links; retried a bounded number of times on `EAGAIN`.
///
/// `RESOLVE_NO_SYMLINKS` refuses a link at every component, the last one
/// included (`ELOOP`). A file is opened with `O_NOFOLLOW` as well, which
/// says the same of the last component. A directory is not: with
/// `O_DIRECTORY | O_NOFOLLOW` the kernel answers a link at the last
/// component with `ENOTDIR` (the link itself is not a directory), which
/// would read as "not a directory" instead of the refusal it is.
fn open_beneath(
    resolver: Resolver,
    dir: BorrowedFd<'_>,
    relative: &Path,
    flags: OFlag,
    mode: Option<Mode>,
) -> Result<OwnedFd, Errno> {
    if resolver == Resolver::Walk {
        return walk_beneath(dir, relative, flags, mode);
    }
    let nofollow = if flags.contains(OFlag::O_DIRECTORY) {
        OFlag::empty()
    } else {
        OFlag::O_NOFOLLOW
    };
    let mut how = OpenHow::new()
        .flags(flags | nofollow | OFlag::O_CLOEXEC)
        .resolve(RESOLVE);
    if let Some(mode) = mode {
        how = how.mode(mode);
    }
    let mut tries = 0;
    loop {
        match nix::fcntl::openat2(dir, relative, how) {
            Err(Errno::EAGAIN) if tries + 1 < EAGAIN_TRIES => tries += 1,
            other => return other,
        }
    }
}

/// What [`open_beneath`] does where `openat2` is refused: each name
/// opened with `openat(O_NOFOLLOW)` beneath the previous one. A link at
/// any name is `ELOOP` (with `O_DIRECTORY` the kernel says `ENOTDIR` for a
/// link, so that answer is checked with `fstatat` without following); a
/// `..` or an absolute part is `EXDEV`, as `RESOLVE_BENEATH` says it.
fn walk_beneath(
    dir: BorrowedFd<'_>,
    relative: &Path,
    flags: OFlag,
    mode: Option<Mode>,
) -> Result<OwnedFd, Errno> {
    let names: Vec<&OsStr> = relative
        .components()
        .filter_map(|c| match c {
            Component::CurDir => None,
            Component::Normal(name) => Some(Ok(name)),
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                Some(Err(Errno::EXDEV))
            }
        })
        .collect::<Result<_, _>>()?;
    let directory = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let Some((last, parents)) = names.split_last() else {
        return nix::fcntl::openat(dir, ".", flags | OFlag::O_CLOEXEC, Mode::empty());
    };
    let open_at = |at: BorrowedFd<'_>, name: &OsStr, flags: OFlag, mode: Mode| {
        nix::fcntl::openat(at, name, flags, mode).map_err(|e| match e {
            Errno::ENOTDIR if is_link(at, name) => Errno::ELOOP,
            e => e,
        })
    };
    let mut held: Option<OwnedFd> = None;
    for name in parents {
        let at = held.as_ref().map_or(dir, AsFd::as_fd);
        held = Some(open_at(at, name, directory, Mode::empty())?);
    }
    let at = held.as_ref().map_or(dir, AsFd::as_fd);
    open_at(
        at,
        last,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode.unwrap_or_else(Mode::empty),
    )
}

/// Whether `name` in `dir` is a symbolic link (not followed).
fn is_link(dir: BorrowedFd<'_>, name: &OsStr) -> bool {
    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| Kind::of_mode(st.st_mode) == Kind::Symlink)
}

/// The entries of an open directory, `.` and `..` left out; a name whose
/// type the file system does not report in the entry is looked up with
/// `fstatat` (never following a link).
fn entries(fd: OwnedFd) -> Result<Vec<Entry>, Errno> {
    let mut dir = nix::dir::Dir::from_fd(fd)?;
    let mut raw: Vec<(OsString, Option<nix::dir::Type>)> = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        raw.push((name.to_owned(), entry.file_type()));
    }
    raw.into_iter()
        .map(|(name, kind)| {
            let kind = match kind {
                Some(kind) => Kind::of_dirent(kind),
                None => {
                    let st = nix::sys::stat::fstatat(
                        &dir,
                        name.as_os_str(),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )?;
                    Kind::of_mode(st.st_mode)
                }
            };
            Ok(Entry { name, kind })
        })
        .collect()
}

fn stat_of(st: &nix::sys::stat::FileStat) -> Stat {
    Stat {
        kind: Kind::of_mode(st.st_mode),
        // A size is never negative; 0 would only ever be a file system's lie.
        len: u64::try_from(st.st_size).unwrap_or(0),
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::symlink;

    use super::*;

    /// A root beneath a scratch directory, and an `outside` directory
    /// beside it holding one file, which no test may change.
    struct Scene {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        beneath: Beneath,
    }

    impl Scene {
        fn new() -> Scene {
            Scene::resolving(Resolver::Openat2)
        }

        /// A scene whose paths are resolved by `resolver`.
        fn resolving(resolver: Resolver) -> Scene {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            let outside = dir.path().join("outside");
            std::fs::create_dir(&root).unwrap();
            std::fs::create_dir(&outside).unwrap();
            std::fs::write(outside.join("keep"), b"outside").unwrap();
            let mut beneath = Beneath::open(&root).unwrap();
            assert_eq!(
                beneath.resolver,
                Resolver::Openat2,
                "this kernel has openat2"
            );
            beneath.resolver = resolver;
            Scene {
                _dir: dir,
                root,
                outside,
                beneath,
            }
        }

        /// The outside directory is exactly as made: one file, unchanged.
        fn assert_outside_untouched(&self) {
            let names: Vec<_> = std::fs::read_dir(&self.outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["keep"], "something was made or removed outside");
            assert_eq!(
                std::fs::read(self.outside.join("keep")).unwrap(),
                b"outside"
            );
        }
    }

    fn assert_link_refused(e: BeneathError, path: &Path) {
        let message = e.to_string();
        match &e {
            BeneathError::Refused(PathRefused::Link { path: p, .. }) => {
                assert_eq!(p, path, "{message}");
            }
            other => panic!("not a link refusal: {other:?}"),
        }
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        assert!(message.contains("symbolic link"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    /// Every operation through `link` (a path whose first name beneath
    /// the root is a planted link) is refused and touches nothing outside.
    fn everything_through_is_refused(s: &Scene, link_path: &Path) {
        let data = link_path.join("state.safetensors");
        let create = s.beneath.open_file(
            &data,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            Some(Mode::from_bits_truncate(0o640)),
        );
        assert_link_refused(create.unwrap_err(), &data);
        let read = s
            .beneath
            .open_file(&link_path.join("keep"), OFlag::O_RDONLY, None);
        assert_link_refused(read.unwrap_err(), &link_path.join("keep"));
        let sub = link_path.join("sub");
        assert_link_refused(
            s.beneath
                .create_dir(&sub, Mode::from_bits_truncate(0o755))
                .unwrap_err(),
            &sub,
        );
        assert_link_refused(s.beneath.read_dir(link_path).unwrap_err(), link_path);
        assert_link_refused(
            s.beneath.lstat(&link_path.join("keep")).unwrap_err(),
            &link_path.join("keep"),
        );
        assert_link_refused(
            s.beneath.remove_file(&link_path.join("keep")).unwrap_err(),
            &link_path.join("keep"),
        );
        assert_link_refused(
            s.beneath
                .remove_dir_all(&link_path.join("keep"))
                .unwrap_err(),
            &link_path.join("keep"),
        );
        s.assert_outside_untouched();
    }

    #[test]
    fn the_walk_without_openat2_refuses_every_link_openat2_refuses() {
        let s = Scene::resolving(Resolver::Walk);
        symlink(&s.outside, s.root.join("job")).unwrap();
        everything_through_is_refused(&s, &s.root.join("job"));
        std::fs::create_dir(s.root.join("j2")).unwrap();
        symlink(&s.outside, s.root.join("j2/0")).unwrap();
        everything_through_is_refused(&s, &s.root.join("j2/0"));
        symlink("../outside", s.root.join("rel")).unwrap();
        everything_through_is_refused(&s, &s.root.join("rel"));
        std::fs::create_dir(s.root.join("step")).unwrap();
        let data = s.root.join("step/state.safetensors");
        symlink(s.outside.join("keep"), &data).unwrap();
        assert_link_refused(
            s.beneath
                .open_file(&data, OFlag::O_WRONLY, None)
                .unwrap_err(),
            &data,
        );
        let escape = open_beneath(
            Resolver::Walk,
            s.beneath.fd.as_fd(),
            Path::new("../outside/keep"),
            OFlag::O_RDONLY,
            None,
        );
        assert_eq!(escape.unwrap_err(), Errno::EXDEV);
        // What is really there is made, read and removed as with openat2.
        let dir = s.root.join("real/0");
        s.beneath
            .create_dir(&s.root.join("real"), Mode::from_bits_truncate(0o755))
            .unwrap();
        s.beneath
            .create_dir(&dir, Mode::from_bits_truncate(0o755))
            .unwrap();
        let file = dir.join("f");
        let mut f = s
            .beneath
            .open_file(
                &file,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                Some(Mode::from_bits_truncate(0o640)),
            )
            .unwrap();
        f.write_all(b"inside").unwrap();
        let mut back = String::new();
        s.beneath
            .open_file(&file, OFlag::O_RDONLY, None)
            .unwrap()
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, "inside");
        assert_eq!(s.beneath.read_dir(&dir).unwrap().len(), 1);
        s.beneath.remove_dir_all(&s.root.join("real")).unwrap();
        assert!(!s.root.join("real").exists());
        s.assert_outside_untouched();
    }

    #[test]
    fn a_link_at_a_job_directory_to_outside_is_refused_for_every_operation() {
        let s = Scene::new();
        let job = s.root.join("job");
        symlink(&s.outside, &job).unwrap();
        everything_through_is_refused(&s, &job);
        assert_eq!(s.beneath.lstat(&job).unwrap().unwrap().kind, Kind::Symlink);
    }

    #[test]
    fn a_link_at_a_rank_directory_is_refused() {
        let s = Scene::new();
        std::fs::create_dir(s.root.join("job")).unwrap();
        let rank = s.root.join("job/0");
        symlink(&s.outside, &rank).unwrap();
        everything_through_is_refused(&s, &rank);
    }

    #[test]
    fn an_absolute_link_and_a_relative_link_climbing_out_are_refused() {
        let s = Scene::new();
        symlink(&s.outside, s.root.join("abs")).unwrap();
        symlink("../outside", s.root.join("rel")).unwrap();
        everything_through_is_refused(&s, &s.root.join("abs"));
        everything_through_is_refused(&s, &s.root.join("rel"));
    }

    #[test]
    fn a_link_to_a_directory_inside_the_root_is_refused_too() {
        let s = Scene::new();
        std::fs::create_dir(s.root.join("real")).unwrap();
        std::fs::write(s.root.join("real/keep"), b"inside").unwrap();
        symlink(s.root.join("real"), s.root.join("alias")).unwrap();
        symlink("real", s.root.join("alias2")).unwrap();
        for alias in ["alias", "alias2"] {
            let e = s
                .beneath
                .open_file(&s.root.join(alias).join("keep"), OFlag::O_RDONLY, None)
                .unwrap_err();
            assert_link_refused(e, &s.root.join(alias).join("keep"));
        }
    }

    #[test]
    fn a_link_at_the_data_file_is_neither_written_nor_read_through() {
        let s = Scene::new();
        std::fs::create_dir(s.root.join("step")).unwrap();
        let data = s.root.join("step/state.safetensors");
        symlink(s.outside.join("keep"), &data).unwrap();
        for flags in [
            OFlag::O_RDONLY,
            OFlag::O_WRONLY,
            OFlag::O_WRONLY | OFlag::O_TRUNC,
        ] {
            assert_link_refused(s.beneath.open_file(&data, flags, None).unwrap_err(), &data);
        }
        // Creating over it fails (something is there), the target untouched.
        let create = s.beneath.open_file(
            &data,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            Some(Mode::from_bits_truncate(0o640)),
        );
        assert!(create.is_err());
        // Removing the tree unlinks the link, not its target.
        s.beneath.remove_dir_all(&s.root.join("step")).unwrap();
        assert!(!s.root.join("step").exists());
        s.assert_outside_untouched();
    }

    #[test]
    fn removing_a_tree_unlinks_links_inside_it_without_descending() {
        let s = Scene::new();
        let step = s.root.join("job/0/step-1.partial");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("MANIFEST.json"), b"{}").unwrap();
        symlink(&s.outside, step.join("escape")).unwrap();
        symlink(s.outside.join("keep"), step.join("file-link")).unwrap();
        s.beneath.remove_dir_all(&s.root.join("job")).unwrap();
        assert!(!s.root.join("job").exists());
        s.assert_outside_untouched();
        // A link given as the tree itself is unlinked too.
        symlink(&s.outside, s.root.join("trash")).unwrap();
        s.beneath.remove_dir_all(&s.root.join("trash")).unwrap();
        assert!(std::fs::symlink_metadata(s.root.join("trash")).is_err());
        s.assert_outside_untouched();
    }

    #[test]
    fn dot_dot_dot_and_paths_elsewhere_are_refused_before_any_call() {
        let s = Scene::new();
        for (path, component) in [
            (s.root.join("../outside/keep"), ".."),
            (s.root.join("job/../../outside/keep"), ".."),
        ] {
            match s.beneath.open_file(&path, OFlag::O_RDONLY, None) {
                Err(BeneathError::Refused(PathRefused::NotPlain { component: c, .. })) => {
                    assert_eq!(c, component, "{}", path.display());
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        match s.beneath.remove_dir_all(&s.outside) {
            Err(BeneathError::Refused(PathRefused::OutsideRoot { path, .. })) => {
                assert_eq!(path, s.outside);
            }
            other => panic!("{other:?}"),
        }
        match s.beneath.remove_dir_all(&s.root) {
            Err(BeneathError::Refused(PathRefused::IsRoot { .. })) => {}
            other => panic!("{other:?}"),
        }
        s.assert_outside_untouched();
    }

    #[test]
    fn the_kernel_refuses_an_escape_the_lexical_check_did_not_see() {
        // Driven below the lexical check: a '..' handed to openat2 itself.
        let s = Scene::new();
        let e = open_beneath(
            s.beneath.resolver,
            s.beneath.fd.as_fd(),
            Path::new("../outside/keep"),
            OFlag::O_RDONLY,
            None,
        )
        .unwrap_err();
        assert_eq!(e, Errno::EXDEV);
        let refused = s.beneath.failed("open", &s.root.join("../outside/keep"), e);
        assert!(
            matches!(refused, BeneathError::Refused(PathRefused::Escape { .. })),
            "{refused:?}"
        );
        assert_eq!(refused.raw_os_error(), Some(libc::EXDEV));
        assert!(refused.to_string().contains("would leave"), "{refused}");
    }

    #[test]
    fn the_root_itself_may_be_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let root = dir.path().join("root-link");
        symlink(&real, &root).unwrap();
        let beneath = Beneath::open(&root).unwrap();
        beneath
            .create_dir(&root.join("job"), Mode::from_bits_truncate(0o755))
            .unwrap();
        let mut f = beneath
            .open_file(
                &root.join("job/OWNER"),
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                Some(Mode::from_bits_truncate(0o640)),
            )
            .unwrap();
        f.write_all(b"1000\n").unwrap();
        assert_eq!(std::fs::read(real.join("job/OWNER")).unwrap(), b"1000\n");
    }

    #[test]
    fn plain_operations_work_beneath_the_root() {
        let s = Scene::new();
        let job = s.root.join("job");
        s.beneath
            .create_dir(&job, Mode::from_bits_truncate(0o755))
            .unwrap();
        assert_eq!(
            s.beneath
                .create_dir(&job, Mode::from_bits_truncate(0o755))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        let mut f = s
            .beneath
            .open_file(
                &job.join("a"),
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                Some(Mode::from_bits_truncate(0o640)),
            )
            .unwrap();
        f.write_all(b"hello").unwrap();
        drop(f);
        s.beneath.rename(&job.join("a"), &job.join("b")).unwrap();
        let mut back = String::new();
        s.beneath
            .open_file(&job.join("b"), OFlag::O_RDONLY, None)
            .unwrap()
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, "hello");
        assert_eq!(
            s.beneath.lstat(&job.join("b")).unwrap(),
            Some(Stat {
                kind: Kind::File,
                len: 5
            })
        );
        assert_eq!(s.beneath.lstat(&job.join("none")).unwrap(), None);
        assert_eq!(s.beneath.lstat(&job.join("none/deeper")).unwrap(), None);
        assert_eq!(s.beneath.lstat(&s.root).unwrap().unwrap().kind, Kind::Dir);
        let entries = s.beneath.read_dir(&s.root).unwrap();
        assert_eq!(
            entries,
            [Entry {
                name: "job".into(),
                kind: Kind::Dir
            }]
        );
        assert!(
            s.beneath
                .read_dir(&job.join("none"))
                .unwrap_err()
                .is_not_found()
        );
        s.beneath.remove_file(&job.join("b")).unwrap();
        s.beneath.remove_dir_all(&job).unwrap();
        assert!(s.beneath.read_dir(&s.root).unwrap().is_empty());
        s.assert_outside_untouched();
    }

    #[test]
    fn a_subdirectory_resolves_beneath_itself() {
        let s = Scene::new();
        let journal = s.root.join(".journal");
        s.beneath
            .create_dir(&journal, Mode::from_bits_truncate(0o750))
            .unwrap();
        let sub = s.beneath.subdir(&journal).unwrap();
        sub.open_file(
            &journal.join("e.json"),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            Some(Mode::from_bits_truncate(0o640)),
        )
        .unwrap();
        assert!(matches!(
            sub.open_file(&s.root.join("other"), OFlag::O_RDONLY, None),
            Err(BeneathError::Refused(PathRefused::OutsideRoot { .. }))
        ));
        // A journal directory that is a planted link is refused.
        std::fs::remove_file(journal.join("e.json")).unwrap();
        std::fs::remove_dir(&journal).unwrap();
        symlink(&s.outside, &journal).unwrap();
        assert_link_refused(s.beneath.subdir(&journal).unwrap_err(), &journal);
        s.assert_outside_untouched();
    }

    #[test]
    fn a_tree_deeper_than_the_bound_is_refused_not_recursed_forever() {
        let s = Scene::new();
        let mut deep = s.root.join("deep");
        for i in 0..=REMOVE_DEPTH_MAX {
            deep.push(format!("d{i}"));
        }
        std::fs::create_dir_all(&deep).unwrap();
        match s.beneath.remove_dir_all(&s.root.join("deep")) {
            Err(BeneathError::Refused(PathRefused::TooDeep { .. })) => {}
            other => panic!("{other:?}"),
        }
    }
}
