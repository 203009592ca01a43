//! Target `safetensors`: the reader `gpusnapctl inspect` and `verify` use
//! on a snapshot directory ([`Store::open_dir`], [`Store::verify`]): the
//! manifest, the data file's length, its safetensors header rebuilt from
//! the manifest and compared byte for byte, and every chunk's CRC32.
//!
//! The store sits on the in-memory [`SimStorage`], a fresh one per input
//! (its configuration and buffer pool made once per process); each input
//! writes one snapshot directory into it. An input is
//! either raw (a manifest and a data file, as bytes) or a valid snapshot
//! built from a few tensors the input picks and then damaged by up to
//! [`MUTATIONS_MAX`] edits of the file or the manifest (a header length of
//! 2^63, a truncation, an offset past the end, a CRC too many, ...).
//!
//! Invariants: the reader answers every directory with a snapshot or
//! named problems, never a panic; a snapshot `verify` calls sound is a
//! valid safetensors file (the `safetensors` crate reads it) with exactly
//! the manifest's tensor table, is `file_len` bytes long, has every chunk
//! matching its CRC, and reads back (`Store::read`) as its data section.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use gpusnap_kernels::reference::chunk_crc32;
use gpusnap_proto::convert::{to_u64, to_usize};
use gpusnap_proto::{Dtype, TensorSpec};
use gpusnapd::buffer_pool::BufferPool;
use gpusnapd::storage::sim::SimStorage;
use gpusnapd::storage::{BackendKind, Storage};
use gpusnapd::store::manifest::{FORMAT_NAME, FORMAT_VERSION, Manifest};
use gpusnapd::store::paths::{DATA_FILE, MANIFEST_FILE};
use gpusnapd::store::{Layout, SnapshotId, Store, StoreConfig};

use crate::cursor::Cursor;

/// Most edits applied to a built snapshot.
pub const MUTATIONS_MAX: usize = 4;
/// Largest data section a built snapshot has.
const DATA_BYTES_MAX: u64 = 64 << 10;
/// The store's I/O buffer: chunks larger than this are refused by name.
const IO_BUFFER_BYTES: usize = 16 << 10;
/// Most tensors in a built snapshot.
const TENSORS_MAX: usize = 6;

/// What each input's store is made of: its configuration and the buffer
/// pool, made once per process.
struct Fixture {
    config: StoreConfig,
    pool: BufferPool,
    dir: PathBuf,
}

fn fixture() -> &'static Mutex<Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = PathBuf::from("/fuzz-store");
        let config = StoreConfig {
            root: root.clone(),
            keep_snapshots: 1,
            queue_depth: 4,
            io_buffer_bytes: IO_BUFFER_BYTES,
            io_pool_bytes: 8 * IO_BUFFER_BYTES,
            ..StoreConfig::default()
        };
        let pool =
            BufferPool::new(config.io_pool_bytes, config.io_buffer_bytes).expect("a small pool");
        let dir = SnapshotId::new("job".to_owned(), 0, 1)
            .expect("a valid id")
            .dir(&root);
        Mutex::new(Fixture { config, pool, dir })
    })
}

/// A store on a fresh, empty simulated file system (the simulator keeps
/// every inode it ever made, so one per input keeps memory flat).
fn fresh_store(fixture: &Fixture) -> Store {
    let storage: Arc<dyn Storage> = Arc::new(SimStorage::new(&fixture.config.root));
    Store::with_storage(fixture.config.clone(), storage, fixture.pool.clone())
        .expect("a store on simulated storage")
}

/// Writes one snapshot directory from `data` and reads it back as
/// `inspect` and `verify` do (see the module doc).
pub fn safetensors(data: &[u8]) {
    let mut input = Cursor::new(data);
    let (manifest_bytes, file) = if input.u8().is_multiple_of(4) {
        let manifest_len = usize::from(input.u16());
        (input.bytes(manifest_len).to_vec(), input.rest().to_vec())
    } else {
        let Some((manifest, file)) = built(&mut input) else {
            return;
        };
        (manifest, file)
    };
    let fixture = fixture().lock().unwrap_or_else(PoisonError::into_inner);
    let store = fresh_store(&fixture);
    write_dir(&store, &fixture.dir, &manifest_bytes, &file);
    check_read(&store, &fixture.dir, &file);
}

