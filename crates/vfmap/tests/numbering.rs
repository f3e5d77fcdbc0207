//! One numbering: the offline `vfmap inventory` and the daemon give every VF the same global
//! index, also after the hardware changed under the daemon's state.

mod common;
mod world;

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;
use vfmap_core::{Bdf, PciId};
use vfmap_testkit::{PfSpec, SysfsTree};
use world::*;

/// location → global index, from an inventory document's `vfs`.
fn indexes(doc: &Value) -> BTreeMap<String, u64> {
    doc["vfs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["location"].as_str().unwrap().to_owned(),
                v["global_index"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn offline(world: &World, state_db: Option<&str>) -> Value {
    let dir = world.dir.path();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfmap"));
    cmd.args(["--json", "inventory", "--sysfs-root"])
        .arg(dir.join("sys"))
        .arg("--profiles")
        .arg(dir.join("profiles.toml"));
    if let Some(db) = state_db {
        cmd.args(["--state-db", db]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn offline_and_daemon_inventories_agree_after_the_hardware_changed() {
    let mut world = World::new();
    world.start(None);
    let first = indexes(&world.json(&["inventory"]));
    assert_eq!(first.len(), usize::from(VFS));
    world.kill9();

    // Between runs: one VF is gone, and a PF no profile covers brings four new VFs. The new
    // PF sorts first, so a dense renumbering would shift every index.
    let tree = SysfsTree::new(world.dir.path().join("sys"));
    let gone: Bdf = "0000:01:00.4".parse().unwrap();
    tree.unplug(gone);
    let mut other = PfSpec::nvme("0000:00:05.0", 4).with_vfs(4);
    other.vendor = PciId(0x8086);
    other.device = PciId(0x1234);
    other.vf_device = PciId(0x1235);
    tree.add_pf(&other);

    world.start(None);
    let daemon = indexes(&world.json(&["inventory"]));
    let db = world.dir.path().join("state/state.db");
    let stored = offline(&world, Some(db.to_str().unwrap()));
    assert_eq!(stored["numbering"], "stored");
    assert_eq!(indexes(&stored), daemon, "one numbering in both places");
    // Every VF that stayed kept its index; the gone one's index is not reused; the new ones
    // come after the highest.
    for (location, gi) in &first {
        if location != &gone.to_string() {
            assert_eq!(daemon.get(location), Some(gi), "{location}");
        }
    }
    assert!(!daemon.contains_key(&gone.to_string()));
    let new: Vec<u64> = daemon
        .iter()
        .filter(|(l, _)| l.starts_with("0000:00:05"))
        .map(|(_, gi)| *gi)
        .collect();
    assert_eq!(new, [16, 17, 18, 19]);

    // Without the database the offline numbering is dense, and says it is provisional.
    let provisional = offline(&world, None);
    assert_eq!(provisional["numbering"], "provisional");
    assert_ne!(indexes(&provisional), daemon);
}
