//! Restart with the API up before recovery (issue 14): the real daemon answers while it still
//! starts, and an attach sent then never gets a VF whose state recovery has not settled.

mod common;
mod world;

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use serde_json::Value;
use world::*;

/// The host VFs (`host_vf`) a VM's correspondence holds.
fn held_by(world: &World, vm: &str) -> Vec<String> {
    world.json(&["status", vm])["correspondence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host_vf"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn an_attach_while_starting_waits_for_recovery_and_never_gets_a_vf_of_unknown_state() {
    let mut world = World::new();
    // Recovery asks the hung VM's QEMU, which never answers: the start-up is held in
    // `recovering` for this long.
    world.configure("qmp_timeout_ms = 3000\n");
    world.start(None);
    let _web = world.vm("web", 8, &[], &[]);
    let stale = world.vm("stale", 4, &[], &[]);
    let out = world.cli(&["attach", "stale", "crypto", "--count", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unknown = held_by(&world, "stale");
    assert_eq!(unknown.len(), 3);

    // The daemon dies; "stale"'s QEMU is replaced by one that accepts and never speaks, so
    // whether its VFs are still plugged cannot be known until its timeout.
    world.kill9();
    drop(stale);
    let qmp = world.dir.path().join("stale.qmp");
    let _ = std::fs::remove_file(&qmp);
    let _hung = UnixListener::bind(&qmp).unwrap();
    let log_before = world.log_text().len();

    let started = Instant::now();
    world.start_answering();
    let answering = started.elapsed();
    let (status, _, health) = world.raw_with("GET", "/v1/health", "", "");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "starting", "{health}");
    assert!(
        answering < Duration::from_millis(2500),
        "the API answered only after {answering:?}"
    );
    // Wait until recovery is asking the hung QEMU (discovery of 16 VFs is quick).
    let deadline = Instant::now() + Duration::from_secs(2);
    while world.phase().as_deref() != Some("recovering") {
        assert!(Instant::now() < deadline, "never reached recovering");
        std::thread::sleep(Duration::from_millis(10));
    }

    // A client that will not wait is refused at once, and nothing changes.
    let attach = r#"{"function":"crypto","count":5}"#;
    let (status, head, body) =
        world.raw_with("POST", "/v1/vms/web/attach", "Prefer: wait=0\r\n", attach);
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &Value::from("starting")),
        "{body}"
    );
    assert!(head.contains("\r\nretry-after: 1"), "{head}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("phase recovering"),
        "{body}"
    );

    // The CLI's attach, sent while recovering, waits for the pool. It gets the 5 crypto VFs
    // whose state is known (free); the 3 that "stale" held are not among them.
    assert_eq!(world.phase().as_deref(), Some("recovering"));
    let sent = Instant::now();
    let doc = world.json(&["attach", "web", "crypto", "--count", "5"]);
    let waited = sent.elapsed();
    let got: Vec<String> = doc["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host_vf"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got.len(), 5, "{doc}");
    for vf in &got {
        assert!(
            !unknown.contains(vf),
            "{vf} was handed out before its state was known"
        );
    }
    assert!(
        waited > Duration::from_millis(500),
        "answered after {waited:?}: it did not wait for recovery"
    );
    // In the log, the pool came up (recovery done) before the attach reserved anything.
    let log = world.log_text()[log_before..].to_owned();
    let at = |what: &str| {
        log.find(what)
            .unwrap_or_else(|| panic!("no {what:?} in {log}"))
    };
    let ready = at("ready: the pool is up");
    let reserved = at("assignment reserved vm=web");
    // Recovery deferred the hung VM's VFs.
    let deferred = at("cannot ask the hypervisor");
    assert!(deferred < ready && ready < reserved, "{log}");

    // "stale"'s VFs stay its own (its QEMU could not say otherwise), out of the pool.
    let (status, body) = world.raw("POST", "/v1/vms/web/attach", r#"{"function":"crypto"}"#);
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &Value::from("no_free_vf")),
        "{body}"
    );
    assert_eq!(held_by(&world, "stale"), unknown);
    let health = world.raw("GET", "/v1/health", "").1;
    assert_eq!(
        (&health["status"], &health["phase"]),
        (&Value::from("ok"), &Value::from("ready"))
    );
}

#[test]
fn a_start_up_that_fails_behind_the_socket_stops_the_daemon_with_its_error() {
    let mut world = World::new();
    // A state database written by a newer daemon: found only behind the socket now.
    world.start(None);
    world.kill9();
    let db = world.dir.path().join("state/state.db");
    vfmap_daemon::store::open_connection(&db)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .args(["serve", "--config"])
        .arg(&world.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("newer than this daemon"), "{stderr}");
    assert!(!world.socket.exists(), "the socket is removed");
}

#[test]
fn the_cli_waits_for_a_starting_daemon_and_then_says_it_is_starting() {
    let mut world = World::new();
    // Recovery is held past the API's 10 s wait by a QEMU that never answers.
    world.configure("qmp_timeout_ms = 14000\n");
    world.start(None);
    let stale = world.vm("stale", 2, &[], &[]);
    let out = world.cli(&["attach", "stale", "crypto"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    world.kill9();
    drop(stale);
    let qmp = world.dir.path().join("stale.qmp");
    let _ = std::fs::remove_file(&qmp);
    let _hung = UnixListener::bind(&qmp).unwrap();
    world.start_answering();

    let sent = Instant::now();
    let out = world.cli(&["--json", "inventory"]);
    let waited = sent.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(13),
        "waited {waited:?}"
    );
    assert!(
        stderr.contains("vfmap: error: the daemon is starting (phase recovering")
            && stderr.contains("nothing was changed; retry in 1 s"),
        "{stderr}"
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["code"], "starting", "{doc}");

    // SIGTERM while still recovering stops it at once, cleanly (what was in flight is left
    // for the next start's recovery, as after a crash).
    assert_eq!(world.phase().as_deref(), Some("recovering"));
    let term = std::process::Command::new("kill")
        .args(["-TERM", &world.pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(3);
    let status = loop {
        if let Some(status) = world.daemon.as_mut().unwrap().try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}; log: {}", world.log_text());
    assert!(!world.socket.exists(), "the socket is removed");
}
