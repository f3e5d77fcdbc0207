//! The `vfmap` binary on generated sysfs trees: output contracts, exit codes, and bad input
//! that changes nothing.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use vfmap_testkit::{PfSpec, SysfsTree, golden_fixture};

const PROFILE: &str = r#"
[[card]]
name = "acme-fpga"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 5
[[card.function]]
name = "crypto"
description = "AES-GCM / SHA offload"
vfs = "0-1"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "2,4"
guest_driver = "uio_pci_generic"
"#;

fn vfmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .args(args)
        .output()
        .expect("run vfmap")
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Asserts a failed `--json` run: its exit code, the error's stable code, and a message part.
fn assert_json_error(out: &Output, exit: i32, code: &str, message_part: &str) {
    assert_eq!(
        out.status.code(),
        Some(exit),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = stdout_json(out);
    assert_eq!(doc["error"]["code"], code, "{doc}");
    let message = doc["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(message_part), "{message}");
}

/// Every file's path and content (symlinks as their targets), to prove nothing changed.
fn snapshot(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            let name = path.strip_prefix(root).unwrap().display().to_string();
            if kind.is_symlink() {
                out.push((
                    name,
                    format!("-> {}", fs::read_link(&path).unwrap().display()),
                ));
            } else if kind.is_dir() {
                stack.push(path);
            } else {
                out.push((
                    name,
                    String::from_utf8_lossy(&fs::read(&path).unwrap()).into_owned(),
                ));
            }
        }
    }
    out.sort();
    out
}

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let tree = SysfsTree::new(dir.path().join("sys"));
        tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 8).with_vfs(5));
        tree.add_pf(&PfSpec::nvme("0001:5e:00.0", 8));
        tree.add_plain_device("0000:00:1f.0");
        fs::write(dir.path().join("profiles.toml"), PROFILE).unwrap();
        Host { dir }
    }

    fn root(&self) -> String {
        self.dir.path().join("sys").display().to_string()
    }

    fn profiles(&self) -> String {
        self.dir.path().join("profiles.toml").display().to_string()
    }
}

#[test]
fn inventory_json_has_the_documented_fields() {
    let host = Host::new();
    let out = vfmap(&[
        "--json",
        "inventory",
        "--sysfs-root",
        &host.root(),
        "--profiles",
        &host.profiles(),
    ]);
    assert!(out.status.success());
    let doc = stdout_json(&out);
    let functions = doc["functions"].as_array().unwrap();
    let crypto = functions.iter().find(|f| f["name"] == "crypto").unwrap();
    assert_eq!(crypto["guest_driver"], "pci-stub");
    assert_eq!(crypto["host_driver"], "vfio-pci");
    assert_eq!(crypto["total"], 2);
    let vfs = doc["vfs"].as_array().unwrap();
    assert_eq!(vfs.len(), 5);
    let vf3 = &vfs[3];
    for field in [
        "global_index",
        "function",
        "location",
        "pf",
        "vf_index",
        "vendor",
        "device",
        "numa_node",
        "iommu_group",
        "driver",
    ] {
        assert!(vf3.get(field).is_some(), "missing {field} in {vf3}");
    }
    assert_eq!(vf3["global_index"], 3);
    assert!(vf3["function"].is_null(), "VF 3 is unassigned");
    assert_eq!(vf3["location"], "0000:3b:00.4");
    assert_eq!(vf3["pf"], "0000:3b:00.0");
    assert_eq!(vf3["vf_index"], 3);
    assert_eq!(vfs[4]["function"], "compress");
    // The PF in domain 0001 has no VFs enabled yet but is listed.
    assert_eq!(doc["pfs"][1]["location"], "0001:5e:00.0");
    assert_eq!(doc["pfs"][1]["num_vfs"], 0);
}

