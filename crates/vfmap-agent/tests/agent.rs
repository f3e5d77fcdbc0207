//! The agent on generated guest sysfs trees, with the fake kernel reacting to its writes and
//! the kernel's uevents fed by a test double.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use vfmap_agent::uevent::{self, Action, Uevent};
use vfmap_agent::{
    Agent, Config, DeviceEvents, FunctionConfig, MetadataConfig, MetadataSource, Polling,
    Published, Source, Wake, check_metadata, find_port, load_config, metadata,
};
use vfmap_core::protocol::{Answer, Entry};
use vfmap_core::{Bdf, DriverName, FunctionName, LocalIndex, PciId};
use vfmap_sysfs::SysfsWriter;
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

    /// An agent whose uevents come from a feed that never sends anything.
    fn agent(&self) -> Agent<'_> {
        let (events, _feed) = fed(&self.tree, |_, _| {});
        Agent::new(self.config(), &self.kernel, &self.modules, events)
    }

    fn agent_with(&self, events: Box<dyn DeviceEvents>) -> Agent<'_> {
        Agent::new(self.config(), &self.kernel, &self.modules, events)
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

/// The test's side of the uevent socket: what it sends, the agent's waits receive, as the
/// kernel's bytes (so they go through the parser).
#[derive(Clone)]
struct Feed {
    tx: mpsc::Sender<Vec<u8>>,
    root: PathBuf,
    waits: Arc<AtomicUsize>,
}

impl Feed {
    /// Sends `action` for the PCI device `bdf` (its DEVPATH read from the tree, or given).
    fn send_pci(&self, action: Action, bdf: Bdf, driver: Option<&str>) {
        let link = self.root.join("bus/pci/devices").join(bdf.to_string());
        let dir = std::fs::canonicalize(link).unwrap();
        let devpath = dir.strip_prefix(&self.root).unwrap();
        self.send(Uevent {
            action,
            devpath: format!("/{}", devpath.display()),
            subsystem: Some("pci".into()),
            driver: driver.map(Into::into),
            seqnum: Some(1),
        });
    }

    fn send(&self, event: Uevent) {
        // The agent may be gone already (a thread sending late): nothing to deliver to.
        let _ = self.tx.send(event.to_bytes());
    }

    /// How many times the agent blocked waiting for an event.
    fn waits(&self) -> usize {
        self.waits.load(Ordering::SeqCst)
    }
}

type OnWait = Box<dyn FnMut(usize, &Feed)>;

/// A [`DeviceEvents`] fed by the test; `on_wait(n, feed)` runs as the agent starts its n-th
/// wait (from 0), before it blocks, so a test can act "while the agent waits" without racing.
struct FedEvents {
    rx: mpsc::Receiver<Vec<u8>>,
    feed: Feed,
    on_wait: OnWait,
}

impl DeviceEvents for FedEvents {
    fn wait(&mut self, deadline: Instant) -> Wake {
        let n = self.feed.waits.fetch_add(1, Ordering::SeqCst);
        (self.on_wait)(n, &self.feed);
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(bytes) => uevent::parse(&bytes).map_or(Wake::Recheck, Wake::Event),
            Err(mpsc::RecvTimeoutError::Timeout) => Wake::TimedOut,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(left);
                Wake::TimedOut
            }
        }
    }

    fn discard_pending(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }
}

