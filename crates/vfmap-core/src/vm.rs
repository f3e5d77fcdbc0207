//! VMs as the pool knows them: their names, hot-plug slots, backends, and the rules for the
//! names a libvirt backend passes on (domain, port, connection URI).

use serde::{Deserialize, Serialize};

/// A VM's name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct VmName(String);

impl VmName {
    /// Checks `text`; the error explains the rule.
    pub fn new(text: &str) -> Result<VmName, String> {
        let first_ok = text
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
        let rest_ok = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if first_ok && rest_ok && text.len() <= 64 {
            Ok(VmName(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a valid VM name: use letters, digits, '.', '_' and '-', starting \
                 with a letter or digit, at most 64 characters"
            ))
        }
    }
}

crate::names::validated_name!(VmName);

// Lets maps keyed by VmName be searched with a &str (String and str order alike).
impl std::borrow::Borrow<str> for VmName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A hot-plug slot's id in the hypervisor (for QEMU, the id of an empty `pcie-root-port`):
/// QEMU's id rule, a letter then letters, digits, `.`, `_`, `-`, at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct SlotId(String);

impl SlotId {
    /// Checks `text`; the error explains the rule.
    pub fn new(text: &str) -> Result<SlotId, String> {
        let first_ok = text.bytes().next().is_some_and(|b| b.is_ascii_alphabetic());
        let rest_ok = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if first_ok && rest_ok && text.len() <= 64 {
            Ok(SlotId(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a valid slot id: QEMU ids start with a letter and use letters, \
                 digits, '.', '_' and '-', at most 64 characters"
            ))
        }
    }
}

crate::names::validated_name!(SlotId);

/// A registered VM: how to reach it and where VFs can go (as the daemon resolved it: for a
/// libvirt domain, the slots and the agent socket come from the domain's live XML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(examples(json!({
        "name": "web2",
        "backend": {"qmp": {"qmp_socket": "/run/vfmap/web2.qmp", "agent_socket": "/run/vfmap/web2.agent"}},
        "slots": ["rp0", "rp1"]
    })))
)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's name.
    pub name: VmName,
    /// How the daemon drives the VM's hypervisor and reaches its agent.
    pub backend: VmBackend,
    /// Hot-plug slots in order: local index `i` is `slots[i]`.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::openapi::slots_schema))]
    pub slots: Vec<SlotId>,
    /// The VM's NUMA node, if pinned: VFs on that node are preferred.
    #[serde(default, deserialize_with = "crate::whole::optional")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::openapi::NumaNode>))]
    pub numa_node: Option<i32>,
}

/// The hypervisor backend of a VM, chosen per VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmBackend {
    /// A QEMU started by hand with a QMP socket, empty root ports and the agent's chardev.
    Qmp {
        /// QEMU's QMP unix socket.
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::SocketPath))]
        qmp_socket: String,
        /// The guest agent's channel (the virtio-serial port's unix socket on the host).
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::SocketPath))]
        agent_socket: String,
    },
    /// A libvirt domain: libvirt owns the QEMU monitor; vfmap goes through libvirt.
    Libvirt {
        /// The domain's name.
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::DomainName))]
        domain: String,
        /// The libvirt connection URI (e.g. `qemu:///system`).
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::LibvirtUri))]
        uri: String,
        /// The virtio port name of the agent's channel.
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::PortName))]
        port_name: String,
        /// The agent channel's host socket, read from the domain's live XML.
        #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::SocketPath))]
        agent_socket: String,
        /// Whether attaches also change the domain's persistent definition (`--config`);
        /// by default they are live only.
        #[serde(default)]
        persistent: bool,
    },
}

impl VmBackend {
    /// The host socket of the agent's channel.
    pub fn agent_socket(&self) -> &str {
        match self {
            VmBackend::Qmp { agent_socket, .. } | VmBackend::Libvirt { agent_socket, .. } => {
                agent_socket
            }
        }
    }

    /// The backend's name (`qmp`, `libvirt`).
    pub fn kind(&self) -> &'static str {
        match self {
            VmBackend::Qmp { .. } => "qmp",
            VmBackend::Libvirt { .. } => "libvirt",
        }
    }
}

/// A libvirt domain name as vfmap accepts it: printable ASCII without spaces or `/`, not
/// starting with `-`, 1-200 bytes (libvirt's own rule is looser; this keeps it a safe `virsh`
/// argument and file name).
pub fn check_domain_name(text: &str) -> Result<(), String> {
    if !text.is_empty()
        && text.len() <= 200
        && !text.starts_with('-')
        && text.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a valid libvirt domain name: printable ASCII without spaces or '/', not starting with '-', at most 200 characters"
        ))
    }
}

/// A virtio-serial port name as vfmap accepts it: letters, digits, `.`, `_`, `-`, 1-100 bytes.
pub fn check_port_name(text: &str) -> Result<(), String> {
    if !text.is_empty()
        && text.len() <= 100
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a valid port name: letters, digits, '.', '_' and '-', at most 100 characters"
        ))
    }
}

/// A libvirt connection URI as vfmap accepts it: a local one, `driver[+unix]:///path[?query]`
/// (e.g. `qemu:///system`), printable ASCII, at most 256 bytes. A VF and the VM it goes to are
/// on the same host, so a remote transport (`+ssh`, `+tls`, a host name) is refused: it would
/// only let a request make the daemon open network connections.
pub fn check_libvirt_uri(text: &str) -> Result<(), String> {
    let local = text.split_once(":///").is_some_and(|(scheme, _)| {
        let driver = scheme.strip_suffix("+unix").unwrap_or(scheme);
        !driver.is_empty()
            && driver
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
    });
    if local && text.len() <= 256 && text.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a local libvirt URI such as qemu:///system (driver[+unix]:///path, printable ASCII, at most 256 bytes)"
        ))
    }
}
