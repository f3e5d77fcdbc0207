//! Tests leave nothing running: a process a test starts through `common::Guarded` dies with
//! its whole group when the test ends, panics included, and a VM started by the VM scripts dies
//! when the test process itself is killed with SIGKILL (no `Drop` runs then).
//!
//! The VM is a stand-in: a `qemu-system-x86_64` first in `PATH` that records its pid and
//! sleeps, started by the real `scripts/vm/run-agent-vm`, so the whole chain of the real tests
//! is exercised (test -> script -> `timeout` -> QEMU) in a second.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Guarded;

/// Kills these pids (SIGKILL) when dropped.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let live: Vec<String> = self
            .0
            .iter()
            .filter(|p| alive(**p))
            .map(u32::to_string)
            .collect();
        if !live.is_empty() {
            let _ = Command::new("kill").arg("-KILL").args(live).status();
        }
    }
}

/// Set for the child run of [`child_holding_a_vm`]: the directory with the stand-in QEMU.
const CHILD_DIR: &str = "VFMAP_TEST_LIFETIME_CHILD_DIR";

/// Alive, and not a zombie waiting for its (new) parent to reap it.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid written to `file`, once it is there.
fn pid_in(file: &Path) -> u32 {
    let mut pid = None;
    wait_until(
        &format!("a pid in {}", file.display()),
        Duration::from_secs(20),
        || {
            pid = std::fs::read_to_string(file)
                .ok()
                .and_then(|t| t.trim().parse().ok());
            pid.is_some()
        },
    );
    pid.unwrap()
}

#[test]
fn a_panicking_test_kills_the_whole_group_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("grandchild.pid");
    let script = format!("sleep 600 & echo $! > {}; wait", file.display());
    let result = std::panic::catch_unwind(|| {
        let _guard = Guarded::spawn(Guarded::command("sh").args(["-c", &script]));
        let grandchild = pid_in(&file);
        assert!(alive(grandchild));
        panic!("deliberate: the guard must take pid {grandchild} down with it");
    });
    assert!(result.is_err());
    let grandchild = pid_in(&file);
    let _cleanup = KillOnDrop(vec![grandchild]);
    wait_until("the grandchild to die", Duration::from_secs(5), || {
        !alive(grandchild)
    });
}

/// Runs only as the child of [`a_test_killed_with_sigkill_takes_its_vm_with_it`]: starts a VM
/// the way the real-QEMU tests do, then waits to be killed.
#[test]
fn child_holding_a_vm() {
    let Some(dir) = std::env::var_os(CHILD_DIR).map(PathBuf::from) else {
        return;
    };
    let _vm = Guarded::spawn(
        Guarded::command(common::repo_root().join("scripts/vm/run-agent-vm"))
            .arg(dir.join("initrd"))
            .arg(dir.join("vm.qmp"))
            .arg(dir.join("vm.agent"))
            .arg("120"),
    );
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_test_killed_with_sigkill_takes_its_vm_with_it() {
    let kernel = Command::new("bash")
        .arg("-c")
        .arg(". scripts/vm/common.sh && vm_kernel_version")
        .current_dir(common::repo_root())
        .output()
        .unwrap();
    if !kernel.status.success() {
        let why = String::from_utf8_lossy(&kernel.stderr);
        assert!(
            std::env::var_os("VFMAP_REQUIRE_VM").is_none(),
            "VFMAP_REQUIRE_VM is set but {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qemu = dir.path().join("qemu-system-x86_64");
    let pid_file = dir.path().join("qemu.pid");
    std::fs::write(
        &qemu,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = std::env::join_paths(std::iter::once(dir.path().to_owned()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    // The test binary again, running only the child test; plain spawn, killed with SIGKILL.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holding_a_vm", "--nocapture"])
        .env(CHILD_DIR, dir.path())
        .env("PATH", path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let vm = pid_in(&pid_file);
    let timeout = parent_of(vm).unwrap();
    assert!(alive(vm) && alive(timeout));
    // Should this test fail, it still leaves nothing behind.
    let _cleanup = KillOnDrop(vec![vm, timeout]);
    child.kill().unwrap(); // SIGKILL: no Drop, no unwinding
    child.wait().unwrap();
    wait_until(
        &format!("the VM (pid {vm}) and its timeout (pid {timeout}) to die"),
        Duration::from_secs(5),
        || !alive(vm) && !alive(timeout),
    );
}
