//! Planning `prepare`: the sysfs changes that make a host match its profiles.
//!
//! Pure: facts and profiles in, steps or refusals out. The sysfs adapter executes the steps.
//! Planning runs in two phases because binding needs the VFs that enabling creates:
//! [`plan_sriov`] (autoprobe and VF counts), then, after a rescan, [`plan_bring_ups`] (the
//! cards' `bring_up` hooks, per VF) and [`plan_binds`]: every VF is brought up before any is
//! bound to its host driver, so none is offered before its card's bring-up ran.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::addr::Bdf;
use crate::facts::HostFacts;
use crate::profile::{Card, DriverName, FunctionName, HookPhase, Profiles};
use crate::tables::Tables;

/// One change to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// Write `sriov_drivers_autoprobe = 0` so no host driver grabs new VFs.
    DisableAutoprobe {
        /// The PF.
        pf: Bdf,
    },
    /// Change `sriov_numvfs` (through 0 when both counts are non-zero: the kernel demands it).
    SetNumVfs {
        /// The PF.
        pf: Bdf,
        /// VFs enabled now.
        from: u16,
        /// VFs wanted.
        to: u16,
    },
    /// Set `driver_override`, unbind the current driver if any, and probe.
    Bind {
        /// The VF.
        vf: Bdf,
        /// The driver wanted.
        driver: DriverName,
        /// The driver bound now, if any.
        unbind_from: Option<String>,
    },
    /// The right driver is bound but `driver_override` does not pin it: pin it.
    PinOverride {
        /// The VF.
        vf: Bdf,
        /// The driver bound, to write into `driver_override`.
        driver: DriverName,
    },
    /// Run the card's `bring_up` hook for one VF (its function's own hook when it names one).
    /// Planned at every `prepare`, since vfmap cannot see whether a card's bring-up is done:
    /// hooks are idempotent (`docs/hooks.md`). Boxed: the other steps are small.
    BringUp(Box<BringUp>),
}

/// One VF's `bring_up` hook run ([`Step::BringUp`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BringUp {
    /// The VF.
    pub vf: Bdf,
    /// Its PF.
    pub pf: Bdf,
    /// The VF's number on its PF (the N of `virtfnN`).
    pub vf_number: u16,
    /// The profile's card name.
    pub card: String,
    /// The function the VF carries per the profile, if any.
    pub function: Option<FunctionName>,
    /// The hook, an absolute path from the profile.
    pub hook: PathBuf,
    /// The hook's deadline in milliseconds.
    pub deadline_ms: u64,
}

impl Step {
    /// Whether the step runs a card's hook rather than writing sysfs itself (what the hook
    /// changes, if anything, vfmap does not see).
    pub fn is_hook(&self) -> bool {
        matches!(self, Step::BringUp(_))
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::DisableAutoprobe { pf } => write!(f, "{pf}: set sriov_drivers_autoprobe = 0"),
            Step::SetNumVfs { pf, from, to } => write!(f, "{pf}: set sriov_numvfs {from} -> {to}"),
            Step::Bind {
                vf,
                driver,
                unbind_from: Some(old),
            } => write!(f, "{vf}: rebind {old} -> {driver}"),
            Step::Bind {
                vf,
                driver,
                unbind_from: None,
            } => write!(f, "{vf}: bind {driver}"),
            Step::PinOverride { vf, driver } => write!(f, "{vf}: pin driver_override = {driver}"),
            Step::BringUp(run) => write!(
                f,
                "{}: run bring_up hook {} (card {:?}, VF {} of {})",
                run.vf,
                run.hook.display(),
                run.card,
                run.vf_number,
                run.pf
            ),
        }
    }
}

