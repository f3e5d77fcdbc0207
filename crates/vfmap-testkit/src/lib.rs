//! Test doubles for vfmap (never used by what the README runs).
//!
//! - [`SysfsTree`] builds a sysfs tree in a directory laid out the way Linux lays it out:
//!   device directories under `devices/pciDDDD:00/<root port>/`, `bus/pci/devices/*` symlinks
//!   to them, `virtfnN`/`physfn`/`driver`/`iommu_group` links with relative targets, and a
//!   `config` file per device so `lspci -A linux-sysfs` can read the same tree (a VF's in its
//!   reset state, with PCI Express and MSI-X capabilities; [`set_vf_config_dirty`] spoils it).
//! - [`FakeKernel`] implements [`SysfsWriter`] by reacting to writes the way the PCI core does
//!   (`sriov_numvfs` creates VFs, `unbind`/`drivers_probe`/`driver_override` move bindings,
//!   vfio-pci refuses a device without an IOMMU group), and logs every write.
//! - [`kubelet::FakeKubelet`]: the kubelet's Registration and PodResources services, and a
//!   client of a device plugin's endpoints, for tests of the daemon's device plugin.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vfmap_core::{Bdf, DriverName, PciId};
use vfmap_sysfs::{ModuleLoader, SysfsWriter};

pub mod kubelet;

/// An SR-IOV PF to add to a tree.
#[derive(Debug, Clone)]
pub struct PfSpec {
    /// Location.
    pub location: Bdf,
    /// Vendor ID.
    pub vendor: PciId,
    /// Device ID of the PF.
    pub device: PciId,
    /// Device ID of its VFs (`sriov_vf_device`).
    pub vf_device: PciId,
    /// `sriov_totalvfs`.
    pub total_vfs: u16,
    /// VFs enabled at creation.
    pub num_vfs: u16,
    /// `sriov_offset`.
    pub offset: u16,
    /// `sriov_stride`.
    pub stride: u16,
    /// `numa_node` (-1 for none).
    pub numa_node: i32,
    /// Driver bound to the PF.
    pub driver: Option<String>,
    /// `sriov_drivers_autoprobe`.
    pub autoprobe: bool,
    /// Laid out by a kernel before 4.15: no `sriov_offset`, `sriov_stride` or
    /// `sriov_vf_device` attributes; those values live only in the SR-IOV capability of the
    /// PF's (4096-byte) `config`, where the fake kernel reads them too.
    pub before_4_15: bool,
}

impl PfSpec {
    /// A PF like QEMU's emulated NVMe (1b36:0010) at `location`, with `total_vfs` VFs possible.
    pub fn nvme(location: &str, total_vfs: u16) -> PfSpec {
        PfSpec {
            location: location.parse().expect("test PF location"),
            vendor: PciId(0x1b36),
            device: PciId(0x0010),
            vf_device: PciId(0x0010),
            total_vfs,
            num_vfs: 0,
            offset: 1,
            stride: 1,
            numa_node: 0,
            driver: Some("nvme".into()),
            autoprobe: true,
            before_4_15: false,
        }
    }

    /// The same PF as a kernel before 4.15 shows it (see [`PfSpec::before_4_15`]).
    pub fn before_4_15(mut self) -> PfSpec {
        self.before_4_15 = true;
        self
    }

    /// The same PF with `n` VFs enabled.
    pub fn with_vfs(mut self, n: u16) -> PfSpec {
        self.num_vfs = n;
        self
    }
}

