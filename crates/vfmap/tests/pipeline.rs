//! The pipelined multi-VF attach on the real daemon (issue 14): `kill -9` (a failpoint) after
//! every step of a 3-VF request, and the restarted daemon agrees with the fake QEMU, holds
//! all three or none, and leaks no VF.

mod common;
mod world;

use world::*;

/// The attach steps of a multi-VF request, in order, and whether the request survives a
/// crash right after each: only a committed `ready` is kept.
const POINTS: [(&str, bool); 9] = [
    ("reserved", false),
    ("host_bound", false),
    // After the first, second and third device_add: the rest not plugged, nothing committed.
    ("device_added", false),
    ("device_added:2", false),
    ("device_added:3", false),
    // Plugged and sent are one commit; each has its failpoint.
    ("plugged", false),
    ("sent", false),
    // The agent bound all three; `ready` is not committed yet.
    ("answered", false),
    ("ready", true),
];

#[test]
fn a_crash_after_every_step_of_a_multi_vf_attach_is_recovered() {
    for (point, kept) in POINTS {
        let mut world = World::new();
        world.start(None);
        let vm = world.vm("web-1", 4, &[], &[]);
        // Another VM's VF, attached before: recovery must leave it alone.
        let other = world.vm("db", 2, &[], &[]);
        assert!(world.cli(&["attach", "db", "crypto"]).status.success());
        world.kill9();
        world.start(Some(point));
        let out = world.cli(&["attach", "web-1", "crypto", "--count", "3"]);
        assert!(
            !out.status.success(),
            "{point}: the daemon should have died"
        );
        world.wait_dead();
        let added = lines(&vm.qmp_state).len();
        let want_added = match point {
            "reserved" | "host_bound" => 0,
            "device_added" => 1,
            "device_added:2" => 2,
            _ => 3,
        };
        assert_eq!(added, want_added, "{point}: devices in the VM at the crash");
        assert!(
            world.log_text().contains(&format!("failpoint {point}")),
            "{point}: died elsewhere; log {}",
            world.log().display()
        );
        world.start(None);
        assert_consistent(&world, &vm);
        assert_consistent(&world, &other);
        let held = world.json(&["status", "web-1"])["correspondence"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(held, if kept { 3 } else { 0 }, "{point}");
        assert_eq!(
            world.json(&["status", "db"])["correspondence"]
                .as_array()
                .unwrap()
                .len(),
            1,
            "{point}"
        );
        // Whatever was rolled back can be attached again at once.
        if !kept {
            let doc = world.json(&["attach", "web-1", "crypto", "--count", "3"]);
            assert_eq!(doc["attached"].as_array().unwrap().len(), 3, "{point}");
            assert_consistent(&world, &vm);
        }
    }
}

#[test]
fn a_vm_whose_hot_plug_is_slow_delays_no_other_vm() {
    let mut world = World::new();
    world.start(None);
    // Each device_add in "slow" takes 1.5 s in its QEMU.
    let slow = world.vm("slow", 4, &[], &["--add-delay-ms", "1500"]);
    let fast = world.vm("fast", 4, &[], &[]);
    let started = std::time::Instant::now();
    let slow_attach = std::process::Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .arg("--socket")
        .arg(&world.socket)
        .args(["attach", "slow", "crypto", "--count", "2"])
        .output();
    let slow_attach = std::thread::spawn(move || (slow_attach, started.elapsed()));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = std::time::Instant::now();
    let doc = world.json(&["attach", "fast", "crypto", "--count", "3"]);
    let fast_took = sent.elapsed();
    assert_eq!(doc["attached"].as_array().unwrap().len(), 3, "{doc}");
    let (out, slow_took) = slow_attach.join().unwrap();
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        slow_took >= std::time::Duration::from_secs(3),
        "slow took {slow_took:?}"
    );
    // Well under one of the slow VM's device_adds.
    assert!(
        fast_took < std::time::Duration::from_millis(1200),
        "fast waited {fast_took:?} for slow"
    );
    assert_consistent(&world, &slow);
    assert_consistent(&world, &fast);
}
