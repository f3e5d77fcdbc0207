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

pub use crate::vm::{
    SlotId, VmBackend, VmName, VmSpec, check_domain_name, check_libvirt_uri, check_port_name,
};

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
#[path = "pool_tests.rs"]
mod tests;
