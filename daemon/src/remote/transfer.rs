//! Moving one rank's snapshot between the local store and the object
//! store, every byte checked against the manifest's CRCs on the way.
//!
//! Upload ([`upload`], [`upload_from`]): the data file goes up as a
//! multipart upload, part by part, never from staging: each part is copied
//! from the daemon's hot copy of the step while the hot tier holds it
//! ([`HotSource`]: no disk read beside the next persist), else read from
//! the committed local file with `pread`. Every CRC chunk of a part (and
//! the safetensors header in the first) is checked against the manifest
//! before the part is sent, so the object store never receives bytes the
//! local disk (or memory) corrupted. Part
//! boundaries fall on CRC chunk boundaries, so each part is checked whole.
//! At most `concurrency` parts are in memory. Then the manifest, unchanged,
//! with a conditional put: it is the rank's commit record, so a data object
//! without it is not a snapshot. A step whose manifest is already there is
//! not uploaded again (the same snapshot: skipped; another one: a conflict,
//! never overwritten).
//!
//! Download ([`download`]): the manifest (its digest checked against the
//! marker when there is one), the data object's length, the header, then
//! the data section in ranged GETs of whole CRC chunks, `concurrency` at
//! once, each chunk checked before its bytes are used; the verified bytes
//! stream into the local store's ordinary commit (a `.partial` directory,
//! fdatasync, manifest, rename), and the restore then reads the local copy.
//! Into the local store first rather than straight into staging: the
//! staging slot is not held through a network transfer, the restore reads
//! the copy with the one verified reader every local snapshot goes
//! through, a second restore of the same step (a restart, another attempt
//! at agreement) does not download again, and the replaced node has a
//! local snapshot again. The price is one local write, which NVMe does
//! faster than the network delivers.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use gpusnap_kernels::ChunkChecksum;
use gpusnap_proto::convert::{to_u64, to_usize};
use object_store::path::Path as ObjectPath;

use crate::metrics::Metrics;
use crate::remote::bucket::{Bucket, RemoteError};
use crate::remote::config::{Credentials, PART_BYTES_MIN, PARTS_MAX, RemoteConfig};
use crate::remote::journal::{Journal, OpenUpload};
use crate::remote::keys::Keys;
use crate::remote::marker::{MANIFEST_LEN_MAX, RankEntry, sha256_hex};
use crate::remote::throttle::Throttle;
use crate::store::error::SourceError;
use crate::store::paths::MANIFEST_FILE;
use crate::store::{FormatVersion, Layout, Manifest, Snapshot, SnapshotId, Source, Store};

/// What one transfer may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Target size of a part or a ranged GET, rounded to whole CRC chunks.
    pub part_bytes: u64,
    /// Parts or ranges in flight (and in memory) at once.
    pub concurrency: usize,
}

/// Where and how transfers go.
#[derive(Debug, Clone)]
pub struct Tier {
    pub bucket: Bucket,
    pub keys: Keys,
    pub limits: Limits,
    pub throttle: Arc<Throttle>,
    pub journal: Option<Journal>,
}

impl Tier {
    /// The tier `config` describes, signing with the credentials it names
    /// (a file, else the environment). `journal_root`: where open multipart
    /// uploads are journalled (the daemon's store root), so that a later run
    /// aborts what a kill left open; `None` for one-off tools whose uploads
    /// end (or abort) before they exit.
    pub fn open(
        config: &RemoteConfig,
        metrics: Option<Arc<Metrics>>,
        stopping: tokio::sync::watch::Receiver<bool>,
        journal_root: Option<&std::path::Path>,
    ) -> Result<Tier, RemoteError> {
        let credentials = Credentials::load(config.credentials_file.as_deref(), |k| {
            std::env::var(k).ok()
        })
        .map_err(|e| RemoteError::Client(e.to_string()))?;
        let bucket = Bucket::new(config, &credentials, metrics, stopping)?;
        let journal = journal_root.map(Journal::open).transpose()?;
        Ok(Tier {
            bucket,
            keys: Keys::new(&config.prefix),
            limits: Limits {
                part_bytes: config.part_bytes.0,
                concurrency: config.concurrency,
            },
            throttle: Arc::new(Throttle::new(
                config.bandwidth_bytes_per_s.0,
                config.part_bytes.0,
            )),
            journal,
        })
    }
}

