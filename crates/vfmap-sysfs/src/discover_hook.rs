//! Running the cards' `discover` hooks and checking what they print against the profiles.
//!
//! For each PF in the tables whose card names a `discover` hook (`[card.hooks] discover`),
//! [`discover_runs`] runs the hook once (a PF-wide run: no `VFMAP_VF`, `VFMAP_VF_NUMBER` or
//! `VFMAP_FUNCTION`; the card's `deadline_ms`), reads its output
//! ([`vfmap_core::discovered::parse_bytes`]) and compares it with the profile
//! ([`vfmap_core::discovered::compare`]) for the VFs enabled on the PF. Each [`DiscoverRun`]
//! turns into [`Problem`]s ([`DiscoverRun::problems`]: one per disagreement, or one for a run
//! that failed or printed what cannot be read, all on the PF with the attribute
//! [`ATTRIBUTE`]) or into a `vfmap doctor` check per card ([`doctor_checks`]).
//!
//! The runner is a parameter: [`run_hook`](crate::hooks::run_hook) normally, a wrapper that
//! times the run for metrics in the daemon. PFs are run up to [`PARALLEL`] at a time, so a
//! slow hook on one PF does not add its deadline to every other PF's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use vfmap_core::discovered::{self, Disagreement, DiscoverError};
use vfmap_core::profile::{Card, FunctionName, HookPhase};
use vfmap_core::{Bdf, Problem, Profiles, Tables};

use crate::doctor::Check;
use crate::hooks::{HookContext, HookError, HookOutput, Invocation};

/// The attribute of the problems a `discover` check reports (the same as reading T1 from the
/// device reports).
pub use vfmap_core::discovered_apply::ATTRIBUTE;

/// How many PFs' hooks run at the same time.
pub const PARALLEL: usize = 8;

/// What a PF's `discover` hook found, and where it disagrees with the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// VF number → function, as the hook printed it.
    pub found: BTreeMap<u16, FunctionName>,
    /// Where that disagrees with the card's profile (empty: it agrees).
    pub disagreements: Vec<Disagreement>,
}

/// Why a PF's `discover` hook gave nothing to compare.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverFailure {
    /// The hook could not be run, failed, timed out or printed too much.
    #[error("{}", chain(.0))]
    Run(HookError),
    /// The hook exited 0, but its output breaks the format.
    #[error(
        "{context} printed output that cannot be read: {error} (the format is in docs/hooks.md, \
         `discover`)"
    )]
    Output {
        /// The run.
        context: HookContext,
        /// What is wrong with the output.
        error: DiscoverError,
    },
}

/// One PF's `discover` run.
#[derive(Debug)]
pub struct DiscoverRun {
    /// The PF.
    pub pf: Bdf,
    /// Its card's name.
    pub card: String,
    /// The hook.
    pub program: PathBuf,
    /// The VFs enabled on the PF, that the output was compared for.
    pub num_vfs: u16,
    /// The hook's last stderr lines (empty when it failed: the error holds them).
    pub stderr_tail: Vec<String>,
    /// How long the run took.
    pub duration: Duration,
    /// What it found, or why it found nothing.
    pub outcome: Result<Discovered, DiscoverFailure>,
}

impl DiscoverRun {
    /// Which run this is, as hook errors name it: `card C: discover hook P`.
    pub fn context(&self) -> HookContext {
        HookContext {
            card: self.card.clone(),
            phase: HookPhase::Discover,
            program: self.program.clone(),
        }
    }

    /// Whether the hook ran, its output was read, and it agrees with the profile.
    pub fn agrees(&self) -> bool {
        self.outcome
            .as_ref()
            .is_ok_and(|d| d.disagreements.is_empty())
    }

    /// The problems of this run, on the PF: one per disagreement, in [`discovered::compare`]'s
    /// order, or one for the failure; none when the device agrees with the profile.
    pub fn problems(&self) -> Vec<Problem> {
        let problem = |message: String| Problem::new(self.pf.to_string(), ATTRIBUTE, message);
        match &self.outcome {
            Ok(discovered) => {
                let context = self.context();
                discovered
                    .disagreements
                    .iter()
                    .map(|d| problem(format!("{context}: {d}")))
                    .collect()
            }
            Err(failure) => vec![problem(failure.to_string())],
        }
    }
}

