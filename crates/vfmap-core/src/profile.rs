//! Device profiles: which function each VF of a card carries, and which drivers it needs.
//!
//! A profile file is TOML (see `docs/profiles.md`). [`Profiles::parse`] turns its text into
//! validated values or an error that names the file, the card, the function and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::addr::{Bdf, PciId};

mod hooks;

pub use hooks::{
    DEFAULT_HOOK_DEADLINE, HookPath, HookPhase, Hooks, MAX_HOOK_DEADLINE, ProgramTargets,
};

/// The driver the host binds a VF to when a function names none.
pub const DEFAULT_HOST_DRIVER: &str = "vfio-pci";

/// A profile file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("{file}:{message}")]
    Syntax {
        /// Where the text came from.
        file: String,
        /// `line:column: message`, from the TOML parser.
        message: String,
    },
    /// Well-formed TOML whose values break a rule.
    #[error("{file}: {place}: {problem}")]
    Invalid {
        /// Where the text came from.
        file: String,
        /// Card, function and field, e.g. `card "acme" (#1), function "crypto", field vfs`.
        place: String,
        /// What is wrong and what would be right.
        problem: String,
    },
}

/// A validated name made for paths and protocols: `[a-z0-9][a-z0-9._-]*`, at most 64 bytes.
/// Shared (`Arc<str>`): a host has tens of thousands of VFs and a handful of functions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct FunctionName(Arc<str>);

impl FunctionName {
    /// Checks `text`; the error explains the rule.
    pub fn new(text: &str) -> Result<FunctionName, String> {
        let ok_first = text
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let ok_rest = text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if text.is_empty() {
            Err("the name is empty".into())
        } else if text.len() > 64 || !ok_first || !ok_rest {
            Err(format!(
                "{text:?} is not a valid function name: use lowercase letters, digits, '.', '_' \
                 and '-', starting with a letter or digit, at most 64 characters"
            ))
        } else {
            Ok(FunctionName(Arc::from(text)))
        }
    }
}

crate::names::validated_name!(FunctionName);

/// A kernel driver/module name that is safe to pass to `modprobe` and to join into a sysfs path:
/// ASCII letters, digits, `_` and `-`, at most 55 bytes (the kernel's `MODULE_NAME_LEN` less one).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct DriverName(Arc<str>);

impl DriverName {
    /// Checks `text`; the error explains the rule.
    pub fn new(text: &str) -> Result<DriverName, String> {
        let plain = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if text.is_empty() {
            Err("the driver name is empty".into())
        } else if !plain || text.len() > 55 || text.starts_with('-') {
            Err(format!(
                "{text:?} is not a plain module name: use letters, digits, '_' and '-' only \
                 (no '/', whitespace or '..'), at most 55 characters"
            ))
        } else {
            Ok(DriverName(Arc::from(text)))
        }
    }
}

crate::names::validated_name!(DriverName);

/// A set of VF numbers, written `"0-3,6,8-9"`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VfSet(BTreeSet<u16>);

impl VfSet {
    /// Parses the range syntax. A VF listed twice is an error: it is almost always a typo.
    pub fn parse(text: &str) -> Result<VfSet, String> {
        let mut set = BTreeSet::new();
        if text.trim().is_empty() {
            return Err("the VF list is empty; write e.g. \"0-3\" or \"0,2,5-7\"".into());
        }
        for part in text.split(',') {
            let part = part.trim();
            let number = |s: &str| -> Result<u16, String> {
                s.trim().parse::<u16>().map_err(|_| {
                    format!("{s:?} in {text:?} is not a VF number (0-65535); write e.g. \"0-3,6\"")
                })
            };
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => {
                    let n = number(part)?;
                    (n, n)
                }
            };
            if first > last {
                return Err(format!(
                    "range {part:?} runs backwards; write {last}-{first}"
                ));
            }
            for vf in first..=last {
                if !set.insert(vf) {
                    return Err(format!("VF {vf} is listed twice in {text:?}"));
                }
            }
        }
        Ok(VfSet(set))
    }

    /// Whether VF `vf` is in the set.
    pub fn contains(&self, vf: u16) -> bool {
        self.0.contains(&vf)
    }

    /// The VF numbers, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().copied()
    }

    /// The highest VF number, if any.
    pub fn max(&self) -> Option<u16> {
        self.0.last().copied()
    }

    /// How many VFs the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for VfSet {
    /// Writes the compact range form, e.g. `0-3,6`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut iter = self.0.iter().copied().peekable();
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end = iter.next().unwrap_or(end);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// What the operator says one kind of VF does, and the drivers it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionDesc {
    /// The key service requests use, e.g. `crypto`.
    pub name: FunctionName,
    /// Free text for people.
    pub description: String,
    /// The driver the VM must bind to a VF of this function.
    pub guest_driver: DriverName,
    /// The driver the host binds the VF to (`vfio-pci` unless the profile says otherwise).
    pub host_driver: DriverName,
}

