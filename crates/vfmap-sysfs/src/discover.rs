//! Discovery: SR-IOV PFs and their VFs, read from `<root>/bus/pci/devices`.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::{CWD, Mode, OFlags, openat, readlinkat};
use rustix::io::Errno;

use vfmap_core::{Bdf, HostFacts, PciId, PfFacts, Problem, VfFacts};

use crate::SysfsError;

/// A sysfs tree: the real `/sys` or a copy or fixture under another directory.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
    threads: Option<usize>,
}

impl Sysfs {
    /// A sysfs tree rooted at `root` (normally `/sys`).
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs {
            root: root.into(),
            threads: None,
        }
    }

    /// Caps discovery's threads (default: one per core). A long-running daemon uses 1: per-thread
    /// allocator arenas would keep memory long after a parallel scan.
    pub fn with_threads(mut self, threads: usize) -> Sysfs {
        self.threads = Some(threads.max(1));
        self
    }

    /// The root given to [`Sysfs::new`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/bus/pci/devices`.
    pub fn pci_devices(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    /// `<root>/bus/pci/devices/<bdf>`.
    pub fn device_dir(&self, bdf: Bdf) -> PathBuf {
        self.pci_devices().join(bdf.to_string())
    }

    /// `<root>/bus/pci/drivers/<driver>`.
    pub fn driver_dir(&self, driver: &str) -> PathBuf {
        self.root.join("bus/pci/drivers").join(driver)
    }

    /// `<root>/bus/pci/drivers_probe`.
    pub fn drivers_probe(&self) -> PathBuf {
        self.root.join("bus/pci/drivers_probe")
    }

    /// The driver bound to `bdf` now, from its `driver` link.
    pub fn driver_of(&self, bdf: Bdf) -> io::Result<Option<String>> {
        read_link_name(&self.device_dir(bdf).join("driver"))
    }

    /// Finds every SR-IOV capable PF (`sriov_totalvfs` > 0) and its enabled VFs.
    ///
    /// Only a missing `bus/pci/devices` is an error; anything odd about one device becomes a
    /// [`Problem`] for that device. Work is spread over the available cores (sysfs reads are
    /// syscall-bound); the result does not depend on how it was spread.
    pub fn discover(&self) -> Result<HostFacts, SysfsError> {
        let devices = self.pci_devices();
        let list_error = |source: io::Error| SysfsError::ListDevices {
            path: devices.clone(),
            source,
        };
        let devices_fd = open_dir(CWD, &devices).map_err(list_error)?;
        let mut names = Vec::new();
        for entry in fs::read_dir(&devices).map_err(list_error)? {
            names.push(entry.map_err(list_error)?.file_name());
        }
        names.sort();

        // Phase 1: which entries are SR-IOV PFs: one failed open for most devices.
        let probes = parallel_map(&names, 256, self.threads, |name, problems| {
            let name = name.to_string_lossy();
            let attribute = format!("{name}/sriov_totalvfs");
            let text = match read_attr_at(&devices_fd, &attribute) {
                Ok(text) => text?,
                Err(e) => {
                    problems.push(io_problem(&name, "sriov_totalvfs", "cannot read", e));
                    return None;
                }
            };
            let Ok(total_vfs) = text.parse::<u16>() else {
                problems.push(problem(
                    &name,
                    "sriov_totalvfs",
                    format!("malformed value {text:?}"),
                ));
                return None;
            };
            if total_vfs == 0 {
                return None;
            }
            let Ok(location) = name.parse::<Bdf>() else {
                problems.push(problem(
                    &name,
                    "name",
                    "the directory name is not a PCI address".into(),
                ));
                return None;
            };
            Some((location, total_vfs))
        });
        let mut problems = Vec::new();
        let mut pfs_found = Vec::new();
        for (found, mut found_problems) in probes {
            problems.append(&mut found_problems);
            pfs_found.extend(found);
        }

        // Phase 2: each PF and its VFs, one PF at a time per thread.
        let pfs = parallel_map(
            &pfs_found,
            1,
            self.threads,
            |(location, total_vfs), problems| {
                let name = location.to_string();
                match open_dir(&devices_fd, name.as_str()) {
                    Ok(dir) => {
                        let reader = DeviceReader::new(dir, &name, problems);
                        Some(read_pf(&devices_fd, *location, *total_vfs, reader))
                    }
                    Err(e) => {
                        problems.push(io_problem(
                            &name,
                            ".",
                            "cannot open the device directory",
                            e,
                        ));
                        None
                    }
                }
            },
        );
        let mut facts = HostFacts {
            pfs: Vec::with_capacity(pfs.len()),
            problems,
        };
        for (pf, mut pf_problems) in pfs {
            facts.problems.append(&mut pf_problems);
            facts.pfs.extend(pf);
        }
        Ok(facts)
    }
}

