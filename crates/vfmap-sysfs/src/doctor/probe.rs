//! The facts `vfmap doctor` needs from the host, read under given roots: the sysfs tree
//! (`--sysfs-root`) and the root holding `proc/` and `lib/modules/` (`--root`). Nothing is
//! written; whatever cannot be read is kept as the reason, for the check to say so.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use vfmap_core::{Bdf, HostFacts, PciId};

use super::{Availability, IommuUnit, ModuleFacts, ModuleIndex, PciDevice, Probe};
use crate::discover::Sysfs;

/// Normalises a module name the way the kernel does: `-` and `_` are the same.
pub fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// The module index of a kernel: `modules.dep` (loadable modules) and `modules.builtin`
/// (built in) of one `lib/modules/<release>` directory, as `modprobe` reads them.
#[derive(Debug, Clone)]
pub struct ModulesDir {
    index: Result<(HashSet<String>, HashSet<String>), String>,
}

impl ModulesDir {
    /// The index of the kernel running under `root`: its release from
    /// `<root>/proc/sys/kernel/osrelease`, its modules in `<root>/lib/modules/<release>`.
    pub fn for_root(root: &Path) -> ModulesDir {
        let release_file = root.join("proc/sys/kernel/osrelease");
        match fs::read_to_string(&release_file) {
            Ok(release) => ModulesDir::open(&root.join("lib/modules").join(release.trim())),
            Err(e) => ModulesDir {
                index: Err(format!(
                    "the kernel release is unknown ({}: {e})",
                    release_file.display()
                )),
            },
        }
    }

    /// The index in `dir` (a `lib/modules/<release>` directory).
    pub fn open(dir: &Path) -> ModulesDir {
        let names = |file: &str| -> io::Result<HashSet<String>> {
            let text = fs::read_to_string(dir.join(file))?;
            Ok(text
                .lines()
                .filter_map(|line| line.split(':').next())
                .filter_map(|path| path.trim().rsplit('/').next())
                .filter_map(|base| base.split(".ko").next())
                .filter(|name| !name.is_empty())
                .map(module_key)
                .collect())
        };
        let index = match names("modules.dep") {
            Ok(loadable) => Ok((loadable, names("modules.builtin").unwrap_or_default())),
            Err(e) => Err(format!(
                "no module index: {}: {e}",
                dir.join("modules.dep").display()
            )),
        };
        ModulesDir { index }
    }
}

impl ModuleIndex for ModulesDir {
    fn availability(&self, module: &str) -> Result<Availability, String> {
        let (loadable, builtin) = self.index.as_ref().map_err(Clone::clone)?;
        let key = module_key(module);
        Ok(if builtin.contains(&key) {
            Availability::BuiltIn
        } else if loadable.contains(&key) {
            Availability::Installed
        } else {
            Availability::Missing
        })
    }
}

