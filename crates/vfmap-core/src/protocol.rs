//! The host↔guest channel protocol (see `docs/protocol.md`): version 1, newline-delimited
//! JSON, one message per line, at most [`MAX_LINE`] bytes.
//!
//! Both directions are validated here. The guest→host direction is hostile input: parsing
//! never panics, bounds every size, and rejects anything unexpected.

use serde::{Deserialize, Serialize};

use crate::addr::{Bdf, PciId};
use crate::index::LocalIndex;
use crate::profile::{DriverName, FunctionName};

/// Protocol version.
pub const VERSION: u32 = 1;

/// Longest line accepted in either direction, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// Most entries in one message (a VM has at most 256 slots).
pub const MAX_ENTRIES: usize = 256;

/// Longest free-text field (reasons) accepted from a guest.
pub const MAX_TEXT: usize = 512;

/// Where a device sits in the guest: the root port's device.function on the root bus, then
/// the device.function behind that port, written `03.0/00.0`. The guest numbers its buses
/// itself, so a bus number would be a guess; this path is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestPath {
    /// Root port device number on bus 0.
    pub port_device: u8,
    /// Root port function.
    pub port_function: u8,
    /// Device number behind the port.
    pub device: u8,
    /// Function behind the port.
    pub function: u8,
}

impl std::fmt::Display for GuestPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02x}.{:x}/{:02x}.{:x}",
            self.port_device, self.port_function, self.device, self.function
        )
    }
}

impl std::str::FromStr for GuestPath {
    type Err = String;

    fn from_str(s: &str) -> Result<GuestPath, String> {
        let bad = || format!("{s:?} is not a guest path; expected e.g. 03.0/00.0");
        let devfn = |part: &str| -> Result<(u8, u8), String> {
            let (d, f) = part.split_once('.').ok_or_else(bad)?;
            if d.len() != 2 || f.len() != 1 {
                return Err(bad());
            }
            let d = u8::from_str_radix(d, 16).map_err(|_| bad())?;
            let f = u8::from_str_radix(f, 16).map_err(|_| bad())?;
            if d > 0x1f || f > 7 {
                return Err(bad());
            }
            Ok((d, f))
        };
        let (port, dev) = s.split_once('/').ok_or_else(bad)?;
        let (port_device, port_function) = devfn(port)?;
        let (device, function) = devfn(dev)?;
        Ok(GuestPath {
            port_device,
            port_function,
            device,
            function,
        })
    }
}

impl Serialize for GuestPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GuestPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<GuestPath, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One line of the correspondence: local index → function, and where to find the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The local index (the slot's position in the VM's slot list).
    pub local_index: LocalIndex,
    /// The function.
    pub function: FunctionName,
    /// The driver to bind.
    pub guest_driver: DriverName,
    /// Where the device sits in the guest.
    pub path: GuestPath,
    /// Vendor ID the device must report, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<PciId>,
    /// Device ID the device must report, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PciId>,
}

/// What the agent did with one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum Answer {
    /// The function's driver is bound.
    Bound {
        /// The local index.
        local_index: LocalIndex,
        /// The driver bound.
        driver: DriverName,
        /// The device's address in the guest.
        guest_bdf: Bdf,
    },
    /// It could not be done.
    Failed {
        /// The local index.
        local_index: LocalIndex,
        /// Why, for people.
        reason: String,
    },
}

