//! The vfmap host daemon: the pure pool (in `vfmap-core`) made durable and driven through its
//! side effects.
//!
//! - [`store`]: SQLite state with group commit;
//! - [`engine`]: attach/detach/recovery orchestration;
//! - [`effects`]: the side-effect traits, with [`qmp`] (QEMU), [`channel`] (guest agent) and
//!   the sysfs host as the real implementations;
//! - [`api`]: HTTP/JSON on a unix socket; [`serve`]: start-up and configuration, with
//!   [`readiness`] between them (the API answers while the daemon starts);
//! - [`k8s`]: the Kubernetes device plugin over the engine (`[kubernetes]` in the config);
//! - [`metrics`]: the Prometheus registry the engine, channel and store update.

pub mod api;
pub mod channel;
pub mod effects;
pub mod engine;
pub mod hooks;
pub mod k8s;
pub mod libvirt;
pub mod lines;
pub mod metrics;
pub mod paths;
pub mod qmp;
pub mod readiness;
pub mod resync;
pub mod serve;
pub mod store;
