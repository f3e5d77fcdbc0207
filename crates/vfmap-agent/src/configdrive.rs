//! The config drive: the block device labelled `config-2` (ISO 9660 or vfat) that OpenStack
//! Nova and KubeVirt attach to a VM, holding `openstack/latest/meta_data.json`.
//!
//! Found without udev: every `<sysfs>/class/block/<name>` is tried, its device node
//! `<dev>/<name>` read at two places only (2,048 bytes at 32 KiB for the ISO 9660 primary
//! volume descriptor, the 512-byte boot sector for vfat) and its label compared, ignoring
//! case, with `config-2`. The drive is then mounted read-only (`nosuid,nodev,noexec`) on a
//! private directory made for it (an unguessable name, mode 0700), the file is opened beneath
//! that directory one component at a time with no symbolic link followed and without blocking
//! (a FIFO on the drive cannot stall the agent), checked to be a regular file, read up to a
//! bound, and the drive unmounted, also on every error path. When the kernel lacks the
//! filesystem (`ENODEV`), its module (`isofs` or `vfat`) is loaded the way drivers are, and
//! the mount tried once more.
//!
//! What cannot be bounded from here: the kernel's own parsing of the image at mount, and a
//! block device whose reads never complete (the agent then waits in the kernel, as `mount`
//! would). The drive comes from the hypervisor, which the guest trusts with its disks anyway.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, openat};
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};
use vfmap_core::DriverName;
use vfmap_sysfs::ModuleLoader;

/// The config drive's label (Nova and KubeVirt write it in lower case; cloud-init also accepts
/// `CONFIG-2`).
pub const LABEL: &str = "config-2";

/// Where the metadata is on the drive.
pub const METADATA_PATH: &str = "openstack/latest/meta_data.json";

/// Byte offset of the ISO 9660 primary volume descriptor (sector 16 of 2,048 bytes).
pub const ISO9660_PVD_OFFSET: u64 = 16 * 2048;

/// A filesystem a config drive is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filesystem {
    /// ISO 9660 (`genisoimage -V config-2`), Nova's default and KubeVirt's only format.
    Iso9660,
    /// vfat (`mkfs.vfat -n config-2`), Nova's `config_drive_format = vfat`.
    Vfat,
}

impl Filesystem {
    /// The type `mount(2)` takes.
    pub fn mount_type(self) -> &'static str {
        match self {
            Filesystem::Iso9660 => "iso9660",
            Filesystem::Vfat => "vfat",
        }
    }

    /// The kernel module that registers it.
    pub fn module(self) -> &'static str {
        match self {
            Filesystem::Iso9660 => "isofs",
            Filesystem::Vfat => "vfat",
        }
    }
}

/// The volume identifier of an ISO 9660 primary volume descriptor (`sector`: the 2,048 bytes
/// at [`ISO9660_PVD_OFFSET`]): type 1, `CD001`, version 1, the identifier at bytes 40-71,
/// padded with spaces.
pub fn iso9660_label(sector: &[u8]) -> Option<String> {
    let header = sector.get(..7)?;
    if header != b"\x01CD001\x01" {
        return None;
    }
    label_text(sector.get(40..72)?)
}

/// The volume label of a FAT boot sector (`sector`: its first 512 bytes): the extended boot
/// signature 0x29 and the 11-byte label at 43 (FAT12/16) or 71 (FAT32, whose 16-bit
/// sectors-per-FAT is 0), padded with spaces; `NO NAME` means none. The label in the root
/// directory, which may differ when set later by other tools, is not read.
pub fn vfat_label(sector: &[u8]) -> Option<String> {
    if sector.len() < 512 || sector[510..512] != [0x55, 0xaa] {
        return None;
    }
    let bytes_per_sector = u16::from_le_bytes([sector[11], sector[12]]);
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) {
        return None;
    }
    let fat32 = u16::from_le_bytes([sector[22], sector[23]]) == 0;
    let (signature, label, kind) = if fat32 { (66, 71, 82) } else { (38, 43, 54) };
    if sector[signature] != 0x29 || !sector[kind..kind + 8].starts_with(b"FAT") {
        return None;
    }
    label_text(&sector[label..label + 11]).filter(|l| l != "NO NAME")
}

fn label_text(bytes: &[u8]) -> Option<String> {
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&bytes[..end]).into_owned();
    (!text.is_empty()).then_some(text)
}

