//! `vfmap doctor`: whether this host can pass its VFs through, one check at a time, each with
//! its fix.
//!
//! [`probe`] reads the facts (sysfs, `proc/`, the kernel's module index) under given roots;
//! [`assess`] decides, without I/O, what each fact means for pass-through.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use vfmap_core::{Bdf, HostFacts, PciId, PfFacts, Profiles};

mod probe;

pub use probe::{ModulesDir, module_key, probe};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, with a caveat, or could not be checked.
    Warning,
    /// Pass-through will fail or be unsafe until it is fixed.
    Error,
}

impl Status {
    /// `ok`, `warning` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Error => "error",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. `iommu` or `card:acme-fpga` (stable, for scripts).
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (none when it is fine).
    pub fix: Option<String>,
}

impl Check {
    /// A check that passed.
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    /// A check that passed with a caveat.
    pub fn warning(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            status: Status::Warning,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A check that failed.
    pub fn error(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            status: Status::Error,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A check that could not be made (a warning that says why).
    pub fn unchecked(name: impl Into<String>, why: &str, fix: impl Into<String>) -> Check {
        Check::warning(name, format!("could not check: {why}"), fix)
    }
}

/// Whether a kernel module can be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Built into the kernel.
    BuiltIn,
    /// A loadable module of the running kernel.
    Installed,
    /// Not a module of the running kernel.
    Missing,
}

/// Tells whether a module exists for the running kernel (the real one reads its module
/// index, see [`ModulesDir`]; tests can fake it).
pub trait ModuleIndex {
    /// Whether `module` can be loaded; the error says why it cannot be told.
    fn availability(&self, module: &str) -> Result<Availability, String>;
}

/// What the host says about one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFacts {
    /// A PCI driver of that name is registered (`<sysfs>/bus/pci/drivers/<name>`).
    pub pci_driver: bool,
    /// The module is loaded (or built in with parameters): `<sysfs>/module/<name>`.
    pub loaded: bool,
    /// The module index's answer.
    pub index: Result<Availability, String>,
}

/// One IOMMU unit under `<sysfs>/class/iommu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuUnit {
    /// Its name, e.g. `dmar0`.
    pub name: String,
    /// Whether the hardware remaps interrupts (`None`: it does not say).
    pub interrupt_remapping: Option<bool>,
}

/// One PCI device, with what the checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Its name under `bus/pci/devices`.
    pub name: String,
    /// The name as an address.
    pub location: Option<Bdf>,
    /// `vendor`.
    pub vendor: Option<PciId>,
    /// `device`.
    pub device: Option<PciId>,
    /// `sriov_totalvfs` (absent on devices without SR-IOV).
    pub total_vfs: Option<u16>,
    /// The IOMMU group it is in.
    pub iommu_group: Option<u32>,
    /// The bound driver.
    pub driver: Option<String>,
    /// For a VF: its PF's name.
    pub physfn: Option<String>,
}

/// Everything [`assess`] looks at; an `Err` is the reason a fact could not be read.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The sysfs root read.
    pub sysfs_root: PathBuf,
    /// The root holding `proc/` and `lib/modules/`.
    pub root: PathBuf,
    /// SR-IOV PFs and VFs (discovery).
    pub discovered: Result<HostFacts, String>,
    /// Every PCI device.
    pub devices: Result<Vec<PciDevice>, String>,
    /// How many IOMMU groups there are; `None` when `kernel/iommu_groups` does not exist.
    pub iommu_groups: Result<Option<usize>, String>,
    /// Who is in each IOMMU group.
    pub group_members: BTreeMap<u32, BTreeSet<String>>,
    /// `<sysfs>/class/iommu/*`.
    pub iommu_units: Vec<IommuUnit>,
    /// `<root>/proc/cmdline`.
    pub cmdline: Result<String, String>,
    /// Whether `<root>/proc/interrupts` shows remapped interrupt chips (`IR-...`).
    pub remapped_interrupts: Result<bool, String>,
    /// `vfio_iommu_type1`'s `allow_unsafe_interrupts` (`None` when not loaded).
    pub unsafe_interrupts: Option<bool>,
    /// The modules looked up, by the name asked for.
    pub modules: BTreeMap<String, ModuleFacts>,
}

