//! The metadata parser on documents in the formats OpenStack Nova and KubeVirt write
//! (`tests/fixtures/metadata/`, see its README for their sources), and on hostile ones.

use std::path::Path;

use proptest::prelude::*;
use vfmap_agent::metadata::{self, EntryError, MAX_METADATA, MetaEntry};
use vfmap_core::FunctionName;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/metadata")
            .join(name),
    )
    .unwrap()
}

fn entry(index: usize, bdf: &str, function: &str) -> MetaEntry {
    MetaEntry {
        index,
        guest_bdf: bdf.parse().unwrap(),
        function: FunctionName::new(function).unwrap(),
    }
}

#[test]
fn openstack_nova_device_role_tagging() {
    let parsed = metadata::parse(&fixture("openstack-nova.json")).unwrap();
    // Tagged SR-IOV ports (type nic, with vlan and vf_trusted); the untagged NIC and the disks
    // are not vfmap's.
    assert_eq!(
        parsed.entries,
        [
            entry(1, "0000:00:05.0", "crypto"),
            entry(2, "0000:00:06.0", "compress")
        ]
    );
    assert_eq!(parsed.ignored, 3);
    assert!(parsed.rejected.is_empty());
}

#[test]
fn kubevirt_host_devices_with_tags() {
    let parsed = metadata::parse(&fixture("kubevirt.json")).unwrap();
    assert_eq!(
        parsed.entries,
        [
            entry(1, "0000:07:00.0", "crypto"),
            entry(2, "0000:08:00.0", "storage")
        ]
    );
    assert_eq!(parsed.ignored, 2);
    assert!(parsed.rejected.is_empty());
}

#[test]
fn a_hostile_document_assigns_nothing_and_says_why() {
    let doc = br#"{"devices":[
        {"type":"hostdev","bus":"pci","address":"0000:00:10.0","tags":["vfmap:../../etc/passwd"]},
        {"type":"hostdev","bus":"pci","address":"0000:00:11.0/../..","tags":["vfmap:compress"]},
        {"type":"hostdev","bus":"pci","address":"0000:00:12.0","tags":["vfmap:crypto"]},
        {"type":"nic","bus":"pci","address":"0000:00:12.0","tags":["vfmap:storage"]},
        {"type":"disk","bus":"pci","address":"0000:00:13.0","tags":["vfmap:storage"]},
        {"type":"hostdev","bus":"pci","address":"0000:00:14.0","tags":["vfmap:a","vfmap:b"]},
        {"type":"hostdev","bus":"pci","address":"0000:00:15.0","tags":"vfmap:a"},
        {"type":"hostdev","bus":"pci","bus":"pci","address":"0000:00:16.0","tags":["vfmap:a"]}
    ]}"#;
    let parsed = metadata::parse(doc).unwrap();
    assert!(parsed.entries.is_empty());
    let errors: Vec<&EntryError> = parsed.rejected.iter().map(|r| &r.error).collect();
    assert!(matches!(errors[0], EntryError::BadFunction { .. }));
    assert!(matches!(errors[1], EntryError::BadAddress(_)));
    assert!(matches!(errors[2], EntryError::DuplicateAddress(_)));
    assert!(matches!(errors[3], EntryError::DuplicateAddress(_)));
    assert!(matches!(errors[4], EntryError::NotPci { .. }));
    assert!(matches!(errors[5], EntryError::SeveralFunctions(_)));
    assert!(matches!(errors[6], EntryError::Malformed(_)));
    assert!(matches!(errors[7], EntryError::Malformed(_)));
    let text = parsed.rejected[7].to_string();
    assert!(text.contains("duplicate field `bus`"), "{text}");
}

proptest! {
    /// Whatever the bytes: no panic, bounded error text, and only valid entries.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        check(&bytes);
    }

    /// Documents close to real ones, with arbitrary strings where vfmap reads.
    #[test]
    fn arbitrary_fields_never_panic(
        kind in ".{0,12}", bus in ".{0,8}", address in ".{0,20}",
        tags in proptest::collection::vec(".{0,80}", 0..4),
    ) {
        let tags: Vec<String> = tags.into_iter().map(|t| format!("vfmap:{t}")).collect();
        let doc = serde_json::json!({"devices": [
            {"type": kind, "bus": bus, "address": address, "tags": tags}]});
        check(doc.to_string().as_bytes());
    }
}

fn check(bytes: &[u8]) {
    match metadata::parse(bytes) {
        Ok(parsed) => {
            for e in &parsed.entries {
                assert!(FunctionName::new(e.function.as_str()).is_ok());
            }
            for r in &parsed.rejected {
                let text = r.to_string();
                assert!(text.len() <= 1024, "{text}");
                assert!(!text.chars().any(char::is_control), "{text}");
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.len() <= 1024, "{text}");
            assert!(!text.chars().any(char::is_control), "{text}");
        }
    }
    assert!(bytes.len() <= MAX_METADATA || metadata::parse(bytes).is_err());
}
