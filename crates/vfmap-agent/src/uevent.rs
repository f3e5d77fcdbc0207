//! Kernel uevents, as the kernel multicasts them on `NETLINK_KOBJECT_UEVENT` group 1: one
//! datagram per event, NUL-separated, a header `ACTION@DEVPATH` and then `KEY=VALUE` fields:
//!
//! ```text
//! add@/devices/pci0000:00/0000:00:03.0/0000:01:00.0\0ACTION=add\0DEVPATH=/devices/...\0SUBSYSTEM=pci\0SEQNUM=1234\0
//! bind@/devices/pci0000:00/0000:00:03.0/0000:01:00.0\0ACTION=bind\0...\0DRIVER=nvme\0...
//! ```
//!
//! Pure: the parser reads bytes and touches nothing. It is bounded ([`MAX_UEVENT`] bytes,
//! [`MAX_FIELDS`] fields) and never panics, whatever the bytes (see `tests/uevent.rs`).
//! DEVPATH is kept only to be compared; the agent never joins it onto a path.

use std::fmt;

/// The longest message accepted (the kernel's own environment buffer is 2,048 bytes; udev
/// reads uevents into 8,192 bytes too).
pub const MAX_UEVENT: usize = 8192;

/// The most `KEY=VALUE` fields accepted in one message (the kernel sends at most 64).
pub const MAX_FIELDS: usize = 256;

/// What happened to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The device appeared (hot-plug); its attributes exist by then.
    Add,
    /// The device went away.
    Remove,
    /// A driver was bound (`DRIVER=` names it).
    Bind,
    /// The driver was unbound.
    Unbind,
    /// Something about the device changed.
    Change,
    /// The device was renamed or moved.
    Move,
    /// Online.
    Online,
    /// Offline.
    Offline,
    /// Any other action word.
    Other(String),
}

impl Action {
    fn from_word(word: &str) -> Action {
        match word {
            "add" => Action::Add,
            "remove" => Action::Remove,
            "bind" => Action::Bind,
            "unbind" => Action::Unbind,
            "change" => Action::Change,
            "move" => Action::Move,
            "online" => Action::Online,
            "offline" => Action::Offline,
            other => Action::Other(other.to_owned()),
        }
    }

    /// The action's word, as in the message.
    pub fn as_str(&self) -> &str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Bind => "bind",
            Action::Unbind => "unbind",
            Action::Change => "change",
            Action::Move => "move",
            Action::Online => "online",
            Action::Offline => "offline",
            Action::Other(word) => word,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One kernel uevent: the fields the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// What happened.
    pub action: Action,
    /// The kobject's path under sysfs, starting with `/` (`/devices/pci0000:00/...`).
    pub devpath: String,
    /// `SUBSYSTEM=` (`pci` for PCI devices).
    pub subsystem: Option<String>,
    /// `DRIVER=` (on `bind`, and on events of a bound device).
    pub driver: Option<String>,
    /// `SEQNUM=`, the kernel's event counter.
    pub seqnum: Option<u64>,
}

/// Why bytes are not a kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UeventError {
    /// Over [`MAX_UEVENT`] bytes.
    #[error("uevent of {0} bytes is over the {MAX_UEVENT}-byte limit")]
    TooLong(usize),
    /// Not UTF-8.
    #[error("uevent is not UTF-8")]
    NotUtf8,
    /// The first field is not `ACTION@DEVPATH`.
    #[error("uevent has no ACTION@DEVPATH header")]
    NoHeader,
    /// The action is empty, over 32 bytes, or not lowercase ASCII letters.
    #[error("uevent action is not a lowercase word")]
    BadAction,
    /// The devpath does not start with `/`.
    #[error("uevent devpath does not start with '/'")]
    BadDevpath,
    /// Over [`MAX_FIELDS`] fields.
    #[error("uevent has over {MAX_FIELDS} fields")]
    TooManyFields,
    /// A field (counted from 1 after the header) is not `KEY=VALUE` with a valid value.
    #[error("uevent field {0} is malformed")]
    BadField(usize),
    /// `ACTION=` or `DEVPATH=` disagrees with the header.
    #[error("uevent {0}= disagrees with its header")]
    Mismatch(&'static str),
}