/// The driver names the profiles use, host drivers first: the modules to look up.
pub fn profile_modules(profiles: &Profiles) -> Vec<String> {
    let (host, guest) = drivers(profiles);
    host.into_iter().chain(guest).collect()
}

/// Distinct host and guest driver names, each sorted.
fn drivers(profiles: &Profiles) -> (BTreeSet<String>, BTreeSet<String>) {
    let functions = profiles.cards.iter().flat_map(|c| &c.functions);
    let host = functions
        .clone()
        .map(|f| f.desc.host_driver.to_string())
        .collect();
    let guest = functions.map(|f| f.desc.guest_driver.to_string()).collect();
    (host, guest)
}

/// Every check, in a fixed order: the host as a whole (IOMMU, interrupt remapping, vfio),
/// then each card, PF and driver of the profiles. Without profiles, every SR-IOV PF's IOMMU
/// groups are checked.
pub fn assess(probe: &Probe, profiles: &Profiles) -> Vec<Check> {
    let mut checks = Vec::new();
    if let Err(why) = &probe.discovered {
        checks.push(Check::error(
            "sysfs",
            why.clone(),
            "pass --sysfs-root the sysfs directory (the one holding bus/), normally /sys",
        ));
    }
    checks.extend(discovery_problems(probe));
    checks.push(iommu(probe));
    checks.push(interrupt_remapping(probe));
    checks.push(vfio_pci(probe));
    checks.push(vfio_iommu_type1(probe));
    checks.extend(cards(probe, profiles));
    checks.extend(pfs(probe, profiles));
    checks.extend(groups(probe, profiles));
    let (host, guest) = drivers(profiles);
    for driver in host.iter().filter(|d| module_key(d) != "vfio_pci") {
        checks.push(host_driver(probe, driver));
    }
    for driver in &guest {
        checks.push(guest_driver(probe, driver));
    }
    checks
}

/// The kernel command line's `key=value` words whose value (a comma list) holds `value`.
fn cmdline_has<'a>(cmdline: &'a str, keys: &[&str], value: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find(|word| {
        word.split_once('=').is_some_and(|(key, values)| {
            keys.contains(&key) && values.split(',').any(|v| v == value)
        })
    })
}

fn iommu_on(probe: &Probe) -> bool {
    matches!(probe.iommu_groups, Ok(Some(n)) if n > 0)
}

fn iommu(probe: &Probe) -> Check {
    const NAME: &str = "iommu";
    let groups_dir = probe.sysfs_root.join("kernel/iommu_groups");
    let count = match &probe.iommu_groups {
        Err(why) => {
            return Check::unchecked(
                NAME,
                why,
                "run vfmap doctor as root (it reads kernel/iommu_groups)",
            );
        }
        Ok(count) => *count,
    };
    if let Some(n) = count.filter(|&n| n > 0) {
        let units: Vec<&str> = probe.iommu_units.iter().map(|u| u.name.as_str()).collect();
        let units = if units.is_empty() {
            "none listed in class/iommu".to_owned()
        } else {
            units.join(", ")
        };
        return Check::ok(NAME, format!("on: {n} IOMMU groups; IOMMU units: {units}"));
    }
    if count.is_none() {
        // Without IOMMU support built in, no firmware setting or command line helps.
        return Check::error(
            NAME,
            format!(
                "no {}: this kernel has no IOMMU support",
                groups_dir.display()
            ),
            "boot a kernel built with IOMMU support (CONFIG_INTEL_IOMMU or CONFIG_AMD_IOMMU)",
        );
    }
    let mut detail = format!(
        "no IOMMU groups in {}: the IOMMU is off, so vfio-pci cannot take any VF",
        groups_dir.display()
    );
    let mut fix = "enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware setup and boot with \
                   intel_iommu=on (Intel) or amd_iommu=on (AMD)"
        .to_owned();
    match &probe.cmdline {
        Ok(cmdline) => {
            if let Some(word) = cmdline_has(cmdline, &["intel_iommu", "amd_iommu", "iommu"], "off")
            {
                detail += &format!("; the kernel command line has {word}");
                fix = format!("remove {word} from the kernel command line and reboot; {fix}");
            } else if cmdline_has(cmdline, &["intel_iommu", "amd_iommu"], "on").is_none() {
                detail += "; the kernel command line has neither intel_iommu=on nor amd_iommu=on";
            }
        }
        Err(why) => detail += &format!(" (the kernel command line is unknown: {why})"),
    }
    Check::error(NAME, detail, fix)
}

