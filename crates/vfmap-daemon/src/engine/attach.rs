//! Attach: reserve → host bound → plugged → sent → ready, rolling back on any failure.

use super::*;

impl Engine {
    /// Serves a request: reserves VFs and local indexes, then plugs each and has the agent bind
    /// its driver. All or nothing: if one VF fails, the others of the request are released.
    /// Timed (`vfmap_attach_duration_seconds`).
    pub async fn attach(
        &self,
        request: Request,
    ) -> Result<Vec<vfmap_api::CorrespondenceRow>, EngineError> {
        let started = Instant::now();
        let backend = self.backend_of(request.vm.as_str());
        let result = self.attach_request(request).await;
        self.metrics
            .attach_done(backend, outcome(&result), started.elapsed());
        result
    }

    async fn attach_request(
        &self,
        request: Request,
    ) -> Result<Vec<vfmap_api::CorrespondenceRow>, EngineError> {
        let spec = self.vm_spec(request.vm.as_str())?;
        let mutations = self
            .commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_reserve(&request)?)]))
            .await?;
        let reserved: Vec<Assignment> = match mutations.first() {
            Some(Mutation::Pool(Change::Reserve(a))) => a.clone(),
            _ => Vec::new(),
        };
        for a in &reserved {
            info!(vm = %a.vm, local_index = %a.local_index, vf = %a.location, function = %a.function, "assignment reserved");
        }
        failpoint("reserved");
        let mut done = Vec::new();
        let mut failures: Vec<VfFailure> = Vec::new();
        for a in &reserved {
            if !failures.is_empty() {
                // All or nothing: once one VF failed, the untried ones are just freed.
                let _ = self.roll_back(&spec, a, false, StepError::Sibling).await;
                continue;
            }
            match self.attach_one(&spec, a).await {
                Ok(()) => done.push(a.clone()),
                Err(failure) => failures.push(failure),
            }
        }
        if !failures.is_empty() {
            for a in &done {
                if let Err(e) = self.detach(spec.name.as_str(), a.local_index).await {
                    warn!(error = %chain(&e), "releasing a sibling of a failed attach");
                }
            }
            return Err(EngineError::AttachFailed {
                vm: spec.name.to_string(),
                function: request.function,
                failures,
            });
        }
        let view = self.vm_view(spec.name.as_str())?;
        Ok(view
            .correspondence
            .into_iter()
            .filter(|row| reserved.iter().any(|a| a.local_index == row.local_index))
            .collect())
    }

    /// Host bind → plug → send → ready; on any failure, rolls back and says why.
    pub(super) async fn attach_one(&self, vm: &VmSpec, a: &Assignment) -> Result<(), VfFailure> {
        // Whether the VF may be in the VM when a step fails: from the device_add on.
        let mut maybe_plugged = false;
        match self.attach_steps(vm, a, &mut maybe_plugged).await {
            Ok(()) => Ok(()),
            Err(error) => Err(self.roll_back(vm, a, maybe_plugged, error).await),
        }
    }

    async fn attach_steps(
        &self,
        vm: &VmSpec,
        a: &Assignment,
        maybe_plugged: &mut bool,
    ) -> Result<(), StepError> {
        let (host_driver, guest_driver) = {
            let state = self.lock();
            let vf = state.pool.vf(a.global_index);
            (
                vf.and_then(|v| v.host_driver.clone()),
                vf.and_then(|v| v.guest_driver.clone()),
            )
        };
        let (Some(host_driver), Some(guest_driver)) = (host_driver, guest_driver) else {
            return Err(StepError::NoDrivers);
        };
        let host = self.adapters.host.clone();
        let location = a.location;
        tokio::task::spawn_blocking(move || host.bind(location, &host_driver))
            .await
            .unwrap_or(Err(HostError::Stopped { vf: location }))?;
        self.set_state(a, AssignState::HostBound, None)
            .await
            .map_err(StepError::state)?;
        let slot = vm
            .slots
            .get(a.local_index.slot())
            .ok_or(StepError::NoSlot)?;
        // A failed device_add may still have left the device half-added: unplug to be sure.
        *maybe_plugged = true;
        let path = self
            .adapters
            .hypervisor
            .attach(vm, slot, &device_id(a.global_index), a.location)
            .await?;
        let detail = Detail {
            guest_path: Some(path),
            ..Detail::default()
        };
        // Plugged and sent in one commit: nothing happens between them, and "sent" is
        // durable before the agent hears anything.
        self.set_states(
            a,
            &[AssignState::Plugged, AssignState::Sent],
            Some(detail.clone()),
        )
        .await
        .map_err(StepError::state)?;
        let answers = self
            .adapters
            .channel
            .apply(vm, self.entries(vm), self.adapters.agent_deadline)
            .await?;
        let answer = answers
            .into_iter()
            .find(|x| x.local_index() == a.local_index);
        match answer {
            Some(Answer::Bound {
                driver, guest_bdf, ..
            }) if driver == guest_driver => {
                let detail = Detail {
                    guest_bdf: Some(guest_bdf),
                    guest_driver: Some(driver),
                    ..detail
                };
                self.set_state(a, AssignState::Ready, Some(detail))
                    .await
                    .map_err(StepError::state)
            }
            Some(Answer::Bound { driver, .. }) => Err(AgentError::WrongDriver {
                bound: driver,
                wanted: guest_driver,
            }
            .into()),
            Some(Answer::Failed { reason, .. }) => Err(AgentError::Failed {
                driver: guest_driver,
                reason: reason.escape_debug().to_string(),
            }
            .into()),
            None => Err(AgentError::NoAnswer {
                local_index: a.local_index,
            }
            .into()),
        }
    }

    /// Undoes an attach: unplug (when it may be plugged), reset, free, and records why. When
    /// the unplug fails, the VF is *not* freed (it may still be in the VM): it becomes a
    /// release whose cleanup is retried, and the failure says so.
    pub(super) async fn roll_back(
        &self,
        vm: &VmSpec,
        a: &Assignment,
        maybe_plugged: bool,
        error: StepError,
    ) -> VfFailure {
        let reason = chain(&error);
        warn!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, reason = %reason, "attach failed; rolling back");
        let mut failure = VfFailure {
            local_index: a.local_index,
            vf: a.location,
            error,
            cleanup: None,
        };
        if maybe_plugged && let Err(e) = self.unplug(vm, a).await {
            // The VF may still be in the VM: it must not go back to the pool, but it must not
            // stay pinned either. It becomes a release whose cleanup is retried.
            let e = chain(&e);
            self.abandon(vm, a, &e).await;
            failure.cleanup = Some(format!(
                "the rollback could not unplug the VF ({e}); vfmap retries the cleanup automatically (see `vfmap status {}`)",
                vm.name
            ));
            return failure;
        }
        self.reset(a.location).await;
        let record = Failure {
            vm: vm.name.to_string(),
            local_index: a.local_index,
            function: a.function.to_string(),
            global_index: a.global_index,
            reason,
            at: crate::store::now(),
        };
        let freed = self
            .commit(|s| {
                Ok(vec![
                    Mutation::Pool(s.pool.plan_free(a.global_index)?),
                    Mutation::Failure(record),
                ])
            })
            .await;
        match freed {
            Ok(_) => {
                info!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, "rolled back; VF free")
            }
            Err(e) => failure.cleanup = Some(format!("then freeing the VF failed: {}", chain(&e))),
        }
        failure
    }

    /// Unplugs a VF. A VM that is certainly not running holds nothing: that counts as done.
    pub(super) async fn unplug(&self, vm: &VmSpec, a: &Assignment) -> Result<(), HypervisorError> {
        match self
            .adapters
            .hypervisor
            .detach(vm, &device_id(a.global_index))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_running() => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn reset(&self, vf: vfmap_core::Bdf) {
        let host = self.adapters.host.clone();
        let result = tokio::task::spawn_blocking(move || host.reset(vf)).await;
        match result {
            Ok(Ok(true)) => info!(vf = %vf, "VF reset"),
            Ok(Ok(false)) => info!(vf = %vf, "VF has no reset method"),
            Ok(Err(e)) => warn!(vf = %vf, error = %chain(&e), "VF reset failed"),
            Err(e) => warn!(vf = %vf, error = %e, "VF reset stopped unexpectedly"),
        }
    }
}