/// Why `prepare` refuses to touch a PF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The profile wants more VFs than the PF can have.
    #[error(
        "{file}: card {card:?}, field `num_vfs`: {wanted} is larger than sriov_totalvfs = {total} of PF {pf}; set num_vfs to at most {total}"
    )]
    TooManyVfs {
        /// Profile file.
        file: String,
        /// Card name.
        card: String,
        /// The PF.
        pf: Bdf,
        /// `num_vfs` in the profile.
        wanted: u16,
        /// `sriov_totalvfs`.
        total: u16,
    },
    /// Changing the VF count would pull VFs out from under their drivers.
    #[error(
        "PF {pf} (card {card:?}): refusing to change sriov_numvfs from {from} to {to}: {} in use ({}); detach them from their VMs and unbind them, or set num_vfs = {from} in {file}",
        if in_use.len() == 1 { "1 VF is" } else { "VFs are" },
        in_use.iter().map(|(vf, d)| format!("{vf} bound to {d}")).collect::<Vec<_>>().join(", ")
    )]
    VfsInUse {
        /// Profile file.
        file: String,
        /// Card name.
        card: String,
        /// The PF.
        pf: Bdf,
        /// VFs enabled now.
        from: u16,
        /// VFs wanted.
        to: u16,
        /// The VFs with a driver, and the driver.
        in_use: Vec<(Bdf, String)>,
    },
    /// An SR-IOV attribute that planning needs could not be read.
    #[error("PF {pf} (card {card:?}): cannot read {attribute}; see the problems of the inventory")]
    Unreadable {
        /// Card name.
        card: String,
        /// The PF.
        pf: Bdf,
        /// The attribute.
        attribute: &'static str,
    },
}

/// Phase 1: autoprobe and VF counts for every PF a card covers.
///
/// Returns every refusal rather than the first, so the operator can fix them in one go; the
/// caller must not execute any step when there are refusals.
pub fn plan_sriov(facts: &HostFacts, profiles: &Profiles) -> Result<Vec<Step>, Vec<PlanError>> {
    let mut steps = Vec::new();
    let mut errors = Vec::new();
    for pf in &facts.pfs {
        let (Some(vendor), Some(device)) = (pf.vendor, pf.device) else {
            continue;
        };
        let Some(card) = profiles.card_for(pf.location, vendor, device) else {
            continue;
        };
        let unreadable = |attribute| PlanError::Unreadable {
            card: card.name.clone(),
            pf: pf.location,
            attribute,
        };
        let (Some(total), Some(current)) = (pf.total_vfs, pf.num_vfs) else {
            errors.push(unreadable("sriov_totalvfs/sriov_numvfs"));
            continue;
        };
        if card.num_vfs > total {
            errors.push(PlanError::TooManyVfs {
                file: card.source.clone(),
                card: card.name.clone(),
                pf: pf.location,
                wanted: card.num_vfs,
                total,
            });
            continue;
        }
        if current == card.num_vfs {
            // Keep autoprobe off on PFs we own, so a later re-enable is safe too.
            if card.num_vfs > 0 && pf.drivers_autoprobe == Some(true) {
                steps.push(Step::DisableAutoprobe { pf: pf.location });
            }
            continue;
        }
        let in_use: Vec<(Bdf, String)> = pf
            .vfs
            .iter()
            .filter_map(|vf| vf.driver.clone().map(|d| (vf.location, d)))
            .collect();
        if !in_use.is_empty() {
            errors.push(PlanError::VfsInUse {
                file: card.source.clone(),
                card: card.name.clone(),
                pf: pf.location,
                from: current,
                to: card.num_vfs,
                in_use,
            });
            continue;
        }
        if card.num_vfs > 0 {
            match pf.drivers_autoprobe {
                Some(false) => {}
                Some(true) => steps.push(Step::DisableAutoprobe { pf: pf.location }),
                None => {
                    errors.push(unreadable("sriov_drivers_autoprobe"));
                    continue;
                }
            }
        }
        steps.push(Step::SetNumVfs {
            pf: pf.location,
            from: current,
            to: card.num_vfs,
        });
    }
    if errors.is_empty() {
        Ok(steps)
    } else {
        Err(errors)
    }
}