/// What [`upload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uploaded {
    /// The data and then the manifest went up.
    Sent { bytes: u64, manifest_sha256: String },
    /// The object store already had this snapshot (its manifest agrees).
    AlreadyThere { manifest_sha256: String },
}

impl Uploaded {
    pub fn manifest_sha256(&self) -> &str {
        match self {
            Uploaded::Sent {
                manifest_sha256, ..
            }
            | Uploaded::AlreadyThere { manifest_sha256 } => manifest_sha256,
        }
    }
}

/// File ranges of the parts of `manifest`'s data file: each but the last
/// ends on a CRC chunk boundary of the data section and is at least
/// `part_bytes` long (grown so there are at most [`PARTS_MAX`]).
pub fn plan_parts(manifest: &Manifest, part_bytes: u64) -> Vec<std::ops::Range<u64>> {
    let file_len = manifest.file_len;
    let chunk = manifest.chunk_bytes.max(1);
    let target = part_bytes
        .max(PART_BYTES_MIN)
        .max(file_len.div_ceil(PARTS_MAX));
    let mut parts = Vec::new();
    let mut start = 0u64;
    while start < file_len {
        let want = start.saturating_add(target);
        let end = if want >= file_len {
            file_len
        } else {
            // The next chunk boundary at or after `want`.
            let into_data = want.saturating_sub(manifest.header_len);
            let boundary = manifest.header_len + into_data.div_ceil(chunk) * chunk;
            boundary.min(file_len)
        };
        parts.push(start..end);
        start = end;
    }
    parts
}

/// Checks the file bytes `range` (a part, or a ranged GET: whole CRC chunks,
/// the header included when it starts at 0) against `manifest`.
pub fn check_range(
    manifest: &Manifest,
    layout: &Layout,
    range: &std::ops::Range<u64>,
    bytes: &[u8],
    checksum: &dyn ChunkChecksum,
) -> Result<(), String> {
    if to_u64(bytes.len()) != range.end - range.start {
        return Err(format!(
            "bytes {}..{} are {} bytes long",
            range.start,
            range.end,
            bytes.len()
        ));
    }
    let mut at = range.start;
    if at == 0 {
        let header_len = to_usize(manifest.header_len);
        let Some(header) = bytes.get(..header_len) else {
            return Err("the part is shorter than the header".into());
        };
        let rebuilt = layout
            .encode_header(&manifest.header_metadata())
            .map_err(|e| e.to_string())?;
        if checksum.chunk_crc32(header) != manifest.header_crc32 || header != rebuilt.as_slice() {
            return Err("the safetensors header does not match the manifest".into());
        }
        at = manifest.header_len;
    }
    let chunk = manifest.chunk_bytes.max(1);
    while at < range.end {
        let data_off = at - manifest.header_len;
        if !data_off.is_multiple_of(chunk) {
            return Err(format!("byte {at} is not on a CRC chunk boundary"));
        }
        let index = data_off / chunk;
        let (start, end) = manifest.chunk_range(index);
        let file_end = manifest.header_len + end;
        if file_end > range.end || end <= start {
            return Err(format!(
                "chunk {index} (data bytes {start}..{end}) is cut by the range's end {}",
                range.end
            ));
        }
        let from = to_usize(at - range.start);
        let piece = bytes
            .get(from..from + to_usize(end - start))
            .ok_or_else(|| format!("chunk {index} lies outside the bytes read"))?;
        let expected = manifest.chunk_crc32.get(to_usize(index)).copied();
        let found = checksum.chunk_crc32(piece);
        if expected != Some(found) {
            return Err(format!(
                "chunk {index} (data bytes {start}..{end}, tensors {:?}) has CRC32 {found:#010x}, the manifest says {}",
                layout.tensors_in(start, end),
                expected.map_or("nothing".into(), |e| format!("{e:#010x}"))
            ));
        }
        at = file_end;
    }
    Ok(())
}

