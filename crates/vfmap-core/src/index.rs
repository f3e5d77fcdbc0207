//! The two indexes of the mechanism, as types: a VF's **global index** on the host (T1/T2 key)
//! and its **local index** in a VM (the slot's position). They are both small integers on the
//! wire, and nothing may pass one for the other.
//!
//! ```compile_fail
//! use vfmap_core::{GlobalIndex, LocalIndex};
//! fn takes_global(_: GlobalIndex) {}
//! takes_global(LocalIndex::new(0)); // a local index is not a global one
//! ```

use serde::{Deserialize, Serialize};

macro_rules! index_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(u32);

        impl $name {
            /// The index `value`.
            pub const fn new(value: u32) -> $name {
                $name(value)
            }

            /// The index as a number.
            pub const fn get(self) -> u32 {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            /// Decimal digits only: no sign, no spaces.
            fn from_str(text: &str) -> Result<$name, String> {
                if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("{text:?} is not an index (decimal digits)"));
                }
                text.parse()
                    .map($name)
                    .map_err(|_| format!("{text:?} is out of range"))
            }
        }
    };
}

index_type! {
    /// A VF's stable index on the host: the key of T1 (function) and T2 (location). Kept in the
    /// state database, so it does not change when other VFs come or go.
    GlobalIndex
}

index_type! {
    /// A VF's index in one VM: the position of its slot in the VM's slot list, and so where the
    /// guest finds the device.
    LocalIndex
}

impl LocalIndex {
    /// The slot position as a `usize`, to index the VM's slot list.
    pub fn slot(self) -> usize {
        self.0 as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_parse_digits_only_and_print_as_numbers() {
        assert_eq!("12".parse::<GlobalIndex>(), Ok(GlobalIndex::new(12)));
        for bad in ["", "+1", "-1", " 1", "1 ", "0x1", "99999999999"] {
            assert!(bad.parse::<LocalIndex>().is_err(), "{bad:?}");
        }
        assert_eq!(LocalIndex::new(3).to_string(), "3");
        assert_eq!(serde_json::to_string(&GlobalIndex::new(7)).unwrap(), "7");
        assert_eq!(
            serde_json::from_str::<LocalIndex>("5").unwrap(),
            LocalIndex::new(5)
        );
    }
}

/// Where the global indexes of a set of tables come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Numbering {
    /// From the state database: the daemon's own, stable numbering.
    Stored,
    /// Dense from 0 in (PF, VF number) order, because no state database was read: the
    /// daemon's indexes differ once hardware or profiles changed since it first numbered.
    Provisional,
}

/// The one numbering of VFs, used by the daemon and by the offline inventory alike: a VF
/// already in `known` (index → location, from the state database) keeps its index; the others,
/// taken in the order of `present` (PF, then VF number), get new indexes after the highest
/// known one. Returns the index of each present VF (in `present`'s order) and the new
/// (index, location) pairs to remember.
pub fn number(
    present: &[crate::Bdf],
    known: &[(GlobalIndex, crate::Bdf)],
) -> (Vec<GlobalIndex>, Vec<(GlobalIndex, crate::Bdf)>) {
    let by_location: std::collections::HashMap<crate::Bdf, GlobalIndex> =
        known.iter().map(|(gi, bdf)| (*bdf, *gi)).collect();
    let mut next = known.iter().map(|(gi, _)| gi.get() + 1).max().unwrap_or(0);
    let mut added = Vec::new();
    let indexes = present
        .iter()
        .map(|location| match by_location.get(location) {
            Some(gi) => *gi,
            None => {
                let gi = GlobalIndex::new(next);
                next += 1;
                added.push((gi, *location));
                gi
            }
        })
        .collect();
    (indexes, added)
}

#[cfg(test)]
mod numbering_tests {
    use super::*;
    use crate::Bdf;

    fn bdf(text: &str) -> Bdf {
        text.parse().unwrap()
    }

    #[test]
    fn known_vfs_keep_their_index_and_new_ones_come_after_the_highest() {
        let present = [
            bdf("0000:01:00.1"),
            bdf("0000:01:00.3"),
            bdf("0000:02:00.1"),
        ];
        let (fresh, added) = number(&present, &[]);
        assert_eq!(fresh, [0, 1, 2].map(GlobalIndex::new));
        assert_eq!(added.len(), 3);
        // 01:00.2 went away (its index 1 stays taken), 02:00.1 is new.
        let known = [
            (GlobalIndex::new(0), bdf("0000:01:00.1")),
            (GlobalIndex::new(1), bdf("0000:01:00.2")),
            (GlobalIndex::new(2), bdf("0000:01:00.3")),
        ];
        let (indexes, added) = number(&present, &known);
        assert_eq!(indexes, [0, 2, 3].map(GlobalIndex::new));
        assert_eq!(added, [(GlobalIndex::new(3), bdf("0000:02:00.1"))]);
    }
}