fn interrupt_remapping(probe: &Probe) -> Check {
    const NAME: &str = "interrupt-remapping";
    if !iommu_on(probe) {
        return Check::unchecked(
            NAME,
            "the IOMMU is off (see the iommu check)",
            "turn the IOMMU on first",
        );
    }
    if probe.remapped_interrupts == Ok(true) {
        return Check::ok(
            NAME,
            format!(
                "on: remapped interrupt chips (IR-...) in {}",
                probe.root.join("proc/interrupts").display()
            ),
        );
    }
    let turned_off = probe
        .cmdline
        .as_deref()
        .ok()
        .and_then(|c| cmdline_has(c, &["intremap"], "off"));
    let lacking: Vec<&str> = probe
        .iommu_units
        .iter()
        .filter(|u| u.interrupt_remapping == Some(false))
        .map(|u| u.name.as_str())
        .collect();
    let problem = if let Some(word) = turned_off {
        Some((
            format!("off: the kernel command line has {word}"),
            format!("remove {word} from the kernel command line and reboot"),
        ))
    } else if !lacking.is_empty() {
        Some((
            format!(
                "the IOMMU ({}) does not support interrupt remapping",
                lacking.join(", ")
            ),
            "enable interrupt remapping (and x2APIC) in the firmware setup, or use hardware \
             that has it"
                .to_owned(),
        ))
    } else if probe.remapped_interrupts == Ok(false) {
        Some((
            format!(
                "off: no remapped interrupt chips (IR-...) in {}",
                probe.root.join("proc/interrupts").display()
            ),
            "enable interrupt remapping in the firmware setup; `dmesg | grep -i remapping` \
             says why the kernel left it off"
                .to_owned(),
        ))
    } else {
        None
    };
    match problem {
        Some((detail, fix)) if probe.unsafe_interrupts == Some(true) => Check::warning(
            NAME,
            format!(
                "{detail}; vfio_iommu_type1 has allow_unsafe_interrupts=Y, so VFs pass through \
                 without MSI isolation: a guest can inject interrupts into the host"
            ),
            fix,
        ),
        Some((detail, fix)) => Check::error(
            NAME,
            format!("{detail}: vfio_iommu_type1 refuses to pass devices through without it"),
            format!(
                "{fix} (or, accepting that guests can inject interrupts: load vfio_iommu_type1 \
                 with allow_unsafe_interrupts=1)"
            ),
        ),
        None if !probe.iommu_units.is_empty()
            && probe
                .iommu_units
                .iter()
                .all(|u| u.interrupt_remapping == Some(true)) =>
        {
            Check::ok(
                NAME,
                "supported by every IOMMU unit and not turned off on the kernel command line",
            )
        }
        None => Check::unchecked(
            NAME,
            &format!(
                "{}, and no IOMMU unit says whether it remaps interrupts",
                probe
                    .remapped_interrupts
                    .as_ref()
                    .err()
                    .map_or("no remapped interrupt chips listed", String::as_str)
            ),
            "`dmesg | grep -i remapping` should say \"Enabled IRQ remapping\"",
        ),
    }
}

/// Loaded, built in, installed or missing, in words; `None` when missing.
fn module_state(facts: &ModuleFacts) -> Result<Option<&'static str>, String> {
    if facts.pci_driver {
        return Ok(Some("loaded (PCI driver registered)"));
    }
    if facts.loaded {
        return Ok(Some("loaded"));
    }
    match &facts.index {
        Ok(Availability::BuiltIn) => Ok(Some("built into the kernel")),
        Ok(Availability::Installed) => Ok(Some("installed, not loaded yet")),
        Ok(Availability::Missing) => Ok(None),
        Err(why) => Err(why.clone()),
    }
}

