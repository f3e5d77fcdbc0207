//! After a restart: finish or roll back what was in flight; re-send correspondences.

use super::*;

/// How many VFs of one VM that is not running recovery frees at once.
const LOST_AT_ONCE: usize = 16;

impl Engine {
    /// Re-sends a VM's whole correspondence (its agent reconnected, e.g. after a guest reboot)
    /// and logs entries the agent could not bind.
    pub async fn resync(&self, vm: &str) {
        let Ok(spec) = self.vm_spec(vm) else { return };
        match self.send_correspondence(&spec, &[]).await {
            Ok(answers) => {
                // One line per re-send, whatever the guest answers: its text is bounded, and
                // re-sends are coalesced, so a lying agent cannot flood the log.
                let failed: Vec<(LocalIndex, String)> = answers
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
                        warn!(vm = %vm, failed = failed.len(), local_index = %local_index, reason = %reason.escape_debug(), "correspondence re-sent; the agent could not bind some entries")
                    }
                    None => info!(vm = %vm, "correspondence re-sent"),
                }
            }
            Err(e) => warn!(vm = %vm, error = %e, "re-sending the correspondence failed"),
        }
    }

    /// Completes or rolls back everything in flight after a restart, frees VFs whose VM lost
    /// them, and unplugs devices with vfmap's ids that the database does not hold. Runs before
    /// the engine is handed to the API (`crate::readiness`), so no VF is handed out before its
    /// state is known. The VMs are recovered concurrently (one VM's slow hypervisor does not
    /// hold the others back, and their commits share transactions); each VM's assignments in
    /// order. Each assignment's decision is counted (`vfmap_recovery_assignments_total`).
    pub async fn recover(&self) -> Result<(), EngineError> {
        let (vms, held): (Vec<VmSpec>, Vec<Assignment>) = {
            let s = self.lock();
            (
                s.pool.vms().cloned().collect(),
                s.pool.assignments().cloned().collect(),
            )
        };
        let held = &held;
        futures_util::future::join_all(vms.into_iter().map(|vm| self.recover_vm(vm, held))).await;
        self.recover_kubelet().await;
        self.recover_programming().await;
        Ok(())
    }

    /// [`Engine::recover`] for one VM.
    async fn recover_vm(&self, vm: VmSpec, held: &[Assignment]) {
        self.adapters.channel.watch(&vm);
        let mine: Vec<&Assignment> = held.iter().filter(|a| a.vm == vm.name).collect();
        let (plugged, lifecycle) = match self.adapters.hypervisor.plugged(&vm).await {
            Ok(ids) => (ids, None),
            // Only a VM that is certainly not running has nothing plugged; anything less
            // certain (a timeout, a permission error) must not free a VF that may be in use.
            Err(e) if e.is_not_running() => (Vec::new(), e.lifecycle()),
            Err(e) => {
                let e = chain(&e);
                warn!(vm = %vm.name, error = %e, "cannot ask the hypervisor; unfinished attaches become releases retried in the background");
                self.defer_cleanups(&vm, &mine, &e).await;
                for _ in &mine {
                    self.metrics.recovered(Recovered::Deferred);
                }
                return;
            }
        };
        self.remove_orphans(&vm, &plugged).await;
        let decided: Vec<(&Assignment, bool, Recovery)> = mine
            .into_iter()
            .map(|a| {
                let is_plugged = plugged.contains(&device_id(a.global_index));
                (a, is_plugged, plan_recovery(a.state, is_plugged))
            })
            .collect();
        // A VF lost by a VM that is certainly not running, with no manager to tell: nothing to
        // unplug, no hypervisor call, one VF each; LOST_AT_ONCE at a time (their commits share
        // transactions; more at once costs memory and gains little). The rest in order.
        let (at_once, in_order): (Vec<_>, Vec<_>) = decided
            .into_iter()
            .partition(|(_, _, decision)| *decision == Recovery::Lost && lifecycle.is_none());
        for chunk in at_once.chunks(LOST_AT_ONCE) {
            futures_util::future::join_all(chunk.iter().map(|&(a, is_plugged, decision)| {
                self.recover_one(&vm, a, is_plugged, decision, lifecycle)
            }))
            .await;
        }
        for (a, is_plugged, decision) in in_order {
            self.recover_one(&vm, a, is_plugged, decision, lifecycle)
                .await;
        }
        if lifecycle == Some(crate::effects::Lifecycle::Undefined) {
            self.vm_undefined(&vm, "its manager no longer defines it")
                .await;
        }
    }

    /// Carries out recovery's decision for one assignment.
    async fn recover_one(
        &self,
        vm: &VmSpec,
        a: &Assignment,
        is_plugged: bool,
        decision: Recovery,
        lifecycle: Option<crate::effects::Lifecycle>,
    ) {
        info!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, state = a.state.as_str(), plugged = is_plugged, decision = ?decision, "recovery");
        self.metrics.recovered(decision.into());
        let incomplete = match decision {
            Recovery::Keep => None,
            Recovery::RollBack => {
                self.roll_back(vm, a, is_plugged, StepError::Restarted)
                    .await
                    .cleanup
            }
            Recovery::FinishRelease => self
                .finish_release(vm, a, false, is_plugged)
                .await
                .err()
                .map(|e| chain(&e)),
            // A VM its manager stopped is still asked to unplug: that drops the
            // device from a persistent definition, so it does not come back.
            Recovery::Lost => {
                self.roll_back(vm, a, lifecycle.is_some(), StepError::Lost)
                    .await
                    .cleanup
            }
        };
        if let Some(reason) = incomplete {
            warn!(vm = %vm.name, vf = %a.location, reason = %reason, "recovery incomplete");
        }
    }
}