fn fed(
    tree: &SysfsTree,
    on_wait: impl FnMut(usize, &Feed) + 'static,
) -> (Box<dyn DeviceEvents>, Feed) {
    let (tx, rx) = mpsc::channel();
    let feed = Feed {
        tx,
        root: tree.root().to_owned(),
        waits: Arc::new(AtomicUsize::new(0)),
    };
    let events = FedEvents {
        rx,
        feed: feed.clone(),
        on_wait: Box::new(on_wait),
    };
    (Box::new(events), feed)
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
    let (events, feed) = fed(&g.tree, |_, _| {});
    let mut agent = g.agent_with(events);
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
    assert_eq!(feed.waits(), 0, "all there, all bound at once: no wait");
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
    // The apply's own timing (the benchmarks split the host's wait with it): every entry
    // found and bound before `bound`, published by `applied`.
    let apply = agent.apply_timing().expect("an apply's timing");
    assert_eq!(apply.entries, 3);
    for t in agent.timings() {
        assert!(t.device + t.bind <= apply.bound, "{t:?} vs {apply:?}");
    }
    assert!(apply.bound <= apply.applied, "{apply:?}");
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
    let (tree, port) = (g.tree.clone(), g.ports[0]);
    let (events, feed) = fed(&g.tree, |_, _| {});
    let kernel = feed.clone();
    let plugger = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        // Events the wait must sleep through: another subsystem's.
        kernel.send(Uevent {
            action: Action::Add,
            devpath: "/devices/virtual/net/tap0".into(),
            subsystem: Some("net".into()),
            driver: None,
            seqnum: Some(7),
        });
        let bdf = tree.plug_behind(port, "0000:05:00.0", PciId(0x1b36), PciId(0x0010));
        kernel.send_pci(Action::Add, bdf, None);
    });
    let mut agent = g.agent_with(events);
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
    // Woken by the two events, not by a clock: the net event, then the PCI add.
    assert_eq!(feed.waits(), 2);
    let device = agent.timings()[0].device;
    assert!(
        device >= Duration::from_millis(100) && device < Duration::from_millis(300),
        "{device:?}"
    );
}

#[test]
fn a_hot_plug_is_seen_through_its_event_not_by_polling() {
    let g = guest();
    g.tree.unplug("0000:01:00.0".parse().unwrap());
    let (tree, port) = (g.tree.clone(), g.ports[0]);
    // While the agent waits, the device appears but the kernel's event never comes.
    let (events, feed) = fed(&g.tree, move |n, _| {
        if n == 0 {
            tree.plug_behind(port, "0000:05:00.0", PciId(0x1b36), PciId(0x0010));
        }
    });
    let started = Instant::now();
    let answers = g
        .agent_with(events)
        .apply(&[entry(0, "storage", "nvme", "03.0/00.0")]);
    assert!(
        matches!(&answers[0], Answer::Failed { reason, .. } if reason.contains("no device at 03.0/00.0")),
        "{answers:?}"
    );
    assert_eq!(feed.waits(), 1, "one blocking wait until the deadline");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // With the event, the same hot-plug is seen at once.
    g.tree.unplug("0000:05:00.0".parse().unwrap());
    let (tree, port) = (g.tree.clone(), g.ports[0]);
    let (events, feed) = fed(&g.tree, move |n, feed| {
        if n == 0 {
            let bdf = tree.plug_behind(port, "0000:05:00.0", PciId(0x1b36), PciId(0x0010));
            feed.send_pci(Action::Add, bdf, None);
        }
    });
    let answers = g
        .agent_with(events)
        .apply(&[entry(0, "storage", "nvme", "03.0/00.0")]);
    assert!(matches!(answers[0], Answer::Bound { .. }), "{answers:?}");
    assert_eq!(feed.waits(), 1);
}

/// A kernel whose probes finish later, as asynchronous probes do: `drivers_probe` is accepted
/// and the device is bound when the test finishes the probe, which sends the `bind` event.
struct AsyncProbes<'k> {
    kernel: &'k FakeKernel,
    probe: PathBuf,
    pending: Arc<std::sync::Mutex<Vec<Bdf>>>,
}

impl SysfsWriter for AsyncProbes<'_> {
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        if path == self.probe {
            self.pending
                .lock()
                .unwrap()
                .push(value.trim().parse().unwrap());
            Ok(())
        } else {
            self.kernel.write(path, value)
        }
    }
}

/// Finishes the pending probes: each device is bound to `driver`, or to its override.
fn finish_probes(
    tree: &SysfsTree,
    pending: &std::sync::Mutex<Vec<Bdf>>,
    feed: &Feed,
    driver: Option<&str>,
) {
    for bdf in pending.lock().unwrap().drain(..) {
        let wanted = std::fs::read_to_string(tree.device_link(bdf).join("driver_override"))
            .unwrap()
            .trim()
            .to_owned();
        let driver = driver.unwrap_or(&wanted);
        tree.link_driver(bdf, driver);
        feed.send_pci(Action::Bind, bdf, Some(driver));
    }
}

