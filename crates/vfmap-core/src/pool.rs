//! The daemon's pure core: VMs, the pool of VFs, assignments and their state machine.
//!
//! No I/O. Every mutation is split in two: `plan_*` validates and computes the change without
//! touching the pool, and [`Pool::apply`] applies a [`Change`]. The daemon persists a change
//! (and waits for the commit) between the two, so what is in memory is never ahead of the
//! database when a side effect starts.
//!
//! Invariants (checked by [`Pool::check_invariants`] and the property tests):
//! - a VF is in at most one assignment (assignments are keyed by global index);
//! - a (VM, local index) pair is in at most one assignment, and the local index is a slot the
//!   VM has;
//! - every assignment's VM exists and its VF carries the assignment's function;
//! - a VF the kubelet holds ([`crate::kubelet`]) is in no VM's assignment, and the other way
//!   round: VMs and the kubelet take VFs from the one pool, each VF from one of them at most.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::addr::{Bdf, PciId};
use crate::index::{GlobalIndex, LocalIndex};
use crate::profile::{DriverName, FunctionName};

/// A VM's name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct VmName(String);

impl VmName {
    /// Checks `text`; the error explains the rule.
    pub fn new(text: &str) -> Result<VmName, String> {
        let first_ok = text
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
        let rest_ok = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if first_ok && rest_ok && text.len() <= 64 {
            Ok(VmName(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a valid VM name: use letters, digits, '.', '_' and '-', starting \
                 with a letter or digit, at most 64 characters"
            ))
        }
    }
}

crate::names::validated_name!(VmName);

// Lets maps keyed by VmName be searched with a &str (String and str order alike).
impl std::borrow::Borrow<str> for VmName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A hot-plug slot's id in the hypervisor (for QEMU, the id of an empty `pcie-root-port`):
/// QEMU's id rule, a letter then letters, digits, `.`, `_`, `-`, at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct SlotId(String);

impl SlotId {
    /// Checks `text`; the error explains the rule.
    pub fn new(text: &str) -> Result<SlotId, String> {
        let first_ok = text.bytes().next().is_some_and(|b| b.is_ascii_alphabetic());
        let rest_ok = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if first_ok && rest_ok && text.len() <= 64 {
            Ok(SlotId(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a valid slot id: QEMU ids start with a letter and use letters, \
                 digits, '.', '_' and '-', at most 64 characters"
            ))
        }
    }
}

crate::names::validated_name!(SlotId);

/// A registered VM: how to reach it and where VFs can go (as the daemon resolved it: for a
/// libvirt domain, the slots and the agent socket come from the domain's live XML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(examples(json!({
        "name": "web2",
        "backend": {"qmp": {"qmp_socket": "/run/vfmap/web2.qmp", "agent_socket": "/run/vfmap/web2.agent"}},
        "slots": ["rp0", "rp1"]
    })))
)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's name.
    pub name: VmName,
    /// How the daemon drives the VM's hypervisor and reaches its agent.
    pub backend: VmBackend,
    /// Hot-plug slots in order: local index `i` is `slots[i]`.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::openapi::slots_schema))]
    pub slots: Vec<SlotId>,
    /// The VM's NUMA node, if pinned: VFs on that node are preferred.
    #[serde(default, deserialize_with = "crate::whole::optional")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::openapi::NumaNode>))]
    pub numa_node: Option<i32>,
}

/// The hypervisor backend of a VM, chosen per VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmBackend {
    /// A QEMU started by hand with a QMP socket, empty root ports and the agent's chardev.
    Qmp {
        /// QEMU's QMP unix socket.
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::SocketPath))]
        qmp_socket: String,
        /// The guest agent's channel (the virtio-serial port's unix socket on the host).
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::SocketPath))]
        agent_socket: String,
    },
    /// A libvirt domain: libvirt owns the QEMU monitor; vfmap goes through libvirt.
    Libvirt {
        /// The domain's name.
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::DomainName))]
        domain: String,
        /// The libvirt connection URI (e.g. `qemu:///system`).
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::LibvirtUri))]
        uri: String,
        /// The virtio port name of the agent's channel.
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::PortName))]
        port_name: String,
        /// The agent channel's host socket, read from the domain's live XML.
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::SocketPath))]
        agent_socket: String,
        /// Whether attaches also change the domain's persistent definition (`--config`);
        /// by default they are live only.
        #[serde(default)]
        persistent: bool,
    },
}

impl VmBackend {
    /// The host socket of the agent's channel.
    pub fn agent_socket(&self) -> &str {
        match self {
            VmBackend::Qmp { agent_socket, .. } | VmBackend::Libvirt { agent_socket, .. } => {
                agent_socket
            }
        }
    }

    /// The backend's name (`qmp`, `libvirt`).
    pub fn kind(&self) -> &'static str {
        match self {
            VmBackend::Qmp { .. } => "qmp",
            VmBackend::Libvirt { .. } => "libvirt",
        }
    }
}

/// A libvirt domain name as vfmap accepts it: printable ASCII without spaces or `/`, not
/// starting with `-`, 1-200 bytes (libvirt's own rule is looser; this keeps it a safe `virsh`
/// argument and file name).
pub fn check_domain_name(text: &str) -> Result<(), String> {
    if !text.is_empty()
        && text.len() <= 200
        && !text.starts_with('-')
        && text.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a valid libvirt domain name: printable ASCII without spaces or '/', not starting with '-', at most 200 characters"
        ))
    }
}

/// A virtio-serial port name as vfmap accepts it: letters, digits, `.`, `_`, `-`, 1-100 bytes.
pub fn check_port_name(text: &str) -> Result<(), String> {
    if !text.is_empty()
        && text.len() <= 100
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a valid port name: letters, digits, '.', '_' and '-', at most 100 characters"
        ))
    }
}

/// A libvirt connection URI as vfmap accepts it: a local one, `driver[+unix]:///path[?query]`
/// (e.g. `qemu:///system`), printable ASCII, at most 256 bytes. A VF and the VM it goes to are
/// on the same host, so a remote transport (`+ssh`, `+tls`, a host name) is refused: it would
/// only let a request make the daemon open network connections.
pub fn check_libvirt_uri(text: &str) -> Result<(), String> {
    let local = text.split_once(":///").is_some_and(|(scheme, _)| {
        let driver = scheme.strip_suffix("+unix").unwrap_or(scheme);
        !driver.is_empty()
            && driver
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
    });
    if local && text.len() <= 256 && text.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a local libvirt URI such as qemu:///system (driver[+unix]:///path, printable ASCII, at most 256 bytes)"
        ))
    }
}