/// Phase 2, first: the `bring_up` hook of every VF whose card (or function) names one, in
/// table order (by PF, then VF number). A VF's hook is its function's own when the function
/// names one, else its card's; VFs without a function get the card's.
pub fn plan_bring_ups(tables: &Tables, profiles: &Profiles) -> Vec<Step> {
    let cards: BTreeMap<Bdf, &Card> = tables
        .pfs
        .iter()
        .filter_map(|pf| {
            let card = profiles.card_for(pf.location, pf.vendor?, pf.device?)?;
            Some((pf.location, card))
        })
        .collect();
    // In VF order whatever the numbering (a stored one may differ from location order).
    let mut vfs: Vec<_> = tables
        .vfs
        .iter()
        .filter(|vf| cards.contains_key(&vf.pf))
        .collect();
    vfs.sort_by_key(|vf| (vf.pf, vf.vf_index));
    vfs.into_iter()
        .filter_map(|vf| {
            let card = cards[&vf.pf];
            let function = vf.function.as_ref();
            let (hook, deadline) = card.hook(HookPhase::BringUp, function.map(|f| f.as_str()))?;
            Some(Step::BringUp(Box::new(BringUp {
                vf: vf.location,
                pf: vf.pf,
                vf_number: vf.vf_index,
                card: card.name.clone(),
                function: function.cloned(),
                hook: hook.as_path().to_owned(),
                deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            })))
        })
        .collect()
}

