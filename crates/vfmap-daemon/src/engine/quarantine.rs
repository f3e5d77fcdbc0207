//! The operator's side of quarantine: list the VFs whose scrub failed, and clear one (after
//! scrubbing it again, unless forced).

use super::*;

impl Engine {
    /// The quarantined VFs, by global index.
    pub fn quarantined(&self) -> Vec<vfmap_api::QuarantinedVf> {
        let state = self.lock();
        state
            .pool
            .quarantined()
            .map(|q| vfmap_api::QuarantinedVf {
                global_index: q.global_index,
                location: q.location,
                function: state
                    .pool
                    .vf(q.global_index)
                    .and_then(|v| v.function.clone()),
                reason: q.reason.clone(),
                since: q.since,
            })
            .collect()
    }

    /// Returns a quarantined VF to the pool. Unless `force`, it is reset and scrubbed again
    /// first, and stays quarantined (with the new reason in the error) when that fails.
    pub async fn clear_quarantine(
        &self,
        global_index: GlobalIndex,
        force: bool,
    ) -> Result<vfmap_api::Cleared, EngineError> {
        let location = self
            .lock()
            .pool
            .quarantine_of(global_index)
            .map(|q| q.location)
            .ok_or(PoolError::NotQuarantined(global_index))?;
        // Another clear of it (or a release) runs now: a conflict, not a verdict on the VF.
        let Some(_claim) = self.claim(global_index) else {
            return Err(PoolError::Taken {
                vf: location,
                by: "another clear of it, running now".into(),
            }
            .into());
        };
        if !force {
            self.scrub(global_index, location)
                .await
                .map_err(|reason| EngineError::StillDirty {
                    vf: location,
                    reason,
                })?;
        }
        self.commit(|s| {
            Ok(vec![Mutation::Pool(
                s.pool.plan_clear_quarantine(global_index)?,
            )])
        })
        .await?;
        info!(vf = %location, force, "quarantine cleared; VF free");
        Ok(vfmap_api::Cleared {
            global_index,
            location,
            scrubbed: !force,
        })
    }
}
