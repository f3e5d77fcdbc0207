//! Executing `prepare`: the planner decides, this module writes, runs the cards' `bring_up`
//! hooks and verifies.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use vfmap_core::plan::plan_bring_ups;
use vfmap_core::{Bdf, DriverName, PlanError, Profiles, Step, Tables, plan_binds, plan_sriov};

use crate::hooks::{HookError, HookOutput, HookPhase, Invocation, run_hook};
use crate::{SysfsError, discover::Sysfs};

/// Writes sysfs attributes. The real one writes files; a test double can emulate the kernel.
pub trait SysfsWriter {
    /// Writes `value` to the attribute at `path` in one `write(2)`, as sysfs expects.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
}

/// Writes to the real files (normally under `/sys`).
#[derive(Debug, Default, Clone, Copy)]
pub struct FileWriter;

impl SysfsWriter for FileWriter {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        // No create, no truncate: sysfs attributes exist or the write is wrong.
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.write_all(value.as_bytes())
    }
}

/// Loads kernel modules.
pub trait ModuleLoader {
    /// Loads `module` (and its dependencies); the error is a one-line reason.
    fn load(&self, module: &DriverName) -> Result<(), String>;
}

/// Runs `modprobe` from `PATH`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Modprobe;

impl ModuleLoader for Modprobe {
    fn load(&self, module: &DriverName) -> Result<(), String> {
        // DriverName admits no leading '-', so it cannot be taken for an option.
        let output = Command::new("modprobe")
            .arg(module.as_str())
            .output()
            .map_err(|e| format!("cannot run modprobe: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(format!(
                "modprobe {module} failed ({}): {}",
                output.status,
                stderr.trim()
            ))
        }
    }
}

/// Runs a card's hook for `prepare` (its `bring_up` hooks). The real one is [`RunHooks`]; a
/// closure taking an [`Invocation`] is one too, so a caller can log or time each run around
/// [`run_hook`], and a test can record the runs.
pub trait HookRunner {
    /// Runs the hook `invocation` names, as [`run_hook`] does.
    fn run(&self, invocation: &Invocation<'_>) -> Result<HookOutput, HookError>;
}

/// Runs hooks with [`run_hook`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RunHooks;

impl HookRunner for RunHooks {
    fn run(&self, invocation: &Invocation<'_>) -> Result<HookOutput, HookError> {
        run_hook(invocation)
    }
}

impl<F> HookRunner for F
where
    F: Fn(&Invocation<'_>) -> Result<HookOutput, HookError>,
{
    fn run(&self, invocation: &Invocation<'_>) -> Result<HookOutput, HookError> {
        self(invocation)
    }
}

/// Why `prepare` stopped.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The planner refused; nothing was written.
    #[error("refusing to prepare; nothing was changed: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Refused(Vec<PlanError>),
    /// Discovery failed.
    #[error(transparent)]
    Discover(#[from] SysfsError),
    /// A sysfs write failed.
    #[error("{step}: cannot write {value:?} to {}", path.display())]
    Write {
        /// The step being executed.
        step: Step,
        /// The attribute.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The driver is not registered and loading its module did not register it.
    #[error("{step}: driver {driver} is not available: {reason}")]
    DriverUnavailable {
        /// The step being executed.
        step: Step,
        /// The driver.
        driver: DriverName,
        /// Why.
        reason: String,
    },
    /// After the writes, the VF is not bound to the driver wanted.
    #[error(
        "{step}: after probing, {vf} is bound to {}, not {driver}; see `dmesg` for the driver's reason (for vfio-pci: is the IOMMU on and the VF in an IOMMU group?)",
        found.as_deref().unwrap_or("no driver")
    )]
    BindNotEffective {
        /// The step being executed.
        step: Step,
        /// The VF.
        vf: Bdf,
        /// The driver wanted.
        driver: DriverName,
        /// The driver found.
        found: Option<String>,
    },
    /// A VF's `bring_up` hook failed (or could not be run). The VFs brought up before it stay
    /// so; no VF was bound to its host driver, so none is offered. The hook's error (card,
    /// hook, exit status, last stderr lines) is the source.
    #[error(
        "{step}: the VF was not brought up, so prepare stopped before binding any VF to its host driver"
    )]
    BringUp {
        /// The step being executed.
        step: Step,
        /// The card.
        card: String,
        /// The VF.
        vf: Bdf,
        /// The hook's error.
        #[source]
        source: Box<HookError>,
    },
    /// After writing `sriov_numvfs`, the PF does not have the VFs wanted.
    #[error("{step}: the PF reports {found} VFs afterwards")]
    NumVfsNotEffective {
        /// The step being executed.
        step: Step,
        /// VFs found.
        found: String,
    },
}

