//! Attacks on the real daemon binary (`vfmap serve` with its real adapters): a hostile guest,
//! a second daemon, local users, a hung QEMU and a `device_add` that outlives its daemon.
//! Each test is one class of attack from docs/security.md.

mod common;
mod world;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use world::*;

const NOBODY: u32 = 65534;

/// The test plays a VM's guest agent on `<dir>/<name>.agent`.
struct Guest {
    listener: UnixListener,
}

impl Guest {
    fn bind(world: &World, name: &str) -> Guest {
        let listener = UnixListener::bind(world.dir.path().join(format!("{name}.agent"))).unwrap();
        listener.set_nonblocking(true).unwrap();
        Guest { listener }
    }

    /// The daemon's next connection.
    fn accept(&self, within: Duration) -> Option<UnixStream> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok((stream, _)) = self.listener.accept() {
                stream.set_nonblocking(false).unwrap();
                return Some(stream);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

/// The next line from the daemon, if one comes within `within`.
fn next_line(reader: &mut BufReader<UnixStream>, within: Duration) -> Option<Value> {
    reader.get_ref().set_read_timeout(Some(within)).unwrap();
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => serde_json::from_str(&line).ok(),
        _ => None,
    }
}

/// Runs `vfmap serve` expecting it to refuse to start; returns its stderr.
fn serve_refused(config: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(!status.success(), "the daemon should have refused: {err}");
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started although it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Attaches one crypto VF to `vm` and detaches it; the time of each call.
fn attach_detach(world: &World, vm: &str) -> [Duration; 2] {
    let t = Instant::now();
    let out = world.cli(&["attach", vm, "crypto"]);
    let attach = t.elapsed();
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Instant::now();
    let out = world.cli(&["detach", vm, "0"]);
    assert!(
        out.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    [attach, t.elapsed()]
}

#[test]
fn guest_lines_that_panicked_the_link_are_dropped_and_the_link_lives_on() {
    let mut world = World::new();
    world.start(None);
    let guest = Guest::bind(&world, "evil");
    let _vm = world.vm("evil", 2, NO_AGENT, &[]);
    let stream = guest
        .accept(Duration::from_secs(10))
        .expect("daemon connects");
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let first = next_line(&mut reader, Duration::from_secs(5)).expect("resync on connect");
    assert_eq!(first["type"], "apply");
    // serde quotes the unknown type in its error; the cut at 200 bytes used to land inside
    // a multi-byte character and panic the link task.
    for pad in 0..4 {
        let poison = format!(
            "{{\"type\":\"{}{}\",\"v\":1}}\n",
            "a".repeat(pad),
            "é€😀".repeat(60)
        );
        writer.write_all(poison.as_bytes()).unwrap();
    }
    writer
        .write_all(b"{\"type\":\"hello\",\"v\":1,\"agent\":\"evil\"}\n")
        .unwrap();
    let again = next_line(&mut reader, Duration::from_secs(5));
    assert!(
        again.is_some_and(|m| m["type"] == "apply"),
        "the link stopped answering; log: {}",
        world.log_text()
    );
    assert!(
        !world.log_text().contains("panicked"),
        "{}",
        world.log_text()
    );
}

#[test]
fn a_failed_link_comes_back_by_itself() {
    let mut world = World::new();
    world.start(Some("link-panic"));
    let guest = Guest::bind(&world, "web-1");
    let _vm = world.vm("web-1", 2, NO_AGENT, &[]);
    let first = guest
        .accept(Duration::from_secs(10))
        .expect("daemon connects");
    first
        .try_clone()
        .unwrap()
        .write_all(b"{\"type\":\"hello\",\"v\":1,\"agent\":\"x\"}\n")
        .unwrap();
    // No API call from here on: the link must restart and reconnect on its own.
    let second = guest
        .accept(Duration::from_secs(10))
        .expect("the link did not come back");
    let mut reader = BufReader::new(second);
    let resent = next_line(&mut reader, Duration::from_secs(5));
    assert!(resent.is_some_and(|m| m["type"] == "apply"));
    assert!(
        world.log_text().contains("restarting it"),
        "{}",
        world.log_text()
    );
}

#[test]
fn a_hello_flood_stays_bounded_and_other_vms_keep_their_latency() {
    let mut world = World::new();
    world.start(None);
    let guest = Guest::bind(&world, "flood");
    let _flood_vm = world.vm("flood", 2, NO_AGENT, &[]);
    let _calm = world.vm("calm", 2, &[], &[]);
    let stream = guest
        .accept(Duration::from_secs(10))
        .expect("daemon connects");

    let baseline: Vec<Duration> = (0..8).flat_map(|_| attach_detach(&world, "calm")).collect();
    let rss_before = world.rss_kib();

    // The guest drains what the daemon sends (counting re-sends) and floods hellos.
    let applies = Arc::new(AtomicUsize::new(0));
    let counter = applies.clone();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            counter.fetch_add(1, Ordering::Relaxed);
            line.clear();
        }
    });
    let mut writer = stream;
    let flood = std::thread::spawn(move || {
        let hello = b"{\"type\":\"hello\",\"v\":1,\"agent\":\"flood\"}\n".repeat(1000);
        for _ in 0..100 {
            writer.write_all(&hello).unwrap();
        }
        writer
    });
    let mut during = Vec::new();
    while !flood.is_finished() {
        during.extend(attach_detach(&world, "calm"));
    }
    let _writer = flood.join().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = world.rss_kib();

