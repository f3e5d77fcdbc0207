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

/// Why a hook's path is refused.
#[derive(Debug, thiserror::Error)]
pub enum HookPathError {
    /// The path is relative.
    #[error(
        "hook path {} is not absolute; give the full path (e.g. /usr/local/lib/vfmap/hooks/<name>)",
        path.display()
    )]
    NotAbsolute {
        /// The path.
        path: PathBuf,
    },
    /// The path has a `..` component.
    #[error("hook path {} contains \"..\"; give the path without it", path.display())]
    ParentComponent {
        /// The path.
        path: PathBuf,
    },
    /// A file or directory on the way cannot be inspected (the OS's reason is the source).
    #[error("hook {}: cannot inspect {}; does it exist, and can vfmap's user reach it?", hook.display(), path.display())]
    Inaccessible {
        /// The hook's path.
        hook: PathBuf,
        /// What could not be inspected.
        path: PathBuf,
        /// The OS's reason.
        #[source]
        source: io::Error,
    },
    /// The hook is a symbolic link.
    #[error(
        "hook {} is a symbolic link (to {}); point the profile at the real file (see `readlink -f {}`)",
        path.display(), target.display(), path.display()
    )]
    Symlink {
        /// The path.
        path: PathBuf,
        /// What the link says (as written in the link, maybe relative).
        target: PathBuf,
    },
    /// Following the symbolic links on the way took more than 40 steps.
    #[error("hook {}: too many symbolic links on the way (a loop?); give the real path", hook.display())]
    TooManyLinks {
        /// The hook's path.
        hook: PathBuf,
    },
    /// Something on the way that should be a directory is not.
    #[error("hook {}: {} is not a directory", hook.display(), path.display())]
    NotADirectory {
        /// The hook's path.
        hook: PathBuf,
        /// What is not a directory.
        path: PathBuf,
    },
    /// The hook is not a regular file.
    #[error("hook {} is a {kind}, not a regular file; point the profile at an executable file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is: `directory`, `socket`, ...
        kind: &'static str,
    },
    /// The hook's owner may not execute it.
    #[error("hook {} is not executable (mode {}); chmod u+x {}", path.display(), Mode(*mode), path.display())]
    NotExecutable {
        /// The path.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The hook is owned by someone else than root or vfmap's user.
    #[error(
        "hook {} is owned by uid {uid}, not {}, so its owner could change what vfmap runs; chown root {}",
        path.display(), owners(*euid), path.display()
    )]
    FileOwner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// vfmap's effective uid.
        euid: u32,
    },
    /// The hook is writable by group or others.
    #[error(
        "hook {} is writable by group or others (mode {}), so they could change what vfmap runs; chmod go-w {}",
        path.display(), Mode(*mode), path.display()
    )]
    FileWritable {
        /// The path.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A directory on the way is owned by someone else than root or vfmap's user.
    #[error(
        "hook {}: directory {} is owned by uid {uid}, not {}, so its owner could replace the hook; chown root {}",
        hook.display(), dir.display(), owners(*euid), dir.display()
    )]
    DirOwner {
        /// The hook's path.
        hook: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        uid: u32,
        /// vfmap's effective uid.
        euid: u32,
    },
    /// A directory on the way is writable by group or others and not sticky.
    #[error(
        "hook {}: directory {} is writable by group or others (mode {}), so they could replace the hook; chmod go-w {}",
        hook.display(), dir.display(), Mode(*mode), dir.display()
    )]
    DirWritable {
        /// The hook's path.
        hook: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// A file mode's permission bits, as `chmod` writes them (`0755`, `1777`).
struct Mode(u32);

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0 & 0o7777)
    }
}

/// Who may own a hook and its directories.
fn owners(euid: u32) -> String {
    if euid == 0 {
        "root".to_owned()
    } else {
        format!("root or uid {euid} (vfmap's user)")
    }
}