/// Maps `f` over `items` on up to as many threads as there are cores (at most one thread per
/// `per_thread` items), handing out items one at a time (PFs differ a lot in VF count).
/// Results come back in `items` order, each with the problems its call recorded.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    per_thread: usize,
    max_threads: Option<usize>,
    f: impl Fn(&T, &mut Vec<Problem>) -> R + Sync,
) -> Vec<(R, Vec<Problem>)> {
    let threads = max_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .min(items.len().div_ceil(per_thread.max(1)))
        .min(8);
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break done };
            let mut problems = Vec::new();
            let result = f(item, &mut problems);
            done.push((i, result, problems));
        }
    };
    let mut all: Vec<(usize, R, Vec<Problem>)> = if threads <= 1 {
        work()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        })
    };
    all.sort_by_key(|(i, _, _)| *i);
    all.into_iter().map(|(_, r, p)| (r, p)).collect()
}

fn read_pf(
    devices: &OwnedFd,
    location: Bdf,
    total_vfs: u16,
    mut reader: DeviceReader<'_>,
) -> PfFacts {
    let vendor = reader.attr::<PciId>("vendor");
    let device = reader.attr::<PciId>("device");
    let numa_node = reader.numa_node();
    let driver = reader.link_name("driver");
    let num_vfs = reader.attr::<u16>("sriov_numvfs");
    // Kernels before 4.15 have no `sriov_vf_device`: then the VFs' own `device` says it.
    let mut vf_device = reader.optional_attr::<PciId>("sriov_vf_device");
    let drivers_autoprobe = reader.attr::<u8>("sriov_drivers_autoprobe").map(|v| v != 0);

    let mut links = Vec::new();
    match list_dir(&reader.dir) {
        Ok(names) => {
            for name in names {
                let Some(number) = name.strip_prefix("virtfn") else {
                    continue;
                };
                match number.parse::<u16>() {
                    Ok(index) => links.push(index),
                    Err(_) => reader.problem(&name, "not a VF number".into()),
                }
            }
        }
        Err(e) => reader.io_problem(".", "cannot list the PF's directory", e),
    }
    links.sort_unstable();

    let mut vfs = Vec::with_capacity(links.len());
    let mut own_ids: Vec<(PciId, Bdf)> = Vec::new();
    for index in links {
        let link = format!("virtfn{index}");
        let Some(name) = reader.link_name(&link) else {
            continue;
        };
        let Ok(vf_location) = name.parse::<Bdf>() else {
            reader.problem(
                &link,
                format!("points to {name:?}, which is not a PCI address"),
            );
            continue;
        };
        let vf_dir = match open_dir(devices, name.as_str()) {
            Ok(fd) => fd,
            Err(e) => {
                reader.io_problem(
                    &link,
                    &format!("points to {name}, whose directory cannot be opened"),
                    e,
                );
                continue;
            }
        };
        let mut vf_reader = DeviceReader::new(vf_dir, &name, reader.problems);
        if vf_device.is_none() {
            let own = vf_reader
                .text_or("device", || {
                    "missing, and its PF has no readable sriov_vf_device: the VF's device ID \
                     is unknown"
                        .to_owned()
                })
                .and_then(|text| vf_reader.parse::<PciId>("device", text));
            own_ids.extend(own.map(|id| (id, vf_location)));
        }
        vfs.push(VfFacts {
            location: vf_location,
            vf_index: index,
            numa_node: vf_reader.numa_node(),
            iommu_group: vf_reader.link_name("iommu_group").and_then(|group| {
                group.parse::<u32>().ok().or_else(|| {
                    vf_reader.problem("iommu_group", format!("{group:?} is not a group number"));
                    None
                })
            }),
            driver: vf_reader.link_name("driver"),
            driver_override: vf_reader.driver_override(),
        });
    }
    if vf_device.is_none() {
        vf_device = own_ids.first().map(|(id, _)| *id);
        if let Some((other, at)) = own_ids.iter().find(|(id, _)| Some(*id) != vf_device) {
            let (first, first_at) = own_ids[0];
            reader.problem(
                "sriov_vf_device",
                format!(
                    "absent or unreadable, and the VFs' own device IDs differ ({first_at} says \
                     {first}, {at} says {other}): the VFs' device ID is unknown"
                ),
            );
            vf_device = None;
        }
    }
    if let Some(n) = num_vfs
        && usize::from(n) != vfs.len()
    {
        reader.problem(
            "sriov_numvfs",
            format!(
                "says {n} VFs, but {} virtfn links resolve to VFs",
                vfs.len()
            ),
        );
    }
    PfFacts {
        location,
        vendor,
        device,
        numa_node,
        driver,
        total_vfs: Some(total_vfs),
        num_vfs,
        vf_device,
        drivers_autoprobe,
        vfs,
    }
}