/// The manifest file's bytes as committed, checked to be the manifest of
/// `snapshot` (the directory cannot have changed under us).
fn local_manifest_bytes(snapshot: &Snapshot) -> Result<Vec<u8>, RemoteError> {
    let path = snapshot.dir.join(MANIFEST_FILE);
    let io = |source| RemoteError::Io {
        path: path.clone(),
        source,
    };
    let len = std::fs::metadata(&path).map_err(io)?.len();
    if len > MANIFEST_LEN_MAX {
        return Err(RemoteError::Corrupt {
            key: path.display().to_string(),
            why: format!("{len} bytes"),
        });
    }
    let bytes = std::fs::read(&path).map_err(io)?;
    let parsed: Manifest = serde_json::from_slice(&bytes).map_err(|e| RemoteError::Corrupt {
        key: path.display().to_string(),
        why: e.to_string(),
    })?;
    if parsed != snapshot.manifest {
        return Err(RemoteError::Corrupt {
            key: path.display().to_string(),
            why: "the manifest changed since the snapshot was opened".into(),
        });
    }
    Ok(bytes)
}

/// Whether two manifests describe the same snapshot (the bytes may differ:
/// the time, the I/O backend, and the chunking when the stores' settings
/// differ). `Err` says what differs.
pub fn same_snapshot(a: &Manifest, b: &Manifest) -> Result<(), String> {
    if a.id() != b.id() || a.world_size != b.world_size {
        return Err(format!(
            "{} of world {} vs {} of world {}",
            a.id(),
            a.world_size,
            b.id(),
            b.world_size
        ));
    }
    if a.data_len != b.data_len || a.tensors != b.tensors {
        return Err("the tensor tables differ".into());
    }
    if a.chunk_bytes == b.chunk_bytes && a.chunk_crc32 != b.chunk_crc32 {
        return Err("the data differs (chunk CRCs)".into());
    }
    Ok(())
}

/// Uploads the committed local `snapshot` (see the module doc).
pub async fn upload(
    tier: &Tier,
    snapshot: &Snapshot,
    checksum: &Arc<dyn ChunkChecksum>,
) -> Result<Uploaded, RemoteError> {
    upload_from(tier, snapshot, checksum, None).await
}

/// Where the daemon's hot copy of a snapshot may be found: a part is read
/// from it (no disk read beside the next step's persist) while the hot
/// tier still holds that step, from the file otherwise. The hot copy is
/// held only while one part is copied out of it, so the hot tier's buffer
/// reuse and budget stay as they are.
#[derive(Debug, Clone)]
pub struct HotSource {
    pub tier: Arc<crate::hot_tier::HotTier>,
    pub key: crate::ranks::RankKey,
}

