//! The whole mechanism with nothing faked, in one boot of an outer QEMU guest whose real kernel
//! owns an emulated NVMe SR-IOV PF behind an intel-iommu, where the real `vfmap serve` creates
//! the VFs and binds them to vfio-pci. Two scenarios run there, one after the other:
//! - over QMP (`scripts/vm/nested/scenario.sh`): an inner QEMU (from this machine's root,
//!   shared over 9p) gets one real VF per function through vfio-pci; the real `vfmap-agent` in
//!   it binds nvme, pci-stub and uio_pci_generic to the three same-ID VFs; then a detach and a
//!   kill -9 mid-attach;
//! - through a real libvirtd (`scripts/vm/nested/libvirt.sh`): the inner VM is a domain of
//!   examples/libvirt-domain.xml, registered by name; the same three drivers, then wrong
//!   registrations, a detach, kill -9 at each attach and detach step, a libvirtd restart, the
//!   domain destroyed (its VFs come back by themselves), started again, and undefined
//!   (forgotten).
//!
//! About 12 minutes under TCG (the libvirt domain boots twice).

mod common;

use std::process::Command;

#[test]
fn real_vfs_reach_real_vms_over_qmp_and_through_a_real_libvirtd() {
    let Some(run) = run_nested("nested-all", 2400) else {
        return;
    };
    run.check_scenario(
        "scenario",
        &[
            "guest-drivers",
            "detach-guest",
            "detach-host",
            "recovered-vs-qemu",
            "recovered-vs-guest",
        ],
    );
    let mut libvirt = vec![
        "vm-add",
        "vm-add-refused-nothing",
        "guest-drivers",
        "attached-vs-virsh",
        "detach-guest",
        "detach-virsh",
        "detach-host",
        "libvirtd-restart-status",
        "destroyed-pool",
        "attach-after-domain-restart",
        "undefined-forgotten",
    ];
    let steps = ["host_bound", "plugged", "sent", "releasing"];
    let recovered: Vec<String> = steps
        .iter()
        .flat_map(|fp| {
            ["vs-virsh", "vs-guest", "nothing-in-flight"].map(|c| format!("recovered-{fp}-{c}"))
        })
        .collect();
    libvirt.extend(recovered.iter().map(String::as_str));
    run.check_scenario("libvirt", &libvirt);
}

/// An outer guest's console, saved to its log.
struct NestedRun {
    console: String,
    log: std::path::PathBuf,
}

impl NestedRun {
    /// The part of the console that scenario `name` wrote (after its `VFMAP-SCENARIO` line),
    /// checked: no check failed, each of `required` ran and passed, and the scenario passed.
    fn check_scenario(&self, name: &str, required: &[&str]) {
        let log = self.log.display();
        let marker = format!("VFMAP-SCENARIO {name}\n");
        let part = self
            .console
            .split_once(&marker)
            .map(|(_, rest)| rest.split("VFMAP-SCENARIO ").next().unwrap_or(rest))
            .unwrap_or_else(|| panic!("scenario {name} did not run; console log: {log}"));
        common::assert_scenario_passed(name, part, required, &self.log);
    }
}

/// Boots the outer guest in `mode` (at most `limit` seconds) with the static agent's image;
/// `None` when the test is skipped.
fn run_nested(mode: &str, limit: u32) -> Option<NestedRun> {
    let (Some(vfmap), Some(agent)) = (
        common::require_guest_binary("vfmap"),
        common::require_guest_binary("vfmap-agent"),
    ) else {
        return None;
    };
    for tool in ["nvme", "socat"] {
        if Command::new(tool).arg("--version").output().is_err() {
            let why = format!("{tool} is not installed (scripts/install-deps installs it)");
            assert!(
                std::env::var_os("VFMAP_REQUIRE_VM").is_none(),
                "VFMAP_REQUIRE_VM is set but {why}"
            );
            eprintln!("skipped: {why}");
            return None;
        }
    }
    // The scenario runs the static binaries from the repository's target directory.
    let expected = common::repo_root().join("target/x86_64-unknown-linux-gnu/release");
    assert!(
        vfmap.starts_with(&expected)
            || vfmap.canonicalize().ok() == expected.join("vfmap").canonicalize().ok(),
        "the nested scenario uses {}; build it with scripts/vm/build-static",
        expected.display()
    );
    let root = common::repo_root();
    let cache = root.join(".cache/vm");
    let agent_files = vec![format!("{}:/bin/vfmap-agent", agent.display())];
    for (image, files) in [
        ("agent.cpio.gz", agent_files),
        ("nested.cpio.gz", Vec::new()),
    ] {
        let status = Command::new(root.join("scripts/vm/build-initramfs"))
            .arg(cache.join(image))
            .args(files)
            .status()
            .unwrap();
        assert!(status.success(), "building {image} failed");
    }
    let output = common::Guarded::output(
        common::Guarded::command(root.join("scripts/vm/run-nested-host"))
            .arg(cache.join("nested.cpio.gz"))
            .arg(mode)
            .arg(limit.to_string()),
    );
    let console = String::from_utf8_lossy(&output.stdout).replace('\r', "");
    let log = cache.join(format!("{mode}.console.log"));
    std::fs::write(&log, &console).unwrap();
    Some(NestedRun { console, log })
}