/// A small attribute's trimmed text; `Ok(None)` when absent.
fn read_attr(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file name a symlink points to; `None` when absent or unreadable.
fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn describe(path: &Path, e: &io::Error) -> String {
    format!("{}: {e}", path.display())
}

/// Every PCI device under `<sysfs>/bus/pci/devices`, with what the checks need.
fn pci_devices(sysfs: &Sysfs) -> Result<Vec<PciDevice>, String> {
    let dir = sysfs.pci_devices();
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map_err(|e| describe(&dir, &e))?
        .filter_map(|entry| Some(entry.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| {
            let at = dir.join(&name);
            let id = |attr: &str| {
                read_attr(&at.join(attr))
                    .ok()
                    .flatten()
                    .and_then(|t| t.parse::<PciId>().ok())
            };
            PciDevice {
                location: name.parse::<Bdf>().ok(),
                vendor: id("vendor"),
                device: id("device"),
                total_vfs: read_attr(&at.join("sriov_totalvfs"))
                    .ok()
                    .flatten()
                    .and_then(|t| t.parse().ok()),
                iommu_group: link_name(&at.join("iommu_group")).and_then(|g| g.parse().ok()),
                driver: link_name(&at.join("driver")),
                physfn: link_name(&at.join("physfn")),
                name,
            }
        })
        .collect())
}

/// `Ok(None)` when `<sysfs>/kernel/iommu_groups` does not exist, else how many groups, and
/// who is in each one (its `devices/` entries; the kernel lists every member there).
type Groups = (Option<usize>, BTreeMap<u32, BTreeSet<String>>);

fn iommu_groups(sysfs: &Sysfs) -> Result<Groups, String> {
    let dir = sysfs.root().join("kernel/iommu_groups");
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((None, BTreeMap::new())),
        Err(e) => return Err(describe(&dir, &e)),
    };
    let mut count = 0;
    let mut members = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(group) = entry
            .file_name()
            .to_str()
            .and_then(|g| g.parse::<u32>().ok())
        else {
            continue;
        };
        count += 1;
        let listed: BTreeSet<String> = fs::read_dir(entry.path().join("devices"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .collect();
        members.insert(group, listed);
    }
    Ok((Some(count), members))
}

/// `<sysfs>/class/iommu/*`, with what each unit says about interrupt remapping.
fn iommu_units(sysfs: &Sysfs) -> Vec<IommuUnit> {
    let dir = sysfs.root().join("class/iommu");
    let mut units: Vec<IommuUnit> = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            // Intel VT-d: bit 3 of the extended capability register is interrupt remapping.
            let interrupt_remapping = match read_attr(&path.join("intel-iommu/ecap")) {
                Ok(Some(ecap)) => u64::from_str_radix(ecap.trim_start_matches("0x"), 16)
                    .ok()
                    .map(|ecap| ecap & (1 << 3) != 0),
                // AMD-Vi remaps interrupts as part of every IOMMU it describes.
                _ if path.join("amd-iommu").is_dir() => Some(true),
                _ => None,
            };
            IommuUnit {
                name,
                interrupt_remapping,
            }
        })
        .collect();
    units.sort_by(|a, b| a.name.cmp(&b.name));
    units
}

/// Reads every fact the checks need. `modules` are the module names to look up (besides
/// `vfio-pci` and `vfio_iommu_type1`, which are always looked up).
pub fn probe(sysfs: &Sysfs, root: &Path, index: &dyn ModuleIndex, modules: &[String]) -> Probe {
    let (iommu_groups, mut group_members) = match iommu_groups(sysfs) {
        Ok((count, members)) => (Ok(count), members),
        Err(e) => (Err(e), BTreeMap::new()),
    };
    let devices = pci_devices(sysfs);
    // The devices' own links too: some trees (captures) lack the groups' `devices/` lists.
    for device in devices.iter().flatten() {
        if let Some(group) = device.iommu_group {
            group_members
                .entry(group)
                .or_default()
                .insert(device.name.clone());
        }
    }
    let read_root = |rel: &str| {
        let path: PathBuf = root.join(rel);
        fs::read_to_string(&path).map_err(|e| describe(&path, &e))
    };
    let mut names: Vec<String> = ["vfio-pci", "vfio_iommu_type1", "iommufd"]
        .into_iter()
        .map(str::to_owned)
        .chain(modules.iter().cloned())
        .collect();
    names.sort();
    names.dedup();
    let module_facts = names
        .into_iter()
        .map(|name| {
            let facts = ModuleFacts {
                pci_driver: sysfs.driver_dir(&name).is_dir(),
                loaded: sysfs.root().join("module").join(module_key(&name)).is_dir(),
                index: index.availability(&name),
            };
            (name, facts)
        })
        .collect();
    let unsafe_interrupts = read_attr(
        &sysfs
            .root()
            .join("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"),
    )
    .ok()
    .flatten()
    .map(|v| matches!(v.as_str(), "Y" | "y" | "1"));
    Probe {
        sysfs_root: sysfs.root().to_owned(),
        root: root.to_owned(),
        discovered: sysfs.discover().map_err(|e| e.to_string()),
        devices,
        iommu_groups,
        group_members,
        iommu_units: iommu_units(sysfs),
        cmdline: read_root("proc/cmdline").map(|c| c.trim().to_owned()),
        // With interrupt remapping on, x86 names its interrupt chips IR-IO-APIC, IR-PCI-MSI...
        remapped_interrupts: read_root("proc/interrupts").map(|t| t.contains("IR-")),
        unsafe_interrupts,
        modules: module_facts,
    }
}

/// Discovery's facts, for callers that hold a probe.
impl Probe {
    /// The SR-IOV PFs and VFs discovery found, when it could list the devices.
    pub fn host_facts(&self) -> Option<&HostFacts> {
        self.discovered.as_ref().ok()
    }
}
