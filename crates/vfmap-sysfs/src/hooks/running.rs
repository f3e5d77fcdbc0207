//! A running hook: its pipes read together with its exit, the deadline, the kill of its process
//! group and the reaping, with bounded captures of stdout and stderr.

use super::*;

/// How watching a run ended.
pub(super) enum Ended {
    /// The hook exited (not reaped yet) and its pipes were drained.
    Exited,
    /// The deadline passed.
    Deadline,
}

/// A running hook, killed and reaped on every way out (including a panic).
pub(super) struct Running {
    /// `None` once reaped, or handed to a reaper thread.
    child: Option<Child>,
    /// The hook's pid, which is its process group's id. The group id cannot be reused while
    /// the hook is not reaped, so signalling the group before reaping is safe.
    pgid: Pid,
    /// Readable when the hook exits; `None` where pidfds are not available (`TICK` instead).
    pidfd: Option<OwnedFd>,
}

impl Running {
    pub(super) fn new(child: Child, use_pidfd: bool) -> Running {
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
    pub(super) fn exited(&self) -> io::Result<bool> {
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
    pub(super) fn watch(
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
    pub(super) fn finish(&mut self) -> io::Result<Option<ExitStatus>> {
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
pub(super) struct Capture {
    /// What was kept.
    pub(super) data: Vec<u8>,
    /// More was written than kept.
    pub(super) overflow: bool,
}

impl Capture {
    pub(super) fn push(&mut self, bytes: &[u8]) {
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
pub(super) struct Tail {
    lines: VecDeque<String>,
    /// The line being written, at most [`STDERR_LINE_LIMIT`] bytes of it.
    current: Vec<u8>,
    /// The line being written was longer.
    cut: bool,
}

impl Tail {
    pub(super) fn push(&mut self, mut bytes: &[u8]) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            self.append(&bytes[..newline]);
            self.end_line();
            bytes = &bytes[newline + 1..];
        }
        self.append(bytes);
    }

    pub(super) fn append(&mut self, part: &[u8]) {
        let room = STDERR_LINE_LIMIT - self.current.len();
        if part.len() > room {
            self.cut = true;
            self.current.extend_from_slice(&part[..room]);
        } else {
            self.current.extend_from_slice(part);
        }
    }

    pub(super) fn end_line(&mut self) {
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

    pub(super) fn finish(mut self) -> Vec<String> {
        if !self.current.is_empty() || self.cut {
            self.end_line();
        }
        self.lines.into()
    }
}
