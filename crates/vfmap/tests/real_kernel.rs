//! `vfmap prepare` and `vfmap inventory` inside a real Linux guest (QEMU, TCG) whose emulated
//! NVMe PF has real SR-IOV VFs and whose intel-iommu gives them IOMMU groups, against the
//! guest's real `/sys`.
//!
//! Needs QEMU, a kernel in /boot and the static guest binary (`scripts/vm/build-static`);
//! `scripts/test` installs and builds all of them and sets `VFMAP_REQUIRE_VM=1`, so there a
//! missing piece fails instead of skipping.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Runs the scenario, or returns `None` (with the reason printed) when it cannot run here.
fn boot_scenario(mode: &str) -> Option<Console> {
    let bin = common::require_guest_binary("vfmap")?;
    let root = common::repo_root();
    let cache = root.join(".cache/vm");
    let initrd = cache.join(format!("{mode}.cpio.gz"));
    let status = Command::new(root.join("scripts/vm/build-initramfs"))
        .arg(&initrd)
        .arg(format!("{}:/bin/vfmap", bin.display()))
        .arg(format!(
            "{}:/etc/vfmap/profiles.toml",
            root.join("examples/profiles.toml").display()
        ))
        .status()
        .expect("run build-initramfs");
    assert!(status.success(), "build-initramfs failed");
    let output = common::Guarded::output(
        common::Guarded::command(root.join("scripts/vm/run-sriov-host"))
            .arg(&initrd)
            .arg(mode)
            .arg("300"),
    );
    let text = String::from_utf8_lossy(&output.stdout).replace('\r', "");
    let log = cache.join(format!("{mode}.console.log"));
    std::fs::write(&log, &text).expect("save console log");
    assert!(
        text.contains("VFMAP-EXIT 0"),
        "the guest did not finish its scenario (QEMU {}); console log: {}",
        output.status,
        log.display()
    );
    Some(Console { text, log })
}

struct Console {
    text: String,
    log: PathBuf,
}

impl Console {
    /// The output of section `name` and its exit code.
    fn section(&self, name: &str) -> (String, i32) {
        let begin = format!("VFMAP-BEGIN {name}\n");
        let start =
            self.text.find(&begin).unwrap_or_else(|| {
                panic!("no section {name}; console log: {}", self.log.display())
            }) + begin.len();
        let end_marker = format!("VFMAP-END {name} rc=");
        let end = start + self.text[start..].find(&end_marker).expect("section end");
        let rc_text = &self.text[end + end_marker.len()..];
        let rc = rc_text[..rc_text.find('\n').unwrap_or(rc_text.len())]
            .trim()
            .parse()
            .expect("rc");
        // Kernel messages can interleave with the console; keep our own lines.
        let body = self.text[start..end]
            .lines()
            .filter(|l| !l.starts_with('['))
            .collect::<Vec<_>>()
            .join("\n");
        (body, rc)
    }

    fn json(&self, name: &str) -> Value {
        let (body, rc) = self.section(name);
        assert_eq!(rc, 0, "{name} failed: {body}");
        let line = body
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| {
                panic!(
                    "{name} printed no JSON: {body}; console log: {}",
                    self.log.display()
                )
            });
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: {e}: {line}"))
    }
}

#[test]
fn prepare_and_inventory_on_a_real_sriov_kernel() {
    let Some(console) = boot_scenario("inventory-test") else {
        return;
    };

    // Before: the PF is there with no VFs enabled.
    let before = console.json("inventory-before");
    assert_eq!(before["pfs"][0]["location"], "0000:01:00.0");
    assert_eq!(before["pfs"][0]["total_vfs"], 3);
    assert_eq!(before["pfs"][0]["num_vfs"], 0);
    assert_eq!(before["vfs"].as_array().unwrap().len(), 0);

    let (prepare, rc) = console.section("prepare");
    assert_eq!(rc, 0, "prepare failed: {prepare}");
    assert!(
        prepare.contains("0000:01:00.0: set sriov_drivers_autoprobe = 0"),
        "{prepare}"
    );
    assert!(
        prepare.contains("0000:01:00.0: set sriov_numvfs 0 -> 3"),
        "{prepare}"
    );

    // Idempotent on the real kernel.
    let again = console.json("prepare-again");
    assert_eq!(again["changed"], false, "{again}");

    let inventory = console.json("inventory");
    let vfs = inventory["vfs"].as_array().unwrap();
    let summary: Vec<(String, String, String, String)> = vfs
        .iter()
        .map(|v| {
            (
                v["location"].as_str().unwrap().to_owned(),
                v["function"].as_str().unwrap_or("-").to_owned(),
                v["driver"].as_str().unwrap_or("-").to_owned(),
                v["device"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    let want = |l: &str, f: &str, d: &str| {
        (
            l.to_owned(),
            f.to_owned(),
            d.to_owned(),
            "0x0010".to_owned(),
        )
    };
    assert_eq!(
        summary,
        [
            want("0000:01:00.1", "storage", "vfio-pci"),
            want("0000:01:00.2", "crypto", "vfio-pci"),
            want("0000:01:00.3", "compress", "pci-stub"),
        ],
        "console log: {}",
        console.log.display()
    );
    for (i, vf) in vfs.iter().enumerate() {
        assert_eq!(vf["global_index"], i);
        assert_eq!(vf["vendor"], "0x1b36");
        assert!(vf["iommu_group"].is_u64(), "VF without IOMMU group: {vf}");
    }
    assert!(
        inventory["problems"].as_array().unwrap().is_empty(),
        "{}",
        inventory["problems"]
    );
    let storage = inventory["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "storage")
        .unwrap();
    assert_eq!(storage["total"], 1);
    assert_eq!(storage["guest_driver"], "nvme");

    // vfio-pci made a /dev/vfio/<group> per bound VF.
    let (dev_vfio, _) = console.section("dev-vfio");
    for vf in &vfs[..2] {
        let group = vf["iommu_group"].to_string();
        assert!(
            dev_vfio.split_whitespace().any(|g| g == group),
            "no /dev/vfio/{group}: {dev_vfio}"
        );
    }

    // Changing the VF count under bound VFs is refused and changes nothing.
    let (refused, rc) = console.section("refused");
    assert_eq!(rc, 3, "{refused}");
    assert!(
        refused.contains("refusing to change sriov_numvfs from 3 to 2"),
        "{refused}"
    );
    assert_eq!(
        console.json("inventory-after-refusal")["vfs"],
        inventory["vfs"]
    );
}