#[test]
fn inventory_without_profiles_lists_every_vf_unassigned() {
    let host = Host::new();
    let out = vfmap(&["--json", "inventory", "--sysfs-root", &host.root()]);
    let doc = stdout_json(&out);
    assert!(
        doc["vfs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["function"].is_null())
    );
    assert!(doc["functions"].as_array().unwrap().is_empty());
}

/// `vfmap inventory | head`: the reader closes the pipe first. No panic, no error message: the
/// quiet SIGPIPE status, in both output modes.
#[test]
fn a_closed_stdout_pipe_is_a_quiet_exit_141() {
    let host = Host::new();
    for json in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfmap"));
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .args(["inventory", "--sysfs-root", &host.root()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "json={json}: {stderr}");
        assert!(stderr.is_empty(), "json={json}: {stderr}");
    }
}

#[test]
fn inventory_text_shows_the_tables() {
    let out = vfmap(&[
        "inventory",
        "--sysfs-root",
        golden_fixture().to_str().unwrap(),
        "--profiles",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/profiles.toml"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let row = text.lines().find(|l| l.contains("0000:01:00.2")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..3], ["1", "crypto", "0000:01:00.2"], "{text}");
    assert!(text.contains("Functions:"), "{text}");
}

#[test]
fn bad_profiles_are_exit_2_with_one_line_naming_the_file() {
    let host = Host::new();
    let bad = host.dir.path().join("bad.toml");
    for (text, want) in [
        (
            PROFILE.replace("vfs = \"2,4\"", "vfs = \"1-2\""),
            "field `vfs`: VF 1 is also given",
        ),
        (
            PROFILE.replace("num_vfs = 5", "num_vfs = 5\nspeed = 1"),
            "unknown field `speed`",
        ),
        (
            PROFILE.replace("\"pci-stub\"", "\"../../bin/sh\""),
            "not a plain module name",
        ),
    ] {
        fs::write(&bad, text).unwrap();
        let out = vfmap(&[
            "inventory",
            "--sysfs-root",
            &host.root(),
            "--profiles",
            bad.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("bad.toml"), "{stderr}");
        assert!(stderr.contains(want), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    let out = vfmap(&[
        "--json",
        "inventory",
        "--sysfs-root",
        &host.root(),
        "--profiles",
        "/nonexistent.toml",
    ]);
    assert_json_error(
        &out,
        2,
        "bad_profiles",
        "cannot read profile file /nonexistent.toml",
    );
}

#[test]
fn bad_arguments_are_exit_2() {
    let host = Host::new();
    assert_eq!(vfmap(&["inventory", "--bogus"]).status.code(), Some(2));
    assert_eq!(vfmap(&["frobnicate"]).status.code(), Some(2));
    let out = vfmap(&["prepare", "--sysfs-root", &host.root()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prepare needs --profiles FILE"));
}

#[test]
fn a_wrong_sysfs_root_is_exit_1_with_a_hint() {
    let out = vfmap(&["--json", "inventory", "--sysfs-root", "/definitely/not/sys"]);
    assert_json_error(&out, 1, "sysfs", "is the sysfs root right?");
}

#[test]
fn refused_prepare_is_exit_3_and_changes_nothing() {
    let host = Host::new();
    // A VF in use by a driver: changing 5 -> 4 VFs must be refused.
    SysfsTree::new(host.dir.path().join("sys"))
        .link_driver("0000:3b:00.1".parse().unwrap(), "nvme");
    let fewer = host.dir.path().join("fewer.toml");
    fs::write(
        &fewer,
        PROFILE
            .replace("num_vfs = 5", "num_vfs = 4")
            .replace("2,4", "2"),
    )
    .unwrap();
    let before = snapshot(host.dir.path());
    let out = vfmap(&[
        "--json",
        "prepare",
        "--sysfs-root",
        &host.root(),
        "--profiles",
        fewer.to_str().unwrap(),
    ]);
    assert_json_error(&out, 3, "refused", "0000:3b:00.1 bound to nvme");
    assert_eq!(snapshot(host.dir.path()), before);
}

#[test]
fn dry_run_lists_steps_and_changes_nothing() {
    let host = Host::new();
    let before = snapshot(host.dir.path());
    let out = vfmap(&[
        "--json",
        "prepare",
        "--dry-run",
        "--sysfs-root",
        &host.root(),
        "--profiles",
        &host.profiles(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = stdout_json(&out);
    let actions: Vec<&str> = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["action"].as_str().unwrap())
        .collect();
    // Autoprobe is on in the generated tree. PF 3b has its 5 VFs, four carry a function and
    // are unbound; PF 0001:5e matches the same card and needs its 5 VFs created first (its
    // binds are planned only once they exist).
    assert_eq!(
        actions,
        [
            "disable_autoprobe",
            "disable_autoprobe",
            "set_num_vfs",
            "bind",
            "bind",
            "bind",
            "bind"
        ]
    );
    assert_eq!(doc["steps"][2]["pf"], "0001:5e:00.0");
    assert_eq!(doc["steps"][2]["to"], 5);
    assert_eq!(snapshot(host.dir.path()), before);
}
