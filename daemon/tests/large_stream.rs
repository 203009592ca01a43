//! A snapshot many times larger than the I/O buffer pool goes through it:
//! memory use is the pool's size, never the snapshot's.

mod common;

use common::*;
use gpusnap::{Dtype, TensorSpec};
use gpusnapd::storage::probe::BackendChoice;

#[test]
fn snapshot_much_larger_than_the_pool_streams_through_it() {
    let dir = scratch();
    let store = open(dir.path(), BackendChoice::Auto);
    let pool_bytes = store.config().io_pool_bytes as u64;
    // 512 MiB through a 2 MiB pool.
    let tensors = vec![
        TensorSpec::new("big.0", Dtype::F32, [64 << 20]),
        TensorSpec::new("big.1", Dtype::BF16, [128 << 20]),
        TensorSpec::new("tail", Dtype::U8, [12_345]),
    ];
    write_stream(&store, "big", 1, &tensors, 5).expect("write");
    let snapshot = store.find("big", 0, None).expect("find");
    assert!(snapshot.layout.data_len > 200 * pool_bytes);
    check_pattern(&store, &snapshot, 5).expect("read back");
    assert_eq!(
        store.pool().free_count(),
        store.pool().capacity(),
        "every buffer returned"
    );
}
