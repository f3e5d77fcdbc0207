//! Issue 15's scrub, through the real daemon and CLI on a generated sysfs tree: after a
//! release the VF's config space is checked and its card's `scrub` hook runs; a VF that fails
//! either is quarantined — listed with why, never handed out, kept across a restart — until
//! an operator clears it (which scrubs it again, unless forced).

mod common;
mod world;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;
use vfmap_core::Bdf;
use vfmap_testkit::{Dirty, reset_vf_config, set_vf_config_dirty};
use world::*;

/// The host VF at `web-1`'s local index 0.
fn vf_at_0(world: &World) -> Bdf {
    let status = world.json(&["status", "web-1"]);
    status["correspondence"][0]["host_vf"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn quarantined(world: &World) -> Vec<Value> {
    world.json(&["quarantine"])["vfs"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_vf_left_bus_mastering_is_quarantined_kept_out_and_cleared_once_clean() {
    let mut world = World::new();
    world.start(None);
    let _vm = world.vm("web-1", 8, &[], &[]);
    assert!(world.cli(&["attach", "web-1", "crypto"]).status.success());
    let vf = vf_at_0(&world);
    let sys = world.dir.path().join("sys");
    // What a guest could leave behind that the reset did not undo.
    set_vf_config_dirty(&sys, vf, Dirty::BusMaster);
    let out = world.cli(&["detach", "web-1", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = quarantined(&world);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["location"], vf.to_string());
    assert_eq!(list[0]["function"], "crypto");
    let reason = list[0]["reason"].as_str().unwrap();
    assert!(reason.contains("bus master"), "{reason}");
    let inventory = world.json(&["inventory"]);
    let row = inventory["vfs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["location"] == vf.to_string().as_str())
        .unwrap();
    assert!(row["quarantined"].as_str().unwrap().contains("bus master"));
    let text = String::from_utf8(world.cli(&["inventory"]).stdout).unwrap();
    assert!(text.contains("quarantined"), "{text}");
    let text = String::from_utf8(world.cli(&["quarantine", "list"]).stdout).unwrap();
    assert!(
        text.contains(&vf.to_string()) && text.contains("bus master"),
        "{text}"
    );
    // Never handed out: of the 8 crypto VFs, 7 are free.
    let out = world.cli(&["attach", "web-1", "crypto", "--count", "8"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("7 free"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = world.json(&["attach", "web-1", "crypto", "--count", "7"]);
    let given: Vec<&str> = doc["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host_vf"].as_str().unwrap())
        .collect();
    assert!(!given.contains(&vf.to_string().as_str()), "{given:?}");
    // Kept across a crash and a restart.
    world.kill9();
    world.start(None);
    assert_eq!(quarantined(&world).len(), 1);
    // A clear scrubs again: still dirty, so it stays.
    let index = list[0]["global_index"].as_u64().unwrap().to_string();
    let out = world.cli(&["quarantine", "clear", &index]);
    assert_eq!(out.status.code(), Some(3), "still_dirty is a refusal");
    assert!(String::from_utf8_lossy(&out.stderr).contains("still not clean"));
    assert_eq!(quarantined(&world).len(), 1);
    // Once clean, the clear returns it.
    reset_vf_config(&sys, vf);
    let cleared = world.json(&["quarantine", "clear", &index]);
    assert_eq!(cleared["scrubbed"], true);
    assert!(quarantined(&world).is_empty());
    let out = world.cli(&["quarantine", "clear", &index]);
    assert_eq!(out.status.code(), Some(4), "not_quarantined");
    assert!(world.cli(&["detach", "web-1", "1"]).status.success());
    let doc = world.json(&["attach", "web-1", "crypto", "--count", "2"]);
    assert_eq!(doc["attached"].as_array().unwrap().len(), 2);
}

/// Writes an executable hook script.
fn hook(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn the_card_s_scrub_hook_runs_with_the_contract_and_its_failure_quarantines() {
    let mut world = World::new();
    let dir = world.dir.path().to_owned();
    let wipe = dir.join("wipe");
    let seen = dir.join("wipe.env");
    let fail = dir.join("wipe.fail");
    let slow = dir.join("wipe.slow");
    let started = dir.join("wipe.started");
    hook(
        &wipe,
        &format!(
            "env | grep ^VFMAP_ | sort > {seen:?}; echo \"phase $1\" >> {seen:?}\n\
             if [ -e {slow:?} ]; then : > {started:?}; sleep 2; fi\n\
             if [ -e {fail:?} ]; then echo 'wipe: bad block 7' >&2; exit 3; fi"
        ),
    );
    let profiles = dir.join("profiles.toml");
    let text = std::fs::read_to_string(&profiles).unwrap().replace(
        "num_vfs = 16\n",
        &format!(
            "num_vfs = 16\n[card.hooks]\nscrub = {:?}\ndeadline_ms = 5000\n",
            wipe
        ),
    );
    std::fs::write(&profiles, text).unwrap();
    world.start(None);
    let _vm = world.vm("web-1", 4, &[], &[]);
    assert!(world.cli(&["attach", "web-1", "crypto"]).status.success());
    let vf = vf_at_0(&world);
    assert!(world.cli(&["detach", "web-1", "0"]).status.success());
    let env = std::fs::read_to_string(&seen).unwrap();
    let vf_number = (0..16u16)
        .find(|n| {
            "0000:01:00.0"
                .parse::<Bdf>()
                .unwrap()
                .vf_location(1, 1, *n)
                .unwrap()
                == vf
        })
        .unwrap();
    let sys = dir.join("sys");
    assert_eq!(
        env,
        format!(
            "VFMAP_CARD=acme\nVFMAP_FUNCTION=crypto\nVFMAP_PF=0000:01:00.0\nVFMAP_PHASE=scrub\n\
             VFMAP_SYSFS_ROOT={}\nVFMAP_VF={vf}\nVFMAP_VF_NUMBER={vf_number}\nphase scrub\n",
            sys.display()
        )
    );
    assert!(quarantined(&world).is_empty(), "the wipe succeeded");
    // The card's wipe fails: the VF is quarantined with the hook's error.
    std::fs::write(&fail, "").unwrap();
    assert!(world.cli(&["attach", "web-1", "crypto"]).status.success());
    let vf = vf_at_0(&world);
    assert!(world.cli(&["detach", "web-1", "0"]).status.success());
    let list = quarantined(&world);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["location"], vf.to_string());
    let reason = list[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("card acme") && reason.contains("scrub") && reason.contains("bad block 7"),
        "{reason}"
    );
    // Clearing it runs the wipe again: still failing, then fixed.
    let index = list[0]["global_index"].as_u64().unwrap().to_string();
    assert_eq!(
        world.cli(&["quarantine", "clear", &index]).status.code(),
        Some(3)
    );
    std::fs::remove_file(&fail).unwrap();
    // A second clear while the first one's wipe runs is a conflict, not a verdict on the VF;
    // the first one returns it.
    std::fs::write(&slow, "").unwrap();
    std::thread::scope(|s| {
        let first = s.spawn(|| world.cli(&["quarantine", "clear", &index]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !started.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(started.exists(), "the first clear's wipe did not start");
        let out = world.cli(&["--json", "quarantine", "clear", &index]);
        assert_eq!(out.status.code(), Some(3), "a conflict is a refusal");
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["error"]["code"], "conflict", "{doc}");
        let first = first.join().unwrap();
        assert!(
            first.status.success(),
            "{}",
            String::from_utf8_lossy(&first.stderr)
        );
    });
    std::fs::remove_file(&slow).unwrap();
    assert!(quarantined(&world).is_empty());
    // A hook others may write is refused, not run: that is a failed scrub too.
    std::fs::set_permissions(&wipe, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::remove_file(&seen).unwrap();
    assert!(world.cli(&["attach", "web-1", "crypto"]).status.success());
    assert!(world.cli(&["detach", "web-1", "0"]).status.success());
    assert!(!seen.exists(), "the hook did not run");
    let list = quarantined(&world);
    assert_eq!(list.len(), 1);
    assert!(
        list[0]["reason"].as_str().unwrap().contains("writable"),
        "{list:?}"
    );
    // `--force` returns it without a scrub.
    let index = list[0]["global_index"].as_u64().unwrap().to_string();
    let cleared = world.json(&["quarantine", "clear", &index, "--force"]);
    assert_eq!(cleared["scrubbed"], false);
    assert!(quarantined(&world).is_empty());
}
