//! Re-programming VFs at run time (issue 15): a free VF made to carry another function by its
//! card's `program` hook, when the profile allows it (`programmable_to`). An operator asks
//! for one (`vfmap program`), and an attach that finds too few free VFs of its function
//! re-programs free ones of other functions first.
//!
//! Durable and crash-safe: the start is committed before the hook runs (the VF is out of the
//! pool meanwhile); the new function is committed when the hook succeeded; a failure sends the
//! VF to quarantine; recovery runs the hook of an interrupted re-programming again.

use vfmap_core::program::Drivers;
use vfmap_core::{FunctionName, HolderRef};

use super::*;

/// The drivers of a function, as the profiles define it (`functions`: the tables' summary).
pub(super) fn drivers_of(
    functions: &[FunctionSummary],
    function: &FunctionName,
) -> Option<Drivers> {
    functions
        .iter()
        .find(|f| f.name == *function)
        .map(|f| Drivers {
            host: f.host_driver.clone(),
            guest: f.guest_driver.clone(),
        })
}

impl Engine {
    /// The drivers of a function, as the profiles define it.
    fn drivers_of(&self, function: &FunctionName) -> Option<Drivers> {
        drivers_of(&self.functions, function)
    }

    /// Re-programs free VF `global_index` into `to`, through its card's `program` hook.
    pub async fn program(
        &self,
        global_index: GlobalIndex,
        to: &FunctionName,
    ) -> Result<vfmap_api::Programmed, EngineError> {
        let (location, from) = {
            let state = self.lock();
            let vf = state
                .pool
                .vf(global_index)
                .ok_or(PoolError::UnknownVf(global_index))?;
            let from = vf
                .function
                .clone()
                .ok_or_else(|| PoolError::FunctionConflict {
                    vf: vf.location,
                    problem: "carries no function to re-program".into(),
                })?;
            (vf.location, from)
        };
        let drivers = self
            .drivers_of(to)
            .ok_or_else(|| PoolError::UnknownFunction(to.to_string()))?;
        if from != *to && !self.adapters.host.may_program(location, &from, to) {
            return Err(EngineError::NotProgrammable {
                vf: location,
                from: from.to_string(),
                to: to.to_string(),
            });
        }
        let Some(_claim) = self.claim(global_index) else {
            return Err(PoolError::Taken {
                vf: location,
                by: "another operation on it".into(),
            }
            .into());
        };
        self.commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_program(global_index, to)?)]))
            .await?;
        info!(vf = %location, from = %from, to = %to, "re-programming");
        failpoint("programming");
        self.run_program(global_index, location, &from, to, drivers)
            .await?;
        Ok(vfmap_api::Programmed {
            global_index,
            location,
            from,
            to: to.clone(),
        })
    }

    /// Runs the hook of a started re-programming and commits how it ended.
    async fn run_program(
        &self,
        global_index: GlobalIndex,
        location: Bdf,
        from: &FunctionName,
        to: &FunctionName,
        drivers: Drivers,
    ) -> Result<(), EngineError> {
        let host = self.adapters.host.clone();
        let (from_owned, to_owned) = (from.clone(), to.clone());
        let ran =
            tokio::task::spawn_blocking(move || host.program(location, &from_owned, &to_owned))
                .await
                .unwrap_or(Err(ProgramError::Stopped { vf: location }));
        match ran {
            Ok(()) => {
                self.commit(|s| {
                    Ok(vec![Mutation::Pool(
                        s.pool.plan_programmed(global_index, drivers)?,
                    )])
                })
                .await?;
                info!(vf = %location, function = %to, "re-programmed");
                Ok(())
            }
            Err(e) => {
                let reason = chain(&e);
                self.commit(|s| {
                    Ok(s.pool
                        .plan_program_failed(global_index, &reason, crate::store::now())?
                        .into_iter()
                        .map(Mutation::Pool)
                        .collect())
                })
                .await?;
                warn!(vf = %location, from = %from, to = %to, error = %reason, "re-programming failed; the VF is quarantined");
                Err(EngineError::ProgramFailed {
                    vf: location,
                    reason,
                })
            }
        }
    }

    /// For an attach whose reservation found too few free VFs of its function: re-programs
    /// free VFs of other functions that the profile allows into it (lowest global index first),
    /// as many as are missing. `Ok(false)` when there are too few of those: nothing is done,
    /// and the reservation's error stands.
    pub(super) async fn program_for(&self, request: &Request) -> Result<bool, EngineError> {
        let Ok(wanted) = FunctionName::new(&request.function) else {
            return Ok(false);
        };
        let candidates: Vec<(GlobalIndex, Bdf, FunctionName)> = {
            let state = self.lock();
            let matches = |v: &vfmap_core::PoolVf| {
                request.numa_node.is_none_or(|n| v.numa_node == Some(n))
                    && request.pf.is_none_or(|pf| v.pf == pf)
                    && state.pool.holder(v.global_index) == HolderRef::Free
            };
            let free = state
                .pool
                .vfs()
                .filter(|v| matches(v) && v.function.as_ref() == Some(&wanted))
                .count();
            let missing = (request.count as usize).saturating_sub(free);
            if missing == 0 {
                return Ok(false);
            }
            let candidates: Vec<_> = state
                .pool
                .vfs()
                .filter(|v| matches(v))
                .filter_map(|v| {
                    let from = v.function.clone()?;
                    (from != wanted && self.adapters.host.may_program(v.location, &from, &wanted))
                        .then_some((v.global_index, v.location, from))
                })
                .take(missing)
                .collect();
            if candidates.len() < missing {
                return Ok(false);
            }
            candidates
        };
        for (global_index, location, from) in candidates {
            info!(vf = %location, from = %from, to = %wanted, vm = %request.vm, "re-programming for an attach");
            self.program(global_index, &wanted).await?;
        }
        Ok(true)
    }

    /// After a restart: re-programmings a crash interrupted run their hook again (hooks are
    /// idempotent), ending in the new function or in quarantine.
    pub(super) async fn recover_programming(&self) {
        let interrupted: Vec<vfmap_core::program::Programming> =
            self.lock().pool.programming().cloned().collect();
        for p in interrupted {
            info!(vf = %p.location, from = %p.from, to = %p.to, "recovery: finishing a re-programming");
            let result = match self.drivers_of(&p.to) {
                Some(drivers) => {
                    self.run_program(p.global_index, p.location, &p.from, &p.to, drivers)
                        .await
                }
                None => {
                    let reason = format!("function {} is no longer in the profiles", p.to);
                    self.commit(|s| {
                        Ok(s.pool
                            .plan_program_failed(p.global_index, &reason, crate::store::now())?
                            .into_iter()
                            .map(Mutation::Pool)
                            .collect())
                    })
                    .await
                    .map(|_| ())
                }
            };
            if let Err(e) = result {
                warn!(vf = %p.location, error = %chain(&e), "finishing a re-programming failed");
            }
        }
    }
}