impl Answer {
    /// The entry this answers.
    pub fn local_index(&self) -> LocalIndex {
        match self {
            Answer::Bound { local_index, .. } | Answer::Failed { local_index, .. } => *local_index,
        }
    }
}

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// The VM's whole current correspondence: make the guest match it.
    Apply {
        /// Protocol version.
        v: u32,
        /// Request id, echoed in the result.
        id: u64,
        /// Every entry the VM should have.
        entries: Vec<Entry>,
    },
}

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// Sent by the agent when it (re)connects.
    Hello {
        /// Protocol version.
        v: u32,
        /// The agent's name and version.
        agent: String,
    },
    /// A host message the agent rejected (malformed, unknown version); nothing was done.
    Error {
        /// Protocol version.
        v: u32,
        /// Why, for the host's log.
        reason: String,
    },
    /// The answer to an `apply`.
    Result {
        /// Protocol version.
        v: u32,
        /// The `apply`'s id.
        id: u64,
        /// One answer per entry of the `apply`.
        entries: Vec<Answer>,
    },
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Longer than [`MAX_LINE`].
    #[error("message of {0} bytes is over the {MAX_LINE}-byte limit")]
    TooLong(usize),
    /// Not valid JSON of a known message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A version this side does not speak.
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u32),
    /// Valid JSON breaking a bound.
    #[error("invalid message: {0}")]
    Invalid(String),
}

fn check_len(line: &[u8]) -> Result<(), ProtocolError> {
    if line.len() > MAX_LINE {
        Err(ProtocolError::TooLong(line.len()))
    } else {
        Ok(())
    }
}

/// Longest parser message kept in an error: serde's messages quote the peer's text.
const MAX_ERROR_TEXT: usize = 200;

fn shorten(e: serde_json::Error) -> ProtocolError {
    ProtocolError::Malformed(truncate_chars(&e.to_string(), MAX_ERROR_TEXT))
}

