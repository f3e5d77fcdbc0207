//! Running a card's hooks: one executable, run once, safely, with a deadline.
//!
//! A card kind may give executables ("hooks") that vfmap runs at fixed phases
//! ([`HookPhase`]): `bring_up` (after the VFs are created, before they are offered), `program`
//! (make a VF carry a function), `scrub` (wipe a VF between tenants) and `discover` (print the
//! functions of a PF's VFs). This module runs one hook ([`run_hook`]) and checks that its path
//! is safe to run ([`check_hook_path`]); which hook runs when is the caller's business. The
//! code is synchronous: the daemon calls it from a blocking thread.
//!
//! # The contract
//!
//! **Command line.** Exactly `[program, phase]`: argv\[0\] is the hook's absolute path,
//! argv\[1\] the phase (`bring_up`, `program`, `scrub` or `discover`). Nothing else is ever on
//! the command line, so nothing a guest says can become an option of the hook.
//!
//! **Environment.** Cleared, then only these (a variable that does not apply is not set):
//!
//! | variable              | value                                                            |
//! |-----------------------|------------------------------------------------------------------|
//! | `PATH`                | `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`   |
//! | `VFMAP_PHASE`         | the phase, as in argv\[1\]                                       |
//! | `VFMAP_CARD`          | the profile's card name                                          |
//! | `VFMAP_PF`            | the PF's address, e.g. `0000:3b:00.0`                            |
//! | `VFMAP_VF`            | the VF's address, e.g. `0000:3b:00.2` (VF phases only)           |
//! | `VFMAP_VF_NUMBER`     | the VF's number on its PF, decimal from 0 (VF phases only)       |
//! | `VFMAP_FUNCTION`      | `program`: the function wanted; `scrub`, `bring_up`: the VF's    |
//! |                       | function (for `bring_up`, when the profile gives it one)         |
//! | `VFMAP_FROM_FUNCTION` | `program`: the function the VF carried until now                 |
//! | `VFMAP_SYSFS_ROOT`    | the sysfs root vfmap works under (normally `/sys`)               |
//!
//! Addresses are in the canonical `dddd:bb:dd.f` form, lower-case hex. Card and function names
//! never contain control characters: the runner refuses to run a hook with one
//! ([`HookError::InvalidInput`]); function names are moreover `[a-z0-9][a-z0-9._-]*`, checked
//! where profiles are read.
//!
//! **Process.** stdin is `/dev/null`, the working directory is `/`, and the hook runs in a
//! process group of its own. When the hook exits, whatever it left running in that group is
//! killed (`SIGKILL`): a hook must not leave processes behind (a `scrub` hook's leftover
//! touching a VF already handed to the next tenant would defeat the scrub). A hook that has to
//! start a long-running service asks the service manager (e.g. `systemctl start`). A process
//! that leaves the group on purpose (`setsid`) escapes this; hooks are trusted code, the rule
//! is against accidents.
//!
//! **Output.** stdout is captured, up to [`STDOUT_LIMIT`] bytes (1 MiB); `discover` prints its
//! lines there. More than that fails the run ([`HookError::OutputTooLarge`]): the output of
//! `discover` must be complete. The rest is still read (and dropped), so the hook never blocks
//! on a full pipe. Of stderr, the last [`STDERR_TAIL_LINES`] non-blank lines are kept, each cut
//! at [`STDERR_LINE_LIMIT`] bytes, invalid UTF-8 replaced and control characters escaped; they
//! go into the error, and into [`HookOutput::stderr_tail`] for the log. Memory stays bounded
//! whatever the hook writes. After the hook exits, its pipes are drained for at most
//! 200 ms more (longer only if a process left behind keeps them open), then closed.
//!
//! **Result.** Exit status 0 is success. Any other exit, or death by a signal, is
//! [`HookError::Failed`], naming the card, phase, program, the exit status or signal, and the
//! last stderr lines. At the deadline the whole process group is killed (`SIGKILL` to the
//! group, so grandchildren die too) and the run is [`HookError::Deadline`]; the runner does not
//! wait for pipes a killed process still held. The hook process is always reaped; if it does
//! not die within 1 s of `SIGKILL` (stuck in the kernel), a background thread reaps it when it
//! does, and the run returns without waiting.
//!
//! # The path rules
//!
//! [`check_hook_path`] is meant to run when profiles are loaded; [`run_hook`] runs it again
//! right before each spawn. The check and the spawn are not one atomic step, which the rules
//! make harmless: only root or vfmap's own user could change the path in between. The
//! path must be absolute, without `..`, and name a regular file, not a symbolic link (point the profile at
//! the real file). The file must be executable by its owner, owned by root or by the user
//! vfmap runs as, and not writable by group or others. Every directory the kernel walks
//! through to reach it (symbolic links in the middle of the path are followed, and the
//! directories of their targets checked too) must be owned by root or vfmap's user and not
//! writable by group or others, except a sticky directory like `/tmp` (mode `1777`): there
//! nobody can remove or rename an entry they do not own, and the entries below are checked in
//! turn. Each refusal ([`HookPathError`]) names the path and the fix.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, Metadata};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, kill_process_group, pidfd_open, waitid,
};

