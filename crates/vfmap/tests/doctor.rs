//! `vfmap doctor`, the real binary, on generated hosts: a sysfs tree (`--sysfs-root`) and a
//! root with `proc/` and `lib/modules/` (`--root`), one broken thing at a time; the daemon's
//! paths; a VM's slots and agent channel, given on the command line (fake QEMU, fake agent)
//! or looked up from the real daemon.

mod common;
mod world;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vfmap_core::Bdf;
use vfmap_testkit::{PfSpec, SysfsTree};

const RELEASE: &str = "6.1.0-test";

/// The example profile: 3 VFs, `storage` and `crypto` on vfio-pci, `compress` on pci-stub.
fn example_profile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/profiles.toml")
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

const PF: &str = "0000:01:00.0";

/// A host ready for pass-through: IOMMU with interrupt remapping, vfio loaded, the example
/// card's PF with its 3 VFs on their host drivers, each VF in its own IOMMU group.
struct Host {
    dir: tempfile::TempDir,
    tree: SysfsTree,
}

impl Host {
    fn green() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let tree = SysfsTree::new(dir.path().join("sys"));
        for driver in ["vfio-pci", "pci-stub"] {
            tree.add_driver(driver);
        }
        tree.add_module("vfio_pci", &[]);
        tree.add_module("vfio_iommu_type1", &[("allow_unsafe_interrupts", "N")]);
        // VT-d with interrupt remapping (ecap bit 3), as QEMU's intel-iommu,intremap=on.
        tree.add_iommu_unit("dmar0", Some(0xf0_205e));
        let mut pf = PfSpec::nvme(PF, 3).with_vfs(3);
        pf.autoprobe = false;
        tree.add_pf(&pf);
        for (i, driver) in ["vfio-pci", "vfio-pci", "pci-stub"].into_iter().enumerate() {
            let vf = bdf(PF).vf_location(1, 1, i as u16).unwrap();
            tree.link_driver(vf, driver);
        }
        let host = Host { dir, tree };
        host.write("proc/cmdline", "console=ttyS0 quiet intel_iommu=on\n");
        host.write(
            "proc/interrupts",
            "           CPU0\n  0:         45  IR-IO-APIC    2-edge      timer\n 24:          0  IR-PCI-MSI 512000-edge      nvme0q0\n",
        );
        host.write("proc/sys/kernel/osrelease", &format!("{RELEASE}\n"));
        host.modules(
            &[
                "kernel/drivers/vfio/pci/vfio-pci.ko",
                "kernel/drivers/vfio/vfio_iommu_type1.ko",
                "kernel/drivers/nvme/host/nvme.ko",
                "kernel/drivers/uio/uio_pci_generic.ko",
            ],
            &["kernel/drivers/pci/pci-stub.ko"],
        );
        host
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.dir.path().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// The kernel's module index: `modules.dep` and `modules.builtin`.
    fn modules(&self, loadable: &[&str], builtin: &[&str]) {
        let dep: String = loadable.iter().map(|m| format!("{m}:\n")).collect();
        let builtin: String = builtin.iter().map(|m| format!("{m}\n")).collect();
        self.write(&format!("lib/modules/{RELEASE}/modules.dep"), &dep);
        self.write(&format!("lib/modules/{RELEASE}/modules.builtin"), &builtin);
    }

    fn profile(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("profiles.toml");
        fs::write(&path, text).unwrap();
        path
    }

    fn vf(&self, i: u16) -> Bdf {
        bdf(PF).vf_location(1, 1, i).unwrap()
    }

    /// `vfmap [--json] doctor --sysfs-root <tree> --root <dir> ARGS`.
    fn doctor(&self, json: bool, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfmap"));
        if json {
            cmd.arg("--json");
        }
        cmd.arg("doctor")
            .arg("--sysfs-root")
            .arg(self.tree.root())
            .arg("--root")
            .arg(self.dir.path())
            .args(args)
            .env_remove("VFMAP_SOCKET")
            .output()
            .expect("run vfmap")
    }

