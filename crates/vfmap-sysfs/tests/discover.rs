//! Discovery on generated trees and on the real-kernel golden fixture.

use std::fs;
use std::os::unix::fs::symlink;

use vfmap_core::{Bdf, PciId};
use vfmap_sysfs::{Sysfs, SysfsError};
use vfmap_testkit::{PfSpec, SysfsTree, golden_fixture};

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn finds_pfs_with_and_without_vfs_and_ignores_other_devices() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    tree.add_plain_device("0000:00:1f.0");
    tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 8).with_vfs(3));
    tree.add_pf(&PfSpec::nvme("0000:01:00.0", 4));
    let facts = Sysfs::new(dir.path()).discover().unwrap();
    assert!(facts.problems.is_empty(), "{:?}", facts.problems);
    assert_eq!(facts.pfs.len(), 2);
    let (idle, busy) = (&facts.pfs[0], &facts.pfs[1]);
    assert_eq!(idle.location, bdf("0000:01:00.0"));
    assert_eq!(
        (idle.total_vfs, idle.num_vfs, idle.vfs.len()),
        (Some(4), Some(0), 0)
    );
    assert_eq!(busy.num_vfs, Some(3));
    assert_eq!(busy.vendor, Some(PciId(0x1b36)));
    assert_eq!(busy.vf_device, Some(PciId(0x0010)));
    assert_eq!(busy.driver.as_deref(), Some("nvme"));
    assert_eq!(busy.drivers_autoprobe, Some(true));
    let locations: Vec<String> = busy.vfs.iter().map(|v| v.location.to_string()).collect();
    assert_eq!(locations, ["0000:3b:00.1", "0000:3b:00.2", "0000:3b:00.3"]);
    assert_eq!(busy.vfs[2].vf_index, 2);
    assert!(
        busy.vfs
            .iter()
            .all(|v| v.driver.is_none() && v.driver_override.is_none())
    );
    assert_eq!(busy.vfs[0].numa_node, Some(0));
    let groups: Vec<_> = busy.vfs.iter().map(|v| v.iommu_group.unwrap()).collect();
    assert_eq!(groups.len(), 3);
    assert!(groups.windows(2).all(|w| w[0] != w[1]));
}

#[test]
fn a_256_vf_pf_spills_onto_the_next_bus() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 256).with_vfs(256));
    let facts = Sysfs::new(dir.path()).discover().unwrap();
    let pf = &facts.pfs[0];
    assert!(facts.problems.is_empty(), "{:?}", facts.problems);
    assert_eq!(pf.vfs.len(), 256);
    assert_eq!(pf.vfs[254].location, bdf("0000:3b:1f.7"));
    assert_eq!(pf.vfs[255].location, bdf("0000:3c:00.0"));
    // VF numbers sort numerically, not as text (virtfn10 after virtfn9).
    assert!(
        pf.vfs
            .iter()
            .enumerate()
            .all(|(i, v)| usize::from(v.vf_index) == i)
    );
}

#[test]
fn other_domains_and_strides() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    let mut spec = PfSpec::nvme("10000:e2:00.0", 16).with_vfs(4);
    spec.offset = 0x80;
    spec.stride = 2;
    spec.numa_node = -1;
    tree.add_pf(&spec);
    let facts = Sysfs::new(dir.path()).discover().unwrap();
    let pf = &facts.pfs[0];
    assert_eq!(pf.location.domain, 0x10000);
    assert_eq!(pf.vfs[3].location, bdf("10000:e2:10.6"));
    assert_eq!(pf.numa_node, None, "-1 means no NUMA affinity");
}

