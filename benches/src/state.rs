//! The trainer's state in the end-to-end benchmark: one [`HostTensor`] per
//! tensor of [`crate::tensors::tensor_set`] (separate allocations, as a
//! model's parameters are), a deterministic pattern in every byte, the step
//! stamped into each tensor's first word, and the check that a restore put
//! back exactly that.
//!
//! Also the memcpy peer: the same tensors copied, the same way the host
//! copy device cuts them (16 MiB pieces over a few threads), into one
//! pre-faulted destination, with nothing of gpusnap around it.

use gpusnap::{Client, HostDevice, HostTensor, TensorSpec};
use gpusnap_proto::convert::to_u64;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Bytes compared at a time when verifying.
const VERIFY_CHUNK_BYTES: usize = 1 << 16;
/// What `scribble` writes: not the pattern, so a restore that copies
/// nothing is caught.
const SCRIBBLE: u8 = 0xA5;

/// Word `word` of tensor `tensor`'s base pattern.
fn pattern_word(tensor: usize, word: u64) -> u64 {
    ((to_u64(tensor) << 40) ^ word)
        .wrapping_mul(GOLDEN)
        .rotate_left(23)
}

/// The first word of tensor `tensor` at `step`.
fn stamp_word(tensor: usize, step: u64) -> u64 {
    (step.wrapping_mul(GOLDEN) ^ (to_u64(tensor) << 32) ^ 0x5354_4550).rotate_left(7)
}

/// The base pattern of tensor `tensor` from word `first_word` on, into
/// `out` (a trailing partial word takes that word's first bytes).
fn pattern_into(tensor: usize, first_word: u64, out: &mut [u8]) {
    let mut words = out.chunks_exact_mut(8);
    let mut word = first_word;
    for chunk in &mut words {
        chunk.copy_from_slice(&pattern_word(tensor, word).to_le_bytes());
        word += 1;
    }
    // Shorter than a word: the remainder of `chunks_exact_mut(8)`.
    let tail = words.into_remainder();
    let bytes = pattern_word(tensor, word).to_le_bytes();
    tail.copy_from_slice(&bytes[..tail.len()]);
}

/// The stamp of `step` over the first (up to) 8 bytes of `out`.
fn stamp_into(tensor: usize, step: u64, out: &mut [u8]) {
    let bytes = stamp_word(tensor, step).to_le_bytes();
    let n = out.len().min(8);
    if let (Some(dst), Some(src)) = (out.get_mut(..n), bytes.get(..n)) {
        dst.copy_from_slice(src);
    }
}

/// What bytes `offset..offset + out.len()` of tensor `tensor` hold at
/// `step` (the base pattern, the stamp of `step` over the first word), into
/// `out`; `offset` is a multiple of 8. The `load` benchmark's CUDA trainers
/// fill and check device memory with it, as [`TrainerState`] does host
/// tensors.
pub fn expected_into(tensor: usize, offset: usize, step: u64, out: &mut [u8]) {
    assert!(
        offset.is_multiple_of(8),
        "offset {offset} is not word-aligned"
    );
    pattern_into(tensor, to_u64(offset / 8), out);
    if offset == 0 {
        stamp_into(tensor, step, out);
    }
}

/// The first (up to) 8 bytes of tensor `tensor` at `step`: what a training
/// step changes.
pub fn stamp_bytes(tensor: usize, step: u64) -> [u8; 8] {
    stamp_word(tensor, step).to_le_bytes()
}

/// The registered state.
#[derive(Debug)]
pub struct TrainerState {
    pub tensors: Vec<(TensorSpec, HostTensor)>,
    pub bytes: u64,
}

