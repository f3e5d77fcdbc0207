//! The real path into a real VM: `vfmap serve` plugs three devices with one vendor:device ID
//! (QEMU's emulated NVMe, 1b36:0010, through the device template) into three empty root ports
//! of a running QEMU guest over QMP, and sends the correspondence over virtio-serial. The real
//! `vfmap-agent` in the guest binds three different drivers. The test checks the guest's own
//! sysfs (printed on its console) and `devices.json`, then detaches one.
//!
//! The host's VFs come from a generated sysfs tree: no vfio here (the nested real-VF path is
//! the issue-5 scenario), which is what the device template is for.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Guarded;
use serde_json::Value;
use vfmap_testkit::{PfSpec, SysfsTree};

const PROFILE: &str = r#"
[[card]]
name = "e2e"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 3
[[card.function]]
name = "storage"
vfs = "0"
guest_driver = "nvme"
[[card.function]]
name = "compress"
vfs = "1"
guest_driver = "uio_pci_generic"
[[card.function]]
name = "crypto"
vfs = "2"
guest_driver = "pci-stub"
"#;

fn wait_for(what: &str, log: &Path, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "timed out waiting for {what}; logs in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The guest's latest `VFMAP-<tag> ...` console line.
fn last_line(console: &Path, tag: &str) -> Option<String> {
    let text = String::from_utf8_lossy(&std::fs::read(console).ok()?).replace('\r', "");
    let prefix = format!("VFMAP-{tag}");
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix).map(|rest| rest.trim().to_owned()))
}

fn guest_drivers(console: &Path) -> Vec<(String, String)> {
    last_line(console, "DRIVERS")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .filter(|(bdf, _)| !bdf.starts_with("0000:00:"))
        .collect()
}

fn guest_devices(console: &Path) -> Vec<Value> {
    last_line(console, "DEVICES")
        .and_then(|j| serde_json::from_str::<Vec<Value>>(&j).ok())
        .unwrap_or_default()
}

