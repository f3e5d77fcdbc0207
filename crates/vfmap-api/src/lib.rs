//! The vfmap daemon's HTTP/JSON API as Rust types: every request and response body, shared by
//! the daemon (which builds and serialises them) and the CLI (which serialises the requests
//! and deserialises the answers, errors included).
//!
//! The JSON names and shapes here are the API: `docs/openapi.json` is generated from these
//! types (their `utoipa::ToSchema` derives, and the handlers' `#[utoipa::path]` in
//! `vfmap-daemon`). Every body is a closed object (`deny_unknown_fields`, so the document says
//! `additionalProperties: false`): the daemon refuses requests with unknown fields, and the
//! CLI refuses answers it does not fully understand rather than guess.
//!
//! The validated values (names, PCI addresses, indexes, states) are vfmap-core's types, with
//! the schemas of its `openapi` feature. Integers in requests are read as JSON Schema reads
//! them (`3.0` is the integer 3: `vfmap_core::whole`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vfmap_core::openapi::{DomainName, LibvirtUri, NumaNode, PortName, SocketPath};
use vfmap_core::protocol::GuestPath;
use vfmap_core::{
    AssignState, Bdf, DriverName, FunctionName, GlobalIndex, LocalIndex, PciId, SlotId, VmName,
};
pub use vfmap_core::{VmBackend, VmSpec};

/// The largest number of VFs one attach may ask for (a VM has at most 256 slots).
pub const MAX_COUNT: u32 = 256;

/// `POST /v1/vms/{name}/attach`: give the VM `count` VFs of `function`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"function": "crypto", "count": 1})))]
pub struct AttachRequest {
    /// The function, e.g. `crypto`. Text here: the daemon checks it is a valid function name
    /// (`bad_request` if not) before looking for VFs that carry it (`unknown_function`).
    #[schema(value_type = FunctionName)]
    pub function: String,
    /// How many VFs (default 1).
    #[serde(default = "one", deserialize_with = "vfmap_core::whole::required")]
    #[schema(minimum = 1, maximum = 256, default = 1)]
    pub count: u32,
    /// Only VFs on this NUMA node.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "vfmap_core::whole::optional"
    )]
    #[schema(value_type = Option<NumaNode>)]
    pub numa_node: Option<i32>,
    /// Only VFs of this PF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pf: Option<Bdf>,
}

fn one() -> u32 {
    1
}

/// The default virtio port name of the agent's channel.
pub use vfmap_core::DEFAULT_PORT_NAME;
/// The default libvirt connection URI.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";

/// `POST /v1/vms`: register a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(
    json!({"name": "web2", "backend": {"qmp": {"qmp_socket": "/run/vfmap/web2.qmp", "agent_socket": "/run/vfmap/web2.agent", "slots": ["rp0", "rp1"]}}}),
    json!({"name": "web3", "backend": {"libvirt": {"domain": "web3"}}})
))]
pub struct NewVm {
    /// The VM's name.
    pub name: VmName,
    /// Its hypervisor backend.
    pub backend: NewVmBackend,
    /// The VM's NUMA node, if pinned: VFs on that node are preferred.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "vfmap_core::whole::optional"
    )]
    #[schema(value_type = Option<NumaNode>)]
    pub numa_node: Option<i32>,
}

/// The backend of a VM to register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NewVmBackend {
    /// A QEMU started with a QMP socket, empty root ports and the agent's chardev.
    Qmp {
        /// QEMU's QMP unix socket.
        #[schema(value_type = SocketPath)]
        qmp_socket: String,
        /// The unix socket behind the agent's virtio-serial port.
        #[schema(value_type = SocketPath)]
        agent_socket: String,
        /// Ids of the VM's empty hot-plug slots (`pcie-root-port` ids), in order: local
        /// index `i` is `slots[i]`.
        #[schema(schema_with = vfmap_core::openapi::slots_schema)]
        slots: Vec<SlotId>,
    },
    /// A running libvirt domain: the daemon reads its live XML for the slots (free
    /// hot-pluggable `pcie-root-port`s) and the agent channel's socket.
    Libvirt {
        /// The domain's name.
        #[schema(value_type = DomainName)]
        domain: String,
        /// The libvirt connection URI (local only).
        #[serde(default = "default_uri")]
        #[schema(value_type = LibvirtUri, default = "qemu:///system")]
        uri: String,
        /// The virtio port name of the agent's `<channel>` (vfmap-agent's `port_name`).
        #[serde(default = "default_port_name")]
        #[schema(value_type = PortName, default = "org.vfmap.0")]
        port_name: String,
        /// Also change the domain's persistent definition on attach and detach (default: live
        /// only, so a restarted domain comes back without vfmap's devices).
        #[serde(default)]
        persistent: bool,
        /// Narrows the slots to these root ports (libvirt's controller aliases, `pci.N`), in
        /// this order; empty or absent: every free hot-pluggable root port, by index.
        #[serde(default)]
        #[schema(schema_with = vfmap_core::openapi::narrowing_slots_schema)]
        slots: Vec<SlotId>,
    },
}