/// Reads one device's attributes relative to its open directory (no path walk per read),
/// turning every failure into a problem for that device.
struct DeviceReader<'a> {
    dir: OwnedFd,
    name: &'a str,
    problems: &'a mut Vec<Problem>,
}

fn problem(device: &str, attribute: &str, message: String) -> Problem {
    Problem::new(device, attribute, message)
}

/// A failed read or open: `what` and the OS's reason, marked when it is a permission refusal.
fn io_problem(device: &str, attribute: &str, what: &str, error: io::Error) -> Problem {
    let problem = problem(device, attribute, format!("{what}: {error}"));
    if error.kind() == io::ErrorKind::PermissionDenied {
        problem.denied()
    } else {
        problem
    }
}

/// What an absent attribute that vfmap needs costs, and which kernels lack it.
fn missing_message(attribute: &str) -> String {
    let why = match attribute {
        "vendor" | "device" => "the device's ID is unknown, so no card can match it",
        "numa_node" => {
            "the NUMA node is unknown (a kernel built without CONFIG_NUMA has no numa_node)"
        }
        "sriov_numvfs" => "how many VFs are enabled is unknown",
        "sriov_drivers_autoprobe" => {
            "`vfmap prepare` cannot keep host drivers off new VFs (kernels before 4.12 lack it)"
        }
        "driver_override" => {
            "`vfmap prepare` cannot bind this VF to its host driver (kernels before 3.16 lack it)"
        }
        _ => return "missing".to_owned(),
    };
    format!("missing: {why}")
}

