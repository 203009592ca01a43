//! The tensor set a benchmark snapshot holds: many mixed sizes, like a
//! model's state, deterministic for a given total.
//!
//! Three kinds, all scaled with the total (about 1000 tensors at 4 GiB):
//! * small: norms and biases of 1-16 KiB, about 600 per 4 GiB, at most 5% of the bytes;
//! * large: embeddings and big projections of 64-512 MiB, about half the bytes;
//! * medium: 1-8 MiB weights filling the rest; the last one takes the exact
//!   remainder so the data section is exactly the requested size.

use gpusnap::{Dtype, TensorSpec};
use gpusnap_proto::convert::{to_u64, to_usize};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Small tensors per 4 GiB of total.
const SMALL_PER_4_GIB: u64 = 600;
const SMALL_COUNT_MIN: u64 = 24;
/// Large tensor sizes, taken in this order (cycling) while they fit.
const LARGE_BYTES_CYCLE: [u64; 4] = [256 * MIB, 512 * MIB, 64 * MIB, 128 * MIB];

/// Dtypes drawn for small and medium tensors (BF16 weighted, as in training).
const MIXED_DTYPES: [Dtype; 8] = [
    Dtype::BF16,
    Dtype::BF16,
    Dtype::F32,
    Dtype::F16,
    Dtype::F8E4M3,
    Dtype::I64,
    Dtype::U8,
    Dtype::F32,
];
const LARGE_DTYPES: [Dtype; 2] = [Dtype::BF16, Dtype::F32];

/// splitmix64: a fixed-seed generator, so every run builds the same set.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `lo..=hi` for picking sizes.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        assert!(!items.is_empty(), "nothing to pick from");
        items[to_usize(self.next() % to_u64(items.len()))]
    }
}

/// `bytes` of `dtype` (falling back to U8 when the element size does not
/// divide it) as a 1-D or 2-D shape.
fn spec(name: String, dtype: Dtype, bytes: u64) -> TensorSpec {
    let dtype = if bytes.is_multiple_of(dtype.size_bytes()) {
        dtype
    } else {
        Dtype::U8
    };
    let elements = bytes / dtype.size_bytes();
    // Largest power of two up to 4096 dividing the element count.
    let cols = 1u64 << elements.trailing_zeros().min(12);
    let rows = elements / cols;
    let shape = if rows <= 1 {
        vec![elements]
    } else {
        vec![rows, cols]
    };
    TensorSpec::new(name, dtype, shape)
}

/// The tensors of a `total_bytes` data section, in registration order.
pub fn tensor_set(total_bytes: u64) -> Vec<TensorSpec> {
    let mut rng = Rng(0x6770_7573_6e61_7021);
    let mut specs = Vec::new();

    let small_count =
        (SMALL_PER_4_GIB * (total_bytes / MIB) / (4 * GIB / MIB)).max(SMALL_COUNT_MIN);
    let small_budget = total_bytes / 20;
    let mut small_bytes = 0u64;
    for i in 0..small_count {
        let bytes = rng.range(1, 16) * KIB;
        if small_bytes + bytes > small_budget {
            break;
        }
        small_bytes += bytes;
        specs.push(spec(
            format!("layers.{i}.norm.weight"),
            rng.pick(&MIXED_DTYPES),
            bytes,
        ));
    }

    let mut large_left = total_bytes / 2;
    let mut large_bytes = 0u64;
    let mut cycle = LARGE_BYTES_CYCLE.iter().copied().cycle();
    let smallest_large = LARGE_BYTES_CYCLE
        .iter()
        .copied()
        .min()
        .expect("LARGE_BYTES_CYCLE is not empty");
    let mut i = 0;
    while large_left >= smallest_large {
        let bytes = cycle.next().expect("a cycle never ends");
        if bytes > large_left {
            continue;
        }
        large_left -= bytes;
        large_bytes += bytes;
        specs.push(spec(
            format!("embed.{i}.weight"),
            rng.pick(&LARGE_DTYPES),
            bytes,
        ));
        i += 1;
    }

    let mut medium_left = total_bytes - small_bytes - large_bytes;
    let mut i = 0;
    while medium_left > 0 {
        let bytes = (rng.range(MIB, 8 * MIB) / 4096 * 4096).min(medium_left);
        medium_left -= bytes;
        specs.push(spec(
            format!("layers.{i}.mlp.weight"),
            rng.pick(&MIXED_DTYPES),
            bytes,
        ));
        i += 1;
    }

    // Interleave the kinds, as a model's registration order would.
    for k in (1..specs.len()).rev() {
        let j = to_usize(rng.next() % (to_u64(k) + 1));
        specs.swap(k, j);
    }
    specs
}

/// [`tensor_set`] of `total_bytes` and its store layout, checked to total
/// exactly `total_bytes`.
pub fn planned_tensor_set(
    total_bytes: u64,
) -> Result<(Vec<TensorSpec>, gpusnapd::store::Layout), String> {
    let specs = tensor_set(total_bytes);
    let layout = gpusnapd::store::Layout::plan(&specs)
        .map_err(|e| format!("laying out the tensor set: {e}"))?;
    assert_eq!(layout.data_len, total_bytes, "the tensor set totals --size");
    Ok((specs, layout))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use gpusnapd::store::Layout;

    use super::*;

    #[test]
    fn the_set_is_exactly_the_total_and_plans() {
        for total in [4096, 100_000, 16 * MIB, 256 * MIB + 12_345, 4 * GIB] {
            let specs = tensor_set(total);
            let layout = Layout::plan(&specs).expect("plan");
            assert_eq!(layout.data_len, total, "total {total}");
        }
    }

    #[test]
    fn counts_scale_with_the_total() {
        let at_4g = tensor_set(4 * GIB).len();
        assert!((800..=1300).contains(&at_4g), "{at_4g} tensors at 4 GiB");
        let at_256m = tensor_set(256 * MIB).len();
        assert!(at_256m >= 50, "{at_256m} tensors at 256 MiB");
    }

    #[test]
    fn mixes_sizes_and_dtypes_and_is_deterministic() {
        let specs = tensor_set(4 * GIB);
        assert_eq!(specs, tensor_set(4 * GIB));
        let lens: Vec<u64> = specs.iter().filter_map(TensorSpec::byte_len).collect();
        assert!(lens.iter().any(|&l| l <= 16 * KIB));
        assert!(lens.iter().any(|&l| (MIB..=8 * MIB).contains(&l)));
        assert!(lens.iter().any(|&l| l >= 64 * MIB));
        let dtypes: HashSet<Dtype> = specs.iter().map(|s| s.dtype).collect();
        assert!(dtypes.len() >= 5, "{dtypes:?}");
    }
}