/// Makes the snapshot directory, holding these two files.
fn write_dir(store: &Store, dir: &Path, manifest: &[u8], file: &[u8]) {
    let storage = store.storage();
    let mut made = PathBuf::new();
    for component in dir.components() {
        made.push(component);
        if storage.metadata(&made).expect("sim metadata").is_none() {
            storage.create_dir(&made).expect("sim mkdir");
        }
    }
    storage
        .write_file_synced(&dir.join(MANIFEST_FILE), manifest)
        .expect("sim write");
    storage
        .write_file_synced(&dir.join(DATA_FILE), file)
        .expect("sim write");
}

/// Reads the directory back and checks what the reader said.
fn check_read(store: &Store, dir: &Path, file: &[u8]) {
    let opened = store.open_dir(dir, None);
    let report = store.verify(dir);
    for problem in &report.problems {
        assert!(!problem.to_string().is_empty(), "a problem is named");
    }
    assert_eq!(
        opened.is_ok(),
        report.snapshot.is_some(),
        "inspect and verify agree on the structure: {:?}",
        report.problems
    );
    let Some(snapshot) = report.snapshot.as_ref() else {
        assert!(!report.problems.is_empty(), "a refusal names its problem");
        return;
    };
    let m = &snapshot.manifest;
    crate::manifest::check(m, &snapshot.layout);
    assert_eq!(
        to_u64(file.len()),
        m.file_len,
        "sound structure: exact length"
    );
    let header = file.get(..to_usize(m.header_len)).expect("header inside");
    assert_eq!(
        chunk_crc32(header),
        m.header_crc32,
        "sound structure: header CRC"
    );
    let rebuilt = snapshot
        .layout
        .encode_header(&m.header_metadata())
        .expect("rebuilt");
    assert_eq!(header, rebuilt.as_slice(), "the header is the rebuilt one");
    if !report.is_ok() {
        return;
    }
    assert_eq!(report.chunks_checked, to_u64(m.chunk_crc32.len()));
    let data = file.get(to_usize(m.header_len)..).expect("data section");
    let chunk = to_usize(m.chunk_bytes);
    for (i, (bytes, &crc)) in data.chunks(chunk).zip(&m.chunk_crc32).enumerate() {
        assert_eq!(chunk_crc32(bytes), crc, "chunk {i} of a verified snapshot");
    }
    let parsed = ::safetensors::SafeTensors::deserialize(file)
        .expect("a verified snapshot is a safetensors file");
    let names = parsed.names();
    assert_eq!(names.len(), m.tensors.len(), "the same tensor count");
    for t in &m.tensors {
        let view = parsed.tensor(&t.name).expect("every manifest tensor");
        assert_eq!(view.dtype().to_string(), t.dtype.name(), "{}", t.name);
        let shape: Vec<u64> = view.shape().iter().map(|&d| to_u64(d)).collect();
        assert_eq!(shape, t.shape, "{}", t.name);
        let start = to_usize(t.offset);
        assert_eq!(
            view.data(),
            data.get(start..start + to_usize(t.len)).expect("inside"),
            "{}",
            t.name
        );
    }
    let mut back = Vec::with_capacity(data.len());
    store
        .read(snapshot, &mut |offset, bytes| {
            assert_eq!(offset, to_u64(back.len()), "chunks in order");
            back.extend_from_slice(bytes);
            Ok(())
        })
        .expect("a verified snapshot reads");
    assert_eq!(back, data, "read back as written");
}