/// [`upload`], each part read from `hot` when it holds the step (checked
/// against the manifest like a part read from the file; a hot copy that
/// fails the check is read again from the file).
pub async fn upload_from(
    tier: &Tier,
    snapshot: &Snapshot,
    checksum: &Arc<dyn ChunkChecksum>,
    hot: Option<HotSource>,
) -> Result<Uploaded, RemoteError> {
    let id = snapshot.id();
    let manifest_key = tier.keys.manifest(&id);
    let snap = snapshot.clone();
    let manifest_bytes = Bytes::from(
        tokio::task::spawn_blocking(move || local_manifest_bytes(&snap))
            .await
            .map_err(|e| RemoteError::Client(e.to_string()))??,
    );
    let manifest_sha256 = sha256_hex(&manifest_bytes);
    if let Some(existing) = already_there(tier, &manifest_key, &snapshot.manifest).await? {
        return Ok(Uploaded::AlreadyThere {
            manifest_sha256: existing,
        });
    }
    // The data file is opened once: retention may remove the directory
    // meanwhile, and the open file still reads.
    let data_path = snapshot.data_path();
    let file = std::fs::File::open(&data_path).map_err(|source| RemoteError::Io {
        path: data_path.clone(),
        source,
    })?;
    let file = Arc::new(file);
    let data_key = tier.keys.data(&id);
    let bytes = upload_data(tier, snapshot, &file, &data_path, &data_key, checksum, hot).await?;
    match tier
        .bucket
        .create(&manifest_key, manifest_bytes.clone())
        .await
    {
        Ok(()) | Err(RemoteError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    // Read back: a create sent again after a lost answer, or a racing
    // writer, leaves an object that may not be ours.
    let back = tier
        .bucket
        .get_small(&manifest_key, MANIFEST_LEN_MAX)
        .await?;
    if back != manifest_bytes {
        return Err(RemoteError::Conflict {
            key: manifest_key.to_string(),
            why: "another manifest is already there".into(),
        });
    }
    Ok(Uploaded::Sent {
        bytes,
        manifest_sha256,
    })
}

/// `Some(digest)` when `key` already holds a manifest of the same snapshot
/// as `local`; a different one is a conflict.
async fn already_there(
    tier: &Tier,
    key: &ObjectPath,
    local: &Manifest,
) -> Result<Option<String>, RemoteError> {
    if tier.bucket.exists(key).await?.is_none() {
        return Ok(None);
    }
    let bytes = tier.bucket.get_small(key, MANIFEST_LEN_MAX).await?;
    let remote: Manifest = serde_json::from_slice(&bytes).map_err(|e| RemoteError::Corrupt {
        key: key.to_string(),
        why: e.to_string(),
    })?;
    same_snapshot(local, &remote).map_err(|why| RemoteError::Conflict {
        key: key.to_string(),
        why: format!("the object store holds another snapshot of this step: {why}"),
    })?;
    Ok(Some(sha256_hex(&bytes)))
}

/// A multipart upload that is aborted (and forgotten by the journal) unless
/// it was completed.
struct OpenMultipart<'t> {
    tier: &'t Tier,
    key: ObjectPath,
    id: String,
    done: bool,
}

impl Drop for OpenMultipart<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (bucket, key, id) = (self.tier.bucket.clone(), self.key.clone(), self.id.clone());
        let journal = self.tier.journal.clone();
        // Aborted in the background (a drop cannot wait); the journal keeps
        // the entry until the abort went through, so a failed or
        // interrupted abort is retried at the next start.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                match bucket.abort_multipart(&key, &id).await {
                    Ok(()) => {
                        if let Some(j) = journal {
                            let _ = j.forget(key.as_ref());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "could not abort an unfinished multipart upload; it is retried at the next start")
                    }
                }
            });
        }
    }
}

