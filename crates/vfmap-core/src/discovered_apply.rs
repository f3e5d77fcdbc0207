//! Reading T1 from the device: what a card's `discover` hook printed for one PF
//! ([`crate::discovered::parse`]) replaces the profile's functions for that PF's VFs in
//! [`Tables`].
//!
//! This is the "instead of the profile" use of `discover`; the "checked against the profile"
//! use is [`crate::discovered::compare`]. Nothing calls it yet: no profile option chooses it.
//!
//! The rules:
//!
//! - A VF the hook lists with a function the card defines carries that function, with that
//!   function's host and guest drivers.
//! - A VF the hook lists with a function the card does not define carries none (it must not be
//!   handed out as something it is not), and the function is a [`Problem`] (one per function,
//!   with its VFs).
//! - A VF the hook does not list carries no function (the format says so: VFs not listed carry
//!   no function the hook knows of).
//! - A VF the hook lists that the PF does not have is a problem (one per VF, naming its
//!   function, known or not); nothing changes for it.
//! - The function counts ([`Tables::functions`]) are counted again.
//!
//! Global indexes and locations (T2) never change. A PF that is not in the tables, or that
//! another card covers, is one problem and nothing changes.

use std::collections::BTreeMap;

use crate::addr::Bdf;
use crate::discovered::Disagreement;
use crate::facts::Problem;
use crate::profile::{Card, FunctionName, VfSet};
use crate::tables::Tables;

/// The attribute of the problems [`apply_discovered`] reports.
pub const ATTRIBUTE: &str = "discover";