/// A module the host needs: an error when this kernel does not have it.
fn required_module(
    probe: &Probe,
    name: String,
    module: &str,
    when_installed: &str,
    fix: &str,
) -> Check {
    let Some(facts) = probe.modules.get(module) else {
        return Check::unchecked(name, "not looked up", format!("modprobe {module}"));
    };
    match module_state(facts) {
        Ok(Some(state)) if state.starts_with("installed") => {
            Check::ok(name, format!("{state}: {when_installed}"))
        }
        Ok(Some(state)) => Check::ok(name, state),
        Ok(None) => Check::error(
            name,
            "not loaded, and not a module of the running kernel",
            fix.to_owned(),
        ),
        Err(why) => Check::warning(
            name,
            format!("not loaded; could not check whether it is installed: {why}"),
            format!("modprobe {module}"),
        ),
    }
}

fn vfio_pci(probe: &Probe) -> Check {
    required_module(
        probe,
        "module:vfio-pci".into(),
        "vfio-pci",
        "vfmap prepare and the daemon load it",
        "install the running kernel's vfio-pci module (CONFIG_VFIO_PCI; on Debian and Ubuntu \
         it is in the linux-image or linux-modules-extra package)",
    )
}

fn vfio_iommu_type1(probe: &Probe) -> Check {
    let check = required_module(
        probe,
        "module:vfio_iommu_type1".into(),
        "vfio_iommu_type1",
        "vfio loads it with vfio-pci",
        "install the running kernel's vfio_iommu_type1 module (CONFIG_VFIO_IOMMU_TYPE1)",
    );
    let iommufd = probe
        .modules
        .get("iommufd")
        .is_some_and(|m| matches!(module_state(m), Ok(Some(_))));
    if check.status == Status::Error && iommufd {
        return Check::warning(
            check.name,
            "not a module of the running kernel, but iommufd is: QEMU must open VFs through \
             iommufd (or its VFIO container compatibility, CONFIG_IOMMUFD_VFIO_CONTAINER)",
            "use a QEMU with iommufd support (-object iommufd), or a kernel with \
             CONFIG_VFIO_IOMMU_TYPE1",
        );
    }
    check
}

fn host_driver(probe: &Probe, driver: &str) -> Check {
    required_module(
        probe,
        format!("host-driver:{driver}"),
        driver,
        "vfmap prepare loads it",
        &format!("install the running kernel's {driver} module, or fix host_driver in the profile"),
    )
}

fn guest_driver(probe: &Probe, driver: &str) -> Check {
    let name = format!("guest-driver:{driver}");
    let Some(facts) = probe.modules.get(driver) else {
        return Check::unchecked(name, "not looked up", "check the guest's kernel");
    };
    match module_state(facts) {
        Ok(Some(_)) => Check::ok(
            name,
            "a module of this host's kernel too (the guest's kernel must have it)",
        ),
        Ok(None) => Check::warning(
            name,
            "not a module of this host's kernel; the guest's kernel must have it",
            format!(
                "check that the guest has it (`modinfo {driver}` in the guest), or fix \
                 guest_driver in the profile"
            ),
        ),
        Err(why) => Check::unchecked(
            name,
            &why,
            format!("`modinfo {driver}` in the guest tells whether it has it"),
        ),
    }
}

/// Discovery's per-device problems, summarised: unreadable attributes, then the rest.
fn discovery_problems(probe: &Probe) -> Vec<Check> {
    let Ok(facts) = &probe.discovered else {
        return Vec::new();
    };
    let (denied, other): (Vec<_>, Vec<_>) =
        facts.problems.iter().partition(|p| p.permission_denied);
    let mut checks = Vec::new();
    if !denied.is_empty() {
        checks.push(Check::warning(
            "permissions",
            format!(
                "{} attributes under {} are unreadable to this user, so some checks are blind",
                denied.len(),
                probe.sysfs_root.display()
            ),
            "run vfmap doctor as root",
        ));
    }
    if let Some(first) = other.first() {
        checks.push(Check::warning(
            "inventory",
            format!(
                "{} problem(s) reading the SR-IOV devices; first: {} {}: {}",
                other.len(),
                first.device,
                first.attribute,
                first.message
            ),
            "see `vfmap inventory` for all of them",
        ));
    }
    checks
}

fn id_pair(vendor: PciId, device: PciId) -> String {
    format!("{:04x}:{:04x}", vendor.0, device.0)
}

