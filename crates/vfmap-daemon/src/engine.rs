//! The engine: drives attach, detach, VM registration and crash recovery through the pure pool,
//! the store and the side-effect adapters.
//!
//! Discipline: every change is planned and applied in memory under one lock and queued to the
//! store in the same order, then awaited *before* the side effect that depends on it. If a
//! commit ever fails, memory may be ahead of disk: the engine then marks itself degraded and
//! refuses further changes until restarted (recovery reconciles from the database).
//!
//! One module per step: attach (`attach.rs`), release and VM registration
//! (`release.rs`), recovery and re-sends (`recovery.rs`), background cleanups and orphans
//! (`cleanup.rs`), read views (`views.rs`). This file holds the state, the commit discipline
//! and the helpers they share; the state-machine rules themselves live in `vfmap_core::pool`.
//!
//! The engine times attaches and releases and counts recovery's decisions in its
//! [`Metrics`]; the VF gauges are counted from its state at each scrape ([`Engine::vf_counts`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};
use vfmap_core::protocol::{Answer, Entry};
use vfmap_core::tables::FunctionSummary;
use vfmap_core::{
    AssignState, Assignment, Bdf, Change, DriverName, GlobalIndex, LocalIndex, Pool, PoolError,
    PoolVf, Recovery, Request, Tables, VmSpec, plan_recovery,
};

use crate::effects::{
    ChannelError, GuestChannel, HostError, HostVfs, Hypervisor, HypervisorError, ProgramError,
    ScrubError, chain,
};
use crate::metrics::{Metrics, Outcome, Recovered, VfCounts};
use cleanup::Cleanup;
pub use kubelet::{FunctionVf, VfHolder};

mod attach;
mod cleanup;
mod kubelet;
mod program;
mod quarantine;
mod recovery;
mod release;
mod views;
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
    /// The profile does not let this VF's function become the one asked for.
    #[error(
        "VF {vf} carries {from}, and its card's profile does not let it be re-programmed into {to} (see `programmable_to` in docs/hooks.md)"
    )]
    NotProgrammable {
        /// The VF.
        vf: Bdf,
        /// Its function.
        from: String,
        /// The function asked for.
        to: String,
    },
    /// The card's `program` hook failed: the VF is quarantined.
    #[error("re-programming VF {vf} failed, it is quarantined: {reason}")]
    ProgramFailed {
        /// The VF.
        vf: Bdf,
        /// Why.
        reason: String,
    },
    /// A quarantined VF's scrub failed again: it stays quarantined.
    #[error(
        "VF {vf} is still not clean, it stays quarantined: {reason} (`force` clears it anyway)"
    )]
    StillDirty {
        /// The VF.
        vf: Bdf,
        /// What the scrub found.
        reason: String,
    },
    /// A step failed; the attach was rolled back.
    #[error(
        "attach of {function:?} to VM {vm:?} failed and was rolled back: {}",
        describe(failures)
    )]
    AttachFailed {
        /// The VM.
        vm: String,
        /// The function.
        function: String,
        /// The VF that failed (the rest of the request was released).
        failures: Vec<VfFailure>,
    },
    /// A detach step failed; the assignment stays `releasing` and can be retried.
    #[error("detach of VM {vm:?} local index {local_index} failed (retry the detach)")]
    DetachFailed {
        /// The VM.
        vm: String,
        /// The local index.
        local_index: LocalIndex,
        /// Why.
        #[source]
        error: ReleaseError,
    },
    /// The VM could not be registered (its hypervisor could not be asked, or the VM lacks
    /// something); nothing was registered.
    #[error("cannot register VM {vm:?}: {error}")]
    Register {
        /// The VM.
        vm: String,
        /// Why (in the message: the API shows only the message).
        error: HypervisorError,
    },
    /// An earlier commit failed; the daemon refuses changes until restarted.
    #[error("the daemon is degraded after a state database failure; restart it to recover")]
    Degraded,
}

/// What the guest agent answered instead of "bound, with the function's driver".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// Another driver is bound.
    #[error("the agent bound {bound}, not {wanted}")]
    WrongDriver {
        /// What the agent bound.
        bound: DriverName,
        /// The function's driver.
        wanted: DriverName,
    },
    /// The agent could not bind it.
    #[error("the guest agent could not bind {driver}: {reason}")]
    Failed {
        /// The function's driver.
        driver: DriverName,
        /// The agent's reason, escaped.
        reason: String,
    },
    /// No answer for this entry.
    #[error("the guest agent did not answer for local index {local_index}")]
    NoAnswer {
        /// The entry.
        local_index: LocalIndex,
    },
}