/// What `prepare` did.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    /// Every step executed, in order; empty when the host already matched.
    pub steps: Vec<Step>,
    /// The tables after the changes.
    pub tables: Tables,
}

/// Makes the host under `sysfs` match `profiles`: disables autoprobe, sets VF counts, runs
/// each VF's `bring_up` hook (with [`RunHooks`]), binds each VF with a function to its host
/// driver, and verifies. `on_step` hears each step before it runs. See [`prepare_with_hooks`].
pub fn prepare(
    sysfs: &Sysfs,
    profiles: &Profiles,
    writer: &dyn SysfsWriter,
    loader: &dyn ModuleLoader,
    settle: Duration,
    on_step: &mut dyn FnMut(&Step),
) -> Result<PrepareReport, PrepareError> {
    prepare_with_hooks(sysfs, profiles, writer, loader, &RunHooks, settle, on_step)
}

/// [`prepare`] with the hooks run by `hooks`.
///
/// The order: the SR-IOV steps (the VFs exist afterwards), then every VF's `bring_up` hook,
/// VF by VF in order (by PF, then VF number; [`Step::BringUp`]), then the host-driver binds:
/// no VF is bound, hence offered, before every hook ran. The hooks run at every call (a
/// daemon's every start), since vfmap cannot see whether a card's bring-up is done: they must
/// be idempotent. A failing hook stops `prepare` there ([`PrepareError::BringUp`]); the VFs
/// brought up before it stay so.
pub fn prepare_with_hooks(
    sysfs: &Sysfs,
    profiles: &Profiles,
    writer: &dyn SysfsWriter,
    loader: &dyn ModuleLoader,
    hooks: &dyn HookRunner,
    settle: Duration,
    on_step: &mut dyn FnMut(&Step),
) -> Result<PrepareReport, PrepareError> {
    let executor = Executor {
        sysfs,
        writer,
        loader,
        hooks,
        settle,
    };
    let mut done = Vec::new();

    let facts = sysfs.discover()?;
    let sriov_steps = plan_sriov(&facts, profiles).map_err(PrepareError::Refused)?;
    for step in sriov_steps {
        on_step(&step);
        executor.run(&step)?;
        done.push(step);
    }

    // Discovery is most of a daemon's start on a big host: read the host again only when
    // creating VFs changed it.
    let facts = if done.is_empty() {
        facts
    } else {
        sysfs.discover()?
    };
    let tables = Tables::build(&facts, profiles);
    for step in plan_bring_ups(&tables, profiles)
        .into_iter()
        .chain(plan_binds(&tables))
    {
        on_step(&step);
        executor.run(&step)?;
        done.push(step);
    }

    // Hooks write nothing vfmap reads back: read the host again only after its own writes.
    let tables = if done.iter().all(Step::is_hook) {
        tables
    } else {
        Tables::build(&sysfs.discover()?, profiles)
    };
    Ok(PrepareReport {
        steps: done,
        tables,
    })
}

/// Binds one VF to `driver` unless it already is, and pins `driver_override` (the daemon's
/// host-bind step; `prepare` does the same for every VF).
pub fn ensure_bound(
    sysfs: &Sysfs,
    writer: &dyn SysfsWriter,
    loader: &dyn ModuleLoader,
    vf: Bdf,
    driver: &DriverName,
    settle: Duration,
) -> Result<(), PrepareError> {
    let executor = Executor {
        sysfs,
        writer,
        loader,
        hooks: &RunHooks,
        settle,
    };
    let bound = sysfs.driver_of(vf).ok().flatten();
    if bound.as_deref() == Some(driver.as_str()) {
        return Ok(());
    }
    executor.run(&Step::Bind {
        vf,
        driver: driver.clone(),
        unbind_from: bound,
    })
}

/// Resets one function through its `reset` attribute. `Ok(false)` when the device offers no
/// reset method (the kernel then has no `reset` attribute).
pub fn reset_function(sysfs: &Sysfs, writer: &dyn SysfsWriter, vf: Bdf) -> io::Result<bool> {
    let path = sysfs.device_dir(vf).join("reset");
    if !path.exists() {
        return Ok(false);
    }
    writer.write(&path, "1").map(|()| true)
}

struct Executor<'a> {
    sysfs: &'a Sysfs,
    writer: &'a dyn SysfsWriter,
    loader: &'a dyn ModuleLoader,
    hooks: &'a dyn HookRunner,
    settle: Duration,
}

