//! The published schemas of the validated values say what their parsers accept: for strings
//! made to match each pattern, and for strings made to almost match it, the pattern and the
//! parser decide alike. (`scripts/schema-fuzz` checks the same through the running daemon.)

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::LazyLock;

use proptest::prelude::*;
use regex::Regex;
use utoipa::PartialSchema;
use utoipa::openapi::{RefOr, Schema};
use vfmap_core::openapi::{DomainName, LibvirtUri, PortName, SocketPath};
use vfmap_core::{Bdf, DriverName, FunctionName, Pool, SlotId, VmName, VmSpec};

/// The pattern (anchored) and `maxLength` of a string schema.
fn pattern_of<T: PartialSchema>() -> (Regex, Option<usize>) {
    let RefOr::T(Schema::Object(object)) = T::schema() else {
        panic!("not an object schema");
    };
    let pattern = object.pattern.expect("a pattern");
    assert!(
        pattern.starts_with('^') && pattern.ends_with('$'),
        "{pattern}"
    );
    (Regex::new(&pattern).unwrap(), object.max_length)
}

/// Each type's schema, compiled once.
static SCHEMAS: LazyLock<HashMap<TypeId, (Regex, Option<usize>)>> = LazyLock::new(|| {
    HashMap::from([
        (TypeId::of::<VmName>(), pattern_of::<VmName>()),
        (TypeId::of::<SlotId>(), pattern_of::<SlotId>()),
        (TypeId::of::<FunctionName>(), pattern_of::<FunctionName>()),
        (TypeId::of::<DriverName>(), pattern_of::<DriverName>()),
        (TypeId::of::<Bdf>(), pattern_of::<Bdf>()),
        (TypeId::of::<SocketPath>(), pattern_of::<SocketPath>()),
        (TypeId::of::<DomainName>(), pattern_of::<DomainName>()),
        (TypeId::of::<PortName>(), pattern_of::<PortName>()),
        (TypeId::of::<LibvirtUri>(), pattern_of::<LibvirtUri>()),
    ])
});

fn documented<T: PartialSchema + 'static>(text: &str) -> bool {
    let (pattern, max_length) = &SCHEMAS[&TypeId::of::<T>()];
    pattern.is_match(text) && max_length.is_none_or(|max| text.chars().count() <= max)
}

/// Strings near the rules: the characters names use and the ones they must not, at lengths
/// around the limits.
fn near() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._\\-]{0,70}",
        "[a-f0-9A-F:.\\-/x ]{0,20}",
        "[A-Za-z0-9._\\-/é\\x00 +]{0,12}",
        "/[ -~]{0,110}",
        "[a-z+]{0,12}:/{0,4}[a-z/?=]{0,12}",
    ]
}

fn socket_ok(path: &str) -> bool {
    let spec = VmSpec {
        name: VmName::new("web").unwrap(),
        backend: vfmap_core::VmBackend::Qmp {
            qmp_socket: path.to_owned(),
            agent_socket: "/run/a".to_owned(),
        },
        slots: vec![SlotId::new("rp0").unwrap()],
        numa_node: None,
    };
    Pool::new(std::iter::empty()).plan_add_vm(spec).is_ok()
}

