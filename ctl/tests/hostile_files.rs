//! Hostile files handed to `gpusnapctl inspect` and `gpusnapctl verify`:
//! safetensors header lengths of 2^63, u64::MAX and just past the end;
//! a manifest of 100,000 nested `[`; a sparse manifest of 1 TiB; tensor
//! offsets that overflow 64 bits, lie past the end or overlap; shapes
//! whose byte count overflows; a header or data length that overflows;
//! a CRC count that disagrees with the chunk count.
//!
//! Each runs the real binary under a 512 MiB address-space limit
//! (`RLIMIT_AS`), so a reader that allocated what a length field
//! announces would fail here; each must exit non-zero without a panic (not
//! 101, no "panicked") and say on stderr what is wrong.

#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use gpusnapd::storage::probe::BackendChoice;
use serde_json::Value;

/// The address space the binary gets.
const ADDRESS_SPACE_BYTES: u64 = 512 << 20;

/// A committed snapshot's directory in a fresh store.
fn committed(root: &Path) -> PathBuf {
    let store = open(root, BackendChoice::Buffered);
    write_memory(&store, "job", 1, &mixed_tensors(), 1).expect("write");
    store.find("job", 0, None).expect("find").dir
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs gpusnapctl with `args` under the address-space limit.
fn ctl(args: &[&str]) -> Outcome {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpusnapctl"));
    command.args(args).env("RUST_BACKTRACE", "0");
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setrlimit, which is async-signal-safe, on a stack value.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: ADDRESS_SPACE_BYTES,
                rlim_max: ADDRESS_SPACE_BYTES,
            };
            // SAFETY: a valid resource and a pointer to a live rlimit.
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().expect("run gpusnapctl");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `inspect` and `verify` of `dir` both refuse it: a non-zero exit that is
/// not a panic's, no "panicked", and stderr naming the problem with every
/// one of `names`.
fn refused(dir: &Path, names: &[&str]) {
    let dir = dir.to_str().expect("utf-8 path");
    for command in ["inspect", "verify"] {
        let out = ctl(&[command, dir]);
        let what = format!(
            "gpusnapctl {command}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
            out.code, out.stdout, out.stderr
        );
        assert!(
            matches!(out.code, Some(c) if c != 0 && c != 101),
            "a plain non-zero exit (not a signal, not a panic): {what}"
        );
        assert!(!out.stderr.contains("panicked"), "{what}");
        for name in names {
            assert!(out.stderr.contains(name), "stderr names {name:?}: {what}");
        }
    }
}

fn data_file(dir: &Path) -> PathBuf {
    dir.join("state.safetensors")
}

fn manifest_file(dir: &Path) -> PathBuf {
    dir.join("MANIFEST.json")
}

/// Sets the safetensors header length (the data file's first 8 bytes).
fn set_header_len(dir: &Path, len: u64) {
    let mut bytes = std::fs::read(data_file(dir)).expect("read");
    bytes
        .get_mut(..8)
        .expect("a header")
        .copy_from_slice(&len.to_le_bytes());
    std::fs::write(data_file(dir), bytes).expect("write");
}

/// Edits the manifest's JSON.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let text = std::fs::read(manifest_file(dir)).expect("read");
    let mut value: Value = serde_json::from_slice(&text).expect("json");
    edit(&mut value);
    std::fs::write(
        manifest_file(dir),
        serde_json::to_vec_pretty(&value).expect("json"),
    )
    .expect("write");
}

/// One edit of a manifest's JSON.
type Edit = Box<dyn Fn(&mut Value)>;

fn tensor(value: &mut Value, i: usize) -> &mut Value {
    value
        .get_mut("tensors")
        .and_then(|t| t.get_mut(i))
        .expect("a tensor")
}

#[test]
fn the_binary_runs_under_the_limit_and_a_sound_snapshot_verifies() {
    let root = scratch();
    let dir = committed(root.path());
    let dir = dir.to_str().expect("utf-8");
    for command in ["inspect", "verify"] {
        let out = ctl(&[command, dir]);
        assert_eq!(out.code, Some(0), "{command}: {}{}", out.stdout, out.stderr);
    }
}

#[test]
fn safetensors_header_lengths_of_2_63_u64_max_and_past_the_end_are_refused() {
    let root = scratch();
    let dir = committed(root.path());
    let file_len = std::fs::metadata(data_file(&dir)).expect("stat").len();
    for len in [1u64 << 63, u64::MAX, file_len + 1, file_len - 8 + 1] {
        set_header_len(&dir, len);
        refused(&dir, &["safetensors header", "does not match the manifest"]);
    }
}

