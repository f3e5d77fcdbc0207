//! Reading a libvirt domain's live XML (`virsh dumpxml`): pure functions, no I/O.
//!
//! What vfmap needs from a domain: whether it runs, its hot-pluggable `pcie-root-port`
//! controllers (the slots) and what sits behind each, the unix socket of the agent's virtio
//! channel, vfmap's own hostdevs (aliases `ua-vfmap-vf<N>`), and each root port's address on
//! the root bus (the first hop of a device's guest path).
//!
//! The document comes from libvirtd, but it is still parsed defensively: it is bounded in
//! size, a DTD (and so any entity declaration) is refused, and every number is checked.

use std::collections::BTreeMap;

use roxmltree::{Document, Node, ParsingOptions};
use vfmap_core::protocol::GuestPath;
use vfmap_core::{Bdf, SlotId};

/// The largest domain XML read (a domain with hundreds of devices stays far below it).
pub const MAX_XML: usize = 4 * 1024 * 1024;
/// The prefix libvirt requires of user-given aliases.
pub const ALIAS_PREFIX: &str = "ua-";

/// Why a domain's XML could not be read, or lacks what vfmap needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Too large to be a domain.
    #[error("the domain XML is {0} bytes, more than the {MAX_XML} read")]
    TooLarge(usize),
    /// Not well-formed XML (or it declares a DTD).
    #[error("the domain XML does not parse: {0}")]
    Parse(String),
    /// Well-formed, but not a domain as libvirt writes it.
    #[error("the domain XML is malformed: {0}")]
    Malformed(String),
}

/// A PCI address in libvirt's `<address type='pci' domain= bus= slot= function=/>` form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PciAddress {
    /// PCI domain.
    pub domain: u32,
    /// Bus (for a device behind a root port: the root port controller's index).
    pub bus: u8,
    /// Slot (device), 0..=31.
    pub slot: u8,
    /// Function, 0..=7.
    pub function: u8,
}

/// A `pcie-root-port` controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootPort {
    /// The controller's index: the bus number of what is plugged behind it, in libvirt's
    /// addressing.
    pub index: u8,
    /// libvirt's alias of the controller (`pci.<index>`), used as vfmap's slot id.
    pub alias: Option<String>,
    /// Whether hot-plug is on (`hotplug='off'` turns it off; on by default).
    pub hotplug: bool,
    /// Where the root port itself sits (on the root bus for a hot-plug slot).
    pub address: Option<PciAddress>,
    /// What sits behind it: the devices' aliases (or element names when they have none).
    pub occupants: Vec<String>,
}

/// A unix channel with a virtio target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// The virtio port name (`<target type='virtio' name=…>`).
    pub name: String,
    /// The host socket (`<source path=…>`), if given.
    pub path: Option<String>,
}

/// A PCI `<hostdev>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostdev {
    /// Its alias (`ua-…` when given by the user, `hostdevN` when by libvirt).
    pub alias: Option<String>,
    /// The host device.
    pub source: Option<Bdf>,
    /// Where it sits in the guest, in libvirt's addressing.
    pub address: Option<PciAddress>,
    /// `managed='yes'`.
    pub managed: bool,
}

/// What vfmap reads from a domain's XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// `<name>`.
    pub name: String,
    /// Whether the domain runs: only an active domain's live XML carries `id=`.
    pub active: bool,
    /// Every `pcie-root-port` controller, by index.
    pub root_ports: Vec<RootPort>,
    /// Every unix channel with a virtio target.
    pub channels: Vec<Channel>,
    /// Every PCI hostdev.
    pub hostdevs: Vec<Hostdev>,
}

fn malformed(what: impl Into<String>) -> XmlError {
    XmlError::Malformed(what.into())
}

/// libvirt writes numbers as `0x..` hex or decimal.
fn number(node: Node, attr: &str, max: u32) -> Result<Option<u32>, XmlError> {
    let Some(text) = node.attribute(attr) else {
        return Ok(None);
    };
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.len() <= 8 => u32::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !text.is_empty()
            && text.len() <= 10
            && text.bytes().all(|b| b.is_ascii_digit()) =>
        {
            text.parse().ok()
        }
        None => None,
    };
    match parsed {
        Some(n) if n <= max => Ok(Some(n)),
        _ => Err(malformed(format!(
            "<{}> {attr}={text:?} is not a number up to {max:#x}",
            node.tag_name().name()
        ))),
    }
}