/// Where an assignment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AssignState {
    /// The VF and local index are taken; nothing done on the host yet.
    Reserved,
    /// The VF is bound to its host driver (vfio-pci) and ready to pass through.
    HostBound,
    /// The hypervisor plugged the VF into the VM's slot.
    Plugged,
    /// The correspondence was sent to the guest agent.
    Sent,
    /// The agent bound the function's driver: done.
    Ready,
    /// Being released: unplug, reset, free.
    Releasing,
}

impl AssignState {
    /// The state's name as the API and database write it.
    pub fn as_str(self) -> &'static str {
        match self {
            AssignState::Reserved => "reserved",
            AssignState::HostBound => "host_bound",
            AssignState::Plugged => "plugged",
            AssignState::Sent => "sent",
            AssignState::Ready => "ready",
            AssignState::Releasing => "releasing",
        }
    }

    /// Parses [`AssignState::as_str`]'s output.
    pub fn parse(text: &str) -> Option<AssignState> {
        [
            AssignState::Reserved,
            AssignState::HostBound,
            AssignState::Plugged,
            AssignState::Sent,
            AssignState::Ready,
            AssignState::Releasing,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// The forward step of an attach, or `None` at its end.
    pub fn next_attach_step(self) -> Option<AssignState> {
        match self {
            AssignState::Reserved => Some(AssignState::HostBound),
            AssignState::HostBound => Some(AssignState::Plugged),
            AssignState::Plugged => Some(AssignState::Sent),
            AssignState::Sent => Some(AssignState::Ready),
            AssignState::Ready | AssignState::Releasing => None,
        }
    }

    /// Whether an attach is still running (a crash here is rolled back).
    pub fn is_attaching(self) -> bool {
        !matches!(self, AssignState::Ready | AssignState::Releasing)
    }
}

/// One VF given to one VM at one local index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The VF.
    pub global_index: GlobalIndex,
    /// Its host location.
    pub location: Bdf,
    /// The VM.
    pub vm: VmName,
    /// Where the VF sits in the VM: slot `local_index` of the VM's slots.
    pub local_index: LocalIndex,
    /// The function it serves.
    pub function: FunctionName,
    /// Where the assignment is in its life.
    pub state: AssignState,
}

/// A VF as the pool knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolVf {
    /// Stable global index.
    pub global_index: GlobalIndex,
    /// Host location.
    pub location: Bdf,
    /// Its PF.
    pub pf: Bdf,
    /// Function, `None` when unassigned (never allocated).
    pub function: Option<FunctionName>,
    /// Host driver wanted before pass-through.
    pub host_driver: Option<DriverName>,
    /// Guest driver for its function.
    pub guest_driver: Option<DriverName>,
    /// NUMA node.
    pub numa_node: Option<i32>,
    /// Vendor ID the VF reports.
    pub vendor: Option<PciId>,
    /// Device ID the VF reports.
    pub device: Option<PciId>,
}

/// A service request: "give VM `vm` `count` VFs of `function`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The VM.
    pub vm: VmName,
    /// The function.
    pub function: String,
    /// How many VFs.
    pub count: u32,
    /// Only VFs on this NUMA node.
    pub numa_node: Option<i32>,
    /// Only VFs of this PF.
    pub pf: Option<Bdf>,
}

/// Why the pool refuses a change. Nothing is changed when it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No VM of that name.
    #[error("no VM named {0:?} is registered")]
    UnknownVm(String),
    /// The VM name is taken.
    #[error("a VM named {0:?} is already registered")]
    VmExists(String),
    /// No VF carries that function.
    #[error("no VF carries function {0:?}; see the inventory for the functions this host has")]
    UnknownFunction(String),
    /// Not enough free VFs.
    #[error("{wanted} VF(s) of function {function:?} requested{filter}, {free} free")]
    NoFreeVf {
        /// The function.
        function: String,
        /// How many were asked for.
        wanted: u32,
        /// How many are free (matching the filters).
        free: usize,
        /// The NUMA/PF filter, described.
        filter: String,
    },
    /// Not enough free slots on the VM.
    #[error("VM {vm:?} has {free} free slot(s) of {total}, {wanted} needed")]
    NoFreeSlot {
        /// The VM.
        vm: String,
        /// How many were needed.
        wanted: u32,
        /// Free slots.
        free: usize,
        /// All slots.
        total: usize,
    },
    /// Nothing at that local index.
    #[error("VM {vm:?} has nothing at local index {local_index}")]
    NoSuchLocalIndex {
        /// The VM.
        vm: String,
        /// The local index.
        local_index: LocalIndex,
    },
    /// The assignment is in the middle of another operation.
    #[error("VM {vm:?} local index {local_index} is busy ({state}); retry when it is ready")]
    Busy {
        /// The VM.
        vm: String,
        /// The local index.
        local_index: LocalIndex,
        /// Its state.
        state: &'static str,
    },
    /// The VM still holds VFs.
    #[error("VM {vm:?} still holds {count} VF(s); release them first")]
    VmHoldsVfs {
        /// The VM.
        vm: String,
        /// How many.
        count: usize,
    },
    /// A VM spec that cannot be used.
    #[error("invalid VM: {0}")]
    InvalidVm(String),
    /// A request that cannot be used.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A state change the state machine does not allow.
    #[error("VF {global_index} cannot go from {from} to {to}")]
    BadTransition {
        /// The VF.
        global_index: GlobalIndex,
        /// Current state.
        from: &'static str,
        /// Requested state.
        to: &'static str,
    },
    /// The VF is held by another holder (a VM, or the kubelet).
    #[error("VF {vf} is held by {by}")]
    Taken {
        /// The VF.
        vf: Bdf,
        /// Who holds it, described.
        by: String,
    },
    /// No assignment for that VF.
    #[error("VF {0} is not assigned")]
    NotAssigned(GlobalIndex),
    /// The VF is not quarantined.
    #[error("VF {0} is not quarantined")]
    NotQuarantined(GlobalIndex),
    /// No re-programming of the VF is in progress.
    #[error("VF {0} is not being re-programmed")]
    NotProgramming(GlobalIndex),
    /// No VF has this global index.
    #[error("no VF has global index {0}")]
    UnknownVf(GlobalIndex),
    /// The VF's function does not allow the change: it carries none, or already the one asked.
    #[error("VF {vf} {problem}")]
    FunctionConflict {
        /// The VF.
        vf: Bdf,
        /// What is in the way, e.g. `already carries compress`.
        problem: String,
    },
}

