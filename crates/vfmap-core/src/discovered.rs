//! What a card's `discover` hook prints: the function each VF of a PF carries, so T1 can be
//! read from the device, or checked against the profile ([`compare`]).
//!
//! # Format
//!
//! UTF-8 text, one VF per line: `<vf_number> <function>`, the two fields separated by one or
//! more spaces or tabs, e.g.
//!
//! ```text
//! # acme-fpga 0000:3b:00.0
//! 0 crypto
//! 1 crypto
//! 2 compress
//! ```
//!
//! - `vf_number` is the VF's number relative to its PF (the *N* of `virtfnN`): decimal digits
//!   only (no sign, no `+`), 0 to 65535; leading zeros are read as decimal (`010` is ten).
//! - `function` is a function name as in profiles: `[a-z0-9][a-z0-9._-]*`, at most 64
//!   characters.
//! - A line may not start with a space or tab, and holds nothing after the function (a comment
//!   there is an error). Trailing spaces, tabs and a carriage return are ignored.
//! - Empty lines, lines of only spaces and tabs, and lines starting with `#` are ignored.
//! - Each VF is listed at most once. VFs not listed carry no function the hook knows of.
//! - At most 1 MiB of text (so at most 65,536 entries: a VF number fits in 16 bits and
//!   appears once).
//!
//! An error names the 1-based line, the reason, and the line itself quoted with Rust-style
//! escapes (`\t`, `\u{1b}`, …), cut at 80 characters.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;

use crate::profile::{Card, FunctionName, VfSet};

/// The most text a `discover` hook may print.
pub const MAX_TEXT: usize = 1 << 20;
/// The most entries a hook's output can hold (implied by the VF number's range).
pub const MAX_ENTRIES: usize = 1 << 16;
/// A line is quoted in errors up to this many characters.
const QUOTED_CHARS: usize = 80;

/// Output of a `discover` hook that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoverError {
    /// More than [`MAX_TEXT`] bytes.
    #[error("the output is {len} bytes, more than the {MAX_TEXT} allowed")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Not UTF-8.
    #[error("line {line}: the output is not UTF-8")]
    NotUtf8 {
        /// 1-based line of the first invalid byte.
        line: usize,
    },
    /// A line that breaks the format.
    #[error("line {line}: {reason}: {quoted}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: LineError,
        /// The line, quoted and escaped, cut at 80 characters.
        quoted: String,
    },
}

/// What is wrong with one line of a `discover` hook's output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Leading space or tab.
    #[error(
        "the line starts with whitespace; write `<vf_number> <function>` from its first column"
    )]
    LeadingSpace,
    /// Only one field.
    #[error("no function after the VF number; write `<vf_number> <function>`")]
    MissingFunction,
    /// More than two fields.
    #[error("more than two fields; write `<vf_number> <function>` and nothing after it")]
    ExtraField,
    /// The first field is not a VF number.
    #[error("{text:?} is not a VF number (decimal digits, 0-65535)")]
    BadVfNumber {
        /// The field, cut at 80 characters.
        text: String,
    },
    /// The second field is not a function name.
    #[error("{0}")]
    BadFunction(String),
    /// The VF was listed before.
    #[error("VF {vf} is listed twice (first on line {first_line})")]
    Duplicate {
        /// The VF number.
        vf: u16,
        /// Where it was listed first.
        first_line: usize,
    },
}

/// Parses a hook's raw output: checks the size first, then UTF-8, then [`parse`].
pub fn parse_bytes(output: &[u8]) -> Result<BTreeMap<u16, FunctionName>, DiscoverError> {
    if output.len() > MAX_TEXT {
        return Err(DiscoverError::TooLong { len: output.len() });
    }
    match std::str::from_utf8(output) {
        Ok(text) => parse(text),
        Err(e) => {
            let before = &output[..e.valid_up_to()];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            Err(DiscoverError::NotUtf8 { line })
        }
    }
}

