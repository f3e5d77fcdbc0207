//! The two tables of the mechanism, built from discovered facts and profiles.
//!
//! - **T1**: global index → function description;
//! - **T2**: global index → global VF identifier (the VF's host location).
//!
//! Global indexes are dense (0..n) and deterministic: every discovered VF gets one, in order of
//! (PF location, VF number), so the same hardware and profiles always give the same numbering.
//! VFs that no profile covers keep an index but have no function ("unassigned").

use std::sync::Arc;

use serde::Serialize;

use crate::addr::{Bdf, PciId};
use crate::facts::{HostFacts, Problem};
use crate::profile::{DriverName, FunctionDesc, FunctionName, Profiles};

pub use crate::index::{GlobalIndex, Numbering};

/// One row of both tables, plus what an operator wants to see beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VfEntry {
    /// The VF's global index.
    pub global_index: GlobalIndex,
    /// T1: the function it carries, `None` when unassigned.
    pub function: Option<FunctionName>,
    /// T2: the VF's location on the host (global VF identifier).
    pub location: Bdf,
    /// Its PF.
    pub pf: Bdf,
    /// Its VF number on the PF.
    pub vf_index: u16,
    /// Vendor ID (the PF's).
    pub vendor: Option<PciId>,
    /// Device ID (the PF's `sriov_vf_device`, or the VF's own `device` on kernels before 4.15).
    pub device: Option<PciId>,
    /// NUMA node, `None` when the host has no affinity information.
    pub numa_node: Option<i32>,
    /// IOMMU group (changes across reboots: informational only).
    pub iommu_group: Option<u32>,
    /// The host driver bound now.
    pub driver: Option<String>,
    /// The `driver_override` set now.
    pub driver_override: Option<String>,
    /// The card profile covering the PF (shared by its VFs).
    pub card: Option<Arc<str>>,
    /// The host driver the function wants (`None` when unassigned).
    pub host_driver: Option<DriverName>,
    /// The guest driver the function wants (`None` when unassigned).
    pub guest_driver: Option<DriverName>,
}

/// A function and how many present VFs carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionSummary {
    /// The function's key.
    pub name: FunctionName,
    /// Free text.
    pub description: String,
    /// Driver the VM loads.
    pub guest_driver: DriverName,
    /// Driver the host binds.
    pub host_driver: DriverName,
    /// Present VFs carrying it.
    pub total: usize,
}

/// A PF as the tables see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PfEntry {
    /// Its location.
    pub location: Bdf,
    /// Vendor ID.
    pub vendor: Option<PciId>,
    /// Device ID.
    pub device: Option<PciId>,
    /// The card profile covering it.
    pub card: Option<String>,
    /// `sriov_totalvfs`.
    pub total_vfs: Option<u16>,
    /// `sriov_numvfs`.
    pub num_vfs: Option<u16>,
    /// The profile's `num_vfs`, when a card covers it.
    pub wanted_vfs: Option<u16>,
    /// PF driver.
    pub driver: Option<String>,
    /// NUMA node.
    pub numa_node: Option<i32>,
}

/// T1 and T2, with the PFs and functions they came from and every problem met.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tables {
    /// Every function the profiles define, with its count of present VFs.
    pub functions: Vec<FunctionSummary>,
    /// SR-IOV PFs, by location.
    pub pfs: Vec<PfEntry>,
    /// Every VF, sorted by global index (dense from 0 while provisional).
    pub vfs: Vec<VfEntry>,
    /// Whether the global indexes are the stored ones.
    pub numbering: Numbering,
    /// Per-device problems from discovery and from applying the profiles.
    pub problems: Vec<Problem>,
}