/// A generated sysfs tree rooted at a directory.
#[derive(Debug, Clone)]
pub struct SysfsTree {
    root: PathBuf,
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn read(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// An attribute's trimmed text, `None` when the file is absent.
fn read_opt(path: &Path) -> Option<String> {
    match fs::read_to_string(path) {
        Ok(text) => Some(text.trim().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// Where the SR-IOV extended capability sits in a generated PF's `config`.
const SRIOV_CAP: usize = 0x100;
/// Offsets inside the SR-IOV capability (PCIe base spec, "SR-IOV Extended Capability").
const SRIOV_TOTAL_VFS: usize = 0x0e;
const SRIOV_NUM_VFS: usize = 0x10;
const SRIOV_VF_OFFSET: usize = 0x14;
const SRIOV_VF_STRIDE: usize = 0x16;
const SRIOV_VF_DEVICE: usize = 0x1a;

/// Where a generated VF's capabilities sit in its `config`: MSI-X (12 bytes), then PCI Express
/// (60 bytes), apart.
const VF_MSIX_CAP: usize = 0x70;
const VF_PCIE_CAP: usize = 0x80;

/// A VF's `config` as it reads after a function-level reset, as root (256 bytes): the IDs and
/// NVMe class code every generated device has, the capability list (Status bit 4) holding an
/// MSI-X capability (8 vectors, table and PBA in BAR 0, Enable off) and a PCI Express endpoint
/// capability (FLR supported); command register 0 and BARs zero, as a VF's read.
fn vf_config(vendor: PciId, device: PciId) -> Vec<u8> {
    let mut config = vec![0u8; 256];
    config[0..2].copy_from_slice(&vendor.0.to_le_bytes());
    config[2..4].copy_from_slice(&device.0.to_le_bytes());
    config[0x06] = 0x10;
    config[9..12].copy_from_slice(&[0x02, 0x08, 0x01]);
    config[0x34] = VF_MSIX_CAP as u8;
    let msix = &mut config[VF_MSIX_CAP..];
    // ID, next, Message Control (table size 8, Enable off), table and PBA in BAR 0.
    msix[0..4].copy_from_slice(&[0x11, VF_PCIE_CAP as u8, 0x07, 0x00]);
    msix[4..8].copy_from_slice(&0x2000u32.to_le_bytes());
    msix[8..12].copy_from_slice(&0x3000u32.to_le_bytes());
    let pcie = &mut config[VF_PCIE_CAP..];
    // ID, end of list, PCIe Capabilities (version 2, endpoint), Device Capabilities (FLR).
    pcie[0..4].copy_from_slice(&[0x10, 0x00, 0x02, 0x00]);
    pcie[4..8].copy_from_slice(&(1u32 << 28).to_le_bytes());
    config
}

/// What [`set_vf_config_dirty`] leaves behind in a VF's `config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dirty {
    /// Bus Master on in the Command register.
    BusMaster,
    /// MSI-X Enable on.
    MsixEnabled,
    /// BAR 0 still holding an address (0xfe000000).
    Bar0,
}

/// Leaves `vf`'s `config` (in the tree at `root`) out of its reset state, so the scrub's
/// verification fails; calls add up. Panics when the file is not a generated VF's.
pub fn set_vf_config_dirty(root: &Path, vf: Bdf, what: Dirty) {
    let path = root
        .join("bus/pci/devices")
        .join(vf.to_string())
        .join("config");
    let mut config = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        config.get(VF_MSIX_CAP),
        Some(&0x11),
        "{} is not a generated VF's config",
        path.display()
    );
    match what {
        Dirty::BusMaster => config[0x04] |= 0x04,
        Dirty::MsixEnabled => config[VF_MSIX_CAP + 3] |= 0x80,
        Dirty::Bar0 => config[0x10..0x14].copy_from_slice(&0xfe00_0000u32.to_le_bytes()),
    }
    fs::write(&path, config).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Puts `vf`'s `config` (in the tree at `root`) back in its reset state, IDs kept: what a
/// reset that worked leaves.
pub fn reset_vf_config(root: &Path, vf: Bdf) {
    let path = root
        .join("bus/pci/devices")
        .join(vf.to_string())
        .join("config");
    let config = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let id = |at: usize| PciId(u16::from_le_bytes([config[at], config[at + 1]]));
    fs::write(&path, vf_config(id(0), id(2)))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A 16-bit field of the SR-IOV capability in `config`, when the file holds one.
fn sriov_cap_field(config: &Path, field: usize) -> Option<u16> {
    let bytes = fs::read(config).ok()?;
    let header = bytes.get(SRIOV_CAP..SRIOV_CAP + 2)?;
    if u16::from_le_bytes([header[0], header[1]]) != 0x0010 {
        return None;
    }
    let at = SRIOV_CAP + field;
    let value = bytes.get(at..at + 2)?;
    Some(u16::from_le_bytes([value[0], value[1]]))
}

/// The value of a PF's SR-IOV attribute, or else the same field of the capability in its
/// `config` (kernels before 4.15 have only the latter).
fn sriov_value(pf_dir: &Path, attribute: &str, field: usize) -> Option<u16> {
    match read_opt(&pf_dir.join(attribute)) {
        Some(text) => {
            let hex = attribute == "sriov_vf_device";
            let text = text.trim_start_matches("0x");
            if hex {
                u16::from_str_radix(text, 16).ok()
            } else {
                text.parse().ok()
            }
        }
        None => sriov_cap_field(&pf_dir.join("config"), field),
    }
}

impl SysfsTree {
    /// Creates the skeleton (`bus/pci/{devices,drivers,drivers_probe}`, `devices`,
    /// `kernel/iommu_groups`) under `root` with the usual drivers registered.
    pub fn new(root: impl Into<PathBuf>) -> SysfsTree {
        let tree = SysfsTree { root: root.into() };
        for dir in [
            "bus/pci/devices",
            "bus/pci/drivers",
            "devices",
            "kernel/iommu_groups",
        ] {
            fs::create_dir_all(tree.root.join(dir)).expect("create skeleton");
        }
        write(&tree.root.join("bus/pci/drivers_probe"), "");
        for driver in ["nvme", "pcieport"] {
            tree.add_driver(driver);
        }
        tree
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Registers a PCI driver (creates `bus/pci/drivers/<name>` with `bind`/`unbind`).
    pub fn add_driver(&self, name: &str) {
        let dir = self.root.join("bus/pci/drivers").join(name);
        fs::create_dir_all(&dir).expect("create driver dir");
        write(&dir.join("bind"), "");
        write(&dir.join("unbind"), "");
    }

    /// `bus/pci/devices/<bdf>` (a symlink into `devices/`).
    pub fn device_link(&self, bdf: Bdf) -> PathBuf {
        self.root.join("bus/pci/devices").join(bdf.to_string())
    }

    /// The real directory of a device: `devices/pciDDDD:00/DDDD:00:XX.Y/<bdf>`, with the root
    /// port chosen from the bus number so every bus gets its own port.
    fn device_dir_rel(bdf: Bdf, parent_bus: u8) -> PathBuf {
        let port = Bdf::new(bdf.domain, 0, (parent_bus >> 3) & 0x1f, parent_bus & 7)
            .expect("port address in range");
        PathBuf::from(format!("devices/pci{:04x}:00", bdf.domain))
            .join(port.to_string())
            .join(bdf.to_string())
    }

    /// Adds a PCI device directory with identity attributes and a `config` file.
    fn add_device(
        &self,
        bdf: Bdf,
        parent_bus: u8,
        vendor: PciId,
        device: PciId,
        numa: Option<i32>,
    ) -> PathBuf {
        self.add_device_at(
            SysfsTree::device_dir_rel(bdf, parent_bus),
            bdf,
            vendor,
            device,
            numa,
        )
    }

    /// Adds a PCI device whose directory is `rel` (relative to the root).
    fn add_device_at(
        &self,
        rel: PathBuf,
        bdf: Bdf,
        vendor: PciId,
        device: PciId,
        numa: Option<i32>,
    ) -> PathBuf {
        let dir = self.root.join(&rel);
        fs::create_dir_all(&dir).expect("create device dir");
        write(&dir.join("vendor"), &format!("{vendor}\n"));
        write(&dir.join("device"), &format!("{device}\n"));
        write(&dir.join("class"), "0x010802\n");
        if let Some(numa) = numa {
            write(&dir.join("numa_node"), &format!("{numa}\n"));
        }
        write(&dir.join("driver_override"), "(null)\n");
        write(&dir.join("irq"), "0\n");
        write(
            &dir.join("resource"),
            &"0x0000000000000000 0x0000000000000000 0x0000000000000000\n".repeat(13),
        );
        // Type-0 header: IDs, class code 01:08:02 (NVMe), so lspci has something real to parse.
        let mut config = vec![0u8; 256];
        config[0..2].copy_from_slice(&vendor.0.to_le_bytes());
        config[2..4].copy_from_slice(&device.0.to_le_bytes());
        config[9..12].copy_from_slice(&[0x02, 0x08, 0x01]);
        fs::write(dir.join("config"), config).expect("write config");
        symlink(Path::new("../../..").join(&rel), self.device_link(bdf)).expect("bus link");
        dir
    }

    /// Adds a root port on the root bus of domain 0 (a guest's hot-plug slot), e.g. `0000:00:03.0`.
    pub fn add_root_port(&self, port: &str) -> Bdf {
        let port: Bdf = port.parse().expect("port address");
        let rel =
            PathBuf::from(format!("devices/pci{:04x}:00", port.domain)).join(port.to_string());
        self.add_device_at(rel, port, PciId(0x1b36), PciId(0x000c), Some(-1));
        port
    }

    /// Hot-plugs a device behind `port` (its directory is a child of the port's), as the
    /// guest kernel shows it after pciehp brings it up.
    pub fn plug_behind(&self, port: Bdf, bdf: &str, vendor: PciId, device: PciId) -> Bdf {
        let bdf: Bdf = bdf.parse().expect("device address");
        let rel = PathBuf::from(format!("devices/pci{:04x}:00", port.domain))
            .join(port.to_string())
            .join(bdf.to_string());
        self.add_device_at(rel, bdf, vendor, device, Some(-1));
        bdf
    }

    /// Removes a device (hot-unplug; the kernel unbinds it first).
    pub fn unplug(&self, bdf: Bdf) {
        let link = self.device_link(bdf);
        let dir = fs::canonicalize(&link).expect("device dir");
        if fs::symlink_metadata(dir.join("driver")).is_ok() {
            self.unlink_driver(bdf, None).expect("unbind before unplug");
        }
        fs::remove_dir_all(dir).expect("remove device dir");
        fs::remove_file(link).expect("remove bus link");
    }

    /// Adds a virtio-serial port `vportNpM` named `name` under `class/virtio-ports`.
    pub fn add_virtio_port(&self, vport: &str, name: &str) {
        let dir = self.root.join("class/virtio-ports").join(vport);
        fs::create_dir_all(&dir).expect("create port dir");
        write(&dir.join("name"), &format!("{name}\n"));
    }

    /// Adds an SR-IOV PF (and its enabled VFs), as the kernel would show it.
    pub fn add_pf(&self, spec: &PfSpec) -> PathBuf {
        let dir = self.add_device(
            spec.location,
            spec.location.bus,
            spec.vendor,
            spec.device,
            Some(spec.numa_node),
        );
        write(
            &dir.join("sriov_totalvfs"),
            &format!("{}\n", spec.total_vfs),
        );
        write(&dir.join("sriov_numvfs"), "0\n");
        if spec.before_4_15 {
            // The full extended config space, as root reads it, with the SR-IOV capability.
            let mut config = fs::read(dir.join("config")).expect("read config");
            config.resize(4096, 0);
            let cap = &mut config[SRIOV_CAP..];
            cap[0..4].copy_from_slice(&(0x0010u32 | (1 << 16)).to_le_bytes());
            for (field, value) in [
                (SRIOV_TOTAL_VFS, spec.total_vfs),
                (SRIOV_VF_OFFSET, spec.offset),
                (SRIOV_VF_STRIDE, spec.stride),
                (SRIOV_VF_DEVICE, spec.vf_device.0),
            ] {
                cap[field..field + 2].copy_from_slice(&value.to_le_bytes());
            }
            fs::write(dir.join("config"), config).expect("write config");
        } else {
            write(&dir.join("sriov_offset"), &format!("{}\n", spec.offset));
            write(&dir.join("sriov_stride"), &format!("{}\n", spec.stride));
            // The kernel prints this one without "0x".
            write(
                &dir.join("sriov_vf_device"),
                &format!("{:x}\n", spec.vf_device.0),
            );
        }
        write(
            &dir.join("sriov_drivers_autoprobe"),
            &format!("{}\n", u8::from(spec.autoprobe)),
        );
        if let Some(driver) = &spec.driver {
            self.add_driver(driver);
            self.link_driver(spec.location, driver);
        }
        self.set_num_vfs(spec.location, spec.num_vfs, None)
            .expect("enable VFs");
        dir
    }

    /// Adds a plain (non-SR-IOV) device.
    pub fn add_plain_device(&self, bdf: &str) -> Bdf {
        let bdf: Bdf = bdf.parse().expect("device location");
        self.add_device(bdf, bdf.bus, PciId(0x8086), PciId(0x100e), Some(-1));
        bdf
    }

    fn next_iommu_group(&self) -> u32 {
        fs::read_dir(self.root.join("kernel/iommu_groups"))
            .expect("list groups")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .map_or(0, |g| g + 1)
    }

    /// Enables `n` VFs on `pf` (through 0 like the kernel), removing old ones. With
    /// `autoprobe_driver` set, new VFs get that driver (what autoprobe would do).
    pub fn set_num_vfs(&self, pf: Bdf, n: u16, autoprobe_driver: Option<&str>) -> io::Result<()> {
        let pf_link = self.device_link(pf);
        let pf_dir = fs::canonicalize(&pf_link)?;
        let current: u16 = read(&pf_dir.join("sriov_numvfs")).parse().unwrap_or(0);
        let offset = sriov_value(&pf_dir, "sriov_offset", SRIOV_VF_OFFSET).unwrap_or(1);
        let stride = sriov_value(&pf_dir, "sriov_stride", SRIOV_VF_STRIDE).unwrap_or(1);
        let vendor: PciId = read(&pf_dir.join("vendor")).parse().unwrap_or(PciId(0));
        let vf_device =
            PciId(sriov_value(&pf_dir, "sriov_vf_device", SRIOV_VF_DEVICE).unwrap_or(0));
        // A kernel without CONFIG_NUMA has no numa_node anywhere: VFs follow their PF.
        let numa: Option<i32> =
            read_opt(&pf_dir.join("numa_node")).map(|n| n.parse().unwrap_or(-1));
        for i in 0..current {
            let Some(vf) = pf.vf_location(offset, stride, i) else {
                continue;
            };
            let vf_dir = pf_dir
                .parent()
                .expect("PF has a parent")
                .join(vf.to_string());
            // The kernel unbinds a VF before removing it.
            if fs::symlink_metadata(vf_dir.join("driver")).is_ok() {
                self.unlink_driver(vf, None)?;
            }
            fs::remove_dir_all(vf_dir)?;
            fs::remove_file(self.device_link(vf))?;
            fs::remove_file(pf_dir.join(format!("virtfn{i}")))?;
        }
        let first_group = self.next_iommu_group();
        for (i, group) in (0..n).zip(first_group..) {
            let vf = pf.vf_location(offset, stride, i).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "VF past the RID space")
            })?;
            // VFs are siblings of their PF in the device tree, whatever their bus number.
            let vf_dir = self.add_device(vf, pf.bus, vendor, vf_device, numa);
            fs::write(vf_dir.join("config"), vf_config(vendor, vf_device))?;
            symlink(format!("../{vf}"), pf_dir.join(format!("virtfn{i}")))?;
            symlink(format!("../{pf}"), vf_dir.join("physfn"))?;
            fs::create_dir_all(self.root.join(format!("kernel/iommu_groups/{group}")))?;
            symlink(
                format!("../../../../kernel/iommu_groups/{group}"),
                vf_dir.join("iommu_group"),
            )?;
            if let Some(driver) = autoprobe_driver {
                self.link_driver(vf, driver);
            }
        }
        write(&pf_dir.join("sriov_numvfs"), &format!("{n}\n"));
        if sriov_cap_field(&pf_dir.join("config"), SRIOV_NUM_VFS).is_some() {
            let mut config = fs::read(pf_dir.join("config"))?;
            let at = SRIOV_CAP + SRIOV_NUM_VFS;
            config[at..at + 2].copy_from_slice(&n.to_le_bytes());
            fs::write(pf_dir.join("config"), config)?;
        }
        Ok(())
    }

    /// Removes `attribute` from one device, as a kernel that lacks it (or a partial capture)
    /// would show the device.
    pub fn remove_attribute(&self, bdf: Bdf, attribute: &str) {
        let path = self.device_link(bdf).join(attribute);
        fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    }

    /// Removes `attribute` from every device present now, e.g. `numa_node` as a kernel built
    /// without CONFIG_NUMA shows it (VFs enabled later follow their PF). Returns how many
    /// files it removed.
    pub fn remove_attribute_everywhere(&self, attribute: &str) -> usize {
        let mut removed = 0;
        for dir in self.device_dirs() {
            match fs::remove_file(dir.join(attribute)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => panic!("remove {attribute} in {}: {e}", dir.display()),
            }
        }
        removed
    }

    /// Sets the mode of every attribute file of every device (directories and symlinks keep
    /// theirs), e.g. `0o600` for a tree captured by root that other users cannot read.
    pub fn chmod_attributes(&self, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        for dir in self.device_dirs() {
            for entry in fs::read_dir(&dir).expect("list device dir") {
                let entry = entry.expect("device dir entry");
                if entry.file_type().expect("file type").is_file() {
                    fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode))
                        .expect("chmod attribute");
                }
            }
        }
    }

    /// The real directory of every device under `bus/pci/devices`.
    fn device_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = fs::read_dir(self.root.join("bus/pci/devices"))
            .expect("list devices")
            .map(|e| fs::canonicalize(e.expect("device entry").path()).expect("device dir"))
            .collect();
        dirs.sort();
        dirs
    }

