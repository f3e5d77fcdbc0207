//! The adapter against a fake `virsh` (a test double: a shell script that keeps one domain's
//! live XML in a file, adds what `attach-device` is given, and logs every run). The real
//! libvirtd is the nested scenario's (`scripts/vm/nested/libvirt.sh`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;

const EMPTY: &str = include_str!("../../tests/fixtures/libvirt/running-empty.xml");
const SHUT_OFF: &str = include_str!("../../tests/fixtures/libvirt/shut-off.xml");

/// A fake virsh in a temporary directory: `live.xml` is the domain, `calls` the log of runs,
/// and a file `refuse`, when present, is written to stderr instead of attaching.
struct FakeVirsh {
    dir: tempfile::TempDir,
}

impl FakeVirsh {
    fn new(live: &str) -> FakeVirsh {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let script = format!(
            r#"#!/bin/bash
printf '%s\n' "$*" >> {d}/calls
shift 3
case "$1" in
dumpxml) cat {d}/live.xml ;;
*attach-device*)
    hostdev=$(cat)
    if [ -e {d}/refuse ]; then cat {d}/refuse >&2
    else awk -v h="$hostdev" '/<\/devices>/ {{ print h }} {{ print }}' {d}/live.xml > {d}/next && mv {d}/next {d}/live.xml
    fi
    cat {d}/live.xml ;;
*) echo "error: unexpected $1" >&2; exit 1 ;;
esac
"#
        );
        let program = dir.path().join("virsh");
        fs::write(&program, script).unwrap();
        fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.path().join("live.xml"), live).unwrap();
        FakeVirsh { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn adapter(&self) -> Virsh {
        Virsh::new(
            self.path("virsh").display().to_string(),
            Duration::from_secs(10),
        )
    }

    /// The runs so far, and forgets them.
    fn calls(&self) -> Vec<String> {
        let text = fs::read_to_string(self.path("calls")).unwrap_or_default();
        let _ = fs::remove_file(self.path("calls"));
        text.lines().map(str::to_owned).collect()
    }
}

fn vm(domain: &str) -> VmSpec {
    VmSpec {
        name: vfmap_core::VmName::new("inner").unwrap(),
        backend: VmBackend::Libvirt {
            domain: domain.into(),
            uri: "qemu:///system".into(),
            port_name: "org.vfmap.0".into(),
            agent_socket: "/run/vfmap/inner.agent".into(),
            persistent: false,
        },
        slots: ["pci.2", "pci.3", "pci.4"]
            .map(|s| SlotId::new(s).unwrap())
            .into(),
        numa_node: None,
    }
}

fn slot(name: &str) -> SlotId {
    SlotId::new(name).unwrap()
}

fn vf(text: &str) -> Bdf {
    text.parse().unwrap()
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
}

#[tokio::test]
async fn an_attach_is_one_virsh_run_once_the_live_xml_is_known() {
    let fake = FakeVirsh::new(EMPTY);
    let virsh = fake.adapter();
    let vm = vm("inner");
    let path = virsh
        .attach_libvirt(&vm, &slot("pci.2"), "vfmap-vf0", vf("0000:01:00.1"))
        .await
        .unwrap();
    assert_eq!((path.device, path.function), (0, 0));
    let calls = fake.calls();
    assert_eq!(
        calls.len(),
        2,
        "first attach: read the live XML, then attach: {calls:?}"
    );
    assert_eq!(calls[0], "--quiet --connect qemu:///system dumpxml inner");
    assert_eq!(
        calls[1],
        "--quiet --connect qemu:///system attach-device --domain 'inner' --file /proc/self/fd/0 --live; dumpxml --domain 'inner'"
    );
    let second = virsh
        .attach_libvirt(&vm, &slot("pci.3"), "vfmap-vf1", vf("0000:01:00.2"))
        .await
        .unwrap();
    assert_ne!(second, path, "another root port");
    assert_eq!(
        fake.calls().len(),
        1,
        "the XML read after the first attach is used"
    );
    let live = xml::parse(&fs::read_to_string(fake.path("live.xml")).unwrap()).unwrap();
    assert_eq!(live.guest_path("ua-vfmap-vf1"), Some(second));
}