/// Why one VF of an attach failed, by step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The VF's function names no drivers (profiles validate this; a bug if seen).
    #[error("the VF's function has no drivers")]
    NoDrivers,
    /// The local index is past the VM's slots (a bug if seen).
    #[error("local index past the VM's slots")]
    NoSlot,
    /// Binding the host driver failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The hypervisor failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The guest channel failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The agent answered, but not with success.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Recording the step failed.
    #[error("recording the step failed")]
    State(#[source] Box<EngineError>),
    /// Another VF of the request failed; this one was rolled back with it.
    #[error("another VF of the request failed")]
    Sibling,
    /// The daemon restarted in the middle (recovery).
    #[error("the daemon restarted during the attach")]
    Restarted,
    /// The VM lost the device (recovery).
    #[error("the VM no longer has the device (restarted?)")]
    Lost,
}

impl StepError {
    fn state(e: EngineError) -> StepError {
        StepError::State(Box::new(e))
    }
}

/// One VF's failed attach.
#[derive(Debug)]
pub struct VfFailure {
    /// Its local index.
    pub local_index: LocalIndex,
    /// The VF.
    pub vf: Bdf,
    /// The step that failed.
    pub error: StepError,
    /// Set when the rollback could not finish: the VF is then `releasing`, not free.
    pub cleanup: Option<String>,
}

fn describe(failures: &[VfFailure]) -> String {
    let each: Vec<String> = failures
        .iter()
        .map(|f| {
            let mut text = format!("{} (VF {}): {}", f.local_index, f.vf, chain(&f.error));
            if let Some(cleanup) = &f.cleanup {
                text.push_str("; ");
                text.push_str(cleanup);
            }
            text
        })
        .collect();
    each.join("; ")
}

