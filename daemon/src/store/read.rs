//! Reading snapshots back: the structural check that decides what is listed,
//! the verified chunk stream, and full verification.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gpusnap_kernels::ChunkChecksum;
use gpusnap_proto::convert::{to_u64, to_usize};

use crate::buffer_pool::{IO_ALIGN_BYTES, Lease, PoolBuf};
use crate::shared_memory::{CRC_BOUNCE_BYTES, SharedBytes};
use crate::storage::{Completion, IoBuf, OpKind, StorageError};
use crate::store::Store;
use crate::store::error::{DirectReadBlocker, Sink, StoreError};
use crate::store::layout::Layout;
use crate::store::manifest::{MANIFEST_LEN_MAX, Manifest, ManifestError};
use crate::store::paths::{self, SnapshotId};
use crate::store::pipeline::Pipeline;

/// Sees each chunk, unverified, in order: `(chunk_index, bytes)`.
type ChunkVisitor<'a> = dyn FnMut(u64, &[u8]) -> Result<(), StoreError> + 'a;

/// A snapshot whose manifest parses and matches its data file (length and
/// header). Its data is checked chunk by chunk as it is read.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub layout: Layout,
}

impl Snapshot {
    pub fn id(&self) -> SnapshotId {
        self.manifest.id()
    }

    pub fn data_path(&self) -> PathBuf {
        self.dir.join(paths::DATA_FILE)
    }
}

impl Snapshot {
    /// Checks chunk `index`'s bytes against its CRC32 in the manifest.
    fn check_chunk(
        &self,
        index: u64,
        bytes: &[u8],
        checksum: &dyn ChunkChecksum,
    ) -> Result<(), StoreError> {
        self.check_crc(index, checksum.chunk_crc32(bytes))
    }

    /// Checks the CRC32 `found` of chunk `index` against the manifest; the
    /// error names the chunk, its byte range and the tensors in it.
    fn check_crc(&self, index: u64, found: u32) -> Result<(), StoreError> {
        let m = &self.manifest;
        let Some(&expected) = m.chunk_crc32.get(to_usize(index)) else {
            return Err(StoreError::Manifest {
                dir: self.dir.clone(),
                source: ManifestError::Inconsistent(format!(
                    "no CRC for chunk {index} of {}",
                    m.chunk_crc32.len()
                )),
            });
        };
        if expected == found {
            return Ok(());
        }
        let (start, end) = m.chunk_range(index);
        Err(StoreError::ChunkCorrupt {
            path: self.data_path(),
            chunk: index,
            start,
            end,
            expected,
            found,
            tensors: self.layout.tensors_in(start, end),
        })
    }
}

/// What [`Store::verify`] found.
#[derive(Debug)]
pub struct VerifyReport {
    pub dir: PathBuf,
    /// Present when the manifest and the file's structure are sound.
    pub snapshot: Option<Snapshot>,
    pub chunks_checked: u64,
    pub problems: Vec<StoreError>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.snapshot.is_some() && self.problems.is_empty()
    }
}