/// A port the kept XML shows free but that someone else filled since: libvirt refuses, and the
/// refusal is told from the XML read in the same run (a slot conflict, not a bare message).
#[tokio::test]
async fn a_port_filled_behind_vfmaps_back_is_refused_as_occupied() {
    let fake = FakeVirsh::new(EMPTY);
    let virsh = fake.adapter();
    let vm = vm("inner");
    virsh
        .attach_libvirt(&vm, &slot("pci.2"), "vfmap-vf0", vf("0000:01:00.1"))
        .await
        .unwrap();
    let foreign = xml::hostdev_xml(vf("0000:01:00.3"), "ua-other", 3);
    let live = fs::read_to_string(fake.path("live.xml")).unwrap();
    write(
        &fake.path("live.xml"),
        &live.replace("</devices>", &format!("{foreign}</devices>")),
    );
    write(
        &fake.path("refuse"),
        "error: Failed to attach device\nerror: XML error: Attempted double use of PCI Address 0000:03:00.0\n",
    );
    fake.calls();
    let e = virsh
        .attach_libvirt(&vm, &slot("pci.3"), "vfmap-vf1", vf("0000:01:00.2"))
        .await
        .unwrap_err();
    assert!(matches!(e, HypervisorError::SlotOccupied { .. }), "{e:?}");
    assert_eq!(fake.calls().len(), 1);
    // The refusal's XML is kept: the next attach there is refused without trying.
    let e = virsh
        .attach_libvirt(&vm, &slot("pci.3"), "vfmap-vf1", vf("0000:01:00.2"))
        .await
        .unwrap_err();
    assert!(matches!(e, HypervisorError::SlotOccupied { .. }), "{e:?}");
    assert_eq!(
        fake.calls().len(),
        1,
        "the fresh read that confirms the refusal"
    );
}

#[tokio::test]
async fn a_domain_stopped_since_the_last_read_is_reported_inactive() {
    let fake = FakeVirsh::new(EMPTY);
    let virsh = fake.adapter();
    let vm = vm("inner");
    assert_eq!(
        virsh.plugged_libvirt(&vm).await.unwrap(),
        Vec::<String>::new()
    );
    write(&fake.path("live.xml"), SHUT_OFF);
    write(
        &fake.path("refuse"),
        "error: Failed to attach device\nerror: Requested operation is not valid: domain is not running\n",
    );
    let e = virsh
        .attach_libvirt(&vm, &slot("pci.2"), "vfmap-vf0", vf("0000:01:00.1"))
        .await
        .unwrap_err();
    assert!(matches!(e, HypervisorError::DomainInactive { .. }), "{e:?}");
}

/// Domain names may hold quotes and `;` (libvirt allows them): the `;`-separated virsh
/// command line quotes them, so they stay one word.
#[tokio::test]
async fn domain_names_are_quoted_for_virshs_command_line() {
    assert_eq!(virsh_quote("inner"), "'inner'");
    assert_eq!(virsh_quote("a'b;c\"d"), r#"'a'\''b;c"d'"#);
    let fake = FakeVirsh::new(&EMPTY.replace("<name>inner</name>", "<name>a'b;c</name>"));
    let virsh = fake.adapter();
    virsh
        .attach_libvirt(
            &vm("a'b;c"),
            &slot("pci.2"),
            "vfmap-vf0",
            vf("0000:01:00.1"),
        )
        .await
        .unwrap();
    let calls = fake.calls();
    assert!(
        calls[1].contains(r#"attach-device --domain 'a'\''b;c' --file"#),
        "{calls:?}"
    );
}
