//! PCI address types: a device's location (`Bdf`) and a vendor/device ID (`PciId`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a PCI address or ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The string does not have the `DDDD:BB:DD.F` shape.
    #[error("{0:?} is not a PCI address; expected domain:bus:device.function, e.g. 0000:3b:00.1")]
    MalformedBdf(String),
    /// The device number is above 0x1f or the function above 7.
    #[error("{0:?} is out of range: device must be 00-1f and function 0-7")]
    BdfOutOfRange(String),
    /// The string is not a 16-bit hexadecimal ID.
    #[error("{0:?} is not a PCI ID; expected 4 hex digits, e.g. 0x1b36")]
    MalformedId(String),
}

/// A PCI function's location: domain:bus:device.function, as the kernel names it in sysfs.
///
/// On the host this is the *global VF identifier* of a VF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// PCI segment (domain). 32 bits because VMD domains start at 0x10000.
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..=0x1f.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl Bdf {
    /// Builds an address, checking the device and function ranges.
    pub fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<Bdf> {
        (device <= 0x1f && function <= 7).then_some(Bdf {
            domain,
            bus,
            device,
            function,
        })
    }

    /// The 16-bit routing ID (bus << 8 | devfn) within the domain.
    pub fn rid(self) -> u16 {
        (u16::from(self.bus) << 8) | u16::from(self.device << 3 | self.function)
    }

    /// The address with routing ID `rid` in `domain`.
    pub fn from_rid(domain: u32, rid: u16) -> Bdf {
        let devfn = (rid & 0xff) as u8;
        Bdf {
            domain,
            bus: (rid >> 8) as u8,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }

    /// Where the kernel puts VF `vf_index` of this PF: RID = PF RID + offset + stride·index
    /// (PCIe SR-IOV spec 9.3.3.9/10). `None` when that would leave the 16-bit RID space.
    pub fn vf_location(self, offset: u16, stride: u16, vf_index: u16) -> Option<Bdf> {
        let rid =
            u32::from(self.rid()) + u32::from(offset) + u32::from(stride) * u32::from(vf_index);
        u16::try_from(rid)
            .ok()
            .map(|rid| Bdf::from_rid(self.domain, rid))
    }
}

impl Bdf {
    /// The address as text (`0000:3b:00.1`) on the stack. Inventories write thousands of
    /// addresses, and going through `fmt` cost more than reading them from sysfs.
    pub fn text(self) -> AddrText {
        let mut text = AddrText {
            bytes: [0; 16],
            len: 0,
        };
        text.push_hex(self.domain, 4);
        text.push(b':');
        text.push_hex(self.bus.into(), 2);
        text.push(b':');
        text.push_hex(self.device.into(), 2);
        text.push(b'.');
        text.push_hex(self.function.into(), 1);
        text
    }
}

/// An address's or ID's text, from [`Bdf::text`] or [`PciId::text`]: at most 16 bytes (a
/// `Bdf` with an 8-digit domain).
#[derive(Clone, Copy)]
pub struct AddrText {
    bytes: [u8; 16],
    len: usize,
}

impl AddrText {
    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    /// `value` in lower-case hex, zero-padded to `width` digits.
    fn push_hex(&mut self, value: u32, width: usize) {
        let digits = (32 - value.leading_zeros()).div_ceil(4).max(1) as usize;
        for shift in (0..digits.max(width)).rev() {
            let nibble = (value.checked_shr(4 * shift as u32).unwrap_or(0) & 0xf) as usize;
            self.push(b"0123456789abcdef"[nibble]);
        }
    }
}

impl std::ops::Deref for AddrText {
    type Target = str;

    fn deref(&self) -> &str {
        // Only hex digits and separators are ever pushed, so this never falls back.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl FromStr for Bdf {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Bdf, AddrError> {
        let malformed = || AddrError::MalformedBdf(s.to_owned());
        let (domain, rest) = s.split_once(':').ok_or_else(malformed)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(malformed)?;
        let (device, function) = rest.split_once('.').ok_or_else(malformed)?;
        let hex = |part: &str, max_len: usize| -> Result<u32, AddrError> {
            if part.is_empty()
                || part.len() > max_len
                || !part.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(malformed());
            }
            u32::from_str_radix(part, 16).map_err(|_| malformed())
        };
        let domain = hex(domain, 8)?;
        let bus = hex(bus, 2)? as u8;
        let device = hex(device, 2)?;
        let function = hex(function, 1)?;
        if device > 0x1f || function > 7 {
            return Err(AddrError::BdfOutOfRange(s.to_owned()));
        }
        Ok(Bdf {
            domain,
            bus,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl Serialize for Bdf {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text())
    }
}

impl<'de> Deserialize<'de> for Bdf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Bdf, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A 16-bit PCI vendor or device ID. Displays as `0x1b36`, the way sysfs writes `vendor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciId(pub u16);

impl PciId {
    /// The ID as text (`0x1b36`) on the stack, like [`Bdf::text`].
    pub fn text(self) -> AddrText {
        let mut text = AddrText {
            bytes: [0; 16],
            len: 0,
        };
        text.push(b'0');
        text.push(b'x');
        text.push_hex(self.0.into(), 4);
        text
    }
}

impl fmt::Display for PciId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl FromStr for PciId {
    type Err = AddrError;

    /// Accepts `0x1b36`, `0X1B36` and `1b36` (sysfs's `sriov_vf_device` has no `0x`).
    fn from_str(s: &str) -> Result<PciId, AddrError> {
        let digits = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AddrError::MalformedId(s.to_owned()));
        }
        u16::from_str_radix(digits, 16)
            .map(PciId)
            .map_err(|_| AddrError::MalformedId(s.to_owned()))
    }
}

impl Serialize for PciId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text())
    }
}

impl<'de> Deserialize<'de> for PciId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PciId, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn bdf_text_is_the_kernel_format(domain: u32, bus: u8, device in 0u8..0x20, function in 0u8..8) {
            let bdf = Bdf { domain, bus, device, function };
            let expected = format!("{domain:04x}:{bus:02x}:{device:02x}.{function:x}");
            proptest::prop_assert_eq!(&*bdf.text(), expected.as_str());
            proptest::prop_assert_eq!(bdf.to_string(), expected);
        }

        #[test]
        fn pci_id_text_is_the_sysfs_format(id: u16) {
            proptest::prop_assert_eq!(PciId(id).to_string(), format!("0x{id:04x}"));
        }
    }

    #[test]
    fn bdf_round_trips() {
        for text in [
            "0000:00:00.0",
            "0000:3b:00.1",
            "0001:ff:1f.7",
            "10000:01:00.0",
        ] {
            let bdf: Bdf = text.parse().unwrap();
            assert_eq!(bdf.to_string(), text);
        }
    }

    #[test]
    fn bdf_accepts_uppercase_and_normalises() {
        let bdf: Bdf = "0000:3B:0A.1".parse().unwrap();
        assert_eq!(bdf.to_string(), "0000:3b:0a.1");
    }

    #[test]
    fn bdf_rejects_bad_text() {
        for (text, want_range) in [
            ("", false),
            ("0000:3b:00", false),
            ("3b:00.1", false),
            ("0000:3b:00.1x", false),
            ("0000:3b:00.8", true),
            ("0000:3b:20.0", true),
            ("0000:3bb:00.0", false),
            ("0000:3b:00.", false),
            ("0000:+3:00.0", false),
            ("000000000:00:00.0", false),
            ("../../etc", false),
        ] {
            match text.parse::<Bdf>() {
                Err(AddrError::BdfOutOfRange(_)) => assert!(want_range, "{text}"),
                Err(AddrError::MalformedBdf(_)) => assert!(!want_range, "{text}"),
                other => panic!("{text:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn rid_round_trips() {
        let bdf: Bdf = "0000:3b:1f.7".parse().unwrap();
        assert_eq!(bdf.rid(), 0x3bff);
        assert_eq!(Bdf::from_rid(0, 0x3bff), bdf);
    }

    #[test]
    fn vf_locations_cross_a_bus_boundary() {
        let pf: Bdf = "0000:3b:00.0".parse().unwrap();
        assert_eq!(pf.vf_location(1, 1, 0).unwrap().to_string(), "0000:3b:00.1");
        assert_eq!(
            pf.vf_location(1, 1, 254).unwrap().to_string(),
            "0000:3b:1f.7"
        );
        assert_eq!(
            pf.vf_location(1, 1, 255).unwrap().to_string(),
            "0000:3c:00.0"
        );
        assert_eq!(
            pf.vf_location(0x80, 2, 3).unwrap().to_string(),
            "0000:3b:10.6"
        );
        let last: Bdf = "0000:ff:1f.0".parse().unwrap();
        assert_eq!(last.vf_location(1, 1, 7), None);
    }

    #[test]
    fn pci_id_forms() {
        assert_eq!("0x1b36".parse::<PciId>().unwrap(), PciId(0x1b36));
        assert_eq!("1B36".parse::<PciId>().unwrap(), PciId(0x1b36));
        assert_eq!("0x10".parse::<PciId>().unwrap().to_string(), "0x0010");
        for bad in ["", "0x", "0x12345", "xyz", "0x-1", " 0x1b36"] {
            assert!(bad.parse::<PciId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_uses_text_forms() {
        let bdf: Bdf = "0000:01:00.1".parse().unwrap();
        assert_eq!(serde_json::to_string(&bdf).unwrap(), "\"0000:01:00.1\"");
        assert_eq!(serde_json::to_string(&PciId(0x10)).unwrap(), "\"0x0010\"");
        let back: Bdf = serde_json::from_str("\"0000:01:00.1\"").unwrap();
        assert_eq!(back, bdf);
        assert!(serde_json::from_str::<Bdf>("\"nope\"").is_err());
    }
}
