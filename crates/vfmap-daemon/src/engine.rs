//! The engine: drives attach, detach, VM registration and crash recovery through the pure pool,
//! the store and the side-effect adapters.
//!
//! Discipline: every change is planned and applied in memory under one lock and queued to the
//! store in the same order, then awaited *before* the side effect that depends on it. If a
//! commit ever fails, memory may be ahead of disk: the engine then marks itself degraded and
//! refuses further changes until restarted (recovery reconciles from the database).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};
use vfmap_core::protocol::{Answer, Entry, GuestPath};
use vfmap_core::tables::FunctionSummary;
use vfmap_core::{
    AssignState, Assignment, Change, GlobalIndex, Pool, PoolError, PoolVf, Recovery, Request,
    Tables, VmSpec, plan_recovery,
};

use crate::effects::{GuestChannel, HostVfs, Hypervisor, HypervisorError};
pub use cleanup::Cleanup;

mod cleanup;
use crate::store::{Detail, Failure, Loaded, Mutation, Store, StoreError};

/// Engine failures; the API maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pool refused (unknown VM, no free VF, …); nothing changed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A side effect failed; the attach was rolled back.
    #[error("attach of {function:?} to VM {vm:?} failed and was rolled back: {reason}")]
    AttachFailed {
        /// The VM.
        vm: String,
        /// The function.
        function: String,
        /// Every reason, one per VF tried.
        reason: String,
    },
    /// A detach side effect failed; the assignment stays `releasing` and can be retried.
    #[error("detach of VM {vm:?} local index {local_index} failed (retry the detach): {reason}")]
    DetachFailed {
        /// The VM.
        vm: String,
        /// The local index.
        local_index: u32,
        /// Why.
        reason: String,
    },
    /// An earlier commit failed; the daemon refuses changes until restarted.
    #[error("the daemon is degraded after a state database failure; restart it to recover")]
    Degraded,
}

/// Test hook: abort the process right after committing this state (`VFMAP_FAILPOINT=<state>`),
/// so tests can prove a `kill -9` at every step is recovered.
fn failpoint(state: &str) {
    if std::env::var("VFMAP_FAILPOINT").is_ok_and(|v| v == state) {
        eprintln!("vfmap: failpoint {state}: aborting");
        std::process::abort();
    }
}

struct State {
    pool: Pool,
    details: BTreeMap<GlobalIndex, Detail>,
    failures: VecDeque<Failure>,
    /// Releases the hypervisor did not confirm, retried in the background.
    cleanups: BTreeMap<GlobalIndex, Cleanup>,
    /// VFs a release is working on now (see `Engine::claim`).
    busy: std::collections::BTreeSet<GlobalIndex>,
    /// VMs whose orphan check is running.
    checking: std::collections::BTreeSet<String>,
}

impl State {
    fn apply(&mut self, mutation: &Mutation) {
        match mutation {
            Mutation::Pool(change) => {
                if let Change::Free { global_index, .. } = change {
                    self.details.remove(global_index);
                    self.cleanups.remove(global_index);
                }
                self.pool.apply(change);
            }
            Mutation::Detail(gi, detail) => {
                self.details.insert(*gi, detail.clone());
            }
            Mutation::Failure(f) => {
                self.failures.push_back(f.clone());
                while self.failures.len() > 200 {
                    self.failures.pop_front();
                }
            }
        }
    }
}

/// One row of a VM's correspondence table.
#[derive(Debug, Clone, Serialize)]
pub struct CorrespondenceRow {
    /// Local index (slot position).
    pub local_index: u32,
    /// The slot's id.
    pub slot: String,
    /// The function.
    pub function: String,
    /// Its description.
    pub description: String,
    /// The driver the guest must bind.
    pub guest_driver: Option<String>,
    /// The VF's global index.
    pub global_index: GlobalIndex,
    /// The VF's host location.
    pub host_vf: String,
    /// Assignment state.
    pub state: &'static str,
    /// Guest-side facts.
    #[serde(flatten)]
    pub detail: Detail,
    /// When the release is waiting for the hypervisor: the automatic retries of its cleanup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<Cleanup>,
}

