//! Attach, pipelined per request: reserve → host bind all → plug all in order → one
//! correspondence with every entry → one answer → ready, all or nothing.
//!
//! A request of N VFs costs one commit per step (not per VF), N hypervisor commands in order
//! and one agent round trip. Every step's state is durable before the next side effect, so a
//! crash between any two steps is recovered (`Engine::recover` rolls back what is not
//! `ready`, unplugging what the hypervisor lists); the failpoints are, in order: `reserved`,
//! `host_bound`, `device_added` (after the first device_add of the request; `device_added:K`
//! after the K-th), `plugged` and `sent` (one commit), `answered` (the agent answered, nothing
//! committed yet) and `ready`.
//!
//! Nothing here holds a lock that VMs share across an await: the state mutex is taken only to
//! plan a commit or read, the store groups the commits of concurrent requests, the adapters
//! serialise per VM (QMP, libvirt) or keep one link per VM (the guest channel), and a VM's
//! correspondences take turns per VM. So one VM's slow hot-plug or agent delays only that
//! VM's requests.

use super::*;

/// A VF of a request and how far its attach went.
struct InFlight<'r> {
    a: &'r Assignment,
    /// The function's guest driver, which the agent must answer with.
    guest_driver: Option<DriverName>,
    /// The function's host driver.
    host_driver: Option<DriverName>,
    /// Whether the VF may be in the VM: from its device_add on (a failed device_add may still
    /// have left the device half-added, so the rollback unplugs it to be sure).
    maybe_plugged: bool,
    /// Its detail so far (guest path, then what the agent bound).
    detail: Detail,
}

/// The VFs of a request whose own step failed, by position in the request.
type StepFailures = Vec<(usize, StepError)>;