/// A validated change, to persist and then apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Register a VM.
    AddVm(VmSpec),
    /// Forget a VM (it holds nothing).
    RemoveVm(VmName),
    /// New assignments, in `Reserved`.
    Reserve(Vec<Assignment>),
    /// An assignment moves to a new state.
    SetState {
        /// The VF.
        global_index: GlobalIndex,
        /// The state it is in now: the store checks it, so a change planned on a stale view
        /// (another daemon, a lost race) is refused rather than applied.
        from: AssignState,
        /// The new state.
        state: AssignState,
    },
    /// The assignment is gone; the VF is free.
    Free {
        /// The VF.
        global_index: GlobalIndex,
        /// Who holds it now: the store frees it only from this holder.
        vm: VmName,
        /// At which local index.
        local_index: LocalIndex,
    },
    /// New holds of the kubelet (Allocate, or an adoption), `held`.
    KubeletReserve(Vec<crate::kubelet::KubeletHold>),
    /// The container holding a kubelet-held VF is known now (PodResources listed it).
    KubeletOwner {
        /// The VF.
        global_index: GlobalIndex,
        /// The container.
        owner: crate::kubelet::PodContainer,
    },
    /// A kubelet-held VF starts its release (reset, host driver, free).
    KubeletReleasing {
        /// The VF.
        global_index: GlobalIndex,
    },
    /// The kubelet's hold is gone; the VF is free.
    KubeletFree {
        /// The VF.
        global_index: GlobalIndex,
    },
    /// A VF just freed goes out of the pool (its scrub failed).
    Quarantine(crate::quarantine::Quarantine),
    /// An operator cleared a quarantined VF: it is free.
    ClearQuarantine {
        /// The VF.
        global_index: GlobalIndex,
    },
    /// A free VF's re-programming starts: it is out of the pool until it ends.
    ProgramStart(crate::program::Programming),
    /// The re-programming succeeded: the VF carries the new function, with its drivers.
    Programmed {
        /// The VF.
        global_index: GlobalIndex,
        /// Its function now.
        function: FunctionName,
        /// The function's drivers.
        drivers: crate::program::Drivers,
    },
    /// The re-programming failed (with a quarantine of the VF in the same commit).
    ProgramAbandoned {
        /// The VF.
        global_index: GlobalIndex,
    },
}

/// VMs, VFs and assignments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pool {
    pub(crate) vfs: BTreeMap<GlobalIndex, PoolVf>,
    vms: BTreeMap<VmName, VmSpec>,
    assignments: BTreeMap<GlobalIndex, Assignment>,
    by_slot: BTreeMap<(VmName, LocalIndex), GlobalIndex>,
    /// The kubelet's holds (`crate::kubelet`); never a key of `assignments` too.
    pub(crate) kubelet: BTreeMap<GlobalIndex, crate::kubelet::KubeletHold>,
    /// VFs out of the pool after a failed scrub (`crate::quarantine`); held by nobody.
    pub(crate) quarantine: BTreeMap<GlobalIndex, crate::quarantine::Quarantine>,
    /// VFs being re-programmed (`crate::program`); held by nobody else.
    pub(crate) programming: BTreeMap<GlobalIndex, crate::program::Programming>,
}

impl Pool {
    /// A pool over these VFs with no VM.
    pub fn new(vfs: impl IntoIterator<Item = PoolVf>) -> Pool {
        Pool {
            vfs: vfs.into_iter().map(|v| (v.global_index, v)).collect(),
            ..Pool::default()
        }
    }

    /// Every VF, by global index.
    pub fn vfs(&self) -> impl Iterator<Item = &PoolVf> {
        self.vfs.values()
    }

    /// One VF.
    pub fn vf(&self, index: GlobalIndex) -> Option<&PoolVf> {
        self.vfs.get(&index)
    }

    /// Every VM, by name.
    pub fn vms(&self) -> impl Iterator<Item = &VmSpec> {
        self.vms.values()
    }