/// One function of a card, and which of its VFs carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardFunction {
    /// The function.
    pub desc: FunctionDesc,
    /// VF numbers (relative to the PF) that carry it.
    pub vfs: VfSet,
    /// This function's own hooks, over the card's (`program`: when a VF becomes this
    /// function; `scrub` and `bring_up`: for VFs carrying it).
    pub hooks: Hooks,
    /// The functions a VF carrying this one may be re-programmed into at run time.
    pub programmable_to: ProgramTargets,
}

/// A card model (or one PF) and the layout of its VFs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    /// Free text naming the card.
    pub name: String,
    /// The profile file the card came from, for error messages.
    pub source: String,
    /// PF vendor ID to match.
    pub vendor: PciId,
    /// PF device ID to match.
    pub device: PciId,
    /// When set, only this PF matches.
    pub pf: Option<Bdf>,
    /// VFs to enable on each matching PF.
    pub num_vfs: u16,
    /// The functions, in file order.
    pub functions: Vec<CardFunction>,
    /// The card's hooks (`[card.hooks]`).
    pub hooks: Hooks,
}

impl Card {
    /// Whether this card describes the PF at `location` with the given IDs.
    pub fn matches(&self, location: Bdf, vendor: PciId, device: PciId) -> bool {
        self.vendor == vendor && self.device == device && self.pf.is_none_or(|pf| pf == location)
    }

    /// The function VF `vf_index` carries, if the profile assigns it one.
    pub fn function_of(&self, vf_index: u16) -> Option<&FunctionDesc> {
        self.functions
            .iter()
            .find(|f| f.vfs.contains(vf_index))
            .map(|f| &f.desc)
    }

    /// One of the card's functions, by name.
    pub fn function(&self, name: &str) -> Option<&CardFunction> {
        self.functions.iter().find(|f| f.desc.name.as_str() == name)
    }

    /// The hook for `phase` and its deadline: `function`'s own when it names one, else the
    /// card's. For `program`, `function` is the function the VF becomes; for `scrub` and
    /// `bring_up`, the one it carries.
    pub fn hook(
        &self,
        phase: HookPhase,
        function: Option<&str>,
    ) -> Option<(&HookPath, std::time::Duration)> {
        let own = function
            .and_then(|f| self.function(f))
            .and_then(|f| f.hooks.get(phase).map(|h| (h, f.hooks.deadline)));
        own.or_else(|| self.hooks.get(phase).map(|h| (h, self.hooks.deadline)))
    }

    /// Whether a VF carrying `from` may be re-programmed into `to` (the profile's policy).
    pub fn may_program(&self, from: &str, to: &str) -> bool {
        self.function(from)
            .is_some_and(|f| f.programmable_to.iter().any(|t| t.as_str() == to))
    }
}

/// All cards of one or more profile files, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profiles {
    /// The cards, in file order.
    pub cards: Vec<Card>,
}

