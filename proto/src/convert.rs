//! Integer conversions that cannot fail on the machines gpusnap runs on.
//!
//! gpusnap is built for 64-bit targets only (asserted below), so a `u64`
//! byte count or offset always fits a `usize` and back. These helpers say
//! so once, instead of a silent `unwrap_or(usize::MAX)` at every site.
//! Conversions that can really overflow keep their checks where they are.

use std::time::Duration;

const _: () = assert!(usize::BITS == 64, "gpusnap supports 64-bit targets only");

/// A byte count or offset as `usize`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits wide (asserted above)"
)]
pub const fn to_usize(v: u64) -> usize {
    v as usize
}

/// A `usize` as `u64`.
pub const fn to_u64(v: usize) -> u64 {
    v as u64
}

/// A duration in nanoseconds; saturates after 584 years.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A value for a signed gauge (Prometheus' integer gauges are `i64`);
/// saturates above `i64::MAX`, which no byte count or step reaches.
pub fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_exact_and_saturate_only_where_documented() {
        assert_eq!(to_usize(u64::MAX), usize::MAX);
        assert_eq!(to_u64(usize::MAX), u64::MAX);
        assert_eq!(nanos(Duration::from_millis(3)), 3_000_000);
        assert_eq!(nanos(Duration::MAX), u64::MAX);
        assert_eq!(gauge(7), 7);
        assert_eq!(gauge(u64::MAX), i64::MAX);
    }
}
