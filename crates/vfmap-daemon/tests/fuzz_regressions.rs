//! Replays every fuzz input kept in the repository for the daemon's targets through the same
//! checks the fuzz targets run (`fuzz/src/daemon_checks.rs`, included here by path): the
//! minimized inputs that once crashed (`fuzz/regressions/<target>/`) and the seed corpus
//! (`fuzz/corpus/<target>/`). The other targets are replayed by
//! `crates/vfmap-core/tests/fuzz_regressions.rs`, which also checks that every directory there
//! is a known target.

#[path = "../../../fuzz/src/daemon_checks.rs"]
mod daemon_checks;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
}

/// Runs `check` on every kept input of `target`; fails naming each input that panics.
fn replay(target: &str, check: fn(&[u8])) {
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

#[test]
fn channel_lines_inputs() {
    replay("channel_lines", daemon_checks::channel_lines);
}

#[test]
fn daemon_config_inputs() {
    replay("daemon_config", daemon_checks::daemon_config);
}

#[test]
fn api_attach_inputs() {
    replay("api_attach", daemon_checks::api_attach);
}
