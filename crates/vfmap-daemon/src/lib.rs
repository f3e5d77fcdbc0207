//! The vfmap host daemon.

pub mod channel;
pub mod effects;
pub mod engine;
pub mod lines;
pub mod qmp;
pub mod store;