/// PFs discovery found, with the card that covers each.
fn covered<'a>(
    facts: &'a HostFacts,
    profiles: &'a Profiles,
) -> impl Iterator<Item = (&'a PfFacts, &'a vfmap_core::profile::Card)> + 'a {
    facts.pfs.iter().filter_map(|pf| {
        let card = profiles.card_for(pf.location, pf.vendor?, pf.device?)?;
        Some((pf, card))
    })
}

fn cards(probe: &Probe, profiles: &Profiles) -> Vec<Check> {
    profiles
        .cards
        .iter()
        .map(|card| {
            let name = format!("card:{}", card.name);
            let wanted = match card.pf {
                Some(pf) => format!("{} at {pf}", id_pair(card.vendor, card.device)),
                None => id_pair(card.vendor, card.device),
            };
            let fix_profile = format!(
                "install the card (`lspci -nn` lists what is there), or fix vendor, device or pf \
                 of card {:?} in {}",
                card.name, card.source
            );
            let (devices, facts) = match (&probe.devices, &probe.discovered) {
                (Ok(devices), Ok(facts)) => (devices, facts),
                (Err(why), _) | (_, Err(why)) => {
                    return Check::unchecked(name, why, "fix the sysfs check first");
                }
            };
            let matching: Vec<&PciDevice> = devices
                .iter()
                .filter(|d| {
                    d.vendor == Some(card.vendor)
                        && d.device == Some(card.device)
                        && card.pf.is_none_or(|pf| d.location == Some(pf))
                })
                .collect();
            if matching.is_empty() {
                return Check::error(
                    name,
                    format!("no PCI device {wanted} on this host"),
                    fix_profile,
                );
            }
            let list = |ds: &[&PciDevice]| {
                ds.iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if matching.iter().all(|d| d.total_vfs.unwrap_or(0) == 0) {
                return Check::error(
                    name,
                    format!(
                        "{} ({wanted}) has no SR-IOV capability: no sriov_totalvfs, or 0",
                        list(&matching)
                    ),
                    "enable SR-IOV in the firmware setup (and in the card's own configuration \
                     tool, if it has one), then reboot",
                );
            }
            let pfs: Vec<(Bdf, u16)> = covered(facts, profiles)
                .filter(|(_, c)| c.name == card.name)
                .map(|(pf, _)| (pf.location, pf.total_vfs.unwrap_or(0)))
                .collect();
            if pfs.is_empty() {
                return Check::warning(
                    name,
                    format!(
                        "{} match, but cards naming them with `pf` take them: this card \
                         covers no PF",
                        list(&matching)
                    ),
                    format!(
                        "remove card {:?} from {}, or its overlap",
                        card.name, card.source
                    ),
                );
            }
            let list: Vec<String> = pfs
                .iter()
                .map(|(pf, total)| format!("{pf} (SR-IOV, up to {total} VFs)"))
                .collect();
            Check::ok(name, format!("covers PF {}", list.join(", ")))
        })
        .collect()
}

fn pfs(probe: &Probe, profiles: &Profiles) -> Vec<Check> {
    let Ok(facts) = &probe.discovered else {
        return Vec::new();
    };
    covered(facts, profiles)
        .map(|(pf, card)| {
            let name = format!("pf:{}", pf.location);
            let prepare = format!(
                "vfmap prepare --profiles {} (VFs in use must be detached first)",
                card.source
            );
            let total = pf.total_vfs.unwrap_or(0);
            if card.num_vfs > total {
                return Check::error(
                    name,
                    format!(
                        "card {:?} wants num_vfs = {}, but this PF allows at most {total} \
                         (sriov_totalvfs)",
                        card.name, card.num_vfs
                    ),
                    format!(
                        "set num_vfs to at most {total} for card {:?} in {}",
                        card.name, card.source
                    ),
                );
            }
            let enabled = pf.num_vfs.map_or("an unknown number of".into(), |n| n.to_string());
            if pf.num_vfs != Some(card.num_vfs) {
                return Check::warning(
                    name,
                    format!(
                        "{enabled} VFs enabled; card {:?} wants {}",
                        card.name, card.num_vfs
                    ),
                    prepare,
                );
            }
            let unbound: Vec<String> = pf
                .vfs
                .iter()
                .filter_map(|vf| {
                    let wanted = card.function_of(vf.vf_index)?.host_driver.as_str();
                    (vf.driver.as_deref() != Some(wanted)).then(|| {
                        format!(
                            "{} on {} instead of {wanted}",
                            vf.location,
                            vf.driver.as_deref().unwrap_or("no driver")
                        )
                    })
                })
                .collect();
            if !unbound.is_empty() {
                return Check::warning(
                    name,
                    format!(
                        "{} VF(s) with a function not on their host driver: {}",
                        unbound.len(),
                        first_few(&unbound)
                    ),
                    prepare,
                );
            }
            Check::ok(
                name,
                format!(
                    "{} of {total} VFs enabled, as card {:?} wants; each VF with a function is on its host driver",
                    card.num_vfs, card.name
                ),
            )
        })
        .collect()
}

/// The first items of a list, and how many more.
fn first_few(items: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SHOWN {
        text += &format!("; and {} more", items.len() - SHOWN);
    }
    text
}

/// Every VF of a PF alone in its IOMMU group, or sharing it only with sibling VFs.
fn groups(probe: &Probe, profiles: &Profiles) -> Vec<Check> {
    let Ok(facts) = &probe.discovered else {
        return Vec::new();
    };
    let pfs: Vec<(&PfFacts, u16)> = if profiles.cards.is_empty() {
        facts
            .pfs
            .iter()
            .map(|pf| (pf, pf.num_vfs.unwrap_or(0)))
            .collect()
    } else {
        covered(facts, profiles)
            .map(|(pf, card)| (pf, card.num_vfs))
            .collect()
    };
    let devices: BTreeMap<&str, &PciDevice> = probe
        .devices
        .iter()
        .flatten()
        .map(|d| (d.name.as_str(), d))
        .collect();
    let describe = |name: &str| match devices.get(name) {
        Some(d) => {
            let ids = match (d.vendor, d.device) {
                (Some(v), Some(dev)) => format!("{}, ", id_pair(v, dev)),
                _ => String::new(),
            };
            let driver = d
                .driver
                .as_deref()
                .map_or("no driver".to_owned(), |d| format!("driver {d}"));
            format!("{name} ({ids}{driver})")
        }
        None => name.to_owned(),
    };
    let mut checks = Vec::new();
    for (pf, wanted) in pfs {
        let name = format!("iommu-groups:{}", pf.location);
        if pf.vfs.is_empty() {
            if wanted > 0 {
                checks.push(Check::unchecked(
                    name,
                    "no VFs enabled yet",
                    "run vfmap prepare, then vfmap doctor again",
                ));
            }
            continue;
        }
        if !iommu_on(probe) {
            checks.push(Check::unchecked(
                name,
                "the IOMMU is off (see the iommu check)",
                "turn the IOMMU on first",
            ));
            continue;
        }
        let pf_name = pf.location.to_string();
        let mut family: BTreeSet<String> = pf.vfs.iter().map(|v| v.location.to_string()).collect();
        family.extend(
            devices
                .values()
                .filter(|d| d.physfn.as_deref() == Some(pf_name.as_str()))
                .map(|d| d.name.clone()),
        );
        let (mut foreign, mut without, mut shared) = (Vec::new(), Vec::new(), Vec::new());
        for vf in &pf.vfs {
            let Some(group) = vf.iommu_group else {
                without.push(vf.location.to_string());
                continue;
            };
            let members = probe.group_members.get(&group);
            let others: Vec<String> = members
                .into_iter()
                .flatten()
                .filter(|m| !family.contains(*m))
                .map(|m| describe(m))
                .collect();
            if !others.is_empty() {
                foreign.push(format!(
                    "VF {} shares IOMMU group {group} with {}",
                    vf.location,
                    others.join(", ")
                ));
            } else if members.is_some_and(|m| m.len() > 1) {
                shared.push(vf.location.to_string());
            }
        }
        if !foreign.is_empty() || !without.is_empty() {
            let mut problems = foreign.clone();
            let mut fixes = Vec::new();
            if !foreign.is_empty() {
                fixes.push(
                    "vfio passes a whole IOMMU group to one VM and refuses a group with devices \
                     on host drivers: put the card in a slot whose upstream bridges have ACS \
                     (or enable ACS in the firmware setup) so its VFs get groups of their own; \
                     do not use pcie_acs_override, which only hides the problem",
                );
            }
            if !without.is_empty() {
                problems.push(format!("no IOMMU group for VF {}", without.join(", ")));
                fixes.push("the IOMMU must cover the card: see the iommu check");
            }
            checks.push(Check::error(name, first_few(&problems), fixes.join("; ")));
        } else if shared.is_empty() {
            checks.push(Check::ok(
                name,
                format!(
                    "each of the {} VFs is alone in its IOMMU group",
                    pf.vfs.len()
                ),
            ));
        } else {
            checks.push(Check::ok(
                name,
                format!(
                    "no VF shares its IOMMU group with another device; VF {} share(s) groups \
                     with sibling VFs, which can only go to the same VM",
                    shared.join(", ")
                ),
            ));
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfmap_core::VfFacts;

    struct Index(&'static [&'static str]);

    impl ModuleIndex for Index {
        fn availability(&self, module: &str) -> Result<Availability, String> {
            Ok(
                if self.0.iter().any(|m| module_key(m) == module_key(module)) {
                    Availability::Installed
                } else {
                    Availability::Missing
                },
            )
        }
    }

    fn bdf(text: &str) -> Bdf {
        text.parse().unwrap()
    }

    fn device(name: &str, group: u32, physfn: Option<&str>) -> PciDevice {
        PciDevice {
            name: name.into(),
            location: name.parse().ok(),
            vendor: Some(PciId(0x1b36)),
            device: Some(PciId(0x0010)),
            total_vfs: physfn.is_none().then_some(2),
            iommu_group: Some(group),
            driver: Some(if physfn.is_some() { "vfio-pci" } else { "nvme" }.into()),
            physfn: physfn.map(str::to_owned),
        }
    }

    /// A host with one PF (group 1) and two VFs (groups 2 and 3), all green.
    fn green() -> Probe {
        let vf = |i: u16, group| VfFacts {
            location: bdf("0000:01:00.0").vf_location(1, 1, i).unwrap(),
            vf_index: i,
            numa_node: None,
            iommu_group: Some(group),
            driver: Some("vfio-pci".into()),
            driver_override: Some("vfio-pci".into()),
        };
        let pf = PfFacts {
            location: bdf("0000:01:00.0"),
            vendor: Some(PciId(0x1b36)),
            device: Some(PciId(0x0010)),
            numa_node: None,
            driver: Some("nvme".into()),
            total_vfs: Some(2),
            num_vfs: Some(2),
            vf_device: Some(PciId(0x0010)),
            drivers_autoprobe: Some(false),
            vfs: vec![vf(0, 2), vf(1, 3)],
        };
        let devices = vec![
            device("0000:01:00.0", 1, None),
            device("0000:01:00.1", 2, Some("0000:01:00.0")),
            device("0000:01:00.2", 3, Some("0000:01:00.0")),
        ];
        let mut group_members: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for d in &devices {
            group_members
                .entry(d.iommu_group.unwrap())
                .or_default()
                .insert(d.name.clone());
        }
        let index = Index(&["vfio-pci", "vfio_iommu_type1"]);
        let modules = ["vfio-pci", "vfio_iommu_type1", "iommufd", "nvme"]
            .into_iter()
            .map(|m| {
                let facts = ModuleFacts {
                    pci_driver: m == "nvme",
                    loaded: false,
                    index: index.availability(m),
                };
                (m.to_owned(), facts)
            })
            .collect();
        Probe {
            sysfs_root: "/sys".into(),
            root: "/".into(),
            discovered: Ok(HostFacts {
                pfs: vec![pf],
                problems: Vec::new(),
            }),
            devices: Ok(devices),
            iommu_groups: Ok(Some(3)),
            group_members,
            iommu_units: vec![IommuUnit {
                name: "dmar0".into(),
                interrupt_remapping: Some(true),
            }],
            cmdline: Ok("quiet intel_iommu=on".into()),
            remapped_interrupts: Ok(true),
            unsafe_interrupts: Some(false),
            modules,
        }
    }

    const PROFILE: &str = r#"
[[card]]
name = "nvme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 2
[[card.function]]
name = "storage"
vfs = "0-1"
guest_driver = "nvme"
"#;

    fn status_of<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}: {checks:#?}"))
    }

    #[test]
    fn a_green_host_has_only_ok_checks() {
        let profiles = Profiles::parse(PROFILE, "p.toml").unwrap();
        let checks = assess(&green(), &profiles);
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:#?}");
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "iommu",
                "interrupt-remapping",
                "module:vfio-pci",
                "module:vfio_iommu_type1",
                "card:nvme",
                "pf:0000:01:00.0",
                "iommu-groups:0000:01:00.0",
                "guest-driver:nvme"
            ]
        );
    }

    #[test]
    fn interrupt_remapping_off_is_an_error_unless_unsafe_interrupts_are_allowed() {
        let profiles = Profiles::default();
        let mut probe = green();
        probe.remapped_interrupts = Ok(false);
        probe.cmdline = Ok("intremap=nosid,off".into());
        let check = status_of(&assess(&probe, &profiles), "interrupt-remapping").clone();
        assert_eq!(check.status, Status::Error, "{check:?}");
        assert!(check.detail.contains("intremap=nosid,off"), "{check:?}");
        probe.unsafe_interrupts = Some(true);
        let check = status_of(&assess(&probe, &profiles), "interrupt-remapping").clone();
        assert_eq!(check.status, Status::Warning, "{check:?}");
        assert!(
            check.detail.contains("allow_unsafe_interrupts"),
            "{check:?}"
        );
        // Unknown either way: says it could not check.
        let mut probe = green();
        probe.remapped_interrupts = Err("no /proc/interrupts".into());
        probe.iommu_units.clear();
        let check = status_of(&assess(&probe, &profiles), "interrupt-remapping").clone();
        assert_eq!(check.status, Status::Warning);
        assert!(check.detail.starts_with("could not check"), "{check:?}");
    }

    #[test]
    fn siblings_may_share_a_group_other_devices_may_not() {
        let profiles = Profiles::default();
        let mut probe = green();
        // Both VFs in group 2: fine (with a note).
        probe.discovered.as_mut().unwrap().pfs[0].vfs[1].iommu_group = Some(2);
        probe
            .group_members
            .get_mut(&2)
            .unwrap()
            .insert("0000:01:00.2".into());
        let check = status_of(&assess(&probe, &profiles), "iommu-groups:0000:01:00.0").clone();
        assert_eq!(check.status, Status::Ok, "{check:?}");
        assert!(check.detail.contains("sibling"), "{check:?}");
        // The PF itself in the group: an error naming it.
        probe
            .group_members
            .get_mut(&2)
            .unwrap()
            .insert("0000:01:00.0".into());
        let check = status_of(&assess(&probe, &profiles), "iommu-groups:0000:01:00.0").clone();
        assert_eq!(check.status, Status::Error, "{check:?}");
        assert!(
            check
                .detail
                .contains("0000:01:00.0 (1b36:0010, driver nvme)"),
            "{check:?}"
        );
    }

    #[test]
    fn modules_index_reads_dep_and_builtin() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/vfio.ko.xz\n\
             kernel/drivers/vfio/vfio_iommu_type1.ko:\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/pci/pci-stub.ko\n",
        )
        .unwrap();
        let index = ModulesDir::open(dir.path());
        assert_eq!(index.availability("vfio_pci"), Ok(Availability::Installed));
        assert_eq!(
            index.availability("vfio-iommu-type1"),
            Ok(Availability::Installed)
        );
        assert_eq!(index.availability("pci-stub"), Ok(Availability::BuiltIn));
        assert_eq!(index.availability("nvme"), Ok(Availability::Missing));
        let none = ModulesDir::open(&dir.path().join("nope"));
        assert!(
            none.availability("nvme")
                .unwrap_err()
                .contains("no module index")
        );
    }

    #[test]
    fn cmdline_words() {
        let line = "BOOT_IMAGE=/vmlinuz intel_iommu=on,sm_on iommu=pt intremap=off";
        assert_eq!(
            cmdline_has(line, &["intel_iommu"], "on"),
            Some("intel_iommu=on,sm_on")
        );
        assert_eq!(cmdline_has(line, &["intel_iommu", "iommu"], "off"), None);
        assert_eq!(
            cmdline_has(line, &["intremap"], "off"),
            Some("intremap=off")
        );
    }
}