fn pci_address(node: Node) -> Result<PciAddress, XmlError> {
    let field =
        |attr, max| -> Result<u32, XmlError> { Ok(number(node, attr, max)?.unwrap_or_default()) };
    Ok(PciAddress {
        domain: field("domain", 0xffff_ffff)?,
        bus: field("bus", 0xff)? as u8,
        slot: field("slot", 0x1f)? as u8,
        function: field("function", 7)? as u8,
    })
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// A device's own guest address (its direct `<address type='pci'>` child).
fn guest_address(device: Node) -> Result<Option<PciAddress>, XmlError> {
    match child(device, "address") {
        Some(a) if a.attribute("type") == Some("pci") => pci_address(a).map(Some),
        _ => Ok(None),
    }
}

fn alias(device: Node) -> Option<String> {
    child(device, "alias")
        .and_then(|a| a.attribute("name"))
        .map(str::to_owned)
}

/// Parses a domain's XML.
pub fn parse(xml: &str) -> Result<Domain, XmlError> {
    if xml.len() > MAX_XML {
        return Err(XmlError::TooLarge(xml.len()));
    }
    let options = ParsingOptions {
        allow_dtd: false,
        ..ParsingOptions::default()
    };
    let doc =
        Document::parse_with_options(xml, options).map_err(|e| XmlError::Parse(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(malformed(format!(
            "the root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    let name = child(root, "name")
        .and_then(|n| n.text())
        .ok_or_else(|| malformed("no <name>"))?
        .to_owned();
    let active = root.attribute("id").is_some();
    let mut root_ports = Vec::new();
    let mut channels = Vec::new();
    let mut hostdevs = Vec::new();
    // Devices behind each bus, by bus number (libvirt's: a controller's index).
    let mut behind: BTreeMap<u8, Vec<String>> = BTreeMap::new();
    if let Some(devices) = child(root, "devices") {
        for device in devices.children().filter(Node::is_element) {
            let tag = device.tag_name().name();
            let address = guest_address(device)?;
            if let Some(a) = address.filter(|a| a.bus != 0) {
                behind
                    .entry(a.bus)
                    .or_default()
                    .push(alias(device).unwrap_or_else(|| tag.to_owned()));
            }
            match tag {
                "controller"
                    if device.attribute("type") == Some("pci")
                        && device.attribute("model") == Some("pcie-root-port") =>
                {
                    let index = number(device, "index", 0xff)?
                        .ok_or_else(|| malformed("a pcie-root-port controller without index"))?
                        as u8;
                    if root_ports.iter().any(|p: &RootPort| p.index == index) {
                        return Err(malformed(format!("two pci controllers with index {index}")));
                    }
                    let hotplug = child(device, "target")
                        .and_then(|t| t.attribute("hotplug"))
                        .is_none_or(|h| h != "off");
                    root_ports.push(RootPort {
                        index,
                        alias: alias(device),
                        hotplug,
                        address,
                        occupants: Vec::new(),
                    });
                }
                "channel" if device.attribute("type") == Some("unix") => {
                    let target = child(device, "target");
                    if let Some(name) = target
                        .filter(|t| t.attribute("type") == Some("virtio"))
                        .and_then(|t| t.attribute("name"))
                    {
                        channels.push(Channel {
                            name: name.to_owned(),
                            path: child(device, "source")
                                .and_then(|s| s.attribute("path"))
                                .map(str::to_owned),
                        });
                    }
                }
                "hostdev"
                    if device.attribute("mode") == Some("subsystem")
                        && device.attribute("type") == Some("pci") =>
                {
                    let source = match child(device, "source").and_then(|s| child(s, "address")) {
                        Some(a) => {
                            let a = pci_address(a)?;
                            Some(
                                format!(
                                    "{:04x}:{:02x}:{:02x}.{:x}",
                                    a.domain, a.bus, a.slot, a.function
                                )
                                .parse::<Bdf>()
                                .map_err(|e| malformed(format!("hostdev source address: {e}")))?,
                            )
                        }
                        None => None,
                    };
                    hostdevs.push(Hostdev {
                        alias: alias(device),
                        source,
                        address,
                        managed: device.attribute("managed") == Some("yes"),
                    });
                }
                _ => {}
            }
        }
    }
    root_ports.sort_by_key(|p| p.index);
    for port in &mut root_ports {
        port.occupants = behind.remove(&port.index).unwrap_or_default();
    }
    Ok(Domain {
        name,
        active,
        root_ports,
        channels,
        hostdevs,
    })
}

/// Why a domain cannot be registered as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Not running.
    #[error("domain {0:?} is not running: start it (virsh start {0}) before registering it")]
    NotRunning(String),
    /// No channel with that name.
    #[error(
        "domain {domain:?} has no unix virtio channel named {port_name:?} (found: {found}); add <channel type='unix'><source mode='bind' path='…'/><target type='virtio' name='{port_name}'/></channel>, see examples/libvirt-domain.xml"
    )]
    NoChannel {
        /// The domain.
        domain: String,
        /// The port name looked for.
        port_name: String,
        /// The channels there are.
        found: String,
    },
    /// The channel has no host path.
    #[error("domain {domain:?}: channel {port_name:?} has no <source path=…>")]
    ChannelWithoutPath {
        /// The domain.
        domain: String,
        /// The port name.
        port_name: String,
    },
    /// No hot-pluggable root port is free.
    #[error(
        "domain {domain:?} has no free hot-pluggable pcie-root-port ({detail}); add empty <controller type='pci' model='pcie-root-port'/> controllers (they cannot be hot-plugged: restart the domain after), see examples/libvirt-domain.xml"
    )]
    NoFreeRootPort {
        /// The domain.
        domain: String,
        /// What the root ports are.
        detail: String,
    },
    /// A slot asked for is not a root port of the domain.
    #[error("domain {domain:?} has no pcie-root-port with alias {slot} (its root ports: {known})")]
    SlotUnknown {
        /// The domain.
        domain: String,
        /// The slot.
        slot: String,
        /// The aliases there are.
        known: String,
    },
    /// A slot asked for cannot take a VF.
    #[error("domain {domain:?}: root port {slot} {why}")]
    SlotUnusable {
        /// The domain.
        domain: String,
        /// The slot.
        slot: String,
        /// Why.
        why: String,
    },
}

/// Whether a device alias is one vfmap gives (`ua-vfmap-…`).
pub fn is_vfmap_alias(alias: &str) -> bool {
    alias.starts_with("ua-vfmap-")
}

impl RootPort {
    /// Free for vfmap: nothing behind it but (at most) vfmap's own device.
    pub fn free_for_vfmap(&self) -> bool {
        self.occupants.iter().all(|o| is_vfmap_alias(o))
    }

    fn describe(&self) -> String {
        let name = self
            .alias
            .clone()
            .unwrap_or(format!("index {}", self.index));
        if !self.hotplug {
            format!("{name}: hotplug='off'")
        } else if !self.occupants.is_empty() {
            format!("{name}: holds {}", self.occupants.join(", "))
        } else if !on_root_bus(self) {
            format!("{name}: not on the root bus")
        } else {
            format!("{name}: free")
        }
    }
}

fn on_root_bus(port: &RootPort) -> bool {
    port.address.is_some_and(|a| a.bus == 0)
}

/// What registering a domain takes from its live XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The slots, in controller index order: the aliases of its hot-pluggable root ports on
    /// the root bus that are empty (or hold vfmap's own device).
    pub slots: Vec<SlotId>,
    /// The agent channel's host socket.
    pub agent_socket: String,
}

