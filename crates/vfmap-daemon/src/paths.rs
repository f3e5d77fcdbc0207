//! The daemon's files on a shared host: the state directory (owned, private, locked by one
//! daemon) and the API socket (born with its final mode, never replacing anything but a stale
//! socket).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

/// Why a path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// Another daemon holds the state directory's lock.
    #[error(
        "another vfmap daemon{holder} is using the state directory {}: stop it first, or give this one another state_dir",
        dir.display()
    )]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// " (pid N)" when the holder wrote its pid.
        holder: String,
    },
    /// A directory other users could tamper with.
    #[error("{} {problem}; fix: {fix}", path.display())]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
        /// The command or change that fixes it.
        fix: String,
    },
    /// Something that is not a socket sits at the socket path.
    #[error(
        "{} exists and is not a socket; vfmap will not remove it: move it away or choose another socket path",
        path.display()
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A live daemon already answers on the socket.
    #[error("another daemon is listening on {}", path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("cannot set up {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PathError + '_ {
    move |source| PathError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Checks that `dir` is a real directory (not a symlink) owned by this user and not writable
/// by group or others: otherwise another user could replace what the daemon puts in it.
pub fn check_private_dir(dir: &Path, what: &str) -> Result<(), PathError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    let unsafe_dir = |problem: String, fix: String| PathError::Unsafe {
        path: dir.to_owned(),
        problem,
        fix,
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            format!("({what}) is a symbolic link"),
            "use the real directory path in the config".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir(
            format!("({what}) is not a directory"),
            "give a directory path".into(),
        ));
    }
    let me = euid();
    if meta.uid() != me {
        return Err(unsafe_dir(
            format!(
                "({what}) is owned by uid {}, not by this user (uid {me})",
                meta.uid()
            ),
            format!("chown {me} {}", dir.display()),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(
            format!(
                "({what}) is writable by other users (mode {:o})",
                meta.mode() & 0o7777
            ),
            format!("chmod go-w {}", dir.display()),
        ));
    }
    Ok(())
}

/// Creates `dir` (mode `mode`, parents as needed) when missing, then checks it.
pub fn ensure_private_dir(dir: &Path, mode: u32, what: &str) -> Result<(), PathError> {
    if std::fs::symlink_metadata(dir).is_err() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        match DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(dir)(e)),
        }
    }
    check_private_dir(dir, what)
}

/// The state directory, held exclusively while this value lives.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Prepares and locks the state directory: the directory must be private (see
/// [`check_private_dir`]); the lock file holds the daemon's pid. A second daemon gets
/// [`PathError::Locked`] before it touches anything else.
pub fn lock_state_dir(dir: &Path) -> Result<StateLock, PathError> {
    ensure_private_dir(dir, 0o700, "the state directory")?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(io(&path))?;
    if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
        if e == rustix::io::Errno::WOULDBLOCK {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = text
                .trim()
                .parse::<u32>()
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(PathError::Locked {
                dir: dir.to_owned(),
                holder,
            });
        }
        return Err(io(&path)(e.into()));
    }
    file.set_len(0).map_err(io(&path))?;
    file.rewind().map_err(io(&path))?;
    writeln!(file, "{}", std::process::id()).map_err(io(&path))?;
    Ok(StateLock { _file: file })
}

/// The API socket, removed on drop if it is still the one this daemon made.
#[derive(Debug)]
pub struct BoundSocket {
    path: PathBuf,
    identity: (u64, u64),
}

impl BoundSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the API socket at `path`, mode 0600 from its first moment: it is bound inside a
/// private directory, given its mode there, and renamed into place. What sits at `path`
/// already is replaced only when it is a socket nobody listens on. The socket's directory is
/// created (mode 0755) when missing, and must be owned by this user and not writable by
/// others.
pub fn bind_socket(
    path: &Path,
) -> Result<(std::os::unix::net::UnixListener, BoundSocket), PathError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    ensure_private_dir(&parent, 0o755, "the API socket's directory")?;
    check_socket_path(path)?;
    let staging = tempdir_in(&parent)?;
    let staged = staging.join("api.sock");
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged).map_err(io(&staged))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&staged))?;
        // A second look just before the rename: the directory is ours, so nobody else can
        // have put anything there since.
        check_socket_path(path)?;
        std::fs::rename(&staged, path).map_err(io(path))?;
        let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
        Ok((
            listener,
            BoundSocket {
                path: path.to_owned(),
                identity: (meta.dev(), meta.ino()),
            },
        ))
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    result
}

/// Refuses anything at `path` but a stale socket.
fn check_socket_path(path: &Path) -> Result<(), PathError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
        Ok(meta) if !meta.file_type().is_socket() => Err(PathError::NotASocket {
            path: path.to_owned(),
        }),
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                Err(PathError::InUse {
                    path: path.to_owned(),
                })
            } else {
                Ok(())
            }
        }
    }
}

/// A new private (0700) directory in `parent`.
fn tempdir_in(parent: &Path) -> Result<PathBuf, PathError> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0..100u32 {
        let dir = parent.join(format!(
            ".vfmap-bind-{}-{:x}",
            std::process::id(),
            seed.wrapping_add(attempt)
        ));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(&dir)(e)),
        }
    }
    Err(io(parent)(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "no free name for a private bind directory",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = lock_state_dir(&state).unwrap();
        let err = lock_state_dir(&state).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PathError::Locked { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        lock_state_dir(&state).unwrap();
    }

    #[test]
    fn unsafe_directories_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = lock_state_dir(&open).unwrap_err().to_string();
        assert!(
            err.contains("writable by other users") && err.contains("chmod go-w"),
            "{err}"
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let err = check_private_dir(&link, "x").unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn the_socket_is_born_0600_and_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = bind_socket(&path).unwrap_err();
        assert!(matches!(err, PathError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        // A symlink at the socket path is not followed, whatever it points to.
        std::fs::remove_file(&path).unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "x").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(
            bind_socket(&path).unwrap_err(),
            PathError::NotASocket { .. }
        ));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "x");
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&target).unwrap();
        let (listener, bound) = bind_socket(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            bind_socket(&path).unwrap_err(),
            PathError::InUse { .. }
        ));
        drop(listener);
        // A stale socket (nobody listening) is replaced.
        let (_listener, again) = bind_socket(&path).unwrap();
        drop(bound); // the first one's guard must not remove the new socket
        assert!(path.exists());
        drop(again);
        assert!(!path.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
