//! Orchestrator-placed devices in a real VM: no vfmap daemon, no virtio-serial port. The
//! guest boots with three devices of one vendor:device ID (QEMU's emulated NVMe, 1b36:0010)
//! at fixed addresses on its root bus, as KubeVirt or Nova would place VFs, and a config drive
//! built here (ISO 9660 by genisoimage, labelled `config-2`, as both orchestrators make it)
//! whose `openstack/latest/meta_data.json` tags them with three functions. The real
//! `vfmap-agent` in the guest finds the drive without udev, mounts it, and binds three
//! different drivers (checked from the guest's own sysfs) and publishes them. A second boot
//! with hostile metadata binds nothing, and the agent says why for each entry.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Guarded;
use serde_json::{Value, json};

/// The three devices: QEMU's own addresses for them, which a hypervisor writes in metadata.
const DEVICES: [&str; 3] = ["0000:00:10.0", "0000:00:11.0", "0000:00:12.0"];

const AGENT_CONFIG: &str = r#"
allowed_drivers = ["nvme", "uio_pci_generic", "pci-stub"]
hotplug_timeout_ms = 30000
bind_timeout_ms = 30000

[metadata]
timeout_ms = 60000

[metadata.functions.storage]
driver = "nvme"
vendor = "0x1b36"
device = "0x0010"

[metadata.functions.compress]
driver = "uio_pci_generic"

[metadata.functions.crypto]
driver = "pci-stub"
vendor = "0x1b36"
"#;

fn console_text(console: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).replace('\r', "")
}

/// The guest's latest `VFMAP-<tag> ...` console line.
fn last_line(console: &Path, tag: &str) -> Option<String> {
    let prefix = format!("VFMAP-{tag}");
    console_text(console)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix).map(|rest| rest.trim().to_owned()))
}

/// The drivers of the three devices, from the guest's sysfs (`""` when none).
fn guest_drivers(console: &Path) -> Vec<String> {
    let line = last_line(console, "DRIVERS").unwrap_or_default();
    DEVICES
        .iter()
        .map(|bdf| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{bdf}=")))
                .unwrap_or("?")
                .to_owned()
        })
        .collect()
}

/// `devices.json` as the guest printed it last: (guest BDF, function, driver, source).
fn published(console: &Path) -> Vec<(String, String, String, String)> {
    let text = last_line(console, "DEVICES").unwrap_or_default();
    let field = |p: &Value, k: &str| p[k].as_str().unwrap_or("").to_owned();
    serde_json::from_str::<Vec<Value>>(&text)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                field(p, "guest_bdf"),
                field(p, "function"),
                field(p, "driver"),
                field(p, "source"),
            )
        })
        .collect()
}

fn wait_for(what: &str, console: &Path, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "timed out waiting for {what}; console log in {}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A config drive holding `meta_data` (genisoimage with Rock Ridge and Joliet, as Nova and
/// KubeVirt run it).
fn config_drive(work: &Path, name: &str, meta_data: &[u8]) -> PathBuf {
    let content = work.join(format!("{name}.d"));
    let dir = content.join("openstack/latest");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("meta_data.json"), meta_data).unwrap();
    let iso = work.join(format!("{name}.iso"));
    let out = Command::new("genisoimage")
        .args(["-quiet", "-J", "-r", "-V", "config-2", "-o"])
        .arg(&iso)
        .arg(&content)
        .output()
        .unwrap_or_else(|e| panic!("genisoimage: {e} (scripts/install-deps installs it)"));
    assert!(out.status.success(), "genisoimage: {out:?}");
    iso
}

/// Boots the guest with the three devices and `iso` as a virtio disk; no agent port.
fn boot(root: &Path, initrd: &Path, work: &Path, name: &str, iso: &Path) -> (Guarded, PathBuf) {
    let console = work.join(format!("{name}.console.log"));
    let mut cmd = Guarded::command(root.join("scripts/vm/run-agent-vm"));
    cmd.arg(initrd)
        .arg(work.join(format!("{name}.qmp")))
        .arg("none")
        .arg("300")
        .arg("--");
    for (i, bdf) in DEVICES.iter().enumerate() {
        let slot = &bdf[8..10];
        cmd.args([
            "-device",
            &format!("nvme,serial=meta{i},bus=pcie.0,addr=0x{slot}"),
        ]);
    }
    cmd.arg("-drive")
        .arg(format!(
            "file={},if=none,id=configdrive,format=raw,readonly=on",
            iso.display()
        ))
        .args([
            "-device",
            "virtio-blk-pci,drive=configdrive,bus=pcie.0,addr=0x13",
        ]);
    let vm = Guarded::spawn(
        cmd.stdout(std::fs::File::create(&console).unwrap())
            .stderr(Stdio::null()),
    );
    (vm, console)
}

