//! The orchestrator's description of the VM's devices: `openstack/latest/meta_data.json`, as
//! OpenStack Nova (device role tagging) and KubeVirt (`hostDevices[].tag`) write it on the
//! config drive. Pure: bytes in, typed entries and typed rejections out; no I/O.
//!
//! ```json
//! {"uuid": "…", "hostname": "…", "devices": [
//!   {"type": "hostdev", "bus": "pci", "address": "0000:07:00.0", "tags": ["vfmap:crypto"]},
//!   {"type": "nic", "bus": "pci", "address": "0000:00:03.0", "mac": "…", "tags": ["uplink"]}]}
//! ```
//!
//! A device is for vfmap when one of its tags is `vfmap:<function>` ([`TAG_PREFIX`]); other
//! devices (and other tags) are the orchestrator's business and are ignored. An entry for
//! vfmap must be of type `hostdev` or `nic` on bus `pci`, with a canonical guest PCI address
//! (`dddd:bb:dd.f`) and exactly one function. Everything else about the document is
//! tolerated (real documents hold many other keys), but its size ([`MAX_METADATA`]), its
//! device count ([`MAX_DEVICES`]) and its nesting (serde_json's recursion limit) are bounded,
//! and the fields vfmap reads must have their documented JSON types, each given once.
//!
//! The metadata is untrusted input: what it names is only ever used after these checks, and
//! every string of it quoted in an error is cut to [`MAX_SHOWN`] characters and escaped.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::value::RawValue;
use vfmap_core::{Bdf, FunctionName};

/// The largest `meta_data.json` accepted, in bytes (Nova's own documents are a few KiB).
pub const MAX_METADATA: usize = 1 << 20;

/// The most `devices[]` entries accepted.
pub const MAX_DEVICES: usize = 256;

/// A tag naming a function: `vfmap:crypto`.
pub const TAG_PREFIX: &str = "vfmap:";

/// The most characters of a string from the metadata quoted in an error.
pub const MAX_SHOWN: usize = 64;

/// One device the metadata assigns to a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaEntry {
    /// The position of the entry in `devices[]`, from 0.
    pub index: usize,
    /// The device's PCI address, as the hypervisor placed it.
    pub guest_bdf: Bdf,
    /// The function its tag names.
    pub function: FunctionName,
}

/// Why one `devices[]` entry was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Not an object, or a field vfmap reads has the wrong JSON type or is given twice.
    #[error("malformed: {0}")]
    Malformed(String),
    /// The `vfmap:` tag does not name a valid function.
    #[error("tag {tag} does not name a function: {reason}")]
    BadFunction {
        /// The tag (quoted, cut).
        tag: String,
        /// The naming rule.
        reason: String,
    },
    /// Several `vfmap:` tags with different functions.
    #[error("tags name several functions ({0}); a device has one")]
    SeveralFunctions(String),
    /// Tagged for vfmap but not a PCI host device or NIC.
    #[error("tagged for vfmap, but type {kind} on bus {bus}; only type hostdev or nic on bus pci")]
    NotPci {
        /// `type` (quoted, cut).
        kind: String,
        /// `bus` (quoted, cut).
        bus: String,
    },
    /// The address is missing or not a canonical PCI address.
    #[error("address {0} is not a PCI address dddd:bb:dd.f")]
    BadAddress(String),
    /// Another entry for vfmap has the same address.
    #[error("address {0} is given by several entries, none trusted over the others")]
    DuplicateAddress(Bdf),
}

/// An entry that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The position of the entry in `devices[]`, from 0.
    pub index: usize,
    /// Why.
    pub error: EntryError,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "devices[{}]: {}", self.index, self.error)
    }
}

/// What the metadata assigns, what it got wrong, and how many devices were not for vfmap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The devices to bind, in document order.
    pub entries: Vec<MetaEntry>,
    /// The entries skipped.
    pub rejected: Vec<Rejected>,
    /// How many entries carry no `vfmap:` tag (not vfmap's; ignored).
    pub ignored: usize,
}

/// Why the document as a whole was refused (nothing in it is used).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// Over [`MAX_METADATA`] bytes.
    #[error("meta_data.json of {0} bytes is over the {MAX_METADATA}-byte limit")]
    TooLarge(usize),
    /// Not a JSON object, `devices` not an array, bad UTF-8, nesting too deep, a key repeated…
    #[error("meta_data.json is not a metadata document: {0}")]
    Malformed(String),
    /// Over [`MAX_DEVICES`] entries in `devices`.
    #[error("meta_data.json lists {0} devices, over the limit of {MAX_DEVICES}")]
    TooManyDevices(usize),
}