    /// The JSON report with the example profile and `args`, checking the exit code.
    fn report(&self, profile: &Path, args: &[&str], exit: i32) -> Report {
        let mut all = vec!["--profiles", profile.to_str().unwrap()];
        all.extend(args);
        let out = self.doctor(true, &all);
        Report::parse(&out, exit)
    }
}

/// A parsed `--json` report.
struct Report(Value);

impl Report {
    fn parse(out: &Output, exit: i32) -> Report {
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}): {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(out.status.code(), Some(exit), "{doc:#}");
        assert_eq!(doc["ready"], exit == 0, "{doc:#}");
        for check in doc["checks"].as_array().unwrap() {
            let keys: Vec<&String> = check.as_object().unwrap().keys().collect();
            assert_eq!(keys.len(), 4, "{check}");
            for key in ["name", "status", "detail", "fix"] {
                assert!(check.get(key).is_some(), "{check} lacks {key}");
            }
            let status = check["status"].as_str().unwrap();
            assert!(["ok", "warning", "error"].contains(&status), "{check}");
            assert_eq!(check["fix"].is_null(), status == "ok", "{check}");
        }
        Report(doc)
    }

    fn check(&self, name: &str) -> &Value {
        self.0["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {:#}", self.0))
    }

    /// Asserts `name`'s status and that its detail (and fix) hold the given parts.
    fn expect(&self, name: &str, status: &str, detail: &[&str], fix: &[&str]) {
        let check = self.check(name);
        assert_eq!(check["status"], status, "{check:#}");
        let text = |k: &str| check[k].as_str().unwrap_or_default().to_owned();
        for part in detail {
            assert!(text("detail").contains(part), "{part:?} not in {check:#}");
        }
        for part in fix {
            assert!(text("fix").contains(part), "{part:?} not in {check:#}");
        }
    }

    fn names_with(&self, status: &str) -> Vec<String> {
        self.0["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == status)
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

#[test]
fn a_ready_host_is_all_green_in_text_and_json() {
    let host = Host::green();
    let profile = example_profile();
    let report = host.report(&profile, &[], 0);
    let names: Vec<&str> = report.0["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "iommu",
            "interrupt-remapping",
            "module:vfio-pci",
            "module:vfio_iommu_type1",
            "card:qemu-nvme-sriov",
            "pf:0000:01:00.0",
            "iommu-groups:0000:01:00.0",
            "host-driver:pci-stub",
            "guest-driver:nvme",
            "guest-driver:pci-stub",
            "guest-driver:uio_pci_generic",
        ],
        "{:#}",
        report.0
    );
    assert_eq!(report.names_with("ok").len(), names.len(), "{:#}", report.0);
    report.expect("iommu", "ok", &["IOMMU groups", "dmar0"], &[]);
    report.expect("interrupt-remapping", "ok", &["IR-"], &[]);
    report.expect("pf:0000:01:00.0", "ok", &["3 of 3 VFs"], &[]);
    report.expect(
        "iommu-groups:0000:01:00.0",
        "ok",
        &["each of the 3 VFs is alone"],
        &[],
    );

    let out = host.doctor(false, &["--profiles", profile.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), names.len() + 1, "{text}");
    for (line, name) in lines.iter().zip(&names) {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[..2], ["ok", *name], "{line}");
        assert!(!line.contains("; fix:"), "{line}");
    }
    assert_eq!(
        lines.last().unwrap(),
        &format!("ready: 0 errors, 0 warnings, {} ok", names.len())
    );
}

