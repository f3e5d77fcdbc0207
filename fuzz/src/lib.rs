//! The checks behind each fuzz target, one function per target taking the raw input.
//!
//! `core_checks` uses only `vfmap-core` (and its dependencies), `daemon_checks` only
//! `vfmap-daemon` and its dependencies, `agent_checks` only `vfmap-agent` and its
//! dependencies: the crates' regression tests include these files by
//! path, so every input in `fuzz/regressions/` and `fuzz/corpus/` replays through the same
//! code in the normal test suite.

pub mod agent_checks;
pub mod core_checks;
pub mod daemon_checks;
