//! The kubelet as a holder (a Kubernetes device plugin's Allocate): VFs held for containers,
//! in the same pool and table as VMs' assignments, under the same commit discipline. The
//! device plugin itself (`crate::k8s`) only calls these.
//!
//! Allocate: the hold is durable first, then the VF is bound to its host driver (vfio-pci),
//! then its IOMMU group is read. Release: durable `releasing`, reset, host driver, free —
//! the release path of a VM's VF without the agent and the unplug. After a restart a hold is
//! kept; one found `releasing` is finished.

use vfmap_core::{FunctionName, HoldState, HolderRef, KubeletHold, PodContainer, VmName};

use super::*;

/// Who holds a VF, as the device plugin needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VfHolder {
    /// Nobody.
    Free,
    /// The kubelet.
    Kubelet {
        /// The container, once known.
        owner: Option<PodContainer>,
        /// When it was allocated (milliseconds since the epoch).
        allocated_at_ms: u64,
    },
    /// A VM.
    Vm(VmName),
    /// Being released, or its release did not finish: not usable now.
    Unusable,
}

/// A VF that carries a function, with its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionVf {
    /// Stable global index.
    pub global_index: GlobalIndex,
    /// Host location.
    pub location: Bdf,
    /// Its PF.
    pub pf: Bdf,
    /// Its function.
    pub function: FunctionName,
    /// NUMA node.
    pub numa_node: Option<i32>,
    /// Who holds it.
    pub holder: VfHolder,
}