#[test]
fn an_asynchronous_probe_is_waited_for_until_its_bind_event() {
    let g = guest();
    let pending = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = AsyncProbes {
        kernel: &g.kernel,
        probe: g.tree.root().join("bus/pci/drivers_probe"),
        pending: pending.clone(),
    };
    let tree = g.tree.clone();
    let (events, feed) = fed(&g.tree, move |n, feed| {
        if n == 0 {
            // A PCI event of another device first: the wait sleeps through it.
            feed.send_pci(Action::Change, "0000:01:00.0".parse().unwrap(), None);
            // The ID-matched driver's own asynchronous probe wins the race.
            finish_probes(&tree, &pending, feed, Some("nvme"));
        } else {
            finish_probes(&tree, &pending, feed, None);
        }
    });
    let mut agent = Agent::new(g.config(), &writer, &g.modules, events);
    let answers = agent.apply(&[entry(2, "crypto", "pci-stub", "03.2/00.0")]);
    assert!(matches!(answers[0], Answer::Bound { .. }), "{answers:?}");
    assert_eq!(g.driver("0000:03:00.0").as_deref(), Some("pci-stub"));
    assert!(
        g.kernel
            .writes()
            .contains(&("bus/pci/drivers/nvme/unbind".into(), "0000:03:00.0".into())),
        "the racing driver was unbound"
    );
    // Woken by: the other device's event (slept through), nvme's bind (unbound, probed
    // again), pci-stub's bind (done).
    assert_eq!(feed.waits(), 3);
}

#[test]
fn the_entries_of_one_correspondence_probe_together_and_share_one_wait() {
    let g = guest();
    let pending = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = AsyncProbes {
        kernel: &g.kernel,
        probe: g.tree.root().join("bus/pci/drivers_probe"),
        pending: pending.clone(),
    };
    let (tree, started) = (g.tree.clone(), pending.clone());
    let probes_at_first_wait = Arc::new(AtomicUsize::new(usize::MAX));
    let seen = probes_at_first_wait.clone();
    let (events, feed) = fed(&g.tree, move |n, feed| {
        if n == 0 {
            // Every probe was started before the agent waited for any.
            seen.store(started.lock().unwrap().len(), Ordering::SeqCst);
            finish_probes(&tree, &started, feed, None);
        }
    });
    let mut agent = Agent::new(g.config(), &writer, &g.modules, events);
    let answers = agent.apply(&three());
    assert!(
        answers.iter().all(|a| matches!(a, Answer::Bound { .. })),
        "{answers:?}"
    );
    assert_eq!(probes_at_first_wait.load(Ordering::SeqCst), 3);
    // One wait for the three (one after another, each would wait for its own probe before the
    // next one starts: three waits, three probe times).
    assert_eq!(feed.waits(), 1);
    assert_eq!(g.driver("0000:01:00.0").as_deref(), Some("nvme"));
    assert_eq!(g.driver("0000:02:00.0").as_deref(), Some("uio_pci_generic"));
    assert_eq!(g.driver("0000:03:00.0").as_deref(), Some("pci-stub"));
}