/// The file format, exactly as written; every field documented in `docs/profiles.md`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    /// The cards.
    #[serde(default)]
    card: Vec<CardSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CardSpec {
    /// Free text naming the card.
    name: String,
    /// PF vendor ID, e.g. "0x1b36".
    vendor: String,
    /// PF device ID, e.g. "0x0010".
    device: String,
    /// Optional: only this PF.
    pf: Option<String>,
    /// VFs to enable on each matching PF.
    num_vfs: i64,
    /// The functions of the card's VFs.
    #[serde(default)]
    function: Vec<FunctionSpec>,
    /// The card's hooks.
    hooks: Option<hooks::HooksSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionSpec {
    /// The function's key.
    name: String,
    /// Free text.
    #[serde(default)]
    description: String,
    /// VF numbers, e.g. "0-1,4".
    vfs: String,
    /// Driver the VM loads.
    guest_driver: String,
    /// Driver the host binds; vfio-pci by default.
    host_driver: Option<String>,
    /// This function's own hooks.
    hooks: Option<hooks::HooksSpec>,
    /// Functions a VF carrying this one may be re-programmed into.
    #[serde(default)]
    programmable_to: Vec<String>,
}

impl Profiles {
    /// Parses and validates the text of a profile file; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Profiles, ProfileError> {
        let raw: ProfileFile = toml::from_str(text).map_err(|e| {
            // One line, `file:line:column: message`, like a compiler.
            let position = e.span().map_or_else(String::new, |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("{line}:{column}: ")
            });
            ProfileError::Syntax {
                file: file.to_owned(),
                message: format!("{position}{}", e.message().trim().replace('\n', " ")),
            }
        })?;
        let mut profiles = Profiles::default();
        for (i, spec) in raw.card.into_iter().enumerate() {
            let card = validate_card(spec, i + 1, file)?;
            profiles.add_card(card, file)?;
        }
        Ok(profiles)
    }

    /// Adds a card, checking it against the cards already present (for several files).
    pub fn add_card(&mut self, card: Card, file: &str) -> Result<(), ProfileError> {
        let invalid = |problem: String| ProfileError::Invalid {
            file: file.to_owned(),
            place: format!("card {:?}", card.name),
            problem,
        };
        if self.cards.iter().any(|c| c.name == card.name) {
            return Err(invalid("another card has the same name".into()));
        }
        if let Some(other) = self
            .cards
            .iter()
            .find(|c| c.vendor == card.vendor && c.device == card.device && c.pf == card.pf)
        {
            return Err(invalid(format!(
                "card {:?} already matches the same PFs ({}:{}{}); give one of them a `pf`",
                other.name,
                card.vendor,
                card.device,
                card.pf.map(|p| format!(" at {p}")).unwrap_or_default()
            )));
        }
        // A function name means one thing everywhere: the guest must load one driver for it.
        for function in &card.functions {
            let known = self
                .cards
                .iter()
                .flat_map(|c| c.functions.iter().map(move |f| (c, f)))
                .find(|(_, f)| f.desc.name == function.desc.name);
            if let Some((other_card, other)) = known
                && (other.desc.guest_driver != function.desc.guest_driver
                    || other.desc.host_driver != function.desc.host_driver)
            {
                return Err(invalid(format!(
                    "function {:?} uses drivers guest={} host={}, but card {:?} defines it with \
                     guest={} host={}; a function name must mean the same drivers on every card",
                    function.desc.name.as_str(),
                    function.desc.guest_driver,
                    function.desc.host_driver,
                    other_card.name,
                    other.desc.guest_driver,
                    other.desc.host_driver
                )));
            }
        }
        self.cards.push(card);
        Ok(())
    }

    /// Every distinct function, by name.
    pub fn functions(&self) -> BTreeMap<&FunctionName, &FunctionDesc> {
        self.cards
            .iter()
            .flat_map(|c| c.functions.iter().map(|f| (&f.desc.name, &f.desc)))
            .collect()
    }

    /// The card for a PF: one naming this PF wins over one matching by ID only.
    pub fn card_for(&self, location: Bdf, vendor: PciId, device: PciId) -> Option<&Card> {
        let mut matching = self
            .cards
            .iter()
            .filter(|c| c.matches(location, vendor, device));
        let first = matching.next()?;
        Some(
            std::iter::once(first)
                .chain(matching)
                .find(|c| c.pf.is_some())
                .unwrap_or(first),
        )
    }
}