impl Executor<'_> {
    fn write(&self, step: &Step, path: PathBuf, value: &str) -> Result<(), PrepareError> {
        self.writer
            .write(&path, value)
            .map_err(|source| PrepareError::Write {
                step: step.clone(),
                path,
                value: value.to_owned(),
                source,
            })
    }

    fn run(&self, step: &Step) -> Result<(), PrepareError> {
        match step {
            Step::DisableAutoprobe { pf } => self.write(
                step,
                self.sysfs.device_dir(*pf).join("sriov_drivers_autoprobe"),
                "0",
            ),
            Step::SetNumVfs { pf, from, to } => {
                let path = self.sysfs.device_dir(*pf).join("sriov_numvfs");
                // The kernel refuses to change a non-zero count except through 0.
                if *from != 0 {
                    self.write(step, path.clone(), "0")?;
                }
                if *to != 0 {
                    self.write(step, path.clone(), &to.to_string())?;
                }
                let found = std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_owned())
                    .unwrap_or_else(|e| format!("unreadable ({e})"));
                if found != to.to_string() {
                    return Err(PrepareError::NumVfsNotEffective {
                        step: step.clone(),
                        found,
                    });
                }
                Ok(())
            }
            Step::Bind {
                vf,
                driver,
                unbind_from,
            } => {
                self.ensure_driver(step, driver)?;
                let dir = self.sysfs.device_dir(*vf);
                self.write(step, dir.join("driver_override"), driver.as_str())?;
                if let Some(old) = unbind_from {
                    let unbind = self.sysfs.driver_dir(old).join("unbind");
                    self.write(step, unbind, &vf.to_string())?;
                }
                self.write(step, self.sysfs.drivers_probe(), &vf.to_string())?;
                self.verify_bound(step, *vf, driver)
            }
            Step::PinOverride { vf, driver } => self.write(
                step,
                self.sysfs.device_dir(*vf).join("driver_override"),
                driver.as_str(),
            ),
            Step::BringUp(run) => {
                let invocation = Invocation {
                    program: &run.hook,
                    phase: HookPhase::BringUp,
                    card: &run.card,
                    pf: run.pf,
                    vf: Some(run.vf),
                    vf_number: Some(run.vf_number),
                    function: run.function.as_ref().map(|f| f.as_str()),
                    from_function: None,
                    sysfs_root: self.sysfs.root(),
                    deadline: Duration::from_millis(run.deadline_ms),
                };
                match self.hooks.run(&invocation) {
                    Ok(_) => Ok(()),
                    Err(source) => Err(PrepareError::BringUp {
                        step: step.clone(),
                        card: run.card.clone(),
                        vf: run.vf,
                        source: Box::new(source),
                    }),
                }
            }
        }
    }

    /// Loads the driver's module when the driver is not registered yet.
    fn ensure_driver(&self, step: &Step, driver: &DriverName) -> Result<(), PrepareError> {
        if self.sysfs.driver_dir(driver.as_str()).is_dir() {
            return Ok(());
        }
        let unavailable = |reason: String| PrepareError::DriverUnavailable {
            step: step.clone(),
            driver: driver.clone(),
            reason,
        };
        self.loader.load(driver).map_err(unavailable)?;
        if self.sysfs.driver_dir(driver.as_str()).is_dir() {
            Ok(())
        } else {
            Err(unavailable(format!(
                "module {driver} loaded, but no PCI driver named {driver} appeared in {}",
                self.sysfs.root().join("bus/pci/drivers").display()
            )))
        }
    }

    /// Some drivers probe asynchronously: poll the binding until `settle` runs out. If another
    /// driver took the device meanwhile (the ID-matched driver's own asynchronous probe, racing
    /// ours), unbind it and probe again: `driver_override` is set, so the wanted one wins.
    fn verify_bound(&self, step: &Step, vf: Bdf, driver: &DriverName) -> Result<(), PrepareError> {
        let deadline = Instant::now() + self.settle;
        loop {
            let found = self.sysfs.driver_of(vf).ok().flatten();
            if found.as_deref() == Some(driver.as_str()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PrepareError::BindNotEffective {
                    step: step.clone(),
                    vf,
                    driver: driver.clone(),
                    found,
                });
            }
            if let Some(other) = found {
                let unbind = self.sysfs.driver_dir(&other).join("unbind");
                // Best effort: the other driver may be gone already; the next poll tells.
                let _ = self.writer.write(&unbind, &vf.to_string());
                let _ = self
                    .writer
                    .write(&self.sysfs.drivers_probe(), &vf.to_string());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}