async fn upload_data(
    tier: &Tier,
    snapshot: &Snapshot,
    file: &Arc<std::fs::File>,
    data_path: &Path,
    data_key: &ObjectPath,
    checksum: &Arc<dyn ChunkChecksum>,
    hot: Option<HotSource>,
) -> Result<u64, RemoteError> {
    let manifest = &snapshot.manifest;
    let parts = plan_parts(manifest, tier.limits.part_bytes);
    // The header a hot part starts with: rebuilt from the manifest (the
    // part's check compares it with the manifest's CRC all the same).
    let header: Option<Arc<Vec<u8>>> = match &hot {
        Some(_) => snapshot
            .layout
            .encode_header(&manifest.header_metadata())
            .ok()
            .map(Arc::new),
        None => None,
    };
    let id = tier.bucket.create_multipart(data_key).await?;
    if let Some(journal) = &tier.journal {
        journal.record(&OpenUpload {
            key: data_key.to_string(),
            upload_id: id.clone(),
        })?;
    }
    let mut open = OpenMultipart {
        tier,
        key: data_key.clone(),
        id: id.clone(),
        done: false,
    };
    let part_ids: Vec<_> = futures::stream::iter(parts.iter().cloned().enumerate())
        .map(|(index, range)| {
            let file = Arc::clone(file);
            let snapshot = snapshot.clone();
            let checksum = Arc::clone(checksum);
            let path = data_path.to_path_buf();
            let id = id.clone();
            let hot = hot.clone();
            let header = header.clone();
            async move {
                let len = range.end - range.start;
                let bytes = tokio::task::spawn_blocking(move || -> Result<Bytes, RemoteError> {
                    let mut buf = vec![0u8; to_usize(len)];
                    let from_hot = match (&hot, &header) {
                        (Some(hot), Some(header)) => {
                            copy_from_hot(hot, &snapshot.manifest, header, &range, &mut buf)
                        }
                        _ => false,
                    };
                    let hot_ok = from_hot
                        && check_range(
                            &snapshot.manifest,
                            &snapshot.layout,
                            &range,
                            &buf,
                            checksum.as_ref(),
                        )
                        .is_ok();
                    if hot_ok {
                        return Ok(Bytes::from(buf));
                    }
                    if from_hot {
                        tracing::warn!(snapshot = %snapshot.id(), part = index, "the hot copy's part fails its check; reading it from the file");
                    }
                    file.read_exact_at(&mut buf, range.start)
                        .map_err(|source| RemoteError::Io {
                            path: path.clone(),
                            source,
                        })?;
                    check_range(
                        &snapshot.manifest,
                        &snapshot.layout,
                        &range,
                        &buf,
                        checksum.as_ref(),
                    )
                    .map_err(|why| RemoteError::LocalCorrupt {
                        path: path.clone(),
                        why,
                    })?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| RemoteError::Client(e.to_string()))??;
                tier.throttle.acquire(len).await;
                tier.bucket.put_part(data_key, &id, index, bytes).await
            }
        })
        .buffered(tier.limits.concurrency)
        .try_collect()
        .await?;
    tier.bucket
        .complete_multipart(data_key, &id, part_ids)
        .await?;
    open.done = true;
    if let Some(journal) = &tier.journal {
        journal.forget(data_key.as_ref())?;
    }
    let meta = tier.bucket.head(data_key).await?;
    if meta.size != manifest.file_len {
        return Err(RemoteError::Corrupt {
            key: data_key.to_string(),
            why: format!(
                "the uploaded object is {} bytes, the file {}",
                meta.size, manifest.file_len
            ),
        });
    }
    Ok(manifest.file_len)
}

/// Copies file bytes `range` of the snapshot into `buf` from the hot tier's
/// copy of it (the header from `header`), when the hot tier still holds
/// that step with a data section of the manifest's length. `false`: it
/// does not, and `buf` is untouched.
fn copy_from_hot(
    hot: &HotSource,
    manifest: &Manifest,
    header: &[u8],
    range: &std::ops::Range<u64>,
    buf: &mut [u8],
) -> bool {
    let Some(copy) = hot.tier.get(&hot.key, Some(manifest.step)) else {
        return false;
    };
    let header_len = to_u64(header.len());
    if header_len != manifest.header_len
        || header_len + to_u64(copy.data.len()) != manifest.file_len
    {
        return false;
    }
    let mut at = range.start;
    let mut out = 0usize;
    if at < header_len {
        let end = range.end.min(header_len);
        let piece = &header[to_usize(at)..to_usize(end)];
        buf[..piece.len()].copy_from_slice(piece);
        out = piece.len();
        at = end;
    }
    if at < range.end {
        let from = to_usize(at - header_len);
        let to = to_usize(range.end - header_len);
        let Some(piece) = copy.data.get(from..to) else {
            return false;
        };
        buf[out..out + piece.len()].copy_from_slice(piece);
    }
    true
}

/// The manifest of `id` in the object store, its digest checked against
/// `expected` (the marker's entry) when given; with its layout.
pub async fn remote_manifest(
    tier: &Tier,
    format: FormatVersion,
    id: &SnapshotId,
    expected: Option<&RankEntry>,
) -> Result<(Manifest, Layout, String), RemoteError> {
    let key = tier.keys.manifest(id);
    let bytes = tier.bucket.get_small(&key, MANIFEST_LEN_MAX).await?;
    let digest = sha256_hex(&bytes);
    let corrupt = |why: String| RemoteError::Corrupt {
        key: key.to_string(),
        why,
    };
    if let Some(entry) = expected
        && entry.manifest_sha256 != digest
    {
        return Err(corrupt(format!(
            "its SHA-256 is {digest}, the step's COMPLETE marker says {}",
            entry.manifest_sha256
        )));
    }
    let (manifest, layout) = Manifest::parse(&bytes, format).map_err(|e| corrupt(e.to_string()))?;
    if &manifest.id() != id {
        return Err(corrupt(format!("it describes {}", manifest.id())));
    }
    if let Some(entry) = expected
        && entry.file_len != manifest.file_len
    {
        return Err(corrupt(format!(
            "data file of {} bytes, the marker says {}",
            manifest.file_len, entry.file_len
        )));
    }
    Ok((manifest, layout, digest))
}

/// Downloads `id` into the local store (see the module doc) and returns the
/// local snapshot. `expected` is the marker's entry for the rank, when the
/// step is complete by its marker. A local directory of that step must not
/// exist (the caller discards a corrupt one first).
pub async fn download(
    tier: &Tier,
    store: &Arc<Store>,
    id: &SnapshotId,
    expected: Option<&RankEntry>,
) -> Result<Snapshot, RemoteError> {
    let (manifest, layout, _) = remote_manifest(tier, store.format(), id, expected).await?;
    let data_key = tier.keys.data(id);
    let corrupt = |why: String| RemoteError::Corrupt {
        key: data_key.to_string(),
        why,
    };
    let meta = match tier.bucket.head(&data_key).await {
        Ok(meta) => meta,
        Err(RemoteError::NotFound { .. }) => {
            return Err(corrupt(
                "missing: the manifest names a data file that is not there".into(),
            ));
        }
        Err(e) => return Err(e),
    };
    if meta.size != manifest.file_len {
        return Err(corrupt(format!(
            "{} bytes, the manifest says {}",
            meta.size, manifest.file_len
        )));
    }
    // The header is rebuilt by the local commit; it is downloaded and
    // checked anyway, so a damaged object is reported as such.
    let header = tier
        .bucket
        .get_range(&data_key, 0..manifest.header_len)
        .await?;
    check_range(
        &manifest,
        &layout,
        &(0..manifest.header_len),
        &header,
        store.checksum().as_ref(),
    )
    .map_err(&corrupt)?;
    let ranges: Vec<std::ops::Range<u64>> = plan_parts(&manifest, tier.limits.part_bytes)
        .into_iter()
        .map(|r| r.start.max(manifest.header_len)..r.end)
        .filter(|r| r.start < r.end)
        .collect();
    let (pieces_tx, pieces_rx) = crossbeam_channel::bounded::<Bytes>(2);
    let writer = {
        let store = Arc::clone(store);
        let id = id.clone();
        let layout = layout.clone();
        let world = manifest.world_size;
        tokio::task::spawn_blocking(move || write_local(&store, &id, &layout, world, &pieces_rx))
    };
    let fetched = async {
        let mut pieces = futures::stream::iter(ranges)
            .map(|range| {
                let manifest = manifest.clone();
                let layout = layout.clone();
                let checksum = Arc::clone(store.checksum());
                let data_key = data_key.clone();
                async move {
                    let bytes = tier.bucket.get_range(&data_key, range.clone()).await?;
                    let checked = bytes.clone();
                    tokio::task::spawn_blocking(move || {
                        check_range(&manifest, &layout, &range, &checked, checksum.as_ref())
                    })
                    .await
                    .map_err(|e| RemoteError::Client(e.to_string()))?
                    .map_err(|why| RemoteError::Corrupt {
                        key: data_key.to_string(),
                        why,
                    })?;
                    Ok::<Bytes, RemoteError>(bytes)
                }
            })
            .buffered(tier.limits.concurrency);
        while let Some(piece) = pieces.next().await {
            let piece = piece?;
            let tx = pieces_tx.clone();
            // The writer is slower than the network only on a slow disk; a
            // send blocks then, bounded by the writer's own waits.
            let sent = tokio::task::spawn_blocking(move || tx.send(piece).is_ok())
                .await
                .unwrap_or(false);
            if !sent {
                break;
            }
        }
        Ok::<(), RemoteError>(())
    }
    .await;
    drop(pieces_tx);
    let written = writer
        .await
        .map_err(|e| RemoteError::Client(e.to_string()))?;
    fetched?;
    let local = written?;
    same_snapshot(&manifest, &local.manifest).map_err(|why| RemoteError::Corrupt {
        key: data_key.to_string(),
        why: format!("the local copy differs: {why}"),
    })?;
    Ok(local)
}

/// Commits `id` from verified data pieces arriving in order on `pieces`; a
/// channel that closes early fails the fill (and so the commit: nothing is
/// listed).
fn write_local(
    store: &Store,
    id: &SnapshotId,
    layout: &Layout,
    world_size: u32,
    pieces: &crossbeam_channel::Receiver<Bytes>,
) -> Result<Snapshot, RemoteError> {
    let mut current = Bytes::new();
    let mut fill = |offset: u64, buf: &mut [u8]| -> Result<(), SourceError> {
        let mut filled = 0;
        while filled < buf.len() {
            if current.is_empty() {
                current = pieces.recv_timeout(crate::store::POOL_WAIT_MAX).map_err(
                    |_| -> SourceError {
                        format!(
                            "the download ended before data byte {}",
                            offset + to_u64(filled)
                        )
                        .into()
                    },
                )?;
            }
            let n = current.len().min(buf.len() - filled);
            let piece = current.split_to(n);
            buf.get_mut(filled..filled + n)
                .expect("n fits in what is left of buf")
                .copy_from_slice(&piece);
            filled += n;
        }
        Ok(())
    };
    store.commit_laid_out(id, layout, world_size, Source::Stream(&mut fill))?;
    Ok(store.find(&id.job, id.rank, Some(id.step))?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use gpusnap_proto::{Dtype, TensorSpec};

    use super::*;
    use crate::store::{StoreConfig, paths::DATA_FILE};

    /// A committed snapshot of about `mib` MiB in 64 KiB CRC chunks.
    fn committed(dir: &Path, mib: u64) -> (Store, Snapshot) {
        let store = Store::open(StoreConfig {
            root: dir.to_path_buf(),
            io_buffer_bytes: 64 << 10,
            ..StoreConfig::default()
        })
        .unwrap();
        let id = SnapshotId::new("job", 0, 3).unwrap();
        let tensors = vec![
            TensorSpec::new("w", Dtype::F32, [mib << 18]),
            TensorSpec::new("step", Dtype::I64, []),
        ];
        let mut fill = |offset: u64, buf: &mut [u8]| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (offset + to_u64(i)).to_le_bytes()[1];
            }
            Ok(())
        };
        store
            .write_snapshot(&id, &tensors, 1, Source::Stream(&mut fill))
            .unwrap();
        let snapshot = store.find("job", 0, Some(3)).unwrap();
        (store, snapshot)
    }

    #[test]
    fn parts_cover_the_file_and_end_on_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, s) = committed(dir.path(), 13);
        let m = &s.manifest;
        for part_bytes in [0, PART_BYTES_MIN, PART_BYTES_MIN + 1, 6 << 20, 64 << 20] {
            let parts = plan_parts(m, part_bytes);
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts.last().unwrap().end, m.file_len);
            assert!(to_u64(parts.len()) <= PARTS_MAX);
            for pair in parts.windows(2) {
                assert_eq!(pair[0].end, pair[1].start, "contiguous");
            }
            for part in &parts[..parts.len() - 1] {
                assert!(part.end - part.start >= part_bytes.max(PART_BYTES_MIN));
                assert!((part.end - m.header_len).is_multiple_of(m.chunk_bytes));
            }
        }
        assert_eq!(
            plan_parts(m, PART_BYTES_MIN).len(),
            3,
            "13 MiB in 5 MiB parts"
        );
        assert_eq!(plan_parts(m, 64 << 20).len(), 1);
    }

    #[test]
    fn parts_come_from_the_hot_copy_while_the_hot_tier_holds_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let (store, s) = committed(dir.path(), 11);
        let m = &s.manifest;
        let file = std::fs::read(s.dir.join(DATA_FILE)).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new().unwrap());
        let hot = Arc::new(crate::hot_tier::HotTier::new(
            64 << 20,
            Arc::clone(store.checksum()),
            metrics,
        ));
        let key = crate::ranks::RankKey::new("job".to_owned(), 0);
        let source = HotSource {
            tier: Arc::clone(&hot),
            key: key.clone(),
        };
        let header = s.layout.encode_header(&m.header_metadata()).unwrap();
        let parts = plan_parts(m, PART_BYTES_MIN);
        let mut buf = vec![0u8; to_usize(parts[0].end)];
        assert!(
            !copy_from_hot(&source, m, &header, &parts[0], &mut buf),
            "nothing hot yet"
        );
        assert!(hot.offer(&key, m, &s.layout, |data| {
            data.copy_from_slice(&file[to_usize(m.header_len)..]);
        }));
        for part in &parts {
            let mut buf = vec![0u8; to_usize(part.end - part.start)];
            assert!(copy_from_hot(&source, m, &header, part, &mut buf));
            assert!(
                buf == file[to_usize(part.start)..to_usize(part.end)],
                "part {part:?} from memory is the file's bytes"
            );
            check_range(m, &s.layout, part, &buf, store.checksum().as_ref()).unwrap();
        }
        hot.discard(&key, m.step);
        let mut buf = vec![0u8; to_usize(parts[1].end - parts[1].start)];
        assert!(!copy_from_hot(&source, m, &header, &parts[1], &mut buf));
    }

    #[test]
    fn a_flipped_byte_in_a_chunk_or_the_header_fails_its_part() {
        let dir = tempfile::tempdir().unwrap();
        let (store, s) = committed(dir.path(), 11);
        let m = &s.manifest;
        let bytes = std::fs::read(s.dir.join(DATA_FILE)).unwrap();
        let checksum = store.checksum().as_ref();
        let parts = plan_parts(m, PART_BYTES_MIN);
        for part in &parts {
            let piece = &bytes[to_usize(part.start)..to_usize(part.end)];
            check_range(m, &s.layout, part, piece, checksum).unwrap();
        }
        let second = &parts[1];
        let mut piece = bytes[to_usize(second.start)..to_usize(second.end)].to_vec();
        piece[4097] ^= 1;
        let why = check_range(m, &s.layout, second, &piece, checksum).unwrap_err();
        assert!(why.contains("CRC32") && why.contains("\"w\""), "{why}");
        let first = &parts[0];
        let mut piece = bytes[to_usize(first.start)..to_usize(first.end)].to_vec();
        piece[20] ^= 1;
        let why = check_range(m, &s.layout, first, &piece, checksum).unwrap_err();
        assert!(why.contains("header"), "{why}");
        let short = &bytes[to_usize(second.start)..to_usize(second.end) - 1];
        assert!(check_range(m, &s.layout, second, short, checksum).is_err());
    }
}
