//! Shared by the tests that boot real kernels under QEMU, and the guard every test keeps for
//! a process it starts.
// Each test binary that includes this module uses a different part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// A process a test started (a VM, a daemon, a test double) and everything it started in turn:
/// its whole process group is killed when this is dropped, however the test ends (return,
/// failed assertion, panic). Started with [`Guarded::command`], it also dies when the test
/// process is killed outright (SIGKILL runs no `Drop`): `setpriv --pdeathsig KILL`. Keep the
/// guard in the thread that started it: PDEATHSIG fires when the starting *thread* exits.
pub struct Guarded {
    child: Option<Child>,
    /// `None` once killed.
    pgid: Option<u32>,
}

impl Guarded {
    /// `program` under `setpriv --pdeathsig KILL`, in a process group of its own.
    pub fn command(program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(program)
            .process_group(0);
        cmd
    }

    /// Starts `cmd` (from [`Guarded::command`]).
    pub fn spawn(cmd: &mut Command) -> Guarded {
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        Guarded {
            pgid: Some(child.id()),
            child: Some(child),
        }
    }

    /// Runs `cmd` (from [`Guarded::command`]) to its end, collecting stdout and stderr, then
    /// kills whatever it left behind in its group.
    pub fn output(cmd: &mut Command) -> Output {
        let mut guard = Guarded::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
        let child = guard.child.take().expect("just started");
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"))
    }

    /// The process's id (`setpriv` execs the program, so it is the program's).
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kills the process and its group (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let Some(pgid) = self.pgid.take() else {
            return;
        };
        // The group's number stays reserved while the unreaped leader or any member lives.
        let killed = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if let Some(mut child) = self.child.take() {
            if !killed {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static guest binary `name` (built by `scripts/vm/build-static`), or why a VM test cannot
/// run here. Without `VFMAP_REQUIRE_VM` the caller skips and says why; with it, it fails.
pub fn guest_binary(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::var_os("VFMAP_GUEST_BIN").map_or_else(
        || repo_root().join("target/x86_64-unknown-linux-gnu/release"),
        |vfmap| {
            PathBuf::from(vfmap)
                .parent()
                .map(Path::to_owned)
                .unwrap_or_default()
        },
    );
    let bin = dir.join(name);
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err(
            "qemu-system-x86_64 is not installed (scripts/install-deps installs it)".into(),
        );
    }
    if !std::fs::read_dir("/boot")
        .map_err(|e| e.to_string())?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
    {
        return Err("no kernel in /boot (scripts/install-deps installs linux-image-amd64)".into());
    }
    if !bin.exists() {
        return Err(format!(
            "no static guest binary at {} (run scripts/vm/build-static)",
            bin.display()
        ));
    }
    Ok(bin)
}

/// `Some(binary)`, or `None` after printing why the test is skipped; panics instead when
/// `VFMAP_REQUIRE_VM` is set (as `scripts/test` does).
pub fn require_guest_binary(name: &str) -> Option<PathBuf> {
    match guest_binary(name) {
        Ok(bin) => Some(bin),
        Err(why) if std::env::var_os("VFMAP_REQUIRE_VM").is_none() => {
            eprintln!("skipped: {why}");
            None
        }
        Err(why) => panic!("VFMAP_REQUIRE_VM is set but {why}"),
    }
}

/// The verdict of a scenario's console output (its `VFMAP-CHECK NAME ok|FAIL DETAIL` lines and
/// `VFMAP-RESULT`): no check failed, each of `required` ran and passed, and the scenario
/// passed. `what` names it and `log` is where the whole console is, for the messages.
pub fn assert_scenario_passed(what: &str, console: &str, required: &[&str], log: &Path) {
    let log = log.display();
    let checks: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("VFMAP-CHECK "))
        .collect();
    let failed: Vec<&&str> = checks
        .iter()
        .filter(|l| l.split_whitespace().nth(2) == Some("FAIL"))
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: failed checks: {failed:#?}; console log: {log}"
    );
    for check in required {
        assert!(
            checks
                .iter()
                .any(|l| l.starts_with(&format!("VFMAP-CHECK {check} ok"))),
            "{what}: check {check} did not run; console log: {log}"
        );
    }
    assert!(
        console.contains("VFMAP-RESULT PASS"),
        "{what}: no VFMAP-RESULT PASS; console log: {log}"
    );
}
