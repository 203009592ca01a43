//! The state a trainer registers, as a pure function of (seed, job, rank,
//! step): the tensor table of each (job, rank) and every byte of every
//! tensor at every step, so the checker regenerates the expected bytes of
//! any committed step without anyone keeping them.

use gpusnap::{Dtype, TensorSpec};

/// The job name of job index `job`.
pub fn job_name(job: u32) -> String {
    format!("soak-job{job}")
}

/// The tensor table of (job, rank): three tensors whose sizes differ per
/// rank (none a multiple of 4096 bytes, so padded tails are exercised).
pub fn tensors(job: u32, rank: u32) -> Vec<TensorSpec> {
    let index = u64::from(job) * 64 + u64::from(rank);
    vec![
        TensorSpec::new("weights", Dtype::F32, [24_000 + 1_531 * index]),
        TensorSpec::new("bias", Dtype::BF16, [7, 111 + index]),
        TensorSpec::new("step", Dtype::I64, []),
    ]
}

/// The bytes of `spec` (every table here is small and valid).
pub fn byte_len(spec: &TensorSpec) -> u64 {
    spec.byte_len().unwrap_or(0)
}

/// The key every byte of one (seed, job, rank, step, tensor) derives from.
fn key(seed: u64, job: u32, rank: u32, step: u64, tensor: usize) -> u64 {
    let mut k = mix(seed ^ 0x5eed_50a4);
    k = mix(k ^ u64::from(job));
    k = mix(k ^ u64::from(rank).rotate_left(17));
    k = mix(k ^ step);
    mix(k ^ u64::try_from(tensor).unwrap_or(u64::MAX))
}

/// SplitMix64's output function.
fn mix(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `out` with the bytes of tensor `tensor` of (job, rank) at `step`.
pub fn fill(seed: u64, job: u32, rank: u32, step: u64, tensor: usize, out: &mut [u8]) {
    let k = key(seed, job, rank, step, tensor);
    for (word, chunk) in (0u64..).zip(out.chunks_mut(8)) {
        let bytes = mix(k ^ word).to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Where `actual` first differs from the expected bytes of `tensor`, if it
/// does (a length mismatch differs at the shorter length).
pub fn first_difference(
    seed: u64,
    job: u32,
    rank: u32,
    step: u64,
    tensor: usize,
    actual: &[u8],
    expected_len: u64,
) -> Option<u64> {
    let mut expected = vec![0u8; usize::try_from(expected_len).ok()?];
    fill(seed, job, rank, step, tensor, &mut expected);
    if let Some(i) = expected.iter().zip(actual).position(|(a, b)| a != b) {
        return u64::try_from(i).ok();
    }
    if expected.len() != actual.len() {
        return u64::try_from(expected.len().min(actual.len())).ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_a_function_of_every_coordinate() {
        let mut a = vec![0u8; 1001];
        let mut b = vec![0u8; 1001];
        fill(1, 0, 0, 5, 0, &mut a);
        fill(1, 0, 0, 5, 0, &mut b);
        assert_eq!(a, b);
        for (seed, job, rank, step, tensor) in [
            (2, 0, 0, 5, 0),
            (1, 1, 0, 5, 0),
            (1, 0, 1, 5, 0),
            (1, 0, 0, 6, 0),
            (1, 0, 0, 5, 1),
        ] {
            fill(seed, job, rank, step, tensor, &mut b);
            assert_ne!(a, b, "{seed} {job} {rank} {step} {tensor}");
        }
        assert_eq!(first_difference(1, 0, 0, 5, 0, &a, 1001), None);
        a[700] ^= 1;
        assert_eq!(first_difference(1, 0, 0, 5, 0, &a, 1001), Some(700));
        assert_eq!(first_difference(1, 0, 0, 5, 0, &a[..10], 1001), Some(10));
    }

    #[test]
    fn tables_differ_per_rank_and_are_not_page_multiples() {
        let t0 = tensors(0, 0);
        let t1 = tensors(0, 1);
        assert_ne!(t0, t1);
        for t in t0.iter().chain(&t1) {
            assert!(byte_len(t) > 0);
        }
        let total: u64 = t0.iter().map(byte_len).sum();
        assert_ne!(total % 4096, 0);
    }
}