fn default_uri() -> String {
    DEFAULT_LIBVIRT_URI.to_owned()
}

fn default_port_name() -> String {
    DEFAULT_PORT_NAME.to_owned()
}

impl NewVm {
    /// Checks the values the daemon's own checks would only see after asking the hypervisor
    /// (a libvirt domain name, URI and port name become `virsh` arguments); the error says
    /// which rule failed.
    pub fn check(&self) -> Result<(), String> {
        match &self.backend {
            NewVmBackend::Qmp { .. } => Ok(()),
            NewVmBackend::Libvirt {
                domain,
                uri,
                port_name,
                ..
            } => {
                vfmap_core::check_domain_name(domain)?;
                vfmap_core::check_libvirt_uri(uri)?;
                vfmap_core::check_port_name(port_name)
            }
        }
    }

    /// The VM as registered when nothing needs to be looked up (QMP); `None` for a backend
    /// whose slots and agent socket come from the hypervisor (libvirt).
    pub fn qmp_spec(&self) -> Option<VmSpec> {
        match &self.backend {
            NewVmBackend::Qmp {
                qmp_socket,
                agent_socket,
                slots,
            } => Some(VmSpec {
                name: self.name.clone(),
                backend: VmBackend::Qmp {
                    qmp_socket: qmp_socket.clone(),
                    agent_socket: agent_socket.clone(),
                },
                slots: slots.clone(),
                numa_node: self.numa_node,
            }),
            NewVmBackend::Libvirt { .. } => None,
        }
    }
}

/// The automatic retries of a release that waits for the hypervisor to confirm the unplug.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Cleanup {
    /// Failed attempts so far.
    #[schema(minimum = 1)]
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: String,
    /// When the next automatic attempt runs (seconds since the epoch); `null` once the
    /// attempts are used up: then `vfmap detach` retries, or stopping the VM frees the VF.
    #[schema(required)]
    pub next_retry_at: Option<u64>,
}

/// One row of a VM's correspondence table: local index → function, with the VF and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrespondenceRow {
    /// Local index (slot position).
    pub local_index: LocalIndex,
    /// The slot's id.
    pub slot: String,
    /// The function.
    pub function: FunctionName,
    /// The function's description.
    pub description: String,
    /// The driver the guest must bind.
    #[schema(required)]
    pub guest_driver: Option<DriverName>,
    /// The VF's global index.
    pub global_index: GlobalIndex,
    /// The VF's host location.
    pub host_vf: Bdf,
    /// Assignment state.
    pub state: AssignState,
    /// Where the device sits in the guest (once plugged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub guest_path: Option<GuestPath>,
    /// The device's address in the guest, as the agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub guest_bdf: Option<Bdf>,
    /// The driver the agent reports bound (equals `guest_driver` once ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub bound_driver: Option<DriverName>,
    /// A stored guest-side value that could not be read back (a damaged database); it is left
    /// out above and said here instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub stored_value_error: Option<String>,
    /// Present while a release waits for the hypervisor to confirm the unplug; retried
    /// automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cleanup: Option<Cleanup>,
}

/// A failed attach of one VF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// The VM.
    pub vm: String,
    /// The local index it would have had.
    pub local_index: LocalIndex,
    /// The function requested.
    pub function: String,
    /// The VF tried.
    pub global_index: GlobalIndex,
    /// Why it failed.
    pub reason: String,
    /// When (seconds since the epoch).
    pub at: u64,
}

/// A VF out of the pool after a failed scrub, until an operator clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuarantinedVf {
    /// Stable global index.
    pub global_index: GlobalIndex,
    /// Host location.
    pub location: Bdf,
    /// The function it carries.
    #[schema(required)]
    pub function: Option<FunctionName>,
    /// What the scrub found (the config space check after the reset, or the card's wipe).
    pub reason: String,
    /// Since when, in seconds since the Unix epoch.
    pub since: u64,
}

/// `GET /v1/quarantine`: the quarantined VFs, by global index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuarantineList {
    /// The VFs.
    pub vfs: Vec<QuarantinedVf>,
}