/// Parses one datagram from the uevent socket.
pub fn parse(bytes: &[u8]) -> Result<Uevent, UeventError> {
    if bytes.len() > MAX_UEVENT {
        return Err(UeventError::TooLong(bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| UeventError::NotUtf8)?;
    let mut fields = text.split('\0');
    let header = fields.next().unwrap_or_default();
    let (word, devpath) = header.split_once('@').ok_or(UeventError::NoHeader)?;
    if word.is_empty() || word.len() > 32 || !word.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(UeventError::BadAction);
    }
    if !devpath.starts_with('/') {
        return Err(UeventError::BadDevpath);
    }
    let mut event = Uevent {
        action: Action::from_word(word),
        devpath: devpath.to_owned(),
        subsystem: None,
        driver: None,
        seqnum: None,
    };
    // The message ends with a NUL, so the last piece is empty; empty pieces carry nothing.
    for (n, field) in fields.filter(|f| !f.is_empty()).enumerate() {
        let n = n + 1;
        if n > MAX_FIELDS {
            return Err(UeventError::TooManyFields);
        }
        let (key, value) = field
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or(UeventError::BadField(n))?;
        match key {
            "ACTION" if value != word => return Err(UeventError::Mismatch("ACTION")),
            "DEVPATH" if value != devpath => return Err(UeventError::Mismatch("DEVPATH")),
            "SUBSYSTEM" => event.subsystem = Some(value.to_owned()),
            "DRIVER" => event.driver = Some(value.to_owned()),
            "SEQNUM" => event.seqnum = Some(value.parse().map_err(|_| UeventError::BadField(n))?),
            _ => {}
        }
    }
    Ok(event)
}

impl Uevent {
    /// The last component of DEVPATH: a PCI device's address (`0000:01:00.0`), a driver's
    /// name for `/bus/pci/drivers/nvme`.
    pub fn name(&self) -> &str {
        self.devpath.rsplit('/').next().unwrap_or_default()
    }

    /// Whether this is an event of a PCI device (`SUBSYSTEM=pci`).
    pub fn is_pci(&self) -> bool {
        self.subsystem.as_deref() == Some("pci")
    }

    /// The message as the kernel would send it (for test doubles).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = format!(
            "{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0",
            action = self.action,
            devpath = self.devpath
        );
        if let Some(subsystem) = &self.subsystem {
            text.push_str(&format!("SUBSYSTEM={subsystem}\0"));
        }
        if let Some(driver) = &self.driver {
            text.push_str(&format!("DRIVER={driver}\0"));
        }
        if let Some(seqnum) = self.seqnum {
            text.push_str(&format!("SEQNUM={seqnum}\0"));
        }
        text.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_message_parses() {
        let bytes = b"bind@/devices/pci0000:00/0000:00:03.0/0000:01:00.0\0ACTION=bind\0\
            DEVPATH=/devices/pci0000:00/0000:00:03.0/0000:01:00.0\0SUBSYSTEM=pci\0DRIVER=nvme\0\
            PCI_CLASS=10802\0PCI_ID=1B36:0010\0PCI_SLOT_NAME=0000:01:00.0\0\
            MODALIAS=pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02\0SEQNUM=1421\0";
        let event = parse(bytes).unwrap();
        assert_eq!(event.action, Action::Bind);
        assert_eq!(event.name(), "0000:01:00.0");
        assert!(event.is_pci());
        assert_eq!(event.driver.as_deref(), Some("nvme"));
        assert_eq!(event.seqnum, Some(1421));
    }

    #[test]
    fn what_is_not_a_kernel_message_is_refused() {
        // udev's re-broadcast (group 2) starts with "libudev" and a binary header.
        assert_eq!(parse(b"libudev\0\xfe\xed"), Err(UeventError::NotUtf8));
        assert_eq!(parse(b"libudev\0"), Err(UeventError::NoHeader));
        assert_eq!(parse(b""), Err(UeventError::NoHeader));
        assert_eq!(parse(b"ADD@/devices"), Err(UeventError::BadAction));
        assert_eq!(parse(b"add@devices"), Err(UeventError::BadDevpath));
        assert_eq!(parse(b"add@/d\0junk\0"), Err(UeventError::BadField(1)));
        assert_eq!(parse(b"add@/d\0=x\0"), Err(UeventError::BadField(1)));
        assert_eq!(parse(b"add@/d\0SEQNUM=-1\0"), Err(UeventError::BadField(1)));
        assert_eq!(
            parse(b"add@/d\0ACTION=remove\0"),
            Err(UeventError::Mismatch("ACTION"))
        );
        assert_eq!(
            parse(b"add@/d\0DEVPATH=/e\0"),
            Err(UeventError::Mismatch("DEVPATH"))
        );
        let long = vec![b'a'; MAX_UEVENT + 1];
        assert_eq!(parse(&long), Err(UeventError::TooLong(MAX_UEVENT + 1)));
        let many: Vec<u8> = std::iter::once(b"add@/d".to_vec())
            .chain((0..=MAX_FIELDS).map(|_| b"\0K=v".to_vec()))
            .flatten()
            .collect();
        assert_eq!(parse(&many), Err(UeventError::TooManyFields));
    }
}
