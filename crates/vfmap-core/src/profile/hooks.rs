//! Card hooks in profiles: which executables a card runs at each phase, and which functions a
//! VF may be re-programmed into. The profile only names them; `vfmap-sysfs::hooks` checks the
//! files (owner, mode) and runs them (`docs/hooks.md`).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::FunctionName;

/// A hook's deadline when the profile gives none.
pub const DEFAULT_HOOK_DEADLINE: Duration = Duration::from_secs(30);
/// The longest deadline a profile may give a hook (a hook that takes longer holds a VF, or a
/// daemon start, for longer than an operator would wait).
pub const MAX_HOOK_DEADLINE: Duration = Duration::from_secs(600);

/// The phases a card's hooks run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookPhase {
    /// After the VFs are created, before they are offered (e.g. NVMe secondary controllers
    /// brought online).
    BringUp,
    /// Make a VF carry another function.
    Program,
    /// Wipe a released VF, after its reset and the check of its config space.
    Scrub,
    /// Print the functions of a PF's VFs.
    Discover,
}

impl HookPhase {
    /// Every phase.
    pub const ALL: [HookPhase; 4] = [
        HookPhase::BringUp,
        HookPhase::Program,
        HookPhase::Scrub,
        HookPhase::Discover,
    ];

    /// The phase's name in profiles, the hook's argument, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            HookPhase::BringUp => "bring_up",
            HookPhase::Program => "program",
            HookPhase::Scrub => "scrub",
            HookPhase::Discover => "discover",
        }
    }
}

impl fmt::Display for HookPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A hook's path as a profile may give it: absolute, normal (no `.` or `..`, no empty
/// component), printable without spaces, at most 4096 bytes. Whether the file is safe to run
/// (owned by root, not writable by others) is checked where it runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HookPath(PathBuf);

impl HookPath {
    /// Checks `text`; the error explains the rule.
    pub fn new(text: &str) -> Result<HookPath, String> {
        let path = Path::new(text);
        // Split by hand: `Path::components` drops inner `.` components and empty ones.
        let normal = text
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..");
        if !text.starts_with('/') {
            Err(format!(
                "{text:?} is not an absolute path; give the hook's full path, e.g. /usr/lib/vfmap/hooks/acme"
            ))
        } else if text.len() > 4096 || !text.bytes().all(|b| b.is_ascii_graphic()) || !normal {
            Err(format!(
                "{:?} is not a plain absolute file path (printable ASCII without spaces, no '.' or \
                 '..' components, at most 4096 bytes)",
                text.escape_debug().to_string()
            ))
        } else {
            Ok(HookPath(path.to_owned()))
        }
    }

    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl fmt::Display for HookPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// A card's hooks (`[card.hooks]`), or a function's overrides (`[card.function.hooks]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hooks {
    /// After VF creation, per VF.
    pub bring_up: Option<HookPath>,
    /// Re-programming a VF, per VF (a function's own hook is the one of the function the VF
    /// becomes).
    pub program: Option<HookPath>,
    /// The card's wipe of a released VF, per VF (a function's own hook is the one of the
    /// function the VF carried).
    pub scrub: Option<HookPath>,
    /// The functions of a PF's VFs, per PF (card only).
    pub discover: Option<HookPath>,
    /// How long any of these may run.
    pub deadline: Duration,
}

impl Hooks {
    /// The hook for a phase.
    pub fn get(&self, phase: HookPhase) -> Option<&HookPath> {
        match phase {
            HookPhase::BringUp => self.bring_up.as_ref(),
            HookPhase::Program => self.program.as_ref(),
            HookPhase::Scrub => self.scrub.as_ref(),
            HookPhase::Discover => self.discover.as_ref(),
        }
    }

    /// Whether no hook is named.
    pub fn is_empty(&self) -> bool {
        HookPhase::ALL.iter().all(|p| self.get(*p).is_none())
    }
}

/// `[card.hooks]` / `[card.function.hooks]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct HooksSpec {
    bring_up: Option<String>,
    program: Option<String>,
    scrub: Option<String>,
    discover: Option<String>,
    /// Milliseconds.
    deadline_ms: Option<i64>,
}

impl HooksSpec {
    /// Validates the spec; `card_level` allows `discover` (a PF-wide phase). A function's
    /// deadline defaults to its card's (`inherited`). Errors are `(field, problem)`.
    pub(super) fn validate(
        self,
        card_level: bool,
        inherited: Duration,
    ) -> Result<Hooks, (String, String)> {
        let path = |field: &str, text: Option<String>| {
            text.map(|t| HookPath::new(&t))
                .transpose()
                .map_err(|p| (format!("hooks.{field}"), p))
        };
        if !card_level && self.discover.is_some() {
            return Err((
                "hooks.discover".into(),
                "discover runs once per PF: give it in the card's [card.hooks], not a function's"
                    .into(),
            ));
        }
        let deadline = match self.deadline_ms {
            None => inherited,
            Some(ms) if ms > 0 && (ms as u128) <= MAX_HOOK_DEADLINE.as_millis() => {
                Duration::from_millis(ms as u64)
            }
            Some(ms) => {
                return Err((
                    "hooks.deadline_ms".into(),
                    format!(
                        "{ms} is not a deadline: give 1-{} milliseconds",
                        MAX_HOOK_DEADLINE.as_millis()
                    ),
                ));
            }
        };
        Ok(Hooks {
            bring_up: path("bring_up", self.bring_up)?,
            program: path("program", self.program)?,
            scrub: path("scrub", self.scrub)?,
            discover: path("discover", self.discover)?,
            deadline,
        })
    }
}