#[test]
fn no_iommu_groups_is_an_error_with_the_boot_fix() {
    let host = Host::green();
    let profile = example_profile();
    host.tree.iommu_off(true);
    host.write("proc/cmdline", "console=ttyS0 quiet\n");
    let report = host.report(&profile, &[], 3);
    report.expect(
        "iommu",
        "error",
        &["no IOMMU groups", "neither intel_iommu=on nor amd_iommu=on"],
        &["intel_iommu=on", "firmware"],
    );
    // What depends on the IOMMU says it could not be checked.
    report.expect(
        "interrupt-remapping",
        "warning",
        &["could not check", "IOMMU is off"],
        &[],
    );
    report.expect(
        "iommu-groups:0000:01:00.0",
        "warning",
        &["could not check"],
        &[],
    );
    assert_eq!(report.names_with("error"), ["iommu"]);

    // Turned off on the command line: the fix says to remove the word.
    host.write("proc/cmdline", "quiet intel_iommu=off\n");
    host.report(&profile, &[], 3).expect(
        "iommu",
        "error",
        &["intel_iommu=off"],
        &["remove intel_iommu=off"],
    );

    // A kernel without IOMMU support has no iommu_groups directory at all.
    host.tree.iommu_off(false);
    host.report(&profile, &[], 3).expect(
        "iommu",
        "error",
        &["kernel/iommu_groups: this kernel has no IOMMU support"],
        &["CONFIG_INTEL_IOMMU"],
    );

    // The text form: one error line with its fix, and the summary.
    let out = host.doctor(false, &["--profiles", profile.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("error    iommu") && l.contains("; fix: boot a kernel")),
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("not ready: 1 error,"),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not ready for pass-through"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_vf_sharing_its_group_with_an_unrelated_device_is_an_error_naming_it() {
    let host = Host::green();
    let profile = example_profile();
    let nic = host.tree.add_plain_device("0000:02:00.0");
    host.tree.add_driver("e1000e");
    host.tree.link_driver(nic, "e1000e");
    let group = host.tree.iommu_group_of(host.vf(1)).unwrap();
    host.tree.set_iommu_group(nic, group);
    let report = host.report(&profile, &[], 3);
    report.expect(
        "iommu-groups:0000:01:00.0",
        "error",
        &[&format!(
            "VF 0000:01:00.2 shares IOMMU group {group} with 0000:02:00.0 (8086:100e, driver e1000e)"
        )],
        &["ACS"],
    );
    assert_eq!(report.names_with("error"), ["iommu-groups:0000:01:00.0"]);
}

#[test]
fn vfs_sharing_a_group_only_with_siblings_pass_with_a_note() {
    let host = Host::green();
    let group = host.tree.iommu_group_of(host.vf(0)).unwrap();
    host.tree.set_iommu_group(host.vf(1), group);
    host.report(&example_profile(), &[], 0).expect(
        "iommu-groups:0000:01:00.0",
        "ok",
        &["sibling VFs", "0000:01:00.1", "0000:01:00.2"],
        &[],
    );
    // The PF in its VFs' group is not a sibling: refused.
    host.tree.set_iommu_group(bdf(PF), group);
    host.report(&example_profile(), &[], 3).expect(
        "iommu-groups:0000:01:00.0",
        "error",
        &["with 0000:01:00.0 (1b36:0010, driver nvme)"],
        &[],
    );
}

#[test]
fn missing_modules_are_errors_and_an_unreadable_index_is_said() {
    let host = Host::green();
    let profile = host.profile(
        r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 3
[[card.function]]
name = "crypto"
vfs = "0-2"
guest_driver = "acme_crypto_vf"
host_driver = "acme_host"
"#,
    );
    // vfio_iommu_type1 neither loaded nor installed; the profile's drivers nowhere.
    fs::remove_dir_all(host.tree.root().join("module/vfio_iommu_type1")).unwrap();
    host.modules(&["kernel/drivers/vfio/pci/vfio-pci.ko"], &[]);
    let report = host.report(&profile, &[], 3);
    report.expect(
        "module:vfio_iommu_type1",
        "error",
        &["not a module of the running kernel"],
        &["CONFIG_VFIO_IOMMU_TYPE1"],
    );
    report.expect(
        "host-driver:acme_host",
        "error",
        &["not loaded, and not a module"],
        &["host_driver"],
    );
    report.expect(
        "guest-driver:acme_crypto_vf",
        "warning",
        &["guest's kernel must have it"],
        &["modinfo acme_crypto_vf"],
    );
    let mut errors = report.names_with("error");
    errors.sort();
    // The VFs are not on the profile's host driver either: a warning, prepare fixes it.
    assert_eq!(errors, ["host-driver:acme_host", "module:vfio_iommu_type1"]);
    report.expect(
        "pf:0000:01:00.0",
        "warning",
        &["instead of acme_host"],
        &["vfmap prepare"],
    );

    // vfio-pci not loaded but installed: fine, prepare loads it.
    fs::remove_dir_all(host.tree.root().join("bus/pci/drivers/vfio-pci")).unwrap();
    fs::remove_dir_all(host.tree.root().join("module/vfio_pci")).unwrap();
    let report = host.report(&example_profile(), &[], 3);
    report.expect("module:vfio-pci", "ok", &["installed, not loaded yet"], &[]);

    // No module index (no osrelease): the checks say they could not be made.
    fs::remove_file(host.dir.path().join("proc/sys/kernel/osrelease")).unwrap();
    let report = host.report(&example_profile(), &[], 0);
    report.expect(
        "module:vfio_iommu_type1",
        "warning",
        &["could not check whether it is installed", "osrelease"],
        &["modprobe vfio_iommu_type1"],
    );
}

#[test]
fn a_missing_card_or_one_without_sriov_is_an_error() {
    let host = Host::green();
    let profile = host.profile(
        r#"
[[card]]
name = "ghost"
vendor = "0x1b36"
device = "0x9999"
num_vfs = 1
[[card.function]]
name = "crypto"
vfs = "0"
guest_driver = "pci-stub"
"#,
    );
    let report = host.report(&profile, &[], 3);
    report.expect(
        "card:ghost",
        "error",
        &["no PCI device 1b36:9999 on this host"],
        &["lspci -nn", "profiles.toml"],
    );
    assert_eq!(report.names_with("error"), ["card:ghost"]);

    host.tree.add_plain_device("0000:02:00.0");
    let profile = host.profile(
        r#"
[[card]]
name = "plain-nic"
vendor = "0x8086"
device = "0x100e"
num_vfs = 1
[[card.function]]
name = "net"
vfs = "0"
guest_driver = "pci-stub"
"#,
    );
    host.report(&profile, &[], 3).expect(
        "card:plain-nic",
        "error",
        &["0000:02:00.0 (8086:100e) has no SR-IOV capability"],
        &["enable SR-IOV in the firmware"],
    );
}

#[test]
fn a_vf_count_over_the_total_is_an_error() {
    let host = Host::green();
    let profile = host.profile(
        r#"
[[card]]
name = "greedy"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 5
[[card.function]]
name = "storage"
vfs = "0-4"
guest_driver = "nvme"
"#,
    );
    let report = host.report(&profile, &[], 3);
    report.expect(
        "pf:0000:01:00.0",
        "error",
        &["wants num_vfs = 5", "at most 3 (sriov_totalvfs)"],
        &["set num_vfs to at most 3"],
    );
    assert_eq!(report.names_with("error"), ["pf:0000:01:00.0"]);
}

#[test]
fn vfs_not_enabled_yet_are_a_warning_that_says_run_prepare() {
    let host = Host::green();
    host.tree.set_num_vfs(bdf(PF), 0, None).unwrap();
    let report = host.report(&example_profile(), &[], 0);
    report.expect(
        "pf:0000:01:00.0",
        "warning",
        &["0 VFs enabled", "wants 3"],
        &["vfmap prepare --profiles"],
    );
    report.expect(
        "iommu-groups:0000:01:00.0",
        "warning",
        &["could not check", "no VFs enabled yet"],
        &["vfmap prepare"],
    );
}

#[test]
fn interrupt_remapping_off_is_an_error_unless_unsafe_interrupts_are_allowed() {
    let host = Host::green();
    let profile = example_profile();
    // Hardware without IR, interrupts not remapped.
    fs::remove_file(host.tree.root().join("class/iommu/dmar0")).unwrap();
    fs::remove_dir_all(host.tree.root().join("devices/virtual/iommu/dmar0")).unwrap();
    host.tree.add_iommu_unit("dmar0", Some(0xf0_2056));
    host.write(
        "proc/interrupts",
        "           CPU0\n  0:         45  IO-APIC    2-edge      timer\n",
    );
    let report = host.report(&profile, &[], 3);
    report.expect(
        "interrupt-remapping",
        "error",
        &["dmar0", "does not support interrupt remapping"],
        &["allow_unsafe_interrupts=1"],
    );
    host.tree
        .add_module("vfio_iommu_type1", &[("allow_unsafe_interrupts", "Y")]);
    host.report(&profile, &[], 0).expect(
        "interrupt-remapping",
        "warning",
        &["allow_unsafe_interrupts=Y", "inject interrupts"],
        &[],
    );
    // Turned off on the command line.
    host.tree
        .add_module("vfio_iommu_type1", &[("allow_unsafe_interrupts", "N")]);
    host.write("proc/cmdline", "intel_iommu=on intremap=off\n");
    host.report(&profile, &[], 3).expect(
        "interrupt-remapping",
        "error",
        &["intremap=off"],
        &["remove intremap=off"],
    );
    // Nothing to tell from: said so.
    fs::remove_file(host.dir.path().join("proc/interrupts")).unwrap();
    fs::remove_file(host.dir.path().join("proc/cmdline")).unwrap();
    fs::remove_file(host.tree.root().join("class/iommu/dmar0")).unwrap();
    host.report(&profile, &[], 0).expect(
        "interrupt-remapping",
        "warning",
        &["could not check", "proc/interrupts"],
        &[],
    );
}

#[test]
fn state_dir_and_socket_are_checked_with_the_daemons_rules() {
    let host = Host::green();
    let profile = example_profile();
    let state = host.dir.path().join("state");
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    let run = host.dir.path().join("run");
    fs::create_dir(&run).unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
    let socket = run.join("api.sock");
    let run_with = |state: &Path, exit| {
        let (state, socket) = (state.to_str().unwrap(), socket.to_str().unwrap());
        host.report(&profile, &["--state-dir", state, "--socket", socket], exit)
    };
    let report = run_with(&state, 0);
    report.expect("state-dir", "ok", &["owned by this user"], &[]);
    report.expect("socket-dir", "ok", &["owned by this user"], &[]);
    report.expect("socket", "ok", &["is free"], &[]);

    // Not there yet: the daemon creates it.
    run_with(&host.dir.path().join("new-state"), 0).expect(
        "state-dir",
        "ok",
        &["does not exist yet", "0700"],
        &[],
    );

    // Writable by others: the daemon's own message and fix.
    fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(&socket, "precious").unwrap();
    let report = run_with(&state, 3);
    report.expect(
        "state-dir",
        "error",
        &["writable by other users"],
        &["chmod go-w"],
    );
    report.expect(
        "socket",
        "error",
        &["is not a socket"],
        &["choose another socket path"],
    );
    assert_eq!(fs::read_to_string(&socket).unwrap(), "precious");
}

/// A test double's process, killed when dropped.
struct Double(Child);

impl Drop for Double {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_double(name: &str, args: &[&str], socket: &Path) -> Double {
    let double = Double(
        Command::new(world::testkit_bin(name))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "{name} did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    double
}

/// Plugs a device with `id` into `slot` of the fake QEMU, as another tool would.
fn plug(qmp: &Path, slot: &str, id: &str) {
    let stream = UnixStream::connect(qmp).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut lines = BufReader::new(stream).lines();
    lines.next().unwrap().unwrap(); // greeting
    for command in [
        json!({"execute": "qmp_capabilities"}),
        json!({"execute": "device_add", "arguments": {"driver": "e1000", "id": id, "bus": slot}}),
    ] {
        writeln!(writer, "{command}").unwrap();
        let answer: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert!(answer.get("return").is_some(), "{answer}");
    }
}

#[test]
fn a_vms_slots_and_agent_channel_given_on_the_command_line() {
    let host = Host::green();
    let qmp = host.dir.path().join("web.qmp");
    let agent = host.dir.path().join("web.agent");
    let _qemu = start_double("vfmap-fake-qmp", &["--slots", "rp0,rp1"], &qmp);
    let _agent = start_double("vfmap-fake-agent", &[], &agent);
    plug(&qmp, "rp1", "nic0");
    let (qmp_arg, agent_arg) = (qmp.to_str().unwrap(), agent.to_str().unwrap());
    let vm_args = [
        "--vm", "web", "--qmp", qmp_arg, "--agent", agent_arg, "--slot", "rp0", "--slot", "rp1",
        "--slot", "rp9",
    ];
    let report = host.report(&example_profile(), &vm_args, 3);
    report.expect("vm:web:qmp", "ok", &["QEMU 7.2.0 answers"], &[]);
    report.expect("vm:web:slot:rp0", "ok", &["an empty pcie-root-port"], &[]);
    report.expect(
        "vm:web:slot:rp1",
        "error",
        &["device nic0 is plugged there"],
        &["device_del"],
    );
    report.expect(
        "vm:web:slot:rp9",
        "error",
        &["no pcie-root-port with id rp9"],
        &["-device pcie-root-port,id=rp9"],
    );
    report.expect("vm:web:agent", "ok", &["accepts connections"], &[]);

    // The VM is down: QMP and the agent channel are errors with the QEMU options to use.
    drop(_qemu);
    drop(_agent);
    let report = host.report(&example_profile(), &vm_args, 3);
    report.expect("vm:web:qmp", "error", &["not running"], &["-qmp unix:"]);
    report.expect(
        "vm:web:slots",
        "warning",
        &["could not check", "3 slot(s)"],
        &[],
    );
    report.expect(
        "vm:web:agent",
        "error",
        &["is the VM running?"],
        &["virtserialport"],
    );

    // Half the details is bad input: exit 2, nothing checked.
    let out = host.doctor(false, &["--vm", "web", "--qmp", qmp_arg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--qmp PATH, --agent PATH and --slot ID"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = host.doctor(false, &["--vm", "web"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_vm_looked_up_from_the_daemon() {
    let mut world = world::World::new();
    world.start(None);
    let _vm = world.vm("web-1", 2, &[], &[]);
    let out = world.cli(&["attach", "web-1", "crypto"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doctor = |vm: &str| {
        Command::new(env!("CARGO_BIN_EXE_vfmap"))
            .args(["--json", "doctor", "--config"])
            .arg(&world.config)
            .args(["--vm", vm])
            .output()
            .unwrap()
    };
    // No proc/ or module index next to this tree: warnings only, and no error.
    let report = Report::parse(&doctor("web-1"), 0);
    report.expect("vm:web-1:qmp", "ok", &["answers"], &[]);
    report.expect(
        "vm:web-1:slot:rp0",
        "ok",
        &[
            "holds vfmap's device vfmap-vf0",
            "local index 0, function crypto",
        ],
        &[],
    );
    report.expect("vm:web-1:slot:rp1", "ok", &["an empty pcie-root-port"], &[]);
    report.expect("vm:web-1:agent", "ok", &["accepts connections"], &[]);
    report.expect("socket", "ok", &["a daemon is listening"], &[]);
    report.expect("state-dir", "ok", &["owned by this user"], &[]);
    report.expect("card:acme", "ok", &["covers PF 0000:01:00.0"], &[]);
    // The daemon still answers, and its VM is untouched.
    assert_eq!(
        world.json(&["status", "web-1"])["correspondence"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let report = Report::parse(&doctor("nope"), 3);
    report.expect(
        "vm:nope",
        "error",
        &["has no VM nope"],
        &["vfmap vm add nope"],
    );
}
