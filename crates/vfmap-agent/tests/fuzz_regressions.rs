//! Replays the kept inputs of the fuzz targets over the agent's code (`fuzz/src/agent_checks.rs`,
//! included here by path) from `fuzz/regressions/<target>/` and `fuzz/corpus/<target>/`, so
//! `cargo test` catches a regression without cargo-fuzz.

#[path = "../../../fuzz/src/agent_checks.rs"]
mod agent_checks;

#[path = "../../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn metadata_inputs() {
    replay::replay("metadata", agent_checks::metadata);
}
