//! Issue 15's re-programming, through the real daemon and CLI on a generated sysfs tree: a
//! free VF made to carry another function by its card's `program` hook, by an operator or by
//! an attach short of free VFs; the policy, a held VF, a failing hook (quarantine) and a crash
//! in the middle (recovery runs the hook again).

mod common;
mod world;

use std::os::unix::fs::PermissionsExt;

use serde_json::Value;
use world::*;

/// A world whose crypto VFs may become compress VFs through a hook that records each run
/// (`program.log`) and fails while `program.fail` exists.
fn world() -> World {
    let world = World::new();
    let dir = world.dir.path();
    let hook = dir.join("program");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$1 $VFMAP_VF_NUMBER $VFMAP_FROM_FUNCTION $VFMAP_FUNCTION\" >> {:?}\n\
             if [ -e {:?} ]; then echo 'bitstream rejected' >&2; exit 2; fi\n",
            dir.join("program.log"),
            dir.join("program.fail")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let profiles = dir.join("profiles.toml");
    let text = std::fs::read_to_string(&profiles)
        .unwrap()
        .replace(
            "num_vfs = 16\n",
            &format!("num_vfs = 16\n[card.hooks]\nprogram = {hook:?}\n"),
        )
        .replace(
            "vfs = \"0-7\"\n",
            "vfs = \"0-7\"\nprogrammable_to = [\"compress\"]\n",
        );
    std::fs::write(&profiles, text).unwrap();
    world
}

/// The daemon's inventory VF at global index `gi`.
fn vf(world: &World, gi: u64) -> Value {
    world.json(&["inventory"])["vfs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["global_index"] == gi)
        .unwrap()
        .clone()
}

fn program_log(world: &World) -> Vec<String> {
    std::fs::read_to_string(world.dir.path().join("program.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_operator_re_programs_a_free_vf_within_the_profile_s_policy() {
    let mut world = world();
    world.start(None);
    let done = world.json(&["program", "3", "compress"]);
    assert_eq!(done["from"], "crypto");
    assert_eq!(done["to"], "compress");
    assert_eq!(program_log(&world), ["program 3 crypto compress"]);
    let v = vf(&world, 3);
    assert_eq!(v["function"], "compress");
    assert_eq!(v["guest_driver"], "uio_pci_generic");
    // The profile allows crypto -> compress only.
    let out = world.cli(&["program", "3", "crypto"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not let it be re-programmed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = world.cli(&["program", "3", "storage"]);
    assert_eq!(out.status.code(), Some(4), "unknown function");
    // Kept across a crash.
    world.kill9();
    world.start(None);
    assert_eq!(vf(&world, 3)["function"], "compress");
    // A VF a VM holds is refused.
    let _vm = world.vm("web-1", 4, &[], &[]);
    let doc = world.json(&["attach", "web-1", "crypto"]);
    let held = doc["attached"][0]["host_vf"].as_str().unwrap().to_owned();
    let gi = world.json(&["inventory"])["vfs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["location"] == held.as_str())
        .unwrap()["global_index"]
        .to_string();
    let out = world.cli(&["program", &gi, "compress"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("held by VM web-1"));
    assert_eq!(program_log(&world).len(), 1, "no hook ran for it");
}

#[test]
fn an_attach_short_of_free_vfs_re_programs_one_and_the_guest_binds_the_new_driver() {
    let mut world = world();
    world.start(None);
    let vm = world.vm("web-1", 10, &[], &[]);
    // All 8 compress VFs, then one more: a crypto VF is re-programmed for it.
    assert!(
        world
            .cli(&["attach", "web-1", "compress", "--count", "8"])
            .status
            .success()
    );
    let doc = world.json(&["attach", "web-1", "compress"]);
    let row = &doc["attached"][0];
    assert_eq!(row["function"], "compress");
    assert_eq!(row["bound_driver"], "uio_pci_generic");
    assert_eq!(program_log(&world), ["program 0 crypto compress"]);
    assert!(lines(&vm.agent_state).contains(&"8 compress uio_pci_generic".to_owned()));
    // Not enough programmable VFs left for the request: nothing is re-programmed.
    let out = world.cli(&["attach", "web-1", "compress", "--count", "8"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(program_log(&world).len(), 1);
    // A failing hook: the attach fails, the VF is quarantined with the hook's error.
    std::fs::write(world.dir.path().join("program.fail"), "").unwrap();
    let out = world.cli(&["attach", "web-1", "compress"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bitstream rejected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = world.json(&["quarantine"]);
    let reason = q["vfs"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("re-programming from crypto into compress failed"),
        "{reason}"
    );
    assert_eq!(q["vfs"][0]["function"], "crypto", "what it carried");
}

#[test]
fn a_crash_during_the_hook_is_finished_by_recovery() {
    let mut world = world();
    world.start(Some("programming"));
    assert!(!world.cli(&["program", "5", "compress"]).status.success());
    world.wait_dead();
    assert!(
        program_log(&world).is_empty(),
        "the daemon died before the hook"
    );
    world.start(None);
    assert_eq!(program_log(&world), ["program 5 crypto compress"]);
    assert_eq!(vf(&world, 5)["function"], "compress");
    assert!(
        world.json(&["quarantine"])["vfs"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}