/// A VM with its correspondence table.
#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    /// Registration.
    #[serde(flatten)]
    pub spec: VmSpec,
    /// Local index → function, with state.
    pub correspondence: Vec<CorrespondenceRow>,
    /// Recent failed attaches.
    pub failures: Vec<Failure>,
}

/// A VF with its allocation.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryVf {
    /// The VF.
    #[serde(flatten)]
    pub vf: PoolVf,
    /// Holder, if any.
    pub vm: Option<String>,
    /// Local index in the holder.
    pub local_index: Option<u32>,
    /// Assignment state, if assigned.
    pub state: Option<&'static str>,
}

/// A function with its counts.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryFunction {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Guest driver.
    pub guest_driver: String,
    /// Host driver.
    pub host_driver: String,
    /// VFs carrying it.
    pub total: usize,
    /// Of which free.
    pub free: usize,
}

/// A VF with its allocation, borrowed from the pool.
#[derive(Serialize)]
struct InventoryVfRef<'a> {
    #[serde(flatten)]
    vf: &'a PoolVf,
    vm: Option<&'a str>,
    local_index: Option<u32>,
    state: Option<&'static str>,
}

struct VfsRef<'a>(&'a State);

impl Serialize for VfsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.pool.vfs().map(|vf| Engine::inventory_vf(self.0, vf)))
    }
}

#[derive(Serialize)]
struct InventoryRef<'a> {
    functions: &'a [InventoryFunction],
    vfs: VfsRef<'a>,
}

/// The inventory with allocation state.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryView {
    /// Functions.
    pub functions: Vec<InventoryFunction>,
    /// VFs by global index.
    pub vfs: Vec<InventoryVf>,
}

/// What the engine needs from the outside world.
pub struct Adapters {
    /// Plugs and unplugs.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Talks to agents.
    pub channel: Arc<dyn GuestChannel>,
    /// Binds and resets VFs.
    pub host: Arc<dyn HostVfs>,
    /// How long an agent may take to answer.
    pub agent_deadline: Duration,
}

/// The engine.
pub struct Engine {
    state: Mutex<State>,
    store: Store,
    adapters: Adapters,
    functions: Vec<FunctionSummary>,
    degraded: AtomicBool,
}

/// The device id of a VF in the hypervisor: derived from its stable global index.
pub fn device_id(global_index: GlobalIndex) -> String {
    format!("vfmap-vf{global_index}")
}