/// Checks that `path` is safe to run as a hook; see the module doc for the rules.
pub fn check_hook_path(path: &Path) -> Result<(), HookPathError> {
    if !path.is_absolute() {
        return Err(HookPathError::NotAbsolute {
            path: path.to_owned(),
        });
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(HookPathError::ParentComponent {
            path: path.to_owned(),
        });
    }
    let euid = rustix::process::geteuid().as_raw();
    let inspect = |entry: &Path| {
        fs::symlink_metadata(entry).map_err(|source| HookPathError::Inaccessible {
            hook: path.to_owned(),
            path: entry.to_owned(),
            source,
        })
    };

    // Walk the path as the kernel would, one component at a time from `/`, following the
    // symbolic links in the middle, so every directory the lookup goes through is checked.
    let mut dir = PathBuf::from("/");
    check_dir(path, &dir, &inspect(&dir)?, euid)?;
    let mut pending: VecDeque<OsString> = components(path).collect();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            // Only from a link's target: `dir` is a real directory, its parent was checked.
            dir.pop();
            continue;
        }
        let entry = dir.join(&name);
        let meta = inspect(&entry)?;
        let last = pending.is_empty();
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&entry).map_err(|source| HookPathError::Inaccessible {
                hook: path.to_owned(),
                path: entry.clone(),
                source,
            })?;
            if last {
                return Err(HookPathError::Symlink {
                    path: path.to_owned(),
                    target,
                });
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(HookPathError::TooManyLinks {
                    hook: path.to_owned(),
                });
            }
            if target.is_absolute() {
                dir = PathBuf::from("/");
            }
            let target: Vec<OsString> = components(&target).collect();
            for name in target.into_iter().rev() {
                pending.push_front(name);
            }
            continue;
        }
        if last {
            return check_file(&entry, path, &meta, euid);
        }
        if !meta.is_dir() {
            return Err(HookPathError::NotADirectory {
                hook: path.to_owned(),
                path: entry,
            });
        }
        check_dir(path, &entry, &meta, euid)?;
        dir = entry;
    }
    // The path ended in a directory (e.g. a link to `..` as its last step).
    Err(HookPathError::NotAFile {
        path: path.to_owned(),
        kind: "directory",
    })
}

/// A path's components to look up: names and `..`, without the root and `.`.
fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name.to_owned()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

