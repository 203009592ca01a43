//! Writing one snapshot and committing it atomically.
//!
//! The protocol, and why each step is there:
//!
//! 1. `mkdir step-N.partial`: everything is written where no reader looks.
//! 2. Create `state.safetensors` with its final size reserved (fallocate: a
//!    full disk fails here, before any byte is written), write the header and
//!    the data with O_DIRECT in aligned blocks (the last block zero-padded),
//!    trim to the exact length, fdatasync. CRC32 of each chunk is computed
//!    through the store's [`ChunkChecksum`](gpusnap_kernels::ChunkChecksum)
//!    from the source's bytes, while the transfer is in flight.
//! 3. Write `MANIFEST.json`, fdatasync.
//! 4. fsync `step-N.partial/`: both files' entries are durable.
//! 5. rename `step-N.partial` -> `step-N`: readers see all or nothing.
//! 6. fsync the rank directory: the rename is durable. Only now is the
//!    snapshot committed.
//!
//! Any error fails the snapshot: the directory is removed, nothing is retried
//! on the same file, and earlier snapshots are untouched. A crash at any
//! point leaves either a `.partial` directory (removed at start-up and never
//! read) or a complete snapshot.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use gpusnap_proto::convert::{to_u64, to_usize};

use crate::buffer_pool::IO_ALIGN_BYTES;
use crate::shared_memory::{CRC_BOUNCE_BYTES, SharedBytes};
use crate::storage::{DataFile, IoBuf, OpKind, RawRegion, Storage};
use crate::store::error::{Fill, StoreError};
use crate::store::layout::Layout;
use crate::store::manifest::{self, FORMAT_NAME, Manifest};
use crate::store::paths::{self, SnapshotId};
use crate::store::pipeline::Pipeline;
use crate::store::{CommitStep, JobDirs, Store};

/// Where a snapshot's data section comes from.
pub enum Source<'a> {
    /// The whole data section in private memory, laid out as the layout
    /// says, its start 4096-byte aligned. Written with no copy.
    Memory(&'a [u8]),
    /// The whole data section in memory another process may write (a
    /// staging slot), laid out and aligned as for `Memory`. Written with
    /// O_DIRECT straight from the region, no copy; its CRCs are computed
    /// through the handle.
    Shared(SharedBytes<'a>),
    /// A producer that fills the data section piece by piece, in order:
    /// `fill(offset, buf)` writes data bytes `offset..offset + buf.len()`.
    /// Memory use stays at the I/O buffer pool's size whatever the snapshot's.
    Stream(&'a mut Fill<'a>),
}

impl Source<'_> {
    /// Address and length of a source held in memory.
    fn memory(&self) -> Option<(usize, usize)> {
        match self {
            Source::Memory(m) => Some((m.as_ptr() as usize, m.len())),
            Source::Shared(s) => Some((s.addr(), s.len())),
            Source::Stream(_) => None,
        }
    }
}

impl std::fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Memory(m) => write!(f, "Source::Memory({} bytes)", m.len()),
            Source::Shared(s) => write!(f, "Source::Shared({} bytes)", s.len()),
            Source::Stream(_) => f.write_str("Source::Stream"),
        }
    }
}

/// Milliseconds since the Unix epoch, for the manifest's `created_unix_ms`
/// (informational: nothing is decided by it). A clock set before 1970 reads
/// as 0; the count saturates in 584 million years.
fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a successful commit reports.
#[derive(Debug, Clone)]
pub struct Committed {
    pub manifest: Manifest,
    pub dir: std::path::PathBuf,
}