    /// Binds `bdf` to `driver` as the kernel shows it: `bdf`'s `driver` link to
    /// `bus/pci/drivers/<driver>`, and that directory's `<bdf>` link back to the device.
    pub fn link_driver(&self, bdf: Bdf, driver: &str) {
        let dir = self.device_link(bdf);
        symlink(
            format!("../../../../bus/pci/drivers/{driver}"),
            dir.join("driver"),
        )
        .expect("driver link");
        let root = fs::canonicalize(&self.root).expect("tree root");
        let device = fs::canonicalize(&dir).expect("device dir");
        let rel = device.strip_prefix(&root).expect("device under the root");
        let driver_dir = self.root.join("bus/pci/drivers").join(driver);
        fs::create_dir_all(&driver_dir).expect("create driver dir");
        symlink(
            Path::new("../../../..").join(rel),
            driver_dir.join(bdf.to_string()),
        )
        .expect("driver's device link");
    }

    /// Unbinds `bdf` as the kernel does: both links [`SysfsTree::link_driver`] makes. Fails
    /// when `bdf` is bound to no driver or, with `only` set, to another one.
    pub fn unlink_driver(&self, bdf: Bdf, only: Option<&str>) -> io::Result<()> {
        let link = self.device_link(bdf).join("driver");
        let target = fs::read_link(&link)?;
        let driver = target.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if only.is_some_and(|only| only != driver) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "bound to another driver",
            ));
        }
        let back = self
            .root
            .join("bus/pci/drivers")
            .join(driver)
            .join(bdf.to_string());
        match fs::remove_file(back) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::remove_file(link)
    }

    /// Removes `bdf`'s IOMMU group link (vfio-pci will then refuse it).
    pub fn remove_iommu_group(&self, bdf: Bdf) {
        fs::remove_file(self.device_link(bdf).join("iommu_group")).expect("remove group link");
    }

    /// The IOMMU group `bdf` is in, from its `iommu_group` link.
    pub fn iommu_group_of(&self, bdf: Bdf) -> Option<u32> {
        fs::read_link(self.device_link(bdf).join("iommu_group"))
            .ok()?
            .file_name()?
            .to_str()?
            .parse()
            .ok()
    }

    /// Puts `bdf` in IOMMU group `group` (created when missing), as the kernel shows a device
    /// behind a bridge without ACS: its `iommu_group` link and an entry in the group's
    /// `devices/`.
    pub fn set_iommu_group(&self, bdf: Bdf, group: u32) {
        let root = fs::canonicalize(&self.root).expect("tree root");
        let dir = fs::canonicalize(self.device_link(bdf)).expect("device dir");
        let rel = dir.strip_prefix(&root).expect("device under the root");
        let up = |levels: usize| "../".repeat(levels);
        let group_dir = self
            .root
            .join(format!("kernel/iommu_groups/{group}/devices"));
        fs::create_dir_all(&group_dir).expect("create group dir");
        let link = dir.join("iommu_group");
        let _ = fs::remove_file(&link);
        symlink(
            format!(
                "{}kernel/iommu_groups/{group}",
                up(rel.components().count())
            ),
            link,
        )
        .expect("group link");
        let member = group_dir.join(bdf.to_string());
        let _ = fs::remove_file(&member);
        symlink(format!("{}{}", up(4), rel.display()), member).expect("member link");
    }

    /// An IOMMU that is off (or absent): no device has an `iommu_group` link and
    /// `kernel/iommu_groups` is empty. With `keep_dir` false the directory is gone too, as on a
    /// kernel built without IOMMU support.
    pub fn iommu_off(&self, keep_dir: bool) {
        for dir in self.device_dirs() {
            let _ = fs::remove_file(dir.join("iommu_group"));
        }
        let groups = self.root.join("kernel/iommu_groups");
        fs::remove_dir_all(&groups).expect("remove iommu_groups");
        if keep_dir {
            fs::create_dir_all(&groups).expect("create iommu_groups");
        }
    }

    /// Adds an IOMMU unit under `class/iommu` (a link into `devices/virtual/iommu`). With
    /// `ecap`, it is an Intel VT-d unit with that extended capability register (bit 3:
    /// interrupt remapping).
    pub fn add_iommu_unit(&self, name: &str, ecap: Option<u64>) {
        let dir = self.root.join("devices/virtual/iommu").join(name);
        fs::create_dir_all(&dir).expect("create iommu unit");
        if let Some(ecap) = ecap {
            fs::create_dir_all(dir.join("intel-iommu")).expect("create intel-iommu");
            write(&dir.join("intel-iommu/ecap"), &format!("{ecap:x}\n"));
            write(&dir.join("intel-iommu/cap"), "d2008c40660462\n");
        }
        let class = self.root.join("class/iommu");
        fs::create_dir_all(&class).expect("create class/iommu");
        symlink(
            format!("../../devices/virtual/iommu/{name}"),
            class.join(name),
        )
        .expect("iommu class link");
    }

    /// Shows kernel module `name` as loaded: `module/<name>` (with `-` as `_`, like the
    /// kernel), with the given parameters.
    pub fn add_module(&self, name: &str, parameters: &[(&str, &str)]) {
        let dir = self.root.join("module").join(name.replace('-', "_"));
        fs::create_dir_all(dir.join("parameters")).expect("create module dir");
        for (parameter, value) in parameters {
            write(
                &dir.join("parameters").join(parameter),
                &format!("{value}\n"),
            );
        }
    }
}