/// `POST /v1/quarantine/{global_index}/clear`: how to clear a quarantined VF.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClearQuarantine {
    /// Return the VF to the pool without scrubbing it again first. `false`: the clear runs
    /// the scrub again and is refused, `still_dirty`, when it fails.
    pub force: bool,
}

/// The answer to a clear: the VF is free again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Cleared {
    /// The VF.
    pub global_index: GlobalIndex,
    /// Its location.
    pub location: Bdf,
    /// Whether the scrub ran again before (false with `force`).
    pub scrubbed: bool,
}

/// `POST /v1/vfs/{global_index}/program`: the function a free VF is to carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgramRequest {
    /// The function; the VF's card's profile must allow it (`programmable_to`).
    pub function: FunctionName,
}

/// The answer to a re-programming: the VF carries the new function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Programmed {
    /// The VF.
    pub global_index: GlobalIndex,
    /// Its location.
    pub location: Bdf,
    /// The function it carried.
    pub from: FunctionName,
    /// The function it carries now.
    pub to: FunctionName,
}

/// A VM: its registration, its correspondence table and its recent failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The VM's name.
    pub name: VmName,
    /// How the daemon drives the VM's hypervisor and reaches its agent.
    pub backend: VmBackend,
    /// Ids of the VM's hot-plug slots: local index `i` is `slots[i]`.
    pub slots: Vec<SlotId>,
    /// The VM's NUMA node: VFs on it are preferred.
    #[schema(value_type = Option<NumaNode>, required)]
    pub numa_node: Option<i32>,
    /// Local index → function, with state.
    pub correspondence: Vec<CorrespondenceRow>,
    /// The VM's last 20 failed attaches, newest first.
    pub failures: Vec<Failure>,
}

/// `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmList {
    /// Every VM.
    pub vms: Vec<Vm>,
    /// VFs the kubelet holds for Kubernetes containers (vfmap's device plugin), beside the
    /// VMs; absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kubelet: Vec<KubeletVf>,
}

/// A VF the kubelet holds, with its container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KubeletVf {
    /// Stable global index.
    pub global_index: GlobalIndex,
    /// Host location (the device plugin's device id).
    pub location: Bdf,
    /// Its function (the resource `<prefix>/<function>`).
    pub function: FunctionName,
    /// The container holding it, once the kubelet's PodResources named it.
    #[schema(required)]
    pub owner: Option<vfmap_core::PodContainer>,
    /// When the device plugin's Allocate recorded it, milliseconds since the Unix epoch.
    pub allocated_at_ms: u64,
    /// `held`, or `releasing` (reset, host driver, free).
    pub state: vfmap_core::HoldState,
}

/// `DELETE /v1/vms/{name}`: the VM was released and forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Removed {
    /// The VM.
    pub removed: VmName,
    /// How many VFs were released.
    #[schema(maximum = 256)]
    pub released: u32,
}

/// `POST /v1/vms/{name}/attach`: every VF is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Attached {
    /// The VM.
    pub vm: VmName,
    /// The rows of the VFs attached.
    pub attached: Vec<CorrespondenceRow>,
}

/// `DELETE /v1/vms/{name}/devices/{local_index}`: the VF went back to the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Detached {
    /// The VM.
    pub vm: VmName,
    /// The local index released.
    pub detached: LocalIndex,
}

/// A function with its counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryFunction {
    /// Name.
    pub name: FunctionName,
    /// Description.
    pub description: String,
    /// The driver the guest binds.
    pub guest_driver: DriverName,
    /// The driver the host binds before pass-through.
    pub host_driver: DriverName,
    /// VFs carrying it.
    pub total: u64,
    /// Of which free.
    pub free: u64,
}