impl Tables {
    /// Builds the tables. Pure: the same facts and profiles give the same tables.
    pub fn build(facts: &HostFacts, profiles: &Profiles) -> Tables {
        let mut problems = facts.problems.clone();
        let mut pfs_sorted: Vec<_> = facts.pfs.iter().collect();
        pfs_sorted.sort_by_key(|pf| pf.location);

        let mut pfs = Vec::with_capacity(pfs_sorted.len());
        let mut vfs = Vec::new();
        for pf in pfs_sorted {
            let card = match (pf.vendor, pf.device) {
                (Some(vendor), Some(device)) => profiles.card_for(pf.location, vendor, device),
                _ => None,
            };
            if let (Some(card), Some(total)) = (card, pf.total_vfs)
                && card.num_vfs > total
            {
                problems.push(Problem::new(
                    pf.location.to_string(),
                    "num_vfs",
                    format!(
                        "{}: card {:?}, field `num_vfs`: {} is larger than this PF's sriov_totalvfs = {}",
                        card.source, card.name, card.num_vfs, total
                    ),
                ));
            }
            let card_name: Option<Arc<str>> = card.map(|c| Arc::from(c.name.as_str()));
            pfs.push(PfEntry {
                location: pf.location,
                vendor: pf.vendor,
                device: pf.device,
                card: card.map(|c| c.name.clone()),
                total_vfs: pf.total_vfs,
                num_vfs: pf.num_vfs,
                wanted_vfs: card.map(|c| c.num_vfs),
                driver: pf.driver.clone(),
                numa_node: pf.numa_node,
            });
            let mut pf_vfs: Vec<_> = pf.vfs.iter().collect();
            pf_vfs.sort_by_key(|vf| vf.vf_index);
            for vf in pf_vfs {
                let desc: Option<&FunctionDesc> = card.and_then(|c| c.function_of(vf.vf_index));
                vfs.push(VfEntry {
                    // Provisional until `renumber` applies the stored numbering.
                    global_index: GlobalIndex::new(u32::try_from(vfs.len()).unwrap_or(u32::MAX)),
                    function: desc.map(|d| d.name.clone()),
                    location: vf.location,
                    pf: pf.location,
                    vf_index: vf.vf_index,
                    vendor: pf.vendor,
                    device: pf.vf_device,
                    numa_node: vf.numa_node,
                    iommu_group: vf.iommu_group,
                    driver: vf.driver.clone(),
                    driver_override: vf.driver_override.clone(),
                    card: card_name.clone(),
                    host_driver: desc.map(|d| d.host_driver.clone()),
                    guest_driver: desc.map(|d| d.guest_driver.clone()),
                });
            }
        }

        problems.extend(pinned_card_problems(&pfs, profiles));

        let functions = profiles
            .functions()
            .into_values()
            .map(|desc| FunctionSummary {
                name: desc.name.clone(),
                description: desc.description.clone(),
                guest_driver: desc.guest_driver.clone(),
                host_driver: desc.host_driver.clone(),
                total: vfs
                    .iter()
                    .filter(|v| v.function.as_ref() == Some(&desc.name))
                    .count(),
            })
            .collect();
        Tables {
            functions,
            pfs,
            vfs,
            numbering: Numbering::Provisional,
            problems,
        }
    }

    /// Applies the stored numbering (see [`crate::index::number`]): VFs already known keep
    /// their indexes, new ones come after the highest. Returns the new (index, location) pairs
    /// to store. `vfs` stays sorted by global index.
    pub fn renumber(&mut self, known: &[(GlobalIndex, Bdf)]) -> Vec<(GlobalIndex, Bdf)> {
        let present: Vec<Bdf> = self.vfs.iter().map(|v| v.location).collect();
        let (indexes, added) = crate::index::number(&present, known);
        for (vf, index) in self.vfs.iter_mut().zip(indexes) {
            vf.global_index = index;
        }
        self.vfs.sort_by_key(|v| v.global_index);
        self.numbering = Numbering::Stored;
        added
    }

    fn vf(&self, index: GlobalIndex) -> Option<&VfEntry> {
        let at = self
            .vfs
            .binary_search_by_key(&index, |v| v.global_index)
            .ok()?;
        self.vfs.get(at)
    }

    /// T1: the function of global index `index`; `None` when unassigned or unknown.
    pub fn function_of(&self, index: GlobalIndex) -> Option<&FunctionName> {
        self.vf(index)?.function.as_ref()
    }

    /// T2: the host location of global index `index`.
    pub fn location_of(&self, index: GlobalIndex) -> Option<Bdf> {
        self.vf(index).map(|v| v.location)
    }