/// Replaces the functions of `pf`'s VFs in `tables` with what `card`'s `discover` hook found
/// (`found`: VF number → function, as [`crate::discovered::parse`] returns it). Returns the
/// problems met, each on `pf`; the caller adds them to [`Tables::problems`] if it wants them
/// shown. See the module doc for the rules.
pub fn apply_discovered(
    tables: &mut Tables,
    card: &Card,
    pf: Bdf,
    found: &BTreeMap<u16, FunctionName>,
) -> Vec<Problem> {
    let problem = |message: String| {
        Problem::new(
            pf.to_string(),
            ATTRIBUTE,
            format!("card {:?}: {message}", card.name),
        )
    };
    match tables.pfs.iter().find(|p| p.location == pf) {
        None => {
            return vec![problem(format!(
                "PF {pf} is not in the tables: its functions cannot be read from the device"
            ))];
        }
        Some(entry) if entry.card.as_deref() != Some(card.name.as_str()) => {
            let covered = entry
                .card
                .as_deref()
                .map_or("no card".to_owned(), |c| format!("card {c:?}"));
            return vec![problem(format!(
                "PF {pf} is covered by {covered}: its functions are not read from this card's \
                 discover hook"
            ))];
        }
        Some(_) => {}
    }

    let mut problems = Vec::new();
    let mut unknown: BTreeMap<&FunctionName, Vec<u16>> = BTreeMap::new();
    let mut present = Vec::new();
    for vf in tables.vfs.iter_mut().filter(|v| v.pf == pf) {
        present.push(vf.vf_index);
        let function = match found.get(&vf.vf_index) {
            Some(name) => match card.function(name.as_str()) {
                Some(function) => Some(&function.desc),
                None => {
                    unknown.entry(name).or_default().push(vf.vf_index);
                    None
                }
            },
            None => None,
        };
        vf.function = function.map(|d| d.name.clone());
        vf.host_driver = function.map(|d| d.host_driver.clone());
        vf.guest_driver = function.map(|d| d.guest_driver.clone());
    }
    for (&vf, function) in found {
        if !present.contains(&vf) {
            problems.push(problem(format!(
                "the discover hook lists VF {vf} (function {function}), but PF {pf} has no VF \
                 {vf} (VF numbers count from 0 on each PF, the N of virtfnN): check the hook"
            )));
        }
    }
    for (device, vfs) in unknown {
        let list = vfs.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let disagreement = Disagreement::UnknownFunction {
            device: device.clone(),
            vfs: VfSet::parse(&list).unwrap_or_default(),
        };
        problems.push(problem(format!(
            "{disagreement}; until then they carry none"
        )));
    }

    for summary in &mut tables.functions {
        summary.total = tables
            .vfs
            .iter()
            .filter(|v| v.function.as_ref() == Some(&summary.name))
            .count();
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PciId;
    use crate::facts::{HostFacts, PfFacts, VfFacts};
    use crate::profile::Profiles;

    fn name(text: &str) -> FunctionName {
        FunctionName::new(text).unwrap()
    }

    fn map(entries: &[(u16, &str)]) -> BTreeMap<u16, FunctionName> {
        entries.iter().map(|&(vf, f)| (vf, name(f))).collect()
    }

    fn pf(location: &str, device: u16, num_vfs: u16) -> PfFacts {
        let location: Bdf = location.parse().unwrap();
        PfFacts {
            location,
            vendor: Some(PciId(0x1b36)),
            device: Some(PciId(device)),
            numa_node: Some(0),
            driver: Some("nvme".into()),
            total_vfs: Some(8),
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

    /// acme (1b36:0010): crypto 0-1 (pci-stub), compress 2 (uio_pci_generic, host
    /// uio_pci_generic), VF 3 unassigned; other (1b36:0020): net 0-3.
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
name = "compress"
vfs = "2"
guest_driver = "uio_pci_generic"
host_driver = "uio_pci_generic"

[[card]]
name = "other"
vendor = "0x1b36"
device = "0x0020"
num_vfs = 4
[[card.function]]
name = "net"
vfs = "0-3"
guest_driver = "igbvf"
"#;

    const ACME: &str = "0000:3b:00.0";
    const OTHER: &str = "0000:5e:00.0";

    fn setup() -> (Tables, Profiles) {
        let facts = HostFacts {
            pfs: vec![pf(ACME, 0x0010, 4), pf(OTHER, 0x0020, 4)],
            problems: vec![],
        };
        let profiles = Profiles::parse(PROFILE, "p.toml").unwrap();
        (Tables::build(&facts, &profiles), profiles)
    }

    fn functions(tables: &Tables, pf: &str) -> Vec<Option<String>> {
        let pf: Bdf = pf.parse().unwrap();
        tables
            .vfs
            .iter()
            .filter(|v| v.pf == pf)
            .map(|v| v.function.as_ref().map(ToString::to_string))
            .collect()
    }

    fn totals(tables: &Tables) -> Vec<(String, usize)> {
        tables
            .functions
            .iter()
            .map(|f| (f.name.to_string(), f.total))
            .collect()
    }

    fn some(names: &[&str]) -> Vec<Option<String>> {
        names
            .iter()
            .map(|n| (!n.is_empty()).then(|| (*n).to_owned()))
            .collect()
    }

    #[test]
    fn the_profiles_layout_read_back_changes_nothing() {
        let (mut tables, profiles) = setup();
        let before = tables.clone();
        let found = map(&[(0, "crypto"), (1, "crypto"), (2, "compress")]);
        let problems = apply_discovered(
            &mut tables,
            &profiles.cards[0],
            ACME.parse().unwrap(),
            &found,
        );
        assert_eq!(problems, vec![]);
        assert_eq!(tables, before);
    }

    #[test]
    fn the_device_replaces_the_profiles_functions_and_drivers() {
        let (mut tables, profiles) = setup();
        let found = map(&[(0, "compress"), (1, "crypto"), (3, "crypto")]);
        let problems = apply_discovered(
            &mut tables,
            &profiles.cards[0],
            ACME.parse().unwrap(),
            &found,
        );
        assert_eq!(problems, vec![]);
        assert_eq!(
            functions(&tables, ACME),
            some(&["compress", "crypto", "", "crypto"])
        );
        let vf0 = &tables.vfs[0];
        assert_eq!(
            (
                vf0.host_driver.as_ref().unwrap().as_str(),
                vf0.guest_driver.as_ref().unwrap().as_str()
            ),
            ("uio_pci_generic", "uio_pci_generic")
        );
        let vf2 = &tables.vfs[2];
        assert_eq!((&vf2.host_driver, &vf2.guest_driver), (&None, &None));
        assert_eq!(
            tables.vfs[3].host_driver.as_ref().unwrap().as_str(),
            "vfio-pci"
        );
        // The other PF is untouched; counts are recounted; T2 and the indexes stay.
        assert_eq!(
            functions(&tables, OTHER),
            some(&["net", "net", "net", "net"])
        );
        assert_eq!(
            totals(&tables),
            [
                ("compress".into(), 1),
                ("crypto".into(), 2),
                ("net".into(), 4)
            ]
        );
        let fresh = setup().0;
        for (a, b) in tables.vfs.iter().zip(&fresh.vfs) {
            assert_eq!((a.global_index, a.location), (b.global_index, b.location));
        }
    }

    #[test]
    fn unknown_functions_leave_their_vfs_without_one_and_are_problems() {
        let (mut tables, profiles) = setup();
        let found = map(&[(0, "crypto"), (1, "gzip"), (2, "net"), (3, "gzip")]);
        let problems = apply_discovered(
            &mut tables,
            &profiles.cards[0],
            ACME.parse().unwrap(),
            &found,
        );
        assert_eq!(functions(&tables, ACME), some(&["crypto", "", "", ""]));
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].starts_with("card \"acme\": the device reports function gzip (VFs 1,3)"),
            "{messages:?}"
        );
        // "net" is another card's function, not this one's.
        assert!(messages[1].contains("function net (VFs 2)"), "{messages:?}");
        assert!(
            messages[1].ends_with("until then they carry none"),
            "{messages:?}"
        );
        assert!(
            problems
                .iter()
                .all(|p| p.device == ACME && p.attribute == "discover")
        );
        assert_eq!(tables.vfs[1].host_driver, None);
    }

    #[test]
    fn vfs_the_pf_does_not_have_are_problems() {
        let (mut tables, profiles) = setup();
        let found = map(&[
            (0, "crypto"),
            (1, "crypto"),
            (2, "compress"),
            (4, "crypto"),
            (9, "gzip"),
        ]);
        let problems = apply_discovered(
            &mut tables,
            &profiles.cards[0],
            ACME.parse().unwrap(),
            &found,
        );
        assert_eq!(
            functions(&tables, ACME),
            some(&["crypto", "crypto", "compress", ""])
        );
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        // One problem per VF it does not have, whatever the function (gzip is named there).
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].contains("lists VF 4 (function crypto), but PF 0000:3b:00.0 has no VF 4"),
            "{messages:?}"
        );
        assert!(
            messages[1].contains("lists VF 9 (function gzip)"),
            "{messages:?}"
        );
    }

    #[test]
    fn an_empty_listing_unassigns_every_vf() {
        let (mut tables, profiles) = setup();
        let problems = apply_discovered(
            &mut tables,
            &profiles.cards[0],
            ACME.parse().unwrap(),
            &BTreeMap::new(),
        );
        assert_eq!(problems, vec![]);
        assert_eq!(functions(&tables, ACME), some(&["", "", "", ""]));
        assert_eq!(
            totals(&tables),
            [
                ("compress".into(), 0),
                ("crypto".into(), 0),
                ("net".into(), 4)
            ]
        );
    }

    #[test]
    fn a_pf_missing_or_of_another_card_changes_nothing() {
        let (mut tables, profiles) = setup();
        let before = tables.clone();
        let found = map(&[(0, "compress")]);
        let problems = apply_discovered(
            &mut tables,
            &profiles.cards[0],
            "0000:99:00.0".parse().unwrap(),
            &found,
        );
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .message
                .contains("PF 0000:99:00.0 is not in the tables"),
            "{problems:?}"
        );
        let problems = apply_discovered(
            &mut tables,
            &profiles.cards[0],
            OTHER.parse().unwrap(),
            &found,
        );
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].message.contains("is covered by card \"other\""),
            "{problems:?}"
        );
        assert_eq!(problems[0].device, OTHER);
        assert_eq!(tables, before);
    }
}
