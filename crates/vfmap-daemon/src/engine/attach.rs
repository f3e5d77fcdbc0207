//! Attach: reserve → host bound → plugged → sent → ready, rolling back on any failure.

use super::*;

impl Engine {
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
    pub(super) async fn attach_one(&self, vm: &VmSpec, a: &Assignment) -> Result<(), String> {
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
    pub(super) async fn roll_back(
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
    pub(super) async fn unplug(&self, vm: &VmSpec, a: &Assignment) -> Result<(), HypervisorError> {
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
    pub(super) async fn fail(
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

    pub(super) async fn reset(&self, vf: vfmap_core::Bdf) {
        let host = self.adapters.host.clone();
        let result = tokio::task::spawn_blocking(move || host.reset(vf)).await;
        match result {
            Ok(Ok(true)) => info!(vf = %vf, "VF reset"),
            Ok(Ok(false)) => info!(vf = %vf, "VF has no reset method"),
            Ok(Err(e)) => warn!(vf = %vf, error = %e, "VF reset failed"),
            Err(e) => warn!(vf = %vf, error = %e, "VF reset panicked"),
        }
    }
}