#[test]
fn orchestrator_placed_devices_get_their_drivers_from_config_drive_metadata() {
    if common::require_guest_binary("vfmap-agent").is_none() {
        return;
    }
    let root = common::repo_root();
    // The agent under test is this tree's: rebuild the static binary (a no-op when current).
    let out = Command::new(root.join("scripts/vm/build-static"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-static: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent =
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).with_file_name("vfmap-agent");
    let work = root.join(".cache/vm/real-metadata");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("agent.toml"), AGENT_CONFIG).unwrap();
    let initrd = root.join(".cache/vm/agent-metadata.cpio.gz");
    let status = Command::new(root.join("scripts/vm/build-initramfs"))
        .arg(&initrd)
        .arg(format!("{}:/bin/vfmap-agent", agent.display()))
        .arg(format!(
            "{}:/etc/vfmap/agent.toml",
            work.join("agent.toml").display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "build-initramfs failed");

    // First boot: what KubeVirt writes for three tagged hostDevices, plus the config drive's
    // own disk (tagged, not for vfmap).
    let meta_data = json!({
        "instance-id": "accel-1.default", "instance_id": "accel-1.default",
        "local_hostname": "accel-1", "uuid": "accel-1.default",
        "devices": [
            {"type": "hostdev", "bus": "pci", "address": DEVICES[0], "tags": ["vfmap:storage"]},
            {"type": "hostdev", "bus": "pci", "address": DEVICES[1], "numaNode": 0,
             "tags": ["vfmap:compress"]},
            {"type": "nic", "bus": "pci", "address": DEVICES[2], "tags": ["vfmap:crypto"],
             "vf_trusted": true},
            {"type": "disk", "bus": "pci", "address": "0000:00:13.0", "tags": ["config"]}
        ],
        "public_keys": {"0": "ssh-ed25519 AAAA user@example"}
    });
    let iso = config_drive(&work, "good", meta_data.to_string().as_bytes());
    let (vm, console) = boot(&root, &initrd, &work, "good", &iso);
    wait_for(
        "the guest to show three drivers and publish three functions",
        &console,
        Duration::from_secs(180),
        || {
            guest_drivers(&console) == ["nvme", "uio_pci_generic", "pci-stub"]
                && published(&console)
                    == [
                        ("0000:00:10.0", "storage", "nvme"),
                        ("0000:00:11.0", "compress", "uio_pci_generic"),
                        ("0000:00:12.0", "crypto", "pci-stub"),
                    ]
                    .map(|(b, f, d)| (b.into(), f.into(), d.into(), "metadata".into()))
        },
    );
    let text = console_text(&console);
    assert!(
        text.contains("metadata from /dev/vda (iso9660, label config-2): 3 bound, 0 failed, 0 skipped, 1 devices not vfmap's"),
        "the agent's summary; console log in {}",
        console.display()
    );
    assert!(
        text.contains(
            "no virtio-serial port org.vfmap.0 or vfmap: serving the metadata's devices only"
        ),
        "metadata-only mode; console log in {}",
        console.display()
    );
    drop(vm);

    // Second boot: hostile metadata. Nothing may be bound, and each entry says why.
    // Raw text: the last entry gives "tags" twice, which a JSON library would merge.
    let hostile = format!(
        r#"{{"uuid": "x", "devices": [
            {{"type": "hostdev", "bus": "pci", "address": "{a}", "tags": ["vfmap:../../etc/passwd"]}},
            {{"type": "hostdev", "bus": "pci", "address": "0000:00:11.0/../../..", "tags": ["vfmap:compress"]}},
            {{"type": "hostdev", "bus": "pci", "address": "{c}", "tags": ["vfmap:crypto"]}},
            {{"type": "nic", "bus": "pci", "address": "{c}", "tags": ["vfmap:storage"]}},
            {{"type": "disk", "bus": "pci", "address": "{a}", "tags": ["vfmap:storage"]}},
            {{"type": "hostdev", "bus": "pci", "address": "{b}", "tags": ["vfmap:mining"]}},
            {{"type": "hostdev", "bus": "pci", "address": "{b}", "tags": ["x"], "tags": ["vfmap:storage"]}}
        ]}}"#,
        a = DEVICES[0],
        b = DEVICES[1],
        c = DEVICES[2]
    );
    let iso = config_drive(&work, "hostile", hostile.as_bytes());
    let (_vm, console) = boot(&root, &initrd, &work, "hostile", &iso);
    wait_for(
        "the agent's summary of the hostile metadata",
        &console,
        Duration::from_secs(180),
        || console_text(&console).contains("0 bound, 1 failed, 6 skipped"),
    );
    let text = console_text(&console);
    for why in [
        "devices[0]: tag \"vfmap:../../etc/passwd\" does not name a function",
        "devices[1]: address \"0000:00:11.0/../../..\" is not a PCI address",
        "devices[2]: address 0000:00:12.0 is given by several entries",
        "devices[3]: address 0000:00:12.0 is given by several entries",
        "devices[4]: tagged for vfmap, but type \"disk\" on bus \"pci\"",
        "devices[6]: malformed: duplicate field `tags`",
        "0000:00:11.0 function mining: failed: function mining is not in this guest's [metadata.functions]",
    ] {
        assert!(
            text.contains(why),
            "the agent did not say {why:?}; console log in {}",
            console.display()
        );
    }
    // The printed view after the summary: every device still without a driver.
    let summary_at = text.find("0 bound, 1 failed, 6 skipped").unwrap();
    wait_for(
        "a drivers line after the summary",
        &console,
        Duration::from_secs(30),
        || console_text(&console)[summary_at..].contains("VFMAP-DRIVERS"),
    );
    assert_eq!(guest_drivers(&console), ["", "", ""], "nothing bound");
    assert!(published(&console).iter().all(|p| p.2.is_empty()));
}
