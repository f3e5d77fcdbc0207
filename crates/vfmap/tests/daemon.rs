//! The real daemon binary (`vfmap serve`) with its real QMP and channel adapters, against
//! test-double processes: a fake QEMU (QMP) and a fake guest agent per VM, on a generated
//! sysfs tree. Driven through the real CLI.

mod common;
mod world;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use world::*;

#[test]
fn attach_and_detach_through_the_cli() {
    let mut world = World::new();
    world.start(None);
    let vm = world.vm("web-1", 4, &[], &[]);
    let out = world.cli(&["attach", "web-1", "crypto"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("crypto") && text.contains("ready") && text.contains("pci-stub"),
        "{text}"
    );
    let doc = world.json(&["attach", "web-1", "compress", "--count", "2"]);
    let attached = doc["attached"].as_array().unwrap();
    assert_eq!(
        attached
            .iter()
            .map(|r| r["local_index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(attached[0]["guest_driver"], "uio_pci_generic");
    assert_eq!(
        attached[0]["bound_driver"], "uio_pci_generic",
        "the agent reported the driver bound"
    );
    assert_eq!(attached[0]["guest_path"], "03.1/00.0");
    // The agent received the whole correspondence: local index -> function -> driver.
    assert_eq!(
        lines(&vm.agent_state),
        [
            "0 crypto pci-stub",
            "1 compress uio_pci_generic",
            "2 compress uio_pci_generic"
        ]
    );
    assert_consistent(&world, &vm);

    let out = world.cli(&["detach", "web-1", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lines(&vm.agent_state),
        ["0 crypto pci-stub", "2 compress uio_pci_generic"]
    );
    assert_eq!(lines(&vm.qmp_state).len(), 2);
    assert_consistent(&world, &vm);
    let out = world.cli(&["vm", "rm", "web-1"]);
    assert!(out.status.success());
    assert!(lines(&vm.qmp_state).is_empty(), "vm rm released everything");
    let inventory = world.json(&["inventory"]);
    assert!(
        inventory["vfs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["vm"].is_null())
    );
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let mut world = World::new();
    world.start(None);
    let _vm = world.vm("web-1", 2, &[], &[]);
    let out = world.cli(&["attach", "web-1", "crypto"]);
    assert!(out.status.success());
    let before = world.snapshot();
    for (args, exit, want) in [
        (vec!["attach", "nope", "crypto"], 4, "no VM named \"nope\""),
        (
            vec!["attach", "web-1", "dance"],
            4,
            "no VF carries function \"dance\"",
        ),
        (
            vec!["attach", "web-1", "crypto", "--count", "9"],
            3,
            "9 VF(s) of function \"crypto\" requested, 7 free",
        ),
        (
            vec!["attach", "web-1", "crypto", "--count", "2"],
            3,
            "1 free slot(s) of 2",
        ),
        (
            vec!["attach", "web-1", "crypto", "--pf", "junk"],
            2,
            "not a PCI address",
        ),
        (vec!["detach", "web-1", "5"], 4, "nothing at local index 5"),
        (vec!["vm", "rm", "ghost"], 4, "no VM named"),
        (
            vec![
                "vm", "add", "web-1", "--qmp", "/x", "--agent", "/y", "--slot", "rp0",
            ],
            3,
            "already registered",
        ),
        (
            vec![
                "vm", "add", "b", "--qmp", "rel", "--agent", "/y", "--slot", "rp0",
            ],
            2,
            "absolute path",
        ),
        (
            vec![
                "vm", "add", "c", "--qmp", "/x", "--agent", "/y", "--slot", "0bad",
            ],
            2,
            "not a valid slot id",
        ),
        (
            vec!["vm", "add", "d", "--libvirt", "a/b"],
            2,
            "not a valid libvirt domain name",
        ),
        (
            vec!["vm", "add", "d", "--libvirt", "dom", "--uri", "nope"],
            2,
            "not a local libvirt URI",
        ),
        (
            // libvirtd unreachable (a socket that is not there): nothing registered.
            vec![
                "vm",
                "add",
                "d",
                "--libvirt",
                "dom",
                "--uri",
                "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
            ],
            1,
            "/nonexistent/libvirt-sock",
        ),
    ] {
        let out = world.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(exit), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert_eq!(world.snapshot(), before, "{args:?} changed state");
    }
    // One backend per VM: clap refuses both (with its usage lines).
    let out = world.cli(&["vm", "add", "d", "--libvirt", "dom", "--qmp", "/x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    assert_eq!(world.snapshot(), before);
    for (method, path, body, status, code) in [
        (
            "POST",
            "/v1/vms/web-1/attach",
            "{not json",
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/vms/web-1/attach",
            r#"{"function":"crypto","colour":1}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/vms/web-1/attach",
            r#"{"function":"crypto","count":-1}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","backend":{"qmp":{"qmp_socket":"/a","agent_socket":"/b","slots":["rp0"]}},"extra":1}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","backend":{"qmp":{"qmp_socket":"/a","agent_socket":"/b","slots":[]}}}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","qmp_socket":"/a","agent_socket":"/b","slots":["rp0"]}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","backend":{"libvirt":{"domain":"-x"}}}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","backend":{"libvirt":{"domain":"x","port_name":"a b"}}}"#,
            400,
            "bad_request",
        ),
        (
            "DELETE",
            "/v1/vms/web-1/devices/abc",
            "",
            400,
            "bad_request",
        ),
        ("GET", "/v1/nothing", "", 404, "not_found"),
    ] {
        let (got, doc) = world.raw(method, path, body);
        assert_eq!(got, status, "{method} {path} {body}: {doc}");
        assert_eq!(doc["error"]["code"], code, "{doc}");
        assert!(
            doc["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert_eq!(
            world.snapshot(),
            before,
            "{method} {path} {body} changed state"
        );
    }
    let (status, doc) = world.raw(
        "POST",
        "/v1/vms/web-1/attach",
        r#"{"function":"crypto","count":9}"#,
    );
    assert_eq!((status, doc["error"]["free"].as_u64()), (409, Some(7)));
}

#[test]
fn sixty_four_racing_clients_get_exactly_the_pool() {
    let mut world = World::new();
    world.start(None);
    let _vm = world.vm("race", 64, &[], &[]);
    let children: Vec<Child> = (0..64)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_vfmap"))
                .arg("--socket")
                .arg(&world.socket)
                .args(["attach", "race", "crypto"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut codes = std::collections::BTreeMap::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let code = out.status.code().unwrap();
        if code == 3 {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("requested, 0 free") || stderr.contains("free"),
                "{stderr}"
            );
        }
        *codes.entry(code).or_insert(0) += 1;
    }
    assert_eq!(
        codes,
        [(0, 8), (3, 56)].into_iter().collect(),
        "8 crypto VFs: 8 successes, 56 clear 409s"
    );
    let status = world.json(&["status", "race"]);
    let mut locals: Vec<u64> = status["correspondence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["local_index"].as_u64().unwrap())
        .collect();
    locals.sort_unstable();
    assert_eq!(
        locals,
        (0..8).collect::<Vec<_>>(),
        "lowest local indexes, each once"
    );
}

#[test]
fn a_crash_at_every_step_is_recovered() {
    for point in ["reserved", "host_bound", "plugged", "sent", "ready"] {
        let mut world = World::new();
        world.start(None);
        let vm = world.vm("web-1", 4, &[], &[]);
        world.kill9();
        world.start(Some(point));
        let out = world.cli(&["attach", "web-1", "crypto"]);
        assert!(
            !out.status.success(),
            "{point}: the daemon should have died"
        );
        world.wait_dead();
        world.start(None);
        assert_consistent(&world, &vm);
        let held = world.json(&["status", "web-1"])["correspondence"]
            .as_array()
            .unwrap()
            .len();
        // Committed as ready before the crash: kept. Anything earlier: rolled back.
        assert_eq!(held, usize::from(point == "ready"), "{point}");
    }
    for point in ["releasing", "unplugged"] {
        let mut world = World::new();
        world.start(None);
        let vm = world.vm("web-1", 4, &[], &[]);
        assert!(world.cli(&["attach", "web-1", "crypto"]).status.success());
        world.kill9();
        world.start(Some(point));
        assert!(!world.cli(&["detach", "web-1", "0"]).status.success());
        world.wait_dead();
        world.start(None);
        assert_consistent(&world, &vm);
        assert!(
            world.json(&["status", "web-1"])["correspondence"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{point}: release finished"
        );
    }
}

#[test]
fn kill_9_in_the_middle_of_device_add_is_recovered() {
    let mut world = World::new();
    world.start(None);
    let vm = world.vm("web-1", 4, &[], &["--add-delay-ms", "1500"]);
    let attach = Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .arg("--socket")
        .arg(&world.socket)
        .args(["attach", "web-1", "crypto"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    world.kill9();
    let _ = attach.wait_with_output();
    // Let the fake QEMU finish the device_add the dead daemon asked for.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        lines(&vm.qmp_state).len(),
        1,
        "the device landed in the VM after the crash"
    );
    world.start(None);
    assert_consistent(&world, &vm);
    assert!(
        lines(&vm.qmp_state).is_empty(),
        "recovery unplugged the orphan"
    );
}

#[test]
fn a_hostile_or_failing_agent_hurts_only_its_own_vm() {
    let mut world = World::new();
    world.start(None);
    let hostile = world.vm("evil", 2, &["--hostile"], &[]);
    let failing = world.vm("sad", 2, &["--fail-function", "crypto"], &[]);
    let silent = world.vm("mute", 2, &["--silent"], &[]);
    let good = world.vm("good", 2, &[], &[]);
    // Junk before the real answer is dropped; the real answer still counts.
    assert!(world.cli(&["attach", "evil", "crypto"]).status.success());
    let out = world.cli(&["attach", "sad", "crypto"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("modprobe pci-stub: not found"));
    let out = world.cli(&["attach", "mute", "compress"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("guest agent did not answer"), "{stderr}");
    assert!(world.cli(&["attach", "good", "crypto"]).status.success());
    for vm in [&hostile, &failing, &silent, &good] {
        assert_consistent(&world, vm);
    }
    let health = world.json(&["status"]);
    assert_eq!(health["vms"].as_array().unwrap().len(), 4);
    let out = BufReader::new(std::fs::File::open(world.log()).unwrap())
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.contains("dropped"))
        .count();
    assert!(out >= 3, "the daemon logged the dropped lines");
}

#[test]
fn a_restarted_agent_gets_the_whole_correspondence_again() {
    let mut world = World::new();
    world.start(None);
    let mut vm = world.vm("web-1", 3, &[], &[]);
    assert!(world.cli(&["attach", "web-1", "crypto"]).status.success());
    assert!(world.cli(&["attach", "web-1", "compress"]).status.success());
    // The guest rebooted: a new agent with no memory of what it bound.
    let agent_socket = world.dir.path().join("web-1.agent");
    let mut old = vm.children.remove(1);
    old.kill();
    std::fs::remove_file(&vm.agent_state).unwrap();
    vm.children.push(common::Guarded::spawn(
        common::Guarded::command(testkit_bin("vfmap-fake-agent"))
            .arg("--socket")
            .arg(&agent_socket)
            .arg("--state")
            .arg(&vm.agent_state),
    ));
    let deadline = Instant::now() + Duration::from_secs(15);
    while lines(&vm.agent_state).len() != 2 {
        assert!(
            Instant::now() < deadline,
            "no resync; log {}",
            world.log().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        lines(&vm.agent_state),
        ["0 crypto pci-stub", "1 compress uio_pci_generic"]
    );
    assert_consistent(&world, &vm);
}

#[test]
fn hypervisor_errors_are_clear_and_roll_back() {
    let mut world = World::new();
    world.start(None);
    let _vm = world.vm("web-1", 1, &[], &[]);
    // Same QEMU registered twice: the second VM's slot rp0 is taken by the first's device.
    let dir = world.dir.path().to_owned();
    let (qmp, agent) = (dir.join("web-1.qmp"), dir.join("web-1.agent"));
    let (q, a) = (qmp.to_str().unwrap(), agent.to_str().unwrap());
    assert!(
        world
            .cli(&[
                "vm", "add", "twin", "--qmp", q, "--agent", a, "--slot", "rp0", "--slot", "rp7"
            ])
            .status
            .success()
    );
    let gone = dir.join("nothing.qmp");
    assert!(
        world
            .cli(&[
                "vm",
                "add",
                "ghost",
                "--qmp",
                gone.to_str().unwrap(),
                "--agent",
                a,
                "--slot",
                "rp0"
            ])
            .status
            .success()
    );
    assert!(world.cli(&["attach", "web-1", "crypto"]).status.success());
    let before = world.json(&["inventory"]);
    for (args, want) in [
        (vec!["attach", "twin", "crypto"], "slot rp0 is occupied"),
        (
            vec!["attach", "ghost", "crypto"],
            "the VM is not running: nothing listens on",
        ),
    ] {
        let out = world.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert_eq!(world.json(&["inventory"]), before, "{args:?}: rolled back");
    }
    // rp7 does not exist in that QEMU.
    assert!(
        world
            .cli(&[
                "vm", "add", "odd", "--qmp", q, "--agent", a, "--slot", "rp7"
            ])
            .status
            .success()
    );
    let out = world.cli(&["attach", "odd", "crypto"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("slot rp7 does not exist in the VM"),
        "{stderr}"
    );
    assert_eq!(world.json(&["inventory"]), before);
}
