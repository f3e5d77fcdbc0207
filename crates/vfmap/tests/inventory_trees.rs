//! `vfmap inventory` on trees the kernel (or a capture of it) really produces: kernels before
//! 4.15, cards pinned to PFs that are not there, and trees this user may not read.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use vfmap_core::{Bdf, PciId};
use vfmap_testkit::{PfSpec, SysfsTree};

/// The unprivileged user the permission tests run `vfmap` as.
const NOBODY: u32 = 65534;

fn vfmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .args(args)
        .output()
        .expect("run vfmap")
}

fn text(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn before_4_15_vfs_get_their_own_device_id_instead_of_null() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path());
    let mut spec = PfSpec::nvme("0000:3b:00.0", 4).with_vfs(2).before_4_15();
    spec.vf_device = PciId(0x0011);
    tree.add_pf(&spec);
    let root = dir.path().to_str().unwrap();
    let out = vfmap(&["--json", "inventory", "--sysfs-root", root]);
    let doc: Value = serde_json::from_str(&text(&out)).unwrap();
    let vfs = doc["vfs"].as_array().unwrap();
    assert_eq!(vfs.len(), 2);
    for vf in vfs {
        assert_eq!(
            (&vf["vendor"], &vf["device"]),
            (&"0x1b36".into(), &"0x0011".into())
        );
    }
    assert_eq!(doc["problems"], Value::Array(vec![]));
    let out = text(&vfmap(&["inventory", "--sysfs-root", root]));
    let row = out.lines().find(|l| l.contains("0000:3b:00.1")).unwrap();
    assert!(row.contains("1b36:0011"), "{out}");
}

#[test]
fn a_card_pinned_to_a_missing_or_different_pf_is_reported_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let tree = SysfsTree::new(dir.path().join("sys"));
    tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 4).with_vfs(2));
    let mut other = PfSpec::nvme("0000:5e:00.0", 4);
    other.device = PciId(0x0020);
    tree.add_pf(&other);
    let card = |name: &str, pf: &str| {
        format!(
            "[[card]]\nname = \"{name}\"\nvendor = \"0x1b36\"\ndevice = \"0x0010\"\n\
             pf = \"{pf}\"\nnum_vfs = 2\n[[card.function]]\nname = \"crypto\"\nvfs = \"0-1\"\n\
             guest_driver = \"pci-stub\"\n"
        )
    };
    let profiles = dir.path().join("profiles.toml");
    fs::write(
        &profiles,
        [card("typo", "0000:3c:00.0"), card("moved", "0000:5e:00.0")].concat(),
    )
    .unwrap();
    let (root, profiles) = (
        dir.path().join("sys").display().to_string(),
        profiles.display().to_string(),
    );
    let out = text(&vfmap(&[
        "inventory",
        "--sysfs-root",
        &root,
        "--profiles",
        &profiles,
    ]));
    let wants = [
        format!(
            "  0000:3c:00.0 pf: {profiles}: card \"typo\", field `pf`: there is no SR-IOV capable \
             PF at 0000:3c:00.0 (those here: 0000:3b:00.0, 0000:5e:00.0); fix `pf` to the PF's \
             address or remove the card"
        ),
        format!(
            "  0000:5e:00.0 pf: {profiles}: card \"moved\", field `pf`: the PF at 0000:5e:00.0 is \
             1b36:0020, not the card's 1b36:0010, so the card covers nothing; fix the card's \
             `vendor`/`device` or its `pf`"
        ),
    ];
    for want in &wants {
        assert!(
            out.lines().any(|l| l == want),
            "missing {want:?} in:\n{out}"
        );
    }
    assert!(out.contains("Problems (2):"), "{out}");
}