/// The filesystem and label of the device (or image file) at `path`, from at most 2,560
/// bytes read. `Ok(None)`: neither filesystem, or no label.
pub fn read_label(path: &Path) -> io::Result<Option<(Filesystem, String)>> {
    // Non-blocking: no wait for a medium, no hang on anything but a block device or a file.
    let file = open_nonblocking(path, OFlags::empty())?;
    let kind = file.metadata()?.file_type();
    if !(kind.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&kind)) {
        return Ok(None);
    }
    let mut pvd = [0u8; 2048];
    if file.read_exact_at(&mut pvd, ISO9660_PVD_OFFSET).is_ok()
        && let Some(label) = iso9660_label(&pvd)
    {
        return Ok(Some((Filesystem::Iso9660, label)));
    }
    let mut boot = [0u8; 512];
    if file.read_exact_at(&mut boot, 0).is_ok()
        && let Some(label) = vfat_label(&boot)
    {
        return Ok(Some((Filesystem::Vfat, label)));
    }
    Ok(None)
}

/// A block device labelled [`LABEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigDrive {
    /// Its name in `class/block` (`sr0`, `vdb`).
    pub name: String,
    /// Its device node.
    pub node: PathBuf,
    /// Its filesystem.
    pub filesystem: Filesystem,
}

/// A kernel block device name: no path separators, no dot files.
fn plain_name(name: &OsStr) -> Option<&str> {
    let name = name.to_str()?;
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-:".contains(&b));
    ok.then_some(name)
}

/// Every block device under `<sysfs_root>/class/block` whose node under `dev_root` carries the
/// label [`LABEL`] (any case), sorted by name. Devices that cannot be read (no medium, no
/// node) are skipped.
pub fn find(sysfs_root: &Path, dev_root: &Path) -> Vec<ConfigDrive> {
    let Ok(entries) = fs::read_dir(sysfs_root.join("class/block")) else {
        return Vec::new();
    };
    let mut found: Vec<ConfigDrive> = entries
        .flatten()
        .filter_map(|e| {
            let name = plain_name(&e.file_name())?.to_owned();
            let node = dev_root.join(&name);
            let (filesystem, label) = read_label(&node).ok()??;
            label.eq_ignore_ascii_case(LABEL).then_some(ConfigDrive {
                name,
                node,
                filesystem,
            })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Why the metadata could not be read from a config drive or a file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigDriveError {
    /// No block device is labelled `config-2`.
    #[error(
        "no block device labelled {LABEL} (ISO 9660 or vfat) after {waited_ms} ms; is the config drive attached, and its disk driver (virtio_blk, sr_mod, ...) loaded?"
    )]
    NotFound {
        /// How long the agent looked.
        waited_ms: u128,
    },
    /// Several are; which one holds the truth is unknowable.
    #[error(
        "several block devices are labelled {LABEL} ({0}); detach all but the orchestrator's, or set [metadata] path"
    )]
    Several(String),
    /// `source = "file"` without `path`.
    #[error("[metadata] source = \"file\" needs path = \"/path/to/meta_data.json\"")]
    NoPath,
    /// Making the private mount point failed.
    #[error(
        "cannot make a mount point in {} (set TMPDIR to a writable directory)",
        dir.display()
    )]
    MountPoint {
        /// Where.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The filesystem's module could not be loaded.
    #[error("the kernel has no {fs} filesystem and loading module {module} failed: {reason}")]
    Module {
        /// The filesystem.
        fs: &'static str,
        /// The module.
        module: &'static str,
        /// Why.
        reason: String,
    },
    /// The mount failed.
    #[error(
        "cannot mount {} ({}) read-only (the agent needs CAP_SYS_ADMIN and the mount system calls; or copy meta_data.json off the drive and set [metadata] source = \"file\")",
        node.display(),
        fs
    )]
    Mount {
        /// The device.
        node: PathBuf,
        /// The filesystem.
        fs: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file could not be opened or read.
    #[error("cannot read {path} (a regular file, reached without symbolic links)")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It is not a regular file.
    #[error("{0} is not a regular file")]
    NotAFile(String),
    /// It is over the bound.
    #[error("{path} is over the {limit}-byte limit")]
    TooLarge {
        /// The file.
        path: String,
        /// The bound.
        limit: usize,
    },
}

