//! The pure core of vfmap: PCI address types, device profiles, the two VF tables
//! (T1: global index → function, T2: global index → host location), the `prepare` planner,
//! and the daemon's pool of VFs, VMs and assignments with its state machine.
//!
//! Nothing here does I/O; adapters (sysfs, the CLI) feed it facts and execute its plans.

pub mod addr;
pub mod config_space;
pub mod discovered;
pub mod discovered_apply;
pub mod facts;
pub mod index;
pub mod kubelet;
pub mod lines;
mod names;
#[cfg(feature = "openapi")]
pub mod openapi;
pub mod plan;
pub mod pool;
pub mod profile;
pub mod program;
pub mod protocol;
pub mod quarantine;
pub mod tables;
pub mod vm;
pub mod whole;

pub use addr::{AddrError, AddrText, Bdf, PciId};
pub use facts::{HostFacts, PfFacts, Problem, VfFacts};
pub use index::{GlobalIndex, LocalIndex};
pub use kubelet::{HoldState, HolderRef, KubeletHold, PodContainer};
pub use plan::{PlanError, Step, plan_binds, plan_sriov};
pub use pool::{
    AssignState, Assignment, Change, Pool, PoolError, PoolVf, Recovery, Request, SlotId, VmBackend,
    VmName, VmSpec, check_domain_name, check_libvirt_uri, check_port_name, plan_recovery,
};
pub use profile::{DriverName, FunctionDesc, FunctionName, ProfileError, Profiles};
pub use tables::{Tables, VfEntry};

/// The virtio-serial port name of the agent's channel, on both backends: the `name=` of QEMU's
/// `virtserialport`, the `<target type='virtio' name=…>` of a libvirt channel, and the agent's
/// default `port_name`. Reverse-DNS, as libvirt's own channels (`org.qemu.guest_agent.0`).
pub const DEFAULT_PORT_NAME: &str = "org.vfmap.0";
/// The port name vfmap used before [`DEFAULT_PORT_NAME`]: an agent left at its default still
/// serves a port of this name, so VMs started with it keep working.
pub const LEGACY_PORT_NAME: &str = "vfmap";