/// A VF with its allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryVf {
    /// Stable global index.
    pub global_index: GlobalIndex,
    /// Host location.
    pub location: Bdf,
    /// Its PF.
    pub pf: Bdf,
    /// Its function; `null` when the profiles give it none (never allocated).
    #[schema(required)]
    pub function: Option<FunctionName>,
    /// The driver the host binds before pass-through.
    #[schema(required)]
    pub host_driver: Option<DriverName>,
    /// The driver the guest binds.
    #[schema(required)]
    pub guest_driver: Option<DriverName>,
    /// NUMA node.
    #[schema(value_type = Option<NumaNode>, required)]
    pub numa_node: Option<i32>,
    /// Vendor ID the VF reports.
    #[schema(required)]
    pub vendor: Option<PciId>,
    /// Device ID the VF reports.
    #[schema(required)]
    pub device: Option<PciId>,
    /// Holder, if any.
    #[schema(required)]
    pub vm: Option<VmName>,
    /// Local index in the holder.
    #[schema(required)]
    pub local_index: Option<LocalIndex>,
    /// Assignment state, if assigned.
    #[schema(required)]
    pub state: Option<AssignState>,
    /// Set when the kubelet holds the VF (a Kubernetes container, through vfmap's device
    /// plugin) instead of a VM; `vm`, `local_index` and `state` are then `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubelet: Option<KubeletHolding>,
    /// Set when the VF is quarantined (its scrub failed): why. It is not handed out until an
    /// operator clears it (`GET /v1/quarantine`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    /// Set while the VF's card re-programs it: the function it is to carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programming: Option<FunctionName>,
}

/// A VF the kubelet holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KubeletHolding {
    /// The container holding it, once the kubelet's PodResources named it.
    #[schema(required)]
    pub owner: Option<vfmap_core::PodContainer>,
    /// When the device plugin's Allocate recorded it, milliseconds since the Unix epoch.
    pub allocated_at_ms: u64,
    /// `held`, or `releasing` (reset, host driver, free).
    pub state: vfmap_core::HoldState,
}

/// `GET /v1/inventory`: functions with counts, and every VF with its allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Functions.
    pub functions: Vec<InventoryFunction>,
    /// VFs by global index.
    pub vfs: Vec<InventoryVf>,
}

/// Whether the daemon is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Healthy.
    Ok,
    /// Alive and answering, but still starting (see `phase`): requests that need the pool
    /// wait for it (bounded) or are answered 503 `starting`.
    Starting,
    /// A state commit failed (restart the daemon), a pool invariant is broken, or the
    /// start-up failed (the daemon is exiting).
    Degraded,
}

/// Where the daemon's start-up is. The API answers from the first phase on; the pool is
/// usable (attach, detach, VM changes, inventory) only once `ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartupPhase {
    /// Reading the host (sysfs discovery) and preparing it (VFs created, host drivers bound).
    PreparingHost,
    /// Opening the state database: stable indexes, VMs and assignments.
    LoadingState,
    /// Recovery: asking each VM's hypervisor what is plugged, finishing or rolling back what
    /// was in flight. No VF is handed out before it is done.
    Recovering,
    /// Serving: the pool is up.
    Ready,
    /// The start-up failed; the daemon is exiting (its log says why).
    Failed,
}

impl StartupPhase {
    /// The phase as the API writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            StartupPhase::PreparingHost => "preparing_host",
            StartupPhase::LoadingState => "loading_state",
            StartupPhase::Recovering => "recovering",
            StartupPhase::Ready => "ready",
            StartupPhase::Failed => "failed",
        }
    }
}

impl std::fmt::Display for StartupPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// `ok`, `starting` or `degraded`.
    pub status: HealthStatus,
    /// The daemon's version.
    pub version: String,
    /// The first broken pool invariant, if any.
    #[schema(required)]
    pub invariants: Option<String>,
    /// Where the start-up is (`ready` once the pool is up).
    pub phase: StartupPhase,
}

/// Defines [`ErrorCode`] with its variants' wire names and statuses, and [`ErrorCode::ALL`].
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident = $text:literal, $status:literal;)*) => {
        /// Every stable error code the daemon answers, each with its one HTTP status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code as the API writes it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text,)*
                }
            }

            /// The HTTP status every answer with this code has.
            pub const fn status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $status,)*
                }
            }
        }
    };
}

