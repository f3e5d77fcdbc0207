//! Discovery: SR-IOV PFs and their VFs, read from `<root>/bus/pci/devices`.

mod bound;
mod read;
mod reader;

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::CWD;

use vfmap_core::{Bdf, HostFacts, PciId, PfFacts, Problem, VfFacts};

use crate::SysfsError;
use bound::BoundDrivers;
use read::{Link, list_dir, open_dir, open_path_dir, read_attr_at, read_link_name};
use reader::{Base, DeviceReader, io_problem, problem};

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

    /// Caps discovery's threads (default and upper bound: one per core, at most 8). Each
    /// thread's allocator arena keeps some memory after the scan, so a long-running daemon
    /// uses a few.
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

        // Phase 1, in name order: which entries are SR-IOV PFs. A VF's routing ID is its PF's
        // plus a positive offset, so its name sorts after its PF's, and the PF's
        // `sriov_offset`/`sriov_stride`/`sriov_numvfs` say where it is: such names are not
        // probed (the probe is most of the lookups on a host full of VFs). That is only a
        // hint: the `virtfnN` links, read in phase 2, say what the VFs are, and a skipped name
        // that no link names is probed after all.
        let mut problems = Vec::new();
        let mut found = Vec::new();
        let mut expected_vfs = HashSet::new();
        let mut skipped = Vec::new();
        for name in &names {
            let name = name.to_string_lossy();
            if let Ok(location) = name.parse::<Bdf>()
                && expected_vfs.contains(&location)
            {
                skipped.push(location);
                continue;
            }
            if let Some(pf) = find_pf(&devices_fd, &name, &mut problems) {
                expected_vfs.extend(pf.expected_vfs());
                found.push(pf);
            }
        }

        // Phase 2: each PF's VF links and everyone's attributes, one PF at a time per thread.
        let bound = BoundDrivers::read(&self.root);
        let mut pfs = read_pfs(&found, bound.as_ref(), self.threads);
        let named: HashSet<Bdf> = pfs
            .iter()
            .flat_map(|(pf, _)| pf.vfs.iter().map(|vf| vf.location))
            .collect();
        let late: Vec<FoundPf> = skipped
            .into_iter()
            .filter(|location| !named.contains(location))
            .filter_map(|location| find_pf(&devices_fd, &location.text(), &mut problems))
            .collect();
        if !late.is_empty() {
            pfs.extend(read_pfs(&late, bound.as_ref(), self.threads));
            pfs.sort_by_key(|(pf, _)| pf.location);
        }
        let mut facts = HostFacts {
            pfs: Vec::with_capacity(pfs.len()),
            problems,
        };
        for (pf, mut pf_problems) in pfs {
            facts.problems.append(&mut pf_problems);
            facts.pfs.push(pf);
        }
        Ok(facts)
    }
}

/// Reads each PF (its VF links, then its and its VFs' attributes), spread over the cores.
fn read_pfs(
    found: &[FoundPf],
    bound: Option<&BoundDrivers>,
    threads: Option<usize>,
) -> Vec<(PfFacts, Vec<Problem>)> {
    parallel_map(found, threads, |pf, problems| {
        let name = pf.location.text();
        let vfs = read_vf_links(&pf.dir, &name, problems);
        let reader = DeviceReader::new(Base::Dir(&pf.dir), &name, problems);
        read_pf(pf, &vfs, bound, reader)
    })
}

/// A PF found by phase 1, with its open directory and where its enabled VFs should be.
struct FoundPf {
    location: Bdf,
    total_vfs: u16,
    dir: OwnedFd,
    /// `sriov_offset`, `sriov_stride` and `sriov_numvfs`, when all three read well.
    layout: Option<(u16, u16, u16)>,
}

impl FoundPf {
    /// Where the kernel puts the enabled VFs (empty without the layout).
    fn expected_vfs(&self) -> impl Iterator<Item = Bdf> + '_ {
        self.layout
            .into_iter()
            .flat_map(move |(offset, stride, count)| {
                (0..count).filter_map(move |index| self.location.vf_location(offset, stride, index))
            })
    }
}

/// Device `name` when it is an SR-IOV PF, with its directory open; problems otherwise only
/// when something about it is odd.
fn find_pf(devices: &OwnedFd, name: &str, problems: &mut Vec<Problem>) -> Option<FoundPf> {
    let (location, total_vfs) = probe_pf(devices, name, problems)?;
    let dir = match open_dir(devices, name) {
        Ok(dir) => dir,
        Err(e) => {
            problems.push(io_problem(name, ".", "cannot open the device directory", e));
            return None;
        }
    };
    // Only a hint (see `discover`): anything odd here is reported by the reads that count.
    let number = |attribute: &str| {
        read_attr_at(dir.as_fd(), attribute, |text| text.parse::<u16>().ok())
            .ok()
            .flatten()
            .flatten()
    };
    let layout = number("sriov_offset")
        .zip(number("sriov_stride"))
        .zip(number("sriov_numvfs"))
        .map(|((offset, stride), count)| (offset, stride, count));
    Some(FoundPf {
        location,
        total_vfs,
        dir,
        layout,
    })
}

/// `Some((location, sriov_totalvfs))` when device `name` is an SR-IOV PF: one failed open for
/// most other devices.
fn probe_pf(devices: &OwnedFd, name: &str, problems: &mut Vec<Problem>) -> Option<(Bdf, u16)> {
    let attribute = format!("{name}/sriov_totalvfs");
    let text = match read_attr_at(devices.as_fd(), &attribute, str::to_owned) {
        Ok(text) => text?,
        Err(e) => {
            problems.push(io_problem(name, "sriov_totalvfs", "cannot read", e));
            return None;
        }
    };
    let Ok(total_vfs) = text.parse::<u16>() else {
        problems.push(problem(
            name,
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
            name,
            "name",
            "the directory name is not a PCI address".into(),
        ));
        return None;
    };
    Some((location, total_vfs))
}