/// A VF given to the kubelet: where it is and its IOMMU group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeletVf {
    /// Host location.
    pub location: Bdf,
    /// IOMMU group, when the host has one for it.
    pub iommu_group: Option<u32>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Engine {
    /// Every VF that carries a function, with its holder, by global index.
    pub fn function_vfs(&self) -> Vec<FunctionVf> {
        let state = self.lock();
        state
            .pool
            .vfs()
            .filter_map(|vf| {
                let holder = match state.pool.holder(vf.global_index) {
                    HolderRef::Free => VfHolder::Free,
                    HolderRef::Vm(a) => VfHolder::Vm(a.vm.clone()),
                    HolderRef::Kubelet(h) if h.state == HoldState::Held => VfHolder::Kubelet {
                        owner: h.owner.clone(),
                        allocated_at_ms: h.allocated_at_ms,
                    },
                    HolderRef::Kubelet(_)
                    | HolderRef::Quarantined(_)
                    | HolderRef::Programming(_) => VfHolder::Unusable,
                };
                Some(FunctionVf {
                    global_index: vf.global_index,
                    location: vf.location,
                    pf: vf.pf,
                    function: vf.function.clone()?,
                    numa_node: vf.numa_node,
                    holder,
                })
            })
            .collect()
    }

    /// The kubelet's VFs as the API shows them (`GET /v1/vms`'s `kubelet`).
    pub fn kubelet_views(&self) -> Vec<vfmap_api::KubeletVf> {
        self.lock()
            .pool
            .kubelet_holds()
            .map(|h| vfmap_api::KubeletVf {
                global_index: h.global_index,
                location: h.location,
                function: h.function.clone(),
                owner: h.owner.clone(),
                allocated_at_ms: h.allocated_at_ms,
                state: h.state,
            })
            .collect()
    }

    fn index_of(&self, locations: &[Bdf]) -> Result<Vec<GlobalIndex>, PoolError> {
        let state = self.lock();
        let by_location: BTreeMap<Bdf, GlobalIndex> = state
            .pool
            .vfs()
            .filter(|v| locations.contains(&v.location))
            .map(|v| (v.location, v.global_index))
            .collect();
        locations
            .iter()
            .map(|l| {
                by_location
                    .get(l)
                    .copied()
                    .ok_or_else(|| PoolError::InvalidRequest(format!("no VF at {l} on this host")))
            })
            .collect()
    }

    /// Gives `locations`, VFs of `function`, to the kubelet, all or nothing (those it holds
    /// already are kept as they are): the holds are committed, then each VF is bound to its
    /// host driver and its IOMMU group read. When a bind fails, the VFs held by this call are
    /// released again and the error returned. `owner` is known for an adoption.
    pub async fn kubelet_reserve(
        &self,
        function: &FunctionName,
        locations: &[Bdf],
        owner: Option<PodContainer>,
    ) -> Result<Vec<KubeletVf>, EngineError> {
        let indexes = self.index_of(locations)?;
        let mutations = self
            .commit(|s| {
                let change = s.pool.plan_kubelet_reserve(
                    function.as_str(),
                    &indexes,
                    owner.clone(),
                    now_ms(),
                )?;
                Ok(vec![Mutation::Pool(change)])
            })
            .await?;
        let new: Vec<KubeletHold> = match mutations.first() {
            Some(Mutation::Pool(Change::KubeletReserve(holds))) => holds.clone(),
            _ => Vec::new(),
        };
        for h in &new {
            info!(vf = %h.location, function = %h.function, owner = ?h.owner.as_ref().map(ToString::to_string), "held by the kubelet");
        }
        failpoint("kubelet_held");
        let mut given = Vec::with_capacity(locations.len());
        for (gi, location) in indexes.iter().zip(locations) {
            if let Err(e) = self.bind_host_driver(*gi, *location).await {
                warn!(vf = %location, error = %chain(&e), "binding the host driver for the kubelet failed; releasing this allocation");
                for h in &new {
                    if let Err(e) = self.kubelet_release(h.location).await {
                        warn!(vf = %h.location, error = %chain(&e), "releasing after a failed bind failed");
                    }
                }
                return Err(PoolError::InvalidRequest(format!(
                    "VF {location} could not be bound to its host driver: {}",
                    chain(&e)
                ))
                .into());
            }
            let host = self.adapters.host.clone();
            let location = *location;
            let iommu_group = tokio::task::spawn_blocking(move || host.iommu_group(location))
                .await
                .unwrap_or(None);
            given.push(KubeletVf {
                location,
                iommu_group,
            });
        }
        Ok(given)
    }

    /// Records the container holding a kubelet-held VF.
    pub async fn kubelet_identify(
        &self,
        location: Bdf,
        owner: PodContainer,
    ) -> Result<(), EngineError> {
        let gi = self.index_of(&[location])?[0];
        let text = owner.to_string();
        self.commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_kubelet_owner(gi, owner)?)]))
            .await?;
        info!(vf = %location, owner = %text, "kubelet-held VF identified");
        Ok(())
    }

    /// Returns a kubelet-held VF to the pool: durable `releasing`, reset, host driver, free.
    /// Refused, nothing changed, while a process has the VF's IOMMU group open. A release
    /// found `releasing` (an earlier one stopped half-way) is finished.
    pub async fn kubelet_release(&self, location: Bdf) -> Result<(), EngineError> {
        let gi = self.index_of(&[location])?[0];
        let Some(_claim) = self.claim(gi) else {
            return Err(PoolError::InvalidRequest(format!(
                "VF {location} is being released already"
            ))
            .into());
        };
        let state = self.lock().pool.kubelet_hold(gi).map(|h| h.state);
        match state {
            None => return Err(PoolError::NotAssigned(gi).into()),
            Some(HoldState::Held) => {
                // Not reset under a container that still has the device open (a stopping one,
                // or a stuck one): refused, nothing changed; reconciliation asks again.
                let host = self.adapters.host.clone();
                let users = tokio::task::spawn_blocking(move || host.group_users(location))
                    .await
                    .unwrap_or_default();
                if let Some(pid) = users.first() {
                    return Err(PoolError::Taken {
                        vf: location,
                        by: format!(
                            "process {pid} (its IOMMU group is still open; {} process(es) in all); released once closed",
                            users.len()
                        ),
                    }
                    .into());
                }
                self.commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_kubelet_release(gi)?)]))
                    .await?;
                failpoint("kubelet_releasing");
            }
            Some(HoldState::Releasing) => {}
        }
        let scrubbed = self.scrub_and_rebind(gi, location).await;
        self.commit(|s| super::release::end_release(&s.pool, gi, &scrubbed))
            .await?;
        match scrubbed {
            Ok(()) => info!(vf = %location, "released by the kubelet; VF free"),
            Err(_) => warn!(vf = %location, "released by the kubelet; VF quarantined"),
        }
        Ok(())
    }

    /// After a restart: kubelet holds are kept (the kubelet and PodResources decide about
    /// them); releases that stopped half-way are finished.
    pub(super) async fn recover_kubelet(&self) {
        let holds: Vec<KubeletHold> = self.lock().pool.kubelet_holds().cloned().collect();
        for h in holds {
            info!(vf = %h.location, state = h.state.as_str(), owner = ?h.owner.as_ref().map(ToString::to_string), "recovery (kubelet)");
            if h.state == HoldState::Releasing
                && let Err(e) = self.kubelet_release(h.location).await
            {
                warn!(vf = %h.location, error = %chain(&e), "finishing a kubelet release failed");
            }
        }
    }
}
