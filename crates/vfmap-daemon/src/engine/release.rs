//! VM registration and release: the agent unbinds, the hypervisor unplugs, the VF is reset,
//! rebound to its host driver and freed.

use super::*;

impl Engine {
    /// Registers a VM: its hypervisor adapter completes the spec (for libvirt, from the
    /// domain's live XML), then the pool validates and records it.
    pub async fn add_vm(&self, request: vfmap_api::NewVm) -> Result<vfmap_api::Vm, EngineError> {
        let name = request.name.to_string();
        // A name taken is refused before the hypervisor is asked anything.
        if self.lock().pool.vm(&name).is_some() {
            return Err(PoolError::VmExists(name).into());
        }
        let spec = self
            .adapters
            .hypervisor
            .register(&request)
            .await
            .map_err(|error| EngineError::Register {
                vm: name.clone(),
                error,
            })?;
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
        self.sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        info!(vm = %name, released = held.len(), "VM removed");
        Ok(held.len())
    }

    /// Releases a VM's local index: the agent unbinds, the hypervisor unplugs, the VF is reset
    /// and rebound to its host driver, then freed. A release that failed half-way is retried.
    /// Timed (`vfmap_detach_duration_seconds`).
    pub async fn detach(&self, vm: &str, local_index: LocalIndex) -> Result<(), EngineError> {
        let started = Instant::now();
        let backend = self.backend_of(vm);
        let result = self.release(vm, local_index).await;
        self.metrics
            .detach_done(backend, outcome(&result), started.elapsed());
        result
    }

    async fn release(&self, vm: &str, local_index: LocalIndex) -> Result<(), EngineError> {
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
            info!(vm = %vm, local_index = %local_index, vf = %current.location, state = "releasing", "assignment state");
            failpoint("releasing");
        }
        self.finish_release(&spec, &current, true, true)
            .await
            .map_err(|error| EngineError::DetachFailed {
                vm: vm.to_owned(),
                local_index,
                error,
            })
    }

    /// Agent unbinds (best effort), unplug (when `unplug`), reset, rebind the host driver, free.
    pub(super) async fn finish_release(
        &self,
        vm: &VmSpec,
        a: &Assignment,
        tell_agent: bool,
        unplug: bool,
    ) -> Result<(), ReleaseError> {
        if tell_agent {
            // The agent unbinds the driver before the device goes; an absent agent must not
            // block the release, so this is best effort.
            if let Err(e) = self.send_correspondence(vm, &[a.local_index]).await {
                warn!(vm = %vm.name, error = %chain(&e), "could not tell the agent before unplugging");
            }
        }
        if unplug && let Err(e) = self.unplug(vm, a).await {
            self.cleanup_failed(a.global_index, &chain(&e));
            return Err(ReleaseError::Unplug(e));
        }
        failpoint("unplugged");
        let scrubbed = self.scrub_and_rebind(a.global_index, a.location).await;
        self.commit(|s| end_release(&s.pool, a.global_index, &scrubbed))
            .await
            .map_err(|e| ReleaseError::Free(Box::new(e)))?;
        match scrubbed {
            Ok(()) => {
                info!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, "released; VF free")
            }
            Err(_) => {
                warn!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, "released; VF quarantined")
            }
        }
        Ok(())
    }

    /// [`Engine::scrub`], then binds the VF's host driver again (logged when it fails): what
    /// every release does between its holder letting go and the VF leaving its holder.
    pub(super) async fn scrub_and_rebind(
        &self,
        global_index: GlobalIndex,
        location: Bdf,
    ) -> Result<(), String> {
        let scrubbed = self.scrub(global_index, location).await;
        if let Err(e) = self.bind_host_driver(global_index, location).await {
            warn!(vf = %location, error = %chain(&e), "rebinding the host driver after release failed");
        }
        scrubbed
    }

    /// Resets a VF a holder let go of, then checks it is clean: its config space back in the
    /// reset state and its card's own wipe (`scrub` hook) done. `Err` (logged) says why not:
    /// the VF must go to quarantine ([`end_release`]), not back to the pool.
    pub(super) async fn scrub(
        &self,
        global_index: GlobalIndex,
        location: Bdf,
    ) -> Result<(), String> {
        self.reset(location).await;
        let function = self
            .lock()
            .pool
            .vf(global_index)
            .and_then(|v| v.function.clone());
        let host = self.adapters.host.clone();
        let scrubbed = tokio::task::spawn_blocking(move || host.scrub(location, function.as_ref()))
            .await
            .unwrap_or(Err(ScrubError::Stopped { vf: location }));
        scrubbed.map_err(|e| {
            let reason = chain(&e);
            warn!(vf = %location, reason = %reason, "the scrub failed; the VF goes to quarantine");
            reason
        })
    }

    /// Binds the VF's host driver (vfio-pci, normally) unless it already is; a VF whose
    /// function names none is left as it is.
    pub(super) async fn bind_host_driver(
        &self,
        global_index: GlobalIndex,
        location: Bdf,
    ) -> Result<(), HostError> {
        let host_driver = self
            .lock()
            .pool
            .vf(global_index)
            .and_then(|v| v.host_driver.clone());
        let Some(driver) = host_driver else {
            return Ok(());
        };
        let host = self.adapters.host.clone();
        tokio::task::spawn_blocking(move || host.bind(location, &driver))
            .await
            .unwrap_or(Err(HostError::Stopped { vf: location }))
    }
}

/// The changes that end a VF's hold after its scrub: freed, or, when the scrub failed,
/// quarantined in the same commit (never free in between).
pub(super) fn end_release(
    pool: &Pool,
    global_index: GlobalIndex,
    scrubbed: &Result<(), String>,
) -> Result<Vec<Mutation>, PoolError> {
    let changes = match scrubbed {
        Ok(()) if pool.kubelet_hold(global_index).is_some() => {
            vec![pool.plan_kubelet_free(global_index)?]
        }
        Ok(()) => vec![pool.plan_free(global_index)?],
        Err(reason) => pool.plan_free_into_quarantine(global_index, reason, crate::store::now())?,
    };
    Ok(changes.into_iter().map(Mutation::Pool).collect())
}
