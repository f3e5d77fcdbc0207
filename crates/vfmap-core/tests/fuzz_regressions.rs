//! Replays every fuzz input kept in the repository through the same checks the fuzz targets
//! run (`fuzz/src/core_checks.rs`, included here by path): the minimized inputs that once
//! crashed (`fuzz/regressions/<target>/`) and the seed corpus (`fuzz/corpus/<target>/`). So
//! the normal test suite catches a regression without cargo-fuzz. Targets over the daemon's
//! code are replayed by `crates/vfmap-daemon/tests/fuzz_regressions.rs`.

#[path = "../../../fuzz/src/core_checks.rs"]
mod core_checks;

use std::path::{Path, PathBuf};

/// Every fuzz target; the daemon's tests replay the last three.
const TARGETS: &[&str] = &[
    "guest_message",
    "host_message",
    "profiles",
    "api_vm_spec",
    "channel_lines",
    "daemon_config",
    "api_attach",
];

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
fn every_fuzz_input_directory_is_a_known_target() {
    for kind in ["regressions", "corpus"] {
        for dir in sorted_entries(&fuzz_dir().join(kind)) {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                TARGETS.contains(&name.as_str()),
                "{} is not a fuzz target replayed by a test",
                dir.display()
            );
        }
    }
    for target in TARGETS {
        assert!(
            fuzz_dir().join("corpus").join(target).is_dir(),
            "no corpus for {target}"
        );
    }
}

#[test]
fn guest_message_inputs() {
    replay("guest_message", core_checks::guest_message);
}

#[test]
fn host_message_inputs() {
    replay("host_message", core_checks::host_message);
}

#[test]
fn profiles_inputs() {
    replay("profiles", core_checks::profiles);
}

#[test]
fn api_vm_spec_inputs() {
    replay("api_vm_spec", core_checks::api_vm_spec);
}
