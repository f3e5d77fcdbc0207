//! The vfmap host daemon.

pub mod store;