/// Writes `len` bytes at `offset` through a pool buffer: takes a buffer,
/// lets `fill` write its first `len` bytes, zero-pads it to the next 4096
/// bytes and submits the padded transfer; returns what `fill` returned. A
/// `fill` that fails gives the buffer back and submits nothing.
fn write_through_buffer<T>(
    pipe: &mut Pipeline<'_>,
    offset: u64,
    len: usize,
    tag: u64,
    fill: impl FnOnce(&mut [u8]) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let padded = len.next_multiple_of(IO_ALIGN_BYTES);
    let mut buf = pipe.take_buffer()?;
    assert!(
        padded <= buf.buf_bytes(),
        "a {padded}-byte transfer through a {}-byte buffer",
        buf.buf_bytes()
    );
    let filled = {
        let (dst, rest) = buf.space_mut().split_at_mut(len);
        let filled = fill(dst);
        if let Some(pad) = rest.get_mut(..padded - len) {
            pad.fill(0);
        }
        filled
    };
    match filled {
        Ok(out) => {
            buf.set_filled(len);
            pipe.submit(OpKind::Write, offset, padded, IoBuf::Pooled(buf), tag)?;
            Ok(out)
        }
        Err(e) => {
            pipe.put_back(buf);
            Err(e)
        }
    }
}

impl Store {
    pub(crate) fn commit_snapshot(
        &self,
        id: &SnapshotId,
        layout: &Layout,
        world_size: u32,
        source: Source<'_>,
    ) -> Result<Committed, StoreError> {
        if world_size == 0 || id.rank >= world_size {
            return Err(StoreError::RankOutsideWorld {
                id: id.clone(),
                world_size,
            });
        }
        if let Some((addr, len)) = source.memory() {
            let actual = to_u64(len);
            if actual != layout.data_len {
                return Err(StoreError::SourceLength {
                    expected: layout.data_len,
                    actual,
                });
            }
            if !addr.is_multiple_of(IO_ALIGN_BYTES) {
                return Err(StoreError::SourceAlignment { addr });
            }
        }
        let storage = self.storage();
        let root = self.root();
        let final_dir = id.dir(root);
        if storage.metadata(&final_dir)?.is_some() {
            return Err(StoreError::AlreadyCommitted { id: id.clone() });
        }
        self.ensure_rank_dir(id)?;
        let partial = id.partial_dir(root);
        if storage.metadata(&partial)?.is_some() {
            tracing::warn!(dir = %partial.display(), "removing a partial snapshot left by an earlier failed attempt");
            storage.remove_dir_all(&partial)?;
        }
        storage.create_dir(&partial)?;
        self.stop_point(id, CommitStep::PartialCreated);

        let result = self.write_and_commit(id, layout, world_size, source, &partial, &final_dir);
        if let Err(e) = &result {
            tracing::error!(snapshot = %id, error = %e, "snapshot failed; removing its directory");
            let removed = match storage.remove_dir_all(&partial) {
                Err(r) if !r.is_not_found() => Err(StoreError::from(r)),
                _ => Ok(()),
            }
            .and_then(|()| match storage.metadata(&final_dir) {
                // Renamed, but the rename's fsync failed: not committed.
                Ok(Some(_)) => self.discard_committed(&final_dir),
                Ok(None) => Ok(()),
                Err(r) => Err(r.into()),
            });
            if let Err(r) = removed {
                tracing::error!(snapshot = %id, error = %r, "could not remove a failed snapshot's directory; start-up recovery or the next commit removes it");
            }
        }
        result
    }

    fn write_and_commit(
        &self,
        id: &SnapshotId,
        layout: &Layout,
        world_size: u32,
        source: Source<'_>,
        partial: &Path,
        final_dir: &Path,
    ) -> Result<Committed, StoreError> {
        let storage = self.storage();
        let format_version = self.format().writes();
        let header =
            layout.encode_header(&manifest::header_metadata(id, world_size, format_version))?;
        let header_len = to_u64(header.len());
        let file_len = header_len + layout.data_len;
        let data_path = partial.join(paths::DATA_FILE);
        let chunk_bytes = self.pool().buf_bytes();

        let mut file = storage.create_data_file(&data_path, file_len, self.config().queue_depth)?;
        let backend = file.backend();
        let chunk_crc32 = self.write_data_file(
            id,
            &mut *file,
            &data_path,
            &header,
            header_len,
            layout.data_len,
            source,
        )?;
        drop(file);
        self.stop_point(id, CommitStep::DataSynced);

        let manifest = Manifest {
            format: FORMAT_NAME.to_owned(),
            format_version,
            job: id.job.clone(),
            rank: id.rank,
            world_size,
            step: id.step,
            created_unix_ms: unix_ms_now(),
            io_backend: backend,
            data_file: paths::DATA_FILE.to_owned(),
            file_len,
            header_len,
            header_crc32: self.checksum().chunk_crc32(&header),
            data_len: layout.data_len,
            chunk_bytes: to_u64(chunk_bytes),
            chunk_crc32,
            tensors: layout.tensors.clone(),
        };
        let manifest_err = |source| StoreError::Manifest {
            dir: partial.to_path_buf(),
            source,
        };
        // What we are about to commit obeys every rule a reader checks.
        manifest.check(self.format()).map_err(manifest_err)?;
        let json = manifest.to_json().map_err(manifest_err)?;
        storage.write_file_synced(&partial.join(paths::MANIFEST_FILE), &json)?;
        self.stop_point(id, CommitStep::ManifestSynced);
        storage.sync_dir(partial)?;
        self.stop_point(id, CommitStep::PartialDirSynced);
        storage.rename(partial, final_dir)?;
        self.stop_point(id, CommitStep::Renamed);
        storage.sync_dir(&id.rank_dir(self.root()))?;
        self.stop_point(id, CommitStep::Committed);
        tracing::info!(snapshot = %id, bytes = file_len, tensors = layout.tensors.len(), %backend, "snapshot committed");
        Ok(Committed {
            manifest,
            dir: final_dir.to_path_buf(),
        })
    }

