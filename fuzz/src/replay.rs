//! Replays the kept fuzz inputs (`fuzz/regressions/<target>/`, `fuzz/corpus/<target>/`)
//! through a check; included by the crates' `fuzz_regressions` tests with `#[path]`.

use std::path::{Path, PathBuf};

/// The fuzz directory, from a crate under `crates/`.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The entries of `dir`, sorted; none when it does not exist.
pub fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
}

/// Runs `check` on every kept input of `target`; fails naming each input that panics.
pub fn replay(target: &str, check: fn(&[u8])) {
    let mut failed = Vec::new();
    let mut count = 0;
    for kind in ["regressions", "corpus"] {
        for file in sorted_entries(&fuzz_dir().join(kind).join(target)) {
            let data = std::fs::read(&file).unwrap();
            count += 1;
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(count > 0, "no input for {target} under fuzz/");
    assert!(failed.is_empty(), "{target} fails on {failed:#?}");
}
