//! Issue 12 with nothing faked: a real kubelet (v1.33, built from the upstream source by
//! `scripts/k8s/build-kubelet`, cached outside the clone) on Debian's containerd and runc, and
//! the real `vfmap serve` with `[kubernetes]`, both in the nested rig's host-role guest (a real
//! kernel owning QEMU's emulated SR-IOV NVMe PF behind an intel-iommu, VFs on vfio-pci).
//! `scripts/k8s/run-nested` boots it and runs `scripts/k8s/nested-kubelet.sh`: registration
//! and capacity per function, a static pod given a crypto and a compress VF (its container
//! sees the env and exactly those `/dev/vfio` groups), vfmap's records and `vfmap status`
//! naming the pod, the kubelet's admission refusing a second pod, `vfmap attach` refused the
//! pod's VFs, a daemon `kill -9` and a kubelet restart keeping the allocation, and the VFs
//! reset and free once the manifest is removed.
//!
//! About 7 minutes under TCG (425 s on a loaded 2-core machine), plus about 20 minutes the
//! first time on a machine (the kubelet's build).

mod common;

use std::path::PathBuf;
use std::process::Command;

/// Every check the scenario must have run and passed.
const REQUIRED: &[&str] = &[
    "daemon-start",
    "kubelet-start",
    "registered",
    "vf-pod",
    "inventory-held",
    "status-pod",
    "admission",
    "admission-kept",
    "attach-refused-crypto",
    "attach-refused-compress",
    "attach-pool",
    "daemon-restart",
    "daemon-reregistered",
    "daemon-restart-kept",
    "kubelet-restart",
    "kubelet-reregistered",
    "kubelet-restart-kept",
    "release",
    "release-0000:01:00.2",
    "release-0000:01:00.3",
];

#[test]
fn a_real_kubelet_gets_vfs_by_function_from_the_real_daemon() {
    let Some(vfmap) = common::require_guest_binary("vfmap") else {
        return;
    };
    if let Err(why) = prerequisites() {
        assert!(
            std::env::var_os("VFMAP_REQUIRE_VM").is_none(),
            "VFMAP_REQUIRE_VM is set but {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    // The scenario runs the static binary from the repository's target directory.
    let root = common::repo_root();
    let expected = root.join("target/x86_64-unknown-linux-gnu/release/vfmap");
    assert!(
        vfmap.canonicalize().ok() == expected.canonicalize().ok(),
        "the kubelet scenario uses {}; build it with scripts/vm/build-static",
        expected.display()
    );
    let output = common::Guarded::output(
        common::Guarded::command(root.join("scripts/k8s/run-nested"))
            .arg("1200")
            // The static build is there (checked above); run-nested builds it otherwise.
            .env("VFMAP_GUEST_BIN", &expected),
    );
    let log = root.join(".cache/vm/nested-k8s.console.log");
    let console = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .replace('\r', "");
    let shown = log.display();
    assert!(
        !console.is_empty(),
        "no console; run-nested said: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    common::assert_scenario_passed("kubelet", &console, REQUIRED, &log);
    assert!(output.status.success(), "run-nested failed: {shown}");
}

/// What the rig needs besides QEMU and the static binaries, or why it cannot run here.
fn prerequisites() -> Result<(), String> {
    for tool in ["containerd", "runc", "ctr", "jq", "nvme", "busybox"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!(
                "{tool} is not installed (scripts/install-deps installs it)"
            ));
        }
    }
    // The kubelet: cached, or Go to build it (scripts/k8s/build-kubelet).
    let cache = std::env::var_os("VFMAP_K8S_CACHE").map_or_else(
        || {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_default()
                .join("vfmap/k8s")
        },
        PathBuf::from,
    );
    let version = std::env::var("KUBE_VERSION").unwrap_or_else(|_| "v1.33.13".into());
    let cached = cache.join("bin").join(format!("kubelet-{version}"));
    if !cached.exists() && Command::new("go").arg("version").output().is_err() {
        return Err(format!(
            "no kubelet at {} and no Go to build it (scripts/k8s/build-kubelet)",
            cached.display()
        ));
    }
    Ok(())
}
