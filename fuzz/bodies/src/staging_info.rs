//! Target `staging_info`: the client's check of the daemon's staging
//! description ([`StagingInfo::check`]); a client must not trust a daemon
//! blindly either.
//!
//! The input is either the description's JSON (as it arrives in
//! `Registered`) with the tensor lengths after it, or the description's
//! numbers drawn straight from the bytes (reaching the overflow checks).
//! Invariants: `check` returns, never panics; a description that passes has
//! every tensor of every slot inside its slot and before the ring, the ring
//! inside the memfd, no two tensors sharing a byte, and every stream
//! chunk inside the data section and, where there is a ring, its ring
//! position inside the memfd, as the client's copies assume.

use gpusnap_proto::{BusyPolicy, StagingInfo, StagingMemory};

use crate::cursor::Cursor;

/// Most tensors in one description.
const TENSORS_MAX: usize = 16;
/// Slots and stream chunks checked at each end (a description may have
/// billions).
const CHECKED: u64 = 32;

/// Decodes and checks one staging description (see the module doc).
pub fn staging_info(data: &[u8]) {
    let mut input = Cursor::new(data);
    let (info, tensor_bytes) = if input.u8().is_multiple_of(2) {
        let json_len = usize::from(input.u16());
        let json = input.bytes(json_len);
        let Ok(info) = serde_json::from_slice::<StagingInfo>(json) else {
            return;
        };
        let lens = (0..info.offsets.len().min(TENSORS_MAX))
            .map(|_| input.num())
            .collect();
        (info, lens)
    } else {
        drawn(&mut input)
    };
    if info.check(&tensor_bytes).is_err() {
        return;
    }
    check_accepted(&info, &tensor_bytes);
}

/// A description whose every number comes from the input.
fn drawn(input: &mut Cursor<'_>) -> (StagingInfo, Vec<u64>) {
    let tensors = usize::from(input.u8()) % (TENSORS_MAX + 1);
    let mut offsets = Vec::with_capacity(tensors);
    let mut lens = Vec::with_capacity(tensors);
    for _ in 0..tensors {
        offsets.push(input.num());
        lens.push(input.num());
    }
    let info = StagingInfo {
        memory: StagingMemory::HostMemfd,
        memfd_bytes: input.num(),
        slots: u32::try_from(input.num() & u64::from(u32::MAX)).expect("masked"),
        slot_bytes: input.num(),
        data_bytes: input.num(),
        offsets,
        ring_offset: input.num(),
        ring_chunks: u32::try_from(input.num() & u64::from(u32::MAX)).expect("masked"),
        chunk_bytes: input.num(),
        policy: match input.u8() % 3 {
            0 => BusyPolicy::Block,
            1 => BusyPolicy::Skip,
            _ => BusyPolicy::Stream,
        },
    };
    // Extra lengths (a count that disagrees) now and then.
    if input.u8() == 0xff {
        lens.push(input.num());
    }
    (info, lens)
}

/// What every copy of the client relies on, for a description `check`
/// accepted.
fn check_accepted(info: &StagingInfo, tensor_bytes: &[u64]) {
    assert_eq!(info.offsets.len(), tensor_bytes.len());
    assert!(info.slots > 0 && info.chunk_bytes > 0);
    assert!(info.slot_bytes >= info.data_bytes);
    let slots = u64::from(info.slots);
    let slots_end = slots.checked_mul(info.slot_bytes).expect("slots fit");
    assert!(slots_end <= info.ring_offset, "slots end before the ring");
    let ring_end = u64::from(info.ring_chunks)
        .checked_mul(info.chunk_bytes)
        .and_then(|r| r.checked_add(info.ring_offset))
        .expect("ring fits");
    assert!(ring_end <= info.memfd_bytes, "ring inside the memfd");
    let low = 0..slots.min(CHECKED);
    let high = slots.saturating_sub(CHECKED).max(low.end)..slots;
    for slot in low.chain(high) {
        let base = slot * info.slot_bytes;
        for (&off, &len) in info.offsets.iter().zip(tensor_bytes) {
            let end = base
                .checked_add(off)
                .and_then(|s| s.checked_add(len))
                .expect("inside 64 bits");
            assert!(end <= base + info.data_bytes, "tensor inside slot {slot}");
            assert!(end <= info.ring_offset && end <= info.memfd_bytes);
        }
    }
    for (i, (&a, &a_len)) in info.offsets.iter().zip(tensor_bytes).enumerate() {
        for (&b, &b_len) in info.offsets.iter().zip(tensor_bytes).skip(i + 1) {
            let disjoint = a_len == 0 || b_len == 0 || a + a_len <= b || b + b_len <= a;
            assert!(disjoint, "tensors at {a}+{a_len} and {b}+{b_len} overlap");
        }
    }
    let chunks = info.chunk_count();
    assert_eq!(chunks, info.data_bytes.div_ceil(info.chunk_bytes));
    let low = 0..chunks.min(CHECKED);
    let high = chunks.saturating_sub(CHECKED).max(low.end)..chunks;
    for seq in low.chain(high) {
        let (start, end) = info.chunk_range(seq);
        assert!(
            start < end && end <= info.data_bytes,
            "chunk {seq}: {start}..{end}"
        );
        assert!(end - start <= info.chunk_bytes);
        if info.ring_chunks > 0 {
            let at = info.ring_position(seq);
            assert!(at >= info.ring_offset);
            let at_end = at.checked_add(end - start).expect("inside 64 bits");
            assert!(
                at_end <= ring_end,
                "ring position of chunk {seq} inside the ring"
            );
        }
    }
}