/// A [`SysfsWriter`] that reacts like the Linux PCI core, over a [`SysfsTree`].
#[derive(Debug)]
pub struct FakeKernel {
    tree: SysfsTree,
    /// Driver that grabs new VFs while `sriov_drivers_autoprobe` is 1.
    autoprobe_driver: Option<String>,
    /// Drivers whose probe fails.
    failing_drivers: HashSet<String>,
    log: Mutex<Vec<(String, String)>>,
}

fn kernel_error(kind: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(kind, what.to_owned())
}

impl FakeKernel {
    /// A fake kernel over `tree`; new VFs stay unbound unless [`FakeKernel::autoprobe_to`] is set.
    pub fn new(tree: SysfsTree) -> FakeKernel {
        FakeKernel {
            tree,
            autoprobe_driver: None,
            failing_drivers: HashSet::new(),
            log: Mutex::new(Vec::new()),
        }
    }

    /// With autoprobe on, new VFs bind to `driver`.
    pub fn autoprobe_to(mut self, driver: &str) -> FakeKernel {
        self.tree.add_driver(driver);
        self.autoprobe_driver = Some(driver.to_owned());
        self
    }

    /// Makes every probe by `driver` fail.
    pub fn fail_probe(mut self, driver: &str) -> FakeKernel {
        self.failing_drivers.insert(driver.to_owned());
        self
    }