    /// One VM.
    pub fn vm(&self, name: &str) -> Option<&VmSpec> {
        self.vms
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v)
    }

    /// Every assignment, by global index.
    pub fn assignments(&self) -> impl Iterator<Item = &Assignment> {
        self.assignments.values()
    }

    /// The assignment of a VF.
    pub fn assignment(&self, index: GlobalIndex) -> Option<&Assignment> {
        self.assignments.get(&index)
    }

    /// A VM's assignments, by local index.
    pub fn assignments_of<'a>(
        &'a self,
        vm: &'a VmName,
    ) -> impl Iterator<Item = &'a Assignment> + 'a {
        self.by_slot
            .range((vm.clone(), LocalIndex::new(0))..=(vm.clone(), LocalIndex::new(u32::MAX)))
            .filter_map(|(_, gi)| self.assignments.get(gi))
    }

    /// The assignment at a VM's local index.
    pub fn at_local_index(&self, vm: &VmName, local_index: LocalIndex) -> Option<&Assignment> {
        let gi = self.by_slot.get(&(vm.clone(), local_index))?;
        self.assignments.get(gi)
    }

    /// Free VFs of `function` (no filters).
    pub fn free_count(&self, function: &str) -> usize {
        self.vfs
            .values()
            .filter(|v| self.is_free_for(v, function))
            .count()
    }

    pub(crate) fn is_free_for(&self, vf: &PoolVf, function: &str) -> bool {
        vf.function.as_ref().is_some_and(|f| f.as_str() == function)
            && !self.assignments.contains_key(&vf.global_index)
            && !self.kubelet.contains_key(&vf.global_index)
            && !self.quarantine.contains_key(&vf.global_index)
            && !self.programming.contains_key(&vf.global_index)
    }

    /// Validates a VM registration.
    pub fn plan_add_vm(&self, spec: VmSpec) -> Result<Change, PoolError> {
        if self.vms.contains_key(&spec.name) {
            return Err(PoolError::VmExists(spec.name.to_string()));
        }
        if spec.slots.is_empty() {
            return Err(PoolError::InvalidVm(
                "`slots` is empty: give the ids of the VM's empty hot-plug slots".into(),
            ));
        }
        if spec.slots.len() > 256 {
            return Err(PoolError::InvalidVm("at most 256 slots".into()));
        }
        for (i, slot) in spec.slots.iter().enumerate() {
            if spec.slots[..i].contains(slot) {
                return Err(PoolError::InvalidVm(format!("slot {slot} is listed twice")));
            }
        }
        let mut paths = vec![("agent_socket", spec.backend.agent_socket())];
        match &spec.backend {
            VmBackend::Qmp { qmp_socket, .. } => paths.push(("qmp_socket", qmp_socket)),
            VmBackend::Libvirt {
                domain,
                uri,
                port_name,
                ..
            } => {
                check_domain_name(domain).map_err(PoolError::InvalidVm)?;
                check_libvirt_uri(uri).map_err(PoolError::InvalidVm)?;
                check_port_name(port_name).map_err(PoolError::InvalidVm)?;
            }
        }
        for (field, path) in paths {
            if !path.starts_with('/') || path.len() > 107 || path.contains('\0') {
                return Err(PoolError::InvalidVm(format!(
                    "`{field}` must be an absolute path of at most 107 bytes (a unix socket path)"
                )));
            }
        }
        Ok(Change::AddVm(spec))
    }

    /// Validates removing a VM that holds nothing.
    pub fn plan_remove_vm(&self, name: &str) -> Result<Change, PoolError> {
        let vm = self
            .vm(name)
            .ok_or_else(|| PoolError::UnknownVm(name.to_owned()))?;
        let held = self.assignments_of(&vm.name).count();
        if held > 0 {
            return Err(PoolError::VmHoldsVfs {
                vm: name.to_owned(),
                count: held,
            });
        }
        Ok(Change::RemoveVm(vm.name.clone()))
    }

    /// Chooses VFs and local indexes for a request, all or nothing.
    ///
    /// VFs: free ones carrying the function (and matching the filters); the VM's NUMA node first
    /// when it has one; then spread over PFs (the PF with the most free VFs of the function
    /// first), then the lowest global index. Local indexes: the lowest free ones.
    pub fn plan_reserve(&self, request: &Request) -> Result<Change, PoolError> {
        let vm = self
            .vm(request.vm.as_str())
            .ok_or_else(|| PoolError::UnknownVm(request.vm.to_string()))?;
        if request.count == 0 || request.count > 256 {
            return Err(PoolError::InvalidRequest("`count` must be 1-256".into()));
        }
        if !self.vfs.values().any(|v| {
            v.function
                .as_ref()
                .is_some_and(|f| f.as_str() == request.function)
        }) {
            return Err(PoolError::UnknownFunction(request.function.clone()));
        }
        let mut candidates: Vec<&PoolVf> = self
            .vfs
            .values()
            .filter(|v| self.is_free_for(v, &request.function))
            .filter(|v| request.numa_node.is_none_or(|n| v.numa_node == Some(n)))
            .filter(|v| request.pf.is_none_or(|pf| v.pf == pf))
            .collect();
        let wanted = request.count as usize;
        if candidates.len() < wanted {
            let mut filter = String::new();
            if let Some(n) = request.numa_node {
                filter += &format!(" on NUMA node {n}");
            }
            if let Some(pf) = request.pf {
                filter += &format!(" on PF {pf}");
            }
            return Err(PoolError::NoFreeVf {
                function: request.function.clone(),
                wanted: request.count,
                free: candidates.len(),
                filter,
            });
        }
        let free_slots: Vec<LocalIndex> = (0..vm.slots.len() as u32)
            .map(LocalIndex::new)
            .filter(|i| !self.by_slot.contains_key(&(vm.name.clone(), *i)))
            .take(wanted)
            .collect();
        if free_slots.len() < wanted {
            let used = self.assignments_of(&vm.name).count();
            return Err(PoolError::NoFreeSlot {
                vm: vm.name.to_string(),
                wanted: request.count,
                free: vm.slots.len() - used,
                total: vm.slots.len(),
            });
        }

        let mut free_per_pf: BTreeMap<Bdf, usize> = BTreeMap::new();
        for vf in &candidates {
            *free_per_pf.entry(vf.pf).or_default() += 1;
        }
        let mut chosen = Vec::with_capacity(wanted);
        for local_index in free_slots {
            let best = candidates
                .iter()
                .enumerate()
                .min_by_key(|(_, v)| {
                    let off_node = vm.numa_node.is_some() && v.numa_node != vm.numa_node;
                    let pf_free = free_per_pf.get(&v.pf).copied().unwrap_or(0);
                    (off_node, usize::MAX - pf_free, v.global_index)
                })
                .map(|(i, _)| i);
            let Some(i) = best else { break };
            let vf = candidates.swap_remove(i);
            if let Some(n) = free_per_pf.get_mut(&vf.pf) {
                *n -= 1;
            }
            // Candidates were filtered on carrying the function.
            let Some(function) = vf.function.clone() else {
                continue;
            };
            chosen.push(Assignment {
                global_index: vf.global_index,
                location: vf.location,
                vm: vm.name.clone(),
                local_index,
                function,
                state: AssignState::Reserved,
            });
        }
        chosen.sort_by_key(|a| a.local_index);
        Ok(Change::Reserve(chosen))
    }

    /// Validates moving an assignment to `state` (the next attach step, or `Releasing` from
    /// `Ready`).
    pub fn plan_set_state(
        &self,
        global_index: GlobalIndex,
        state: AssignState,
    ) -> Result<Change, PoolError> {
        let current = self
            .assignments
            .get(&global_index)
            .ok_or(PoolError::NotAssigned(global_index))?
            .state;
        let allowed = current.next_attach_step() == Some(state)
            || (current == AssignState::Ready && state == AssignState::Releasing);
        if !allowed {
            return Err(PoolError::BadTransition {
                global_index,
                from: current.as_str(),
                to: state.as_str(),
            });
        }
        Ok(Change::SetState {
            global_index,
            from: current,
            state,
        })
    }

    /// Validates consecutive attach steps taken in one commit (no side effect between them).
    pub fn plan_advance(
        &self,
        global_index: GlobalIndex,
        states: &[AssignState],
    ) -> Result<Vec<Change>, PoolError> {
        let mut changes = Vec::with_capacity(states.len());
        let mut previous: Option<AssignState> = None;
        for &state in states {
            let change = match previous {
                None => self.plan_set_state(global_index, state)?,
                Some(from) if from.next_attach_step() == Some(state) => Change::SetState {
                    global_index,
                    from,
                    state,
                },
                Some(from) => {
                    return Err(PoolError::BadTransition {
                        global_index,
                        from: from.as_str(),
                        to: state.as_str(),
                    });
                }
            };
            changes.push(change);
            previous = Some(state);
        }
        Ok(changes)
    }

    /// Validates giving up an attach whose rollback could not finish (the hypervisor did not
    /// confirm the unplug): the assignment becomes `Releasing`, so it is never handed out and
    /// its cleanup can be retried like any release.
    pub fn plan_abandon(&self, global_index: GlobalIndex) -> Result<Change, PoolError> {
        let current = self
            .assignments
            .get(&global_index)
            .ok_or(PoolError::NotAssigned(global_index))?
            .state;
        if !current.is_attaching() {
            return Err(PoolError::BadTransition {
                global_index,
                from: current.as_str(),
                to: AssignState::Releasing.as_str(),
            });
        }
        Ok(Change::SetState {
            global_index,
            from: current,
            state: AssignState::Releasing,
        })
    }

    /// Validates starting the release of a VM's local index.
    pub fn plan_release(&self, vm: &str, local_index: LocalIndex) -> Result<Change, PoolError> {
        let spec = self
            .vm(vm)
            .ok_or_else(|| PoolError::UnknownVm(vm.to_owned()))?;
        let assignment = self
            .at_local_index(&spec.name, local_index)
            .ok_or_else(|| PoolError::NoSuchLocalIndex {
                vm: vm.to_owned(),
                local_index,
            })?;
        if assignment.state != AssignState::Ready {
            return Err(PoolError::Busy {
                vm: vm.to_owned(),
                local_index,
                state: assignment.state.as_str(),
            });
        }
        self.plan_set_state(assignment.global_index, AssignState::Releasing)
    }

    /// Validates freeing a VF (after a rollback or a release).
    pub fn plan_free(&self, global_index: GlobalIndex) -> Result<Change, PoolError> {
        if self.assignments.contains_key(&global_index) {
            let a = &self.assignments[&global_index];
            Ok(Change::Free {
                global_index,
                vm: a.vm.clone(),
                local_index: a.local_index,
            })
        } else {
            Err(PoolError::NotAssigned(global_index))
        }
    }

    /// Applies a change from a `plan_*` method of this pool (in this state).
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::AddVm(spec) => {
                self.vms.insert(spec.name.clone(), spec.clone());
            }
            Change::RemoveVm(name) => {
                self.vms.remove(name);
            }
            Change::Reserve(assignments) => {
                for a in assignments {
                    self.by_slot
                        .insert((a.vm.clone(), a.local_index), a.global_index);
                    self.assignments.insert(a.global_index, a.clone());
                }
            }
            Change::SetState {
                global_index,
                state,
                ..
            } => {
                if let Some(a) = self.assignments.get_mut(global_index) {
                    a.state = *state;
                }
            }
            Change::Free { global_index, .. } => {
                if let Some(a) = self.assignments.remove(global_index) {
                    self.by_slot.remove(&(a.vm, a.local_index));
                }
            }
            Change::KubeletReserve(_)
            | Change::KubeletOwner { .. }
            | Change::KubeletReleasing { .. }
            | Change::KubeletFree { .. } => self.apply_kubelet(change),
            Change::Quarantine(_) | Change::ClearQuarantine { .. } => self.apply_quarantine(change),
            Change::ProgramStart(_)
            | Change::Programmed { .. }
            | Change::ProgramAbandoned { .. } => self.apply_program(change),
        }
    }

    /// Restores persisted state (at start-up). Assignments that break an invariant are returned
    /// instead of loaded.
    pub fn restore(
        &mut self,
        vms: Vec<VmSpec>,
        assignments: Vec<Assignment>,
    ) -> Vec<(Assignment, String)> {
        for vm in vms {
            self.vms.insert(vm.name.clone(), vm);
        }
        let mut rejected = Vec::new();
        for a in assignments {
            let problem = if !self.vms.contains_key(&a.vm) {
                Some("its VM is not registered".to_owned())
            } else if self
                .vf(a.global_index)
                .is_none_or(|v| v.location != a.location)
            {
                Some(format!(
                    "VF {} is no longer at global index {}",
                    a.location, a.global_index
                ))
            } else if self.assignments.contains_key(&a.global_index)
                || self.kubelet.contains_key(&a.global_index)
                || self.by_slot.contains_key(&(a.vm.clone(), a.local_index))
            {
                Some("its VF or local index is taken twice".to_owned())
            } else {
                None
            };
            match problem {
                Some(p) => rejected.push((a, p)),
                None => self.apply(&Change::Reserve(vec![a])),
            }
        }
        rejected
    }

    /// Checks every invariant; returns the first broken one.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut slots_seen = BTreeMap::new();
        for (gi, a) in &self.assignments {
            if *gi != a.global_index {
                return Err(format!(
                    "assignment keyed {gi} is for VF {}",
                    a.global_index
                ));
            }
            let vm = self
                .vms
                .get(&a.vm)
                .ok_or(format!("VF {gi} assigned to unknown VM {}", a.vm))?;
            if a.local_index.slot() >= vm.slots.len() {
                return Err(format!(
                    "VF {gi} at local index {} past the VM's slots",
                    a.local_index
                ));
            }
            if let Some(other) = slots_seen.insert((a.vm.clone(), a.local_index), *gi) {
                return Err(format!(
                    "VFs {other} and {gi} share {} local index {}",
                    a.vm, a.local_index
                ));
            }
            let vf = self
                .vfs
                .get(gi)
                .ok_or(format!("assigned VF {gi} is not in the pool"))?;
            if vf.function.as_ref() != Some(&a.function) {
                return Err(format!(
                    "VF {gi} serves {} but carries {:?}",
                    a.function, vf.function
                ));
            }
        }
        if slots_seen != self.by_slot {
            return Err("the slot index disagrees with the assignments".into());
        }
        self.check_kubelet_invariants()?;
        self.check_quarantine_invariants()?;
        self.check_program_invariants()
    }
}

