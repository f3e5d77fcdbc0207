//! Re-programming: a free VF made to carry another function at run time by its card's
//! `program` hook (a QAT-style service switch, an FPGA partial bitstream). T1 changes: the
//! VF's function, and with it the drivers, are the new function's once the hook succeeded.
//!
//! A VF being re-programmed is out of the pool (no VM, kubelet or second re-programming may
//! take it), durably: a crash during the hook is finished by recovery (the hook again, it is
//! idempotent) or, when it fails, ends in quarantine. Whether `from` may become `to` is the
//! profile's policy (`programmable_to`), checked by the caller.

use serde::{Deserialize, Serialize};

use crate::addr::Bdf;
use crate::index::GlobalIndex;
use crate::kubelet::HolderRef;
use crate::pool::{Change, Pool, PoolError};
use crate::profile::{DriverName, FunctionName};

/// A VF whose re-programming was started and has not ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Programming {
    /// The VF.
    pub global_index: GlobalIndex,
    /// Its host location.
    pub location: Bdf,
    /// The function it carried.
    pub from: FunctionName,
    /// The function it is to carry.
    pub to: FunctionName,
}

/// A function's drivers, which a VF takes with the function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drivers {
    /// The host driver before pass-through.
    pub host: DriverName,
    /// The guest driver.
    pub guest: DriverName,
}

impl Pool {
    /// Every VF being re-programmed.
    pub fn programming(&self) -> impl Iterator<Item = &Programming> {
        self.programming.values()
    }

    /// Validates starting to re-program free VF `index` into `to`.
    pub fn plan_program(&self, index: GlobalIndex, to: &FunctionName) -> Result<Change, PoolError> {
        let vf = self.vf(index).ok_or(PoolError::UnknownVf(index))?;
        let taken = |by: String| PoolError::Taken {
            vf: vf.location,
            by,
        };
        match self.holder(index) {
            HolderRef::Free => {}
            HolderRef::Vm(a) => return Err(taken(format!("VM {}", a.vm))),
            HolderRef::Kubelet(_) => return Err(taken("the kubelet".into())),
            HolderRef::Quarantined(_) => {
                return Err(taken("quarantine (see `vfmap quarantine list`)".into()));
            }
            HolderRef::Programming(p) => {
                return Err(taken(format!("a re-programming into {}", p.to)));
            }
        }
        let Some(from) = vf.function.clone() else {
            return Err(PoolError::FunctionConflict {
                vf: vf.location,
                problem: "carries no function to re-program".into(),
            });
        };
        if &from == to {
            return Err(PoolError::FunctionConflict {
                vf: vf.location,
                problem: format!("already carries {to}"),
            });
        }
        Ok(Change::ProgramStart(Programming {
            global_index: index,
            location: vf.location,
            from,
            to: to.clone(),
        }))
    }

    /// Validates ending a re-programming that succeeded: the VF carries `to`, with `drivers`.
    pub fn plan_programmed(
        &self,
        index: GlobalIndex,
        drivers: Drivers,
    ) -> Result<Change, PoolError> {
        let p = self
            .programming
            .get(&index)
            .ok_or(PoolError::NotProgramming(index))?;
        Ok(Change::Programmed {
            global_index: index,
            function: p.to.clone(),
            drivers,
        })
    }

    /// Validates ending a re-programming that failed: the VF goes to quarantine (what it
    /// carries is not known), its recorded function still the one it had.
    pub fn plan_program_failed(
        &self,
        index: GlobalIndex,
        reason: &str,
        since: u64,
    ) -> Result<Vec<Change>, PoolError> {
        let p = self
            .programming
            .get(&index)
            .ok_or(PoolError::NotProgramming(index))?;
        Ok(vec![
            Change::ProgramAbandoned {
                global_index: index,
            },
            Change::Quarantine(crate::quarantine::Quarantine {
                global_index: index,
                location: p.location,
                reason: crate::quarantine::cut(&format!(
                    "re-programming from {} into {} failed: {reason}",
                    p.from, p.to
                )),
                since,
            }),
        ])
    }

    /// Restores persisted functions (at start-up, before the holders): a VF re-programmed
    /// earlier carries its new function and drivers. Those for VFs no longer here are
    /// returned.
    pub fn restore_functions(
        &mut self,
        functions: Vec<(GlobalIndex, FunctionName, Drivers)>,
    ) -> Vec<GlobalIndex> {
        let mut gone = Vec::new();
        for (index, function, drivers) in functions {
            match self.vfs.get_mut(&index) {
                Some(vf) => {
                    vf.function = Some(function);
                    vf.host_driver = Some(drivers.host);
                    vf.guest_driver = Some(drivers.guest);
                }
                None => gone.push(index),
            }
        }
        gone
    }

    /// Restores re-programmings that a crash interrupted (after the holders); those that
    /// clash are returned.
    pub fn restore_programming(&mut self, all: Vec<Programming>) -> Vec<(Programming, String)> {
        let mut rejected = Vec::new();
        for p in all {
            match self.restore_clash(p.global_index, p.location) {
                Some(why) => rejected.push((p, why)),
                None => {
                    self.programming.insert(p.global_index, p);
                }
            }
        }
        rejected
    }

    pub(crate) fn apply_program(&mut self, change: &Change) {
        match change {
            Change::ProgramStart(p) => {
                self.programming.insert(p.global_index, p.clone());
            }
            Change::Programmed {
                global_index,
                function,
                drivers,
            } => {
                self.programming.remove(global_index);
                if let Some(vf) = self.vfs.get_mut(global_index) {
                    vf.function = Some(function.clone());
                    vf.host_driver = Some(drivers.host.clone());
                    vf.guest_driver = Some(drivers.guest.clone());
                }
            }
            Change::ProgramAbandoned { global_index } => {
                self.programming.remove(global_index);
            }
            _ => {}
        }
    }

    pub(crate) fn check_program_invariants(&self) -> Result<(), String> {
        for (gi, p) in &self.programming {
            if *gi != p.global_index {
                return Err(format!(
                    "re-programming keyed {gi} is for VF {}",
                    p.global_index
                ));
            }
            if self.assignment(*gi).is_some()
                || self.kubelet.contains_key(gi)
                || self.quarantine.contains_key(gi)
            {
                return Err(format!("VF {gi} is being re-programmed and held"));
            }
            if self.vf(*gi).is_none_or(|v| v.location != p.location) {
                return Err(format!("re-programmed VF {gi} is not in the pool"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "program_tests.rs"]
mod tests;