use vfmap_core::Bdf;

mod path;
mod running;

pub use path::{HookPathError, check_hook_path};
use running::{Capture, Ended, Running, Tail};

/// The `PATH` a hook runs with.
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// At most this many bytes of a hook's stdout are kept; more fails the run.
pub const STDOUT_LIMIT: usize = 1 << 20;

/// How many of the last non-blank stderr lines are kept.
pub const STDERR_TAIL_LINES: usize = 20;

/// Each kept stderr line is cut at this many bytes.
pub const STDERR_LINE_LIMIT: usize = 512;

/// How long the pipes are still read after the hook exited, for what its leftovers hold.
const EXIT_GRACE: Duration = Duration::from_millis(200);

/// How long a killed hook gets to die before a background thread takes over reaping it.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// Where no pidfd tells of the hook's exit, how often it is checked.
const TICK: Duration = Duration::from_millis(20);

/// The most symbolic links followed while checking a hook's path (as the kernel's limit).
const MAX_LINKS: usize = 40;

/// The phases a hook runs at (the profile's names for them).
pub use vfmap_core::profile::HookPhase;

/// One run of a hook: what to run and what it is told.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// The hook, an absolute path from the profile.
    pub program: &'a Path,
    /// The phase.
    pub phase: HookPhase,
    /// The profile's card name (`VFMAP_CARD`, and in errors).
    pub card: &'a str,
    /// The PF (`VFMAP_PF`).
    pub pf: Bdf,
    /// The VF (`VFMAP_VF`); `None` for PF-wide runs.
    pub vf: Option<Bdf>,
    /// The VF's number on its PF (`VFMAP_VF_NUMBER`).
    pub vf_number: Option<u16>,
    /// `program`: the function wanted; `scrub`, `bring_up`: the VF's function
    /// (`VFMAP_FUNCTION`).
    pub function: Option<&'a str>,
    /// `program`: the function the VF carried until now (`VFMAP_FROM_FUNCTION`).
    pub from_function: Option<&'a str>,
    /// The sysfs root vfmap works under (`VFMAP_SYSFS_ROOT`).
    pub sysfs_root: &'a Path,
    /// How long the hook may run before its process group is killed.
    pub deadline: Duration,
}

/// What a successful hook run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutput {
    /// Everything the hook printed on stdout (at most [`STDOUT_LIMIT`] bytes).
    pub stdout: Vec<u8>,
    /// The last non-blank stderr lines, cut and escaped (see the module doc), for the log.
    pub stderr_tail: Vec<String>,
    /// How long the run took, from spawn to reaping.
    pub duration: Duration,
}

/// Which hook run an error is about: card, phase and program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookContext {
    /// The profile's card name.
    pub card: String,
    /// The phase.
    pub phase: HookPhase,
    /// The hook.
    pub program: PathBuf,
}

impl fmt::Display for HookContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "card {}: {} hook {}",
            escape_controls(&self.card),
            self.phase,
            self.program.display()
        )
    }
}

/// Why a hook run failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// A value for the hook's environment contains a control character; nothing was run.
    #[error("{context}: refusing to run it: the {what} {value:?} contains a control character")]
    InvalidInput {
        /// The run.
        context: HookContext,
        /// Which value: `card name`, `function` or `from_function`.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The hook's path is not safe to run; nothing was run.
    #[error("{context}: refusing to run it")]
    Path {
        /// The run.
        context: HookContext,
        /// Why.
        #[source]
        source: HookPathError,
    },
    /// The hook could not be started (the OS's reason is the source).
    #[error("{context}: cannot start it{}", spawn_hint(.source))]
    Spawn {
        /// The run.
        context: HookContext,
        /// The OS's reason.
        #[source]
        source: io::Error,
    },
    /// Watching the hook failed (reading its pipes or its state); it was killed.
    #[error("{context}: watching the run failed; the hook was killed")]
    Io {
        /// The run.
        context: HookContext,
        /// The OS's reason.
        #[source]
        source: io::Error,
    },
    /// The hook exited with a non-zero status or was killed by a signal.
    #[error("{context} failed ({status}){}", tail_suffix(stderr_tail))]
    Failed {
        /// The run.
        context: HookContext,
        /// The exit status or signal.
        status: ExitStatus,
        /// The last stderr lines, as in [`HookOutput::stderr_tail`].
        stderr_tail: Vec<String>,
    },
    /// The deadline passed; the hook's process group was killed.
    #[error(
        "{context} did not finish within its deadline of {deadline:?}; its process group was killed{}",
        tail_suffix(stderr_tail)
    )]
    Deadline {
        /// The run.
        context: HookContext,
        /// The deadline.
        deadline: Duration,
        /// The last stderr lines, as in [`HookOutput::stderr_tail`].
        stderr_tail: Vec<String>,
    },
    /// The hook exited 0 but printed more than [`STDOUT_LIMIT`] bytes on stdout.
    #[error(
        "{context} printed more than {limit} bytes on stdout; its output is incomplete, so the run counts as failed"
    )]
    OutputTooLarge {
        /// The run.
        context: HookContext,
        /// The limit, [`STDOUT_LIMIT`].
        limit: usize,
    },
}

