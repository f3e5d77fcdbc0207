//! Fuzz checks for code in `vfmap-agent`. Each function takes one raw input and panics only
//! when the code under test panics or breaks one of the properties asserted here.
//!
//! Included by path from `crates/vfmap-agent/tests/fuzz_regressions.rs`: use nothing but
//! `vfmap_agent`, `vfmap_core` and `std`.

use std::collections::BTreeSet;

use vfmap_agent::metadata::{self, MAX_DEVICES, MAX_METADATA};
use vfmap_core::{Bdf, FunctionName};

/// Longest text the parser may produce for one rejection or a refused document (it goes to
/// the agent's log).
const MAX_ERROR_DISPLAY: usize = 1024;

fn bounded(text: &str) {
    assert!(
        text.len() <= MAX_ERROR_DISPLAY,
        "error text of {} bytes",
        text.len()
    );
    assert!(
        !text.chars().any(char::is_control),
        "control character in {text:?}"
    );
}

/// Config-drive metadata (`metadata::parse`), as the agent reads `meta_data.json`.
///
/// Never panics; what it accepts is bounded (size, device count), every entry it gives names
/// a valid function at a canonical PCI address, no address twice; every error text is bounded
/// and free of control characters.
pub fn metadata(data: &[u8]) {
    let parsed = match metadata::parse(data) {
        Ok(parsed) => parsed,
        Err(e) => return bounded(&e.to_string()),
    };
    assert!(data.len() <= MAX_METADATA);
    assert!(parsed.entries.len() + parsed.rejected.len() + parsed.ignored <= MAX_DEVICES);
    let mut addresses = BTreeSet::new();
    for e in &parsed.entries {
        assert!(FunctionName::new(e.function.as_str()).is_ok());
        assert_eq!(e.guest_bdf.to_string().parse::<Bdf>(), Ok(e.guest_bdf));
        assert!(addresses.insert(e.guest_bdf), "{} given twice", e.guest_bdf);
    }
    for r in &parsed.rejected {
        bounded(&r.to_string());
    }
}
