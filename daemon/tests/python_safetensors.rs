//! Python's official `safetensors` package loads a snapshot's data file
//! unchanged, with the names, dtypes, shapes and bytes the store wrote.
//! `tests/run` provides the interpreter (GPUSNAP_TEST_PYTHON) and requires
//! this check (GPUSNAP_REQUIRE_PYTHON=1).

mod common;

use std::process::Command;

use common::*;
use gpusnap::{Dtype, TensorSpec};
use gpusnapd::storage::probe::BackendChoice;

const SCRIPT: &str = r#"
import json, sys, zlib
from safetensors.numpy import load_file
tensors = load_file(sys.argv[1])
print(json.dumps({name: {"dtype": str(a.dtype), "shape": list(a.shape), "crc32": zlib.crc32(a.tobytes())}
                  for name, a in tensors.items()}))
"#;

fn python() -> Option<String> {
    if let Ok(p) = std::env::var("GPUSNAP_TEST_PYTHON") {
        return Some(p);
    }
    let found = Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    found.then(|| "python3".to_owned())
}

#[test]
fn python_safetensors_loads_snapshots() {
    let Some(python) = python() else {
        assert!(
            std::env::var_os("GPUSNAP_REQUIRE_PYTHON").is_none(),
            "GPUSNAP_REQUIRE_PYTHON is set but no python with safetensors and numpy was found"
        );
        eprintln!("skipped: no python3 with safetensors and numpy (tests/run provides one)");
        return;
    };
    // numpy has no bfloat16 or float8, so those dtypes are left to the Rust check.
    let tensors = vec![
        TensorSpec::new("w", Dtype::F32, [33, 7]),
        TensorSpec::new("h", Dtype::F16, [5]),
        TensorSpec::new("d", Dtype::F64, [2, 2, 2]),
        TensorSpec::new("i", Dtype::I64, []),
        TensorSpec::new("u", Dtype::U8, [4097]),
        TensorSpec::new("m", Dtype::Bool, [3]),
        TensorSpec::new("z", Dtype::I32, [0]),
    ];
    let dir = scratch();
    let store = open(dir.path(), BackendChoice::Auto);
    // Bool bytes must be 0 or 1 for numpy; write a pattern where they are.
    let (layout, mut mem) = staged(&tensors, 11);
    let mask = layout.tensors.iter().find(|t| t.name == "m").expect("mask");
    for b in &mut mem.bytes_mut()[byte_range(mask)] {
        *b &= 1;
    }
    let id = gpusnapd::store::SnapshotId::new("py", 0, 1).expect("id");
    store
        .write_laid_out(
            &id,
            &layout,
            1,
            gpusnapd::store::Source::Memory(mem.bytes()),
        )
        .expect("write");
    let snapshot = store.find("py", 0, None).expect("find");

    let out = Command::new(&python)
        .args(["-c", SCRIPT])
        .arg(snapshot.data_path())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loaded: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let numpy_dtype = |d: Dtype| match d {
        Dtype::F32 => "float32",
        Dtype::F16 => "float16",
        Dtype::F64 => "float64",
        Dtype::I64 => "int64",
        Dtype::U8 => "uint8",
        Dtype::Bool => "bool",
        Dtype::I32 => "int32",
        other => panic!("no numpy dtype for {other}"),
    };
    assert_eq!(loaded.as_object().expect("object").len(), tensors.len());
    for t in &layout.tensors {
        let got = &loaded[&t.name];
        assert_eq!(got["dtype"], numpy_dtype(t.dtype), "{}", t.name);
        assert_eq!(got["shape"], serde_json::json!(t.shape), "{}", t.name);
        let bytes = &mem.bytes()[byte_range(t)];
        assert_eq!(
            got["crc32"],
            gpusnap_kernels::reference::chunk_crc32(bytes),
            "{}",
            t.name
        );
    }
}