impl Engine {
    /// Builds the engine from the inventory tables and what the store loaded; assignments the
    /// pool rejects on restore are deleted (logged).
    pub async fn new(
        tables: Tables,
        store: Store,
        loaded: Loaded,
        adapters: Adapters,
    ) -> Result<Engine, EngineError> {
        let index_of: BTreeMap<_, _> = loaded.indexes.iter().map(|(gi, bdf)| (*bdf, *gi)).collect();
        let vfs = tables.vfs.iter().filter_map(|v| {
            Some(PoolVf {
                global_index: *index_of.get(&v.location)?,
                location: v.location,
                pf: v.pf,
                function: v.function.clone(),
                host_driver: v.host_driver.clone(),
                guest_driver: v.guest_driver.clone(),
                numa_node: v.numa_node,
                vendor: v.vendor,
                device: v.device,
            })
        });
        let mut pool = Pool::new(vfs);
        let (assignments, details): (Vec<_>, Vec<_>) = loaded.assignments.into_iter().unzip();
        let detail_map = assignments
            .iter()
            .map(|a| a.global_index)
            .zip(details)
            .collect();
        let rejected = pool.restore(loaded.vms, assignments);
        let engine = Engine {
            state: Mutex::new(State {
                pool,
                details: detail_map,
                failures: loaded.failures.into(),
                cleanups: BTreeMap::new(),
                busy: Default::default(),
                checking: Default::default(),
            }),
            store,
            adapters,
            // The rest of the tables is in the pool now; keep only what the pool lacks.
            functions: tables.functions,
            degraded: AtomicBool::new(false),
        };
        for (a, why) in rejected {
            warn!(vf = a.global_index, vm = %a.vm, why = %why, "dropping a stored assignment");
            engine
                .store
                .write(vec![Mutation::Pool(Change::Free {
                    global_index: a.global_index,
                    vm: a.vm.clone(),
                    local_index: a.local_index,
                })])
                .await?;
        }
        Ok(engine)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a commit has failed.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Plans under the lock, applies in memory, queues to the store; then waits for the commit.
    async fn commit(
        &self,
        plan: impl FnOnce(&State) -> Result<Vec<Mutation>, PoolError>,
    ) -> Result<Vec<Mutation>, EngineError> {
        if self.is_degraded() {
            return Err(EngineError::Degraded);
        }
        let (mutations, receiver) = {
            let mut state = self.lock();
            let mutations = plan(&state)?;
            for m in &mutations {
                state.apply(m);
            }
            let receiver = self.store.submit(mutations.clone());
            (mutations, receiver)
        };
        match receiver.await {
            Ok(Ok(())) => Ok(mutations),
            outcome => {
                self.degraded.store(true, Ordering::Relaxed);
                let error = match outcome {
                    Ok(Err(e)) => e,
                    _ => StoreError::WriterGone,
                };
                tracing::error!(error = %error, "state commit failed; refusing further changes");
                Err(error.into())
            }
        }
    }

    async fn set_state(
        &self,
        a: &Assignment,
        state: AssignState,
        detail: Option<Detail>,
    ) -> Result<(), EngineError> {
        self.set_states(a, &[state], detail).await
    }

    /// Moves an assignment through consecutive states in one commit. Only for steps with no
    /// side effect between them: the last state is durable before the next side effect.
    async fn set_states(
        &self,
        a: &Assignment,
        states: &[AssignState],
        detail: Option<Detail>,
    ) -> Result<(), EngineError> {
        self.commit(|s| {
            let mut m: Vec<Mutation> = s
                .pool
                .plan_advance(a.global_index, states)?
                .into_iter()
                .map(Mutation::Pool)
                .collect();
            m.extend(detail.map(|d| Mutation::Detail(a.global_index, d)));
            Ok(m)
        })
        .await?;
        for state in states {
            info!(vm = %a.vm, local_index = a.local_index, vf = %a.location, state = state.as_str(), "assignment state");
            failpoint(state.as_str());
        }
        Ok(())
    }

    fn vm_spec(&self, vm: &str) -> Result<VmSpec, PoolError> {
        self.lock()
            .pool
            .vm(vm)
            .cloned()
            .ok_or_else(|| PoolError::UnknownVm(vm.to_owned()))
    }

    /// The VM's correspondence as the agent receives it: entries that are plugged.
    fn entries(&self, vm: &VmSpec) -> Vec<Entry> {
        let state = self.lock();
        state
            .pool
            .assignments_of(&vm.name)
            .filter(|a| {
                matches!(
                    a.state,
                    AssignState::Plugged | AssignState::Sent | AssignState::Ready
                )
            })
            .filter_map(|a| {
                let vf = state.pool.vf(a.global_index)?;
                let path: GuestPath = state
                    .details
                    .get(&a.global_index)?
                    .guest_path
                    .as_deref()?
                    .parse()
                    .ok()?;
                Some(Entry {
                    local_index: a.local_index,
                    function: a.function.clone(),
                    guest_driver: vf.guest_driver.clone()?,
                    path,
                    vendor: vf.vendor,
                    device: vf.device,
                })
            })
            .collect()
    }

    /// Registers a VM.
    pub async fn add_vm(&self, spec: VmSpec) -> Result<VmView, EngineError> {
        let name = spec.name.to_string();
        self.commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_add_vm(spec)?)]))
            .await?;
        info!(vm = %name, "VM registered");
        if let Ok(spec) = self.vm_spec(&name) {
            self.adapters.channel.watch(&spec);
        }
        self.vm_view(&name)
    }

    /// Releases everything a VM holds, then forgets it.
    pub async fn remove_vm(&self, name: &str) -> Result<usize, EngineError> {
        let spec = self.vm_spec(name)?;
        let held: Vec<Assignment> = self
            .lock()
            .pool
            .assignments_of(&spec.name)
            .cloned()
            .collect();
        if let Some(busy) = held.iter().find(|a| a.state.is_attaching()) {
            return Err(PoolError::Busy {
                vm: name.to_owned(),
                local_index: busy.local_index,
                state: busy.state.as_str(),
            }
            .into());
        }
        for a in &held {
            self.detach(name, a.local_index).await?;
        }
        self.commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_remove_vm(name)?)]))
            .await?;
        self.adapters.channel.forget(name);
        info!(vm = %name, released = held.len(), "VM removed");
        Ok(held.len())
    }

    /// Serves a request: reserves VFs and local indexes, then plugs each and has the agent bind
    /// its driver. All or nothing: if one VF fails, the others of the request are released.
    pub async fn attach(&self, request: Request) -> Result<Vec<CorrespondenceRow>, EngineError> {
        let spec = self.vm_spec(request.vm.as_str())?;
        let mutations = self
            .commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_reserve(&request)?)]))
            .await?;
        let reserved: Vec<Assignment> = match mutations.first() {
            Some(Mutation::Pool(Change::Reserve(a))) => a.clone(),
            _ => Vec::new(),
        };
        for a in &reserved {
            info!(vm = %a.vm, local_index = a.local_index, vf = %a.location, function = %a.function, "assignment reserved");
        }
        failpoint("reserved");
        let mut done = Vec::new();
        let mut reasons = Vec::new();
        for a in &reserved {
            if !reasons.is_empty() {
                // All or nothing: once one VF failed, the untried ones are just freed.
                let _ = self
                    .roll_back(&spec, a, false, "another VF of the request failed".into())
                    .await;
                continue;
            }
            match self.attach_one(&spec, a).await {
                Ok(()) => done.push(a.clone()),
                Err(reason) => {
                    reasons.push(format!("{} (VF {}): {reason}", a.local_index, a.location))
                }
            }
        }
        if !reasons.is_empty() {
            for a in &done {
                if let Err(e) = self.detach(spec.name.as_str(), a.local_index).await {
                    warn!(error = %e, "releasing a sibling of a failed attach");
                }
            }
            return Err(EngineError::AttachFailed {
                vm: spec.name.to_string(),
                function: request.function,
                reason: reasons.join("; "),
            });
        }
        let view = self.vm_view(spec.name.as_str())?;
        Ok(view
            .correspondence
            .into_iter()
            .filter(|row| reserved.iter().any(|a| a.local_index == row.local_index))
            .collect())
    }

    /// Host bind → plug → send → ready, rolling back on any failure. Returns the reason.
    async fn attach_one(&self, vm: &VmSpec, a: &Assignment) -> Result<(), String> {
        let (host_driver, guest_driver) = {
            let state = self.lock();
            let vf = state.pool.vf(a.global_index);
            (
                vf.and_then(|v| v.host_driver.clone()),
                vf.and_then(|v| v.guest_driver.clone()),
            )
        };
        let (Some(host_driver), Some(guest_driver)) = (host_driver, guest_driver) else {
            return self
                .fail(vm, a, false, "the VF's function has no drivers".into())
                .await;
        };
        let host = self.adapters.host.clone();
        let location = a.location;
        let bound = tokio::task::spawn_blocking(move || host.bind(location, &host_driver))
            .await
            .unwrap_or_else(|e| Err(format!("host bind panicked: {e}")));
        if let Err(reason) = bound {
            return self.fail(vm, a, false, reason).await;
        }
        if let Err(e) = self.set_state(a, AssignState::HostBound, None).await {
            return self.fail(vm, a, false, e.to_string()).await;
        }
        let Some(slot) = vm.slots.get(a.local_index as usize) else {
            return self
                .fail(vm, a, false, "local index past the VM's slots".into())
                .await;
        };
        let id = device_id(a.global_index);
        let path = match self
            .adapters
            .hypervisor
            .attach(vm, slot, &id, a.location)
            .await
        {
            Ok(path) => path,
            // A failed device_add may still have left the device half-added: unplug to be sure.
            Err(e) => return self.fail(vm, a, true, e.to_string()).await,
        };
        let detail = Detail {
            guest_path: Some(path.to_string()),
            ..Detail::default()
        };
        // Plugged and sent in one commit: nothing happens between them, and "sent" is
        // durable before the agent hears anything.
        if let Err(e) = self
            .set_states(
                a,
                &[AssignState::Plugged, AssignState::Sent],
                Some(detail.clone()),
            )
            .await
        {
            return self.fail(vm, a, true, e.to_string()).await;
        }
        let answers = match self
            .adapters
            .channel
            .apply(vm, self.entries(vm), self.adapters.agent_deadline)
            .await
        {
            Ok(answers) => answers,
            Err(e) => return self.fail(vm, a, true, e.to_string()).await,
        };
        match answers
            .into_iter()
            .find(|x| x.local_index() == a.local_index)
        {
            Some(Answer::Bound {
                driver, guest_bdf, ..
            }) if driver == guest_driver => {
                let detail = Detail {
                    guest_bdf: Some(guest_bdf.to_string()),
                    guest_driver: Some(driver.to_string()),
                    ..detail
                };
                if let Err(e) = self.set_state(a, AssignState::Ready, Some(detail)).await {
                    return self.fail(vm, a, true, e.to_string()).await;
                }
                Ok(())
            }
            Some(Answer::Bound { driver, .. }) => {
                let reason = format!("the agent bound {driver}, not {guest_driver}");
                self.fail(vm, a, true, reason).await
            }
            Some(Answer::Failed { reason, .. }) => {
                let reason = format!(
                    "the guest agent could not bind {guest_driver}: {}",
                    reason.escape_debug()
                );
                self.fail(vm, a, true, reason).await
            }
            None => {
                let reason = format!(
                    "the guest agent did not answer for local index {}",
                    a.local_index
                );
                self.fail(vm, a, true, reason).await
            }
        }
    }

    /// Undoes an attach: unplug (when it may be plugged), reset, free. `Ok(reason)` when undone;
    /// `Err(reason)` when the unplug failed: the VF is then *not* freed (it may still be in the
    /// VM) and recovery at the next start retries.
    async fn roll_back(
        &self,
        vm: &VmSpec,
        a: &Assignment,
        maybe_plugged: bool,
        reason: String,
    ) -> Result<String, String> {
        warn!(vm = %vm.name, local_index = a.local_index, vf = %a.location, reason = %reason, "attach failed; rolling back");
        if maybe_plugged && let Err(e) = self.unplug(vm, a).await {
            // The VF may still be in the VM: it must not go back to the pool, but it must not
            // stay pinned either. It becomes a release whose cleanup is retried.
            self.abandon(vm, a, &e.to_string()).await;
            return Err(format!(
                "{reason}; the rollback could not unplug the VF ({e}); vfmap retries the cleanup automatically (see `vfmap status {}`)",
                vm.name
            ));
        }
        self.reset(a.location).await;
        let failure = Failure {
            vm: vm.name.to_string(),
            local_index: a.local_index,
            function: a.function.to_string(),
            global_index: a.global_index,
            reason: reason.clone(),
            at: crate::store::now(),
        };
        let freed = self
            .commit(|s| {
                Ok(vec![
                    Mutation::Pool(s.pool.plan_free(a.global_index)?),
                    Mutation::Failure(failure),
                ])
            })
            .await;
        if let Err(e) = freed {
            return Err(format!("{reason}; then freeing the VF failed: {e}"));
        }
        info!(vm = %vm.name, local_index = a.local_index, vf = %a.location, "rolled back; VF free");
        Ok(reason)
    }

    /// Unplugs a VF. A VM that is certainly not running holds nothing: that counts as done.
    async fn unplug(&self, vm: &VmSpec, a: &Assignment) -> Result<(), HypervisorError> {
        match self
            .adapters
            .hypervisor
            .detach(vm, &device_id(a.global_index))
            .await
        {
            Ok(()) | Err(HypervisorError::NotRunning { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Rolls back and returns the reason the attach failed, whether or not the rollback completed.
    async fn fail(
        &self,
        vm: &VmSpec,
        a: &Assignment,
        maybe_plugged: bool,
        reason: String,
    ) -> Result<(), String> {
        Err(self
            .roll_back(vm, a, maybe_plugged, reason)
            .await
            .unwrap_or_else(|incomplete| incomplete))
    }

    async fn reset(&self, vf: vfmap_core::Bdf) {
        let host = self.adapters.host.clone();
        let result = tokio::task::spawn_blocking(move || host.reset(vf)).await;
        match result {
            Ok(Ok(true)) => info!(vf = %vf, "VF reset"),
            Ok(Ok(false)) => info!(vf = %vf, "VF has no reset method"),
            Ok(Err(e)) => warn!(vf = %vf, error = %e, "VF reset failed"),
            Err(e) => warn!(vf = %vf, error = %e, "VF reset panicked"),
        }
    }

    /// Releases a VM's local index: the agent unbinds, the hypervisor unplugs, the VF is reset
    /// and rebound to its host driver, then freed. A release that failed half-way is retried.
    pub async fn detach(&self, vm: &str, local_index: u32) -> Result<(), EngineError> {
        let spec = self.vm_spec(vm)?;
        let current = self
            .lock()
            .pool
            .at_local_index(&spec.name, local_index)
            .cloned()
            .ok_or_else(|| PoolError::NoSuchLocalIndex {
                vm: vm.to_owned(),
                local_index,
            })?;
        // One release at a time per VF: the background cleanup retries hold the same claim.
        let Some(_claim) = self.claim(current.global_index) else {
            return Err(PoolError::Busy {
                vm: vm.to_owned(),
                local_index,
                state: "being cleaned up",
            }
            .into());
        };
        if current.state != AssignState::Releasing {
            self.commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_release(vm, local_index)?)]))
                .await?;
            info!(vm = %vm, local_index, vf = %current.location, state = "releasing", "assignment state");
            failpoint("releasing");
        }
        self.finish_release(&spec, &current, true, true)
            .await
            .map_err(|reason| EngineError::DetachFailed {
                vm: vm.to_owned(),
                local_index,
                reason,
            })
    }

    /// Agent unbinds (best effort), unplug (when `unplug`), reset, rebind the host driver, free.
    async fn finish_release(
        &self,
        vm: &VmSpec,
        a: &Assignment,
        tell_agent: bool,
        unplug: bool,
    ) -> Result<(), String> {
        if tell_agent {
            // The agent unbinds the driver before the device goes; an absent agent must not
            // block the release, so this is best effort.
            let remaining: Vec<Entry> = self
                .entries(vm)
                .into_iter()
                .filter(|e| e.local_index != a.local_index)
                .collect();
            if let Err(e) = self
                .adapters
                .channel
                .apply(vm, remaining, self.adapters.agent_deadline)
                .await
            {
                warn!(vm = %vm.name, error = %e, "could not tell the agent before unplugging");
            }
        }
        if unplug && let Err(e) = self.unplug(vm, a).await {
            let e = e.to_string();
            self.cleanup_failed(a.global_index, &e);
            return Err(e);
        }
        failpoint("unplugged");
        self.reset(a.location).await;
        let host_driver = self
            .lock()
            .pool
            .vf(a.global_index)
            .and_then(|v| v.host_driver.clone());
        if let Some(driver) = host_driver {
            let host = self.adapters.host.clone();
            let location = a.location;
            let rebound = tokio::task::spawn_blocking(move || host.bind(location, &driver)).await;
            if let Ok(Err(e)) | Err(e) = rebound.map_err(|e| e.to_string()) {
                warn!(vf = %a.location, error = %e, "rebinding the host driver after release failed");
            }
        }
        self.commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_free(a.global_index)?)]))
            .await
            .map_err(|e| e.to_string())?;
        info!(vm = %vm.name, local_index = a.local_index, vf = %a.location, "released; VF free");
        Ok(())
    }

    /// Re-sends a VM's whole correspondence (its agent reconnected, e.g. after a guest reboot)
    /// and logs entries the agent could not bind.
    pub async fn resync(&self, vm: &str) {
        let Ok(spec) = self.vm_spec(vm) else { return };
        let entries = self.entries(&spec);
        match self
            .adapters
            .channel
            .apply(&spec, entries, self.adapters.agent_deadline)
            .await
        {
            Ok(answers) => {
                // One line per re-send, whatever the guest answers: its text is bounded, and
                // re-sends are coalesced, so a lying agent cannot flood the log.
                let failed: Vec<(u32, String)> = answers
                    .into_iter()
                    .filter_map(|a| match a {
                        Answer::Failed {
                            local_index,
                            reason,
                        } => Some((local_index, reason)),
                        Answer::Bound { .. } => None,
                    })
                    .collect();
                match failed.first() {
                    Some((local_index, reason)) => {
                        warn!(vm = %vm, failed = failed.len(), local_index, reason = %reason.escape_debug(), "correspondence re-sent; the agent could not bind some entries")
                    }
                    None => info!(vm = %vm, "correspondence re-sent"),
                }
            }
            Err(e) => warn!(vm = %vm, error = %e, "re-sending the correspondence failed"),
        }
    }

    /// Completes or rolls back everything in flight after a restart, frees VFs whose VM lost
    /// them, and unplugs devices with vfmap's ids that the database does not hold. Runs before
    /// the API opens, so no VF is handed out before its state is known.
    pub async fn recover(&self) -> Result<(), EngineError> {
        let (vms, held): (Vec<VmSpec>, Vec<Assignment>) = {
            let s = self.lock();
            (
                s.pool.vms().cloned().collect(),
                s.pool.assignments().cloned().collect(),
            )
        };
        for vm in vms {
            self.adapters.channel.watch(&vm);
            let mine: Vec<&Assignment> = held.iter().filter(|a| a.vm == vm.name).collect();
            let plugged = match self.adapters.hypervisor.plugged(&vm).await {
                Ok(ids) => ids,
                // Only a VM that is certainly not running has nothing plugged; anything less
                // certain (a timeout, a permission error) must not free a VF that may be in use.
                Err(HypervisorError::NotRunning { .. }) => Vec::new(),
                Err(e) => {
                    warn!(vm = %vm.name, error = %e, "cannot ask the hypervisor; unfinished attaches become releases retried in the background");
                    self.defer_cleanups(&vm, &mine, &e.to_string()).await;
                    continue;
                }
            };
            self.remove_orphans(&vm, &plugged).await;
            for a in mine {
                let is_plugged = plugged.contains(&device_id(a.global_index));
                let decision = plan_recovery(a.state, is_plugged);
                info!(vm = %vm.name, local_index = a.local_index, vf = %a.location, state = a.state.as_str(), plugged = is_plugged, decision = ?decision, "recovery");
                let outcome = match decision {
                    Recovery::Keep => Ok(()),
                    Recovery::RollBack => self
                        .roll_back(
                            &vm,
                            a,
                            is_plugged,
                            "the daemon restarted during the attach".into(),
                        )
                        .await
                        .map(drop),
                    Recovery::FinishRelease => self.finish_release(&vm, a, false, is_plugged).await,
                    Recovery::Lost => self
                        .roll_back(
                            &vm,
                            a,
                            false,
                            "the VM no longer has the device (restarted?)".into(),
                        )
                        .await
                        .map(drop),
                };
                if let Err(reason) = outcome {
                    warn!(vm = %vm.name, vf = %a.location, reason = %reason, "recovery incomplete");
                }
            }
        }
        Ok(())
    }

    /// A VM with its correspondence table.
    pub fn vm_view(&self, name: &str) -> Result<VmView, EngineError> {
        let state = self.lock();
        let spec = state
            .pool
            .vm(name)
            .cloned()
            .ok_or_else(|| PoolError::UnknownVm(name.to_owned()))?;
        let correspondence = state
            .pool
            .assignments_of(&spec.name)
            .map(|a| {
                let vf = state.pool.vf(a.global_index);
                let description = self
                    .functions
                    .iter()
                    .find(|f| f.name == a.function)
                    .map(|f| f.description.clone())
                    .unwrap_or_default();
                CorrespondenceRow {
                    local_index: a.local_index,
                    slot: spec
                        .slots
                        .get(a.local_index as usize)
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    function: a.function.to_string(),
                    description,
                    guest_driver: vf
                        .and_then(|v| v.guest_driver.as_ref())
                        .map(ToString::to_string),
                    global_index: a.global_index,
                    host_vf: a.location.to_string(),
                    state: a.state.as_str(),
                    detail: state
                        .details
                        .get(&a.global_index)
                        .cloned()
                        .unwrap_or_default(),
                    cleanup: state.cleanups.get(&a.global_index).cloned(),
                }
            })
            .collect();
        let failures = state
            .failures
            .iter()
            .filter(|f| f.vm == name)
            .rev()
            .take(20)
            .cloned()
            .collect();
        Ok(VmView {
            spec,
            correspondence,
            failures,
        })
    }

    /// Every VM's view.
    pub fn vm_views(&self) -> Vec<VmView> {
        let names: Vec<String> = self.lock().pool.vms().map(|v| v.name.to_string()).collect();
        names.iter().filter_map(|n| self.vm_view(n).ok()).collect()
    }

    fn function_counts(&self, state: &State) -> Vec<InventoryFunction> {
        self.functions
            .iter()
            .map(|f| InventoryFunction {
                name: f.name.to_string(),
                description: f.description.clone(),
                guest_driver: f.guest_driver.to_string(),
                host_driver: f.host_driver.to_string(),
                total: state
                    .pool
                    .vfs()
                    .filter(|v| v.function.as_ref() == Some(&f.name))
                    .count(),
                free: state.pool.free_count(f.name.as_str()),
            })
            .collect()
    }

    fn inventory_vf<'a>(state: &'a State, vf: &'a PoolVf) -> InventoryVfRef<'a> {
        let a = state.pool.assignment(vf.global_index);
        InventoryVfRef {
            vf,
            vm: a.map(|a| a.vm.as_str()),
            local_index: a.map(|a| a.local_index),
            state: a.map(|a| a.state.as_str()),
        }
    }

    /// The inventory with allocation state (owned; for tests and small pools).
    pub fn inventory(&self) -> InventoryView {
        let state = self.lock();
        InventoryView {
            functions: self.function_counts(&state),
            vfs: state
                .pool
                .vfs()
                .map(|vf| {
                    let r = Self::inventory_vf(&state, vf);
                    InventoryVf {
                        vf: vf.clone(),
                        vm: r.vm.map(str::to_owned),
                        local_index: r.local_index,
                        state: r.state,
                    }
                })
                .collect(),
        }
    }

    /// The inventory as JSON, serialised straight from the pool: no copy of 65,536 VFs.
    pub fn inventory_json(&self) -> Vec<u8> {
        let state = self.lock();
        let functions = self.function_counts(&state);
        let vfs = VfsRef(&state);
        serde_json::to_vec(&InventoryRef {
            functions: &functions,
            vfs,
        })
        .unwrap_or_default()
    }

    /// Checks the pool's invariants (health endpoint, tests).
    pub fn check(&self) -> Result<(), String> {
        self.lock().pool.check_invariants()
    }
}