/// What crash recovery does with an assignment found in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    /// It is complete and the hypervisor still has the device: keep it.
    Keep,
    /// Undo it: unplug if plugged, reset the VF, free it.
    RollBack,
    /// Finish the release: unplug if plugged, reset the VF, free it.
    FinishRelease,
    /// The hypervisor lost the device (the VM restarted or died): reset the VF and free it.
    Lost,
}

/// Decides what to do with an assignment after a restart. An attach that did not finish is
/// rolled back (its client never got a success); a release is finished.
pub fn plan_recovery(state: AssignState, plugged: bool) -> Recovery {
    match state {
        AssignState::Ready if plugged => Recovery::Keep,
        AssignState::Ready => Recovery::Lost,
        AssignState::Releasing => Recovery::FinishRelease,
        _ => Recovery::RollBack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const fn g(i: u32) -> GlobalIndex {
        GlobalIndex::new(i)
    }
    const fn l(i: u32) -> LocalIndex {
        LocalIndex::new(i)
    }
    use proptest::prelude::*;

    fn name(s: &str) -> VmName {
        VmName::new(s).unwrap()
    }

    fn vf(gi: u32, pf: u8, function: &str, numa: i32) -> PoolVf {
        let pf_bdf = Bdf::new(0, pf, 0, 0).unwrap();
        PoolVf {
            global_index: g(gi),
            location: pf_bdf.vf_location(1, 1, gi as u16).unwrap(),
            pf: pf_bdf,
            function: Some(FunctionName::new(function).unwrap()),
            host_driver: Some(DriverName::new("vfio-pci").unwrap()),
            guest_driver: Some(DriverName::new("pci-stub").unwrap()),
            numa_node: Some(numa),
            vendor: None,
            device: None,
        }
    }

    fn vm(n: &str, slots: usize, numa: Option<i32>) -> VmSpec {
        VmSpec {
            name: name(n),
            backend: VmBackend::Qmp {
                qmp_socket: format!("/run/{n}.qmp"),
                agent_socket: format!("/run/{n}.agent"),
            },
            slots: (0..slots)
                .map(|i| SlotId::new(&format!("rp{i}")).unwrap())
                .collect(),
            numa_node: numa,
        }
    }

    fn request(v: &str, function: &str, count: u32) -> Request {
        Request {
            vm: name(v),
            function: function.into(),
            count,
            numa_node: None,
            pf: None,
        }
    }

    fn pool_with(vfs: Vec<PoolVf>, vms: Vec<VmSpec>) -> Pool {
        let mut pool = Pool::new(vfs);
        for v in vms {
            let change = pool.plan_add_vm(v).unwrap();
            pool.apply(&change);
        }
        pool
    }

    fn reserved(change: &Change) -> &[Assignment] {
        match change {
            Change::Reserve(a) => a,
            other => panic!("not a reservation: {other:?}"),
        }
    }

    #[test]
    fn names_and_slots() {
        assert!(VmName::new("web-1").is_ok());
        assert!(VmName::new("").is_err());
        assert!(VmName::new("a/b").is_err());
        assert!(VmName::new("-x").is_err());
        assert!(SlotId::new("rp0").is_ok());
        assert!(SlotId::new("0rp").is_err());
        assert!(SlotId::new("rp 0").is_err());
    }

    #[test]
    fn reserve_takes_lowest_local_indexes_and_spreads_over_pfs() {
        let vfs = vec![
            vf(0, 1, "crypto", 0),
            vf(1, 1, "crypto", 0),
            vf(2, 2, "crypto", 0),
            vf(3, 2, "crypto", 0),
            vf(4, 2, "crypto", 0),
        ];
        let pool = pool_with(vfs, vec![vm("web", 4, None)]);
        let change = pool.plan_reserve(&request("web", "crypto", 2)).unwrap();
        let got = reserved(&change);
        assert_eq!(
            got.iter().map(|a| a.local_index).collect::<Vec<_>>(),
            [l(0), l(1)]
        );
        let pfs: Vec<u8> = got
            .iter()
            .map(|a| pool.vf(a.global_index).unwrap().pf.bus)
            .collect();
        assert_eq!(
            pfs,
            [2, 1],
            "first from the PF with most free VFs, then the other PF"
        );
        assert!(got.iter().all(|a| a.state == AssignState::Reserved));
    }

    #[test]
    fn reserve_prefers_the_vms_numa_node_and_honours_filters() {
        let vfs = vec![
            vf(0, 1, "crypto", 0),
            vf(1, 2, "crypto", 1),
            vf(2, 2, "crypto", 1),
        ];
        let pool = pool_with(vfs, vec![vm("web", 4, Some(0))]);
        let change = pool.plan_reserve(&request("web", "crypto", 1)).unwrap();
        assert_eq!(reserved(&change)[0].global_index, g(0));
        let mut on_node_1 = request("web", "crypto", 3);
        on_node_1.numa_node = Some(1);
        let err = pool.plan_reserve(&on_node_1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "3 VF(s) of function \"crypto\" requested on NUMA node 1, 2 free"
        );
        let mut on_pf = request("web", "crypto", 1);
        on_pf.pf = Some(Bdf::new(0, 2, 0, 0).unwrap());
        assert_eq!(
            reserved(&pool.plan_reserve(&on_pf).unwrap())[0].global_index,
            g(1)
        );
    }

    #[test]
    fn reserve_errors() {
        let pool = pool_with(vec![vf(0, 1, "crypto", 0)], vec![vm("web", 1, None)]);
        assert_eq!(
            pool.plan_reserve(&request("nope", "crypto", 1)),
            Err(PoolError::UnknownVm("nope".into()))
        );
        assert_eq!(
            pool.plan_reserve(&request("web", "dance", 1)),
            Err(PoolError::UnknownFunction("dance".into()))
        );
        assert!(matches!(
            pool.plan_reserve(&request("web", "crypto", 2)),
            Err(PoolError::NoFreeVf { free: 1, .. })
        ));
        assert!(matches!(
            pool.plan_reserve(&request("web", "crypto", 0)),
            Err(PoolError::InvalidRequest(_))
        ));
        let pool = pool_with(
            vec![vf(0, 1, "crypto", 0), vf(1, 1, "crypto", 0)],
            vec![vm("web", 1, None)],
        );
        assert!(matches!(
            pool.plan_reserve(&request("web", "crypto", 2)),
            Err(PoolError::NoFreeSlot {
                free: 1,
                total: 1,
                ..
            })
        ));
    }

    #[test]
    fn state_machine_allows_only_forward_steps_and_release_from_ready() {
        let mut pool = pool_with(vec![vf(0, 1, "crypto", 0)], vec![vm("web", 2, None)]);
        let change = pool.plan_reserve(&request("web", "crypto", 1)).unwrap();
        pool.apply(&change);
        assert!(matches!(
            pool.plan_release("web", l(0)),
            Err(PoolError::Busy {
                state: "reserved",
                ..
            })
        ));
        assert!(pool.plan_set_state(g(0), AssignState::Plugged).is_err());
        for state in [
            AssignState::HostBound,
            AssignState::Plugged,
            AssignState::Sent,
            AssignState::Ready,
        ] {
            let change = pool.plan_set_state(g(0), state).unwrap();
            pool.apply(&change);
        }
        assert!(pool.plan_set_state(g(0), AssignState::Sent).is_err());
        assert!(matches!(
            pool.plan_remove_vm("web"),
            Err(PoolError::VmHoldsVfs { count: 1, .. })
        ));
        let change = pool.plan_release("web", l(0)).unwrap();
        pool.apply(&change);
        let change = pool.plan_free(g(0)).unwrap();
        pool.apply(&change);
        assert_eq!(pool.free_count("crypto"), 1);
        assert!(pool.plan_remove_vm("web").is_ok());
        assert!(matches!(
            pool.plan_release("web", l(1)),
            Err(PoolError::NoSuchLocalIndex { .. })
        ));
    }

    #[test]
    fn vm_registration_is_validated() {
        let pool = pool_with(vec![], vec![vm("web", 1, None)]);
        assert!(matches!(
            pool.plan_add_vm(vm("web", 1, None)),
            Err(PoolError::VmExists(_))
        ));
        assert!(matches!(
            pool.plan_add_vm(vm("db", 0, None)),
            Err(PoolError::InvalidVm(_))
        ));
        let mut twice = vm("db", 2, None);
        twice.slots[1] = twice.slots[0].clone();
        assert!(matches!(
            pool.plan_add_vm(twice),
            Err(PoolError::InvalidVm(_))
        ));
        let mut relative = vm("db", 1, None);
        relative.backend = VmBackend::Qmp {
            qmp_socket: "qmp.sock".into(),
            agent_socket: "/run/db.agent".into(),
        };
        assert!(matches!(
            pool.plan_add_vm(relative),
            Err(PoolError::InvalidVm(_))
        ));
    }

    #[test]
    fn libvirt_vms_are_checked_like_qmp_ones() {
        let pool = Pool::default();
        let libvirt = |domain: &str, uri: &str, port: &str, socket: &str| VmSpec {
            backend: VmBackend::Libvirt {
                domain: domain.into(),
                uri: uri.into(),
                port_name: port.into(),
                agent_socket: socket.into(),
                persistent: false,
            },
            ..vm("dom", 2, None)
        };
        assert!(
            pool.plan_add_vm(libvirt("dom", "qemu:///system", "org.vfmap.0", "/run/a"))
                .is_ok()
        );
        assert!(
            pool.plan_add_vm(libvirt(
                "dom",
                "qemu+unix:///system?socket=/run/l",
                "vfmap",
                "/run/a"
            ))
            .is_ok()
        );
        for (domain, uri, port, socket) in [
            ("-dom", "qemu:///system", "org.vfmap.0", "/run/a"),
            ("a/b", "qemu:///system", "org.vfmap.0", "/run/a"),
            ("dom", "qemu+ssh://host/system", "org.vfmap.0", "/run/a"),
            ("dom", "qemu://host/system", "org.vfmap.0", "/run/a"),
            ("dom", "qemu:///system", "a b", "/run/a"),
            ("dom", "qemu:///system", "org.vfmap.0", "rel"),
        ] {
            assert!(
                matches!(
                    pool.plan_add_vm(libvirt(domain, uri, port, socket)),
                    Err(PoolError::InvalidVm(_))
                ),
                "{domain} {uri} {port} {socket}"
            );
        }
    }

    #[test]
    fn restore_rejects_what_breaks_invariants() {
        let mut pool = Pool::new(vec![vf(0, 1, "crypto", 0), vf(1, 1, "crypto", 0)]);
        let a = |gi: u32, local: u32, v: &str| Assignment {
            global_index: g(gi),
            location: pool_vf_location(gi),
            vm: name(v),
            local_index: l(local),
            function: FunctionName::new("crypto").unwrap(),
            state: AssignState::Ready,
        };
        let rejected = pool.restore(
            vec![vm("web", 2, None)],
            vec![a(0, 0, "web"), a(1, 0, "web"), a(1, 1, "ghost")],
        );
        assert_eq!(rejected.len(), 2);
        pool.check_invariants().unwrap();
    }

    fn pool_vf_location(gi: u32) -> Bdf {
        Bdf::new(0, 1, 0, 0)
            .unwrap()
            .vf_location(1, 1, gi as u16)
            .unwrap()
    }

    #[test]
    fn recovery_rolls_back_attaches_and_finishes_releases() {
        assert_eq!(
            plan_recovery(AssignState::Reserved, false),
            Recovery::RollBack
        );
        assert_eq!(
            plan_recovery(AssignState::Plugged, true),
            Recovery::RollBack
        );
        assert_eq!(plan_recovery(AssignState::Sent, true), Recovery::RollBack);
        assert_eq!(plan_recovery(AssignState::Ready, true), Recovery::Keep);
        assert_eq!(plan_recovery(AssignState::Ready, false), Recovery::Lost);
        assert_eq!(
            plan_recovery(AssignState::Releasing, true),
            Recovery::FinishRelease
        );
    }

    /// One step of a random history: attach, advance, release, free, or crash-and-recover.
    #[derive(Debug, Clone)]
    enum Op {
        Attach {
            vm: usize,
            function: usize,
            count: u32,
        },
        Advance {
            pick: usize,
        },
        /// A pipelined request's step: every attaching VF of the VM moves on in one commit.
        AdvanceVm {
            vm: usize,
        },
        /// A pipelined request's rollback: every attaching VF of the VM is freed.
        FailVm {
            vm: usize,
        },
        Fail {
            pick: usize,
        },
        Release {
            vm: usize,
            local: u32,
        },
        Finish {
            pick: usize,
        },
        Crash {
            plugged_mask: u64,
        },
        RemoveVm {
            vm: usize,
        },
        AddVm {
            vm: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 0..2usize, 1..4u32).prop_map(|(vm, function, count)| Op::Attach {
                vm,
                function,
                count
            }),
            (0..64usize).prop_map(|pick| Op::Advance { pick }),
            (0..3usize).prop_map(|vm| Op::AdvanceVm { vm }),
            (0..3usize).prop_map(|vm| Op::FailVm { vm }),
            (0..64usize).prop_map(|pick| Op::Fail { pick }),
            (0..3usize, 0..5u32).prop_map(|(vm, local)| Op::Release { vm, local }),
            (0..64usize).prop_map(|pick| Op::Finish { pick }),
            any::<u64>().prop_map(|plugged_mask| Op::Crash { plugged_mask }),
            (0..3usize).prop_map(|vm| Op::RemoveVm { vm }),
            (0..3usize).prop_map(|vm| Op::AddVm { vm }),
        ]
    }

    const VMS: [&str; 3] = ["a", "b", "c"];
    const FUNCTIONS: [&str; 2] = ["crypto", "compress"];

    fn nth_assignment(
        pool: &Pool,
        pick: usize,
        filter: impl Fn(&Assignment) -> bool,
    ) -> Option<GlobalIndex> {
        let matching: Vec<_> = pool
            .assignments()
            .filter(|a| filter(a))
            .map(|a| a.global_index)
            .collect();
        (!matching.is_empty()).then(|| matching[pick % matching.len()])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random attach/advance/fail/release/crash histories never double-book a VF, never
        /// leak one, and keep local indexes unique per VM; a rejected plan changes nothing.
        #[test]
        fn histories_never_double_book_or_leak(ops in proptest::collection::vec(op(), 1..80)) {
            let vfs: Vec<PoolVf> = (0..10)
                .map(|i| vf(i, (i % 3) as u8 + 1, FUNCTIONS[(i % 2) as usize], (i % 2) as i32))
                .collect();
            let mut pool = pool_with(vfs, VMS.iter().map(|n| vm(n, 4, None)).collect());
            for op in ops {
                let before = pool.clone();
                let change = match op {
                    Op::Attach { vm, function, count } => pool.plan_reserve(&request(VMS[vm], FUNCTIONS[function], count)),
                    Op::Advance { pick } => match nth_assignment(&pool, pick, |a| a.state.is_attaching()) {
                        Some(gi) => {
                            let next = pool.assignment(gi).and_then(|a| a.state.next_attach_step());
                            pool.plan_set_state(gi, next.unwrap_or(AssignState::Ready))
                        }
                        None => continue,
                    },
                    Op::AdvanceVm { vm } | Op::FailVm { vm } => {
                        // Planned all on the same state, then applied all (one commit).
                        let attaching: Vec<Assignment> = pool
                            .assignments_of(&name(VMS[vm]))
                            .filter(|a| a.state.is_attaching())
                            .cloned()
                            .collect();
                        let planned: Result<Vec<Vec<Change>>, PoolError> = attaching
                            .iter()
                            .map(|a| match op {
                                Op::AdvanceVm { .. } => pool.plan_advance(
                                    a.global_index,
                                    &[a.state.next_attach_step().unwrap_or(AssignState::Ready)],
                                ),
                                _ => pool.plan_free(a.global_index).map(|c| vec![c]),
                            })
                            .collect();
                        match planned {
                            Ok(changes) => {
                                for change in changes.iter().flatten() {
                                    pool.apply(change);
                                }
                            }
                            Err(_) => prop_assert_eq!(&pool, &before, "a refused plan changed the pool"),
                        }
                        pool.check_invariants().map_err(TestCaseError::fail)?;
                        let assigned = pool.assignments().count();
                        let free: usize = FUNCTIONS.iter().map(|f| pool.free_count(f)).sum();
                        prop_assert_eq!(assigned + free, 10);
                        continue;
                    }
                    Op::Fail { pick } => match nth_assignment(&pool, pick, |a| a.state.is_attaching()) {
                        Some(gi) => pool.plan_free(gi),
                        None => continue,
                    },
                    Op::Release { vm, local } => pool.plan_release(VMS[vm], l(local)),
                    Op::Finish { pick } => match nth_assignment(&pool, pick, |a| a.state == AssignState::Releasing) {
                        Some(gi) => pool.plan_free(gi),
                        None => continue,
                    },
                    Op::Crash { plugged_mask } => {
                        // Restart: reload from "disk" (a copy), then recover every assignment.
                        let vms: Vec<VmSpec> = pool.vms().cloned().collect();
                        let held: Vec<Assignment> = pool.assignments().cloned().collect();
                        let mut reloaded = Pool::new(pool.vfs().cloned().collect::<Vec<_>>());
                        prop_assert!(reloaded.restore(vms, held).is_empty());
                        for a in reloaded.assignments().cloned().collect::<Vec<_>>() {
                            let plugged = plugged_mask & (1 << a.global_index.get()) != 0;
                            if plan_recovery(a.state, plugged) != Recovery::Keep {
                                let change = reloaded.plan_free(a.global_index).unwrap();
                                reloaded.apply(&change);
                            }
                        }
                        prop_assert!(reloaded.assignments().all(|a| a.state == AssignState::Ready));
                        pool = reloaded;
                        pool.check_invariants().map_err(TestCaseError::fail)?;
                        continue;
                    }
                    Op::RemoveVm { vm } => pool.plan_remove_vm(VMS[vm]),
                    Op::AddVm { vm: v } => pool.plan_add_vm(vm(VMS[v], 4, None)),
                };
                match change {
                    Ok(change) => pool.apply(&change),
                    Err(_) => prop_assert_eq!(&pool, &before, "a refused plan changed the pool"),
                }
                pool.check_invariants().map_err(TestCaseError::fail)?;
                // No leak: every VF is either free or in exactly one assignment.
                let assigned = pool.assignments().count();
                let free: usize = FUNCTIONS.iter().map(|f| pool.free_count(f)).sum();
                prop_assert_eq!(assigned + free, 10);
            }
        }
    }
}