/// A valid snapshot of tensors the input picks, then damaged by its edits:
/// the manifest's bytes and the data file's, or `None` when the tensors
/// are not a valid set or too large.
fn built(input: &mut Cursor<'_>) -> Option<(Vec<u8>, Vec<u8>)> {
    let count = usize::from(input.u8()) % (TENSORS_MAX + 1);
    let specs: Vec<TensorSpec> = (0..count)
        .map(|i| {
            let dtype = Dtype::ALL[usize::from(input.u8()) % Dtype::ALL.len()];
            let dims = usize::from(input.u8()) % 3;
            let shape: Vec<u64> = (0..dims).map(|_| u64::from(input.u8())).collect();
            let name = match input.u8() % 8 {
                0 => input.string(12),
                _ => format!("t{i}"),
            };
            TensorSpec::new(name, dtype, shape)
        })
        .collect();
    let layout = Layout::plan(&specs).ok()?;
    if layout.data_len > DATA_BYTES_MAX {
        return None;
    }
    let id = SnapshotId::new("job".to_owned(), 0, 1).ok()?;
    let world_size = 1 + u32::from(input.u8() % 4);
    let metadata = gpusnapd::store::manifest::header_metadata(&id, world_size, FORMAT_VERSION);
    let header = layout.encode_header(&metadata).ok()?;
    let seed = input.u8();
    let data: Vec<u8> = (0..layout.data_len)
        .map(|i| seed.wrapping_add(u8::try_from(i % 251).expect("below 251")))
        .collect();
    let chunk_bytes = 4096 * (1 + u64::from(input.u8() % 8));
    let crcs: Vec<u32> = data
        .chunks(to_usize(chunk_bytes))
        .map(chunk_crc32)
        .collect();
    let mut manifest = Manifest {
        format: FORMAT_NAME.to_owned(),
        format_version: FORMAT_VERSION,
        job: id.job.clone(),
        rank: id.rank,
        world_size,
        step: id.step,
        created_unix_ms: 1,
        io_backend: BackendKind::Buffered,
        data_file: DATA_FILE.to_owned(),
        file_len: to_u64(header.len()) + layout.data_len,
        header_len: to_u64(header.len()),
        header_crc32: chunk_crc32(&header),
        data_len: layout.data_len,
        chunk_bytes,
        chunk_crc32: crcs,
        tensors: layout.tensors,
    };
    let mut file = header;
    file.extend_from_slice(&data);
    let edits = usize::from(input.u8()) % (MUTATIONS_MAX + 1);
    for _ in 0..edits {
        damage(input, &mut manifest, &mut file);
    }
    let manifest = manifest.to_json().ok()?;
    Some((manifest, file))
}

/// One edit of the file or the manifest.
fn damage(input: &mut Cursor<'_>, m: &mut Manifest, file: &mut Vec<u8>) {
    let at = usize::from(input.u16());
    let value = input.num();
    match input.u8() % 16 {
        // The safetensors header length: 2^63, u64::MAX, just past the end.
        0 => {
            let len = match value % 4 {
                0 => 1u64 << 63,
                1 => u64::MAX,
                2 => to_u64(file.len()) + 1,
                _ => value,
            };
            if let Some(prefix) = file.get_mut(..8) {
                prefix.copy_from_slice(&len.to_le_bytes());
            }
        }
        1 => {
            let len = file.len();
            if let Some(b) = file.get_mut(at % len.max(1)) {
                *b ^= u8::try_from(value & 0xff).expect("masked").max(1);
            }
        }
        2 => file.truncate(at),
        3 => file.resize(file.len() + at % 8192, 0),
        4 => m.header_len = value,
        5 => m.file_len = value,
        6 => m.data_len = value,
        7 => m.chunk_bytes = value,
        8 => m
            .chunk_crc32
            .push(u32::try_from(value & 0xffff_ffff).expect("masked")),
        9 => {
            m.chunk_crc32.pop();
        }
        10 => m.header_crc32 ^= 1,
        11 => {
            let n = m.tensors.len();
            if let Some(t) = m.tensors.get_mut(at % n.max(1)) {
                t.offset = value;
            }
        }
        12 => {
            let n = m.tensors.len();
            if let Some(t) = m.tensors.get_mut(at % n.max(1)) {
                t.len = value;
            }
        }
        13 => {
            let n = m.tensors.len();
            if let Some(t) = m.tensors.get_mut(at % n.max(1)) {
                t.shape.push(value);
            }
        }
        14 => m.world_size = u32::try_from(value & 0xffff_ffff).expect("masked"),
        _ => {
            let n = m.chunk_crc32.len();
            if let Some(c) = m.chunk_crc32.get_mut(at % n.max(1)) {
                *c ^= 1;
            }
        }
    }
}
