//! Is a VF's config space back to its reset state? The check the `scrub` phase runs after a
//! function-level reset, before the VF goes back to the pool: a VF that fails it is quarantined.
//!
//! Input is the bytes of sysfs `config`: 64 when read unprivileged, 256 (or 4096 with the
//! extended space) as root. Only the type 0 (endpoint) header is understood. What is checked:
//!
//! - the Command register (0x04): Bus Master off (on, the VF can still DMA). I/O and Memory
//!   Space decoding are not checked: they are the host's own state, not a tenant's leftover —
//!   the kernel restores the state it saved around a reset, and vfio-pci restores the one it
//!   saved when it enabled the device (memory decoding on). A hardware VF reads them as zero
//!   anyway; QEMU's emulated VFs do not (measured in the nested scenario: command 0x0002 after
//!   a release);
//! - the six BARs (0x10..=0x24), type bits masked, a 64-bit BAR read with its upper half: no
//!   address left (a VF's BARs read as zero: its PF's VF BARs place it);
//! - the capability list (when the Status register says there is one): MSI and MSI-X not
//!   enabled. The walk is bounded (48 steps, loops detected), stays in the first 256 bytes and
//!   within what was read: a capability past the end of the buffer is a problem, since its
//!   enable bit cannot be seen.
//!
//! Pure and total: any bytes give an answer, never a panic.

use std::fmt::Write as _;

/// Fewer bytes than the standard header cannot be checked.
pub const HEADER_LEN: usize = 64;
/// The Command register.
const COMMAND: usize = 0x04;
/// The Status register.
const STATUS: usize = 0x06;
/// Status bit 4: the capability list exists.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Header Type (bit 7 is multi-function).
const HEADER_TYPE: usize = 0x0e;
/// The first BAR; six of them, 4 bytes apart.
const BAR0: usize = 0x10;
/// The Capabilities Pointer.
const CAP_POINTER: usize = 0x34;
/// Capabilities live in 0x40..0x100; 48 dword-aligned places, so at most 48 of them.
const MAX_CAPABILITIES: usize = (0x100 - HEADER_LEN) / 4;
/// Capability IDs.
const CAP_MSI: u8 = 0x05;
const CAP_MSIX: u8 = 0x11;

/// Command register: Bus Master Enable.
const CMD_BUS_MASTER: u16 = 1 << 2;

/// One way a config space is not in its reset state, or cannot be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResetProblem {
    /// Fewer bytes than the 64-byte header.
    #[error("config space is only {len} bytes, fewer than the {HEADER_LEN}-byte header")]
    TooShort {
        /// Bytes read.
        len: usize,
    },
    /// Not an endpoint's header (0x7f is what a device that does not answer reads as).
    #[error(
        "config space has header type {header_type:#04x}, not 0 (an endpoint's): cannot check it"
    )]
    NotType0 {
        /// Header Type, multi-function bit masked.
        header_type: u8,
    },
    /// Bus Master is on: the VF can still write to memory.
    #[error("bus master is still enabled (command register {command:#06x})")]
    BusMaster {
        /// The Command register.
        command: u16,
    },
    /// A BAR still holds an address (type bits masked; a 64-bit BAR with its upper half).
    #[error("BAR {bar} still holds address {address:#x}")]
    Bar {
        /// BAR number, 0-5 (the lower one of a 64-bit pair).
        bar: u8,
        /// The address.
        address: u64,
    },
    /// MSI is enabled.
    #[error("MSI is still enabled (capability at {at:#04x}, message control {control:#06x})")]
    MsiEnabled {
        /// Offset of the capability.
        at: u8,
        /// Its Message Control register.
        control: u16,
    },
    /// MSI-X is enabled.
    #[error("MSI-X is still enabled (capability at {at:#04x}, message control {control:#06x})")]
    MsixEnabled {
        /// Offset of the capability.
        at: u8,
        /// Its Message Control register.
        control: u16,
    },
    /// A capability pointer into the header (below 0x40): the list is corrupt.
    #[error(
        "capability pointer {pointer:#04x} (at {from:#04x}) points into the header: the \
         capability list is corrupt"
    )]
    BadCapabilityPointer {
        /// Where the pointer was read.
        from: u8,
        /// The pointer, low two bits masked.
        pointer: u8,
    },
    /// The capability list comes back to a capability already walked.
    #[error("the capability list loops back to {at:#04x}: it is corrupt")]
    CapabilityLoop {
        /// The capability seen twice.
        at: u8,
    },
    /// A capability lies past the bytes read, so its enable bits cannot be seen (an
    /// unprivileged read gives 64 bytes: read `config` as root).
    #[error(
        "capability at {at:#04x} lies past the {len} bytes read: cannot check it (read config \
         as root)"
    )]
    CapabilityPastEnd {
        /// Offset of the capability.
        at: u8,
        /// Bytes read.
        len: usize,
    },
}