#[test]
fn malformed_and_missing_attributes_are_problems_of_that_device() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 8).with_vfs(3));
    tree.add_pf(&PfSpec::nvme("0000:5e:00.0", 8).with_vfs(2));
    let pf = tree.device_link(bdf("0000:3b:00.0"));
    let vf1 = tree.device_link(bdf("0000:3b:00.2"));
    fs::write(pf.join("vendor"), "acme\n").unwrap();
    fs::write(pf.join("sriov_numvfs"), "4\n").unwrap();
    fs::remove_file(pf.join("sriov_vf_device")).unwrap();
    fs::write(vf1.join("numa_node"), "lots\n").unwrap();
    fs::remove_file(vf1.join("iommu_group")).unwrap();
    symlink("../../../../kernel/iommu_groups/x", vf1.join("iommu_group")).unwrap();
    symlink("../not-a-device", pf.join("virtfn7")).unwrap();
    symlink("../0000:3b:00.6", pf.join("virtfn5")).unwrap();
    symlink("../0000:3b:00.1", pf.join("virtfnX")).unwrap();

    let facts = Sysfs::new(dir.path()).discover().unwrap();
    let broken = &facts.pfs[0];
    assert_eq!(broken.vendor, None);
    assert_eq!(
        broken.vf_device,
        Some(PciId(0x0010)),
        "without sriov_vf_device, the VFs' own device ID"
    );
    assert_eq!(broken.vfs[1].numa_node, None);
    assert_eq!(broken.vfs[1].iommu_group, None);
    let attrs: Vec<(&str, &str)> = facts
        .problems
        .iter()
        .map(|p| (p.device.as_str(), p.attribute.as_str()))
        .collect();
    for want in [
        ("0000:3b:00.0", "vendor"),
        ("0000:3b:00.2", "numa_node"),
        ("0000:3b:00.2", "iommu_group"),
        ("0000:3b:00.0", "virtfn7"),
        ("0000:3b:00.0", "virtfn5"),
        ("0000:3b:00.0", "virtfnX"),
        ("0000:3b:00.0", "sriov_numvfs"),
    ] {
        assert!(attrs.contains(&want), "missing {want:?} in {attrs:?}");
    }
    // The healthy PF is untouched by its neighbour's trouble.
    let healthy = &facts.pfs[1];
    assert_eq!(healthy.vfs.len(), 2);
    assert!(
        facts
            .problems
            .iter()
            .all(|p| !p.device.starts_with("0000:5e"))
    );
}

#[test]
fn a_wrong_root_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Sysfs::new(dir.path().join("nope")).discover().unwrap_err();
    assert!(matches!(err, SysfsError::ListDevices { .. }));
    assert!(
        err.to_string().contains("is the sysfs root right?"),
        "{err}"
    );
}

