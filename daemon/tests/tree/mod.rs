//! What a directory tree holds, to show that nothing was made, changed or
//! removed in it: the hostile-path and other-uid tests compare a tree
//! before and after an intruder's requests.
#![allow(dead_code, reason = "each test file uses a different part")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every path below `top` (relative to it) with its kind, a file's bytes
/// and a link's target; links are never followed.
pub fn fingerprint(top: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![top.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            let what = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("readlink");
                format!("link -> {}", target.display())
            } else if meta.is_dir() {
                todo.push(path.clone());
                "dir".to_owned()
            } else {
                format!("file {:?}", std::fs::read(&path).expect("read"))
            };
            out.insert(path.strip_prefix(top).expect("below").to_path_buf(), what);
        }
    }
    out
}