/// Reads at most `limit` bytes from `file`; over that is an error.
fn read_bounded(mut file: File, path: &str, limit: usize) -> Result<Vec<u8>, ConfigDriveError> {
    let meta = file.metadata().map_err(|source| ConfigDriveError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ConfigDriveError::NotAFile(path.to_owned()));
    }
    let mut bytes = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    (&mut file)
        .take(cap)
        .read_to_end(&mut bytes)
        .map_err(|source| ConfigDriveError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() > limit {
        return Err(ConfigDriveError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(bytes)
}

/// Reads the metadata from a file (`[metadata] path`), at most `limit` bytes.
pub fn read_file(path: &Path, limit: usize) -> Result<Vec<u8>, ConfigDriveError> {
    let shown = path.display().to_string();
    let file =
        open_nonblocking(path, OFlags::empty()).map_err(|source| ConfigDriveError::Read {
            path: shown.clone(),
            source,
        })?;
    read_bounded(file, &shown, limit)
}

/// Opens `path` read-only without blocking (a FIFO or a device without a medium cannot stall
/// the open; reads of a regular file or a block device are not affected).
fn open_nonblocking(path: &Path, extra: OFlags) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY | extra;
    Ok(File::from(rustix::fs::open(path, flags, Mode::empty())?))
}

/// Opens `relative` (plain names joined by `/`) beneath the directory `dir`, one component at
/// a time, following no symbolic link (`O_NOFOLLOW` on each, `O_DIRECTORY` on each directory)
/// and without blocking. Nothing is mounted beneath a fresh private mount point, so this stays
/// on the drive; unlike `openat2`, it works on every kernel a guest may run.
fn open_beneath(dir: &Path, relative: &str) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let mut at = rustix::fs::open(dir, flags | OFlags::DIRECTORY, Mode::empty())?;
    let mut parts = relative.split('/').peekable();
    while let Some(part) = parts.next() {
        let kind = if parts.peek().is_some() {
            OFlags::DIRECTORY
        } else {
            OFlags::NONBLOCK | OFlags::NOCTTY
        };
        at = openat(&at, part, flags | kind, Mode::empty())?;
    }
    Ok(File::from(at))
}

/// A directory only this process uses (mode 0700, a random name, so no other user of a shared
/// `/tmp` can take or foresee it), removed on drop when empty.
struct MountPoint(PathBuf);