#[test]
fn golden_real_kernel_tree() {
    let facts = Sysfs::new(golden_fixture()).discover().unwrap();
    assert!(facts.problems.is_empty(), "{:?}", facts.problems);
    assert_eq!(facts.pfs.len(), 1);
    let pf = &facts.pfs[0];
    assert_eq!(pf.location, bdf("0000:01:00.0"));
    assert_eq!(
        (pf.vendor, pf.device),
        (Some(PciId(0x1b36)), Some(PciId(0x0010)))
    );
    assert_eq!((pf.total_vfs, pf.num_vfs), (Some(3), Some(3)));
    assert_eq!(
        pf.vf_device,
        Some(PciId(0x0010)),
        "the VFs share the PF's ID"
    );
    assert_eq!(pf.drivers_autoprobe, Some(false));
    assert_eq!(pf.driver.as_deref(), Some("nvme"));
    assert_eq!(pf.numa_node, None);
    let vfs: Vec<(String, Option<&str>, Option<&str>)> = pf
        .vfs
        .iter()
        .map(|v| {
            (
                v.location.to_string(),
                v.driver.as_deref(),
                v.driver_override.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        vfs,
        [
            ("0000:01:00.1".into(), Some("vfio-pci"), Some("vfio-pci")),
            ("0000:01:00.2".into(), Some("pci-stub"), Some("pci-stub")),
            ("0000:01:00.3".into(), None, None),
        ]
    );
    assert!(pf.vfs.iter().all(|v| v.iommu_group.is_some()));
}

/// (device, attribute, message) of every problem, for asserting on.
fn problems(facts: &vfmap_core::HostFacts) -> Vec<(String, String, String)> {
    facts
        .problems
        .iter()
        .map(|p| (p.device.clone(), p.attribute.clone(), p.message.clone()))
        .collect()
}

#[test]
fn before_4_15_a_pf_without_sriov_vf_device_takes_its_vfs_own_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    let mut spec = PfSpec::nvme("0000:3b:00.0", 8).with_vfs(3).before_4_15();
    spec.vf_device = PciId(0x0011);
    let pf_dir = tree.add_pf(&spec);
    for absent in ["sriov_vf_device", "sriov_offset", "sriov_stride"] {
        assert!(!pf_dir.join(absent).exists(), "{absent} is from 4.15");
    }
    let facts = Sysfs::new(dir.path()).discover().unwrap();
    assert!(facts.problems.is_empty(), "{:?}", facts.problems);
    let pf = &facts.pfs[0];
    assert_eq!(pf.vf_device, Some(PciId(0x0011)));
    assert_eq!(pf.vfs.len(), 3);

    let tables = vfmap_core::Tables::build(&facts, &vfmap_core::Profiles::default());
    for vf in &tables.vfs {
        assert_eq!(
            (vf.vendor, vf.device),
            (Some(PciId(0x1b36)), Some(PciId(0x0011))),
            "{vf:?}"
        );
    }

    // One VF without its own `device`: the others still say the ID, and that VF is reported.
    tree.remove_attribute(bdf("0000:3b:00.2"), "device");
    let facts = Sysfs::new(dir.path()).discover().unwrap();
    assert_eq!(facts.pfs[0].vf_device, Some(PciId(0x0011)));
    assert_eq!(
        problems(&facts),
        [(
            "0000:3b:00.2".into(),
            "device".into(),
            "missing, and its PF has no readable sriov_vf_device: the VF's device ID is unknown"
                .into()
        )]
    );

    // VFs that disagree (no real kernel does this): unknown, and said why.
    fs::write(
        tree.device_link(bdf("0000:3b:00.3")).join("device"),
        "0x0012\n",
    )
    .unwrap();
    let facts = Sysfs::new(dir.path()).discover().unwrap();
    assert_eq!(facts.pfs[0].vf_device, None);
    let all = problems(&facts);
    assert!(
        all.iter()
            .any(|(device, attribute, message)| device == "0000:3b:00.0"
                && attribute == "sriov_vf_device"
                && message.contains("0000:3b:00.1 says 0x0011, 0000:3b:00.3 says 0x0012")),
        "{all:?}"
    );
}

#[test]
fn every_missing_attribute_vfmap_needs_is_a_problem_of_its_device() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 8).with_vfs(2));
    tree.add_pf(&PfSpec::nvme("0000:5e:00.0", 8).with_vfs(2));
    let (pf, vf) = (bdf("0000:3b:00.0"), bdf("0000:3b:00.2"));
    for attribute in [
        "vendor",
        "device",
        "numa_node",
        "sriov_numvfs",
        "sriov_drivers_autoprobe",
    ] {
        tree.remove_attribute(pf, attribute);
    }
    tree.remove_attribute(vf, "driver_override");
    tree.remove_attribute(vf, "numa_node");

    let facts = Sysfs::new(dir.path()).discover().unwrap();
    let broken = &facts.pfs[0];
    assert_eq!(
        (broken.vendor, broken.device, broken.num_vfs),
        (None, None, None)
    );
    assert_eq!(broken.drivers_autoprobe, None);
    assert_eq!(broken.vfs.len(), 2, "the scan goes on");
    let found = problems(&facts);
    let want = [
        (
            "0000:3b:00.0",
            "vendor",
            "missing: the device's ID is unknown, so no card can match it",
        ),
        (
            "0000:3b:00.0",
            "device",
            "missing: the device's ID is unknown, so no card can match it",
        ),
        (
            "0000:3b:00.0",
            "numa_node",
            "missing: the NUMA node is unknown (a kernel built without CONFIG_NUMA has no numa_node)",
        ),
        (
            "0000:3b:00.0",
            "sriov_numvfs",
            "missing: how many VFs are enabled is unknown",
        ),
        (
            "0000:3b:00.0",
            "sriov_drivers_autoprobe",
            "missing: `vfmap prepare` cannot keep host drivers off new VFs (kernels before 4.12 lack it)",
        ),
        (
            "0000:3b:00.2",
            "numa_node",
            "missing: the NUMA node is unknown (a kernel built without CONFIG_NUMA has no numa_node)",
        ),
        (
            "0000:3b:00.2",
            "driver_override",
            "missing: `vfmap prepare` cannot bind this VF to its host driver (kernels before 3.16 lack it)",
        ),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(d, a, m)| ((*d).to_owned(), (*a).to_owned(), (*m).to_owned()))
        .collect();
    let mut sorted = found.clone();
    sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(sorted, want_sorted, "exactly these, nothing on 0000:5e");
    assert!(facts.problems.iter().all(|p| !p.permission_denied));
}

#[test]
fn a_kernel_without_numa_reports_numa_node_per_device_but_lists_everything() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    tree.add_plain_device("0000:00:1f.0");
    tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 8).with_vfs(2));
    assert_eq!(tree.remove_attribute_everywhere("numa_node"), 4);
    let facts = Sysfs::new(dir.path()).discover().unwrap();
    let pf = &facts.pfs[0];
    assert_eq!(pf.vfs.len(), 2);
    assert_eq!(pf.vf_device, Some(PciId(0x0010)));
    assert!(pf.numa_node.is_none() && pf.vfs.iter().all(|v| v.numa_node.is_none()));
    let found: Vec<(String, String)> = problems(&facts)
        .into_iter()
        .map(|(d, a, _)| (d, a))
        .collect();
    assert_eq!(
        found,
        [
            ("0000:3b:00.0".into(), "numa_node".into()),
            ("0000:3b:00.1".into(), "numa_node".into()),
            ("0000:3b:00.2".into(), "numa_node".into()),
        ],
        "only what vfmap reads: the plain device's numa_node is not needed"
    );

    // VFs enabled later on that kernel have no numa_node either.
    tree.set_num_vfs(bdf("0000:3b:00.0"), 0, None).unwrap();
    tree.set_num_vfs(bdf("0000:3b:00.0"), 3, None).unwrap();
    assert!(
        !tree
            .device_link(bdf("0000:3b:00.3"))
            .join("numa_node")
            .exists()
    );
}