impl Engine {
    /// Serves a request: reserves VFs and local indexes, plugs them all and has the agent bind
    /// their drivers in one round trip. All or nothing: if one VF fails, every VF of the
    /// request is rolled back. Timed (`vfmap_attach_duration_seconds`).
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
        let reserve = |s: &State| Ok(vec![Mutation::Pool(s.pool.plan_reserve(&request)?)]);
        // Too few free VFs of the function: re-program free ones of others (when the profile
        // allows it), then try again. Only then: the common attach pays nothing for it.
        let mutations = match self.commit(reserve).await {
            Err(EngineError::Pool(PoolError::NoFreeVf { .. }))
                if self.program_for(&request).await? =>
            {
                self.commit(reserve).await?
            }
            reserved => reserved?,
        };
        let reserved: Vec<Assignment> = match mutations.first() {
            Some(Mutation::Pool(Change::Reserve(a))) => a.clone(),
            _ => Vec::new(),
        };
        for a in &reserved {
            info!(vm = %a.vm, local_index = %a.local_index, vf = %a.location, function = %a.function, "assignment reserved");
        }
        failpoint("reserved");
        let mut vfs: Vec<InFlight<'_>> = {
            let state = self.lock();
            reserved
                .iter()
                .map(|a| {
                    let vf = state.pool.vf(a.global_index);
                    InFlight {
                        a,
                        guest_driver: vf.and_then(|v| v.guest_driver.clone()),
                        host_driver: vf.and_then(|v| v.host_driver.clone()),
                        maybe_plugged: false,
                        detail: Detail::default(),
                    }
                })
                .collect()
        };
        let mut answered = false;
        if let Err(failed) = self.attach_steps(&spec, &mut vfs, &mut answered).await {
            if answered {
                // The agent may have bound some entries: it lets them go before they are
                // unplugged, as for a detach (best effort: the rollback does not wait on it).
                let request: Vec<LocalIndex> = reserved.iter().map(|a| a.local_index).collect();
                if let Err(e) = self.send_correspondence(&spec, &request).await {
                    warn!(vm = %spec.name, error = %chain(&e), "could not tell the agent before rolling back");
                }
            }
            let failures = self.roll_back_request(&spec, &vfs, failed).await;
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

    /// Host bind all → plug all in order → send once → ready, each step one commit.
    /// Sets `answered` once the agent has answered (it may have bound some of the entries).
    async fn attach_steps(
        &self,
        vm: &VmSpec,
        vfs: &mut [InFlight<'_>],
        answered: &mut bool,
    ) -> Result<(), StepFailures> {
        let mut binds = Vec::with_capacity(vfs.len());
        for (i, vf) in vfs.iter().enumerate() {
            match (&vf.host_driver, &vf.guest_driver) {
                (Some(host), Some(_)) => binds.push((vf.a.location, host.clone())),
                _ => return Err(vec![(i, StepError::NoDrivers)]),
            }
        }
        let Some(first) = vfs.first().map(|vf| vf.a.location) else {
            return Ok(());
        };
        let host = self.adapters.host.clone();
        let bound = tokio::task::spawn_blocking(move || {
            for (i, (location, driver)) in binds.iter().enumerate() {
                host.bind(*location, driver).map_err(|e| (i, e))?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err((0, HostError::Stopped { vf: first })));
        bound.map_err(|(i, e)| vec![(i, StepError::Host(e))])?;
        self.advance_all(vfs, &[AssignState::HostBound], false)
            .await
            .map_err(|e| vec![(0, StepError::state(e))])?;

        for (i, vf) in vfs.iter_mut().enumerate() {
            let a = vf.a;
            let slot = vm
                .slots
                .get(a.local_index.slot())
                .ok_or_else(|| vec![(i, StepError::NoSlot)])?;
            vf.maybe_plugged = true;
            let path = self
                .adapters
                .hypervisor
                .attach(vm, slot, &device_id(a.global_index), a.location)
                .await
                .map_err(|e| vec![(i, StepError::Hypervisor(e))])?;
            info!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, path = %path, "device added");
            vf.detail.guest_path = Some(path);
            failpoint_nth("device_added", i + 1);
        }
        // Plugged and sent in one commit for the whole request: nothing happens between them,
        // and "sent" is durable before the agent hears anything.
        self.advance_all(vfs, &[AssignState::Plugged, AssignState::Sent], true)
            .await
            .map_err(|e| vec![(0, StepError::state(e))])?;

        let answers = self.send_correspondence(vm, &[]).await.map_err(|e| {
            (0..vfs.len())
                .map(|i| (i, StepError::Channel(e.clone())))
                .collect::<Vec<_>>()
        })?;
        // Logged for the stage split of the nested benchmark: answered -> ready is the commit.
        info!(vm = %vm.name, answers = answers.len(), "agent answered");
        *answered = true;
        let mut failed = Vec::new();
        for (i, vf) in vfs.iter_mut().enumerate() {
            match check_answer(vf, &answers) {
                Ok((driver, guest_bdf)) => {
                    vf.detail.guest_bdf = Some(guest_bdf);
                    vf.detail.guest_driver = Some(driver);
                }
                Err(e) => failed.push((i, e.into())),
            }
        }
        if !failed.is_empty() {
            return Err(failed);
        }
        failpoint("answered");
        self.advance_all(vfs, &[AssignState::Ready], true)
            .await
            .map_err(|e| vec![(0, StepError::state(e))])
    }

    /// Moves every VF of a request through consecutive states in one commit (with its detail
    /// when `detail`), then logs and runs each state's failpoint. Only for steps with no side
    /// effect between them: the last state is durable before the next side effect.
    async fn advance_all(
        &self,
        vfs: &[InFlight<'_>],
        states: &[AssignState],
        detail: bool,
    ) -> Result<(), EngineError> {
        self.commit(|s| {
            let mut m = Vec::with_capacity(vfs.len() * (states.len() + 1));
            for vf in vfs {
                let gi = vf.a.global_index;
                m.extend(
                    s.pool
                        .plan_advance(gi, states)?
                        .into_iter()
                        .map(Mutation::Pool),
                );
                if detail {
                    m.push(Mutation::Detail(gi, vf.detail.clone()));
                }
            }
            Ok(m)
        })
        .await?;
        for state in states {
            for vf in vfs {
                let a = vf.a;
                info!(vm = %a.vm, local_index = %a.local_index, vf = %a.location, state = state.as_str(), "assignment state");
            }
            failpoint(state.as_str());
        }
        Ok(())
    }

    /// Rolls back every VF of a failed request, in order: those whose own step failed with
    /// their error, the others as siblings (unplugged too when they may be plugged).
    async fn roll_back_request(
        &self,
        vm: &VmSpec,
        vfs: &[InFlight<'_>],
        mut failed: StepFailures,
    ) -> Vec<VfFailure> {
        // The VFs that failed come first (the first decides the API's error code); a sibling
        // is listed only when its rollback could not finish.
        let (mut failures, mut siblings) = (Vec::new(), Vec::new());
        for (i, vf) in vfs.iter().enumerate() {
            let own = failed
                .iter()
                .position(|(at, _)| *at == i)
                .map(|k| failed.swap_remove(k).1);
            let sibling = own.is_none();
            let error = own.unwrap_or(StepError::Sibling);
            let failure = self.roll_back(vm, vf.a, vf.maybe_plugged, error).await;
            match sibling {
                false => failures.push(failure),
                true if failure.cleanup.is_some() => siblings.push(failure),
                true => {}
            }
        }
        failures.extend(siblings);
        failures
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
        let scrubbed = self.scrub(a.global_index, a.location).await;
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
                let mut end = super::release::end_release(&s.pool, a.global_index, &scrubbed)?;
                end.push(Mutation::Failure(record));
                Ok(end)
            })
            .await;
        match freed {
            Ok(_) if scrubbed.is_ok() => {
                info!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, "rolled back; VF free")
            }
            Ok(_) => {
                warn!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, "rolled back; VF quarantined")
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

/// The agent's answer for `vf`: the driver and guest address when it bound the function's
/// driver.
fn check_answer(vf: &InFlight<'_>, answers: &[Answer]) -> Result<(DriverName, Bdf), AgentError> {
    let local_index = vf.a.local_index;
    let Some(wanted) = vf.guest_driver.clone() else {
        return Err(AgentError::NoAnswer { local_index });
    };
    match answers.iter().find(|x| x.local_index() == local_index) {
        Some(Answer::Bound {
            driver, guest_bdf, ..
        }) if *driver == wanted => Ok((driver.clone(), *guest_bdf)),
        Some(Answer::Bound { driver, .. }) => Err(AgentError::WrongDriver {
            bound: driver.clone(),
            wanted,
        }),
        Some(Answer::Failed { reason, .. }) => Err(AgentError::Failed {
            driver: wanted,
            reason: reason.escape_debug().to_string(),
        }),
        None => Err(AgentError::NoAnswer { local_index }),
    }
}
