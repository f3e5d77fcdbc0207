//! Quarantined VFs: a VF whose scrub failed after a release (its config space not back to the
//! reset state, or its card's wipe failing) is kept out of the pool, visible with why, until an
//! operator clears it. It is never handed out meanwhile.
//!
//! A released VF goes to quarantine in the same change that frees it
//! ([`Pool::plan_free_into_quarantine`]): there is no moment in which it is free.

use serde::{Deserialize, Serialize};

use crate::addr::Bdf;
use crate::index::GlobalIndex;
use crate::kubelet::{HoldState, HolderRef};
use crate::pool::{Change, Pool, PoolError};

/// Why a VF is out of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The VF.
    pub global_index: GlobalIndex,
    /// Its host location.
    pub location: Bdf,
    /// The failed step and what it found, for the operator.
    pub reason: String,
    /// When, in seconds since the epoch.
    pub since: u64,
}

/// The longest reason kept (a hook's error names its output's last lines).
pub const MAX_REASON: usize = 2048;

impl Pool {
    /// Every quarantined VF, by global index.
    pub fn quarantined(&self) -> impl Iterator<Item = &Quarantine> {
        self.quarantine.values()
    }

    /// A VF's quarantine, if it is in one.
    pub fn quarantine_of(&self, index: GlobalIndex) -> Option<&Quarantine> {
        self.quarantine.get(&index)
    }

    /// Validates ending the release of a VF (a VM's, released or rolled back, or the
    /// kubelet's being released) by quarantining it instead of freeing it: the free and the
    /// quarantine, to be committed together.
    pub fn plan_free_into_quarantine(
        &self,
        index: GlobalIndex,
        reason: &str,
        since: u64,
    ) -> Result<Vec<Change>, PoolError> {
        let free = match self.holder(index) {
            HolderRef::Vm(_) => self.plan_free(index)?,
            HolderRef::Kubelet(h) if h.state == HoldState::Releasing => {
                self.plan_kubelet_free(index)?
            }
            HolderRef::Kubelet(h) => {
                return Err(PoolError::BadTransition {
                    global_index: index,
                    from: h.state.as_str(),
                    to: "quarantined",
                });
            }
            HolderRef::Free | HolderRef::Quarantined(_) | HolderRef::Programming(_) => {
                return Err(PoolError::NotAssigned(index));
            }
        };
        let location = self
            .vf(index)
            .map(|v| v.location)
            .ok_or(PoolError::NotAssigned(index))?;
        Ok(vec![
            free,
            Change::Quarantine(Quarantine {
                global_index: index,
                location,
                reason: cut(reason),
                since,
            }),
        ])
    }

    /// Validates an operator's clearing of a quarantined VF: it becomes free.
    pub fn plan_clear_quarantine(&self, index: GlobalIndex) -> Result<Change, PoolError> {
        if self.quarantine.contains_key(&index) {
            Ok(Change::ClearQuarantine {
                global_index: index,
            })
        } else {
            Err(PoolError::NotQuarantined(index))
        }
    }

    /// Restores persisted quarantines (at start-up, after the holders); those that break an
    /// invariant are returned instead of loaded.
    pub fn restore_quarantine(&mut self, all: Vec<Quarantine>) -> Vec<(Quarantine, String)> {
        let mut rejected = Vec::new();
        for q in all {
            match self.restore_clash(q.global_index, q.location) {
                Some(p) => rejected.push((q, p)),
                None => {
                    self.quarantine.insert(q.global_index, q);
                }
            }
        }
        rejected
    }

    /// Why a stored record of VF `index` at `location` (a quarantine, an interrupted
    /// re-programming) cannot be restored: the VF is gone or moved, or something holds it.
    pub(crate) fn restore_clash(&self, index: GlobalIndex, location: Bdf) -> Option<String> {
        match self.vf(index) {
            None => Some(format!("VF {location} is no longer on this host")),
            Some(v) if v.location != location => Some(format!(
                "VF {location} is no longer at global index {index}"
            )),
            Some(_) if self.holder(index) != HolderRef::Free => {
                Some("its VF is also held".to_owned())
            }
            Some(_) => None,
        }
    }

    pub(crate) fn apply_quarantine(&mut self, change: &Change) {
        match change {
            Change::Quarantine(q) => {
                self.quarantine.insert(q.global_index, q.clone());
            }
            Change::ClearQuarantine { global_index } => {
                self.quarantine.remove(global_index);
            }
            _ => {}
        }
    }

    pub(crate) fn check_quarantine_invariants(&self) -> Result<(), String> {
        for (gi, q) in &self.quarantine {
            if *gi != q.global_index {
                return Err(format!(
                    "quarantine keyed {gi} is for VF {}",
                    q.global_index
                ));
            }
            if self.assignment(*gi).is_some()
                || self.kubelet.contains_key(gi)
                || self.programming.contains_key(gi)
            {
                return Err(format!("VF {gi} is quarantined and held"));
            }
            if self.vf(*gi).is_none_or(|v| v.location != q.location) {
                return Err(format!("quarantined VF {gi} is not in the pool"));
            }
        }
        Ok(())
    }
}

/// `reason` cut at [`MAX_REASON`] bytes on a character boundary.
pub(crate) fn cut(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

#[cfg(test)]
#[path = "quarantine_tests.rs"]
mod tests;