/// Which functions a VF of one function may be re-programmed into (`programmable_to`).
pub type ProgramTargets = BTreeSet<FunctionName>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_paths_are_absolute_plain_and_normal() {
        assert!(HookPath::new("/usr/lib/vfmap/hooks/nvme-bring-up").is_ok());
        for bad in [
            "hooks/x",
            "",
            "/opt/../bin/sh",
            "/opt/./x",
            "/opt//x",
            "/opt/x/",
            "/opt/a b",
            "/opt/x\n",
            "/opt/\u{e9}",
        ] {
            assert!(HookPath::new(bad).is_err(), "{bad:?}");
        }
        assert!(
            HookPath::new("x")
                .unwrap_err()
                .contains("not an absolute path")
        );
    }

    #[test]
    fn deadlines_default_to_the_card_and_are_bounded() {
        let spec = |ms| HooksSpec {
            deadline_ms: ms,
            ..HooksSpec::default()
        };
        let card = Duration::from_secs(5);
        assert_eq!(spec(None).validate(false, card).unwrap().deadline, card);
        assert_eq!(
            spec(Some(250)).validate(false, card).unwrap().deadline,
            Duration::from_millis(250)
        );
        for bad in [0, -1, 600_001] {
            let (field, _) = spec(Some(bad)).validate(true, card).unwrap_err();
            assert_eq!(field, "hooks.deadline_ms");
        }
    }

    #[test]
    fn discover_is_per_card_only() {
        let spec = HooksSpec {
            discover: Some("/opt/d".into()),
            ..HooksSpec::default()
        };
        assert!(spec.validate(false, DEFAULT_HOOK_DEADLINE).is_err());
        let spec = HooksSpec {
            discover: Some("/opt/d".into()),
            ..HooksSpec::default()
        };
        let hooks = spec.validate(true, DEFAULT_HOOK_DEADLINE).unwrap();
        assert_eq!(
            hooks.get(HookPhase::Discover).unwrap().as_path(),
            Path::new("/opt/d")
        );
        assert!(!hooks.is_empty() && Hooks::default().is_empty());
    }

    const CARD: &str = r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 4
[card.hooks]
bring_up = "/usr/lib/vfmap/hooks/acme"
program = "/usr/lib/vfmap/hooks/acme"
discover = "/usr/lib/vfmap/hooks/acme"
deadline_ms = 5000
[[card.function]]
name = "crypto"
vfs = "0-1"
guest_driver = "pci-stub"
programmable_to = ["compress"]
[card.function.hooks]
scrub = "/usr/lib/vfmap/hooks/acme-wipe"
[[card.function]]
name = "compress"
vfs = "2-3"
guest_driver = "uio_pci_generic"
"#;

    fn parse(text: &str) -> Result<crate::profile::Profiles, String> {
        crate::profile::Profiles::parse(text, "p.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn a_function_s_hook_wins_over_its_card_s_and_the_policy_is_read() {
        let p = parse(CARD).unwrap();
        let card = &p.cards[0];
        let (scrub, deadline) = card.hook(HookPhase::Scrub, Some("crypto")).unwrap();
        assert_eq!(scrub.to_string(), "/usr/lib/vfmap/hooks/acme-wipe");
        assert_eq!(deadline, Duration::from_secs(5), "inherited from the card");
        assert!(card.hook(HookPhase::Scrub, Some("compress")).is_none());
        let (program, _) = card.hook(HookPhase::Program, Some("compress")).unwrap();
        assert_eq!(program.to_string(), "/usr/lib/vfmap/hooks/acme");
        assert!(card.may_program("crypto", "compress"));
        assert!(!card.may_program("compress", "crypto"));
        assert!(!card.may_program("crypto", "nope"));
    }

    #[test]
    fn bad_hooks_and_policies_are_errors_naming_the_field() {
        let cases = [
            (
                CARD.replace("deadline_ms = 5000", "deadline_ms = 5000\nwipe = \"/x\""),
                "unknown field `wipe`",
            ),
            (
                CARD.replace("bring_up = \"/usr", "bring_up = \"usr"),
                "field `hooks.bring_up`: \"usr/lib/vfmap/hooks/acme\" is not an absolute path",
            ),
            (
                CARD.replace("[\"compress\"]", "[\"storage\"]"),
                "function \"crypto\", field `programmable_to`: \"storage\" is not a function of this card",
            ),
            (
                CARD.replace("[\"compress\"]", "[\"crypto\"]"),
                "cannot be re-programmed into itself",
            ),
            (
                CARD.replace("[\"compress\"]", "[\"compress\", \"compress\"]"),
                "listed twice",
            ),
            (
                CARD.replace("program = \"/usr/lib/vfmap/hooks/acme\"\n", ""),
                "re-programming into \"compress\" needs a `program` hook",
            ),
            (
                CARD.replace("scrub = ", "discover = "),
                "field `hooks.discover`: discover runs once per PF",
            ),
        ];
        for (text, wanted) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(wanted), "{e}\nwanted: {wanted}");
        }
    }
}