fn validate_card(spec: CardSpec, number: usize, file: &str) -> Result<Card, ProfileError> {
    let card_place = if spec.name.trim().is_empty() {
        format!("card #{number}")
    } else {
        format!("card {:?} (#{number})", spec.name)
    };
    let invalid = |field: &str, problem: String| ProfileError::Invalid {
        file: file.to_owned(),
        place: format!("{card_place}, field `{field}`"),
        problem,
    };
    if spec.name.trim().is_empty() {
        return Err(invalid("name", "the card name is empty".into()));
    }
    if spec.name.len() > 128 || spec.name.chars().any(char::is_control) {
        return Err(invalid(
            "name",
            "the card name must be at most 128 characters without control characters".into(),
        ));
    }
    let vendor: PciId = spec
        .vendor
        .parse()
        .map_err(|e| invalid("vendor", format!("{e}")))?;
    let device: PciId = spec
        .device
        .parse()
        .map_err(|e| invalid("device", format!("{e}")))?;
    let pf = spec
        .pf
        .as_deref()
        .map(str::parse::<Bdf>)
        .transpose()
        .map_err(|e| invalid("pf", format!("{e}")))?;
    let num_vfs = u16::try_from(spec.num_vfs).map_err(|_| {
        invalid(
            "num_vfs",
            format!("{} is not a VF count (0-65535)", spec.num_vfs),
        )
    })?;

    let card_hooks = spec
        .hooks
        .unwrap_or_default()
        .validate(true, DEFAULT_HOOK_DEADLINE)
        .map_err(|(field, problem)| invalid(&field, problem))?;
    let mut functions: Vec<CardFunction> = Vec::new();
    let mut targets: Vec<Vec<String>> = Vec::new();
    for f in spec.function {
        let fn_place = format!("{card_place}, function {:?}", f.name);
        let invalid = |field: &str, problem: String| ProfileError::Invalid {
            file: file.to_owned(),
            place: format!("{fn_place}, field `{field}`"),
            problem,
        };
        let name = FunctionName::new(&f.name).map_err(|p| invalid("name", p))?;
        if functions.iter().any(|g| g.desc.name == name) {
            return Err(invalid(
                "name",
                "the card already has a function of this name".into(),
            ));
        }
        let vfs = VfSet::parse(&f.vfs).map_err(|p| invalid("vfs", p))?;
        if let Some(max) = vfs.max()
            && max >= num_vfs
        {
            return Err(invalid(
                "vfs",
                match num_vfs {
                    0 => format!("VF {max} is past num_vfs = 0 (the card enables no VFs)"),
                    n => format!(
                        "VF {max} is past num_vfs = {n} (valid VF numbers are 0-{})",
                        n - 1
                    ),
                },
            ));
        }
        if let Some(other) = functions
            .iter()
            .find(|g| vfs.iter().any(|v| g.vfs.contains(v)))
        {
            let shared: VfSet = VfSet(vfs.iter().filter(|v| other.vfs.contains(*v)).collect());
            let (noun, verb) = if shared.len() == 1 {
                ("VF", "is")
            } else {
                ("VFs", "are")
            };
            return Err(invalid(
                "vfs",
                format!(
                    "{noun} {shared} {verb} also given to function {:?}; a VF carries one function",
                    other.desc.name.as_str()
                ),
            ));
        }
        if f.description.len() > 1024 {
            return Err(invalid("description", "at most 1024 characters".into()));
        }
        let guest_driver =
            DriverName::new(&f.guest_driver).map_err(|p| invalid("guest_driver", p))?;
        let host_driver = DriverName::new(f.host_driver.as_deref().unwrap_or(DEFAULT_HOST_DRIVER))
            .map_err(|p| invalid("host_driver", p))?;
        let hooks = f
            .hooks
            .unwrap_or_default()
            .validate(false, card_hooks.deadline)
            .map_err(|(field, problem)| invalid(&field, problem))?;
        targets.push(f.programmable_to);
        functions.push(CardFunction {
            desc: FunctionDesc {
                name,
                description: f.description,
                guest_driver,
                host_driver,
            },
            vfs,
            hooks,
            programmable_to: ProgramTargets::new(),
        });
    }
    let mut card = Card {
        name: spec.name,
        source: file.to_owned(),
        vendor,
        device,
        pf,
        num_vfs,
        functions,
        hooks: card_hooks,
    };
    for (i, names) in targets.into_iter().enumerate() {
        let from = card.functions[i].desc.name.clone();
        let invalid = |problem: String| ProfileError::Invalid {
            file: file.to_owned(),
            place: format!(
                "{card_place}, function {:?}, field `programmable_to`",
                from.as_str()
            ),
            problem,
        };
        let mut set = ProgramTargets::new();
        for name in names {
            let Some(to) = card.function(&name) else {
                return Err(invalid(format!(
                    "{:?} is not a function of this card; a VF can only be re-programmed into \
                     one of its card's functions",
                    name.escape_debug().to_string()
                )));
            };
            if to.desc.name == from {
                return Err(invalid(
                    "a function cannot be re-programmed into itself".into(),
                ));
            }
            if card.hook(HookPhase::Program, Some(&name)).is_none() {
                return Err(invalid(format!(
                    "re-programming into {name:?} needs a `program` hook: give one in \
                     [card.hooks] or in function {name:?}'s hooks"
                )));
            }
            if !set.insert(to.desc.name.clone()) {
                return Err(invalid(format!("{name:?} is listed twice")));
            }
        }
        card.functions[i].programmable_to = set;
    }
    Ok(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[card]]
name = "acme-fpga"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 5
[[card.function]]
name = "crypto"
description = "AES-GCM / SHA offload"
vfs = "0-1"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "2,4"
guest_driver = "uio_pci_generic"
host_driver = "vfio-pci"
"#;

    fn err(text: &str) -> String {
        Profiles::parse(text, "p.toml").unwrap_err().to_string()
    }

    fn with(card_extra: &str, function: &str) -> String {
        format!(
            "[[card]]\nname = \"c\"\nvendor = \"0x1b36\"\ndevice = \"0x0010\"\nnum_vfs = 4\n{card_extra}\n\
             [[card.function]]\n{function}\n"
        )
    }

    #[test]
    fn parses_the_documented_shape() {
        let p = Profiles::parse(GOOD, "p.toml").unwrap();
        let card = &p.cards[0];
        assert_eq!(card.num_vfs, 5);
        assert_eq!(card.vendor, PciId(0x1b36));
        assert_eq!(card.function_of(1).unwrap().name.as_str(), "crypto");
        assert_eq!(card.function_of(4).unwrap().name.as_str(), "compress");
        assert!(card.function_of(3).is_none());
        assert_eq!(
            card.functions[0].desc.host_driver.as_str(),
            DEFAULT_HOST_DRIVER
        );
        assert_eq!(p.functions().len(), 2);
    }

    #[test]
    fn vf_sets() {
        assert_eq!(VfSet::parse("0-1,4").unwrap().to_string(), "0-1,4");
        assert_eq!(VfSet::parse(" 7 , 0-2 ").unwrap().to_string(), "0-2,7");
        assert_eq!(VfSet::parse("5").unwrap().len(), 1);
        for bad in [
            "", " ", "a", "1-", "-1", "3-1", "1,1", "0-3,2", "70000", "1;2",
        ] {
            assert!(VfSet::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_file_card_function_and_field() {
        let e = err(&with(
            "",
            "name = \"crypto\"\nvfs = \"0-4\"\nguest_driver = \"x\"",
        ));
        assert!(
            e.starts_with("p.toml: card \"c\" (#1), function \"crypto\", field `vfs`"),
            "{e}"
        );
        assert!(
            e.contains("VF 4 is past num_vfs = 4 (valid VF numbers are 0-3)"),
            "{e}"
        );
    }

    #[test]
    fn rejects_overlapping_ranges() {
        let text = with(
            "",
            "name = \"a\"\nvfs = \"0-2\"\nguest_driver = \"x\"\n[[card.function]]\nname = \"b\"\nvfs = \"2-3\"\nguest_driver = \"y\"",
        );
        let e = err(&text);
        assert!(e.contains("function \"b\", field `vfs`"), "{e}");
        assert!(e.contains("VF 2 is also given to function \"a\""), "{e}");
    }

    #[test]
    fn rejects_unknown_keys() {
        let e = err(&with(
            "colour = \"red\"",
            "name = \"a\"\nvfs = \"0\"\nguest_driver = \"x\"",
        ));
        assert!(e.starts_with("p.toml:6:1: "), "{e}");
        assert!(e.contains("colour"), "{e}");
        let e = err(&with("", "name = \"a\"\nvfs = \"0\"\nguest_drvier = \"x\""));
        assert!(e.contains("guest_drvier"), "{e}");
    }

    #[test]
    fn rejects_bad_names_and_drivers() {
        for (function, field) in [
            ("name = \"\"\nvfs = \"0\"\nguest_driver = \"x\"", "name"),
            (
                "name = \"Crypto\"\nvfs = \"0\"\nguest_driver = \"x\"",
                "name",
            ),
            ("name = \"a/b\"\nvfs = \"0\"\nguest_driver = \"x\"", "name"),
            (
                "name = \"a\"\nvfs = \"0\"\nguest_driver = \"../evil\"",
                "guest_driver",
            ),
            (
                "name = \"a\"\nvfs = \"0\"\nguest_driver = \"a b\"",
                "guest_driver",
            ),
            (
                "name = \"a\"\nvfs = \"0\"\nguest_driver = \"\"",
                "guest_driver",
            ),
            (
                "name = \"a\"\nvfs = \"0\"\nguest_driver = \"x\"\nhost_driver = \"vfio/pci\"",
                "host_driver",
            ),
            (
                "name = \"a\"\nvfs = \"0\"\nguest_driver = \"-x\"",
                "guest_driver",
            ),
        ] {
            let e = err(&with("", function));
            assert!(e.contains(&format!("field `{field}`")), "{function}: {e}");
        }
        let e = err("[[card]]\nname = \" \"\nvendor = \"0x1\"\ndevice = \"0x2\"\nnum_vfs = 1\n");
        assert!(e.contains("card #1, field `name`"), "{e}");
    }

    #[test]
    fn rejects_bad_ids_counts_and_pf() {
        for (card, field) in [
            (
                "[[card]]\nname = \"c\"\nvendor = \"acme\"\ndevice = \"0x2\"\nnum_vfs = 1\n",
                "vendor",
            ),
            (
                "[[card]]\nname = \"c\"\nvendor = \"0x1\"\ndevice = \"0x12345\"\nnum_vfs = 1\n",
                "device",
            ),
            (
                "[[card]]\nname = \"c\"\nvendor = \"0x1\"\ndevice = \"0x2\"\nnum_vfs = -1\n",
                "num_vfs",
            ),
            (
                "[[card]]\nname = \"c\"\nvendor = \"0x1\"\ndevice = \"0x2\"\nnum_vfs = 70000\n",
                "num_vfs",
            ),
            (
                "[[card]]\nname = \"c\"\nvendor = \"0x1\"\ndevice = \"0x2\"\npf = \"3b:00.0\"\nnum_vfs = 1\n",
                "pf",
            ),
        ] {
            let e = err(card);
            assert!(e.contains(&format!("field `{field}`")), "{card}: {e}");
        }
    }

    #[test]
    fn rejects_duplicate_cards_and_conflicting_functions() {
        let card = |name: &str, pf: &str, driver: &str| {
            format!(
                "[[card]]\nname = \"{name}\"\nvendor = \"0x1\"\ndevice = \"0x2\"\n{pf}num_vfs = 1\n\
                 [[card.function]]\nname = \"f\"\nvfs = \"0\"\nguest_driver = \"{driver}\"\n"
            )
        };
        let e = err(&format!(
            "{}{}",
            card("a", "", "x"),
            card("a", "pf = \"0000:01:00.0\"\n", "x")
        ));
        assert!(e.contains("same name"), "{e}");
        let e = err(&format!("{}{}", card("a", "", "x"), card("b", "", "x")));
        assert!(e.contains("already matches the same PFs"), "{e}");
        let e = err(&format!(
            "{}{}",
            card("a", "", "x"),
            card("b", "pf = \"0000:01:00.0\"\n", "y")
        ));
        assert!(e.contains("must mean the same drivers"), "{e}");
        let ok = format!(
            "{}{}",
            card("a", "", "x"),
            card("b", "pf = \"0000:01:00.0\"\n", "x")
        );
        let p = Profiles::parse(&ok, "p.toml").unwrap();
        let pf: Bdf = "0000:01:00.0".parse().unwrap();
        let other: Bdf = "0000:02:00.0".parse().unwrap();
        assert_eq!(p.card_for(pf, PciId(1), PciId(2)).unwrap().name, "b");
        assert_eq!(p.card_for(other, PciId(1), PciId(2)).unwrap().name, "a");
        assert!(p.card_for(pf, PciId(1), PciId(3)).is_none());
    }

    #[test]
    fn syntax_errors_name_the_file_line_and_column_on_one_line() {
        let e = err("[[card]]\nname = \"a\"\nvendor = 7\n");
        assert!(e.starts_with("p.toml:3:10: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = err("[[card]\nname=");
        assert!(e.starts_with("p.toml:1:"), "{e}");
    }

    #[test]
    fn empty_file_is_no_cards() {
        assert!(Profiles::parse("", "p.toml").unwrap().cards.is_empty());
    }
}
