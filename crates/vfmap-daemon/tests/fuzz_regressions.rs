//! Replays every fuzz input kept in the repository for the daemon's targets through the same
//! checks the fuzz targets run (`fuzz/src/daemon_checks.rs`, included here by path): the
//! minimized inputs that once crashed (`fuzz/regressions/<target>/`) and the seed corpus
//! (`fuzz/corpus/<target>/`). The other targets are replayed by
//! `crates/vfmap-core/tests/fuzz_regressions.rs`, which also checks that every directory there
//! is a known target.

#[path = "../../../fuzz/src/daemon_checks.rs"]
mod daemon_checks;

#[path = "../../../fuzz/src/replay.rs"]
mod replay;

use replay::replay;

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