/// At most `max` bytes of `text`, cut at a character boundary (a byte cut can split a
/// multi-byte character, and `String::truncate` panics there).
pub fn truncate_chars(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Free text made fit for a guest→host message: control characters become spaces and the
/// text is cut to [`MAX_TEXT`] bytes at a character boundary, so the host accepts it.
pub fn fit_text(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncate_chars(&clean, MAX_TEXT)
}

/// Whether free text from a guest is within [`MAX_TEXT`] and free of control characters.
fn fits(text: &str) -> bool {
    text.len() <= MAX_TEXT && !text.chars().any(char::is_control)
}

/// Parses and validates a guest→host line (without its newline).
pub fn parse_guest_message(line: &[u8]) -> Result<GuestMessage, ProtocolError> {
    check_len(line)?;
    let message: GuestMessage = serde_json::from_slice(line).map_err(shorten)?;
    match &message {
        GuestMessage::Hello { v, agent: text } | GuestMessage::Error { v, reason: text } => {
            if *v != VERSION {
                return Err(ProtocolError::Version(*v));
            }
            if !fits(text) {
                return Err(ProtocolError::Invalid(
                    "text too long or has control characters".into(),
                ));
            }
        }
        GuestMessage::Result { v, entries, .. } => {
            if *v != VERSION {
                return Err(ProtocolError::Version(*v));
            }
            if entries.len() > MAX_ENTRIES {
                return Err(ProtocolError::Invalid(format!(
                    "{} answers, at most {MAX_ENTRIES}",
                    entries.len()
                )));
            }
            for answer in entries {
                if answer.local_index().slot() >= MAX_ENTRIES {
                    return Err(ProtocolError::Invalid(format!(
                        "local index {} out of range",
                        answer.local_index()
                    )));
                }
                if let Answer::Failed { reason, .. } = answer
                    && !fits(reason)
                {
                    return Err(ProtocolError::Invalid(
                        "reason too long or has control characters".into(),
                    ));
                }
            }
        }
    }
    Ok(message)
}

/// Parses and validates a host→guest line (the agent's side).
pub fn parse_host_message(line: &[u8]) -> Result<HostMessage, ProtocolError> {
    check_len(line)?;
    let message: HostMessage = serde_json::from_slice(line).map_err(shorten)?;
    let HostMessage::Apply { v, entries, .. } = &message;
    if *v != VERSION {
        return Err(ProtocolError::Version(*v));
    }
    if entries.len() > MAX_ENTRIES {
        return Err(ProtocolError::Invalid(format!(
            "{} entries, at most {MAX_ENTRIES}",
            entries.len()
        )));
    }
    for (i, e) in entries.iter().enumerate() {
        if entries[..i].iter().any(|o| o.local_index == e.local_index) {
            return Err(ProtocolError::Invalid(format!(
                "local index {} listed twice",
                e.local_index
            )));
        }
    }
    Ok(message)
}

/// Serialises a message as one line, newline included.
pub fn to_line<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn guest_paths_round_trip() {
        let p: GuestPath = "03.0/00.0".parse().unwrap();
        assert_eq!((p.port_device, p.port_function, p.device), (3, 0, 0));
        assert_eq!(p.to_string(), "03.0/00.0");
        for bad in [
            "",
            "03.0",
            "3.0/00.0",
            "03.8/00.0",
            "20.0/00.0",
            "03.0/00.0/00.0",
            "xx.0/00.0",
        ] {
            assert!(bad.parse::<GuestPath>().is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_round_trip() {
        let apply = HostMessage::Apply {
            v: 1,
            id: 7,
            entries: vec![Entry {
                local_index: LocalIndex::new(0),
                function: FunctionName::new("crypto").unwrap(),
                guest_driver: DriverName::new("pci-stub").unwrap(),
                path: "03.0/00.0".parse().unwrap(),
                vendor: Some(PciId(0x1b36)),
                device: None,
            }],
        };
        let line = to_line(&apply);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(parse_host_message(&line[..line.len() - 1]).unwrap(), apply);
        let text = r#"{"type":"result","v":1,"id":7,"entries":[{"state":"bound","local_index":0,"driver":"pci-stub","guest_bdf":"0000:01:00.0"},{"state":"failed","local_index":1,"reason":"no device"}]}"#;
        let GuestMessage::Result { entries, .. } = parse_guest_message(text.as_bytes()).unwrap()
        else {
            panic!("not a result");
        };
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn hostile_guest_lines_are_rejected() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![b'{'; MAX_LINE + 1], "over the"),
            (b"not json".to_vec(), "malformed"),
            (br#"{"type":"hello","v":2,"agent":"x"}"#.to_vec(), "version 2"),
            (br#"{"type":"hello","v":1,"agent":"x","extra":1}"#.to_vec(), "malformed"),
            (br#"{"type":"apply","v":1,"id":1,"entries":[]}"#.to_vec(), "malformed"),
            (br#"{"type":"result","v":1,"id":1,"entries":[{"state":"bound","local_index":0,"driver":"../x","guest_bdf":"0000:01:00.0"}]}"#.to_vec(), "malformed"),
            (br#"{"type":"result","v":1,"id":1,"entries":[{"state":"failed","local_index":999,"reason":"x"}]}"#.to_vec(), "out of range"),
        ];
        for (line, want) in cases {
            let err = parse_guest_message(&line).unwrap_err().to_string();
            assert!(err.contains(want), "{err} (wanted {want})");
        }
    }

    #[test]
    fn long_non_ascii_names_in_errors_do_not_panic() {
        // serde quotes the unknown name in its message; a multi-byte character straddling the
        // cut used to panic the link task (and the agent, which shares the parser).
        for pad in 0..4 {
            let name = format!("{}{}", "a".repeat(pad), "é€😀".repeat(60));
            let guest = format!(r#"{{"type":"{name}","v":1}}"#);
            let err = parse_guest_message(guest.as_bytes()).unwrap_err();
            assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
            let host = format!(r#"{{"type":"apply","v":1,"id":1,"entries":[],"{name}":1}}"#);
            let err = parse_host_message(host.as_bytes()).unwrap_err();
            assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
            assert!(err.to_string().len() <= MAX_ERROR_TEXT + 32);
        }
    }

    #[test]
    fn fitted_text_is_accepted_by_the_host() {
        let text = format!("bad\n\u{7}{}", "😀".repeat(400));
        let reason = fit_text(&text);
        assert!(reason.len() <= MAX_TEXT && !reason.chars().any(char::is_control));
        let line = to_line(&GuestMessage::Error { v: VERSION, reason });
        assert!(parse_guest_message(&line[..line.len() - 1]).is_ok());
    }

    /// Every string position of every message, for both directions.
    fn templates(q: &str) -> (Vec<String>, Vec<String>) {
        let guest = vec![
            format!(r#"{{"type":{q},"v":1,"agent":"a"}}"#),
            format!(r#"{{"type":"hello","v":1,"agent":{q}}}"#),
            format!(r#"{{"type":"error","v":1,"reason":{q}}}"#),
            format!(r#"{{"type":"hello","v":1,"agent":"a",{q}:1}}"#),
            format!(
                r#"{{"type":"result","v":1,"id":1,"entries":[{{"state":{q},"local_index":0}}]}}"#
            ),
            format!(
                r#"{{"type":"result","v":1,"id":1,"entries":[{{"state":"bound","local_index":0,"driver":{q},"guest_bdf":"0000:01:00.0"}}]}}"#
            ),
            format!(
                r#"{{"type":"result","v":1,"id":1,"entries":[{{"state":"bound","local_index":0,"driver":"nvme","guest_bdf":{q}}}]}}"#
            ),
            format!(
                r#"{{"type":"result","v":1,"id":1,"entries":[{{"state":"failed","local_index":0,"reason":{q}}}]}}"#
            ),
            format!(
                r#"{{"type":"result","v":1,"id":1,"entries":[{{"state":"failed","local_index":0,"reason":"r",{q}:2}}]}}"#
            ),
        ];
        let entry = |field: &str, value: &str| {
            let mut e = serde_json::json!({"local_index": 0, "function": "crypto",
                "guest_driver": "nvme", "path": "03.0/00.0", "vendor": "0x1b36"});
            e[field] = serde_json::from_str(value).unwrap_or_default();
            format!(r#"{{"type":"apply","v":1,"id":1,"entries":[{e}]}}"#)
        };
        let host = vec![
            format!(r#"{{"type":{q},"v":1,"id":1,"entries":[]}}"#),
            format!(r#"{{"type":"apply","v":1,"id":1,"entries":[],{q}:0}}"#),
            entry("function", q),
            entry("guest_driver", q),
            entry("path", q),
            entry("vendor", q),
            entry("device", q),
        ];
        (guest, host)
    }

    proptest! {
        /// Arbitrary Unicode (control characters included) in every JSON string position:
        /// never a panic, and whatever is accepted is within bounds and round-trips.
        #[test]
        fn arbitrary_unicode_in_every_string_position(text in "(?s).{0,300}") {
            let q = serde_json::to_string(&text).unwrap();
            let (guest, host) = templates(&q);
            for line in guest {
                if let Ok(message) = parse_guest_message(line.as_bytes()) {
                    if let GuestMessage::Hello { agent: t, .. } | GuestMessage::Error { reason: t, .. } = &message {
                        prop_assert!(t.len() <= MAX_TEXT && !t.chars().any(char::is_control));
                    }
                    let again = to_line(&message);
                    prop_assert_eq!(parse_guest_message(&again[..again.len() - 1]), Ok(message));
                }
            }
            for line in host {
                if let Ok(message) = parse_host_message(line.as_bytes()) {
                    let again = to_line(&message);
                    prop_assert_eq!(parse_host_message(&again[..again.len() - 1]), Ok(message));
                }
            }
        }

        /// Random bytes, and random cuts of a valid line, never panic the parser.
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cut in 0usize..200) {
            let _ = parse_guest_message(&bytes);
            let valid = br#"{"type":"result","v":1,"id":3,"entries":[{"state":"failed","local_index":1,"reason":"no"}]}"#;
            let _ = parse_guest_message(&valid[..cut.min(valid.len())]);
        }
    }
}
