//! The uevent parser on arbitrary bytes and on generated kernel messages, and the netlink
//! adapter on this machine's kernel where it can be opened.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use vfmap_agent::uevent::{Action, MAX_FIELDS, MAX_UEVENT, Uevent, UeventError, parse};
use vfmap_agent::{DeviceEvents, UeventSocket, Wake};

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        Just(Action::Add),
        Just(Action::Remove),
        Just(Action::Bind),
        Just(Action::Unbind),
        Just(Action::Change),
        Just(Action::Move),
        Just(Action::Online),
        Just(Action::Offline),
        // Words the kernel may add later; none of the known ones.
        "[a-z]{1,32}".prop_filter_map("a known word", |w| {
            let known = [
                "add", "remove", "bind", "unbind", "change", "move", "online", "offline",
            ];
            (!known.contains(&w.as_str())).then_some(Action::Other(w))
        }),
    ]
}

/// Values as the kernel writes them: any text without NUL.
fn value() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,40}"
}

fn event() -> impl Strategy<Value = Uevent> {
    (
        action(),
        "(/[^\u{0}/]{1,20}){1,8}",
        proptest::option::of(value()),
        proptest::option::of(value()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(action, devpath, subsystem, driver, seqnum)| Uevent {
            action,
            devpath,
            subsystem,
            driver,
            seqnum,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the bytes: an answer, no panic, and what is accepted is bounded and consistent.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(event) = parse(&bytes) {
            prop_assert!(event.devpath.starts_with('/'));
            prop_assert!(event.devpath.len() < bytes.len());
            prop_assert!(!event.action.as_str().is_empty());
        }
    }

    /// Bytes that look almost like a uevent (the alphabet of one) reach the field parser.
    #[test]
    fn near_uevents_never_panic(
        text in "[a-z]{0,6}@?(/[a-z0-9:.]{0,8}){0,3}(\u{0}[A-Z_]{0,8}=?[a-z0-9/:.=@-]{0,8}){0,12}\u{0}?"
    ) {
        if let Ok(event) = parse(text.as_bytes()) {
            let header = format!("{}@{}", event.action, event.devpath);
            prop_assert!(text.starts_with(&header));
        }
    }

    /// What the kernel sends parses back to what was sent, with unknown keys ignored.
    #[test]
    fn kernel_messages_round_trip(
        event in event(),
        extra in proptest::collection::vec(("[A-Z_]{1,12}", value()), 0..20),
    ) {
        let mut bytes = event.to_bytes();
        for (key, value) in &extra {
            if !["ACTION", "DEVPATH", "SUBSYSTEM", "DRIVER", "SEQNUM"].contains(&key.as_str()) {
                bytes.extend_from_slice(format!("{key}={value}\0").as_bytes());
            }
        }
        prop_assert_eq!(parse(&bytes), Ok(event));
    }

    /// Any cut of a kernel message is refused or parsed, never a panic.
    #[test]
    fn truncated_messages_never_panic(event in event(), cut in any::<prop::sample::Index>()) {
        let bytes = event.to_bytes();
        let _ = parse(&bytes[..cut.index(bytes.len() + 1)]);
    }
}

#[test]
fn limits_hold_at_their_edges() {
    let mut at = b"add@/".to_vec();
    at.resize(MAX_UEVENT, b'x');
    assert!(parse(&at).is_ok());
    at.push(b'x');
    assert_eq!(parse(&at), Err(UeventError::TooLong(MAX_UEVENT + 1)));
    let fields = |n: usize| {
        let mut bytes = b"add@/d".to_vec();
        for _ in 0..n {
            bytes.extend_from_slice(b"\0K=v");
        }
        bytes
    };
    assert!(parse(&fields(MAX_FIELDS)).is_ok());
    assert_eq!(
        parse(&fields(MAX_FIELDS + 1)),
        Err(UeventError::TooManyFields)
    );
}

/// The real socket, where this process may open it (root, a kernel with netlink): a wait
/// returns at its deadline, not before, unless the kernel reported something.
#[test]
fn the_netlink_socket_waits_until_its_deadline() {
    let mut socket = match UeventSocket::open() {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("skipped: cannot open the uevent socket here ({e})");
            return;
        }
    };
    socket.discard_pending();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(150);
    loop {
        match socket.wait(deadline) {
            Wake::TimedOut => break,
            // This machine's own devices may report something meanwhile.
            Wake::Event(_) | Wake::Recheck => assert!(Instant::now() < deadline),
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(socket.wait(deadline), Wake::TimedOut, "a passed deadline");
}