#[test]
fn three_same_id_devices_get_three_drivers_in_a_real_guest() {
    if common::require_guest_binary("vfmap-agent").is_none() {
        return;
    }
    let root = common::repo_root();
    let work: PathBuf = root.join(".cache/vm/real-qemu");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let console = work.join("console.log");
    // The agent goes into the guest the way an operator installs it: from its Debian package
    // (its binary and its default config), not from target/.
    let out = Command::new(root.join("scripts/package")).output().unwrap();
    assert!(
        out.status.success(),
        "scripts/package failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("/vfmap-agent_"))
        .expect("scripts/package printed the vfmap-agent package")
        .to_owned();
    let unpacked = work.join("package");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(status.success(), "dpkg-deb -x {deb} failed");
    let (agent, config) = (
        unpacked.join("usr/bin/vfmap-agent"),
        unpacked.join("etc/vfmap/agent.toml"),
    );
    assert!(
        agent.exists() && config.exists(),
        "{deb} lacks the agent or its config"
    );
    let initrd = root.join(".cache/vm/agent.cpio.gz");
    let status = Command::new(root.join("scripts/vm/build-initramfs"))
        .arg(&initrd)
        .arg(format!("{}:/bin/vfmap-agent", agent.display()))
        .arg(format!("{}:/etc/vfmap/agent.toml", config.display()))
        .status()
        .unwrap();
    assert!(status.success(), "build-initramfs failed");

    let (qmp, channel, api) = (
        work.join("vm.qmp"),
        work.join("vm.agent"),
        work.join("api.sock"),
    );
    let _vm = Guarded::spawn(
        Guarded::command(root.join("scripts/vm/run-agent-vm"))
            .arg(&initrd)
            .arg(&qmp)
            .arg(&channel)
            .arg("300")
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(Stdio::null()),
    );

    // The host: three "VFs" already prepared, a template that plugs an emulated NVMe per VF.
    let tree = SysfsTree::new(work.join("sys"));
    tree.add_driver("vfio-pci");
    let mut pf = PfSpec::nvme("0000:10:00.0", 3).with_vfs(3);
    pf.autoprobe = false;
    tree.add_pf(&pf);
    for i in 0..3 {
        let vf = pf.location.vf_location(1, 1, i).unwrap();
        tree.link_driver(vf, "vfio-pci");
        std::fs::write(tree.device_link(vf).join("driver_override"), "vfio-pci\n").unwrap();
    }
    std::fs::write(work.join("profiles.toml"), PROFILE).unwrap();
    std::fs::write(
        work.join("vfmap.toml"),
        format!(
            "sysfs_root = {:?}\nprofiles = [{:?}]\nstate_dir = {:?}\nsocket = {:?}\n\
             device_template = \"nvme,serial={{bdf}}\"\nagent_timeout_ms = 60000\nqmp_timeout_ms = 30000\n",
            tree.root(),
            work.join("profiles.toml"),
            work.join("state"),
            api
        ),
    )
    .unwrap();
    let daemon_log = work.join("daemon.log");
    let start_daemon = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&daemon_log)
            .unwrap();
        let daemon = Guarded::spawn(
            Guarded::command(env!("CARGO_BIN_EXE_vfmap"))
                .args(["serve", "--config"])
                .arg(work.join("vfmap.toml"))
                .stderr(log),
        );
        wait_for(
            "the daemon's socket",
            &daemon_log,
            Duration::from_secs(30),
            || UnixStream::connect(&api).is_ok(),
        );
        daemon
    };
    let mut daemon = start_daemon();
    wait_for(
        "the agent in the guest",
        &console,
        Duration::from_secs(120),
        || {
            std::fs::read(&console)
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("vfmap-agent: serving on"))
        },
    );

    let cli = |args: &[&str]| -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_vfmap"))
            .arg("--socket")
            .arg(&api)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}; logs in {}",
            String::from_utf8_lossy(&out.stderr),
            work.display()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (q, c) = (qmp.to_str().unwrap(), channel.to_str().unwrap());
    cli(&[
        "vm", "add", "guest", "--qmp", q, "--agent", c, "--slot", "rp0", "--slot", "rp1", "--slot",
        "rp2", "--slot", "rp3",
    ]);
    let attach = |function: &str| {
        let doc = cli(&["attach", "guest", function]);
        let row = &doc["attached"][0];
        assert_eq!(row["state"], "ready", "{doc}");
        assert_eq!(row["bound_driver"], row["guest_driver"], "{doc}");
    };
    attach("storage");
    attach("compress");
    // The host side goes away (kill -9) and comes back: the agent keeps its port open, the
    // daemon's link reconnects and re-sends the correspondence, and work goes on.
    daemon.kill();
    let _daemon = start_daemon();
    attach("crypto");

    // The guest's own sysfs: same vendor:device on all three, three different drivers.
    let want = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(b, d)| ((*b).to_owned(), (*d).to_owned()))
            .collect::<Vec<_>>()
    };
    let all = want(&[
        ("0000:01:00.0", "nvme"),
        ("0000:02:00.0", "uio_pci_generic"),
        ("0000:03:00.0", "pci-stub"),
    ]);
    // What the agent published, as the guest prints it each second: function → driver.
    let published = || -> Vec<(String, String)> {
        guest_devices(&console)
            .iter()
            .map(|p| {
                (
                    p["function"].as_str().unwrap_or("").to_owned(),
                    p["driver"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let functions = want(&[
        ("storage", "nvme"),
        ("compress", "uio_pci_generic"),
        ("crypto", "pci-stub"),
    ]);
    // The guest prints its drivers and devices.json on separate lines: wait for both, so a
    // drivers line printed before the newest devices line does not race the check.
    wait_for(
        "the guest to show three drivers and publish three functions",
        &console,
        Duration::from_secs(30),
        || guest_drivers(&console) == all && published() == functions,
    );

    cli(&["detach", "guest", "1"]);
    let two = want(&[("0000:01:00.0", "nvme"), ("0000:03:00.0", "pci-stub")]);
    wait_for(
        "the detached device to leave the guest",
        &console,
        Duration::from_secs(30),
        || guest_drivers(&console) == two && guest_devices(&console).len() == 2,
    );
    let status = cli(&["status", "guest"]);
    assert_eq!(status["correspondence"].as_array().unwrap().len(), 2);
}