impl TrainerState {
    /// Allocates every tensor (zeroed; `fill` faults the pages in).
    pub fn new(specs: Vec<TensorSpec>) -> Result<TrainerState, String> {
        let mut tensors = Vec::with_capacity(specs.len());
        let mut bytes = 0u64;
        for spec in specs {
            let tensor = HostTensor::zeros(spec.dtype, spec.shape.clone())
                .map_err(|e| format!("allocating tensor {:?}: {e}", spec.name))?;
            bytes += to_u64(tensor.byte_len());
            tensors.push((spec, tensor));
        }
        Ok(TrainerState { tensors, bytes })
    }

    /// Registers every tensor with `client`, in order.
    pub fn register(&self, client: &mut Client) -> Result<(), String> {
        for (spec, tensor) in &self.tensors {
            client
                .register_host(spec.name.as_str(), tensor)
                .map_err(|e| format!("registering {:?}: {e}", spec.name))?;
        }
        Ok(())
    }

    /// Writes the base pattern and the stamp of `step` into every byte.
    pub fn fill(&self, step: u64) {
        for (index, (_, tensor)) in self.tensors.iter().enumerate() {
            let mut w = tensor.write();
            pattern_into(index, 0, &mut w);
            stamp_into(index, step, &mut w);
        }
    }

    /// What a training step changes here: each tensor's first word becomes
    /// the stamp of `step` (cheap, and enough for a restore of the wrong
    /// step to be caught).
    pub fn stamp(&self, step: u64) {
        for (index, (_, tensor)) in self.tensors.iter().enumerate() {
            stamp_into(index, step, &mut tensor.write());
        }
    }

    /// Overwrites every byte with something that is not the pattern.
    pub fn scribble(&self) {
        for (_, tensor) in &self.tensors {
            tensor.write().fill(SCRIBBLE);
        }
    }

    /// Every byte is the base pattern with the stamp of `step`; the error
    /// names the first tensor and byte that is not.
    pub fn verify(&self, step: u64) -> Result<(), String> {
        let mut expected = vec![0u8; VERIFY_CHUNK_BYTES];
        for (index, (spec, tensor)) in self.tensors.iter().enumerate() {
            let r = tensor.read();
            let mut offset = 0usize;
            for got in r.chunks(VERIFY_CHUNK_BYTES) {
                // `chunks(VERIFY_CHUNK_BYTES)`: never longer than `expected`.
                let want = &mut expected[..got.len()];
                expected_into(index, offset, step, want);
                if got != want {
                    let at = got
                        .iter()
                        .zip(want.iter())
                        .position(|(a, b)| a != b)
                        .expect("slices of one length that differ differ at some byte");
                    return Err(format!(
                        "restored bytes differ from the registered ones: tensor {:?} ({} bytes), \
                         byte {} is {:#04x}, expected {:#04x} (step {step})",
                        spec.name,
                        r.len(),
                        offset + at,
                        got[at],
                        want[at],
                    ));
                }
                offset += got.len();
            }
        }
        Ok(())
    }

    /// The memcpy peer: every tensor copied into its place in `dst` (packed
    /// in registration order), cut into [`HostDevice::PIECE_BYTES`] pieces
    /// spread over `threads` threads by bytes, as the host copy device does.
    pub fn memcpy_into(&self, dst: &mut [u8], threads: usize) {
        assert_eq!(
            to_u64(dst.len()),
            self.bytes,
            "the memcpy destination holds the state"
        );
        let reads: Vec<_> = self.tensors.iter().map(|(_, t)| t.read()).collect();
        let mut pieces: Vec<(&[u8], &mut [u8])> = Vec::new();
        let mut rest = dst;
        for r in &reads {
            let (mine, tail) = rest.split_at_mut(r.len());
            rest = tail;
            let chunks = r.chunks(HostDevice::PIECE_BYTES);
            pieces.extend(chunks.zip(mine.chunks_mut(HostDevice::PIECE_BYTES)));
        }
        assert!(rest.is_empty(), "the tensors fill the destination");
        let groups = split_by_bytes(pieces, threads.max(1), HostDevice::PIECE_BYTES);
        let copy = |group: Vec<(&[u8], &mut [u8])>| {
            for (src, dst) in group {
                dst.copy_from_slice(src);
            }
        };
        std::thread::scope(|scope| {
            let mut groups = groups.into_iter();
            let mine = groups.next();
            for group in groups {
                scope.spawn(move || copy(group));
            }
            if let Some(group) = mine {
                copy(group);
            }
        });
    }
}