impl HookError {
    /// Which run the error is about.
    pub fn context(&self) -> &HookContext {
        match self {
            HookError::InvalidInput { context, .. }
            | HookError::Path { context, .. }
            | HookError::Spawn { context, .. }
            | HookError::Io { context, .. }
            | HookError::Failed { context, .. }
            | HookError::Deadline { context, .. }
            | HookError::OutputTooLarge { context, .. } => context,
        }
    }
}

/// The last stderr lines for an error message: up to three, latest last.
fn tail_suffix(tail: &[String]) -> String {
    if tail.is_empty() {
        return String::new();
    }
    let shown = &tail[tail.len().saturating_sub(3)..];
    format!("; last stderr: {}", shown.join(" | "))
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`), fit for one log line.
fn escape_controls(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            shown.extend(c.escape_debug());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// A hint for the classic puzzling spawn failure: a script whose `#!` interpreter is missing.
fn spawn_hint(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::NotFound {
        " (if the file exists: is its #! interpreter line right?)"
    } else {
        ""
    }
}

/// Runs one hook and waits for it, at most until its deadline; see the module doc for the
/// contract. The path is checked ([`check_hook_path`]) right before the spawn.
pub fn run_hook(inv: &Invocation<'_>) -> Result<HookOutput, HookError> {
    run_hook_with(inv, true)
}

/// [`run_hook`], watching for the hook's exit through a pidfd or (tests of the fallback for
/// kernels without pidfds) by checking every `TICK`.
fn run_hook_with(inv: &Invocation<'_>, use_pidfd: bool) -> Result<HookOutput, HookError> {
    let context = HookContext {
        card: inv.card.to_owned(),
        phase: inv.phase,
        program: inv.program.to_owned(),
    };
    let values = [
        ("card name", Some(inv.card)),
        ("function", inv.function),
        ("from_function", inv.from_function),
    ];
    for (what, value) in values {
        if let Some(value) = value.filter(|v| v.chars().any(char::is_control)) {
            return Err(HookError::InvalidInput {
                context,
                what,
                value: value.to_owned(),
            });
        }
    }
    if let Err(source) = check_hook_path(inv.program) {
        return Err(HookError::Path { context, source });
    }

    let mut command = Command::new(inv.program);
    command
        .arg(inv.phase.as_str())
        .env_clear()
        .envs(environment(inv))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir("/")
        .process_group(0);
    let started = Instant::now();
    let deadline = started.checked_add(inv.deadline);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(source) => return Err(HookError::Spawn { context, source }),
    };
    let mut run = Running::new(child, use_pidfd);
    let mut stdout = Capture::default();
    let mut stderr = Tail::default();
    let ended = run.watch(deadline, &mut stdout, &mut stderr);
    // Kills what is left of the group (everything, at the deadline) and reaps the hook.
    let reaped = run.finish();
    let duration = started.elapsed();
    let stderr_tail = stderr.finish();
    match ended {
        Err(source) => Err(HookError::Io { context, source }),
        Ok(Ended::Deadline) => Err(HookError::Deadline {
            context,
            deadline: inv.deadline,
            stderr_tail,
        }),
        Ok(Ended::Exited) => match reaped {
            Err(source) => Err(HookError::Io { context, source }),
            Ok(None) => Err(HookError::Io {
                context,
                source: io::Error::other("the hook exited but could not be reaped"),
            }),
            Ok(Some(status)) if !status.success() => Err(HookError::Failed {
                context,
                status,
                stderr_tail,
            }),
            Ok(Some(_)) if stdout.overflow => Err(HookError::OutputTooLarge {
                context,
                limit: STDOUT_LIMIT,
            }),
            Ok(Some(_)) => Ok(HookOutput {
                stdout: stdout.data,
                stderr_tail,
                duration,
            }),
        },
    }
}

