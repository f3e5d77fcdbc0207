//! Reading one device's attributes, every failure a problem for that device.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::str::FromStr;

use vfmap_core::{Bdf, Problem};

use super::bound::BoundDrivers;
use super::read::{AttrPath, Link, read_attr_at, read_link_at};

/// Where a device's attributes are.
#[derive(Clone, Copy)]
pub(super) enum Base<'a> {
    /// In its open directory: one lookup per attribute.
    Dir(&'a OwnedFd),
    /// Under `<name>/` in its parent's open directory: two lookups per attribute, but no
    /// open and close of its own directory, which is cheaper for a VF's four attributes.
    Parent(&'a OwnedFd),
}

/// Reads one device's attributes with no path walk per read beyond its directory, turning
/// every failure into a problem for that device.
pub(super) struct DeviceReader<'a> {
    base: Base<'a>,
    name: &'a str,
    pub(super) problems: &'a mut Vec<Problem>,
}

pub(super) fn problem(device: &str, attribute: &str, message: String) -> Problem {
    Problem::new(device, attribute, message)
}

/// A failed read or open: `what` and the OS's reason, marked when it is a permission refusal.
pub(super) fn io_problem(device: &str, attribute: &str, what: &str, error: io::Error) -> Problem {
    let problem = problem(device, attribute, format!("{what}: {error}"));
    if error.kind() == io::ErrorKind::PermissionDenied {
        problem.denied()
    } else {
        problem
    }
}

/// What an absent attribute that vfmap needs costs, and which kernels lack it.
fn missing_message(attribute: &str) -> String {
    let why = match attribute {
        "vendor" | "device" => "the device's ID is unknown, so no card can match it",
        "numa_node" => {
            "the NUMA node is unknown (a kernel built without CONFIG_NUMA has no numa_node)"
        }
        "sriov_numvfs" => "how many VFs are enabled is unknown",
        "sriov_drivers_autoprobe" => {
            "`vfmap prepare` cannot keep host drivers off new VFs (kernels before 4.12 lack it)"
        }
        "driver_override" => {
            "`vfmap prepare` cannot bind this VF to its host driver (kernels before 3.16 lack it)"
        }
        _ => return "missing".to_owned(),
    };
    format!("missing: {why}")
}

