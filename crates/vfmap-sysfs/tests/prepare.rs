//! `prepare` against the fake kernel: order of writes, idempotence, refusals that change nothing.

use std::time::Duration;

use vfmap_core::{Bdf, DriverName, Profiles, Step};
use vfmap_sysfs::{PrepareError, PrepareReport, Sysfs, prepare};
use vfmap_testkit::{FakeKernel, FakeModules, PfSpec, SysfsTree, copy_tree, golden_fixture};

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
host_driver = "pci-stub"
"#;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

struct Rig {
    _dir: tempfile::TempDir,
    tree: SysfsTree,
    kernel: FakeKernel,
    modules: FakeModules,
}

impl Rig {
    fn new(build: impl FnOnce(&SysfsTree)) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let tree = SysfsTree::new(dir.path().join("sys"));
        build(&tree);
        Rig {
            kernel: FakeKernel::new(tree.clone()).autoprobe_to("nvme"),
            modules: FakeModules::new(tree.clone()),
            tree,
            _dir: dir,
        }
    }

    fn prepare(&self, profile: &str) -> Result<PrepareReport, PrepareError> {
        let profiles = Profiles::parse(profile, "p.toml").unwrap();
        let sysfs = Sysfs::new(self.tree.root());
        prepare(
            &sysfs,
            &profiles,
            &self.kernel,
            &self.modules,
            Duration::from_millis(50),
            &mut |_| {},
        )
    }

    fn driver(&self, vf: &str) -> Option<String> {
        Sysfs::new(self.tree.root()).driver_of(bdf(vf)).unwrap()
    }
}

#[test]
fn fresh_host_gets_vfs_created_and_bound_with_autoprobe_off_first() {
    let rig = Rig::new(|t| {
        t.add_pf(&PfSpec::nvme("0000:01:00.0", 8));
    });
    let report = rig.prepare(PROFILE).unwrap();
    let writes = rig.kernel.writes();
    let autoprobe = writes
        .iter()
        .position(|(p, _)| p.ends_with("sriov_drivers_autoprobe"))
        .unwrap();
    let numvfs = writes
        .iter()
        .position(|(p, _)| p.ends_with("sriov_numvfs"))
        .unwrap();
    assert!(
        autoprobe < numvfs,
        "autoprobe must be off before VFs exist: {writes:?}"
    );
    assert_eq!(rig.driver("0000:01:00.1").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver("0000:01:00.2").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver("0000:01:00.3").as_deref(), Some("pci-stub"));
    assert_eq!(
        rig.driver("0000:01:00.4"),
        None,
        "VF 3 has no function: left alone"
    );
    assert_eq!(rig.modules.loaded(), ["vfio-pci", "pci-stub"]);
    assert_eq!(report.tables.vfs.len(), 4);
    assert_eq!(report.steps.len(), 2 + 3);
    for vf in &report.tables.vfs {
        if let Some(wanted) = &vf.host_driver {
            assert_eq!(
                vf.driver.as_deref(),
                Some(wanted.as_str()),
                "{}",
                vf.location
            );
        }
    }
}

#[test]
fn second_run_changes_nothing() {
    let rig = Rig::new(|t| {
        t.add_pf(&PfSpec::nvme("0000:01:00.0", 8));
    });
    rig.prepare(PROFILE).unwrap();
    let before = rig.kernel.writes().len();
    let report = rig.prepare(PROFILE).unwrap();
    assert!(report.steps.is_empty(), "{:?}", report.steps);
    assert_eq!(
        rig.kernel.writes().len(),
        before,
        "no sysfs write on the second run"
    );
}