    /// Every write so far: (path relative to the root, value).
    pub fn writes(&self) -> Vec<(String, String)> {
        self.log.lock().expect("log lock").clone()
    }

    fn probe(&self, bdf: Bdf) -> io::Result<()> {
        let dir = self.tree.device_link(bdf);
        if !dir.exists() {
            return Err(kernel_error(io::ErrorKind::NotFound, "no such device"));
        }
        if dir.join("driver").exists() {
            return Ok(()); // already bound: drivers_probe does nothing
        }
        let wanted = read(&dir.join("driver_override"));
        if wanted == "(null)"
            || !self
                .tree
                .root
                .join("bus/pci/drivers")
                .join(&wanted)
                .is_dir()
        {
            return Ok(()); // no driver matches: the device stays unbound, the write succeeds
        }
        // The link, not its target: the kernel asks whether the device has a group.
        let no_group =
            wanted == "vfio-pci" && fs::symlink_metadata(dir.join("iommu_group")).is_err();
        if no_group || self.failing_drivers.contains(&wanted) {
            return Ok(()); // probe failed: logged in dmesg, the write still succeeds
        }
        self.tree.link_driver(bdf, &wanted);
        Ok(())
    }
}

impl SysfsWriter for FakeKernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let rel = path
            .strip_prefix(&self.tree.root)
            .map_err(|_| kernel_error(io::ErrorKind::NotFound, "outside the tree"))?;
        let rel_text = rel.to_string_lossy().into_owned();
        self.log
            .lock()
            .expect("log lock")
            .push((rel_text.clone(), value.to_owned()));
        let parts: Vec<&str> = rel_text.split('/').collect();
        let value = value.trim();
        let invalid = || kernel_error(io::ErrorKind::InvalidInput, "Invalid argument");
        match parts.as_slice() {
            ["bus", "pci", "devices", dev, attr] => {
                let bdf: Bdf = dev.parse().map_err(|_| invalid())?;
                let dir = self.tree.device_link(bdf);
                if !dir.join(attr).exists() {
                    return Err(kernel_error(io::ErrorKind::NotFound, "No such file"));
                }
                match *attr {
                    "sriov_numvfs" => {
                        let n: u16 = value.parse().map_err(|_| invalid())?;
                        let total: u16 = read(&dir.join("sriov_totalvfs"))
                            .parse()
                            .map_err(|_| invalid())?;
                        let current: u16 = read(&dir.join("sriov_numvfs"))
                            .parse()
                            .map_err(|_| invalid())?;
                        if n > total {
                            return Err(kernel_error(
                                io::ErrorKind::InvalidInput,
                                "Numerical result out of range",
                            ));
                        }
                        if n == current {
                            return Ok(());
                        }
                        if current != 0 && n != 0 {
                            return Err(kernel_error(
                                io::ErrorKind::ResourceBusy,
                                "Device or resource busy",
                            ));
                        }
                        let autoprobe = read(&dir.join("sriov_drivers_autoprobe")) == "1";
                        let driver = self.autoprobe_driver.as_deref().filter(|_| autoprobe);
                        self.tree.set_num_vfs(bdf, n, driver)
                    }
                    "sriov_drivers_autoprobe" => match value {
                        "0" | "1" => fs::write(dir.join(attr), format!("{value}\n")),
                        _ => Err(invalid()),
                    },
                    "driver_override" => {
                        let stored = if value.is_empty() { "(null)" } else { value };
                        fs::write(dir.join(attr), format!("{stored}\n"))
                    }
                    _ => Err(kernel_error(
                        io::ErrorKind::PermissionDenied,
                        "Permission denied",
                    )),
                }
            }
            ["bus", "pci", "drivers", driver, "unbind"] => {
                let bdf: Bdf = value.parse().map_err(|_| invalid())?;
                self.tree
                    .unlink_driver(bdf, Some(driver))
                    .map_err(|_| kernel_error(io::ErrorKind::NotFound, "No such device"))
            }
            ["bus", "pci", "drivers_probe"] => self.probe(value.parse().map_err(|_| invalid())?),
            _ => Err(kernel_error(
                io::ErrorKind::PermissionDenied,
                "Permission denied",
            )),
        }
    }
}