/// Checks that `config` (the bytes of sysfs `config`) is a type 0 header in its reset state.
/// Every problem found is returned, in offset order; a buffer that cannot be checked at all
/// gives one problem ([`ResetProblem::TooShort`] or [`ResetProblem::NotType0`]).
pub fn check_reset_state(config: &[u8]) -> Result<(), Vec<ResetProblem>> {
    if config.len() < HEADER_LEN {
        return Err(vec![ResetProblem::TooShort { len: config.len() }]);
    }
    let header_type = config[HEADER_TYPE] & 0x7f;
    if header_type != 0 {
        return Err(vec![ResetProblem::NotType0 { header_type }]);
    }
    let mut problems = Vec::new();
    let command = word(config, COMMAND);
    if command & CMD_BUS_MASTER != 0 {
        problems.push(ResetProblem::BusMaster { command });
    }
    check_bars(config, &mut problems);
    if word(config, STATUS) & STATUS_CAP_LIST != 0 {
        check_capabilities(config, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// One line for logs and the API: the problems joined by "; ", the first few only.
pub fn summary(problems: &[ResetProblem]) -> String {
    const SHOWN: usize = 4;
    let mut text = String::new();
    for (i, problem) in problems.iter().take(SHOWN).enumerate() {
        if i > 0 {
            text.push_str("; ");
        }
        let _ = write!(text, "{problem}");
    }
    if problems.len() > SHOWN {
        let _ = write!(text, "; and {} more", problems.len() - SHOWN);
    }
    text
}

/// BARs: address bits zero. Bit 0 set is an I/O BAR (address bits 31:2); else memory (bits
/// 31:4), whose type 0b10 makes it 64-bit with the next BAR as the upper half.
fn check_bars(config: &[u8], problems: &mut Vec<ResetProblem>) {
    let mut bar = 0;
    while bar < 6 {
        let low = dword(config, BAR0 + 4 * bar);
        let (address, width) = if low & 1 == 1 {
            (u64::from(low & !0x3), 1)
        } else if (low >> 1) & 0x3 == 0b10 && bar < 5 {
            let high = dword(config, BAR0 + 4 * (bar + 1));
            (u64::from(low & !0xf) | (u64::from(high) << 32), 2)
        } else {
            (u64::from(low & !0xf), 1)
        };
        if address != 0 {
            problems.push(ResetProblem::Bar {
                bar: bar as u8,
                address,
            });
        }
        bar += width;
    }
}

/// Walks the capability list for MSI and MSI-X enable bits.
fn check_capabilities(config: &[u8], problems: &mut Vec<ResetProblem>) {
    let mut seen = [false; 0x100 / 4];
    let mut from = CAP_POINTER as u8;
    let mut at = config[CAP_POINTER] & 0xfc;
    // One more step than there are places: the last one can only end, loop or be corrupt.
    for _ in 0..=MAX_CAPABILITIES {
        if at == 0 {
            return;
        }
        if usize::from(at) < HEADER_LEN {
            problems.push(ResetProblem::BadCapabilityPointer { from, pointer: at });
            return;
        }
        let slot = &mut seen[usize::from(at) / 4];
        if *slot {
            problems.push(ResetProblem::CapabilityLoop { at });
            return;
        }
        *slot = true;
        let start = usize::from(at);
        // ID, next pointer and the 16-bit register after them (MSI/MSI-X Message Control).
        if start + 4 > config.len() {
            problems.push(ResetProblem::CapabilityPastEnd {
                at,
                len: config.len(),
            });
            return;
        }
        let control = word(config, start + 2);
        match config[start] {
            CAP_MSI if control & 1 != 0 => {
                problems.push(ResetProblem::MsiEnabled { at, control });
            }
            CAP_MSIX if control & (1 << 15) != 0 => {
                problems.push(ResetProblem::MsixEnabled { at, control });
            }
            _ => {}
        }
        from = at + 1;
        at = config[start + 1] & 0xfc;
    }
}

/// A little-endian 16-bit register; callers stay inside the buffer (checked above).
fn word(config: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([config[at], config[at + 1]])
}

/// A little-endian 32-bit register inside the header.
fn dword(config: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A VF as it reads after a reset, as root: IDs, class, the capability list bit, an MSI-X
    /// capability at 0x70 (8 vectors, table and PBA in BAR 0) and a PCIe capability at 0x80,
    /// BARs zero, command 0.
    fn clean_vf() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0..4].copy_from_slice(&[0x86, 0x80, 0x55, 0x15]);
        c[0x06] = 0x10;
        c[0x09..0x0c].copy_from_slice(&[0x00, 0x80, 0x10]);
        c[CAP_POINTER] = 0x70;
        c[0x70..0x74].copy_from_slice(&[0x11, 0x80, 0x07, 0x00]);
        c[0x74..0x78].copy_from_slice(&0x2000u32.to_le_bytes());
        c[0x78..0x7c].copy_from_slice(&0x3000u32.to_le_bytes());
        c[0x80..0x84].copy_from_slice(&[0x10, 0x00, 0x02, 0x00]);
        c[0x84..0x88].copy_from_slice(&(1u32 << 28).to_le_bytes());
        c
    }

    fn problems(config: &[u8]) -> Vec<ResetProblem> {
        check_reset_state(config).err().unwrap_or_default()
    }

    #[test]
    fn a_clean_vf_passes_at_every_read_size_that_holds_its_capabilities() {
        let mut c = clean_vf();
        assert_eq!(check_reset_state(&c), Ok(()));
        c.resize(4096, 0);
        assert_eq!(check_reset_state(&c), Ok(()));
    }

    #[test]
    fn a_clean_vf_read_unprivileged_cannot_show_its_capabilities() {
        let c = clean_vf();
        assert_eq!(
            problems(&c[..64]),
            vec![ResetProblem::CapabilityPastEnd { at: 0x70, len: 64 }]
        );
        // Without a capability list, 64 bytes are enough.
        let mut c = c[..64].to_vec();
        c[0x06] = 0;
        assert_eq!(check_reset_state(&c), Ok(()));
    }

    #[test]
    fn short_and_foreign_headers_are_their_own_errors() {
        assert_eq!(
            problems(&clean_vf()[..63]),
            vec![ResetProblem::TooShort { len: 63 }]
        );
        assert_eq!(problems(&[]), vec![ResetProblem::TooShort { len: 0 }]);
        let mut bridge = clean_vf();
        bridge[HEADER_TYPE] = 0x81;
        assert_eq!(
            problems(&bridge),
            vec![ResetProblem::NotType0 { header_type: 1 }]
        );
        // Multi-function endpoints are type 0.
        let mut multi = clean_vf();
        multi[HEADER_TYPE] = 0x80;
        assert_eq!(check_reset_state(&multi), Ok(()));
        let gone = vec![0xffu8; 256];
        let shown = problems(&gone)[0].to_string();
        assert!(shown.contains("header type 0x7f"), "{shown}");
    }

    #[test]
    fn bus_master_is_reported_and_decoding_is_not() {
        let mut c = clean_vf();
        c[COMMAND] = 0x06;
        let found = problems(&c);
        assert_eq!(found, vec![ResetProblem::BusMaster { command: 6 }]);
        assert_eq!(
            found[0].to_string(),
            "bus master is still enabled (command register 0x0006)"
        );
        // Decoding (the host's own state, restored around the reset) and the other bits
        // (SERR#, parity, INTx disable) are not the reset check's business.
        c[COMMAND] = 0x03;
        assert_eq!(check_reset_state(&c), Ok(()));
        c[COMMAND] = 0x40;
        c[COMMAND + 1] = 0x05;
        assert_eq!(check_reset_state(&c), Ok(()));
    }

    #[test]
    fn bar_addresses_are_reported_with_type_bits_masked() {
        let mut c = clean_vf();
        // Type bits alone are no address: a 64-bit prefetchable memory BAR, an I/O BAR.
        c[0x10..0x14].copy_from_slice(&0x0000_000cu32.to_le_bytes());
        c[0x18..0x1c].copy_from_slice(&0x0000_0001u32.to_le_bytes());
        assert_eq!(check_reset_state(&c), Ok(()));
        // A 32-bit memory BAR 2.
        c[0x18..0x1c].copy_from_slice(&0xfe00_0000u32.to_le_bytes());
        let found = problems(&c);
        assert_eq!(
            found,
            vec![ResetProblem::Bar {
                bar: 2,
                address: 0xfe00_0000
            }]
        );
        assert_eq!(found[0].to_string(), "BAR 2 still holds address 0xfe000000");
        // An I/O BAR 5.
        c[0x18..0x1c].fill(0);
        c[0x24..0x28].copy_from_slice(&0x0000_e001u32.to_le_bytes());
        assert_eq!(
            problems(&c),
            vec![ResetProblem::Bar {
                bar: 5,
                address: 0xe000
            }]
        );
    }

    #[test]
    fn a_64_bit_bar_is_read_with_its_upper_half() {
        let mut c = clean_vf();
        c[0x10..0x14].copy_from_slice(&0x0000_000cu32.to_le_bytes());
        c[0x14..0x18].copy_from_slice(&0x0000_0038u32.to_le_bytes());
        assert_eq!(
            problems(&c),
            vec![ResetProblem::Bar {
                bar: 0,
                address: 0x38_0000_0000
            }]
        );
        // BAR 5 cannot start a pair: read alone.
        let mut c = clean_vf();
        c[0x24..0x28].copy_from_slice(&0x1000_0004u32.to_le_bytes());
        assert_eq!(
            problems(&c),
            vec![ResetProblem::Bar {
                bar: 5,
                address: 0x1000_0000
            }]
        );
    }

    #[test]
    fn msix_enabled_is_reported() {
        let mut c = clean_vf();
        c[0x72..0x74].copy_from_slice(&0x8003u16.to_le_bytes());
        let found = problems(&c);
        assert_eq!(
            found,
            vec![ResetProblem::MsixEnabled {
                at: 0x70,
                control: 0x8003
            }]
        );
        assert_eq!(
            found[0].to_string(),
            "MSI-X is still enabled (capability at 0x70, message control 0x8003)"
        );
        // Function Mask (bit 14) alone is not enabled.
        c[0x72..0x74].copy_from_slice(&0x4003u16.to_le_bytes());
        assert_eq!(check_reset_state(&c), Ok(()));
    }

    #[test]
    fn msi_enabled_is_reported() {
        let mut c = clean_vf();
        // MSI-X -> PCIe -> MSI at 0x50.
        c[0x81] = 0x50;
        c[0x50..0x54].copy_from_slice(&[0x05, 0x00, 0x81, 0x00]);
        assert_eq!(
            problems(&c),
            vec![ResetProblem::MsiEnabled {
                at: 0x50,
                control: 0x0081
            }]
        );
        c[0x52] = 0x80;
        assert_eq!(check_reset_state(&c), Ok(()));
    }

    #[test]
    fn every_dirty_field_is_reported_together() {
        let mut c = clean_vf();
        c[COMMAND] = 0x04;
        c[0x10..0x14].copy_from_slice(&0xfe00_0000u32.to_le_bytes());
        c[0x73] = 0x80;
        let found = problems(&c);
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(
            summary(&found),
            "bus master is still enabled (command register 0x0004); BAR 0 still holds address \
             0xfe000000; MSI-X is still enabled (capability at 0x70, message control 0x8007)"
        );
    }

    #[test]
    fn a_capability_loop_is_caught() {
        // PCIe back to MSI-X.
        let mut c = clean_vf();
        c[0x81] = 0x70;
        assert_eq!(
            problems(&c),
            vec![ResetProblem::CapabilityLoop { at: 0x70 }]
        );
        // A capability pointing at itself; the low two bits of pointers are masked.
        let mut c = clean_vf();
        c[0x71] = 0x73;
        assert_eq!(
            problems(&c),
            vec![ResetProblem::CapabilityLoop { at: 0x70 }]
        );
    }

    #[test]
    fn the_longest_possible_list_ends() {
        let mut c = clean_vf();
        c[CAP_POINTER] = 0x40;
        for at in (0x40..0x100).step_by(4) {
            c[at..at + 4].copy_from_slice(&[0x09, ((at + 4) & 0xff) as u8, 0, 0]);
        }
        assert_eq!(check_reset_state(&c), Ok(()));
        c[0xfd] = 0x40;
        assert_eq!(
            problems(&c),
            vec![ResetProblem::CapabilityLoop { at: 0x40 }]
        );
    }

    #[test]
    fn pointers_into_the_header_or_past_the_buffer_are_reported() {
        let mut c = clean_vf();
        c[0x81] = 0x10;
        assert_eq!(
            problems(&c),
            vec![ResetProblem::BadCapabilityPointer {
                from: 0x81,
                pointer: 0x10
            }]
        );
        let mut c = clean_vf();
        c[CAP_POINTER] = 0x3c;
        assert_eq!(
            problems(&c),
            vec![ResetProblem::BadCapabilityPointer {
                from: 0x34,
                pointer: 0x3c
            }]
        );
        // 0x70 needs bytes up to 0x74: a 0x72-byte buffer cannot show its message control.
        let c = clean_vf();
        assert_eq!(
            problems(&c[..0x72]),
            vec![ResetProblem::CapabilityPastEnd {
                at: 0x70,
                len: 0x72
            }]
        );
        // Then PCIe at 0x80 is past a 0x74-byte buffer; 0x84 bytes hold both.
        assert_eq!(
            problems(&c[..0x74]),
            vec![ResetProblem::CapabilityPastEnd {
                at: 0x80,
                len: 0x74
            }]
        );
        assert_eq!(check_reset_state(&c[..0x84]), Ok(()));
    }

    #[test]
    fn the_summary_is_short() {
        assert_eq!(summary(&[]), "");
        let many: Vec<ResetProblem> = (0..6)
            .map(|bar| ResetProblem::Bar {
                bar,
                address: 0x1000,
            })
            .collect();
        let line = summary(&many);
        assert!(line.ends_with("; and 2 more"), "{line}");
        assert!(!line.contains('\n'));
    }

    proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4200)) {
            let _ = check_reset_state(&bytes);
        }

        #[test]
        fn never_panics_on_any_header_with_a_capability_list(
            mut bytes in proptest::collection::vec(any::<u8>(), 64..=256),
        ) {
            // Most random headers are not type 0; make them so the capability walk runs.
            bytes[HEADER_TYPE] = 0;
            bytes[STATUS] |= 0x10;
            if let Err(found) = check_reset_state(&bytes) {
                prop_assert!(!found.is_empty());
                prop_assert!(found.len() <= 3 + 6 + MAX_CAPABILITIES + 1);
                let _ = summary(&found);
            }
        }
    }
}
