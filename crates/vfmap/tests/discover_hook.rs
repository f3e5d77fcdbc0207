//! Issue 15's `discover` check, through the real binaries on generated trees: a card's
//! `discover` hook that disagrees with the profile (or fails) is a problem of its PF in
//! `vfmap inventory`, a `discover:<card>` check of `vfmap doctor`, and a problem in the
//! daemon's start log, with the run in `vfmap_hook_duration_seconds`.

mod common;
mod world;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use vfmap_testkit::{PfSpec, SysfsTree};
use world::World;

const PF: &str = "0000:3b:00.0";

fn vfmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .args(args)
        .output()
        .expect("run vfmap")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Writes an executable `/bin/sh` hook.
fn hook(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A tree with one acme PF (4 VFs enabled), the profile (crypto 0-1, compress 2) naming
/// `<dir>/acme-discover` as its discover hook, and that hook printing `output`.
fn host(output: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sys");
    SysfsTree::new(&root).add_pf(&PfSpec::nvme(PF, 8).with_vfs(4));
    let program = dir.path().join("acme-discover");
    hook(&program, &format!("printf '{output}'"));
    let profiles = dir.path().join("profiles.toml");
    fs::write(
        &profiles,
        format!(
            r#"[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 4
[card.hooks]
discover = {program:?}
deadline_ms = 5000
[[card.function]]
name = "crypto"
vfs = "0-1"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "2"
guest_driver = "uio_pci_generic"
"#
        ),
    )
    .unwrap();
    (dir, root, profiles)
}

fn inventory_json(root: &Path, profiles: &Path) -> Value {
    let out = vfmap(&[
        "--json",
        "inventory",
        "--sysfs-root",
        root.to_str().unwrap(),
        "--profiles",
        profiles.to_str().unwrap(),
    ]);
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn discover_problems(doc: &Value) -> Vec<String> {
    doc["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["attribute"] == "discover")
        .map(|p| {
            assert_eq!(p["device"], PF);
            p["message"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn inventory_shows_each_disagreement_as_a_problem_of_the_pf() {
    let (_dir, root, profiles) = host("0 crypto\\n1 crypto\\n2 compress\\n");
    let doc = inventory_json(&root, &profiles);
    assert_eq!(discover_problems(&doc), Vec::<String>::new());
    assert_eq!(doc["vfs"][2]["function"], "compress");

    let (dir, root, profiles) = host("0 crypto\\n1 compress\\n3 crypto\\n");
    let program = dir.path().join("acme-discover");
    let problems = discover_problems(&inventory_json(&root, &profiles));
    let prefix = format!("card acme: discover hook {}: ", program.display());
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems.iter().all(|m| m.starts_with(&prefix)),
        "{problems:#?}"
    );
    assert!(
        problems[0].contains(
            "VF 1 carries function compress on the device, but the profile gives it crypto"
        )
    );
    assert!(problems[1].contains(
        "the profile gives VF 2 function compress, but the discover hook does not list it"
    ));
    assert!(
        problems[2]
            .contains("VF 3 carries function crypto on the device, but the profile gives it none")
    );
    // The text shows them with the other problems; T1 still comes from the profile.
    let text = stdout(&vfmap(&[
        "inventory",
        "--sysfs-root",
        root.to_str().unwrap(),
        "--profiles",
        profiles.to_str().unwrap(),
    ]));
    assert!(text.contains("Problems (3):"), "{text}");
    assert!(
        text.contains(&format!(
            "  {PF} discover: {prefix}VF 1 carries function compress"
        )),
        "{text}"
    );
}

#[test]
fn inventory_shows_a_failing_hook_as_one_problem_and_still_succeeds() {
    let (dir, root, profiles) = host("");
    let program = dir.path().join("acme-discover");
    hook(
        &program,
        "echo 'acme-discover: the card does not answer' >&2; exit 2",
    );
    let problems = discover_problems(&inventory_json(&root, &profiles));
    assert_eq!(
        problems,
        [format!(
            "card acme: discover hook {} failed (exit status: 2); last stderr: acme-discover: \
             the card does not answer",
            program.display()
        )]
    );
    hook(&program, "echo '0 crypto # loaded'");
    let problems = discover_problems(&inventory_json(&root, &profiles));
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].contains("printed output that cannot be read: line 1: more than two fields"),
        "{problems:?}"
    );
}

#[test]
fn doctor_checks_that_discover_agrees_with_the_profile() {
    let (dir, root, profiles) = host("0 crypto\\n1 crypto\\n2 compress\\n");
    let doctor = |root: &Path, profiles: &Path| -> Value {
        let out = vfmap(&[
            "--json",
            "doctor",
            "--sysfs-root",
            root.to_str().unwrap(),
            "--profiles",
            profiles.to_str().unwrap(),
        ]);
        let doc: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        let check = doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "discover:acme")
            .cloned();
        check.unwrap_or_else(|| panic!("no discover:acme check: {doc}"))
    };
    let check = doctor(&root, &profiles);
    assert_eq!(check["status"], "ok", "{check}");
    assert_eq!(
        check["detail"],
        format!("the discover hook agrees with the profile on PF {PF} (4 VFs)")
    );
    hook(
        &dir.path().join("acme-discover"),
        "printf '0 compress\\n1 crypto\\n2 compress\\n'",
    );
    let check = doctor(&root, &profiles);
    assert_eq!(check["status"], "error", "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("VF 0 carries function compress on the device"),
        "{check}"
    );
}

/// `GET /metrics` from the daemon, as text.
fn metrics(socket: &Path) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn the_daemon_checks_at_start_and_logs_each_disagreement() {
    let mut world = World::new();
    let dir = world.dir.path().to_owned();
    let program = dir.join("acme-discover");
    // The world's card: crypto on VFs 0-7, compress on 8-15. The device says VF 9 is crypto.
    hook(
        &program,
        "echo 'reading region ids' >&2\n\
         i=0; while [ $i -lt 16 ]; do\n\
           if [ $i -lt 8 ] || [ $i -eq 9 ]; then echo \"$i crypto\"; else echo \"$i compress\"; fi\n\
           i=$((i + 1))\n\
         done",
    );
    let profiles = dir.join("profiles.toml");
    let text = fs::read_to_string(&profiles).unwrap().replace(
        "num_vfs = 16\n",
        &format!("num_vfs = 16\n[card.hooks]\ndiscover = {program:?}\n"),
    );
    fs::write(&profiles, text).unwrap();
    world.start(None);
    let log = world.log_text();
    let problem = format!(
        "card acme: discover hook {}: VF 9 carries function crypto on the device, but the \
         profile gives it compress",
        program.display()
    );
    assert!(log.contains(&problem), "{log}");
    assert_eq!(log.matches("discover hook").count(), 1, "{log}");
    assert!(log.contains("hook: reading region ids"), "{log}");
    let text = metrics(&world.socket);
    let count = text
        .lines()
        .find(|l| {
            l.starts_with("vfmap_hook_duration_seconds_count{")
                && l.contains("phase=\"discover\"")
                && l.contains("outcome=\"ok\"")
        })
        .unwrap_or_else(|| panic!("no discover runs in the metrics:\n{text}"));
    assert!(count.ends_with(" 1"), "{count}");
    // The daemon serves regardless: a disagreement is reported, not fatal.
    assert!(world.cli(&["inventory"]).status.success());
}
