//! The daemon's side effects, each behind a small trait so tests can put doubles in.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use vfmap_api::NewVm;
use vfmap_core::profile::HookPhase;
use vfmap_core::protocol::{Answer, Entry, GuestPath};
use vfmap_core::{Bdf, DriverName, FunctionName, SlotId, VmSpec};

/// A boxed future, so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Hypervisor failures, with what an operator needs to fix them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypervisorError {
    /// Nothing listens on the control socket (missing, or connection refused): the VM is not
    /// running, so nothing can be plugged in it.
    #[error("the VM is not running: nothing listens on {socket} ({reason})")]
    NotRunning {
        /// The socket path.
        socket: String,
        /// Why.
        reason: String,
    },
    /// The control socket cannot be used for another reason (e.g. permissions); the VM may be
    /// running.
    #[error(
        "cannot reach the hypervisor at {socket}: {reason} (is the VM running with -qmp unix:{socket},server=on,wait=off?)"
    )]
    Unreachable {
        /// The socket path.
        socket: String,
        /// Why.
        reason: String,
    },
    /// The slot id is not a bus of the VM.
    #[error(
        "slot {slot} does not exist in the VM (expected an empty pcie-root-port with id={slot})"
    )]
    SlotUnknown {
        /// The slot.
        slot: String,
    },
    /// Something already sits in the slot.
    #[error("slot {slot} is occupied: {detail}")]
    SlotOccupied {
        /// The slot.
        slot: String,
        /// The hypervisor's words.
        detail: String,
    },
    /// The hypervisor refused the command, with its own error class.
    #[error("the hypervisor refused ({class}): {desc}")]
    Refused {
        /// The hypervisor's error class (QMP's `class`, e.g. `GenericError`).
        class: String,
        /// Its description.
        desc: String,
    },
    /// The hypervisor said something this adapter does not understand.
    #[error("unexpected answer from the hypervisor: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("the hypervisor did not answer within {0:?}")]
    Timeout(Duration),
    /// The libvirt domain exists but is not running.
    #[error("the VM is not running: libvirt domain {domain:?} is {state}")]
    DomainInactive {
        /// The domain.
        domain: String,
        /// Its state as libvirt says it (`shut off`, …).
        state: String,
    },
    /// libvirt knows no domain of that name.
    #[error("libvirt ({uri}) has no domain {domain:?} (see `virsh --connect {uri} list --all`)")]
    UnknownDomain {
        /// The domain.
        domain: String,
        /// The connection URI.
        uri: String,
    },
    /// The VM lacks something vfmap needs (a free hot-pluggable root port, the agent's
    /// channel); the message names it and the fix.
    #[error("{0}")]
    NotPrepared(String),
    /// The VM's backend is not one this daemon drives.
    #[error("this daemon has no {0} backend")]
    Unsupported(&'static str),
}

/// What a VM's manager (libvirt) says of a VM that is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Stopped (shut down, crashed, destroyed): it holds nothing until it starts again.
    Stopped,
    /// No longer defined: it will not come back.
    Undefined,
}

impl HypervisorError {
    /// Whether the VM is certainly not running (so it holds no device).
    pub fn is_not_running(&self) -> bool {
        matches!(
            self,
            HypervisorError::NotRunning { .. }
                | HypervisorError::DomainInactive { .. }
                | HypervisorError::UnknownDomain { .. }
        )
    }

    /// The VM's state when its manager reported it stopped or undefined; `None` otherwise,
    /// including for a QEMU whose QMP socket is gone (nothing manages it: it may be
    /// restarted by hand with its devices, so vfmap waits for an operator there).
    pub fn lifecycle(&self) -> Option<Lifecycle> {
        match self {
            HypervisorError::DomainInactive { .. } => Some(Lifecycle::Stopped),
            HypervisorError::UnknownDomain { .. } => Some(Lifecycle::Undefined),
            _ => None,
        }
    }
}

/// Plugs VFs into VMs and unplugs them.
pub trait Hypervisor: Send + Sync {
    /// Plugs VF `vf` into `slot` of `vm` as device `device_id`; returns where it sits.
    fn attach<'a>(
        &'a self,
        vm: &'a VmSpec,
        slot: &'a SlotId,
        device_id: &'a str,
        vf: Bdf,
    ) -> BoxFuture<'a, Result<GuestPath, HypervisorError>>;

    /// Unplugs device `device_id` and waits until it is gone. Already gone is success.
    fn detach<'a>(
        &'a self,
        vm: &'a VmSpec,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<(), HypervisorError>>;

    /// The ids of every device plugged in `vm` now.
    fn plugged<'a>(&'a self, vm: &'a VmSpec)
    -> BoxFuture<'a, Result<Vec<String>, HypervisorError>>;

    /// Completes a registration into the spec that is stored. A QMP VM needs no look-up (the
    /// default); the libvirt adapter reads the domain's live XML for its slots and agent
    /// socket. Nothing is registered when this fails.
    fn register<'a>(
        &'a self,
        request: &'a NewVm,
    ) -> BoxFuture<'a, Result<VmSpec, HypervisorError>> {
        Box::pin(async move {
            request
                .qmp_spec()
                .ok_or(HypervisorError::Unsupported("libvirt"))
        })
    }

    /// The backends served (`VmBackend::kind`), the `backend` labels of the attach and detach
    /// metrics. Test doubles stand in for QMP and keep this default.
    fn backends(&self) -> &'static [&'static str] {
        &["qmp"]
    }
}