/// Phase 2, then: bind every VF that has a function to its function's host driver.
/// VFs without a function are left as they are.
pub fn plan_binds(tables: &Tables) -> Vec<Step> {
    tables
        .vfs
        .iter()
        .filter_map(|vf| {
            let driver = vf.host_driver.clone()?;
            let bound = vf.driver.as_deref();
            if bound != Some(driver.as_str()) {
                Some(Step::Bind {
                    vf: vf.location,
                    driver,
                    unbind_from: vf.driver.clone(),
                })
            } else if vf.driver_override.as_deref() != Some(driver.as_str()) {
                Some(Step::PinOverride {
                    vf: vf.location,
                    driver,
                })
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PciId;
    use crate::facts::{PfFacts, VfFacts};

    const PROFILE: &str = r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 3
[[card.function]]
name = "crypto"
vfs = "0-1"
guest_driver = "pci-stub"
"#;

    fn pf(num_vfs: u16, autoprobe: bool, driver: Option<&str>) -> PfFacts {
        let location: Bdf = "0000:01:00.0".parse().unwrap();
        PfFacts {
            location,
            vendor: Some(PciId(0x1b36)),
            device: Some(PciId(0x0010)),
            numa_node: None,
            driver: Some("nvme".into()),
            total_vfs: Some(3),
            num_vfs: Some(num_vfs),
            vf_device: Some(PciId(0x0010)),
            drivers_autoprobe: Some(autoprobe),
            vfs: (0..num_vfs)
                .map(|i| VfFacts {
                    location: location.vf_location(1, 1, i).unwrap(),
                    vf_index: i,
                    numa_node: None,
                    iommu_group: None,
                    driver: driver.map(str::to_owned),
                    driver_override: None,
                })
                .collect(),
        }
    }

    fn facts(pf: PfFacts) -> HostFacts {
        HostFacts {
            pfs: vec![pf],
            problems: vec![],
        }
    }

    fn profiles() -> Profiles {
        Profiles::parse(PROFILE, "p.toml").unwrap()
    }

    #[test]
    fn enabling_disables_autoprobe_first() {
        let steps = plan_sriov(&facts(pf(0, true, None)), &profiles()).unwrap();
        let pf = "0000:01:00.0".parse().unwrap();
        assert_eq!(
            steps,
            vec![
                Step::DisableAutoprobe { pf },
                Step::SetNumVfs { pf, from: 0, to: 3 }
            ]
        );
    }

    #[test]
    fn matching_count_with_autoprobe_off_is_nothing_to_do() {
        assert!(
            plan_sriov(&facts(pf(3, false, None)), &profiles())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn refuses_to_change_count_under_bound_vfs() {
        let errors = plan_sriov(&facts(pf(2, false, Some("vfio-pci"))), &profiles()).unwrap_err();
        let text = errors[0].to_string();
        assert!(
            text.contains("refusing to change sriov_numvfs from 2 to 3"),
            "{text}"
        );
        assert!(text.contains("0000:01:00.1 bound to vfio-pci"), "{text}");
        assert!(text.contains("set num_vfs = 2 in p.toml"), "{text}");
    }

    #[test]
    fn refuses_num_vfs_over_total() {
        let mut p = pf(0, false, None);
        p.total_vfs = Some(2);
        let errors = plan_sriov(&facts(p), &profiles()).unwrap_err();
        assert!(matches!(
            errors[0],
            PlanError::TooManyVfs {
                wanted: 3,
                total: 2,
                ..
            }
        ));
        assert!(
            errors[0]
                .to_string()
                .starts_with("p.toml: card \"acme\", field `num_vfs`")
        );
    }

    #[test]
    fn unreadable_autoprobe_is_refused_not_guessed() {
        let mut p = pf(0, false, None);
        p.drivers_autoprobe = None;
        let errors = plan_sriov(&facts(p), &profiles()).unwrap_err();
        assert!(matches!(
            errors[0],
            PlanError::Unreadable {
                attribute: "sriov_drivers_autoprobe",
                ..
            }
        ));
    }

    #[test]
    fn binds_only_assigned_vfs_and_pins_overrides() {
        let mut p = pf(3, false, None);
        p.vfs[1].driver = Some("vfio-pci".into());
        p.vfs[2].driver = Some("nvme".into());
        let t = Tables::build(&facts(p), &profiles());
        let steps = plan_binds(&t);
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert!(
            matches!(&steps[0], Step::Bind { unbind_from: None, driver, .. } if driver.as_str() == "vfio-pci")
        );
        assert!(matches!(&steps[1], Step::PinOverride { .. }));
        assert_eq!(
            steps[1].to_string(),
            "0000:01:00.2: pin driver_override = vfio-pci"
        );
    }

    #[test]
    fn bound_and_pinned_is_nothing_to_do() {
        let mut p = pf(3, false, Some("vfio-pci"));
        for vf in &mut p.vfs {
            vf.driver_override = Some("vfio-pci".into());
        }
        let t = Tables::build(&facts(p), &profiles());
        assert!(plan_binds(&t).is_empty());
    }

    const HOOKED: &str = r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 3
[card.hooks]
bring_up = "/usr/lib/vfmap/hooks/acme-up"
deadline_ms = 2000
[[card.function]]
name = "crypto"
vfs = "0"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "1"
guest_driver = "pci-stub"
[card.function.hooks]
bring_up = "/usr/lib/vfmap/hooks/compress-up"
deadline_ms = 7000
"#;

    #[test]
    fn bring_ups_per_vf_in_vf_order_with_the_function_hook_over_the_card_hook() {
        let profiles = Profiles::parse(HOOKED, "p.toml").unwrap();
        let mut tables = Tables::build(&facts(pf(3, false, None)), &profiles);
        // A stored numbering out of location order must not change the order of the runs.
        tables.vfs.reverse();
        let steps = plan_bring_ups(&tables, &profiles);
        let pf: Bdf = "0000:01:00.0".parse().unwrap();
        let want = |n: u16, function: Option<&str>, hook: &str, deadline_ms| {
            Step::BringUp(Box::new(BringUp {
                vf: pf.vf_location(1, 1, n).unwrap(),
                pf,
                vf_number: n,
                card: "acme".into(),
                function: function.map(|f| FunctionName::new(f).unwrap()),
                hook: PathBuf::from(hook),
                deadline_ms,
            }))
        };
        assert_eq!(
            steps,
            vec![
                want(0, Some("crypto"), "/usr/lib/vfmap/hooks/acme-up", 2000),
                want(
                    1,
                    Some("compress"),
                    "/usr/lib/vfmap/hooks/compress-up",
                    7000
                ),
                // VF 2 has no function: the card's hook.
                want(2, None, "/usr/lib/vfmap/hooks/acme-up", 2000),
            ]
        );
        assert!(steps.iter().all(Step::is_hook));
        assert_eq!(
            steps[1].to_string(),
            "0000:01:00.2: run bring_up hook /usr/lib/vfmap/hooks/compress-up (card \"acme\", VF 1 of 0000:01:00.0)"
        );
        let json = serde_json::to_value(&steps[2]).unwrap();
        assert_eq!(json["action"], "bring_up");
        assert_eq!(json["hook"], "/usr/lib/vfmap/hooks/acme-up");
        assert_eq!(json["function"], serde_json::Value::Null);
    }

    #[test]
    fn no_bring_up_hook_plans_nothing() {
        let t = Tables::build(&facts(pf(3, false, None)), &profiles());
        assert!(plan_bring_ups(&t, &profiles()).is_empty());
    }
}