/// The rules for a directory on the way to `hook`.
fn check_dir(hook: &Path, dir: &Path, meta: &Metadata, euid: u32) -> Result<(), HookPathError> {
    let uid = meta.uid();
    if uid != 0 && uid != euid {
        return Err(HookPathError::DirOwner {
            hook: hook.to_owned(),
            dir: dir.to_owned(),
            uid,
            euid,
        });
    }
    let mode = meta.mode();
    // A sticky directory (like /tmp, 1777) lets nobody but an entry's owner (and the
    // directory's owner, checked above) remove or rename that entry, so others writing
    // there cannot replace the entry on the way to the hook, whose owner is checked next.
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(HookPathError::DirWritable {
            hook: hook.to_owned(),
            dir: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The rules for the hook file itself (`path` is where it was found, `hook` as configured).
fn check_file(path: &Path, hook: &Path, meta: &Metadata, euid: u32) -> Result<(), HookPathError> {
    let file_type = meta.file_type();
    if !file_type.is_file() {
        let kind = if file_type.is_dir() {
            "directory"
        } else if file_type.is_fifo() {
            "named pipe"
        } else if file_type.is_socket() {
            "socket"
        } else if file_type.is_block_device() {
            "block device"
        } else if file_type.is_char_device() {
            "character device"
        } else {
            "special file"
        };
        return Err(HookPathError::NotAFile {
            path: hook.to_owned(),
            kind,
        });
    }
    let mode = meta.mode();
    if mode & 0o100 == 0 {
        return Err(HookPathError::NotExecutable {
            path: path.to_owned(),
            mode,
        });
    }
    let uid = meta.uid();
    if uid != 0 && uid != euid {
        return Err(HookPathError::FileOwner {
            path: path.to_owned(),
            uid,
            euid,
        });
    }
    if mode & 0o022 != 0 {
        return Err(HookPathError::FileWritable {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
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

/// How watching a run ended.
enum Ended {
    /// The hook exited (not reaped yet) and its pipes were drained.
    Exited,
    /// The deadline passed.
    Deadline,
}

/// A running hook, killed and reaped on every way out (including a panic).
struct Running {
    /// `None` once reaped, or handed to a reaper thread.
    child: Option<Child>,
    /// The hook's pid, which is its process group's id. The group id cannot be reused while
    /// the hook is not reaped, so signalling the group before reaping is safe.
    pgid: Pid,
    /// Readable when the hook exits; `None` where pidfds are not available (`TICK` instead).
    pidfd: Option<OwnedFd>,
}

impl Running {
    fn new(child: Child, use_pidfd: bool) -> Running {
        let pgid = Pid::from_child(&child);
        // Safe to open by pid: the child is not reaped, so the pid is still its own.
        let pidfd = use_pidfd
            .then(|| pidfd_open(pgid, PidfdFlags::empty()).ok())
            .flatten();
        Running {
            child: Some(child),
            pgid,
            pidfd,
        }
    }

    /// Whether the hook has exited, leaving it waitable (not reaped).
    fn exited(&self) -> io::Result<bool> {
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        loop {
            match waitid(WaitId::Pid(self.pgid), options) {
                Ok(status) => return Ok(status.is_some()),
                Err(Errno::INTR) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Reads the hook's pipes until it exited and they are drained (or `EXIT_GRACE` after
    /// its exit, if leftovers hold them), or until the deadline.
    fn watch(
        &mut self,
        deadline: Option<Instant>,
        stdout_capture: &mut Capture,
        stderr_tail: &mut Tail,
    ) -> io::Result<Ended> {
        let child = self.child.as_mut().expect("the hook is not reaped yet");
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let mut buf = vec![0u8; 64 * 1024];
        let mut exited_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|deadline| now >= deadline) {
                return Ok(Ended::Deadline);
            }
            if exited_at.is_none() && self.exited()? {
                exited_at = Some(now);
            }
            let mut timeout = deadline.map(|deadline| deadline - now);
            if let Some(at) = exited_at {
                let drained = stdout.is_none() && stderr.is_none();
                let grace_end = at + EXIT_GRACE;
                if drained || now >= grace_end {
                    return Ok(Ended::Exited);
                }
                timeout = Some(timeout.map_or(grace_end - now, |t| t.min(grace_end - now)));
            } else if self.pidfd.is_none() {
                timeout = Some(timeout.map_or(TICK, |t| t.min(TICK)));
            }

            let (stdout_ready, stderr_ready) = {
                let mut fds = Vec::with_capacity(3);
                let mut stdout_at = None;
                let mut stderr_at = None;
                if let Some(pipe) = &stdout {
                    stdout_at = Some(fds.len());
                    fds.push(PollFd::new(pipe, PollFlags::IN));
                }
                if let Some(pipe) = &stderr {
                    stderr_at = Some(fds.len());
                    fds.push(PollFd::new(pipe, PollFlags::IN));
                }
                if exited_at.is_none()
                    && let Some(pidfd) = &self.pidfd
                {
                    fds.push(PollFd::new(pidfd, PollFlags::IN));
                }
                let timeout = timeout.map(|t| {
                    Timespec::try_from(t).unwrap_or(Timespec {
                        tv_sec: i64::MAX,
                        tv_nsec: 0,
                    })
                });
                match poll(&mut fds, timeout.as_ref()) {
                    Ok(_) | Err(Errno::INTR) => {}
                    Err(error) => return Err(error.into()),
                }
                let ready = |at: Option<usize>| at.is_some_and(|i| !fds[i].revents().is_empty());
                (ready(stdout_at), ready(stderr_at))
            };
            // One read per readiness: it cannot block, even on a blocking pipe.
            if stdout_ready
                && let Some(pipe) = &mut stdout
                && read_once(pipe, &mut buf, |bytes| stdout_capture.push(bytes))?
            {
                stdout = None;
            }
            if stderr_ready
                && let Some(pipe) = &mut stderr
                && read_once(pipe, &mut buf, |bytes| stderr_tail.push(bytes))?
            {
                stderr = None;
            }
        }
    }

    /// Kills what is left of the hook's process group and reaps the hook. `Ok(None)` when it
    /// was reaped already, or did not die within `KILL_GRACE` (a thread reaps it later).
    fn finish(&mut self) -> io::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        // Fails with ESRCH when nothing is left, which is fine.
        let _ = kill_process_group(self.pgid, Signal::KILL);
        let give_up = Instant::now() + KILL_GRACE;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(Some(status)),
                Ok(None) if Instant::now() < give_up => thread::sleep(Duration::from_millis(2)),
                Ok(None) => {
                    // Stuck in the kernel (uninterruptible sleep): it dies when the call
                    // returns; reap it then, without holding up the caller.
                    let reaper = thread::Builder::new()
                        .name("vfmap-hook-reaper".to_owned())
                        .spawn(move || {
                            let _ = child.wait();
                        });
                    return match reaper {
                        Ok(_) => Ok(None),
                        Err(error) => Err(error),
                    };
                }
                Err(error) => return Err(error),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Reads once from `pipe` into `sink`; `true` at end of file.
fn read_once(
    pipe: &mut impl Read,
    buf: &mut [u8],
    mut sink: impl FnMut(&[u8]),
) -> io::Result<bool> {
    match pipe.read(buf) {
        Ok(0) => Ok(true),
        Ok(n) => {
            sink(&buf[..n]);
            Ok(false)
        }
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) =>
        {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// stdout, kept up to [`STDOUT_LIMIT`] bytes.
#[derive(Default)]
struct Capture {
    data: Vec<u8>,
    /// More was written than kept.
    overflow: bool,
}

impl Capture {
    fn push(&mut self, bytes: &[u8]) {
        let room = STDOUT_LIMIT - self.data.len();
        if bytes.len() > room {
            self.overflow = true;
            self.data.extend_from_slice(&bytes[..room]);
        } else {
            self.data.extend_from_slice(bytes);
        }
    }
}

/// The last [`STDERR_TAIL_LINES`] non-blank lines of stderr, each cut at
/// [`STDERR_LINE_LIMIT`] bytes.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    /// The line being written, at most [`STDERR_LINE_LIMIT`] bytes of it.
    current: Vec<u8>,
    /// The line being written was longer.
    cut: bool,
}

impl Tail {
    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            self.append(&bytes[..newline]);
            self.end_line();
            bytes = &bytes[newline + 1..];
        }
        self.append(bytes);
    }

    fn append(&mut self, part: &[u8]) {
        let room = STDERR_LINE_LIMIT - self.current.len();
        if part.len() > room {
            self.cut = true;
            self.current.extend_from_slice(&part[..room]);
        } else {
            self.current.extend_from_slice(part);
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.current);
        let cut = std::mem::take(&mut self.cut);
        let lossy = String::from_utf8_lossy(&line);
        let text = lossy.strip_suffix('\r').unwrap_or(&lossy);
        if text.trim().is_empty() && !cut {
            return;
        }
        let mut shown = escape_controls(text);
        if cut {
            shown.push('…');
        }
        if self.lines.len() == STDERR_TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(shown);
    }

    fn finish(mut self) -> Vec<String> {
        if !self.current.is_empty() || self.cut {
            self.end_line();
        }
        self.lines.into()
    }
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