/// A VF named by its PF's `virtfnN` link.
struct VfLink {
    index: u16,
    location: Bdf,
    /// The link's target is `../<location>`, the kernel's layout (a VF's directory is its
    /// PF's sibling, even on another bus number): the VF's attributes are then read as
    /// `<location>/<attribute>` under the PF's parent, not through the link or the
    /// `bus/pci/devices` link (seven path components on a real `/sys`), which was the
    /// costliest lookup per VF.
    sibling: bool,
}

/// The PF's VFs from its `virtfnN` links, in index order; a link that is not one becomes a
/// problem.
fn read_vf_links(pf_dir: &OwnedFd, name: &str, problems: &mut Vec<Problem>) -> Vec<VfLink> {
    let mut reader = DeviceReader::new(Base::Dir(pf_dir), name, problems);
    let mut indexes = Vec::new();
    match list_dir(pf_dir) {
        Ok(names) => {
            for name in names {
                let Some(number) = name.strip_prefix("virtfn") else {
                    continue;
                };
                match number.parse::<u16>() {
                    Ok(index) => indexes.push(index),
                    Err(_) => reader.problem(&name, "not a VF number".into()),
                }
            }
        }
        Err(e) => reader.io_problem(".", "cannot list the PF's directory", e),
    }
    indexes.sort_unstable();
    let mut vfs = Vec::with_capacity(indexes.len());
    for index in indexes {
        let link = format!("virtfn{index}");
        let Some(Link { name, sibling }) = reader.link(&link) else {
            continue;
        };
        match name.parse::<Bdf>() {
            Ok(location) => vfs.push(VfLink {
                index,
                location,
                sibling,
            }),
            Err(_) => reader.problem(
                &link,
                format!("points to {name:?}, which is not a PCI address"),
            ),
        }
    }
    vfs
}

/// Maps `f` over `items` on up to as many threads as there are cores (and items), handing out
/// items one at a time (PFs differ a lot in VF count).
/// Results come back in `items` order, each with the problems its call recorded.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    max_threads: Option<usize>,
    f: impl Fn(&T, &mut Vec<Problem>) -> R + Sync,
) -> Vec<(R, Vec<Problem>)> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(max_threads.unwrap_or(usize::MAX))
        .min(items.len())
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
    found: &FoundPf,
    vf_links: &[VfLink],
    bound: Option<&BoundDrivers>,
    mut reader: DeviceReader<'_>,
) -> PfFacts {
    let vendor = reader.attr::<PciId>("vendor");
    let device = reader.attr::<PciId>("device");
    let numa_node = reader.numa_node();
    let driver = reader.driver(bound, found.location);
    let num_vfs = reader.attr::<u16>("sriov_numvfs");
    // Kernels before 4.15 have no `sriov_vf_device`: then the VFs' own `device` says it.
    let mut vf_device = reader.optional_attr::<PciId>("sriov_vf_device");
    let drivers_autoprobe = reader.attr::<u8>("sriov_drivers_autoprobe").map(|v| v != 0);

    let mut vfs = Vec::with_capacity(vf_links.len());
    let mut own_ids: Vec<(PciId, Bdf)> = Vec::new();
    // The PF's parent directory, opened for the first VF that is its sibling.
    let mut parent: Option<Option<OwnedFd>> = None;
    for &VfLink {
        index,
        location: vf_location,
        sibling,
    } in vf_links
    {
        let name = vf_location.text();
        // A sibling VF is read under the parent, when its `numa_node` is there (nearly always;
        // else its directory is opened to tell a missing attribute from a missing VF).
        let mut under_parent = None;
        if sibling
            && let Some(parent) = parent
                .get_or_insert_with(|| open_path_dir(&found.dir, "..").ok())
                .as_ref()
        {
            let mut under = DeviceReader::new(Base::Parent(parent), &name, reader.problems);
            under_parent = under.numa_node_if_there().map(|node| (parent, node));
        }
        let vf_dir: OwnedFd;
        let (base, numa_node) = match under_parent {
            Some((parent, node)) => (Base::Parent(parent), Some(node)),
            None => match open_path_dir(&found.dir, format!("virtfn{index}")) {
                Ok(fd) => {
                    vf_dir = fd;
                    (Base::Dir(&vf_dir), None)
                }
                Err(e) => {
                    reader.io_problem(
                        &format!("virtfn{index}"),
                        &format!("points to {}, whose directory cannot be opened", &*name),
                        e,
                    );
                    continue;
                }
            },
        };
        let mut vf_reader = DeviceReader::new(base, &name, reader.problems);
        let numa_node = numa_node.unwrap_or_else(|| vf_reader.numa_node());
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
            numa_node,
            iommu_group: vf_reader.link_name("iommu_group").and_then(|group| {
                group.parse::<u32>().ok().or_else(|| {
                    vf_reader.problem("iommu_group", format!("{group:?} is not a group number"));
                    None
                })
            }),
            driver: vf_reader.driver(bound, vf_location),
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
        location: found.location,
        vendor,
        device,
        numa_node,
        driver,
        total_vfs: Some(found.total_vfs),
        num_vfs,
        vf_device,
        drivers_autoprobe,
        vfs,
    }
}