impl MountPoint {
    fn new(parent: &Path) -> Result<MountPoint, ConfigDriveError> {
        let mut attempt = 0;
        loop {
            let dir = parent.join(format!(
                "vfmap-config-drive.{}.{:016x}",
                std::process::id(),
                RandomState::new().hash_one(attempt)
            ));
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(MountPoint(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
                Err(source) => {
                    return Err(ConfigDriveError::MountPoint {
                        dir: parent.to_owned(),
                        source,
                    });
                }
            }
        }
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// A mounted drive, unmounted on drop (detached if busy); a failure is said on stderr, with
/// the command that undoes it.
struct Mounted<'p>(&'p Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if unmount(self.0, UnmountFlags::empty()).is_err()
            && let Err(e) = unmount(self.0, UnmountFlags::DETACH)
        {
            let dir = self.0.display();
            eprintln!(
                "vfmap-agent: cannot unmount the config drive from {dir}: {e}; run umount -l {dir}"
            );
        }
    }
}

/// Mounts `drive` read-only on a private directory under `tmp`, reads
/// [`METADATA_PATH`] (at most `limit` bytes) without following symbolic links, and unmounts.
pub fn read_drive(
    drive: &ConfigDrive,
    tmp: &Path,
    loader: &dyn ModuleLoader,
    limit: usize,
) -> Result<Vec<u8>, ConfigDriveError> {
    let point = MountPoint::new(tmp)?;
    let fs = drive.filesystem.mount_type();
    let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let try_mount = || mount(&drive.node, &point.0, fs, flags, None);
    let mounted = match try_mount() {
        Err(Errno::NODEV) => {
            let module = drive.filesystem.module();
            let name = DriverName::new(module).expect("a plain module name");
            loader
                .load(&name)
                .map_err(|reason| ConfigDriveError::Module { fs, module, reason })?;
            try_mount()
        }
        other => other,
    };
    mounted.map_err(|e| ConfigDriveError::Mount {
        node: drive.node.clone(),
        fs,
        source: e.into(),
    })?;
    let _mounted = Mounted(&point.0);
    let shown = format!("{}:/{METADATA_PATH}", drive.node.display());
    let file = open_beneath(&point.0, METADATA_PATH).map_err(|source| ConfigDriveError::Read {
        path: shown.clone(),
        source,
    })?;
    read_bounded(file, &shown, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ISO 9660 image's first 34 KiB with a primary volume descriptor labelled `label`.
    pub(crate) fn iso_image(label: &str) -> Vec<u8> {
        let mut image = vec![0u8; ISO9660_PVD_OFFSET as usize + 2048];
        let pvd = &mut image[ISO9660_PVD_OFFSET as usize..];
        pvd[..7].copy_from_slice(b"\x01CD001\x01");
        pvd[40..72].fill(b' ');
        pvd[40..40 + label.len()].copy_from_slice(label.as_bytes());
        image
    }

    /// A FAT16 (or FAT32) boot sector labelled `label`.
    pub(crate) fn fat_boot_sector(label: &str, fat32: bool) -> Vec<u8> {
        let mut boot = vec![0u8; 512];
        boot[11..13].copy_from_slice(&512u16.to_le_bytes());
        let (signature, at, kind, name): (usize, usize, usize, &[u8]) = if fat32 {
            (66, 71, 82, b"FAT32   ")
        } else {
            boot[22] = 8; // sectors per FAT: not FAT32
            (38, 43, 54, b"FAT16   ")
        };
        boot[signature] = 0x29;
        boot[at..at + 11].fill(b' ');
        boot[at..at + label.len()].copy_from_slice(label.as_bytes());
        boot[kind..kind + 8].copy_from_slice(name);
        boot[510] = 0x55;
        boot[511] = 0xaa;
        boot
    }

    #[test]
    fn iso9660_labels() {
        let image = iso_image("config-2");
        let pvd = &image[ISO9660_PVD_OFFSET as usize..];
        assert_eq!(iso9660_label(pvd).as_deref(), Some("config-2"));
        let mut other = pvd.to_vec();
        other[1] = b'X';
        assert_eq!(iso9660_label(&other), None);
        assert_eq!(iso9660_label(&pvd[..20]), None);
        assert_eq!(iso9660_label(&[]), None);
        let image = iso_image("");
        assert_eq!(iso9660_label(&image[ISO9660_PVD_OFFSET as usize..]), None);
    }

    #[test]
    fn vfat_labels() {
        assert_eq!(
            vfat_label(&fat_boot_sector("config-2", false)).as_deref(),
            Some("config-2")
        );
        assert_eq!(
            vfat_label(&fat_boot_sector("CONFIG-2", true)).as_deref(),
            Some("CONFIG-2")
        );
        assert_eq!(vfat_label(&fat_boot_sector("NO NAME", false)), None);
        let mut no_signature = fat_boot_sector("config-2", false);
        no_signature[510] = 0;
        assert_eq!(vfat_label(&no_signature), None);
        let mut not_fat = fat_boot_sector("config-2", false);
        not_fat[54..62].copy_from_slice(b"NTFS    ");
        assert_eq!(vfat_label(&not_fat), None);
        assert_eq!(vfat_label(&[0u8; 100]), None);
    }

    #[test]
    fn find_scans_class_block_and_reads_each_node() {
        let dir = tempfile::tempdir().unwrap();
        let (sys, dev) = (dir.path().join("sys"), dir.path().join("dev"));
        fs::create_dir_all(sys.join("class/block")).unwrap();
        fs::create_dir_all(&dev).unwrap();
        let add = |name: &str, image: Option<Vec<u8>>| {
            fs::create_dir_all(sys.join("class/block").join(name)).unwrap();
            if let Some(image) = image {
                fs::write(dev.join(name), image).unwrap();
            }
        };
        add("vda", Some(vec![0u8; 40_000]));
        add("vda1", Some(iso_image("other")));
        add("sr0", Some(iso_image("config-2")));
        add("vdb", Some(fat_boot_sector("CONFIG-2", false)));
        add("vdc", None); // no node
        add("vdd", Some(vec![1, 2, 3])); // too small for either
        let found = find(&sys, &dev);
        assert_eq!(
            found,
            [
                ConfigDrive {
                    name: "sr0".into(),
                    node: dev.join("sr0"),
                    filesystem: Filesystem::Iso9660
                },
                ConfigDrive {
                    name: "vdb".into(),
                    node: dev.join("vdb"),
                    filesystem: Filesystem::Vfat
                },
            ]
        );
        assert!(find(&dir.path().join("nothing"), &dev).is_empty());
    }

    /// Images made by the tools orchestrators use, when installed (scripts/install-deps
    /// installs them): Nova and KubeVirt run genisoimage, Nova's vfat drives mkfs.vfat.
    #[test]
    fn labels_of_images_made_by_real_tools() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("content/openstack/latest");
        fs::create_dir_all(&content).unwrap();
        fs::write(content.join("meta_data.json"), "{}").unwrap();
        let iso = dir.path().join("config.iso");
        let made = std::process::Command::new("genisoimage")
            .args(["-quiet", "-J", "-r", "-V", "config-2", "-o"])
            .arg(&iso)
            .arg(dir.path().join("content"))
            .status();
        match made {
            Ok(status) => {
                assert!(status.success());
                assert_eq!(
                    read_label(&iso).unwrap(),
                    Some((Filesystem::Iso9660, "config-2".into()))
                );
            }
            Err(e) => eprintln!("skipped genisoimage image: {e}"),
        }
        for (size_kib, fat) in [("1440", "12"), ("40000", "32")] {
            let img = dir.path().join(format!("config-{fat}.img"));
            let made = std::process::Command::new("mkfs.vfat")
                .args(["-F", fat, "-n", "config-2", "-C"])
                .arg(&img)
                .arg(size_kib)
                .output();
            match made {
                Ok(out) => {
                    assert!(out.status.success(), "{out:?}");
                    assert_eq!(
                        read_label(&img).unwrap(),
                        Some((Filesystem::Vfat, "config-2".into())),
                        "FAT{fat}"
                    );
                }
                Err(e) => eprintln!("skipped mkfs.vfat image: {e}"),
            }
        }
    }

    /// A FIFO where a file or a device is expected: nothing may block on it.
    fn fifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }

    #[test]
    fn the_metadata_is_opened_beneath_without_links_or_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let (drive, outside) = (dir.path().join("drive"), dir.path().join("outside"));
        fs::create_dir_all(drive.join("openstack/latest")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("meta_data.json"), "{}").unwrap();
        let meta = drive.join(METADATA_PATH);
        let opened = || open_beneath(&drive, METADATA_PATH).map(|f| read_bounded(f, "m", 10));

        fs::write(&meta, "{}").unwrap();
        assert_eq!(opened().unwrap().unwrap(), b"{}");
        // The file a symbolic link.
        fs::remove_file(&meta).unwrap();
        std::os::unix::fs::symlink(outside.join("meta_data.json"), &meta).unwrap();
        assert_eq!(
            opened().unwrap_err().raw_os_error(),
            Some(Errno::LOOP.raw_os_error())
        );
        // A directory on the way a symbolic link.
        fs::remove_dir_all(drive.join("openstack")).unwrap();
        fs::create_dir_all(drive.join("openstack")).unwrap();
        std::os::unix::fs::symlink(&outside, drive.join("openstack/latest")).unwrap();
        assert!(opened().is_err());
        // A FIFO: opened without blocking, then refused as not a regular file.
        fs::remove_file(drive.join("openstack/latest")).unwrap();
        fs::create_dir_all(drive.join("openstack/latest")).unwrap();
        fifo(&meta);
        assert!(matches!(
            opened().unwrap(),
            Err(ConfigDriveError::NotAFile(_))
        ));
        assert!(matches!(
            read_file(&meta, 10),
            Err(ConfigDriveError::NotAFile(_))
        ));
        // Label probing skips it.
        assert_eq!(read_label(&meta).unwrap(), None);
    }

    #[test]
    fn mount_points_are_private_and_unforeseeable() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            MountPoint::new(dir.path()).unwrap(),
            MountPoint::new(dir.path()).unwrap(),
        );
        assert_ne!(a.0, b.0);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&a.0).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let kept = a.0.clone();
        drop(a);
        assert!(!kept.exists(), "removed on drop");
        let err = MountPoint::new(&dir.path().join("none")).err().unwrap();
        assert!(err.to_string().contains("set TMPDIR"), "{err}");
    }

    #[test]
    fn read_file_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta_data.json");
        fs::write(&path, b"{}").unwrap();
        assert_eq!(read_file(&path, 2).unwrap(), b"{}");
        assert!(matches!(
            read_file(&path, 1),
            Err(ConfigDriveError::TooLarge { limit: 1, .. })
        ));
        assert!(matches!(
            read_file(dir.path(), 10),
            Err(ConfigDriveError::NotAFile(_))
        ));
        assert!(matches!(
            read_file(&dir.path().join("none"), 10),
            Err(ConfigDriveError::Read { .. })
        ));
    }
}