/// Parses the format described in the module doc into VF number → function.
pub fn parse(text: &str) -> Result<BTreeMap<u16, FunctionName>, DiscoverError> {
    if text.len() > MAX_TEXT {
        return Err(DiscoverError::TooLong { len: text.len() });
    }
    let mut found = BTreeMap::new();
    // Where each VF was listed, for the duplicate message.
    let mut lines_of: BTreeMap<u16, usize> = BTreeMap::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let content = raw.trim_end_matches([' ', '\t', '\r']);
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let fail = |reason: LineError| DiscoverError::Line {
            line,
            reason,
            quoted: quote(raw),
        };
        if content.starts_with([' ', '\t']) {
            return Err(fail(LineError::LeadingSpace));
        }
        let mut fields = content.split([' ', '\t']).filter(|f| !f.is_empty());
        let (Some(number), Some(function)) = (fields.next(), fields.next()) else {
            return Err(fail(LineError::MissingFunction));
        };
        if fields.next().is_some() {
            return Err(fail(LineError::ExtraField));
        }
        let vf = parse_vf(number).ok_or_else(|| {
            fail(LineError::BadVfNumber {
                text: number.chars().take(QUOTED_CHARS).collect(),
            })
        })?;
        let function = FunctionName::new(function).map_err(|e| {
            // The name checker quotes the whole field: keep the message short.
            let reason = if function.len() > QUOTED_CHARS {
                format!(
                    "the function name is {} bytes long, more than 64",
                    function.len()
                )
            } else {
                e
            };
            fail(LineError::BadFunction(reason))
        })?;
        if let Some(&first_line) = lines_of.get(&vf) {
            return Err(fail(LineError::Duplicate { vf, first_line }));
        }
        lines_of.insert(vf, line);
        found.insert(vf, function);
    }
    debug_assert!(found.len() <= MAX_ENTRIES);
    Ok(found)
}

/// Prints `found` in the format, one line per VF in ascending order: what a hook prints, and
/// what [`parse`] reads back unchanged.
pub fn to_text(found: &BTreeMap<u16, FunctionName>) -> String {
    let mut text = String::new();
    for (vf, function) in found {
        let _ = writeln!(text, "{vf} {function}");
    }
    text
}

/// Decimal digits only (`u16::from_str` alone would take a `+`).
fn parse_vf(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `"…"` with Rust escapes, cut at 80 characters (an ellipsis says it was cut).
fn quote(line: &str) -> String {
    let mut quoted = String::from("\"");
    for c in line.chars().take(QUOTED_CHARS) {
        quoted.extend(c.escape_debug());
    }
    quoted.push('"');
    if line.chars().nth(QUOTED_CHARS).is_some() {
        quoted.push('…');
    }
    quoted
}

/// Where a device's `discover` output and the card's profile disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disagreement {
    /// The device's function for the VF is not the profile's.
    Differs {
        /// The VF number.
        vf: u16,
        /// What the profile assigns.
        profile: FunctionName,
        /// What the device reports.
        device: FunctionName,
    },
    /// The profile assigns the VF a function; the device does not list the VF.
    NotReported {
        /// The VF number.
        vf: u16,
        /// What the profile assigns.
        profile: FunctionName,
    },
    /// The device lists a VF (below `num_vfs`) the profile assigns no function.
    Unassigned {
        /// The VF number.
        vf: u16,
        /// What the device reports.
        device: FunctionName,
    },
    /// The device lists a VF at or past the number of VFs enabled.
    BeyondNumVfs {
        /// The VF number.
        vf: u16,
        /// What the device reports.
        device: FunctionName,
        /// VFs enabled on the PF.
        num_vfs: u16,
    },
    /// The device reports a function the card's profile does not define.
    UnknownFunction {
        /// The function.
        device: FunctionName,
        /// The VFs it is reported on.
        vfs: VfSet,
    },
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disagreement::Differs {
                vf,
                profile,
                device,
            } => write!(
                f,
                "VF {vf} carries function {device} on the device, but the profile gives it \
                 {profile}: fix the profile's vfs lists, or program the VF"
            ),
            Disagreement::NotReported { vf, profile } => write!(
                f,
                "the profile gives VF {vf} function {profile}, but the discover hook does not \
                 list it: the VF may not be configured, or the hook misses it"
            ),
            Disagreement::Unassigned { vf, device } => write!(
                f,
                "VF {vf} carries function {device} on the device, but the profile gives it \
                 none: add it to that function's vfs list"
            ),
            Disagreement::BeyondNumVfs {
                vf,
                device,
                num_vfs,
            } => write!(
                f,
                "the discover hook lists VF {vf} (function {device}), but only {num_vfs} VFs are \
                 enabled: VF numbers count from 0 on each PF (the N of virtfnN); check the hook"
            ),
            Disagreement::UnknownFunction { device, vfs } => write!(
                f,
                "the device reports function {device} (VFs {vfs}), which the card's profile does \
                 not define: add a [[card.function]] named \"{device}\", or program those VFs"
            ),
        }
    }
}

