//! Replays every fuzz input kept in the repository through the same checks the fuzz targets
//! run (`fuzz/src/core_checks.rs`, included here by path): the minimized inputs that once
//! crashed (`fuzz/regressions/<target>/`) and the seed corpus (`fuzz/corpus/<target>/`). So
//! the normal test suite catches a regression without cargo-fuzz. Targets over the daemon's
//! code are replayed by `crates/vfmap-daemon/tests/fuzz_regressions.rs`, over the agent's by
//! `crates/vfmap-agent/tests/fuzz_regressions.rs`.

#[path = "../../../fuzz/src/core_checks.rs"]
mod core_checks;

#[path = "../../../fuzz/src/replay.rs"]
mod replay;

use replay::{fuzz_dir, replay, sorted_entries};

/// Every fuzz target; the daemon's tests replay `channel_lines`, `daemon_config` and
/// `api_attach`, the agent's `metadata`.
const TARGETS: &[&str] = &[
    "guest_message",
    "host_message",
    "profiles",
    "api_vm_spec",
    "channel_lines",
    "daemon_config",
    "api_attach",
    "metadata",
];

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