/// Cuts `pieces` (in order) into at most `threads` runs of about equal
/// bytes, none but the last under `min_group_bytes`.
fn split_by_bytes<T>(
    pieces: Vec<(&[u8], T)>,
    threads: usize,
    min_group_bytes: usize,
) -> Vec<Vec<(&[u8], T)>> {
    let total: usize = pieces.iter().map(|(src, _)| src.len()).sum();
    let target = total.div_ceil(threads).max(min_group_bytes).max(1);
    let mut groups = Vec::new();
    let mut group = Vec::new();
    let mut acc = 0usize;
    for piece in pieces {
        acc += piece.0.len();
        group.push(piece);
        if acc >= target {
            groups.push(std::mem::take(&mut group));
            acc = 0;
        }
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::tensor_set;

    #[test]
    fn expected_bytes_are_what_fill_and_stamp_write() {
        let spec = TensorSpec::new("s", gpusnap::Dtype::U8, vec![100]);
        let state = TrainerState::new(vec![spec]).expect("allocates");
        state.fill(3);
        state.stamp(9);
        let got = state.tensors[0].1.read().to_vec();
        let mut want = vec![0u8; 100];
        expected_into(0, 0, 9, &mut want[..40]);
        expected_into(0, 40, 9, &mut want[40..]);
        assert_eq!(got, want);
        assert_eq!(got[..8], stamp_bytes(0, 9));
        expected_into(0, 0, 3, &mut want[..40]);
        assert_ne!(got[..8], want[..8], "another step's stamp differs");
    }

    #[test]
    fn a_filled_state_verifies_and_a_scribbled_or_older_one_does_not() {
        let state = TrainerState::new(tensor_set(1 << 20)).expect("state");
        state.fill(3);
        state.verify(3).expect("as filled");
        state.stamp(4);
        state.verify(4).expect("stamped");
        assert!(state.verify(3).is_err(), "an older step is caught");
        state.scribble();
        let err = state.verify(4).expect_err("scribbled");
        assert!(err.contains("byte 0"), "{err}");
    }

    #[test]
    fn partial_words_take_the_pattern_bytes() {
        let mut whole = [0u8; 16];
        pattern_into(5, 0, &mut whole);
        let mut part = [0u8; 13];
        pattern_into(5, 0, &mut part);
        assert_eq!(&whole[..13], &part[..]);
        let mut later = [0u8; 8];
        pattern_into(5, 1, &mut later);
        assert_eq!(&whole[8..], &later[..]);
    }

    #[test]
    fn memcpy_copies_every_tensor_in_place_on_any_thread_count() {
        let state = TrainerState::new(tensor_set(40 << 20)).expect("state");
        state.fill(1);
        let mut packed = Vec::new();
        for (_, t) in &state.tensors {
            packed.extend_from_slice(&t.read());
        }
        for threads in [1, 2, 3] {
            let mut dst = vec![0u8; packed.len()];
            state.memcpy_into(&mut dst, threads);
            assert!(dst == packed, "{threads} threads");
        }
    }

    #[test]
    fn groups_cover_every_piece_once_in_order() {
        let data = [0u8; 100];
        let pieces: Vec<(&[u8], usize)> = (0..10).map(|i| (&data[..(i + 1) * 3], i)).collect();
        let groups = split_by_bytes(pieces, 3, 1);
        assert!(groups.len() <= 3);
        let order: Vec<usize> = groups.iter().flatten().map(|(_, i)| *i).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>());
    }
}