/// Guest channel failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The VM's channel socket is missing or refuses connections.
    #[error("cannot reach the guest channel at {socket}: {reason}")]
    Unreachable {
        /// The socket.
        socket: String,
        /// Why.
        reason: String,
    },
    /// No answer from the agent in time.
    #[error("the guest agent did not answer within {0:?} (is vfmap-agent running in the VM?)")]
    Timeout(Duration),
    /// The connection broke.
    #[error("the guest channel failed: {0}")]
    Io(String),
}

/// Sends a VM its correspondence and collects the agent's answers.
pub trait GuestChannel: Send + Sync {
    /// Sends the VM's whole current correspondence; returns the agent's answers (only for
    /// entries that were sent), or fails after `deadline`.
    fn apply<'a>(
        &'a self,
        vm: &'a VmSpec,
        entries: Vec<Entry>,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<Vec<Answer>, ChannelError>>;

    /// Keep a connection to this VM's agent, to re-send the correspondence when it (re)connects.
    fn watch(&self, _vm: &VmSpec) {}

    /// Stop watching a VM (it was removed).
    fn forget(&self, _vm: &str) {}
}

/// Host-side VF failures.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Binding the VF to its host driver failed.
    #[error("binding {vf} to {driver} failed")]
    Bind {
        /// The VF.
        vf: Bdf,
        /// The driver.
        driver: DriverName,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The function-level reset failed.
    #[error("resetting {vf} failed")]
    Reset {
        /// The VF.
        vf: Bdf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The blocking task running the operation stopped (it panicked or was cancelled).
    #[error("the host operation on {vf} stopped unexpectedly")]
    Stopped {
        /// The VF.
        vf: Bdf,
    },
}

/// Why a VF's re-programming failed: it goes to quarantine.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// Its card names no `program` hook for the function.
    #[error("its card names no `program` hook for {to}")]
    NoHook {
        /// The function asked for.
        to: FunctionName,
    },
    /// The hook failed.
    #[error(transparent)]
    Hook(#[from] vfmap_sysfs::hooks::HookError),
    /// The blocking task running the hook stopped.
    #[error("the re-programming of {vf} stopped unexpectedly")]
    Stopped {
        /// The VF.
        vf: Bdf,
    },
}

/// Why a released VF is not clean: it goes to quarantine instead of back to the pool.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    /// Its config space, read after the reset, is not in the reset state (or unreadable).
    #[error("the config space check after the reset failed: {0}")]
    NotReset(String),
    /// The card's own wipe (its `scrub` hook) failed.
    #[error(transparent)]
    Hook(#[from] vfmap_sysfs::hooks::HookError),
    /// The blocking task running the scrub stopped.
    #[error("the scrub of {vf} stopped unexpectedly")]
    Stopped {
        /// The VF.
        vf: Bdf,
    },
}

/// Host-side VF operations (sysfs).
pub trait HostVfs: Send + Sync {
    /// Binds the VF to its host driver (normally vfio-pci) unless it already is.
    fn bind(&self, vf: Bdf, driver: &DriverName) -> Result<(), HostError>;
    /// Resets the VF so the next VM gets it clean; `Ok(false)` when it has no reset method.
    fn reset(&self, vf: Bdf) -> Result<bool, HostError>;
    /// The VF's IOMMU group (what a container opens as `/dev/vfio/<group>`); `None` when the
    /// host has none for it (no IOMMU) or cannot tell.
    fn iommu_group(&self, _vf: Bdf) -> Option<u32> {
        None
    }
    /// The processes that have the VF's `/dev/vfio/<group>` open (a container still using
    /// it): a VF must not be reset under them. Empty when none, or when it cannot tell.
    fn group_users(&self, _vf: Bdf) -> Vec<u32> {
        Vec::new()
    }
    /// After a released VF's reset: checks its config space is back in the reset state, then
    /// runs its card's `scrub` hook, if any, for `function` (what it carried). Doubles that
    /// model no device are clean.
    fn scrub(&self, _vf: Bdf, _function: Option<&FunctionName>) -> Result<(), ScrubError> {
        Ok(())
    }
    /// Whether the VF's card lets a VF carrying `from` be re-programmed into `to` (the
    /// profile's `programmable_to`). Doubles that model no card allow nothing.
    fn may_program(&self, _vf: Bdf, _from: &FunctionName, _to: &FunctionName) -> bool {
        false
    }
    /// Runs the VF's card's `program` hook to make it carry `to`.
    fn program(
        &self,
        _vf: Bdf,
        _from: &FunctionName,
        to: &FunctionName,
    ) -> Result<(), ProgramError> {
        Err(ProgramError::NoHook { to: to.clone() })
    }
}

/// The pids under `proc_root` (normally `/proc`) with an open file descriptor on
/// `/dev/vfio/<group>`, sorted. Processes whose descriptors cannot be read (another user's,
/// without the privilege) are not seen.
pub fn vfio_group_users(proc_root: &std::path::Path, group: u32) -> Vec<u32> {
    let target = std::path::PathBuf::from(format!("/dev/vfio/{group}"));
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut users: Vec<u32> = entries
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .filter(|(_, dir)| {
            std::fs::read_dir(dir.join("fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == target))
            })
        })
        .map(|(pid, _)| pid)
        .collect();
    users.sort_unstable();
    users
}

/// The real host: the sysfs tree the daemon was configured with.
#[derive(Debug, Clone)]
pub struct SysfsHost {
    /// The tree.
    pub sysfs: vfmap_sysfs::Sysfs,
    /// How long a bind may take to show.
    pub settle: Duration,
    /// The cards' hooks.
    pub hooks: Arc<crate::hooks::CardHooks>,
}

impl HostVfs for SysfsHost {
    fn bind(&self, vf: Bdf, driver: &DriverName) -> Result<(), HostError> {
        vfmap_sysfs::ensure_bound(
            &self.sysfs,
            &vfmap_sysfs::FileWriter,
            &vfmap_sysfs::Modprobe,
            vf,
            driver,
            self.settle,
        )
        .map_err(|e| HostError::Bind {
            vf,
            driver: driver.clone(),
            source: Box::new(e),
        })
    }

    fn reset(&self, vf: Bdf) -> Result<bool, HostError> {
        vfmap_sysfs::reset_function(&self.sysfs, &vfmap_sysfs::FileWriter, vf)
            .map_err(|source| HostError::Reset { vf, source })
    }

    fn iommu_group(&self, vf: Bdf) -> Option<u32> {
        let link = self
            .sysfs
            .root()
            .join("bus/pci/devices")
            .join(vf.to_string())
            .join("iommu_group");
        std::fs::read_link(link)
            .ok()?
            .file_name()?
            .to_str()?
            .parse()
            .ok()
    }

    fn group_users(&self, vf: Bdf) -> Vec<u32> {
        match self.iommu_group(vf) {
            Some(group) => vfio_group_users(std::path::Path::new("/proc"), group),
            None => Vec::new(),
        }
    }

    fn scrub(&self, vf: Bdf, function: Option<&FunctionName>) -> Result<(), ScrubError> {
        vfmap_sysfs::verify_reset_state(&self.sysfs, vf)
            .map_err(|e| ScrubError::NotReset(e.to_string()))?;
        self.hooks
            .run_for_vf(HookPhase::Scrub, vf, function, None)?;
        Ok(())
    }

    fn may_program(&self, vf: Bdf, from: &FunctionName, to: &FunctionName) -> bool {
        self.hooks.may_program(vf, from, to)
    }

    fn program(&self, vf: Bdf, from: &FunctionName, to: &FunctionName) -> Result<(), ProgramError> {
        if self
            .hooks
            .run_for_vf(HookPhase::Program, vf, Some(to), Some(from))?
        {
            Ok(())
        } else {
            Err(ProgramError::NoHook { to: to.clone() })
        }
    }
}

/// An error with its causes, `outer: cause: cause`, for logs and API messages.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn vfio_group_users_reads_open_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path();
        for (pid, fd, target) in [
            ("12", "4", "/dev/vfio/7"),
            ("12", "5", "/dev/null"),
            ("30", "9", "/dev/vfio/7"),
            ("31", "3", "/dev/vfio/70"),
            ("self", "3", "/dev/vfio/7"),
        ] {
            let fds = proc_root.join(pid).join("fd");
            std::fs::create_dir_all(&fds).unwrap();
            std::os::unix::fs::symlink(target, fds.join(fd)).unwrap();
        }
        std::fs::create_dir_all(proc_root.join("40")).unwrap();
        assert_eq!(super::vfio_group_users(proc_root, 7), [12, 30]);
        assert_eq!(super::vfio_group_users(proc_root, 8), [] as [u32; 0]);
        assert!(super::vfio_group_users(&proc_root.join("none"), 7).is_empty());
    }
}