/// Discovery skips probing the names a PF's `sriov_offset`/`sriov_stride`/`sriov_numvfs` say
/// are its VFs, but that is only a hint: a PF whose layout lies (here A says its VFs start at
/// 3, where PF B is) still leaves B found, with both PFs' VFs from their `virtfnN` links.
#[test]
fn a_pf_at_a_place_another_pfs_layout_claims_is_still_found() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    tree.add_pf(&PfSpec::nvme("0000:10:00.0", 2).with_vfs(2)); // VFs 10:00.1, 10:00.2
    tree.add_pf(&PfSpec::nvme("0000:10:00.3", 2).with_vfs(2)); // VFs 10:00.4, 10:00.5
    fs::write(
        tree.device_link(bdf("0000:10:00.0")).join("sriov_offset"),
        "3\n",
    )
    .unwrap();
    let facts = Sysfs::new(dir.path()).discover().unwrap();
    assert!(facts.problems.is_empty(), "{:?}", facts.problems);
    let found: Vec<(String, Vec<String>)> = facts
        .pfs
        .iter()
        .map(|pf| {
            let vfs = pf.vfs.iter().map(|v| v.location.to_string()).collect();
            (pf.location.to_string(), vfs)
        })
        .collect();
    assert_eq!(
        found,
        [
            (
                "0000:10:00.0".into(),
                vec!["0000:10:00.1".into(), "0000:10:00.2".into()]
            ),
            (
                "0000:10:00.3".into(),
                vec!["0000:10:00.4".into(), "0000:10:00.5".into()]
            ),
        ]
    );
}

/// Every VF's (location, driver) as discovery reports it.
fn vf_drivers(root: &std::path::Path) -> Vec<(String, Option<String>)> {
    let facts = Sysfs::new(root).discover().unwrap();
    assert!(facts.problems.is_empty(), "{:?}", facts.problems);
    facts
        .pfs
        .iter()
        .flat_map(|pf| &pf.vfs)
        .map(|vf| (vf.location.to_string(), vf.driver.clone()))
        .collect()
}

#[test]
fn bindings_read_from_the_drivers_side_match_every_devices_own_link() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 8).with_vfs(4));
    tree.link_driver(bdf("0000:3b:00.1"), "vfio-pci");
    tree.link_driver(bdf("0000:3b:00.3"), "pci-stub");
    let sysfs = Sysfs::new(dir.path());
    let found = vf_drivers(dir.path());
    let own_links: Vec<(String, Option<String>)> = found
        .iter()
        .map(|(vf, _)| (vf.clone(), sysfs.driver_of(bdf(vf)).unwrap()))
        .collect();
    assert_eq!(found, own_links);
    assert_eq!(
        found.iter().filter(|(_, d)| d.is_some()).count(),
        2,
        "{found:?}"
    );
    // Unbound again: gone from both sides.
    tree.unlink_driver(bdf("0000:3b:00.1"), Some("vfio-pci"))
        .unwrap();
    assert_eq!(vf_drivers(dir.path())[0], ("0000:3b:00.1".into(), None));
}

#[test]
fn a_tree_without_the_drivers_side_reads_each_devices_driver_link() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sys");
    vfmap_testkit::copy_tree(&golden_fixture(), &root).unwrap();
    let with_both = vf_drivers(&root);
    for driver in fs::read_dir(root.join("bus/pci/drivers")).unwrap() {
        for entry in fs::read_dir(driver.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_symlink() {
                fs::remove_file(path).unwrap();
            }
        }
    }
    assert_eq!(vf_drivers(&root), with_both);
    assert_eq!(with_both[0].1.as_deref(), Some("vfio-pci"));
}

#[test]
fn a_vf_link_not_in_the_kernels_sibling_form_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 8).with_vfs(2));
    tree.link_driver(bdf("0000:3b:00.2"), "vfio-pci");
    let before = Sysfs::new(dir.path()).discover().unwrap();
    // The same VF, named by a longer path (through the PF's parent's own name).
    let pf = tree.device_link(bdf("0000:3b:00.0"));
    let parent = fs::canonicalize(&pf).unwrap();
    let parent = parent
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    fs::remove_file(pf.join("virtfn1")).unwrap();
    symlink(format!("../../{parent}/0000:3b:00.2"), pf.join("virtfn1")).unwrap();
    let after = Sysfs::new(dir.path()).discover().unwrap();
    assert!(after.problems.is_empty(), "{:?}", after.problems);
    assert_eq!(after.pfs[0].vfs, before.pfs[0].vfs);
    assert_eq!(after.pfs[0].vfs[1].driver.as_deref(), Some("vfio-pci"));
}