impl<'a> DeviceReader<'a> {
    /// A reader of device `name`'s attributes at `base`.
    pub(super) fn new(
        base: Base<'a>,
        name: &'a str,
        problems: &'a mut Vec<Problem>,
    ) -> DeviceReader<'a> {
        DeviceReader {
            base,
            name,
            problems,
        }
    }

    /// The directory and the path in it of one of the device's attributes.
    fn at<'p>(&self, attribute: &'p str, path: &'p mut AttrPath) -> (&'a OwnedFd, &'p [u8]) {
        match self.base {
            Base::Dir(dir) => (dir, attribute.as_bytes()),
            Base::Parent(parent) => (parent, path.join(self.name, attribute)),
        }
    }

    pub(super) fn problem(&mut self, attribute: &str, message: String) {
        self.problems.push(problem(self.name, attribute, message));
    }

    pub(super) fn io_problem(&mut self, attribute: &str, what: &str, error: io::Error) {
        self.problems
            .push(io_problem(self.name, attribute, what, error));
    }

    /// `with` applied to the attribute's trimmed text. An attribute that does not exist is
    /// `None`, plus a problem saying what its absence costs unless it is `optional`; one that
    /// cannot be read is `None` plus a problem. The text is borrowed from a stack buffer: most
    /// attributes are parsed, and allocating each cost more than reading it.
    fn read<R>(
        &mut self,
        attribute: &str,
        optional: bool,
        missing: impl FnOnce() -> String,
        with: impl FnOnce(&str) -> R,
    ) -> Option<R> {
        let mut path = AttrPath::new();
        let (dir, at) = self.at(attribute, &mut path);
        match read_attr_at(dir.as_fd(), at, with) {
            Ok(Some(value)) => Some(value),
            Ok(None) => {
                if !optional {
                    self.problem(attribute, missing());
                }
                None
            }
            Err(e) => {
                self.io_problem(attribute, "cannot read", e);
                None
            }
        }
    }

    /// An attribute vfmap needs, as text: `None` plus a problem when it is missing or
    /// unreadable; `missing` says what its absence costs.
    pub(super) fn text_or(
        &mut self,
        attribute: &str,
        missing: impl FnOnce() -> String,
    ) -> Option<String> {
        self.read(attribute, false, missing, str::to_owned)
    }

    /// `text` parsed, or `None` plus a problem when it is malformed.
    fn parsed<T: FromStr>(&mut self, attribute: &str, text: Result<T, String>) -> Option<T> {
        text.map_err(|text| self.problem(attribute, format!("malformed value {text:?}")))
            .ok()
    }

    pub(super) fn parse<T: FromStr>(&mut self, attribute: &str, text: String) -> Option<T> {
        let parsed = text.parse().map_err(|_| text);
        self.parsed(attribute, parsed)
    }

    /// A parsed attribute vfmap needs: `None` plus a problem when missing, unreadable or
    /// malformed.
    pub(super) fn attr<T: FromStr>(&mut self, attribute: &str) -> Option<T> {
        let parsed = self.read(
            attribute,
            false,
            || missing_message(attribute),
            |text| text.parse::<T>().map_err(|_| text.to_owned()),
        )?;
        self.parsed(attribute, parsed)
    }

    /// A parsed attribute some kernels lack: a missing one is `None` without a problem.
    pub(super) fn optional_attr<T: FromStr>(&mut self, attribute: &str) -> Option<T> {
        let parsed = self.read(attribute, true, String::new, |text| {
            text.parse::<T>().map_err(|_| text.to_owned())
        })?;
        self.parsed(attribute, parsed)
    }

    /// `numa_node` when the attribute is there (`Some(None)`, plus a problem, when malformed;
    /// a negative node is none); `None`, with no problem recorded, when it is absent or
    /// unreadable, for the caller to look closer.
    pub(super) fn numa_node_if_there(&mut self) -> Option<Option<i32>> {
        let mut path = AttrPath::new();
        let (dir, at) = self.at("numa_node", &mut path);
        let parsed = read_attr_at(dir.as_fd(), at, |text| {
            text.parse::<i32>().map_err(|_| text.to_owned())
        })
        .ok()??;
        Some(self.parsed("numa_node", parsed).filter(|&node| node >= 0))
    }

    pub(super) fn numa_node(&mut self) -> Option<i32> {
        self.attr::<i32>("numa_node").filter(|&node| node >= 0)
    }

    pub(super) fn driver_override(&mut self) -> Option<String> {
        self.read(
            "driver_override",
            false,
            || missing_message("driver_override"),
            |text| (!text.is_empty() && text != "(null)").then(|| text.to_owned()),
        )
        .flatten()
    }

    /// The driver `location` (this device) is bound to: from `bound` when the drivers' side
    /// was read, else from its `driver` link.
    pub(super) fn driver(&mut self, bound: Option<&BoundDrivers>, location: Bdf) -> Option<String> {
        match bound {
            Some(bound) => bound.driver_of(location),
            None => self.link_name("driver"),
        }
    }

    /// The last component of a symlink's target; `None` when absent.
    pub(super) fn link_name(&mut self, link: &str) -> Option<String> {
        self.link(link).map(|link| link.name)
    }

    /// A symlink's target; `None` when absent.
    pub(super) fn link(&mut self, link: &str) -> Option<Link> {
        let mut path = AttrPath::new();
        let (dir, at) = self.at(link, &mut path);
        match read_link_at(dir, at) {
            Ok(target) => target,
            Err(e) => {
                self.io_problem(link, "cannot read the link", e);
                None
            }
        }
    }
}
