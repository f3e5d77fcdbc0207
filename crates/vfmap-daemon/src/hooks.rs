//! Card hooks on the daemon's side (`docs/hooks.md`): which card, PF and VF number a VF is,
//! which hook its card gives for a phase, and the run itself (through `vfmap_sysfs::hooks`),
//! logged and timed (`vfmap_hook_duration_seconds`).
//!
//! Only cards that name hooks are kept, so a host without hooks pays nothing per VF.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};
use vfmap_core::profile::{Card, HookPhase};
use vfmap_core::{Bdf, FunctionName, Profiles, Tables};
use vfmap_sysfs::hooks::{HookError, HookOutput, Invocation, run_hook};

use crate::metrics::Metrics;

/// Where a VF of a card with hooks sits.
#[derive(Debug, Clone, Copy)]
struct Place {
    card: usize,
    pf: Bdf,
    vf_number: u16,
}

/// The hooks of the host's cards, by VF.
#[derive(Debug, Default)]
pub struct CardHooks {
    cards: Vec<Card>,
    vfs: HashMap<Bdf, Place>,
    sysfs_root: PathBuf,
    metrics: Arc<Metrics>,
}

impl CardHooks {
    /// The hooks of `profiles`' cards for the VFs of `tables`.
    pub fn new(
        profiles: &Profiles,
        tables: &Tables,
        sysfs_root: PathBuf,
        metrics: Arc<Metrics>,
    ) -> CardHooks {
        let with_hooks: Vec<&Card> = profiles
            .cards
            .iter()
            .filter(|c| !c.hooks.is_empty() || c.functions.iter().any(|f| !f.hooks.is_empty()))
            .collect();
        let vfs = tables
            .vfs
            .iter()
            .filter_map(|v| {
                let card = with_hooks
                    .iter()
                    .position(|c| v.card.as_deref() == Some(c.name.as_str()))?;
                Some((
                    v.location,
                    Place {
                        card,
                        pf: v.pf,
                        vf_number: v.vf_index,
                    },
                ))
            })
            .collect();
        CardHooks {
            cards: with_hooks.into_iter().cloned().collect(),
            vfs,
            sysfs_root,
            metrics,
        }
    }

    /// Whether VF `vf`'s card lets a VF carrying `from` become `to` (`programmable_to`).
    pub fn may_program(&self, vf: Bdf, from: &FunctionName, to: &FunctionName) -> bool {
        self.vfs
            .get(&vf)
            .is_some_and(|p| self.cards[p.card].may_program(from.as_str(), to.as_str()))
    }

    /// Runs `phase`'s hook for VF `vf` (`function`: what it carries, or for `program` what it
    /// becomes; `from`: for `program`, what it carried). `Ok(false)` when its card gives no
    /// such hook.
    pub fn run_for_vf(
        &self,
        phase: HookPhase,
        vf: Bdf,
        function: Option<&FunctionName>,
        from: Option<&FunctionName>,
    ) -> Result<bool, HookError> {
        let Some(place) = self.vfs.get(&vf) else {
            return Ok(false);
        };
        let card = &self.cards[place.card];
        let Some((program, deadline)) = card.hook(phase, function.map(FunctionName::as_str)) else {
            return Ok(false);
        };
        let invocation = Invocation {
            program: program.as_path(),
            phase,
            card: &card.name,
            pf: place.pf,
            vf: Some(vf),
            vf_number: Some(place.vf_number),
            function: function.map(FunctionName::as_str),
            from_function: from.map(FunctionName::as_str),
            sysfs_root: &self.sysfs_root,
            deadline,
        };
        run_logged(&self.metrics, &invocation).map(|_| true)
    }
}

/// Runs a hook: its stderr lines and how it ended go to the log (with the card, phase and VF
/// or PF), its duration to `vfmap_hook_duration_seconds`. Every hook the daemon runs goes
/// through here (prepare's `bring_up`, the start's `discover`, `program` and `scrub`).
pub fn run_logged(metrics: &Metrics, inv: &Invocation<'_>) -> Result<HookOutput, HookError> {
    let started = Instant::now();
    let result = run_hook(inv);
    let took = started.elapsed();
    metrics.hook_ran(inv.phase.as_str(), result.is_ok(), took);
    let (card, phase) = (inv.card, inv.phase);
    let place = inv.vf.unwrap_or(inv.pf);
    match &result {
        Ok(output) => {
            for line in &output.stderr_tail {
                info!(card = %card, phase = %phase, vf = %place, "hook: {line}");
            }
            info!(card = %card, phase = %phase, vf = %place, ms = took.as_millis() as u64, "hook done");
        }
        Err(e) => warn!(card = %card, phase = %phase, vf = %place, error = %e, "hook failed"),
    }
    result
}
