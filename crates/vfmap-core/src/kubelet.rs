//! The kubelet as a holder of VFs, beside VMs, in the one [`Pool`].
//!
//! A Kubernetes device plugin's Allocate gives VFs to the kubelet for a container it does not
//! name yet; PodResources names it later. So a kubelet hold has no VM and no local index: it
//! is a holder kind of its own, kept in the pool next to the VMs' assignments and checked
//! against them (a VF is held by one VM or by the kubelet, never both; the pool's property
//! test runs random histories of both). The daemon stores both in the same table.
//!
//! Life of a hold: `held` (recorded by Allocate, or adopted from the kubelet's own records),
//! its owner filled in once known, then `releasing` (reset, host driver) and free.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::addr::Bdf;
use crate::index::GlobalIndex;
use crate::pool::{Change, Pool, PoolError};
use crate::profile::FunctionName;

/// A container as the kubelet names it: namespace, pod and container name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PodContainer {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container's name in the pod.
    pub container: String,
}

impl PodContainer {
    /// Checks the three names: each 1-253 bytes of printable ASCII without `/` (Kubernetes
    /// names are stricter; this keeps them safe to log and store).
    pub fn new(namespace: &str, pod: &str, container: &str) -> Result<PodContainer, String> {
        for (what, text) in [
            ("namespace", namespace),
            ("pod", pod),
            ("container", container),
        ] {
            let ok = !text.is_empty()
                && text.len() <= 253
                && text.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
            if !ok {
                return Err(format!(
                    "{text:?} is not a valid {what} name: 1-253 printable ASCII characters without '/'"
                ));
            }
        }
        Ok(PodContainer {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            container: container.to_owned(),
        })
    }
}

impl fmt::Display for PodContainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.pod, self.container)
    }
}

/// Where a kubelet hold is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum HoldState {
    /// The kubelet holds it (bound to its host driver, vfio-pci, for the container).
    Held,
    /// Being released: reset, host driver, free.
    Releasing,
}

impl HoldState {
    /// The state's name as the API and database write it.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Held => "held",
            HoldState::Releasing => "releasing",
        }
    }

    /// Parses [`HoldState::as_str`]'s output.
    pub fn parse(text: &str) -> Option<HoldState> {
        [HoldState::Held, HoldState::Releasing]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// One VF the kubelet holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeletHold {
    /// The VF.
    pub global_index: GlobalIndex,
    /// Its host location (the device plugin's device id).
    pub location: Bdf,
    /// The function it serves.
    pub function: FunctionName,
    /// The container holding it, once PodResources named it.
    pub owner: Option<PodContainer>,
    /// When Allocate (or an adoption) recorded it, milliseconds since the Unix epoch.
    pub allocated_at_ms: u64,
    /// Where it is in its life.
    pub state: HoldState,
}

