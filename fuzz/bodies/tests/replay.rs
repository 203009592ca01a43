//! Every committed fuzz input, replayed: each file of `fuzz/corpus/<t>/`
//! (the minimised corpus) and of `fuzz/artifacts/<t>/` (every input that
//! ever crashed a target, kept after its fix) goes through target `t`'s
//! body, which asserts that target's invariants. A target whose corpus
//! folder is missing or empty fails, so this cannot pass by finding
//! nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use gpusnap_fuzz_bodies::{Body, TARGETS};

/// `fuzz/` of this checkout.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/bodies has a parent")
        .to_path_buf()
}

/// The plain files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input of `target` through `body`; the failures name their
/// files.
fn replay(target: &str) {
    let body: Body = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|&(_, body)| body)
        .expect("a known target");
    let fuzz = fuzz_dir();
    let corpus = inputs(&fuzz.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is missing or empty: the corpus of every target is committed"
    );
    let artifacts = inputs(&fuzz.join("artifacts").join(target));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&artifacts) {
        let data = std::fs::read(path).expect("read an input");
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "target {target}: {} of {} inputs failed (the panic messages are above): {failed:?}",
        failed.len(),
        corpus.len() + artifacts.len()
    );
}

#[test]
fn every_target_has_a_test_here() {
    let here = include_str!("replay.rs");
    for (name, _) in TARGETS {
        assert!(
            here.contains(&format!("fn {name}() {{\n    replay(\"{name}\")")),
            "no replay test for target {name}"
        );
    }
}

#[test]
fn frame() {
    replay("frame")
}

#[test]
fn requests() {
    replay("requests")
}

#[test]
fn manifest() {
    replay("manifest")
}

#[test]
fn safetensors() {
    replay("safetensors")
}

#[test]
fn config() {
    replay("config")
}

#[test]
fn staging_info() {
    replay("staging_info")
}