/// Why a release did not finish; the assignment stays `releasing`.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The hypervisor did not confirm the unplug.
    #[error("the unplug failed")]
    Unplug(#[source] HypervisorError),
    /// Freeing the VF in the state failed.
    #[error("freeing the VF failed")]
    Free(#[source] Box<EngineError>),
}

/// Test hook: abort the process right after committing this state (`VFMAP_FAILPOINT=<state>`),
/// so tests can prove a `kill -9` at every step is recovered.
fn failpoint(state: &str) {
    if std::env::var("VFMAP_FAILPOINT").is_ok_and(|v| v == state) {
        eprintln!("vfmap: failpoint {state}: aborting");
        std::process::abort();
    }
}

/// [`failpoint`] for a step repeated per VF of a request: `VFMAP_FAILPOINT=<step>` aborts
/// after its first time, `<step>:<n>` after its `n`-th.
fn failpoint_nth(step: &str, n: usize) {
    let hit = std::env::var("VFMAP_FAILPOINT").is_ok_and(|v| match v.split_once(':') {
        Some((name, k)) => name == step && k.parse() == Ok(n),
        None => v == step && n == 1,
    });
    if hit {
        eprintln!("vfmap: failpoint {step}:{n}: aborting");
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
    metrics: Arc<Metrics>,
    /// Bumped after every change is applied in memory: who holds what may have changed.
    changes: tokio::sync::watch::Sender<u64>,
    /// Per VM, whose correspondence is on its way to the agent (see
    /// [`Engine::send_correspondence`]).
    sending: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The device id of a VF in the hypervisor: derived from its stable global index.
pub fn device_id(global_index: GlobalIndex) -> String {
    format!("vfmap-vf{global_index}")
}

impl Engine {
    /// Builds the engine from the inventory tables and what the store loaded; assignments the
    /// pool rejects on restore are deleted (logged). Its metrics are a registry of its own:
    /// see [`Engine::with_metrics`].
    pub async fn new(
        tables: Tables,
        store: Store,
        loaded: Loaded,
        adapters: Adapters,
    ) -> Result<Engine, EngineError> {
        Engine::with_metrics(tables, store, loaded, adapters, Arc::default()).await
    }

    /// [`Engine::new`], updating `metrics` (shared with the store and the channel).
    pub async fn with_metrics(
        tables: Tables,
        store: Store,
        loaded: Loaded,
        adapters: Adapters,
        metrics: Arc<Metrics>,
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
        // Functions changed at run time, before the holders (whose functions they are).
        let functions = &tables.functions;
        let stored: Vec<_> = loaded
            .functions
            .into_iter()
            .filter_map(|(gi, location, function)| {
                let here = pool.vf(gi).is_some_and(|v| v.location == location);
                match program::drivers_of(functions, &function) {
                    Some(drivers) if here => Some((gi, function, drivers)),
                    _ => {
                        warn!(vf = %location, function = %function, "ignoring a stored re-programmed function (the VF or the function is gone); the profile's applies");
                        None
                    }
                }
            })
            .collect();
        pool.restore_functions(stored);
        let (assignments, details): (Vec<_>, Vec<_>) = loaded.assignments.into_iter().unzip();
        let detail_map = assignments
            .iter()
            .map(|a| a.global_index)
            .zip(details)
            .collect();
        let rejected = pool.restore(loaded.vms, assignments);
        let rejected_holds = pool.restore_kubelet(loaded.kubelet);
        let rejected_quarantines = pool.restore_quarantine(loaded.quarantine);
        let rejected_programming = pool.restore_programming(loaded.programming);
        for backend in adapters.hypervisor.backends() {
            metrics.add_backend(backend);
        }
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
            metrics,
            changes: tokio::sync::watch::Sender::new(0),
            sending: Mutex::default(),
        };
        for (a, why) in rejected {
            warn!(vf = %a.global_index, vm = %a.vm, why = %why, "dropping a stored assignment");
            engine
                .store
                .write(vec![Mutation::Pool(Change::Free {
                    global_index: a.global_index,
                    vm: a.vm.clone(),
                    local_index: a.local_index,
                })])
                .await?;
        }
        for (h, why) in rejected_holds {
            warn!(vf = %h.location, why = %why, "dropping a stored kubelet hold");
            engine
                .store
                .write(vec![Mutation::Pool(Change::KubeletFree {
                    global_index: h.global_index,
                })])
                .await?;
        }
        for (p, why) in rejected_programming {
            warn!(vf = %p.location, why = %why, "dropping a stored re-programming");
            engine
                .store
                .write(vec![Mutation::Pool(Change::ProgramAbandoned {
                    global_index: p.global_index,
                })])
                .await?;
        }
        for (q, why) in rejected_quarantines {
            warn!(vf = %q.location, why = %why, "dropping a stored quarantine");
            engine
                .store
                .write(vec![Mutation::Pool(Change::ClearQuarantine {
                    global_index: q.global_index,
                })])
                .await?;
        }
        Ok(engine)
    }

    /// A counter bumped after each change of the engine's state (holders, states): a cue to
    /// read the views again.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a commit has failed.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// The metrics the engine updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The metrics exposition (Prometheus text format), the VF gauges counted now.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode(&self.vf_counts())
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
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
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

    /// The `backend` label of a VM's operations (`qmp` for an unknown VM).
    fn backend_of(&self, vm: &str) -> &'static str {
        self.lock()
            .pool
            .vm(vm)
            .map_or("qmp", |spec| spec.backend.kind())
    }

    fn vm_spec(&self, vm: &str) -> Result<VmSpec, PoolError> {
        self.lock()
            .pool
            .vm(vm)
            .cloned()
            .ok_or_else(|| PoolError::UnknownVm(vm.to_owned()))
    }

    /// Sends the VM's correspondence as it is now (less `without`, VFs being let go) and
    /// waits for the agent's answers. One at a time per VM, each read when its turn comes: the
    /// agent makes the guest match the last correspondence it got, so an older, smaller one
    /// overtaking a newer one would release the newer entries (concurrent attaches to one VM).
    /// Other VMs never wait for this.
    async fn send_correspondence(
        &self,
        vm: &VmSpec,
        without: &[LocalIndex],
    ) -> Result<Vec<Answer>, ChannelError> {
        let turn = {
            let mut sending = self.sending.lock().unwrap_or_else(|p| p.into_inner());
            sending.entry(vm.name.to_string()).or_default().clone()
        };
        let _turn = turn.lock().await;
        let entries = self
            .entries(vm)
            .into_iter()
            .filter(|e| !without.contains(&e.local_index))
            .collect();
        self.adapters
            .channel
            .apply(vm, entries, self.adapters.agent_deadline)
            .await
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
                let Some(path) = state.details.get(&a.global_index).and_then(|d| d.guest_path)
                else {
                    // Plugged without a known guest path: only a damaged database does this,
                    // and the VM view shows it (`stored_value_error`).
                    warn!(vm = %vm.name, local_index = %a.local_index, "not sent to the agent: its guest path is unknown");
                    return None;
                };
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
}

/// How an attach or release that returned `result` ended, for its duration's `outcome` label.
fn outcome<T>(result: &Result<T, EngineError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(EngineError::Pool(_)) => Outcome::Refused,
        Err(_) => Outcome::Failed,
    }
}