/// Runs the `discover` hook of every PF in `tables` whose card (looked up in `profiles` as
/// [`Tables::build`] does) names one, with `run` (normally
/// [`run_hook`](crate::hooks::run_hook)), and compares each output with the profile. Runs
/// are in PF order; PFs without such a card are skipped.
pub fn discover_runs<R>(
    sysfs_root: &Path,
    profiles: &Profiles,
    tables: &Tables,
    run: &R,
) -> Vec<DiscoverRun>
where
    R: Fn(&Invocation<'_>) -> Result<HookOutput, HookError> + Sync,
{
    let jobs: Vec<(Bdf, &Card, PathBuf, Duration, u16)> = tables
        .pfs
        .iter()
        .filter_map(|pf| {
            let card = profiles.card_for(pf.location, pf.vendor?, pf.device?)?;
            let (hook, deadline) = card.hook(HookPhase::Discover, None)?;
            let num_vfs = pf.num_vfs.unwrap_or_else(|| {
                let present = tables.vfs.iter().filter(|v| v.pf == pf.location).count();
                u16::try_from(present).unwrap_or(u16::MAX)
            });
            Some((
                pf.location,
                card,
                hook.as_path().to_owned(),
                deadline,
                num_vfs,
            ))
        })
        .collect();
    let mut runs = Vec::with_capacity(jobs.len());
    for batch in jobs.chunks(PARALLEL) {
        thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|(pf, card, program, deadline, num_vfs)| {
                    scope.spawn(move || {
                        run_one(sysfs_root, *pf, card, program, *deadline, *num_vfs, run)
                    })
                })
                .collect();
            for handle in handles {
                match handle.join() {
                    Ok(one) => runs.push(one),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
    }
    runs
}

/// [`discover_runs`] with [`run_hook`](crate::hooks::run_hook), as problems: what
/// `vfmap inventory` adds to [`Tables::problems`] (the daemon calls [`discover_runs`] itself,
/// to time and log each run).
pub fn discover_problems(sysfs_root: &Path, profiles: &Profiles, tables: &Tables) -> Vec<Problem> {
    discover_runs(sysfs_root, profiles, tables, &crate::hooks::run_hook)
        .iter()
        .flat_map(DiscoverRun::problems)
        .collect()
}

fn run_one<R>(
    sysfs_root: &Path,
    pf: Bdf,
    card: &Card,
    program: &Path,
    deadline: Duration,
    num_vfs: u16,
    run: &R,
) -> DiscoverRun
where
    R: Fn(&Invocation<'_>) -> Result<HookOutput, HookError> + Sync,
{
    let invocation = Invocation {
        program,
        phase: HookPhase::Discover,
        card: &card.name,
        pf,
        vf: None,
        vf_number: None,
        function: None,
        from_function: None,
        sysfs_root,
        deadline,
    };
    let context = HookContext {
        card: card.name.clone(),
        phase: HookPhase::Discover,
        program: program.to_owned(),
    };
    let started = Instant::now();
    let (outcome, stderr_tail, duration) = match run(&invocation) {
        Err(error) => (
            Err(DiscoverFailure::Run(error)),
            Vec::new(),
            started.elapsed(),
        ),
        Ok(output) => {
            let outcome = match discovered::parse_bytes(&output.stdout) {
                Ok(found) => Ok(Discovered {
                    disagreements: discovered::compare(card, num_vfs, &found),
                    found,
                }),
                Err(error) => Err(DiscoverFailure::Output { context, error }),
            };
            (outcome, output.stderr_tail, output.duration)
        }
    };
    DiscoverRun {
        pf,
        card: card.name.clone(),
        program: program.to_owned(),
        num_vfs,
        stderr_tail,
        duration,
        outcome,
    }
}

/// `vfmap doctor`'s `discover:<card>` checks: one per card naming a `discover` hook, over
/// the runs of its PFs. Ok when every PF's device agrees with the profile; an error listing
/// the first problems when one disagrees or its hook failed; a warning when the card covers
/// no PF (nothing was run).
pub fn doctor_checks(profiles: &Profiles, runs: &[DiscoverRun]) -> Vec<Check> {
    let mut checks = Vec::new();
    for card in &profiles.cards {
        if card.hook(HookPhase::Discover, None).is_none()
            || checks.iter().any(|c: &Check| c.name == check_name(card))
        {
            continue;
        }
        let name = check_name(card);
        let mine: Vec<&DiscoverRun> = runs.iter().filter(|r| r.card == card.name).collect();
        if mine.is_empty() {
            checks.push(Check::unchecked(
                name,
                &format!(
                    "card {:?} covers no PF here, so its discover hook was not run",
                    card.name
                ),
                format!("see the card:{} check", card.name),
            ));
            continue;
        }
        let problems: Vec<String> = mine
            .iter()
            .flat_map(|r| r.problems())
            .map(|p| format!("PF {}: {}", p.device, p.message))
            .collect();
        if problems.is_empty() {
            let agreed: Vec<String> = mine
                .iter()
                .map(|r| format!("{} ({} VFs)", r.pf, r.num_vfs))
                .collect();
            checks.push(Check::ok(
                name,
                format!(
                    "the discover hook agrees with the profile on PF {}",
                    agreed.join(", ")
                ),
            ));
            continue;
        }
        let failed = mine.iter().any(|r| r.outcome.is_err());
        let fix = if failed {
            "run the hook by hand with the environment docs/hooks.md gives (Writing a hook) \
             and fix it; its output must be `<vf_number> <function>` lines"
        } else {
            "make the card's vfs lists match the device (or program the VFs), or fix the hook; \
             `vfmap inventory` lists every disagreement"
        };
        checks.push(Check::error(name, first_few(&problems), fix));
    }
    checks
}

fn check_name(card: &Card) -> String {
    format!("discover:{}", card.name)
}

/// The first items of a list, and how many more.
fn first_few(items: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SHOWN {
        text += &format!("; and {} more", items.len() - SHOWN);
    }
    text
}

/// An error and its sources, `: `-joined.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