impl Store {
    /// Opens the snapshot in `dir`: the manifest parses, obeys every rule,
    /// and matches the data file's length and header byte for byte.
    /// `expected` (when the directory's place says which snapshot it must be)
    /// is checked against the manifest.
    pub fn open_dir(
        &self,
        dir: &Path,
        expected: Option<&SnapshotId>,
    ) -> Result<Snapshot, StoreError> {
        let storage = self.storage();
        let (manifest, layout) = self.read_manifest(dir, expected)?;
        let data_path = dir.join(paths::DATA_FILE);
        let actual = storage
            .metadata(&data_path)?
            .filter(|m| !m.is_dir)
            .map(|m| m.len);
        let Some(actual) = actual else {
            return Err(StoreError::Storage(StorageError::io(
                "open",
                &data_path,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            )));
        };
        if actual != manifest.file_len {
            return Err(StoreError::LengthMismatch {
                path: data_path,
                expected: manifest.file_len,
                actual,
            });
        }
        let on_disk = storage.read_at(&data_path, 0, to_usize(manifest.header_len))?;
        // Rebuilt with the manifest's own format version (never the
        // build's), so every version this build reads is listed.
        let rebuilt = layout.encode_header(&manifest.header_metadata())?;
        if on_disk != rebuilt || self.checksum().chunk_crc32(&on_disk) != manifest.header_crc32 {
            return Err(StoreError::HeaderCorrupt {
                path: data_path,
                header_len: manifest.header_len,
            });
        }
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            manifest,
            layout,
        })
    }

    /// The manifest in `dir`, parsed and checked against every rule (and
    /// against `expected`, the snapshot the directory's place names). The
    /// data file is not touched: [`Store::open_dir`] checks it on top.
    pub fn read_manifest(
        &self,
        dir: &Path,
        expected: Option<&SnapshotId>,
    ) -> Result<(Manifest, Layout), StoreError> {
        let manifest_path = dir.join(paths::MANIFEST_FILE);
        let bytes = match self
            .storage()
            .read_file_limited(&manifest_path, MANIFEST_LEN_MAX)
        {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(StoreError::ManifestMissing {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let manifest_err = |source| StoreError::Manifest {
            dir: dir.to_path_buf(),
            source,
        };
        let (manifest, layout) = Manifest::parse(&bytes, self.format()).map_err(manifest_err)?;
        if let Some(id) = expected {
            manifest.check_place(id).map_err(manifest_err)?;
        }
        Ok((manifest, layout))
    }

    /// The checked manifest of the committed snapshot `id`, read without
    /// touching its data file (what a client may learn of a snapshot
    /// before reading it). [`StoreError::NotFound`] when `id` is not
    /// committed; a committed directory whose manifest is missing or does
    /// not check is an error of the manifest.
    pub fn committed_manifest(&self, id: &SnapshotId) -> Result<(Manifest, Layout), StoreError> {
        paths::validate_job(&id.job)?;
        let dir = id.dir(self.root());
        match self.read_manifest(&dir, Some(id)) {
            Err(StoreError::ManifestMissing { .. }) if self.storage().metadata(&dir)?.is_none() => {
                Err(StoreError::NotFound {
                    job: id.job.clone(),
                    rank: id.rank,
                    step: Some(id.step),
                })
            }
            other => other,
        }
    }

    /// Streams the data section to `sink` in order, one chunk at a time:
    /// `sink(data_offset, bytes)`. Each chunk's CRC32 is checked before its
    /// bytes are handed out; a mismatch stops the read with an error naming
    /// the chunk, its byte range and the tensors in it.
    pub fn read(&self, snapshot: &Snapshot, sink: &mut Sink<'_>) -> Result<(), StoreError> {
        let path = snapshot.data_path();
        let m = &snapshot.manifest;
        let checksum = &**self.checksum();
        self.read_chunks(snapshot, &mut |index, bytes| {
            snapshot.check_chunk(index, bytes, checksum)?;
            let (start, _) = m.chunk_range(index);
            sink(start, bytes).map_err(|source| StoreError::Sink {
                path: path.clone(),
                source,
            })
        })
    }

    /// Reads the data section straight into `dst` (no copy through pool
    /// buffers: O_DIRECT into the caller's memory), then checks every
    /// chunk's CRC32; `dst` holds nothing the caller may use unless this
    /// returns Ok. `dst` must start 4096-aligned and hold the data section
    /// rounded up to 4096 bytes (the last transfer is padded); the chunks
    /// must be 4096-byte multiples. Otherwise, or for an empty section,
    /// [`StoreError::DirectReadUnsupported`] says why and [`Store::read`] is
    /// the way.
    pub fn read_into(&self, snapshot: &Snapshot, dst: &mut [u8]) -> Result<(), StoreError> {
        self.read_into_shared(snapshot, SharedBytes::from_private(dst))
    }

    /// As [`Store::read_into`], into memory another process may write (a
    /// staging slot): O_DIRECT into the region, and every chunk's CRC32
    /// checked through the handle (never a slice over the shared bytes)
    /// before Ok. The preconditions and the errors are `read_into`'s. No
    /// pool buffer is used (every transfer lands in `dst`), so a direct
    /// read never waits for persists that hold the pool.
    pub fn read_into_shared(
        &self,
        snapshot: &Snapshot,
        dst: SharedBytes<'_>,
    ) -> Result<(), StoreError> {
        let chunk_bytes = to_usize(snapshot.manifest.chunk_bytes).max(1);
        let mut bounce = vec![0u8; CRC_BOUNCE_BYTES.min(chunk_bytes)];
        self.read_direct(snapshot, dst, &mut bounce)
    }

    /// The direct read: O_DIRECT of every chunk into its place in `dst`,
    /// `queue_depth` in flight, each chunk's CRC32 computed through the
    /// handle (via `bounce`) and checked as it completes while later reads
    /// are in flight.
    fn read_direct(
        &self,
        snapshot: &Snapshot,
        dst: SharedBytes<'_>,
        bounce: &mut [u8],
    ) -> Result<(), StoreError> {
        let checksum = &**self.checksum();
        let m = &snapshot.manifest;
        let path = snapshot.data_path();
        let align = IO_ALIGN_BYTES as u64;
        let padded_len = m.data_len.next_multiple_of(align);
        let blocker = if !dst.addr().is_multiple_of(IO_ALIGN_BYTES) {
            Some(DirectReadBlocker::UnalignedDestination { addr: dst.addr() })
        } else if to_u64(dst.len()) < padded_len {
            Some(DirectReadBlocker::DestinationTooSmall {
                len: dst.len(),
                needed: padded_len,
            })
        } else if m.chunk_bytes == 0 || !m.chunk_bytes.is_multiple_of(align) {
            Some(DirectReadBlocker::UnalignedChunks {
                chunk_bytes: m.chunk_bytes,
            })
        } else if m.data_len == 0 {
            Some(DirectReadBlocker::EmptyDataSection)
        } else {
            None
        };
        if let Some(why) = blocker {
            return Err(StoreError::DirectReadUnsupported { path, why });
        }
        let chunk_count = to_u64(m.chunk_crc32.len());
        let qd = self.config().queue_depth;
        let mut file = self.storage().open_data_file(&path, qd)?;
        // Every transfer lands in `dst`: no pool buffer is needed.
        let mut pipe = Pipeline::new(&mut *file, Lease::empty(), &path);
        let mut submitted = 0u64;
        let mut finished = 0u64;
        while finished < chunk_count {
            while submitted < chunk_count && pipe.in_flight() < qd {
                let (start, end) = m.chunk_range(submitted);
                let padded = to_usize(end - start).next_multiple_of(IO_ALIGN_BYTES);
                // Inside `dst`: its length was checked against the padded
                // data section above.
                let target = dst.subrange(to_usize(start), padded)?;
                // SAFETY: `dst` is valid for this whole call (its maker's
                // contract, or the caller's exclusive borrow); the pipeline
                // waits for every read before this function returns (or its
                // Drop does); a read it cannot drain is left to the data
                // file's Drop, which waits it out or, failing that, aborts
                // the process (the storage module's rule for borrowed
                // memory); and nothing here touches a chunk's bytes before
                // its read completed.
                let region = unsafe { target.raw_region() };
                pipe.submit(
                    OpKind::Read,
                    m.header_len + start,
                    padded,
                    IoBuf::Borrowed(region),
                    submitted,
                )?;
                submitted += 1;
            }
            for c in pipe.next_reads()? {
                let (start, _) = m.chunk_range(c.op.tag);
                let want = chunk_read_len(m, &c, &path)?;
                // Checked while later reads are in flight; the caller sees
                // none of `dst` before every chunk is checked.
                let piece = dst.subrange(to_usize(start), want)?;
                snapshot.check_crc(c.op.tag, piece.crc32(checksum, bounce))?;
                finished += 1;
            }
        }
        pipe.drain()
    }

    /// Re-reads every chunk of the snapshot in `dir` and reports every
    /// problem found (it does not stop at the first corrupt chunk).
    pub fn verify(&self, dir: &Path) -> VerifyReport {
        let mut report = VerifyReport {
            dir: dir.to_path_buf(),
            snapshot: None,
            chunks_checked: 0,
            problems: Vec::new(),
        };
        let snapshot = match self.open_dir(dir, None) {
            Ok(s) => s,
            Err(e) => {
                report.problems.push(e);
                return report;
            }
        };
        let mut corrupt = Vec::new();
        let mut checked = 0u64;
        let checksum = &**self.checksum();
        let result = self.read_chunks(&snapshot, &mut |index, bytes| {
            checked += 1;
            if let Err(e) = snapshot.check_chunk(index, bytes, checksum) {
                corrupt.push(e);
            }
            Ok(())
        });
        report.chunks_checked = checked;
        report.problems.extend(corrupt);
        if let Err(e) = result {
            report.problems.push(e);
        }
        report.snapshot = Some(snapshot);
        report
    }

    /// Reads chunk after chunk through pool buffers, `queue_depth` in
    /// flight, and hands each to `on_chunk` in order (unverified).
    fn read_chunks(
        &self,
        snapshot: &Snapshot,
        on_chunk: &mut ChunkVisitor<'_>,
    ) -> Result<(), StoreError> {
        let m = &snapshot.manifest;
        let path = snapshot.data_path();
        let pool = self.pool();
        let buf_bytes = pool.buf_bytes();
        if m.chunk_bytes > to_u64(buf_bytes) {
            return Err(StoreError::ChunkLargerThanBuffer {
                path,
                chunk_bytes: m.chunk_bytes,
                buf_bytes,
            });
        }
        let chunk_count = to_u64(m.chunk_crc32.len());
        if chunk_count == 0 {
            return Ok(());
        }
        let qd = self.config().queue_depth;
        let mut file = self.storage().open_data_file(&path, qd)?;
        let lease = self.lease(qd.min(pool.capacity() / 2).max(1))?;
        let mut pipe = Pipeline::new(&mut *file, lease, &path);
        let mut next_submit = 0u64;
        let mut next_deliver = 0u64;
        let mut ready: BTreeMap<u64, (PoolBuf, usize)> = BTreeMap::new();
        while next_deliver < chunk_count {
            // Keep the queue full while buffers last.
            while next_submit < chunk_count && pipe.in_flight() < qd {
                let Some(buf) = pipe.try_take_buffer() else {
                    break;
                };
                let (start, end) = m.chunk_range(next_submit);
                let padded = to_usize(end - start).next_multiple_of(IO_ALIGN_BYTES);
                pipe.submit(
                    OpKind::Read,
                    m.header_len + start,
                    padded,
                    IoBuf::Pooled(buf),
                    next_submit,
                )?;
                next_submit += 1;
            }
            for c in pipe.next_reads()? {
                let read = chunk_read_len(m, &c, &path);
                let IoBuf::Pooled(mut buf) = c.op.buf else {
                    unreachable!("reads here use pool buffers only");
                };
                let want = match read {
                    Ok(want) => want,
                    Err(e) => {
                        pipe.put_back(buf);
                        return Err(e);
                    }
                };
                buf.set_filled(want);
                ready.insert(c.op.tag, (buf, want));
            }
            while let Some(entry) = ready.first_entry() {
                if *entry.key() != next_deliver {
                    break;
                }
                let (buf, _) = entry.remove();
                let outcome = on_chunk(next_deliver, buf.data());
                pipe.put_back(buf);
                outcome?;
                next_deliver += 1;
            }
        }
        pipe.drain()
    }
}

/// The length of the chunk a finished read was for, or the error when the
/// read moved fewer bytes (the file ends early).
fn chunk_read_len(m: &Manifest, c: &Completion, path: &Path) -> Result<usize, StoreError> {
    let (start, end) = m.chunk_range(c.op.tag);
    let want = to_usize(end - start);
    let got = match &c.result {
        Ok(n) => *n,
        Err(_) => unreachable!("the pipeline hands out successful reads only"),
    };
    if got < want {
        return Err(StoreError::ShortTransfer {
            op: "read",
            path: path.to_path_buf(),
            offset: c.op.offset,
            expected: want,
            done: got,
        });
    }
    Ok(want)
}