/// Who holds a VF in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderRef<'a> {
    /// Nobody.
    Free,
    /// A VM.
    Vm(&'a crate::pool::Assignment),
    /// The kubelet.
    Kubelet(&'a KubeletHold),
    /// Nobody, but it is out of the pool until an operator clears it.
    Quarantined(&'a crate::quarantine::Quarantine),
    /// Nobody, but its card is re-programming it.
    Programming(&'a crate::program::Programming),
}

impl Pool {
    /// Every kubelet hold, by global index.
    pub fn kubelet_holds(&self) -> impl Iterator<Item = &KubeletHold> {
        self.kubelet.values()
    }

    /// The kubelet's hold of a VF.
    pub fn kubelet_hold(&self, index: GlobalIndex) -> Option<&KubeletHold> {
        self.kubelet.get(&index)
    }

    /// Who holds a VF.
    pub fn holder(&self, index: GlobalIndex) -> HolderRef<'_> {
        if let Some(a) = self.assignment(index) {
            HolderRef::Vm(a)
        } else if let Some(h) = self.kubelet.get(&index) {
            HolderRef::Kubelet(h)
        } else if let Some(q) = self.quarantine.get(&index) {
            HolderRef::Quarantined(q)
        } else if let Some(p) = self.programming.get(&index) {
            HolderRef::Programming(p)
        } else {
            HolderRef::Free
        }
    }

    /// Validates giving `vfs`, VFs of `function`, to the kubelet, all or nothing. VFs the
    /// kubelet already holds (and is not releasing) are accepted and left as they are (the
    /// kubelet may ask again after its restart); the change holds the free ones, with `owner`
    /// (known for an adoption) and `now_ms`. A VF a VM holds is refused.
    pub fn plan_kubelet_reserve(
        &self,
        function: &str,
        vfs: &[GlobalIndex],
        owner: Option<PodContainer>,
        now_ms: u64,
    ) -> Result<Change, PoolError> {
        if vfs.is_empty() || vfs.len() > 256 {
            return Err(PoolError::InvalidRequest(
                "a kubelet reservation takes 1-256 VFs".into(),
            ));
        }
        let mut new = Vec::new();
        for (i, gi) in vfs.iter().enumerate() {
            if vfs[..i].contains(gi) {
                return Err(PoolError::InvalidRequest(format!("VF {gi} is asked twice")));
            }
            let vf = self
                .vf(*gi)
                .ok_or_else(|| PoolError::InvalidRequest(format!("no VF {gi}")))?;
            let carried = vf.function.as_ref();
            let Some(carried) = carried.filter(|f| f.as_str() == function) else {
                return Err(PoolError::InvalidRequest(format!(
                    "VF {} does not carry function {function:?}",
                    vf.location
                )));
            };
            match self.holder(*gi) {
                HolderRef::Free => new.push(KubeletHold {
                    global_index: *gi,
                    location: vf.location,
                    function: carried.clone(),
                    owner: owner.clone(),
                    allocated_at_ms: now_ms,
                    state: HoldState::Held,
                }),
                HolderRef::Kubelet(h) if h.state == HoldState::Held => {}
                HolderRef::Kubelet(_) => {
                    return Err(PoolError::Taken {
                        vf: vf.location,
                        by: "the kubelet, being released".into(),
                    });
                }
                HolderRef::Vm(a) => {
                    return Err(PoolError::Taken {
                        vf: vf.location,
                        by: format!("VM {}", a.vm),
                    });
                }
                HolderRef::Quarantined(_) => {
                    return Err(PoolError::Taken {
                        vf: vf.location,
                        by: "quarantine (see `vfmap quarantine list`)".into(),
                    });
                }
                HolderRef::Programming(p) => {
                    return Err(PoolError::Taken {
                        vf: vf.location,
                        by: format!("a re-programming into {}", p.to),
                    });
                }
            }
        }
        Ok(Change::KubeletReserve(new))
    }

    /// Validates recording the container that holds a kubelet-held VF.
    pub fn plan_kubelet_owner(
        &self,
        index: GlobalIndex,
        owner: PodContainer,
    ) -> Result<Change, PoolError> {
        self.held_by_kubelet(index, HoldState::Held)?;
        Ok(Change::KubeletOwner {
            global_index: index,
            owner,
        })
    }

    /// Validates starting the release of a kubelet-held VF.
    pub fn plan_kubelet_release(&self, index: GlobalIndex) -> Result<Change, PoolError> {
        self.held_by_kubelet(index, HoldState::Held)?;
        Ok(Change::KubeletReleasing {
            global_index: index,
        })
    }

    /// Validates freeing a kubelet-held VF whose release is done.
    pub fn plan_kubelet_free(&self, index: GlobalIndex) -> Result<Change, PoolError> {
        self.held_by_kubelet(index, HoldState::Releasing)?;
        Ok(Change::KubeletFree {
            global_index: index,
        })
    }

    fn held_by_kubelet(&self, index: GlobalIndex, state: HoldState) -> Result<(), PoolError> {
        match self.kubelet.get(&index) {
            Some(h) if h.state == state => Ok(()),
            Some(h) => Err(PoolError::BadTransition {
                global_index: index,
                from: h.state.as_str(),
                to: match state {
                    HoldState::Held => HoldState::Releasing.as_str(),
                    HoldState::Releasing => "free",
                },
            }),
            None => Err(PoolError::NotAssigned(index)),
        }
    }

    /// Restores persisted kubelet holds (at start-up, after [`Pool::restore`]); those that
    /// break an invariant are returned instead of loaded.
    pub fn restore_kubelet(&mut self, holds: Vec<KubeletHold>) -> Vec<(KubeletHold, String)> {
        let mut rejected = Vec::new();
        for h in holds {
            let problem = match self.vf(h.global_index) {
                None => Some(format!("VF {} is no longer on this host", h.location)),
                Some(v) if v.location != h.location => Some(format!(
                    "VF {} is no longer at global index {}",
                    h.location, h.global_index
                )),
                Some(v) if v.function.as_ref() != Some(&h.function) => Some(format!(
                    "VF {} no longer carries {}",
                    h.location, h.function
                )),
                Some(_) if self.holder(h.global_index) != HolderRef::Free => {
                    Some("its VF is taken twice".to_owned())
                }
                Some(_) => None,
            };
            match problem {
                Some(p) => rejected.push((h, p)),
                None => {
                    self.kubelet.insert(h.global_index, h);
                }
            }
        }
        rejected
    }

    pub(crate) fn apply_kubelet(&mut self, change: &Change) {
        match change {
            Change::KubeletReserve(holds) => {
                for h in holds {
                    self.kubelet.insert(h.global_index, h.clone());
                }
            }
            Change::KubeletOwner {
                global_index,
                owner,
            } => {
                if let Some(h) = self.kubelet.get_mut(global_index) {
                    h.owner = Some(owner.clone());
                }
            }
            Change::KubeletReleasing { global_index } => {
                if let Some(h) = self.kubelet.get_mut(global_index) {
                    h.state = HoldState::Releasing;
                }
            }
            Change::KubeletFree { global_index } => {
                self.kubelet.remove(global_index);
            }
            _ => {}
        }
    }

    pub(crate) fn check_kubelet_invariants(&self) -> Result<(), String> {
        for (gi, h) in &self.kubelet {
            if *gi != h.global_index {
                return Err(format!(
                    "kubelet hold keyed {gi} is for VF {}",
                    h.global_index
                ));
            }
            if self.assignment(*gi).is_some() {
                return Err(format!("VF {gi} is held by a VM and by the kubelet"));
            }
            let vf = self
                .vf(*gi)
                .ok_or(format!("kubelet-held VF {gi} is not in the pool"))?;
            if vf.function.as_ref() != Some(&h.function) {
                return Err(format!(
                    "kubelet-held VF {gi} serves {} but carries {:?}",
                    h.function, vf.function
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "kubelet_tests.rs"]
mod tests;