#[test]
fn vfs_grabbed_by_another_driver_are_rebound() {
    let rig = Rig::new(|t| {
        t.add_pf(&PfSpec::nvme("0000:01:00.0", 8).with_vfs(4));
        t.link_driver(bdf("0000:01:00.1"), "nvme");
    });
    let report = rig.prepare(PROFILE).unwrap();
    assert!(report.steps.contains(&Step::Bind {
        vf: bdf("0000:01:00.1"),
        driver: DriverName::new("vfio-pci").unwrap(),
        unbind_from: Some("nvme".into()),
    }));
    assert!(
        rig.kernel
            .writes()
            .iter()
            .any(|(p, v)| p == "bus/pci/drivers/nvme/unbind" && v == "0000:01:00.1")
    );
    assert_eq!(rig.driver("0000:01:00.1").as_deref(), Some("vfio-pci"));
}

#[test]
fn changing_the_count_under_bound_vfs_is_refused_and_writes_nothing() {
    let rig = Rig::new(|t| {
        t.add_pf(&PfSpec::nvme("0000:01:00.0", 8).with_vfs(2));
        t.link_driver(bdf("0000:01:00.1"), "nvme");
    });
    let err = rig.prepare(PROFILE).unwrap_err();
    assert!(matches!(err, PrepareError::Refused(_)));
    let text = err.to_string();
    assert!(text.contains("nothing was changed"), "{text}");
    assert!(text.contains("0000:01:00.1 bound to nvme"), "{text}");
    assert!(rig.kernel.writes().is_empty());
}

#[test]
fn more_vfs_than_the_pf_supports_is_refused_and_writes_nothing() {
    let rig = Rig::new(|t| {
        t.add_pf(&PfSpec::nvme("0000:01:00.0", 3));
    });
    let err = rig.prepare(PROFILE).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(
            "p.toml: card \"acme\", field `num_vfs`: 4 is larger than sriov_totalvfs = 3"
        ),
        "{text}"
    );
    assert!(rig.kernel.writes().is_empty());
}

#[test]
fn count_changes_go_through_zero() {
    let rig = Rig::new(|t| {
        let mut pf = PfSpec::nvme("0000:01:00.0", 8).with_vfs(2);
        pf.autoprobe = false;
        t.add_pf(&pf);
    });
    rig.prepare(PROFILE).unwrap();
    let numvfs: Vec<String> = rig
        .kernel
        .writes()
        .into_iter()
        .filter(|(p, _)| p.ends_with("sriov_numvfs"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(numvfs, ["0", "4"]);
}

#[test]
fn a_bind_that_does_not_take_is_reported() {
    let rig = Rig::new(|t| {
        let mut pf = PfSpec::nvme("0000:01:00.0", 8).with_vfs(4);
        pf.autoprobe = false;
        t.add_pf(&pf);
        t.remove_iommu_group(bdf("0000:01:00.1"));
    });
    let err = rig.prepare(PROFILE).unwrap_err();
    assert!(
        matches!(err, PrepareError::BindNotEffective { found: None, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("is the IOMMU on"), "{err}");
}

#[test]
fn a_missing_module_is_reported() {
    let mut rig = Rig::new(|t| {
        t.add_pf(&PfSpec::nvme("0000:01:00.0", 8).with_vfs(4));
    });
    rig.modules = FakeModules::new(rig.tree.clone()).without("vfio-pci");
    let err = rig.prepare(PROFILE).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("driver vfio-pci is not available: modprobe: FATAL"),
        "{text}"
    );
}

#[test]
fn golden_tree_is_brought_to_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&golden_fixture(), &dir.path().join("sys")).unwrap();
    let tree = SysfsTree::new(dir.path().join("sys"));
    let rig = Rig {
        kernel: FakeKernel::new(tree.clone()),
        modules: FakeModules::new(tree.clone()),
        tree,
        _dir: dir,
    };
    let profile = PROFILE.replace("num_vfs = 4", "num_vfs = 3");
    let report = rig.prepare(&profile).unwrap();
    // VF0 was already on vfio-pci; VF1 moves from pci-stub to vfio-pci; VF2 gets pci-stub.
    assert_eq!(report.steps.len(), 2, "{:?}", report.steps);
    assert_eq!(rig.driver("0000:01:00.2").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver("0000:01:00.3").as_deref(), Some("pci-stub"));
    assert!(rig.prepare(&profile).unwrap().steps.is_empty());
}