macro_rules! agrees {
    ($text:expr) => {{
        let text: &str = $text;
        prop_assert_eq!(
            documented::<VmName>(text),
            VmName::new(text).is_ok(),
            "VmName {:?}",
            text
        );
        prop_assert_eq!(
            documented::<SlotId>(text),
            SlotId::new(text).is_ok(),
            "SlotId {:?}",
            text
        );
        prop_assert_eq!(
            documented::<FunctionName>(text),
            FunctionName::new(text).is_ok(),
            "FunctionName {:?}",
            text
        );
        prop_assert_eq!(
            documented::<DriverName>(text),
            DriverName::new(text).is_ok(),
            "DriverName {:?}",
            text
        );
        prop_assert_eq!(
            documented::<Bdf>(text),
            text.parse::<Bdf>().is_ok(),
            "Bdf {:?}",
            text
        );
        prop_assert_eq!(
            documented::<DomainName>(text),
            vfmap_core::check_domain_name(text).is_ok(),
            "DomainName {:?}",
            text
        );
        prop_assert_eq!(
            documented::<PortName>(text),
            vfmap_core::check_port_name(text).is_ok(),
            "PortName {:?}",
            text
        );
        prop_assert_eq!(
            documented::<LibvirtUri>(text),
            vfmap_core::check_libvirt_uri(text).is_ok(),
            "LibvirtUri {:?}",
            text
        );
        // Socket paths in ASCII (the schema's maxLength counts characters, the kernel bytes).
        if text.is_ascii() {
            prop_assert_eq!(
                documented::<SocketPath>(text),
                socket_ok(text),
                "SocketPath {:?}",
                text
            );
        }
    }};
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn patterns_and_parsers_agree_near_the_rules(text in near()) {
        agrees!(&text);
    }

    #[test]
    fn what_the_patterns_generate_parses(
        vm in "[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
        slot in "[A-Za-z][A-Za-z0-9._-]{0,63}",
        function in "[a-z0-9][a-z0-9._-]{0,63}",
        bdf in "[0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{1,2}:(0?[0-9A-Fa-f]|1[0-9A-Fa-f])\\.[0-7]",
        domain in "[!-,.0-~][!-.0-~]{0,199}",
        uri in "[A-Za-z0-9_-]{1,10}(\\+unix)?:///[!-~]{0,40}",
    ) {
        agrees!(&domain);
        agrees!(&uri);
        prop_assert!(vfmap_core::check_domain_name(&domain).is_ok());
        prop_assert!(vfmap_core::check_libvirt_uri(&uri).is_ok());
        agrees!(&vm);
        agrees!(&slot);
        agrees!(&function);
        agrees!(&bdf);
        prop_assert!(VmName::new(&vm).is_ok() && SlotId::new(&slot).is_ok());
        prop_assert!(FunctionName::new(&function).is_ok() && bdf.parse::<Bdf>().is_ok());
    }
}

#[test]
fn edges() {
    let long = "a".repeat(64);
    let too_long = "a".repeat(65);
    for text in [
        "",
        "a",
        "-a",
        "a-",
        &long,
        &too_long,
        "0000:3b:1f.7",
        "0000:3b:20.0",
        "1:2:3.4",
        "000000000:00:00.0",
        "/",
        "/\0",
        "rel",
        "vfio-pci",
        "_x",
        "é",
        "qemu:///system",
        "qemu+unix:///system?socket=/run/x",
        "qemu+ssh://host/system",
        "qemu://host/system",
        "org.vfmap.0",
        "a b",
        "a/b",
    ] {
        assert_eq!(
            documented::<DomainName>(text),
            vfmap_core::check_domain_name(text).is_ok(),
            "{text:?}"
        );
        assert_eq!(
            documented::<LibvirtUri>(text),
            vfmap_core::check_libvirt_uri(text).is_ok(),
            "{text:?}"
        );
        assert_eq!(
            documented::<VmName>(text),
            VmName::new(text).is_ok(),
            "{text:?}"
        );
        assert_eq!(
            documented::<Bdf>(text),
            text.parse::<Bdf>().is_ok(),
            "{text:?}"
        );
        assert_eq!(documented::<SocketPath>(text), socket_ok(text), "{text:?}");
        assert_eq!(
            documented::<DriverName>(text),
            DriverName::new(text).is_ok(),
            "{text:?}"
        );
    }
    let path = format!("/{}", "s".repeat(106));
    assert!(documented::<SocketPath>(&path) && socket_ok(&path));
    let path = format!("/{}", "s".repeat(107));
    assert!(!documented::<SocketPath>(&path) && !socket_ok(&path));
}