    /// Writes header and data, trims the file to its length and syncs it
    /// (all fenced by the pipeline: nothing touches the file after its first
    /// error); returns the CRC32 of each data chunk.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; the pieces of one write"
    )]
    fn write_data_file(
        &self,
        id: &SnapshotId,
        file: &mut dyn DataFile,
        path: &Path,
        header: &[u8],
        header_len: u64,
        data_len: u64,
        mut source: Source<'_>,
    ) -> Result<Vec<u32>, StoreError> {
        let pool = self.pool();
        let checksum = &**self.checksum();
        let chunk_bytes = pool.buf_bytes();
        let qd = self.config().queue_depth;
        let lease_len = match source {
            // Pool buffers carry only the header and the padded tail.
            Source::Memory(_) | Source::Shared(_) => 2,
            Source::Stream(_) => qd.min(pool.capacity() / 2).max(2),
        };
        let lease = self.lease(lease_len)?;
        let mut pipe = Pipeline::new(file, lease, path);
        // Shared bytes are checksummed through a private copy, a piece at a
        // time (the memory may not be borrowed as a slice).
        let mut bounce = match source {
            Source::Shared(_) => vec![0u8; CRC_BOUNCE_BYTES.min(chunk_bytes)],
            Source::Memory(_) | Source::Stream(_) => Vec::new(),
        };

        for (piece_index, piece) in header.chunks(chunk_bytes).enumerate() {
            let offset = to_u64(piece_index * chunk_bytes);
            write_through_buffer(&mut pipe, offset, piece.len(), 0, |dst| {
                dst.copy_from_slice(piece);
                Ok(())
            })?;
        }

        let chunk = to_u64(chunk_bytes);
        let chunk_count = gpusnap_kernels::reference::chunk_count(data_len, chunk);
        let mut crcs = Vec::with_capacity(to_usize(chunk_count));
        for index in 0..chunk_count {
            let start = index * chunk;
            let len = to_usize((data_len - start).min(chunk));
            let aligned = len.is_multiple_of(IO_ALIGN_BYTES);
            let offset = header_len + start;
            let begin = to_usize(start);
            let crc = match &mut source {
                Source::Memory(mem) => {
                    let Some(bytes) = mem.get(begin..begin + len) else {
                        unreachable!("source length was checked against the layout");
                    };
                    if aligned {
                        // SAFETY: `bytes` is borrowed from the caller for this
                        // whole call, and the kernel only reads it. The
                        // pipeline drains every transfer before
                        // `write_data_file` returns (or its Drop does); a
                        // transfer it cannot drain is left to the data file's
                        // Drop, which waits it out or, failing that, aborts
                        // the process (the storage module's rule for
                        // borrowed memory): the kernel never reads `bytes`
                        // after this call.
                        let region = unsafe { RawRegion::new(bytes.as_ptr().cast_mut(), len) };
                        pipe.submit(OpKind::Write, offset, len, IoBuf::Borrowed(region), index)?;
                    } else {
                        write_through_buffer(&mut pipe, offset, len, index, |dst| {
                            dst.copy_from_slice(bytes);
                            Ok(())
                        })?;
                    }
                    // Computed while the transfer is in flight.
                    checksum.chunk_crc32(bytes)
                }
                Source::Shared(mem) => {
                    let piece = mem.subrange(begin, len)?;
                    if aligned {
                        // SAFETY: the handle's contract keeps the bytes mapped
                        // for its lifetime, which outlives this call, and the
                        // kernel only reads the region. The pipeline drains
                        // every transfer before this call returns (or its
                        // Drop does); a transfer it cannot drain is left to
                        // the data file's Drop, which waits it out or,
                        // failing that, aborts the process (the storage
                        // module's rule for borrowed memory), so the slot is
                        // never read after it is freed or unmapped.
                        let region = unsafe { piece.raw_region() };
                        pipe.submit(OpKind::Write, offset, len, IoBuf::Borrowed(region), index)?;
                        // Computed while the transfer is in flight, from the
                        // bytes as the daemon reads them: if the trainer
                        // writes them meanwhile, the CRC exposes it.
                        piece.crc32(checksum, &mut bounce)
                    } else {
                        // The padded tail: copied out once, and the CRC is of
                        // exactly the copy written.
                        write_through_buffer(&mut pipe, offset, len, index, |dst| {
                            piece.copy_to(0, dst)?;
                            Ok(checksum.chunk_crc32(dst))
                        })?
                    }
                }
                Source::Stream(fill) => {
                    write_through_buffer(&mut pipe, offset, len, index, |dst| {
                        fill(start, dst).map_err(|source| StoreError::Source {
                            id: id.clone(),
                            offset: start,
                            source,
                        })?;
                        Ok(checksum.chunk_crc32(dst))
                    })?
                }
            };
            crcs.push(crc);
        }
        pipe.drain()?;
        assert_eq!(to_u64(crcs.len()), chunk_count, "one CRC per chunk written");
        self.stop_point(id, CommitStep::DataWritten);
        pipe.set_len(header_len + data_len)?;
        pipe.sync_data()?;
        Ok(crcs)
    }

    /// Makes the rank directory of `id` durable, with its job directory
    /// too when commits make job directories ([`JobDirs::MadeByCommits`]);
    /// under [`JobDirs::Claimed`] a missing job directory is
    /// [`StoreError::JobMissing`] and is never made here.
    fn ensure_rank_dir(&self, id: &SnapshotId) -> Result<(), StoreError> {
        let root = self.root();
        let top = match self.job_dirs() {
            JobDirs::MadeByCommits => root.to_path_buf(),
            JobDirs::Claimed => {
                let job_dir = id.job_dir(root);
                if self.storage().metadata(&job_dir)?.is_none() {
                    return Err(StoreError::JobMissing {
                        job: id.job.clone(),
                        dir: job_dir,
                    });
                }
                job_dir
            }
        };
        self.ensure_dir_durable(&id.rank_dir(root), &top)
    }

    /// Creates `dir` and any missing parents below `top` (which must exist),
    /// fsyncing each parent that gained an entry, so the new directory
    /// survives power loss. Each directory is made by one `mkdir`, never
    /// with its parents: one that vanished meanwhile fails the call with
    /// its ENOENT instead of being made again.
    pub(crate) fn ensure_dir_durable(&self, dir: &Path, top: &Path) -> Result<(), StoreError> {
        let storage: &dyn Storage = self.storage();
        if storage.metadata(dir)?.is_some() {
            return Ok(());
        }
        let mut missing = vec![dir.to_path_buf()];
        let mut cursor = dir.parent();
        while let Some(parent) = cursor {
            if parent == top || storage.metadata(parent)?.is_some() {
                break;
            }
            missing.push(parent.to_path_buf());
            cursor = parent.parent();
        }
        for created in missing.iter().rev() {
            match storage.create_dir(created) {
                Ok(()) => {}
                // Another writer of the same job made it first.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(parent) = created.parent() {
                storage.sync_dir(parent)?;
            }
        }
        Ok(())
    }
}