/// A temporary directory another user can walk into (the default one is owner-only, and so
/// may be `$TMPDIR`).
fn world_walkable_tempdir() -> tempfile::TempDir {
    let base = [std::env::temp_dir(), PathBuf::from("/tmp")]
        .into_iter()
        .find(|dir| {
            dir.ancestors().all(|d| {
                fs::metadata(d).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o001 != 0)
            })
        })
        .expect("a temporary directory every user can traverse");
    let dir = tempfile::tempdir_in(base).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Runs `vfmap` as a user who cannot read what `restrict` made private: `nobody` when the tests
/// run as root (root reads everything), else this user with the files at mode 000.
struct Unprivileged {
    as_root: bool,
}

impl Unprivileged {
    fn new(probe: &Path) -> Unprivileged {
        let me = fs::metadata(probe).unwrap().uid();
        Unprivileged { as_root: me == 0 }
    }

    /// The mode that hides a file from the user [`Unprivileged::run`] runs as.
    fn private_mode(&self) -> u32 {
        if self.as_root { 0o600 } else { 0o000 }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vfmap"));
        command.args(args);
        if self.as_root {
            command.uid(NOBODY).gid(NOBODY);
        }
        command.output().expect("run vfmap unprivileged")
    }
}

#[test]
fn unreadable_attributes_make_the_headline_say_permission_denied_not_no_device() {
    let dir = world_walkable_tempdir();
    let tree = SysfsTree::new(dir.path());
    tree.add_plain_device("0000:00:1f.0");
    tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 8).with_vfs(2));
    tree.add_pf(&PfSpec::nvme("0000:5e:00.0", 8));
    let user = Unprivileged::new(dir.path());
    let root = dir.path().to_str().unwrap();

    // Readable: the control.
    let out = text(&user.run(&["inventory", "--sysfs-root", root]));
    assert!(out.starts_with("SR-IOV PFs under"), "{out}");

    // One attribute root-only: the PF table is there, and the headline says it is incomplete.
    let numa = tree.device_link(bdf("0000:3b:00.1")).join("numa_node");
    fs::set_permissions(&numa, fs::Permissions::from_mode(user.private_mode())).unwrap();
    let out = text(&user.run(&["inventory", "--sysfs-root", root]));
    let devices = dir.path().join("bus/pci/devices");
    assert_eq!(
        out.lines().next().unwrap(),
        format!(
            "cannot read 1 attribute under {}: permission denied — run as root; what follows is \
             incomplete",
            devices.display()
        ),
        "{out}"
    );
    assert!(out.contains("SR-IOV PFs under"), "{out}");
    assert!(
        out.contains("0000:3b:00.1 numa_node: cannot read: Permission denied"),
        "{out}"
    );

    // A capture that kept owner-only modes: nothing identifiable, and it says why.
    tree.chmod_attributes(user.private_mode());
    let out = text(&user.run(&["inventory", "--sysfs-root", root]));
    assert_eq!(
        out.lines().next().unwrap(),
        format!(
            "cannot read 2 attributes under {}: permission denied — run as root; no SR-IOV PF \
             could be identified without them",
            devices.display()
        ),
        "{out}"
    );
    assert!(!out.contains("no SR-IOV capable"), "{out}");
    let out = user.run(&["--json", "inventory", "--sysfs-root", root]);
    let doc: Value = serde_json::from_str(&text(&out)).unwrap();
    let problems = doc["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{doc}");
    for problem in problems {
        assert_eq!(problem["attribute"], "sriov_totalvfs");
        let message = problem["message"].as_str().unwrap();
        assert!(
            message.starts_with("cannot read: Permission denied"),
            "{message}"
        );
    }

    // The device list itself unreadable: a clear error, exit 1.
    fs::set_permissions(&devices, fs::Permissions::from_mode(0o700)).unwrap();
    if !user.as_root {
        fs::set_permissions(&devices, fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = user.run(&["inventory", "--sysfs-root", root]);
    fs::set_permissions(&devices, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot list PCI devices in")
            && stderr.contains("run vfmap as root (or make the tree readable to this user)"),
        "{stderr}"
    );
    tree.chmod_attributes(0o644); // so the tempdir can be removed as a non-root user
}