    /// The global indexes of VFs carrying `function`, ascending.
    pub fn indexes_of<'a>(&'a self, function: &'a str) -> impl Iterator<Item = GlobalIndex> + 'a {
        self.vfs
            .iter()
            .filter(move |v| v.function.as_ref().is_some_and(|f| f.as_str() == function))
            .map(|v| v.global_index)
    }
}

/// A card pinned with `pf = "..."` covers nothing when that PF is not there or has other IDs:
/// say so, naming the card and what to fix (a PF whose IDs are unreadable has its own problems).
fn pinned_card_problems(pfs: &[PfEntry], profiles: &Profiles) -> Vec<Problem> {
    let mut problems = Vec::new();
    for card in &profiles.cards {
        let Some(location) = card.pf else { continue };
        let problem = |message: String| {
            Problem::new(
                location.to_string(),
                "pf",
                format!(
                    "{}: card {:?}, field `pf`: {message}",
                    card.source, card.name
                ),
            )
        };
        match pfs.iter().find(|pf| pf.location == location) {
            None => {
                let present: Vec<String> = pfs.iter().map(|pf| pf.location.to_string()).collect();
                let present = if present.is_empty() {
                    "there is none here".to_owned()
                } else {
                    format!("those here: {}", present.join(", "))
                };
                problems.push(problem(format!(
                    "there is no SR-IOV capable PF at {location} ({present}); \
                     fix `pf` to the PF's address or remove the card"
                )));
            }
            Some(pf) => {
                if let (Some(vendor), Some(device)) = (pf.vendor, pf.device)
                    && (vendor, device) != (card.vendor, card.device)
                {
                    problems.push(problem(format!(
                        "the PF at {location} is {:04x}:{:04x}, not the card's {:04x}:{:04x}, so \
                         the card covers nothing; fix the card's `vendor`/`device` or its `pf`",
                        vendor.0, device.0, card.vendor.0, card.device.0
                    )));
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{PfFacts, VfFacts};

    fn pf(location: &str, num_vfs: u16, total: u16) -> PfFacts {
        let location: Bdf = location.parse().unwrap();
        PfFacts {
            location,
            vendor: Some(PciId(0x1b36)),
            device: Some(PciId(0x0010)),
            numa_node: Some(0),
            driver: Some("nvme".into()),
            total_vfs: Some(total),
            num_vfs: Some(num_vfs),
            vf_device: Some(PciId(0x0011)),
            drivers_autoprobe: Some(false),
            vfs: (0..num_vfs)
                .map(|i| VfFacts {
                    location: location.vf_location(1, 1, i).unwrap(),
                    vf_index: i,
                    numa_node: Some(0),
                    iommu_group: Some(u32::from(i) + 10),
                    driver: None,
                    driver_override: None,
                })
                .collect(),
        }
    }

    const PROFILE: &str = r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 4
[[card.function]]
name = "crypto"
vfs = "0-1"
guest_driver = "pci-stub"
[[card.function]]
name = "net"
vfs = "3"
guest_driver = "igbvf"
"#;

    #[test]
    fn builds_dense_tables_in_location_order() {
        let facts = HostFacts {
            // Deliberately out of order: the tables must sort.
            pfs: vec![pf("0000:82:00.0", 4, 8), pf("0000:01:00.0", 4, 8)],
            problems: vec![],
        };
        let profiles = Profiles::parse(PROFILE, "p.toml").unwrap();
        let t = Tables::build(&facts, &profiles);
        assert_eq!(t.vfs.len(), 8);
        for (i, vf) in t.vfs.iter().enumerate() {
            assert_eq!(vf.global_index.get() as usize, i);
        }
        assert_eq!(
            t.location_of(GlobalIndex::new(0)).unwrap().to_string(),
            "0000:01:00.1"
        );
        assert_eq!(
            t.location_of(GlobalIndex::new(4)).unwrap().to_string(),
            "0000:82:00.1"
        );
        assert_eq!(
            t.function_of(GlobalIndex::new(1)).unwrap().as_str(),
            "crypto"
        );
        assert_eq!(
            t.function_of(GlobalIndex::new(2)),
            None,
            "VF 2 is unassigned"
        );
        assert_eq!(t.function_of(GlobalIndex::new(3)).unwrap().as_str(), "net");
        assert_eq!(t.function_of(GlobalIndex::new(99)), None);
        assert_eq!(
            t.indexes_of("crypto").collect::<Vec<_>>(),
            [0, 1, 4, 5].map(GlobalIndex::new)
        );
        let crypto = t
            .functions
            .iter()
            .find(|f| f.name.as_str() == "crypto")
            .unwrap();
        assert_eq!(crypto.total, 4);
        assert_eq!(
            t.vfs[0].device,
            Some(PciId(0x0011)),
            "VF device is sriov_vf_device"
        );
        assert!(t.problems.is_empty());
        // Same input, same tables.
        assert_eq!(t, Tables::build(&facts, &profiles));
    }

    #[test]
    fn uncovered_pfs_are_unassigned_and_over_large_num_vfs_is_a_problem() {
        let mut other = pf("0000:05:00.0", 2, 2);
        other.device = Some(PciId(0x9999));
        let facts = HostFacts {
            pfs: vec![pf("0000:01:00.0", 0, 3), other],
            problems: vec![],
        };
        let profiles = Profiles::parse(PROFILE, "p.toml").unwrap();
        let t = Tables::build(&facts, &profiles);
        assert_eq!(t.vfs.len(), 2);
        assert!(
            t.vfs
                .iter()
                .all(|v| v.function.is_none() && v.card.is_none())
        );
        assert_eq!(t.pfs[0].wanted_vfs, Some(4));
        assert_eq!(t.problems.len(), 1);
        assert!(
            t.problems[0]
                .message
                .contains("p.toml: card \"acme\", field `num_vfs`: 4 is larger than this PF's sriov_totalvfs = 3"),
            "{:?}",
            t.problems
        );
        assert!(t.functions.iter().all(|f| f.total == 0));
    }

    #[test]
    fn a_card_pinned_to_an_absent_or_other_pf_is_a_problem_naming_the_card_and_the_fix() {
        let mut other = pf("0000:05:00.0", 2, 2);
        other.device = Some(PciId(0x9999));
        let facts = HostFacts {
            pfs: vec![pf("0000:01:00.0", 0, 8), other],
            problems: vec![],
        };
        let pinned = |name: &str, at: &str| {
            format!(
                "[[card]]\nname = \"{name}\"\nvendor = \"0x1b36\"\ndevice = \"0x0010\"\n\
                 pf = \"{at}\"\nnum_vfs = 1\n"
            )
        };
        let text = [
            pinned("here", "0000:01:00.0"),
            pinned("gone", "0000:3b:00.0"),
            pinned("other-ids", "0000:05:00.0"),
        ]
        .concat();
        let profiles = Profiles::parse(&text, "p.toml").unwrap();
        let t = Tables::build(&facts, &profiles);
        let found: Vec<(&str, &str, &str)> = t
            .problems
            .iter()
            .map(|p| (p.device.as_str(), p.attribute.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].0, "0000:3b:00.0");
        assert_eq!(found[0].1, "pf");
        assert_eq!(
            found[0].2,
            "p.toml: card \"gone\", field `pf`: there is no SR-IOV capable PF at 0000:3b:00.0 \
             (those here: 0000:01:00.0, 0000:05:00.0); fix `pf` to the PF's address or remove \
             the card"
        );
        assert_eq!(found[1].0, "0000:05:00.0");
        assert_eq!(
            found[1].2,
            "p.toml: card \"other-ids\", field `pf`: the PF at 0000:05:00.0 is 1b36:9999, not \
             the card's 1b36:0010, so the card covers nothing; fix the card's `vendor`/`device` \
             or its `pf`"
        );
        assert_eq!(t.pfs[0].card.as_deref(), Some("here"));
        assert_eq!(t.pfs[1].card, None);

        // No PF at all: the message says so instead of listing nothing.
        let t = Tables::build(&HostFacts::default(), &profiles);
        assert!(
            t.problems[0].message.contains("(there is none here)"),
            "{:?}",
            t.problems
        );
    }
}