/// The hook's environment (after clearing), as in the module doc's table.
fn environment(inv: &Invocation<'_>) -> Vec<(&'static str, OsString)> {
    let mut env = vec![
        ("PATH", OsString::from(HOOK_PATH)),
        ("VFMAP_PHASE", OsString::from(inv.phase.as_str())),
        ("VFMAP_CARD", OsString::from(inv.card)),
        ("VFMAP_PF", OsString::from(inv.pf.to_string())),
    ];
    if let Some(vf) = inv.vf {
        env.push(("VFMAP_VF", OsString::from(vf.to_string())));
    }
    if let Some(number) = inv.vf_number {
        env.push(("VFMAP_VF_NUMBER", OsString::from(number.to_string())));
    }
    if let Some(function) = inv.function {
        env.push(("VFMAP_FUNCTION", OsString::from(function)));
    }
    if let Some(function) = inv.from_function {
        env.push(("VFMAP_FROM_FUNCTION", OsString::from(function)));
    }
    env.push(("VFMAP_SYSFS_ROOT", inv.sysfs_root.as_os_str().to_owned()));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names() {
        let names: Vec<&str> = HookPhase::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(names, ["bring_up", "program", "scrub", "discover"]);
        assert_eq!(HookPhase::Scrub.to_string(), "scrub");
    }

    #[test]
    fn tail_keeps_last_lines_cut_and_escaped() {
        let mut tail = Tail::default();
        for i in 0..30 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        tail.push(b"\n   \n");
        tail.push(b"esc \x1b[31mred\r\n");
        tail.push(&[b'x'; 2000]);
        tail.push(b"\nno newline at end");
        let lines = tail.finish();
        assert_eq!(lines.len(), STDERR_TAIL_LINES);
        assert_eq!(lines[0], "line 13");
        assert_eq!(lines[17], "esc \\u{1b}[31mred");
        assert_eq!(lines[18], format!("{}…", "x".repeat(STDERR_LINE_LIMIT)));
        assert_eq!(lines[19], "no newline at end");
    }

    #[test]
    fn capture_stops_at_the_limit() {
        let mut capture = Capture::default();
        capture.push(&vec![b'a'; STDOUT_LIMIT - 1]);
        assert!(!capture.overflow);
        capture.push(b"bc");
        assert!(capture.overflow);
        assert_eq!(capture.data.len(), STDOUT_LIMIT);
        capture.push(b"more");
        assert_eq!(capture.data.len(), STDOUT_LIMIT);
    }

    /// The fallback without a pidfd: success, failure, and a deadline with a grandchild
    /// holding the pipes (the pidfd path is covered by `tests/hooks.rs`).
    #[test]
    fn without_a_pidfd_exit_is_noticed_by_ticks() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            let path = dir.path().join(name);
            fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let ok = write("ok", "echo \"$VFMAP_PHASE $VFMAP_PF\"\n");
        let fails = write("fails", "echo nope >&2\nexit 2\n");
        let hangs = write("hangs", "sleep 1000 &\nsleep 1000\n");
        let invocation = |program| Invocation {
            program,
            phase: HookPhase::BringUp,
            card: "acme",
            pf: "0000:3b:00.0".parse().unwrap(),
            vf: None,
            vf_number: None,
            function: None,
            from_function: None,
            sysfs_root: Path::new("/sys"),
            deadline: Duration::from_millis(300),
        };
        let output = run_hook_with(&invocation(&ok), false).unwrap();
        assert_eq!(output.stdout, b"bring_up 0000:3b:00.0\n");
        let error = run_hook_with(&invocation(&fails), false).unwrap_err();
        assert!(
            matches!(&error, HookError::Failed { status, stderr_tail, .. }
                if status.code() == Some(2) && stderr_tail == &["nope"]),
            "{error}"
        );
        let started = Instant::now();
        let error = run_hook_with(&invocation(&hangs), false).unwrap_err();
        assert!(matches!(error, HookError::Deadline { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_millis(1300));
    }

    #[test]
    fn error_messages_name_card_phase_program_and_fix() {
        let context = HookContext {
            card: "acme".to_owned(),
            phase: HookPhase::Scrub,
            program: PathBuf::from("/opt/hooks/acme"),
        };
        let error = HookError::Deadline {
            context,
            deadline: Duration::from_millis(300),
            stderr_tail: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            error.to_string(),
            "card acme: scrub hook /opt/hooks/acme did not finish within its deadline of 300ms; \
             its process group was killed; last stderr: a | b"
        );
        let error = HookPathError::DirWritable {
            hook: PathBuf::from("/opt/hooks/acme"),
            dir: PathBuf::from("/opt/hooks"),
            mode: 0o40777,
        };
        assert!(error.to_string().contains("(mode 0777)"), "{error}");
        assert!(
            error.to_string().ends_with("chmod go-w /opt/hooks"),
            "{error}"
        );
    }
}
