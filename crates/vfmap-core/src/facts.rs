//! What discovery found on a host, before any profile is applied.
//!
//! Every attribute is optional: a malformed or missing one becomes `None` plus a [`Problem`]
//! for that device, so one odd device never hides the others.

use serde::Serialize;

use crate::addr::{Bdf, PciId};

/// Something discovery or planning could not read or accept about one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The device, as its sysfs name (normally a BDF).
    pub device: String,
    /// The attribute or link concerned, e.g. `numa_node` or `virtfn3`.
    pub attribute: String,
    /// What is wrong.
    pub message: String,
    /// The attribute exists but this process may not read it (EACCES/EPERM): vfmap is not
    /// running as root, or a captured tree kept its owner-only modes. Not in the JSON (the
    /// message says it); callers use it to say "run as root" once instead of N times.
    #[serde(skip)]
    pub permission_denied: bool,
}

impl Problem {
    /// A problem with `attribute` of `device`.
    pub fn new(
        device: impl Into<String>,
        attribute: impl Into<String>,
        message: impl Into<String>,
    ) -> Problem {
        Problem {
            device: device.into(),
            attribute: attribute.into(),
            message: message.into(),
            permission_denied: false,
        }
    }

    /// The same problem, marked as a permission refusal.
    pub fn denied(mut self) -> Problem {
        self.permission_denied = true;
        self
    }
}

/// An SR-IOV capable physical function and the VFs it has enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfFacts {
    /// The PF's location.
    pub location: Bdf,
    /// `vendor`.
    pub vendor: Option<PciId>,
    /// `device`.
    pub device: Option<PciId>,
    /// `numa_node`; `None` when the kernel says -1 (no affinity) or the value is unreadable.
    pub numa_node: Option<i32>,
    /// The driver bound to the PF.
    pub driver: Option<String>,
    /// `sriov_totalvfs`.
    pub total_vfs: Option<u16>,
    /// `sriov_numvfs`.
    pub num_vfs: Option<u16>,
    /// The device ID every VF reports: `sriov_vf_device`, or, on kernels before 4.15 that lack
    /// that attribute, the VFs' own `device` (they all share one ID).
    pub vf_device: Option<PciId>,
    /// `sriov_drivers_autoprobe`.
    pub drivers_autoprobe: Option<bool>,
    /// The enabled VFs, by VF number.
    pub vfs: Vec<VfFacts>,
}

/// One enabled virtual function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfFacts {
    /// The VF's location (the global VF identifier).
    pub location: Bdf,
    /// Its number on the PF (the N of `virtfnN`).
    pub vf_index: u16,
    /// `numa_node`, `None` for -1 or unreadable.
    pub numa_node: Option<i32>,
    /// The IOMMU group number (not stable across reboots: never an identity).
    pub iommu_group: Option<u32>,
    /// The bound driver.
    pub driver: Option<String>,
    /// `driver_override`, `None` when unset.
    pub driver_override: Option<String>,
}

/// Everything discovery found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostFacts {
    /// SR-IOV capable PFs (`sriov_totalvfs` > 0), sorted by location.
    pub pfs: Vec<PfFacts>,
    /// Per-device problems met on the way.
    pub problems: Vec<Problem>,
}