/// `text` quoted and escaped, cut to [`MAX_SHOWN`] characters (so at most 4 bytes each).
pub fn shown(text: &str) -> String {
    cut(&format!("{text:?}"), MAX_SHOWN)
}

/// serde_json's message, bounded (it may quote the input), control characters blanked.
fn serde_message(error: &serde_json::Error) -> String {
    cut(&error.to_string(), 2 * MAX_SHOWN)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The first `max` characters of `text`, and `…` when that is not all of it.
fn cut(text: &str, max: usize) -> String {
    let mut cut: String = text.chars().take(max).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

/// The top level: only `devices` is read; other keys are tolerated, `devices` given twice is not.
#[derive(Deserialize)]
struct Document<'a> {
    #[serde(borrow, default)]
    devices: Option<Vec<&'a RawValue>>,
}

/// One entry: only these fields are read; each must have its type and be given once.
#[derive(Deserialize)]
struct Device {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    bus: Option<String>,
    #[serde(default)]
    address: Option<String>,
    /// `null` in a KubeVirt document whose Go slice was nil.
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// Parses `meta_data.json`.
pub fn parse(bytes: &[u8]) -> Result<Parsed, MetadataError> {
    if bytes.len() > MAX_METADATA {
        return Err(MetadataError::TooLarge(bytes.len()));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| MetadataError::Malformed(format!("not UTF-8 ({e})")))?;
    // serde's derive also takes a struct from a JSON array: only an object is a document.
    if !text.trim_start().starts_with('{') {
        return Err(MetadataError::Malformed("not a JSON object".into()));
    }
    let document: Document<'_> =
        serde_json::from_str(text).map_err(|e| MetadataError::Malformed(serde_message(&e)))?;
    let devices = document.devices.unwrap_or_default();
    if devices.len() > MAX_DEVICES {
        return Err(MetadataError::TooManyDevices(devices.len()));
    }
    let mut parsed = Parsed::default();
    for (index, raw) in devices.into_iter().enumerate() {
        match entry(raw) {
            Ok(Some((guest_bdf, function))) => parsed.entries.push(MetaEntry {
                index,
                guest_bdf,
                function,
            }),
            Ok(None) => parsed.ignored += 1,
            Err(error) => parsed.rejected.push(Rejected { index, error }),
        }
    }
    // Two entries for one device: neither can be trusted over the other.
    let mut count: BTreeMap<Bdf, usize> = BTreeMap::new();
    for e in &parsed.entries {
        *count.entry(e.guest_bdf).or_default() += 1;
    }
    let (kept, doubled): (Vec<_>, Vec<_>) = std::mem::take(&mut parsed.entries)
        .into_iter()
        .partition(|e| count[&e.guest_bdf] == 1);
    parsed.entries = kept;
    parsed
        .rejected
        .extend(doubled.into_iter().map(|e| Rejected {
            index: e.index,
            error: EntryError::DuplicateAddress(e.guest_bdf),
        }));
    parsed.rejected.sort_by_key(|r| r.index);
    Ok(parsed)
}

/// One entry: `None` when it is not for vfmap.
fn entry(raw: &RawValue) -> Result<Option<(Bdf, FunctionName)>, EntryError> {
    if !raw.get().starts_with('{') {
        return Err(EntryError::Malformed("not a JSON object".into()));
    }
    let device: Device =
        serde_json::from_str(raw.get()).map_err(|e| EntryError::Malformed(serde_message(&e)))?;
    let mut functions: Vec<&str> = device
        .tags
        .iter()
        .flatten()
        .filter_map(|t| t.strip_prefix(TAG_PREFIX))
        .collect();
    functions.sort_unstable();
    functions.dedup();
    let function = match functions.as_slice() {
        [] => return Ok(None),
        [one] => FunctionName::new(one).map_err(|reason| EntryError::BadFunction {
            tag: shown(&format!("{TAG_PREFIX}{one}")),
            reason: rule_of(&reason),
        })?,
        several => {
            let mut list: Vec<String> = several.iter().take(2).map(|f| shown(f)).collect();
            if several.len() > 2 {
                list.push(format!("{} more", several.len() - 2));
            }
            return Err(EntryError::SeveralFunctions(list.join(", ")));
        }
    };
    let kind = device.kind.as_deref().unwrap_or("");
    let bus = device.bus.as_deref().unwrap_or("");
    if !matches!(kind, "hostdev" | "nic") || bus != "pci" {
        return Err(EntryError::NotPci {
            kind: shown(kind),
            bus: shown(bus),
        });
    }
    let address = device.address.as_deref().unwrap_or("");
    let guest_bdf = address
        .parse::<Bdf>()
        .ok()
        .filter(|b| b.to_string().eq_ignore_ascii_case(address))
        .ok_or_else(|| EntryError::BadAddress(shown(address)))?;
    Ok(Some((guest_bdf, function)))
}

/// FunctionName's error without the name it quotes (the caller shows the tag, cut).
fn rule_of(reason: &str) -> String {
    match reason.split_once(" is not a valid function name: ") {
        Some((_, rule)) => rule.to_owned(),
        None => reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf(text: &str) -> Bdf {
        text.parse().unwrap()
    }

    #[test]
    fn tagged_pci_devices_are_taken_and_others_ignored() {
        let doc = br#"{"uuid":"x","devices":[
            {"type":"hostdev","bus":"pci","address":"0000:07:00.0","tags":["vfmap:crypto"]},
            {"type":"nic","bus":"pci","address":"0000:00:03.0","mac":"aa","tags":["uplink","vfmap:net"],"vlan":1000,"vf_trusted":true},
            {"type":"nic","bus":"pci","address":"0000:00:04.0","tags":["uplink"]},
            {"type":"disk","bus":"ide","address":"0:0","serial":"s","path":"/dev/sda","tags":["db"]}
        ],"meta":{"a":"b"}}"#;
        let parsed = parse(doc).unwrap();
        assert_eq!(
            parsed.entries,
            vec![
                MetaEntry {
                    index: 0,
                    guest_bdf: bdf("0000:07:00.0"),
                    function: FunctionName::new("crypto").unwrap()
                },
                MetaEntry {
                    index: 1,
                    guest_bdf: bdf("0000:00:03.0"),
                    function: FunctionName::new("net").unwrap()
                },
            ]
        );
        assert_eq!(parsed.ignored, 2);
        assert!(parsed.rejected.is_empty());
    }

    #[test]
    fn a_document_without_devices_assigns_nothing() {
        assert_eq!(parse(br#"{"uuid":"x"}"#).unwrap(), Parsed::default());
        assert_eq!(parse(br#"{"devices":null}"#).unwrap(), Parsed::default());
        assert_eq!(parse(br#"{"devices":[]}"#).unwrap(), Parsed::default());
    }

    #[test]
    fn whole_document_refusals() {
        let malformed = |doc: &[u8]| matches!(parse(doc), Err(MetadataError::Malformed(_)));
        assert!(malformed(b""));
        assert!(malformed(b"[]"));
        assert!(malformed(b"\"devices\""));
        assert!(malformed(br#"{"devices":{}}"#));
        assert!(malformed(br#"{"devices":"x"}"#));
        assert!(malformed(br#"{"devices":[],"devices":[]}"#));
        assert!(malformed(b"{\"devices\":[]"));
        assert!(malformed(b"{\"a\":\"\xff\"}"));
        // Deep nesting in keys vfmap does not read is skipped without recursion; in devices it
        // is a malformed entry. Neither may overflow the stack.
        let deep = "[".repeat(400_000) + &"]".repeat(400_000);
        assert_eq!(
            parse(format!("{{\"a\":{deep}}}").as_bytes()),
            Ok(Parsed::default())
        );
        let parsed = parse(format!("{{\"devices\":[{deep}]}}").as_bytes()).unwrap();
        assert!(matches!(parsed.rejected[0].error, EntryError::Malformed(_)));
        let big = vec![b' '; MAX_METADATA + 1];
        assert_eq!(parse(&big), Err(MetadataError::TooLarge(MAX_METADATA + 1)));
        let many = format!("{{\"devices\":[{}{{}}]}}", "{},".repeat(MAX_DEVICES));
        assert_eq!(
            parse(many.as_bytes()),
            Err(MetadataError::TooManyDevices(MAX_DEVICES + 1))
        );
    }

    fn rejection(entry: &str) -> EntryError {
        let doc = format!("{{\"devices\":[{entry}]}}");
        let parsed = parse(doc.as_bytes()).unwrap();
        assert!(parsed.entries.is_empty(), "{entry} was taken");
        assert_eq!(parsed.rejected.len(), 1, "{entry}");
        parsed.rejected[0].error.clone()
    }

    #[test]
    fn entries_for_vfmap_are_checked_strictly() {
        let ok = r#""type":"hostdev","bus":"pci","address":"0000:07:00.0""#;
        assert!(matches!(
            rejection(&format!(r#"{{{ok},"tags":["vfmap:../etc"]}}"#)),
            EntryError::BadFunction { .. }
        ));
        assert!(matches!(
            rejection(&format!(r#"{{{ok},"tags":["vfmap:"]}}"#)),
            EntryError::BadFunction { .. }
        ));
        assert!(matches!(
            rejection(&format!(r#"{{{ok},"tags":["vfmap:a","vfmap:b"]}}"#)),
            EntryError::SeveralFunctions(_)
        ));
        assert!(matches!(
            rejection(&format!(r#"{{{ok},"tags":["vfmap:a", 5]}}"#)),
            EntryError::Malformed(_)
        ));
        assert!(matches!(
            rejection(&format!(r#"{{{ok},"address":"x","tags":["vfmap:a"]}}"#)),
            EntryError::Malformed(_)
        ));
        assert!(matches!(
            rejection(r#"{"type":"disk","bus":"pci","address":"0000:07:00.0","tags":["vfmap:a"]}"#),
            EntryError::NotPci { .. }
        ));
        assert!(matches!(
            rejection(
                r#"{"type":"hostdev","bus":"usb","address":"0000:07:00.0","tags":["vfmap:a"]}"#
            ),
            EntryError::NotPci { .. }
        ));
        assert!(matches!(
            rejection(r#"{"type":5,"tags":["vfmap:a"]}"#),
            EntryError::Malformed(_)
        ));
        assert!(matches!(rejection("[]"), EntryError::Malformed(_)));
        assert!(matches!(rejection("7"), EntryError::Malformed(_)));
        for address in [
            "",
            "0:7:0.0",
            "0000:07:00.0 ",
            "0000:07:00:0",
            "0000:07:20.0",
            "0000:07:00.8",
            "../../0000:07:00.0",
        ] {
            let entry = format!(
                r#"{{"type":"hostdev","bus":"pci","address":{address:?},"tags":["vfmap:a"]}}"#
            );
            assert!(
                matches!(rejection(&entry), EntryError::BadAddress(_)),
                "{address:?}"
            );
        }
        // The same function twice is one function.
        let doc = format!(r#"{{"devices":[{{{ok},"tags":["vfmap:a","vfmap:a"]}}]}}"#);
        assert_eq!(parse(doc.as_bytes()).unwrap().entries.len(), 1);
        // Upper-case hex is the same address.
        let doc = r#"{"devices":[{"type":"hostdev","bus":"pci","address":"0000:0A:1F.7","tags":["vfmap:a"]}]}"#;
        assert_eq!(
            parse(doc.as_bytes()).unwrap().entries[0].guest_bdf,
            bdf("0000:0a:1f.7")
        );
    }

    #[test]
    fn one_address_given_twice_skips_both_entries() {
        let doc = br#"{"devices":[
            {"type":"hostdev","bus":"pci","address":"0000:07:00.0","tags":["vfmap:a"]},
            {"type":"hostdev","bus":"pci","address":"0000:08:00.0","tags":["vfmap:b"]},
            {"type":"nic","bus":"pci","address":"0000:07:00.0","tags":["vfmap:c"]}]}"#;
        let parsed = parse(doc).unwrap();
        assert_eq!(parsed.entries.len(), 1);
        assert_eq!(parsed.entries[0].index, 1);
        let indexes: Vec<usize> = parsed.rejected.iter().map(|r| r.index).collect();
        assert_eq!(indexes, [0, 2]);
        assert_eq!(
            parsed.rejected[0].to_string(),
            "devices[0]: address 0000:07:00.0 is given by several entries, none trusted over the others"
        );
    }

    #[test]
    fn quoted_strings_are_cut_and_escaped() {
        let long = format!("vfmap:{}\u{7}", "x".repeat(500));
        let entry = format!(
            r#"{{"type":"hostdev","bus":"pci","address":"0000:07:00.0","tags":[{}]}}"#,
            serde_json::to_string(&long).unwrap()
        );
        let text = rejection(&entry).to_string();
        assert!(text.len() < 400, "{text}");
        assert!(!text.chars().any(char::is_control), "{text}");
    }
}
