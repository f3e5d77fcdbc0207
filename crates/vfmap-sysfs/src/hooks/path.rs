//! The path rules of a hook (see the parent module's doc): who may have written what runs.

use super::*;

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
