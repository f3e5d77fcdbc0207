//! The agent on generated guest sysfs trees, with the fake kernel reacting to its writes and
//! the kernel's uevents fed by a test double.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use vfmap_agent::uevent::{self, Action, Uevent};
use vfmap_agent::{Agent, Config, DeviceEvents, Polling, Published, Wake, find_port};
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
    let found = find_port(g.tree.root(), Path::new("/dev"), "vfmap");
    assert_eq!(found.as_deref(), Some(Path::new("/dev/vport0p2")));
    assert_eq!(find_port(g.tree.root(), Path::new("/dev"), "other"), None);
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
