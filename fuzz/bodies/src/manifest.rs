//! Target `manifest`: `MANIFEST.json` and its rules ([`Manifest::parse`]).
//!
//! Invariants: any bytes are a manifest with its layout or a
//! `ManifestError`, never a panic; a manifest that parses has its header
//! and data sections inside the file (`header_len + data_len ==
//! file_len`, the header 4096-aligned), one CRC per chunk, and a tensor
//! table packed from offset 0 with no overlap and no hole, each tensor
//! inside the data section and as long as its dtype and shape say; every
//! chunk range lies in the data section and names only tensors that
//! overlap it; the manifest survives its own JSON (`to_json`) unchanged;
//! a later build (format version 2) reads whatever this one reads.

use gpusnap_proto::convert::to_u64;
use gpusnapd::store::Layout;
use gpusnapd::store::manifest::{FormatVersion, Manifest};

/// Chunk ranges checked at each end of the data section (a manifest may
/// name millions of chunks).
const CHUNKS_CHECKED: u64 = 64;

/// Parses `data` as a manifest and checks it (see the module doc).
pub fn manifest(data: &[u8]) {
    let Ok((manifest, layout)) = Manifest::parse(data, FormatVersion::CURRENT) else {
        return;
    };
    check(&manifest, &layout);
    let json = manifest.to_json().expect("a parsed manifest serializes");
    let (again, again_layout) =
        Manifest::parse(&json, FormatVersion::CURRENT).expect("its own JSON parses");
    assert_eq!(again, manifest, "JSON round trip");
    assert_eq!(again_layout, layout);
    Manifest::parse(data, FormatVersion::of_build(2)).expect("a later build reads it too");
}

/// The invariants of a manifest that parsed, with its layout.
pub(crate) fn check(m: &Manifest, layout: &Layout) {
    assert_eq!(m.header_len.checked_add(m.data_len), Some(m.file_len));
    assert!(m.header_len >= 4096 && m.header_len.is_multiple_of(4096));
    assert_eq!(layout.data_len, m.data_len);
    assert_eq!(layout.tensors, m.tensors);
    let mut end = 0u64;
    for t in &layout.tensors {
        assert_eq!(t.offset, end, "packed: {t:?}");
        let t_end = t.offset.checked_add(t.len).expect("inside 64 bits");
        assert!(t_end <= m.data_len, "inside the data section: {t:?}");
        let expected = t.spec().validate().expect("a valid spec");
        assert_eq!(expected, t.len, "as long as dtype x shape");
        end = t_end;
    }
    assert_eq!(end, m.data_len, "no hole at the end");
    assert!(m.chunk_bytes > 0);
    let chunks = to_u64(m.chunk_crc32.len());
    assert_eq!(
        chunks,
        m.data_len.div_ceil(m.chunk_bytes),
        "one CRC per chunk"
    );
    let low = 0..chunks.min(CHUNKS_CHECKED);
    let high = chunks.saturating_sub(CHUNKS_CHECKED).max(low.end)..chunks;
    for index in low.chain(high) {
        let (start, end) = m.chunk_range(index);
        assert!(
            start < end && end <= m.data_len,
            "chunk {index}: {start}..{end}"
        );
        assert!(end - start <= m.chunk_bytes);
        for name in layout.tensors_in(start, end) {
            let t = layout
                .tensors
                .iter()
                .find(|t| t.name == name)
                .expect("a named tensor is in the table");
            assert!(
                t.offset < end && t.end() > start,
                "{name} overlaps {start}..{end}"
            );
        }
    }
    assert_eq!(
        m.chunk_range(chunks),
        (m.data_len, m.data_len),
        "past the end is empty"
    );
}
