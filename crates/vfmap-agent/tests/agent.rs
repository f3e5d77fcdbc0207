//! The agent on generated guest sysfs trees, with the fake kernel reacting to its writes.

use std::path::Path;
use std::time::Duration;

use vfmap_agent::{Agent, Config, Published, find_port};
use vfmap_core::protocol::{Answer, Entry};
use vfmap_core::{Bdf, DriverName, FunctionName, LocalIndex, PciId};
use vfmap_testkit::{FakeKernel, FakeModules, SysfsTree};

struct Guest {
    dir: tempfile::TempDir,
    tree: SysfsTree,
    kernel: FakeKernel,
    modules: FakeModules,
    ports: Vec<Bdf>,
}

/// Three root ports (03.0, 03.1, 03.2) with an NVMe-ID device behind each: same IDs, three jobs.
fn guest() -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path().join("sys"));
    let ports: Vec<Bdf> = (0..3)
        .map(|i| tree.add_root_port(&format!("0000:00:03.{i}")))
        .collect();
    for (i, port) in ports.iter().enumerate() {
        tree.plug_behind(
            *port,
            &format!("0000:0{}:00.0", i + 1),
            PciId(0x1b36),
            PciId(0x0010),
        );
    }
    Guest {
        kernel: FakeKernel::new(tree.clone()),
        modules: FakeModules::new(tree.clone()),
        tree,
        ports,
        dir,
    }
}

impl Guest {
    fn config(&self) -> Config {
        Config {
            sysfs_root: self.tree.root().to_owned(),
            run_dir: self.dir.path().join("run"),
            hotplug_timeout_ms: 300,
            bind_timeout_ms: 200,
            ..Config::default()
        }
    }

    fn agent(&self) -> Agent<'_> {
        Agent::new(self.config(), &self.kernel, &self.modules)
    }

    fn driver(&self, bdf: &str) -> Option<String> {
        vfmap_sysfs::Sysfs::new(self.tree.root())
            .driver_of(bdf.parse().unwrap())
            .unwrap()
    }

    fn published(&self) -> Vec<Published> {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("run/devices.json")).unwrap())
            .unwrap()
    }
}

fn entry(local_index: u32, function: &str, driver: &str, path: &str) -> Entry {
    Entry {
        local_index: LocalIndex::new(local_index),
        function: FunctionName::new(function).unwrap(),
        guest_driver: DriverName::new(driver).unwrap(),
        path: path.parse().unwrap(),
        vendor: Some(PciId(0x1b36)),
        device: Some(PciId(0x0010)),
    }
}

fn three() -> Vec<Entry> {
    vec![
        entry(0, "storage", "nvme", "03.0/00.0"),
        entry(1, "compress", "uio_pci_generic", "03.1/00.0"),
        entry(2, "crypto", "pci-stub", "03.2/00.0"),
    ]
}