error_codes! {
    /// A malformed body, an unknown field, an invalid value, or a path segment that does not
    /// decode or parse.
    BadRequest = "bad_request", 400;
    /// No VM of that name is registered.
    UnknownVm = "unknown_vm", 404;
    /// No VF carries that function.
    UnknownFunction = "unknown_function", 404;
    /// Nothing is attached at that local index.
    UnknownLocalIndex = "unknown_local_index", 404;
    /// No such endpoint.
    NotFound = "not_found", 404;
    /// The path exists, the method does not (`Allow` lists those it has).
    MethodNotAllowed = "method_not_allowed", 405;
    /// The body is over 65,536 bytes.
    PayloadTooLarge = "payload_too_large", 413;
    /// The body is not sent as `application/json`.
    UnsupportedMediaType = "unsupported_media_type", 415;
    /// Not enough free VFs match the request (the error says how many are `free`).
    NoFreeVf = "no_free_vf", 409;
    /// Not enough free slots in the VM (the error says how many, `free_slots`).
    NoFreeSlot = "no_free_slot", 409;
    /// A VM of that name is registered already.
    VmExists = "vm_exists", 409;
    /// An attach or detach of it is in flight.
    Busy = "busy", 409;
    /// The VM still holds VFs.
    VmHoldsVfs = "vm_holds_vfs", 409;
    /// The assignment is not in a state that allows the change.
    Conflict = "conflict", 409;
    /// No quarantined VF has that global index.
    NotQuarantined = "not_quarantined", 404;
    /// No VF has that global index.
    UnknownVf = "unknown_vf", 404;
    /// The VF's card's profile does not let its function become the one asked for.
    NotProgrammable = "not_programmable", 409;
    /// The card's `program` hook failed; the VF is quarantined.
    ProgramFailed = "program_failed", 502;
    /// The quarantined VF's scrub failed again; it stays quarantined (`force` clears it
    /// anyway).
    StillDirty = "still_dirty", 409;
    /// An attach failed for another reason (e.g. the function names no drivers); it was
    /// rolled back.
    AttachFailed = "attach_failed", 502;
    /// Binding the VF to its host driver failed; the attach was rolled back.
    HostBindFailed = "host_bind_failed", 500;
    /// The VM is not running: nothing listens on its QMP socket, or its libvirt domain is
    /// not active.
    VmNotRunning = "vm_not_running", 502;
    /// The libvirt domain to register does not exist.
    UnknownDomain = "unknown_domain", 404;
    /// The VM to register lacks what vfmap needs (a free hot-pluggable root port, the agent's
    /// channel); the message names it and the fix. Nothing was registered.
    VmNotPrepared = "vm_not_prepared", 409;
    /// The VM has no such slot (no pcie-root-port with that id).
    SlotUnknown = "slot_unknown", 502;
    /// Something is already plugged in the slot.
    SlotOccupied = "slot_occupied", 502;
    /// The hypervisor refused the command or answered something unexpected.
    HypervisorFailed = "hypervisor_failed", 502;
    /// The hypervisor did not answer in time (a hung QEMU).
    HypervisorTimeout = "hypervisor_timeout", 504;
    /// The VM's guest channel cannot be reached, or it broke.
    AgentUnreachable = "agent_unreachable", 502;
    /// The guest agent did not answer in time (is vfmap-agent running in the VM?).
    AgentTimeout = "agent_timeout", 504;
    /// The guest agent could not bind the function's driver, or bound another.
    AgentFailed = "agent_failed", 502;
    /// A detach failed for another reason; retry it.
    DetachFailed = "detach_failed", 502;
    /// The change could not be committed; the daemon is degraded from now on.
    StateError = "state_error", 500;
    /// An earlier commit failed; restart the daemon.
    Degraded = "degraded", 503;
    /// The daemon is starting (discovery, host preparation, recovery) and its pool was not
    /// ready within the request's wait; nothing changed. Retry after the `Retry-After`
    /// header's seconds.
    Starting = "starting", 503;
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong: a stable code, a one-line message, and what some codes add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// The stable code.
    pub code: ErrorCode,
    /// One line for people.
    pub message: String,
    /// With `no_free_vf`: free VFs matching the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub free: Option<u64>,
    /// With `no_free_slot`: the VM's free slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub free_slots: Option<u64>,
}

/// Every error answer, on any path and method: `{"error": {"code", "message", ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

impl ErrorBody {
    /// An error with only a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
                free: None,
                free_slots: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialise_as_their_names() {
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::from(code.as_str())
            );
            let back: ErrorCode =
                serde_json::from_value(serde_json::Value::from(code.as_str())).unwrap();
            assert_eq!(back, *code);
        }
    }

    #[test]
    fn optional_fields_are_left_out_or_null_as_documented() {
        let body = ErrorBody::new(ErrorCode::Busy, "busy");
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":{"code":"busy","message":"busy"}}"#
        );
        let attach: AttachRequest = serde_json::from_str(r#"{"function":"crypto"}"#).unwrap();
        assert_eq!(attach.count, 1);
        assert_eq!(
            serde_json::to_string(&attach).unwrap(),
            r#"{"function":"crypto","count":1}"#
        );
        let health = Health {
            status: HealthStatus::Ok,
            version: "1".into(),
            invariants: None,
            phase: StartupPhase::Ready,
        };
        assert_eq!(
            serde_json::to_string(&health).unwrap(),
            r#"{"status":"ok","version":"1","invariants":null,"phase":"ready"}"#
        );
    }
}
