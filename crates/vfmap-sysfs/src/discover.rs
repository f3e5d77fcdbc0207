//! Discovery: SR-IOV PFs and their VFs, read from `<root>/bus/pci/devices`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use vfmap_core::{Bdf, HostFacts, PciId, PfFacts, Problem, VfFacts};

use crate::SysfsError;

/// A sysfs tree: the real `/sys` or a copy or fixture under another directory.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    /// A sysfs tree rooted at `root` (normally `/sys`).
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
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
    /// [`Problem`] for that device.
    pub fn discover(&self) -> Result<HostFacts, SysfsError> {
        let devices = self.pci_devices();
        let entries = fs::read_dir(&devices).map_err(|source| SysfsError::ListDevices {
            path: devices.clone(),
            source,
        })?;
        let mut facts = HostFacts::default();
        for entry in entries {
            let entry = entry.map_err(|source| SysfsError::ListDevices {
                path: devices.clone(),
                source,
            })?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let dir = entry.path();
            let mut reader = DeviceReader::new(&dir, &name, &mut facts.problems);
            // Most devices are not PFs: find that out with one failed open.
            let Some(total_vfs) = reader.attr::<u16>("sriov_totalvfs") else {
                continue;
            };
            if total_vfs == 0 {
                continue;
            }
            let Ok(location) = name.parse::<Bdf>() else {
                reader.problem("name", "the directory name is not a PCI address".into());
                continue;
            };
            facts
                .pfs
                .push(read_pf(&devices, location, total_vfs, reader));
        }
        facts.pfs.sort_by_key(|pf| pf.location);
        Ok(facts)
    }
}

fn read_pf(devices: &Path, location: Bdf, total_vfs: u16, mut reader: DeviceReader<'_>) -> PfFacts {
    let vendor = reader.attr::<PciId>("vendor");
    let device = reader.attr::<PciId>("device");
    let numa_node = reader.numa_node();
    let driver = reader.link_name("driver");
    let num_vfs = reader.attr::<u16>("sriov_numvfs");
    let vf_device = reader.attr::<PciId>("sriov_vf_device");
    let drivers_autoprobe = reader.attr::<u8>("sriov_drivers_autoprobe").map(|v| v != 0);

    let mut links = Vec::new();
    match fs::read_dir(reader.dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(number) = name.to_str().and_then(|n| n.strip_prefix("virtfn")) else {
                    continue;
                };
                match number.parse::<u16>() {
                    Ok(index) => links.push(index),
                    Err(_) => reader.problem(&name.to_string_lossy(), "not a VF number".into()),
                }
            }
        }
        Err(e) => reader.problem(".", format!("cannot list the PF's directory: {e}")),
    }
    links.sort_unstable();

    let mut vfs = Vec::with_capacity(links.len());
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
        let vf_dir = devices.join(&name);
        if !vf_dir.is_dir() {
            reader.problem(
                &link,
                format!("points to {name}, which has no device directory"),
            );
        }
        let mut vf_reader = DeviceReader::new(&vf_dir, &name, reader.problems);
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

/// Reads one device's attributes, turning every failure into a problem for that device.
struct DeviceReader<'a> {
    dir: &'a Path,
    name: &'a str,
    problems: &'a mut Vec<Problem>,
}

impl<'a> DeviceReader<'a> {
    fn new(dir: &'a Path, name: &'a str, problems: &'a mut Vec<Problem>) -> DeviceReader<'a> {
        DeviceReader {
            dir,
            name,
            problems,
        }
    }

    fn problem(&mut self, attribute: &str, message: String) {
        self.problems.push(Problem {
            device: self.name.to_owned(),
            attribute: attribute.to_owned(),
            message,
        });
    }

    /// The attribute's trimmed text; `None` (silently) when it does not exist.
    fn text(&mut self, attribute: &str) -> Option<String> {
        match fs::read_to_string(self.dir.join(attribute)) {
            Ok(text) => Some(text.trim().to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                self.problem(attribute, format!("cannot read: {e}"));
                None
            }
        }
    }

    /// A parsed attribute; a missing one is `None`, a malformed one `None` plus a problem.
    fn attr<T: FromStr>(&mut self, attribute: &str) -> Option<T> {
        let text = self.text(attribute)?;
        text.parse().ok().or_else(|| {
            self.problem(attribute, format!("malformed value {text:?}"));
            None
        })
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
        match read_link_name(&self.dir.join(link)) {
            Ok(name) => name,
            Err(e) => {
                self.problem(link, format!("cannot read the link: {e}"));
                None
            }
        }
    }
}

/// The file name a symlink points to: `Ok(None)` when the link does not exist.
fn read_link_name(path: &Path) -> io::Result<Option<String>> {
    match fs::read_link(path) {
        Ok(target) => target
            .file_name()
            .map(|n| Some(n.to_string_lossy().into_owned()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("target {} has no file name", target.display()),
                )
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