/// Compares what `discover` found on a PF with `num_vfs` VFs enabled against `card`'s
/// profile. Per-VF disagreements come first in VF order, then one per unknown function in name
/// order; a VF the profile gives one function and the device an unknown one shows in both.
pub fn compare(
    card: &Card,
    num_vfs: u16,
    found: &BTreeMap<u16, FunctionName>,
) -> Vec<Disagreement> {
    let mut disagreements = Vec::new();
    for vf in 0..num_vfs {
        let profile = card.function_of(vf).map(|desc| &desc.name);
        match (profile, found.get(&vf)) {
            (Some(profile), Some(device)) if profile != device => {
                disagreements.push(Disagreement::Differs {
                    vf,
                    profile: profile.clone(),
                    device: device.clone(),
                });
            }
            (Some(profile), None) => disagreements.push(Disagreement::NotReported {
                vf,
                profile: profile.clone(),
            }),
            (None, Some(device)) => disagreements.push(Disagreement::Unassigned {
                vf,
                device: device.clone(),
            }),
            _ => {}
        }
    }
    for (&vf, device) in found.range(num_vfs..) {
        disagreements.push(Disagreement::BeyondNumVfs {
            vf,
            device: device.clone(),
            num_vfs,
        });
    }
    let mut unknown: BTreeMap<&FunctionName, Vec<u16>> = BTreeMap::new();
    for (&vf, device) in found {
        if !card.functions.iter().any(|f| &f.desc.name == device) {
            unknown.entry(device).or_default().push(vf);
        }
    }
    for (device, vfs) in unknown {
        let list = vfs.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        disagreements.push(Disagreement::UnknownFunction {
            device: device.clone(),
            vfs: VfSet::parse(&list).unwrap_or_default(),
        });
    }
    disagreements
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profiles;
    use proptest::prelude::*;

    fn name(text: &str) -> FunctionName {
        FunctionName::new(text).unwrap()
    }

    fn map(entries: &[(u16, &str)]) -> BTreeMap<u16, FunctionName> {
        entries.iter().map(|&(vf, f)| (vf, name(f))).collect()
    }

    /// VFs 0-1 crypto, 2 compress, 3 unassigned, of 4.
    fn card() -> Card {
        let text = r#"
            [[card]]
            name = "acme-fpga"
            vendor = "0x1b36"
            device = "0x0010"
            num_vfs = 4

            [[card.function]]
            name = "crypto"
            vfs = "0-1"
            guest_driver = "pci-stub"

            [[card.function]]
            name = "compress"
            vfs = "2"
            guest_driver = "uio_pci_generic"
        "#;
        Profiles::parse(text, "test.toml").unwrap().cards.remove(0)
    }

    fn line_error(text: &str) -> (usize, LineError, String) {
        match parse(text) {
            Err(DiscoverError::Line {
                line,
                reason,
                quoted,
            }) => (line, reason, quoted),
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let text = "# acme-fpga 0000:3b:00.0\n0 crypto\n1 crypto\n2 compress\n";
        assert_eq!(
            parse(text).unwrap(),
            map(&[(0, "crypto"), (1, "crypto"), (2, "compress")])
        );
    }

    #[test]
    fn blank_lines_comments_tabs_and_trailing_whitespace_are_accepted() {
        let text = "\n   \n\t\n#0 ignored\n0\t\tcrypto \t\r\n7   comp.v2_x-1\r\n065535 a";
        assert_eq!(
            parse(text).unwrap(),
            map(&[(0, "crypto"), (7, "comp.v2_x-1"), (65535, "a")])
        );
        assert_eq!(parse("").unwrap(), BTreeMap::new());
        assert_eq!(parse("# nothing here\n").unwrap(), BTreeMap::new());
        assert_eq!(parse("010 crypto").unwrap(), map(&[(10, "crypto")]));
    }

    #[test]
    fn each_line_error_names_the_line_and_quotes_it() {
        assert_eq!(
            line_error("0 crypto\n 1 crypto"),
            (2, LineError::LeadingSpace, "\" 1 crypto\"".into())
        );
        assert_eq!(line_error("\n\n3").1, LineError::MissingFunction);
        assert_eq!(line_error("3 crypto # ok").1, LineError::ExtraField);
        for bad in ["+1", "-1", "65536", "0x1", "1e3", "١"] {
            assert_eq!(
                line_error(&format!("{bad} crypto")).1,
                LineError::BadVfNumber { text: bad.into() },
                "{bad}"
            );
        }
        assert!(matches!(
            line_error("1 Crypto").1,
            LineError::BadFunction(message) if message.contains("\"Crypto\" is not a valid function name")
        ));
        assert_eq!(
            line_error("0 crypto\n1 crypto\n\n0 compress").1,
            LineError::Duplicate {
                vf: 0,
                first_line: 1
            }
        );
    }

    #[test]
    fn the_message_reads_well_and_escapes_the_line() {
        let error = parse("0 crypto\n1 \u{1b}[31mred\t# x").unwrap_err();
        assert_eq!(
            error.to_string(),
            "line 2: more than two fields; write `<vf_number> <function>` and nothing after \
             it: \"1 \\u{1b}[31mred\\t# x\""
        );
        let duplicate = parse("4 a\n4 a").unwrap_err().to_string();
        assert_eq!(
            duplicate,
            "line 2: VF 4 is listed twice (first on line 1): \"4 a\""
        );
    }

    #[test]
    fn a_long_line_is_cut_in_the_message() {
        let long = format!("1 {}", "x".repeat(200));
        let (_, reason, quoted) = line_error(&long);
        assert_eq!(
            reason,
            LineError::BadFunction("the function name is 200 bytes long, more than 64".into())
        );
        assert_eq!(quoted, format!("\"1 {}\"…", "x".repeat(78)));
        let (_, reason, _) = line_error(&format!("{} a", "9".repeat(500)));
        assert_eq!(
            reason,
            LineError::BadVfNumber {
                text: "9".repeat(80)
            }
        );
    }

    #[test]
    fn size_and_encoding_are_checked_first() {
        let big = "# padding\n".repeat(MAX_TEXT / 10 + 1);
        assert_eq!(parse(&big), Err(DiscoverError::TooLong { len: big.len() }));
        assert_eq!(
            parse_bytes(big.as_bytes()),
            Err(DiscoverError::TooLong { len: big.len() })
        );
        assert_eq!(
            parse_bytes(b"0 crypto\n1 cr\xffpto\n"),
            Err(DiscoverError::NotUtf8 { line: 2 })
        );
        assert_eq!(parse_bytes(b"0 crypto\n").unwrap(), map(&[(0, "crypto")]));
    }

    #[test]
    fn every_vf_number_fits_in_the_size_bound() {
        let all: BTreeMap<u16, FunctionName> = (0..=u16::MAX).map(|vf| (vf, name("c"))).collect();
        let text = to_text(&all);
        assert!(text.len() <= MAX_TEXT, "{}", text.len());
        assert_eq!(parse(&text).unwrap().len(), MAX_ENTRIES);
    }

    #[test]
    fn agreement_gives_nothing() {
        let found = map(&[(0, "crypto"), (1, "crypto"), (2, "compress")]);
        assert_eq!(compare(&card(), 4, &found), vec![]);
        // With fewer VFs enabled, the profile's later VFs do not exist.
        assert_eq!(
            compare(&card(), 2, &map(&[(0, "crypto"), (1, "crypto")])),
            vec![]
        );
    }

    #[test]
    fn every_disagreement_kind_is_reported_in_order() {
        let found = map(&[
            (0, "compress"),
            (2, "compress"),
            (3, "crypto"),
            (5, "crypto"),
            (6, "hash"),
        ]);
        let got = compare(&card(), 4, &found);
        assert_eq!(
            got,
            vec![
                Disagreement::Differs {
                    vf: 0,
                    profile: name("crypto"),
                    device: name("compress")
                },
                Disagreement::NotReported {
                    vf: 1,
                    profile: name("crypto")
                },
                Disagreement::Unassigned {
                    vf: 3,
                    device: name("crypto")
                },
                Disagreement::BeyondNumVfs {
                    vf: 5,
                    device: name("crypto"),
                    num_vfs: 4
                },
                Disagreement::BeyondNumVfs {
                    vf: 6,
                    device: name("hash"),
                    num_vfs: 4
                },
                Disagreement::UnknownFunction {
                    device: name("hash"),
                    vfs: VfSet::parse("6").unwrap()
                },
            ]
        );
        let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown[0],
            "VF 0 carries function compress on the device, but the profile gives it crypto: fix \
             the profile's vfs lists, or program the VF"
        );
        assert!(shown[1].contains("the profile gives VF 1 function crypto"));
        assert!(shown[2].contains("add it to that function's vfs list"));
        assert!(shown[3].contains("only 4 VFs are enabled"));
        assert_eq!(
            shown[5],
            "the device reports function hash (VFs 6), which the card's profile does not \
             define: add a [[card.function]] named \"hash\", or program those VFs"
        );
    }

    #[test]
    fn an_unknown_function_on_an_assigned_vf_shows_twice() {
        let found = map(&[(0, "hash"), (1, "crypto"), (2, "hash")]);
        let got = compare(&card(), 3, &found);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(&got[0], Disagreement::Differs { vf: 0, .. }));
        assert!(matches!(&got[1], Disagreement::Differs { vf: 2, .. }));
        assert_eq!(
            got[2],
            Disagreement::UnknownFunction {
                device: name("hash"),
                vfs: VfSet::parse("0,2").unwrap()
            }
        );
    }

    fn function_name() -> impl Strategy<Value = FunctionName> {
        "[a-z0-9][a-z0-9._-]{0,63}".prop_map(|text| name(&text))
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(text in ".{0,400}") {
            let _ = parse(&text);
        }

        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_bytes(&bytes);
        }

        #[test]
        fn never_panics_on_near_misses(
            lines in proptest::collection::vec("[ \t#+0-9a-zA-Z._\r-]{0,20}", 0..20),
        ) {
            let text = lines.join("\n");
            if let Err(e) = parse(&text) {
                prop_assert!(e.to_string().starts_with("line "));
            }
        }

        #[test]
        fn printing_and_parsing_gives_the_same_map(
            found in proptest::collection::btree_map(any::<u16>(), function_name(), 0..50),
        ) {
            prop_assert_eq!(parse(&to_text(&found)).unwrap(), found);
        }

        #[test]
        fn compare_never_panics(
            num_vfs in 0u16..16,
            found in proptest::collection::btree_map(0u16..20, "crypto|compress|hash", 0..20),
        ) {
            let found: BTreeMap<u16, FunctionName> =
                found.into_iter().map(|(vf, f)| (vf, name(&f))).collect();
            let got = compare(&card(), num_vfs, &found);
            for d in &got {
                prop_assert!(!d.to_string().is_empty());
            }
        }
    }
}
