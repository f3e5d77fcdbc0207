//! Fuzz checks for code in `vfmap-core`. Each function takes one raw input and panics only
//! when the code under test panics or breaks one of the properties asserted here.
//!
//! Included by path from `crates/vfmap-core/tests/fuzz_regressions.rs`: use nothing but
//! `vfmap_core`, `serde_json` and `std`.

use vfmap_core::protocol::{
    self, Answer, GuestMessage, HostMessage, MAX_ENTRIES, MAX_LINE, MAX_TEXT, VERSION,
};
use vfmap_core::{Change, Pool, PoolError, Profiles, VmSpec};

/// Longest error text a hostile line may make the parser produce (it ends up in logs and, on
/// the agent's side, in an `error` reply).
const MAX_ERROR_DISPLAY: usize = 300;

/// Guest → host: the daemon's parser of agent lines (`parse_guest_message`).
///
/// Never panics; an accepted message respects every documented bound and survives a
/// serialise/parse round trip; a rejection's text is bounded.
pub fn guest_message(data: &[u8]) {
    let message = match protocol::parse_guest_message(data) {
        Ok(message) => message,
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.len() <= MAX_ERROR_DISPLAY,
                "error text of {} bytes",
                text.len()
            );
            return;
        }
    };
    match &message {
        GuestMessage::Hello { v, agent: text } | GuestMessage::Error { v, reason: text } => {
            assert_eq!(*v, VERSION);
            assert!(text.len() <= MAX_TEXT && !text.chars().any(char::is_control));
        }
        GuestMessage::Result { v, entries, .. } => {
            assert_eq!(*v, VERSION);
            assert!(entries.len() <= MAX_ENTRIES);
            for answer in entries {
                assert!(answer.local_index().slot() < MAX_ENTRIES);
                if let Answer::Failed { reason, .. } = answer {
                    assert!(reason.len() <= MAX_TEXT);
                }
            }
        }
    }
    let line = protocol::to_line(&message);
    let body = &line[..line.len() - 1];
    assert!(!body.contains(&b'\n'), "a serialised message is one line");
    if body.len() <= MAX_LINE {
        assert_eq!(protocol::parse_guest_message(body), Ok(message));
    }
}

/// Host → guest, as the agent handles a complete line (`crates/vfmap-agent/src/main.rs`,
/// `Line::Complete`): `parse_host_message`, then either the correspondence (applied through
/// sysfs, not fuzzed) or an `error` reply built from the rejection.
///
/// Never panics; an accepted `apply` is version 1 with at most 256 entries of unique local
/// indexes and survives a round trip; the `error` reply the agent would send for a rejected
/// line is one the host accepts.
pub fn host_message(data: &[u8]) {
    match protocol::parse_host_message(data) {
        Ok(message) => {
            let HostMessage::Apply { v, entries, .. } = &message;
            assert_eq!(*v, VERSION);
            assert!(entries.len() <= MAX_ENTRIES);
            for (i, e) in entries.iter().enumerate() {
                assert!(entries[..i].iter().all(|o| o.local_index != e.local_index));
            }
            let line = protocol::to_line(&message);
            let body = &line[..line.len() - 1];
            assert!(!body.contains(&b'\n'), "a serialised message is one line");
            if body.len() <= MAX_LINE {
                assert_eq!(protocol::parse_host_message(body), Ok(message));
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.len() <= MAX_ERROR_DISPLAY,
                "error text of {} bytes",
                text.len()
            );
            // What the agent sends back (main.rs), and what the daemon makes of it.
            let reply = GuestMessage::Error {
                v: VERSION,
                reason: protocol::fit_text(&text),
            };
            let line = protocol::to_line(&reply);
            assert_eq!(
                protocol::parse_guest_message(&line[..line.len() - 1]),
                Ok(reply),
                "the daemon must accept the agent's error reply"
            );
        }
    }
}

/// Profile TOML (`Profiles::parse`), as `vfmap inventory/prepare/serve` read each file.
///
/// Never panics; accepted profiles keep the validation's promises (VFs within `num_vfs`, no
/// VF in two functions of a card, unique card names, one driver pair per function name), and
/// their cards load again into a fresh set the way `load_profiles` merges files.
pub fn profiles(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let profiles = match Profiles::parse(text, "fuzz.toml") {
        Ok(profiles) => profiles,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    for (i, card) in profiles.cards.iter().enumerate() {
        assert!(profiles.cards[..i].iter().all(|c| c.name != card.name));
        for (j, f) in card.functions.iter().enumerate() {
            assert!(f.vfs.max().is_none_or(|max| max < card.num_vfs));
            for g in &card.functions[..j] {
                assert_ne!(g.desc.name, f.desc.name);
                assert!(f.vfs.iter().all(|vf| !g.vfs.contains(vf)));
            }
        }
    }
    let functions = profiles.functions();
    for card in &profiles.cards {
        for f in &card.functions {
            let desc = functions[&f.desc.name];
            assert_eq!(
                (&desc.guest_driver, &desc.host_driver),
                (&f.desc.guest_driver, &f.desc.host_driver)
            );
        }
    }
    let mut again = Profiles::default();
    for card in profiles.cards.iter().cloned() {
        again
            .add_card(card, "again.toml")
            .expect("valid cards load again");
    }
    assert_eq!(again.cards, profiles.cards);
    if let Some(card) = profiles.cards.first() {
        assert!(again.add_card(card.clone(), "twice.toml").is_err());
    }
}

/// A VM spec as the store reads it and `POST /v1/vms` registers it (the request completed by
/// the hypervisor adapter): `VmSpec` from JSON (`serde_json::from_slice`), then
/// `Pool::plan_add_vm`.
///
/// Never panics; an accepted VM has 1-256 unique slots and absolute socket paths that fit a
/// unix socket address, applies to a pool without breaking its invariants, is refused a second
/// time, and survives the store's JSON round trip.
pub fn api_vm_spec(data: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<VmSpec>(data) else {
        return;
    };
    let mut pool = Pool::default();
    let change = match pool.plan_add_vm(spec.clone()) {
        Ok(change) => change,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(change, Change::AddVm(spec.clone()));
    assert!((1..=256).contains(&spec.slots.len()));
    for (i, slot) in spec.slots.iter().enumerate() {
        assert!(!spec.slots[..i].contains(slot));
    }
    let mut paths = vec![spec.backend.agent_socket()];
    if let vfmap_core::VmBackend::Qmp { qmp_socket, .. } = &spec.backend {
        paths.push(qmp_socket);
    }
    for path in paths {
        assert!(path.starts_with('/') && path.len() <= 107 && !path.contains('\0'));
    }
    pool.apply(&change);
    pool.check_invariants()
        .expect("pool invariants after adding a VM");
    assert_eq!(pool.vm(spec.name.as_str()), Some(&spec));
    assert!(matches!(
        pool.plan_add_vm(spec.clone()),
        Err(PoolError::VmExists(_))
    ));
    let stored = serde_json::to_string(&spec).expect("a VmSpec serialises");
    assert_eq!(serde_json::from_str::<VmSpec>(&stored).ok(), Some(spec));
}