#[test]
fn same_id_devices_get_their_functions_drivers() {
    let g = guest();
    let mut agent = g.agent();
    let answers = agent.apply(&three());
    let bound: Vec<(u32, String, String)> = answers
        .iter()
        .map(|a| match a {
            Answer::Bound {
                local_index,
                driver,
                guest_bdf,
            } => (local_index.get(), driver.to_string(), guest_bdf.to_string()),
            Answer::Failed { reason, .. } => panic!("{reason}"),
        })
        .collect();
    assert_eq!(
        bound,
        [
            (0, "nvme".into(), "0000:01:00.0".into()),
            (1, "uio_pci_generic".into(), "0000:02:00.0".into()),
            (2, "pci-stub".into(), "0000:03:00.0".into())
        ]
    );
    assert_eq!(
        agent
            .timings()
            .iter()
            .map(|t| t.local_index.get())
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(g.driver("0000:01:00.0").as_deref(), Some("nvme"));
    assert_eq!(g.driver("0000:02:00.0").as_deref(), Some("uio_pci_generic"));
    assert_eq!(g.driver("0000:03:00.0").as_deref(), Some("pci-stub"));
    let published = g.published();
    assert_eq!(published.len(), 3);
    assert!(published.iter().all(|p| p.state == "bound"));
    let link = g.dir.path().join("run/by-function/crypto/2");
    let target = std::fs::canonicalize(link).unwrap();
    assert!(
        target.ends_with("0000:00:03.2/0000:03:00.0"),
        "{}",
        target.display()
    );
}

#[test]
fn applying_the_same_correspondence_twice_changes_nothing() {
    let g = guest();
    let mut agent = g.agent();
    agent.apply(&three());
    let writes = g.kernel.writes().len();
    let answers = agent.apply(&three());
    assert!(answers.iter().all(|a| matches!(a, Answer::Bound { .. })));
    assert_eq!(
        g.kernel.writes().len(),
        writes,
        "no sysfs write the second time"
    );
}

#[test]
fn removed_entries_are_unbound_and_unpublished_even_after_a_restart() {
    let g = guest();
    g.agent().apply(&three());
    // A new agent process: it learns what it had from devices.json.
    let mut agent = g.agent();
    agent.apply(&three()[..2]);
    assert_eq!(g.driver("0000:03:00.0"), None, "crypto device unbound");
    let override_text = std::fs::read_to_string(
        g.tree
            .device_link("0000:03:00.0".parse().unwrap())
            .join("driver_override"),
    )
    .unwrap();
    assert_eq!(override_text.trim(), "(null)", "override cleared");
    assert_eq!(g.published().len(), 2);
    assert!(!g.dir.path().join("run/by-function/crypto").exists());
    // Entry gone because the device was unplugged first: nothing to do, no error.
    g.tree.unplug("0000:02:00.0".parse().unwrap());
    agent.apply(&three()[..1]);
    assert_eq!(g.published().len(), 1);
}

#[test]
fn waits_for_hot_plug_and_reports_what_never_comes() {
    let g = guest();
    g.tree.unplug("0000:01:00.0".parse().unwrap());
    let tree = g.tree.clone();
    let port = g.ports[0];
    let plugger = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        tree.plug_behind(port, "0000:05:00.0", PciId(0x1b36), PciId(0x0010));
    });
    let mut agent = g.agent();
    let answers = agent.apply(&[
        entry(0, "storage", "nvme", "03.0/00.0"),
        entry(1, "x", "pci-stub", "04.0/00.0"),
    ]);
    plugger.join().unwrap();
    // The guest numbered the new bus 05: the path still finds it.
    assert!(
        matches!(&answers[0], Answer::Bound { guest_bdf, .. } if guest_bdf.to_string() == "0000:05:00.0"),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[1], Answer::Failed { reason, .. } if reason.contains("no root port")),
        "{answers:?}"
    );
}

#[test]
fn wrong_ids_disallowed_drivers_and_missing_modules_fail_clearly() {
    let g = guest();
    let mut wrong = entry(0, "storage", "nvme", "03.0/00.0");
    wrong.device = Some(PciId(0x1234));
    let mut config = g.config();
    config.allowed_drivers = Some(vec!["nvme".into(), "uio_pci_generic".into()]);
    let modules = FakeModules::new(g.tree.clone()).without("uio_pci_generic");
    let mut agent = Agent::new(config, &g.kernel, &modules);
    let answers = agent.apply(&[
        wrong,
        entry(1, "compress", "uio_pci_generic", "03.1/00.0"),
        entry(2, "crypto", "pci-stub", "03.2/00.0"),
    ]);
    let reasons: Vec<String> = answers
        .iter()
        .map(|a| match a {
            Answer::Failed { reason, .. } => reason.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        reasons[0].contains("reports 0x0010, the correspondence says 0x1234"),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[1].contains("Module uio_pci_generic not found"),
        "{}",
        reasons[1]
    );
    assert!(
        reasons[2].contains("not in this guest's allowed_drivers"),
        "{}",
        reasons[2]
    );
    assert!(
        g.kernel.writes().is_empty(),
        "nothing was written for refused entries"
    );
    assert!(g.published().iter().all(|p| p.state == "failed"));
}

#[test]
fn finds_its_port_by_name() {
    let g = guest();
    g.tree.add_virtio_port("vport0p1", "org.qemu.guest_agent.0");
    g.tree.add_virtio_port("vport0p2", "vfmap");
    let found = find_port(g.tree.root(), Path::new("/dev"), "vfmap");
    assert_eq!(found.as_deref(), Some(Path::new("/dev/vport0p2")));
    assert_eq!(find_port(g.tree.root(), Path::new("/dev"), "other"), None);
}

#[test]
fn a_device_directory_without_attributes_yet_is_waited_for() {
    let g = guest();
    let vendor = g
        .tree
        .device_link("0000:01:00.0".parse().unwrap())
        .join("vendor");
    let saved = std::fs::read(&vendor).unwrap();
    std::fs::remove_file(&vendor).unwrap();
    let restore = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(vendor, saved).unwrap();
    });
    let answers = g.agent().apply(&[entry(0, "storage", "nvme", "03.0/00.0")]);
    restore.join().unwrap();
    assert!(matches!(answers[0], Answer::Bound { .. }), "{answers:?}");
}