impl<'a> DeviceReader<'a> {
    fn new(dir: OwnedFd, name: &'a str, problems: &'a mut Vec<Problem>) -> DeviceReader<'a> {
        DeviceReader {
            dir,
            name,
            problems,
        }
    }

    fn problem(&mut self, attribute: &str, message: String) {
        self.problems.push(problem(self.name, attribute, message));
    }

    fn io_problem(&mut self, attribute: &str, what: &str, error: io::Error) {
        self.problems
            .push(io_problem(self.name, attribute, what, error));
    }

    /// The attribute's trimmed text; `None` (silently) when it does not exist, `None` plus a
    /// problem when it cannot be read.
    fn optional_text(&mut self, attribute: &str) -> Option<String> {
        match read_attr_at(&self.dir, attribute) {
            Ok(text) => text,
            Err(e) => {
                self.io_problem(attribute, "cannot read", e);
                None
            }
        }
    }

    /// An attribute vfmap needs: `None` plus a problem when it is missing or unreadable.
    fn text(&mut self, attribute: &str) -> Option<String> {
        self.text_or(attribute, || missing_message(attribute))
    }

    /// Like [`DeviceReader::text`], with `missing` saying what its absence costs.
    fn text_or(&mut self, attribute: &str, missing: impl FnOnce() -> String) -> Option<String> {
        match read_attr_at(&self.dir, attribute) {
            Ok(Some(text)) => Some(text),
            Ok(None) => {
                self.problem(attribute, missing());
                None
            }
            Err(e) => {
                self.io_problem(attribute, "cannot read", e);
                None
            }
        }
    }

    fn parse<T: FromStr>(&mut self, attribute: &str, text: String) -> Option<T> {
        text.parse().ok().or_else(|| {
            self.problem(attribute, format!("malformed value {text:?}"));
            None
        })
    }

    /// A parsed attribute vfmap needs: `None` plus a problem when missing, unreadable or
    /// malformed.
    fn attr<T: FromStr>(&mut self, attribute: &str) -> Option<T> {
        let text = self.text(attribute)?;
        self.parse(attribute, text)
    }

    /// A parsed attribute some kernels lack: a missing one is `None` without a problem.
    fn optional_attr<T: FromStr>(&mut self, attribute: &str) -> Option<T> {
        let text = self.optional_text(attribute)?;
        self.parse(attribute, text)
    }

    fn numa_node(&mut self) -> Option<i32> {
        self.attr::<i32>("numa_node").filter(|&node| node >= 0)
    }

    fn driver_override(&mut self) -> Option<String> {
        self.text("driver_override")
            .filter(|v| !v.is_empty() && v != "(null)")
    }

    /// The last component of a symlink's target; `None` when absent.
    fn link_name(&mut self, link: &str) -> Option<String> {
        match read_link_name_at(&self.dir, link) {
            Ok(name) => name,
            Err(e) => {
                self.io_problem(link, "cannot read the link", e);
                None
            }
        }
    }
}

fn open_dir(base: impl AsFd, path: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    Ok(openat(
        base,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The names in a directory (without `.` and `..`).
fn list_dir(dir: &OwnedFd) -> io::Result<Vec<String>> {
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
fn read_attr_at(dir: &OwnedFd, attribute: &str) -> io::Result<Option<String>> {
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
    // Twice a page: a sysfs attribute never fills it, so a full buffer means "not one".
    let mut buf = [0u8; 8192];
    let len = rustix::io::read(&fd, &mut buf)?;
    if len == buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "longer than a sysfs attribute",
        ));
    }
    Ok(Some(String::from_utf8_lossy(&buf[..len]).trim().to_owned()))
}

/// The file name a symlink points to: `Ok(None)` when the link does not exist.
fn read_link_name_at(dir: impl AsFd, link: impl rustix::path::Arg) -> io::Result<Option<String>> {
    match readlinkat(dir, link, Vec::new()) {
        Ok(target) => {
            let target = PathBuf::from(OsString::from_vec(target.into_bytes()));
            target
                .file_name()
                .map(|n| Some(n.to_string_lossy().into_owned()))
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("target {} has no file name", target.display()),
                    )
                })
        }
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The file name a symlink points to: `Ok(None)` when the link does not exist.
fn read_link_name(path: &Path) -> io::Result<Option<String>> {
    read_link_name_at(CWD, path)
}