/// A [`ModuleLoader`] that "loads" a module by registering the PCI driver of the same name.
#[derive(Debug)]
pub struct FakeModules {
    tree: SysfsTree,
    missing: HashSet<String>,
    loaded: Mutex<Vec<String>>,
}

impl FakeModules {
    /// Loader over `tree`; every module exists.
    pub fn new(tree: SysfsTree) -> FakeModules {
        FakeModules {
            tree,
            missing: HashSet::new(),
            loaded: Mutex::new(Vec::new()),
        }
    }

    /// Makes `module` fail to load as if not installed.
    pub fn without(mut self, module: &str) -> FakeModules {
        self.missing.insert(module.to_owned());
        self
    }

    /// Modules loaded so far.
    pub fn loaded(&self) -> Vec<String> {
        self.loaded.lock().expect("loaded lock").clone()
    }
}

impl ModuleLoader for FakeModules {
    fn load(&self, module: &DriverName) -> Result<(), String> {
        if self.missing.contains(module.as_str()) {
            return Err(format!("modprobe: FATAL: Module {module} not found"));
        }
        self.tree.add_driver(module.as_str());
        self.loaded
            .lock()
            .expect("loaded lock")
            .push(module.to_string());
        Ok(())
    }
}

/// Copies a directory tree, recreating symlinks with their targets unchanged (like `cp -a`),
/// so a committed fixture can be modified by a test.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            symlink(fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// The committed real-kernel fixture (see `tests/fixtures/README.md`).
pub fn golden_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qemu-nvme-sriov")
}

/// Command-line flags of the test-double binaries: `--name value` pairs and bare `--switch`es.
#[derive(Debug, Clone)]
pub struct Flags(Vec<String>);

impl Flags {
    /// This process's arguments.
    pub fn from_env() -> Flags {
        Flags(std::env::args().skip(1).collect())
    }

    /// The value after `--name`.
    pub fn value(&self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|a| a == name)?;
        self.0.get(i + 1).cloned()
    }

    /// The value after `--name` as a number of milliseconds (0 when absent or malformed).
    pub fn millis(&self, name: &str) -> std::time::Duration {
        std::time::Duration::from_millis(self.value(name).and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// Whether `--name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }
}

/// Binds a test double's unix socket, replacing a stale file; exits with a message on failure.
pub fn listen(socket: &str) -> std::os::unix::net::UnixListener {
    let _ = fs::remove_file(socket);
    std::os::unix::net::UnixListener::bind(socket).unwrap_or_else(|e| {
        eprintln!("cannot listen on {socket}: {e}");
        std::process::exit(1)
    })
}