#[test]
fn a_probe_that_never_binds_fails_at_the_bind_deadline() {
    let g = guest();
    let kernel = FakeKernel::new(g.tree.clone()).fail_probe("pci-stub");
    let (events, feed) = fed(&g.tree, |_, _| {});
    let started = Instant::now();
    let answers = Agent::new(g.config(), &kernel, &g.modules, events).apply(&[entry(
        2,
        "crypto",
        "pci-stub",
        "03.2/00.0",
    )]);
    assert!(
        matches!(&answers[0], Answer::Failed { reason, .. }
            if reason.contains("after probing, 0000:03:00.0 is bound to no driver, not pci-stub")),
        "{answers:?}"
    );
    assert_eq!(feed.waits(), 1, "one blocking wait until the deadline");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn wrong_ids_disallowed_drivers_and_missing_modules_fail_clearly() {
    let g = guest();
    let mut wrong = entry(0, "storage", "nvme", "03.0/00.0");
    wrong.device = Some(PciId(0x1234));
    let mut config = g.config();
    config.allowed_drivers = Some(vec!["nvme".into(), "uio_pci_generic".into()]);
    let modules = FakeModules::new(g.tree.clone()).without("uio_pci_generic");
    let (events, feed) = fed(&g.tree, |_, _| {});
    let mut agent = Agent::new(config, &g.kernel, &modules, events);
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
    assert_eq!(feed.waits(), 0, "nothing was waited for");
}

#[test]
fn finds_its_port_by_name() {
    let g = guest();
    g.tree.add_virtio_port("vport0p1", "org.qemu.guest_agent.0");
    g.tree.add_virtio_port("vport0p2", "vfmap");
    let found = find_port(g.tree.root(), Path::new("/dev"), &["vfmap"]);
    assert_eq!(found.as_deref(), Some(Path::new("/dev/vport0p2")));
    assert_eq!(
        find_port(g.tree.root(), Path::new("/dev"), &["other"]),
        None
    );
}

/// Left at its default, the agent serves `org.vfmap.0` (the name libvirt domains use) and, in
/// VMs started before that default, the older `vfmap`; the new name wins when both exist.
#[test]
fn its_default_port_is_org_vfmap_0_or_else_the_legacy_name() {
    let defaults = Config::default();
    assert_eq!(defaults.port_names(), ["org.vfmap.0", "vfmap"]);
    let g = guest();
    g.tree.add_virtio_port("vport0p1", "vfmap");
    let root = g.tree.root();
    let found = find_port(root, Path::new("/dev"), &defaults.port_names());
    assert_eq!(found.as_deref(), Some(Path::new("/dev/vport0p1")));
    g.tree.add_virtio_port("vport0p2", "org.vfmap.0");
    let found = find_port(root, Path::new("/dev"), &defaults.port_names());
    assert_eq!(found.as_deref(), Some(Path::new("/dev/vport0p2")));
    let configured: Config = toml::from_str(r#"port_name = "vfmap""#).unwrap();
    let found = find_port(root, Path::new("/dev"), &configured.port_names());
    assert_eq!(
        found.as_deref(),
        Some(Path::new("/dev/vport0p1")),
        "a configured name only"
    );
}

/// Without uevents (the fallback), the directory can be seen before its attributes.
#[test]
fn polling_waits_for_a_device_directory_without_attributes_yet() {
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
    let polling = Box::new(Polling::new(Duration::from_millis(10)));
    let answers = g
        .agent_with(polling)
        .apply(&[entry(0, "storage", "nvme", "03.0/00.0")]);
    restore.join().unwrap();
    assert!(matches!(answers[0], Answer::Bound { .. }), "{answers:?}");
}

// ---- The correspondence from config-drive metadata, alone and with the host's ----

fn functions(allowed_ids: bool) -> BTreeMap<String, FunctionConfig> {
    let f = |driver: &str| FunctionConfig {
        driver: driver.into(),
        vendor: allowed_ids.then_some(PciId(0x1b36)),
        device: allowed_ids.then_some(PciId(0x0010)),
    };
    BTreeMap::from([
        ("storage".into(), f("nvme")),
        ("compress".into(), f("uio_pci_generic")),
        ("crypto".into(), f("pci-stub")),
    ])
}

fn metadata_doc(devices: &[(&str, &str)]) -> metadata::Parsed {
    let devices: Vec<serde_json::Value> = devices
        .iter()
        .map(|(address, tag)| {
            serde_json::json!({"type": "hostdev", "bus": "pci", "address": address,
                "numaNode": 0, "tags": [tag]})
        })
        .collect();
    let doc = serde_json::json!({"uuid": "vm", "devices": devices});
    metadata::parse(doc.to_string().as_bytes()).unwrap()
}

fn states(published: &[Published]) -> Vec<(String, String, Option<String>)> {
    published
        .iter()
        .map(|p| {
            (
                p.guest_bdf.clone().unwrap_or_default(),
                p.state.clone(),
                p.driver.clone(),
            )
        })
        .collect()
}

#[test]
fn metadata_alone_binds_each_tagged_device_its_functions_driver() {
    let g = guest();
    let mut agent = g.agent();
    let parsed = metadata_doc(&[
        ("0000:01:00.0", "vfmap:storage"),
        ("0000:02:00.0", "vfmap:compress"),
        ("0000:03:00.0", "vfmap:crypto"),
    ]);
    let published = agent.apply_metadata(&parsed, &functions(true));
    assert_eq!(
        states(&published),
        [
            ("0000:01:00.0".into(), "bound".into(), Some("nvme".into())),
            (
                "0000:02:00.0".into(),
                "bound".into(),
                Some("uio_pci_generic".into())
            ),
            (
                "0000:03:00.0".into(),
                "bound".into(),
                Some("pci-stub".into())
            ),
        ]
    );
    assert_eq!(g.driver("0000:01:00.0").as_deref(), Some("nvme"));
    assert_eq!(g.driver("0000:02:00.0").as_deref(), Some("uio_pci_generic"));
    assert_eq!(g.driver("0000:03:00.0").as_deref(), Some("pci-stub"));
    let on_disk = g.published();
    assert_eq!(on_disk.len(), 3);
    assert!(
        on_disk
            .iter()
            .all(|p| p.source == Source::Metadata && p.local_index.is_none() && p.path.is_none())
    );
    // by-function links are named by guest address for metadata entries.
    let link = g.dir.path().join("run/by-function/crypto/0000:03:00.0");
    assert!(
        std::fs::canonicalize(link)
            .unwrap()
            .ends_with("0000:00:03.2/0000:03:00.0")
    );
    // Idempotent: a restarted agent reading the same metadata writes nothing new.
    let writes = g.kernel.writes().len();
    let mut again = g.agent();
    again.apply_metadata(&parsed, &functions(true));
    assert_eq!(g.kernel.writes().len(), writes);
}

#[test]
fn metadata_entries_outside_the_config_are_reported_and_skipped() {
    let g = guest();
    let mut config = g.config();
    config.allowed_drivers = Some(vec!["nvme".into(), "uio_pci_generic".into()]);
    let (events, _feed) = fed(&g.tree, |_, _| {});
    let mut agent = Agent::new(config, &g.kernel, &g.modules, events);
    let mut functions = functions(true);
    functions.get_mut("compress").unwrap().device = Some(PciId(0x1234));
    let parsed = metadata_doc(&[
        ("0000:01:00.0", "vfmap:unknown"),  // not in [metadata.functions]
        ("0000:02:00.0", "vfmap:compress"), // wrong device ID
        ("0000:03:00.0", "vfmap:crypto"),   // pci-stub not allowed
        ("0000:09:00.0", "vfmap:storage"),  // no such device
    ]);
    let published = agent.apply_metadata(&parsed, &functions);
    let reasons: Vec<String> = published
        .iter()
        .map(|p| {
            assert_eq!(p.state, "failed");
            p.reason.clone().unwrap()
        })
        .collect();
    assert!(reasons[0].contains("function unknown is not in this guest's [metadata.functions]"));
    assert!(reasons[1].contains("reports 0x0010, the correspondence says 0x1234"));
    assert!(reasons[2].contains("pci-stub is not in this guest's allowed_drivers"));
    assert!(reasons[3].contains("no device at 0000:09:00.0"));
    for bdf in ["0000:01:00.0", "0000:02:00.0", "0000:03:00.0"] {
        assert_eq!(g.driver(bdf), None, "{bdf} bound");
    }
    assert!(!g.dir.path().join("run/by-function/crypto").exists());
}

#[test]
fn a_device_claimed_by_metadata_is_refused_to_the_host_and_the_reverse() {
    let g = guest();
    let mut agent = g.agent();
    // The metadata has 01:00.0 (the device behind 03.0) for storage.
    let parsed = metadata_doc(&[("0000:01:00.0", "vfmap:storage")]);
    agent.apply_metadata(&parsed, &functions(false));
    // The host sends all three: the first is the metadata's device.
    let answers = agent.apply(&three());
    match &answers[0] {
        Answer::Failed { reason, .. } => assert!(
            reason.contains("claimed by both")
                && reason.contains("the metadata's function storage has it"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(answers[1], Answer::Bound { .. }));
    assert!(matches!(answers[2], Answer::Bound { .. }));
    assert_eq!(
        g.driver("0000:01:00.0").as_deref(),
        Some("nvme"),
        "not taken over"
    );
    let published = g.published();
    assert_eq!(published.len(), 4, "three host entries and the metadata's");
    let host0 = published
        .iter()
        .find(|p| p.local_index == Some(LocalIndex::new(0)))
        .unwrap();
    assert_eq!(
        (host0.state.as_str(), host0.guest_bdf.as_deref()),
        ("failed", None)
    );

    // The reverse: a restarted agent whose metadata now also names the host's 03:00.0.
    let mut agent = g.agent();
    let parsed = metadata_doc(&[
        ("0000:01:00.0", "vfmap:storage"),
        ("0000:03:00.0", "vfmap:compress"),
    ]);
    let published = agent.apply_metadata(&parsed, &functions(false));
    assert_eq!(published[0].state, "bound");
    assert_eq!(published[1].state, "failed");
    let reason = published[1].reason.as_deref().unwrap();
    assert!(
        reason.contains("the host's local index 2 has it"),
        "{reason}"
    );
    assert_eq!(g.driver("0000:03:00.0").as_deref(), Some("pci-stub"));
    // The host's re-send keeps its device; releasing it later leaves the metadata's alone.
    let answers = agent.apply(&three()[1..]);
    assert!(answers.iter().all(|a| matches!(a, Answer::Bound { .. })));
    agent.apply(&[]);
    assert_eq!(g.driver("0000:03:00.0"), None);
    assert_eq!(g.driver("0000:01:00.0").as_deref(), Some("nvme"));
}

#[test]
fn metadata_entries_that_disappear_are_released_on_the_next_read() {
    let g = guest();
    let mut agent = g.agent();
    agent.apply_metadata(
        &metadata_doc(&[
            ("0000:01:00.0", "vfmap:storage"),
            ("0000:03:00.0", "vfmap:crypto"),
        ]),
        &functions(false),
    );
    let mut agent = g.agent();
    agent.apply_metadata(
        &metadata_doc(&[("0000:01:00.0", "vfmap:storage")]),
        &functions(false),
    );
    assert_eq!(g.driver("0000:03:00.0"), None);
    assert_eq!(g.driver("0000:01:00.0").as_deref(), Some("nvme"));
    assert_eq!(g.published().len(), 1);
}

#[test]
fn the_metadata_file_source_and_config_checks() {
    let g = guest();
    let path = g.dir.path().join("meta_data.json");
    std::fs::write(&path, br#"{"devices":[]}"#).unwrap();
    let text = format!(
        "[metadata]\nsource = \"file\"\npath = {path:?}\n[metadata.functions.crypto]\ndriver = \"pci-stub\"\nvendor = \"0x1b36\"\n"
    );
    let config_path = g.dir.path().join("agent.toml");
    std::fs::write(&config_path, &text).unwrap();
    let mut config = load_config(&config_path).unwrap();
    assert_eq!(check_metadata(&config), Ok(vec![]));
    let metadata_config = config.metadata.clone().unwrap();
    config.sysfs_root = g.tree.root().to_owned();
    let (events, _feed) = fed(&g.tree, |_, _| {});
    let mut agent = Agent::new(config.clone(), &g.kernel, &g.modules, events);
    let (bytes, from) = agent.read_metadata(&metadata_config).unwrap();
    assert_eq!(bytes, br#"{"devices":[]}"#);
    assert_eq!(from, path.display().to_string());

    let check = |toml: &str| {
        let mut c: Config = toml::from_str(toml).map_err(|e| e.to_string())?;
        c.allowed_drivers = Some(vec!["nvme".into()]);
        check_metadata(&c)
    };
    let need_path =
        check("[metadata]\nsource = \"file\"\n[metadata.functions.a]\ndriver = \"nvme\"");
    assert!(need_path.unwrap_err().contains("needs path"));
    let stray_path = check("[metadata]\npath = \"/x\"\n[metadata.functions.a]\ndriver = \"nvme\"");
    assert!(stray_path.unwrap_err().contains("only with source"));
    assert!(check("[metadata]\n").unwrap_err().contains("no functions"));
    let bad_driver = check("[metadata.functions.a]\ndriver = \"../x\"");
    assert!(bad_driver.unwrap_err().contains("not a plain module name"));
    let bad_name = check("[metadata.functions.A]\ndriver = \"nvme\"");
    assert!(bad_name.unwrap_err().contains("not a valid function name"));
    let warned = check("[metadata.functions.a]\ndriver = \"pci-stub\"").unwrap();
    assert!(warned[0].contains("not in allowed_drivers"), "{warned:?}");
    assert!(
        check("[metadata]\nsourc = \"file\"").is_err(),
        "unknown keys are errors"
    );
    assert!(check("[metadata.functions.a]\ndriver = \"nvme\"\nvendor = \"x\"").is_err());
}

#[test]
fn the_config_drive_is_waited_for_and_reported_when_missing_or_doubled() {
    let g = guest();
    let metadata_config = MetadataConfig {
        source: MetadataSource::ConfigDrive,
        path: None,
        timeout_ms: 100,
        functions: functions(false),
    };
    let mut config = g.config();
    config.dev_root = g.dir.path().join("dev");
    std::fs::create_dir_all(&config.dev_root).unwrap();
    let (events, _feed) = fed(&g.tree, |_, _| {});
    let mut agent = Agent::new(config.clone(), &g.kernel, &g.modules, events);
    let err = agent
        .read_metadata(&metadata_config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no block device labelled config-2"), "{err}");
    // Two drives labelled config-2 (ISO 9660 primary volume descriptors at 32 KiB).
    for name in ["sr0", "vdb"] {
        std::fs::create_dir_all(g.tree.root().join("class/block").join(name)).unwrap();
        let mut image = vec![0u8; 34_816];
        image[32_768..32_775].copy_from_slice(b"\x01CD001\x01");
        image[32_808..32_840].fill(b' ');
        image[32_808..32_816].copy_from_slice(b"config-2");
        std::fs::write(config.dev_root.join(name), image).unwrap();
    }
    let err = agent
        .read_metadata(&metadata_config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("several block devices are labelled config-2 (sr0, vdb)"),
        "{err}"
    );
}

#[test]
fn absent_metadata_devices_share_one_wait() {
    let g = guest();
    let mut agent = g.agent();
    // Eight absent addresses: waited for together (300 ms), not 300 ms each (2.4 s).
    let absent: Vec<(String, &str)> = (0..8)
        .map(|i| (format!("0000:1{i}:00.0"), "vfmap:storage"))
        .collect();
    let mut devices: Vec<(&str, &str)> = absent.iter().map(|(a, t)| (a.as_str(), *t)).collect();
    devices.push(("0000:03:00.0", "vfmap:crypto"));
    let started = Instant::now();
    let published = agent.apply_metadata(&metadata_doc(&devices), &functions(true));
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1_200), "took {took:?}");
    // Published in address order: 03:00.0 first, then the absent ones.
    assert!(published[1..].iter().all(|p| p.state == "failed"));
    // A device that is there is still bound after the shared deadline has passed.
    assert_eq!(published[0].state, "bound");
    assert_eq!(g.driver("0000:03:00.0").as_deref(), Some("pci-stub"));
}

#[test]
fn metadata_naming_a_bridge_is_refused() {
    let g = guest();
    // The root port 00:03.0 as the kernel shows it: a PCI-to-PCI bridge (the generated tree
    // gives every device the NVMe class).
    let port = g.tree.root().join("bus/pci/devices/0000:00:03.0/class");
    std::fs::write(&port, "0x060400\n").unwrap();
    let mut agent = g.agent();
    let published = agent.apply_metadata(
        &metadata_doc(&[("0000:00:03.0", "vfmap:crypto")]),
        &functions(false),
    );
    let reason = published[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("0000:00:03.0 is a PCI bridge (class 0x060400)"),
        "{reason}"
    );
    assert!(g.kernel.writes().is_empty(), "{:?}", g.kernel.writes());
}

#[test]
fn an_agent_without_metadata_mode_releases_what_metadata_bound() {
    let g = guest();
    let mut agent = g.agent();
    agent.apply_metadata(
        &metadata_doc(&[("0000:03:00.0", "vfmap:crypto")]),
        &functions(false),
    );
    assert_eq!(g.driver("0000:03:00.0").as_deref(), Some("pci-stub"));
    // Restarted with [metadata] removed: nothing stays pinned or blocks the host.
    let mut agent = g.agent();
    assert_eq!(agent.drop_metadata(), 1);
    assert_eq!(g.driver("0000:03:00.0"), None);
    assert!(g.published().is_empty());
    let answers = agent.apply(&three());
    assert!(
        answers.iter().all(|a| matches!(a, Answer::Bound { .. })),
        "{answers:?}"
    );
    assert_eq!(agent.drop_metadata(), 0);
}

#[test]
fn functions_without_ids_are_warned_about() {
    let mut config: Config =
        toml::from_str("[metadata.functions.a]\ndriver = \"nvme\"\n[metadata.functions.b]\ndriver = \"nvme\"\ndevice = \"0x0010\"").unwrap();
    config.allowed_drivers = None;
    let warnings = check_metadata(&config).unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("[metadata.functions.a] has no vendor or device"),
        "{warnings:?}"
    );
}

/// `by-function/<function>`'s entries, sorted, each `name -> target's last part`.
fn links(g: &Guest, function: &str) -> Vec<String> {
    let dir = g.dir.path().join("run/by-function").join(function);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.file_name().unwrap().to_string_lossy()
            )
        })
        .collect();
    names.sort();
    names
}

#[test]
fn later_publishes_change_only_what_differs_and_match_a_whole_one() {
    let g = guest();
    let mut agent = g.agent();
    agent.apply(&three()[..1]);
    assert_eq!(links(&g, "storage"), ["0 -> 0000:01:00.0"]);
    // Added: two links, two new function directories.
    agent.apply(&three());
    assert_eq!(links(&g, "compress"), ["1 -> 0000:02:00.0"]);
    assert_eq!(links(&g, "crypto"), ["2 -> 0000:03:00.0"]);
    // Removed: the link and its function's directory, now empty.
    agent.apply(&three()[1..]);
    assert!(!g.dir.path().join("run/by-function/storage").exists());
    assert_eq!(links(&g, "crypto"), ["2 -> 0000:03:00.0"]);
    // Changed: local index 2 now names another device (its link is replaced, not removed
    // first), and nothing temporary is left.
    agent.apply(&[
        entry(1, "compress", "uio_pci_generic", "03.1/00.0"),
        entry(2, "crypto", "pci-stub", "03.0/00.0"),
    ]);
    assert_eq!(links(&g, "crypto"), ["2 -> 0000:01:00.0"]);
    assert_eq!(links(&g, "compress"), ["1 -> 0000:02:00.0"]);
    let published = g.published();
    assert_eq!(published.len(), 2);
    // What a new process publishes whole from the same state is the same.
    let before: Vec<Vec<String>> = ["storage", "compress", "crypto"]
        .iter()
        .map(|f| links(&g, f))
        .collect();
    drop(agent);
    let mut again = g.agent();
    again.publish().unwrap();
    let after: Vec<Vec<String>> = ["storage", "compress", "crypto"]
        .iter()
        .map(|f| links(&g, f))
        .collect();
    assert_eq!(before, after);
    assert_eq!(g.published(), published);
}