    let (base, busy) = (median(baseline), median(during.clone()));
    eprintln!(
        "flood: rss {rss_before} -> {rss_after} KiB; calm VM median {base:?} before, {busy:?} during ({} calls); {} re-sends",
        during.len(),
        applies.load(Ordering::Relaxed)
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "memory grew from {rss_before} to {rss_after} KiB"
    );
    assert!(
        busy <= base * 3 + Duration::from_millis(200),
        "the calm VM slowed from {base:?} to {busy:?}"
    );
    assert!(
        applies.load(Ordering::Relaxed) < 100,
        "re-sends were not coalesced"
    );
    let flood_lines = world
        .log_text()
        .lines()
        .filter(|l| l.contains("flood"))
        .count();
    assert!(flood_lines < 200, "{flood_lines} log lines about the flood");
}

#[test]
fn a_second_daemon_on_one_state_dir_changes_nothing() {
    let mut world = World::new();
    world.start(None);
    let vm = world.vm("web-1", 2, &[], &["--add-delay-ms", "2000"]);
    let attach = Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .arg("--socket")
        .arg(&world.socket)
        .args(["attach", "web-1", "crypto"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let holder = format!("pid {}", world.pid());
    // The same config, and the same state directory behind another socket.
    let other = world.dir.path().join("other.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&world.config)
            .unwrap()
            .replace("api.sock", "other.sock"),
    )
    .unwrap();
    for config in [world.config.clone(), other] {
        let err = serve_refused(&config);
        assert!(
            err.contains("another vfmap daemon") && err.contains(&holder),
            "{err}"
        );
    }
    assert!(!world.dir.path().join("other.sock").exists());
    let out = attach.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the first daemon's attach was disturbed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_consistent(&world, &vm);
}

/// Makes the world's directory reachable by other users (its contents keep their modes).
fn open_to_others(world: &World) {
    std::fs::set_permissions(world.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn local_users_cannot_race_or_reach_the_socket() {
    let mut world = World::new();
    open_to_others(&world);
    // A racer as `nobody` tries to connect and to plant a link while the daemon starts, with
    // a umask that would have left the socket open for a moment before.
    let socket = world.socket.display().to_string();
    let seen_path = world.dir.path().join("racer.out");
    let seen_file = std::fs::File::create(&seen_path).unwrap();
    let mut racer = common::Guarded::spawn(
        common::Guarded::command("sh")
            .args([
                "-c",
                "end=$(($(date +%s)+4)); while [ $(date +%s) -lt $end ]; do \
             ln -s /etc/passwd \"$1\" 2>/dev/null && echo planted; \
             socat -u /dev/null UNIX-CONNECT:\"$1\" 2>/dev/null && echo connected; done",
                "racer",
                &socket,
            ])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(seen_file),
    );
    std::thread::sleep(Duration::from_millis(300));
    world.start_with_umask(0o000);
    while racer.try_wait().is_none() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = std::fs::read_to_string(&seen_path).unwrap();
    assert!(
        !seen.contains("connected") && !seen.contains("planted"),
        "{seen}"
    );
    let meta = std::fs::symlink_metadata(&world.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    // The CLI as nobody is refused by the socket's mode.
    let out = Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .arg("--socket")
        .arg(&world.socket)
        .arg("status")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ermission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unsafe_paths_are_refused_with_the_fix_and_nothing_is_removed() {
    let world = World::new();
    let dir = world.dir.path();
    // A regular file where the socket goes stays, and the daemon says why it stops.
    std::fs::write(&world.socket, "precious").unwrap();
    let err = serve_refused(&world.config);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&world.socket).unwrap(), "precious");
    std::fs::remove_file(&world.socket).unwrap();
    // A state directory others can write.
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = serve_refused(&world.config);
    assert!(
        err.contains("writable by other users") && err.contains("chmod go-w"),
        "{err}"
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A socket directory owned by someone else.
    let theirs = dir.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    world.configure(&format!("socket = {:?}\n", theirs.join("api.sock")));
    let err = serve_refused(&world.config);
    assert!(
        err.contains(&format!("owned by uid {NOBODY}")) && err.contains("chown"),
        "{err}"
    );
}

#[test]
fn the_cli_refuses_a_daemon_run_by_another_user() {
    let world = World::new();
    open_to_others(&world);
    let theirs = world.dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let fake: PathBuf = theirs.join("api.sock");
    let mut impostor = common::Guarded::spawn(
        common::Guarded::command("socat")
            .arg(format!("UNIX-LISTEN:{},fork,mode=666", fake.display()))
            .arg("SYSTEM:cat")
            .uid(NOBODY)
            .gid(NOBODY),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&fake).is_err() {
        assert!(Instant::now() < deadline, "impostor did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .arg("--socket")
        .arg(&fake)
        .arg("status")
        .output()
        .unwrap();
    impostor.kill();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("runs as uid {NOBODY}")), "{err}");
}

/// The crypto VFs the daemon has free.
fn free_crypto(world: &World) -> u64 {
    let inventory = world.json(&["inventory"]);
    inventory["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "crypto")
        .and_then(|f| f["free"].as_u64())
        .unwrap()
}

#[test]
fn a_hung_qemu_does_not_pin_the_vf() {
    let mut world = World::new();
    world.configure("qmp_timeout_ms = 1000\n");
    world.start(None);
    let mut vm = world.vm("stuck", 2, &[], &["--hang"]);
    let out = world.cli(&["attach", "stuck", "crypto"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("retries the cleanup automatically"), "{err}");
    // The VF may still be in the VM: not free, but visibly being cleaned up.
    assert_eq!(free_crypto(&world), 7);
    let status = world.json(&["status", "stuck"]);
    let row = &status["correspondence"][0];
    assert_eq!(row["state"], "releasing", "{status}");
    assert!(row["cleanup"]["attempts"].as_u64().unwrap() >= 1, "{row}");
    assert!(
        row["cleanup"]["last_error"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{row}"
    );
    // The hung QEMU goes away: an automatic retry frees the VF, no operator needed.
    vm.children[0].kill();
    let deadline = Instant::now() + Duration::from_secs(40);
    while free_crypto(&world) != 8 {
        assert!(
            Instant::now() < deadline,
            "the VF stayed pinned; log: {}",
            world.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = world.json(&["status", "stuck"]);
    assert_eq!(status["correspondence"], Value::Array(vec![]));
    let out = world.cli(&["vm", "rm", "stuck"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_device_add_that_lands_after_a_restart_is_removed() {
    let mut world = World::new();
    world.configure("reconcile_interval_ms = 300\n");
    world.start(None);
    let vm = world.vm("web-1", 2, &[], &["--add-delay-ms", "3000"]);
    let attach = Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .arg("--socket")
        .arg(&world.socket)
        .args(["attach", "web-1", "crypto"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // device_add is on its way (the fake QEMU holds it for 3 s) when the daemon dies.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !world.log_text().contains("host_bound") {
        assert!(Instant::now() < deadline, "attach did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    world.kill9();
    let _ = attach.wait_with_output();
    world.start(None);
    // Recovery found nothing plugged and freed the VF; then the device lands.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !world.log_text().contains("orphan removed") {
        assert!(
            Instant::now() < deadline,
            "the orphan was not removed; log: {}",
            world.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        lines(&vm.qmp_state).is_empty(),
        "{:?}",
        lines(&vm.qmp_state)
    );
    assert_eq!(free_crypto(&world), 8);
    attach_detach(&world, "web-1");
}