/// The slots and agent socket of a running domain; `wanted` (when not empty) narrows the
/// slots to these root ports, in that order.
pub fn registration(
    domain: &Domain,
    port_name: &str,
    wanted: &[SlotId],
) -> Result<Registration, DomainError> {
    if !domain.active {
        return Err(DomainError::NotRunning(domain.name.clone()));
    }
    let channel = domain
        .channels
        .iter()
        .find(|c| c.name == port_name)
        .ok_or_else(|| DomainError::NoChannel {
            domain: domain.name.clone(),
            port_name: port_name.to_owned(),
            found: if domain.channels.is_empty() {
                "none".into()
            } else {
                domain
                    .channels
                    .iter()
                    .map(|c| format!("{:?}", c.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?;
    let agent_socket = channel
        .path
        .clone()
        .ok_or_else(|| DomainError::ChannelWithoutPath {
            domain: domain.name.clone(),
            port_name: port_name.to_owned(),
        })?;
    let usable = |p: &RootPort| p.hotplug && on_root_bus(p) && p.free_for_vfmap();
    let slot_of = |p: &RootPort| p.alias.as_deref().and_then(|a| SlotId::new(a).ok());
    let slots: Vec<SlotId> = if wanted.is_empty() {
        domain
            .root_ports
            .iter()
            .filter(|p| usable(p))
            .filter_map(slot_of)
            .collect()
    } else {
        let mut slots = Vec::new();
        for slot in wanted {
            let port = domain
                .root_ports
                .iter()
                .find(|p| p.alias.as_deref() == Some(slot.as_str()))
                .ok_or_else(|| DomainError::SlotUnknown {
                    domain: domain.name.clone(),
                    slot: slot.to_string(),
                    known: domain
                        .root_ports
                        .iter()
                        .filter_map(|p| p.alias.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            if !usable(port) {
                return Err(DomainError::SlotUnusable {
                    domain: domain.name.clone(),
                    slot: slot.to_string(),
                    why: port.describe(),
                });
            }
            slots.push(slot.clone());
        }
        slots
    };
    if slots.is_empty() {
        return Err(DomainError::NoFreeRootPort {
            domain: domain.name.clone(),
            detail: if domain.root_ports.is_empty() {
                "it has none".into()
            } else {
                domain
                    .root_ports
                    .iter()
                    .map(RootPort::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        });
    }
    Ok(Registration {
        slots,
        agent_socket,
    })
}

impl Domain {
    /// The root port whose alias is `slot`.
    pub fn root_port(&self, slot: &str) -> Option<&RootPort> {
        self.root_ports
            .iter()
            .find(|p| p.alias.as_deref() == Some(slot))
    }

    /// The hostdev with this alias.
    pub fn hostdev(&self, alias: &str) -> Option<&Hostdev> {
        self.hostdevs
            .iter()
            .find(|h| h.alias.as_deref() == Some(alias))
    }

    /// The guest path of the hostdev with this alias: its root port's slot and function on the
    /// root bus, then its own slot and function behind it. `None` when it is not there, or not
    /// directly behind a root port on the root bus.
    pub fn guest_path(&self, alias: &str) -> Option<GuestPath> {
        let address = self.hostdev(alias)?.address?;
        let port = self.root_ports.iter().find(|p| p.index == address.bus)?;
        let port_address = port.address.filter(|a| a.bus == 0)?;
        Some(GuestPath {
            port_device: port_address.slot,
            port_function: port_address.function,
            device: address.slot,
            function: address.function,
        })
    }

    /// The aliases of every hostdev, user aliases without libvirt's `ua-` prefix (vfmap's
    /// device ids).
    pub fn device_ids(&self) -> Vec<String> {
        self.hostdevs
            .iter()
            .filter_map(|h| h.alias.as_deref())
            .map(|a| a.strip_prefix(ALIAS_PREFIX).unwrap_or(a).to_owned())
            .collect()
    }
}

/// The `<hostdev>` vfmap hot-plugs: the VF `vf`, `managed='no'` (vfmap binds vfio-pci itself),
/// alias `alias`, at slot 0 behind the root port of controller index `bus`.
pub fn hostdev_xml(vf: Bdf, alias: &str, bus: u8) -> String {
    let text = vf.to_string();
    // Bdf displays as dddd:bb:dd.f.
    let (domain, rest) = text.split_once(':').unwrap_or(("0000", &text));
    let (host_bus, rest) = rest.split_once(':').unwrap_or(("00", rest));
    let (slot, function) = rest.split_once('.').unwrap_or((rest, "0"));
    format!(
        "<hostdev mode='subsystem' type='pci' managed='no'>\n  <driver name='vfio'/>\n  <source>\n    <address domain='0x{domain}' bus='0x{host_bus}' slot='0x{slot}' function='0x{function}'/>\n  </source>\n  <alias name='{alias}'/>\n  <address type='pci' domain='0x0000' bus='{bus:#04x}' slot='0x00' function='0x0'/>\n</hostdev>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = include_str!("../../tests/fixtures/libvirt/running-empty.xml");
    const HOSTDEV: &str = include_str!("../../tests/fixtures/libvirt/running-hostdev.xml");
    const INACTIVE: &str = include_str!("../../tests/fixtures/libvirt/inactive.xml");
    const AFTER_DETACH: &str =
        include_str!("../../tests/fixtures/libvirt/running-after-detach.xml");
    const SHUT_OFF: &str = include_str!("../../tests/fixtures/libvirt/shut-off.xml");
    const PORT: &str = "org.vfmap.0";

    fn slots(names: &[&str]) -> Vec<SlotId> {
        names.iter().map(|n| SlotId::new(n).unwrap()).collect()
    }

    #[test]
    fn a_running_domain_gives_its_free_root_ports_and_channel() {
        let domain = parse(EMPTY).unwrap();
        assert_eq!(domain.name, "inner");
        assert!(domain.active);
        let ports: Vec<(u8, Option<&str>, bool)> = domain
            .root_ports
            .iter()
            .map(|p| (p.index, p.alias.as_deref(), p.hotplug))
            .collect();
        assert_eq!(
            ports,
            [
                (1, Some("pci.1"), true),
                (2, Some("pci.2"), true),
                (3, Some("pci.3"), true),
                (4, Some("pci.4"), true),
                (5, Some("pci.5"), true)
            ]
        );
        // libvirt placed the virtio-serial controller behind the first root port itself.
        assert_eq!(domain.root_ports[0].occupants, ["virtio-serial0"]);
        assert!(
            domain.root_ports[1..]
                .iter()
                .all(|p| p.occupants.is_empty())
        );
        assert_eq!(
            domain.root_ports[2].address,
            Some(PciAddress {
                domain: 0,
                bus: 0,
                slot: 1,
                function: 2
            })
        );
        let r = registration(&domain, PORT, &[]).unwrap();
        assert_eq!(r.slots, slots(&["pci.2", "pci.3", "pci.4", "pci.5"]));
        assert_eq!(r.agent_socket, "/run/vfmap-nested/inner.agent");
        assert!(domain.hostdevs.is_empty() && domain.device_ids().is_empty());
    }

    #[test]
    fn a_vfmap_hostdev_is_read_with_its_guest_path() {
        let domain = parse(HOSTDEV).unwrap();
        assert_eq!(
            domain.hostdevs,
            [Hostdev {
                alias: Some("ua-vfmap-vf1".into()),
                source: Some("0000:01:00.2".parse().unwrap()),
                address: Some(PciAddress {
                    domain: 0,
                    bus: 3,
                    slot: 0,
                    function: 0
                }),
                managed: false,
            }]
        );
        assert_eq!(domain.device_ids(), ["vfmap-vf1"]);
        assert_eq!(
            domain.guest_path("ua-vfmap-vf1").unwrap().to_string(),
            "01.2/00.0"
        );
        assert_eq!(domain.guest_path("ua-vfmap-vf9"), None);
        assert_eq!(
            domain.root_port("pci.3").unwrap().occupants,
            ["ua-vfmap-vf1"]
        );
        // A root port holding vfmap's own device stays one of the VM's slots (re-registering
        // a domain keeps its numbering).
        let r = registration(&domain, PORT, &[]).unwrap();
        assert_eq!(r.slots, slots(&["pci.2", "pci.3", "pci.4", "pci.5"]));
    }

    #[test]
    fn detached_devices_are_gone_from_the_live_xml() {
        let domain = parse(AFTER_DETACH).unwrap();
        assert!(domain.active && domain.hostdevs.is_empty());
        assert!(domain.root_port("pci.3").unwrap().occupants.is_empty());
        // The persistent definition never had the live-only device.
        let inactive = parse(INACTIVE).unwrap();
        assert!(!inactive.active && inactive.hostdevs.is_empty());
    }

    #[test]
    fn a_domain_that_is_not_running_is_refused() {
        for xml in [SHUT_OFF, INACTIVE] {
            let domain = parse(xml).unwrap();
            assert!(!domain.active);
            assert_eq!(
                registration(&domain, PORT, &[]),
                Err(DomainError::NotRunning("inner".into()))
            );
        }
    }

    #[test]
    fn missing_pieces_are_named() {
        let domain = parse(EMPTY).unwrap();
        let e = registration(&domain, "org.other.0", &[]).unwrap_err();
        assert!(matches!(&e, DomainError::NoChannel { found, .. } if found == "\"org.vfmap.0\""));
        assert!(
            e.to_string()
                .contains("target type='virtio' name='org.other.0'"),
            "{e}"
        );
        let e = registration(&domain, PORT, &slots(&["pci.1"])).unwrap_err();
        assert!(e.to_string().contains("pci.1: holds virtio-serial0"), "{e}");
        let e = registration(&domain, PORT, &slots(&["pci.9"])).unwrap_err();
        assert!(matches!(e, DomainError::SlotUnknown { .. }), "{e}");
        assert_eq!(
            registration(&domain, PORT, &slots(&["pci.4", "pci.2"]))
                .unwrap()
                .slots,
            slots(&["pci.4", "pci.2"])
        );
        // Hot-plug off everywhere: no slot at all, and the error says why per port.
        let off = EMPTY.replace("<target chassis=", "<target hotplug='off' chassis=");
        let domain = parse(&off).unwrap();
        assert!(domain.root_ports.iter().all(|p| !p.hotplug));
        let e = registration(&domain, PORT, &[]).unwrap_err();
        assert!(matches!(e, DomainError::NoFreeRootPort { .. }), "{e}");
        assert!(e.to_string().contains("pci.2: hotplug='off'"), "{e}");
        // No root ports at all.
        let none = "<domain id='3'><name>d</name><devices/></domain>";
        let e = registration(&parse(none).unwrap(), PORT, &[]).unwrap_err();
        assert!(matches!(e, DomainError::NoChannel { .. }), "{e}");
        let channel_only = "<domain id='3'><name>d</name><devices><channel type='unix'><source mode='bind' path='/run/a'/><target type='virtio' name='org.vfmap.0'/></channel></devices></domain>";
        let e = registration(&parse(channel_only).unwrap(), PORT, &[]).unwrap_err();
        assert!(e.to_string().contains("it has none"), "{e}");
        let no_path = "<domain id='3'><name>d</name><devices><channel type='unix'><target type='virtio' name='org.vfmap.0'/></channel></devices></domain>";
        let e = registration(&parse(no_path).unwrap(), PORT, &[]).unwrap_err();
        assert!(matches!(e, DomainError::ChannelWithoutPath { .. }), "{e}");
    }

    #[test]
    fn malformed_or_hostile_xml_is_refused_clearly() {
        let laughs = r#"<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>
<domain id='1'><name>&b;</name></domain>"#;
        assert!(matches!(parse(laughs), Err(XmlError::Parse(_))));
        let huge = format!(
            "<domain><name>x</name><!--{}--></domain>",
            "a".repeat(MAX_XML)
        );
        assert!(matches!(parse(&huge), Err(XmlError::TooLarge(_))));
        for (xml, want) in [
            ("", "does not parse"),
            ("<domain><name>x</name>", "does not parse"),
            ("<network><name>x</name></network>", "not <domain>"),
            ("<domain id='1'><devices/></domain>", "no <name>"),
            (
                "<domain><name>x</name><devices><controller type='pci' model='pcie-root-port'/></devices></domain>",
                "without index",
            ),
            (
                "<domain><name>x</name><devices><controller type='pci' index='0x100' model='pcie-root-port'/></devices></domain>",
                "index=\"0x100\"",
            ),
            (
                "<domain><name>x</name><devices><controller type='pci' index='1' model='pcie-root-port'/><controller type='pci' index='1' model='pcie-root-port'/></devices></domain>",
                "two pci controllers with index 1",
            ),
            (
                "<domain><name>x</name><devices><hostdev mode='subsystem' type='pci'><address type='pci' bus='0x01' slot='0x20'/></hostdev></devices></domain>",
                "slot=\"0x20\"",
            ),
            (
                "<domain><name>x</name><devices><hostdev mode='subsystem' type='pci'><address type='pci' bus='-1'/></hostdev></devices></domain>",
                "bus=\"-1\"",
            ),
            (
                "<domain><name>x</name><devices><disk><address type='pci' bus='0x' /></disk></devices></domain>",
                "bus=\"0x\"",
            ),
            (
                "<domain><name>x</name><devices><disk><address type='pci' function='99999999999'/></disk></devices></domain>",
                "function=\"99999999999\"",
            ),
        ] {
            let e = parse(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
    }

    #[test]
    fn the_hostdev_vfmap_plugs_reads_back() {
        let hostdev = hostdev_xml("0000:01:00.3".parse().unwrap(), "ua-vfmap-vf2", 4);
        assert!(hostdev.contains("managed='no'"));
        let doc = EMPTY.replace("<memballoon", &format!("{hostdev}<memballoon"));
        let domain = parse(&doc).unwrap();
        let h = domain.hostdev("ua-vfmap-vf2").unwrap();
        assert_eq!(h.source, Some("0000:01:00.3".parse().unwrap()));
        assert_eq!(
            h.address.map(|a| (a.bus, a.slot, a.function)),
            Some((4, 0, 0))
        );
        assert!(!h.managed);
        assert_eq!(
            domain.guest_path("ua-vfmap-vf2").unwrap().to_string(),
            "01.3/00.0"
        );
        assert_eq!(
            domain.root_port("pci.4").unwrap().occupants,
            ["ua-vfmap-vf2"]
        );
    }
}