#[test]
fn a_manifest_of_100k_nested_brackets_is_refused_as_json() {
    let root = scratch();
    let dir = committed(root.path());
    // At the top: the manifest is an object, so the first `[` is refused.
    std::fs::write(manifest_file(&dir), "[".repeat(100_000)).expect("write");
    refused(&dir, &["manifest is not valid JSON"]);
    // Under a field the reader does not know, which the parser skips
    // without recursing: unclosed, the file ends inside it; closed, it is
    // skipped whole (no stack overflow) and the missing fields are named.
    let unclosed = format!("{{\"extra\": {}", "[".repeat(100_000));
    std::fs::write(manifest_file(&dir), unclosed).expect("write");
    refused(&dir, &["manifest is not valid JSON", "EOF while parsing"]);
    let closed = format!(
        "{{\"extra\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    std::fs::write(manifest_file(&dir), closed).expect("write");
    refused(&dir, &["manifest is not valid JSON", "missing field"]);
    let objects = format!("{{\"extra\": {}", "{\"a\":".repeat(100_000));
    std::fs::write(manifest_file(&dir), objects).expect("write");
    refused(&dir, &["manifest is not valid JSON", "EOF while parsing"]);
}

#[test]
fn a_sparse_manifest_of_a_terabyte_is_refused_before_it_is_read() {
    let root = scratch();
    let dir = committed(root.path());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(manifest_file(&dir))
        .expect("open");
    file.set_len(1 << 40).expect("a sparse file");
    drop(file);
    refused(&dir, &["MANIFEST.json is 1099511627776 bytes", "limit"]);
}

#[test]
fn tensor_offsets_that_overflow_lie_past_the_end_or_overlap_are_refused() {
    let root = scratch();
    let dir = committed(root.path());
    let original = std::fs::read(manifest_file(&dir)).expect("read");
    let cases: [(&str, Edit); 4] = [
        (
            "offset 18446744073709551615",
            Box::new(|m| tensor(m, 1)["offset"] = Value::from(u64::MAX)),
        ),
        (
            "not packed",
            Box::new(|m| {
                let data_len = m["data_len"].as_u64().expect("data_len");
                let last = m["tensors"].as_array().expect("tensors").len() - 1;
                tensor(m, last)["offset"] = Value::from(data_len + 4096);
            }),
        ),
        (
            "not packed",
            Box::new(|m| {
                let first = tensor(m, 0)["offset"].clone();
                tensor(m, 1)["offset"] = first;
            }),
        ),
        (
            "overflow",
            Box::new(|m| {
                tensor(m, 0)["shape"] = serde_json::json!([1u64 << 62, 1u64 << 62]);
            }),
        ),
    ];
    for (name, edit) in cases {
        std::fs::write(manifest_file(&dir), &original).expect("restore");
        edit_manifest(&dir, edit);
        refused(&dir, &["manifest", name]);
    }
}

#[test]
fn header_and_data_lengths_that_overflow_are_refused() {
    let root = scratch();
    let dir = committed(root.path());
    let original = std::fs::read(manifest_file(&dir)).expect("read");
    edit_manifest(&dir, |m| m["header_len"] = Value::from(1u64 << 63));
    refused(&dir, &["header length 9223372036854775808 is not valid"]);
    std::fs::write(manifest_file(&dir), &original).expect("restore");
    edit_manifest(&dir, |m| m["data_len"] = Value::from(u64::MAX));
    refused(&dir, &["file length", "18446744073709551615"]);
}

#[test]
fn a_crc_count_that_disagrees_with_the_chunk_count_is_refused() {
    let root = scratch();
    let dir = committed(root.path());
    let original = std::fs::read(manifest_file(&dir)).expect("read");
    let chunks = |m: &Value| m["chunk_crc32"].as_array().expect("crcs").len();
    let mut expected = 0;
    edit_manifest(&dir, |m| {
        expected = chunks(m);
        m["chunk_crc32"]
            .as_array_mut()
            .expect("crcs")
            .push(Value::from(0));
    });
    refused(
        &dir,
        &[&format!(
            "{} chunk CRCs for {expected} chunks",
            expected + 1
        )],
    );
    std::fs::write(manifest_file(&dir), &original).expect("restore");
    edit_manifest(&dir, |m| {
        m["chunk_crc32"].as_array_mut().expect("crcs").clear();
    });
    refused(&dir, &[&format!("0 chunk CRCs for {expected} chunks")]);
}
