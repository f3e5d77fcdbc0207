//! The system calls discovery makes: opens relative to an open directory, one-`read`
//! attributes, link targets.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{CWD, Mode, OFlags, openat};
use rustix::io::Errno;

/// `<name>/<attribute>` built on the stack: a path per attribute read costs no allocation.
pub(super) struct AttrPath {
    buf: [u8; 128],
    long: Vec<u8>,
}

impl AttrPath {
    pub(super) fn new() -> AttrPath {
        AttrPath {
            buf: [0; 128],
            long: Vec::new(),
        }
    }

    /// `name/attribute`, valid until the next call.
    pub(super) fn join(&mut self, name: &str, attribute: &str) -> &[u8] {
        let len = name.len() + 1 + attribute.len();
        let path: &mut [u8] = if len <= self.buf.len() {
            &mut self.buf[..len]
        } else {
            self.long.resize(len, 0);
            &mut self.long
        };
        path[..name.len()].copy_from_slice(name.as_bytes());
        path[name.len()] = b'/';
        path[name.len() + 1..].copy_from_slice(attribute.as_bytes());
        path
    }
}

pub(super) fn open_dir(base: impl AsFd, path: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    Ok(openat(
        base,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A directory opened only to be a base for `openat`/`readlinkat` (`O_PATH`): cheaper than a
/// full open, which also sets up reading the directory and tears it down at close.
pub(super) fn open_path_dir(base: impl AsFd, path: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    Ok(openat(
        base,
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The names in a directory (without `.` and `..`).
pub(super) fn list_dir(dir: &OwnedFd) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy();
        if name != "." && name != ".." {
            names.push(name.into_owned());
        }
    }
    Ok(names)
}

/// Reads a small attribute in one `read`: sysfs hands over the whole attribute (at most a page)
/// in the first read, and so does a small regular file (fixtures). `Ok(None)` when absent.
pub(super) fn read_attr_at<R>(
    dir: BorrowedFd<'_>,
    attribute: impl rustix::path::Arg,
    with: impl FnOnce(&str) -> R,
) -> io::Result<Option<R>> {
    let fd = match openat(
        dir,
        attribute,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    // A page and a byte: a sysfs attribute never fills it, so a full buffer means "not one".
    // Uninitialized, because this runs a few times per VF and zeroing cost more than the read.
    let mut buf = [MaybeUninit::<u8>::uninit(); 4097];
    let (text, rest) = rustix::io::read(&fd, &mut buf)?;
    if rest.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "longer than a sysfs attribute",
        ));
    }
    let text = text.trim_ascii();
    Ok(Some(match std::str::from_utf8(text) {
        Ok(text) => with(text),
        Err(_) => with(&String::from_utf8_lossy(text)),
    }))
}

/// What a symlink points to: the target's file name, and whether the target is `../<name>`.
pub(super) struct Link {
    pub(super) name: String,
    pub(super) sibling: bool,
}

/// What a symlink points to: `Ok(None)` when the link does not exist.
pub(super) fn read_link_at(
    dir: impl AsFd,
    link: impl rustix::path::Arg,
) -> io::Result<Option<Link>> {
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    let target = match rustix::fs::readlinkat_raw(dir, link, &mut buf) {
        Ok((target, rest)) if !rest.is_empty() => target,
        // A full buffer may be a cut target: the link is longer than a path may be.
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the link's target is longer than a path",
            ));
        }
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match target
        .split(|&b| b == b'/')
        .rfind(|part| !part.is_empty() && *part != b".")
    {
        Some(name) if name != b".." => Ok(Some(Link {
            sibling: target.strip_prefix(b"../") == Some(name),
            name: lossy_text(name),
        })),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "target {} has no file name",
                String::from_utf8_lossy(target)
            ),
        )),
    }
}

/// Text from the kernel: UTF-8 in practice, so only odd bytes pay for the lossy copy.
fn lossy_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// The file name a symlink points to: `Ok(None)` when the link does not exist.
pub(super) fn read_link_name(path: &Path) -> io::Result<Option<String>> {
    Ok(read_link_at(CWD, path)?.map(|link| link.name))
}
