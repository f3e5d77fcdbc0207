//! The engine's kubelet holds with in-process doubles: Allocate binds and reads the group, a
//! failed bind gives the VFs back, a VF whose group a process still has open is not reset,
//! release resets and frees, a restart keeps holds and finishes releases, and VMs and the
//! kubelet never share a VF.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfmap_core::protocol::{Answer, Entry, GuestPath};
use vfmap_core::{
    Bdf, DriverName, FunctionName, HoldState, PodContainer, Profiles, Request, SlotId, Tables,
    VmName, VmSpec,
};
use vfmap_daemon::effects::{
    BoxFuture, ChannelError, GuestChannel, HostError, HostVfs, Hypervisor, HypervisorError,
};
use vfmap_daemon::engine::{Adapters, Engine, EngineError, VfHolder};
use vfmap_daemon::store::{Mutation, Store};
use vfmap_sysfs::Sysfs;
use vfmap_testkit::{PfSpec, SysfsTree};

/// A hypervisor and agent that always succeed (the kubelet paths never reach them; the VM
/// in the sharing test does).
struct Plain;

impl Hypervisor for Plain {
    fn attach<'a>(
        &'a self,
        vm: &'a VmSpec,
        slot: &'a SlotId,
        _: &'a str,
        _: Bdf,
    ) -> BoxFuture<'a, Result<GuestPath, HypervisorError>> {
        let port = vm.slots.iter().position(|s| s == slot).unwrap() as u8;
        Box::pin(async move {
            Ok(GuestPath {
                port_device: 3,
                port_function: port,
                device: 0,
                function: 0,
            })
        })
    }
    fn detach<'a>(
        &'a self,
        _: &'a VmSpec,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async { Ok(()) })
    }
    fn plugged<'a>(&'a self, _: &'a VmSpec) -> BoxFuture<'a, Result<Vec<String>, HypervisorError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

impl GuestChannel for Plain {
    fn apply<'a>(
        &'a self,
        _: &'a VmSpec,
        entries: Vec<Entry>,
        _: Duration,
    ) -> BoxFuture<'a, Result<Vec<Answer>, ChannelError>> {
        Box::pin(async move {
            Ok(entries
                .into_iter()
                .map(|e| Answer::Bound {
                    local_index: e.local_index,
                    driver: e.guest_driver,
                    guest_bdf: Bdf::new(0, 1, 0, 0).unwrap(),
                })
                .collect())
        })
    }
}

#[derive(Default)]
struct Host {
    binds: Mutex<Vec<Bdf>>,
    resets: Mutex<Vec<Bdf>>,
    fail_bind: Mutex<bool>,
    users: Mutex<Vec<u32>>,
}

impl HostVfs for Host {
    fn bind(&self, vf: Bdf, driver: &DriverName) -> Result<(), HostError> {
        if *self.fail_bind.lock().unwrap() {
            return Err(HostError::Bind {
                vf,
                driver: driver.clone(),
                source: "vfio-pci refused".into(),
            });
        }
        self.binds.lock().unwrap().push(vf);
        Ok(())
    }
    fn reset(&self, vf: Bdf) -> Result<bool, HostError> {
        self.resets.lock().unwrap().push(vf);
        Ok(true)
    }
    fn iommu_group(&self, vf: Bdf) -> Option<u32> {
        Some(u32::from(vf.function) + 40)
    }
    fn group_users(&self, _: Bdf) -> Vec<u32> {
        self.users.lock().unwrap().clone()
    }
}

const PROFILE: &str = r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 4
[[card.function]]
name = "crypto"
vfs = "0-2"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "3"
guest_driver = "uio_pci_generic"
"#;

struct Rig {
    dir: tempfile::TempDir,
    tables: Tables,
    host: Arc<Host>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let tree = SysfsTree::new(dir.path().join("sys"));
        tree.add_pf(&PfSpec::nvme("0000:01:00.0", 8).with_vfs(4));
        let facts = Sysfs::new(tree.root()).discover().unwrap();
        let tables = Tables::build(&facts, &Profiles::parse(PROFILE, "p.toml").unwrap());
        Rig {
            dir,
            tables,
            host: Arc::default(),
        }
    }

    async fn engine(&self) -> Engine {
        let locations: Vec<Bdf> = self.tables.vfs.iter().map(|v| v.location).collect();
        let (store, loaded) = Store::open(&self.dir.path().join("state.db"), &locations).unwrap();
        let adapters = Adapters {
            hypervisor: Arc::new(Plain),
            channel: Arc::new(Plain),
            host: self.host.clone(),
            agent_deadline: Duration::from_millis(200),
        };
        let engine = Engine::new(self.tables.clone(), store, loaded, adapters)
            .await
            .unwrap();
        engine.recover().await.unwrap();
        engine
    }

    fn crypto(&self) -> Vec<Bdf> {
        self.tables
            .vfs
            .iter()
            .filter(|v| v.function.as_ref().is_some_and(|f| f.as_str() == "crypto"))
            .map(|v| v.location)
            .collect()
    }
}

fn crypto() -> FunctionName {
    FunctionName::new("crypto").unwrap()
}

fn holder(engine: &Engine, location: Bdf) -> VfHolder {
    engine
        .function_vfs()
        .into_iter()
        .find(|v| v.location == location)
        .unwrap()
        .holder
}

fn owner() -> PodContainer {
    PodContainer::new("default", "vf-pod", "app").unwrap()
}

#[tokio::test]
async fn allocate_binds_reads_the_group_and_release_resets_and_frees() {
    let rig = Rig::new();
    let engine = rig.engine().await;
    let vfs = rig.crypto();
    let mut changes = engine.changes();
    let given = engine
        .kubelet_reserve(&crypto(), &vfs[..2], None)
        .await
        .unwrap();
    assert_eq!(given.len(), 2);
    assert_eq!(given[0].iommu_group, Some(u32::from(vfs[0].function) + 40));
    assert_eq!(*rig.host.binds.lock().unwrap(), vfs[..2]);
    assert!(changes.has_changed().unwrap(), "a commit bumps the counter");
    changes.mark_unchanged();
    assert!(matches!(
        holder(&engine, vfs[0]),
        VfHolder::Kubelet { owner: None, .. }
    ));
    // Asked again (the kubelet restarted): accepted, bound again, nothing new held.
    engine
        .kubelet_reserve(&crypto(), &vfs[..1], None)
        .await
        .unwrap();
    engine.kubelet_identify(vfs[0], owner()).await.unwrap();
    assert_eq!(
        engine.kubelet_views()[0]
            .owner
            .as_ref()
            .map(|o| o.pod.as_str()),
        Some("vf-pod")
    );

    // A process still has the group open: refused, nothing reset, still held.
    *rig.host.users.lock().unwrap() = vec![4242];
    let refused = engine.kubelet_release(vfs[0]).await.unwrap_err();
    assert!(refused.to_string().contains("process 4242"), "{refused}");
    assert!(rig.host.resets.lock().unwrap().is_empty());
    assert!(matches!(holder(&engine, vfs[0]), VfHolder::Kubelet { .. }));
    rig.host.users.lock().unwrap().clear();
    engine.kubelet_release(vfs[0]).await.unwrap();
    assert_eq!(*rig.host.resets.lock().unwrap(), [vfs[0]]);
    assert_eq!(holder(&engine, vfs[0]), VfHolder::Free);
    // Only a kubelet-held VF is released.
    assert!(engine.kubelet_release(vfs[0]).await.is_err());
    engine.check().unwrap();
}

#[tokio::test]
async fn a_failed_bind_gives_the_vfs_back() {
    let rig = Rig::new();
    let engine = rig.engine().await;
    let vfs = rig.crypto();
    *rig.host.fail_bind.lock().unwrap() = true;
    let error = engine
        .kubelet_reserve(&crypto(), &vfs[..2], None)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("could not be bound"), "{error}");
    assert!(
        vfs[..2]
            .iter()
            .all(|vf| holder(&engine, *vf) == VfHolder::Free)
    );
    assert!(engine.kubelet_views().is_empty());
}

#[tokio::test]
async fn vms_and_the_kubelet_never_share_a_vf() {
    let rig = Rig::new();
    let engine = rig.engine().await;
    let vfs = rig.crypto();
    engine
        .kubelet_reserve(&crypto(), &vfs[1..2], None)
        .await
        .unwrap();
    engine
        .add_vm(vfmap_api::NewVm {
            name: VmName::new("web").unwrap(),
            backend: vfmap_api::NewVmBackend::Qmp {
                qmp_socket: "/run/web.qmp".into(),
                agent_socket: "/run/web.agent".into(),
                slots: (0..3)
                    .map(|i| SlotId::new(&format!("rp{i}")).unwrap())
                    .collect(),
            },
            numa_node: None,
        })
        .await
        .unwrap();
    let request = |count| Request {
        vm: VmName::new("web").unwrap(),
        function: "crypto".into(),
        count,
        numa_node: None,
        pf: None,
    };
    assert!(engine.attach(request(3)).await.is_err());
    let rows = engine.attach(request(2)).await.unwrap();
    assert!(rows.iter().all(|r| r.host_vf != vfs[1]));
    let refused = engine
        .kubelet_reserve(&crypto(), &[rows[0].host_vf], None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("VM web"), "{refused}");
    engine.check().unwrap();
}

#[tokio::test]
async fn a_restart_keeps_holds_and_finishes_releases() {
    let rig = Rig::new();
    let vfs = rig.crypto();
    {
        let engine = rig.engine().await;
        engine
            .kubelet_reserve(&crypto(), &vfs[..2], None)
            .await
            .unwrap();
        engine.kubelet_identify(vfs[0], owner()).await.unwrap();
    }
    // A release committed as `releasing`, then the daemon died (written as the engine would).
    {
        let locations: Vec<Bdf> = rig.tables.vfs.iter().map(|v| v.location).collect();
        let (store, loaded) = Store::open(&rig.dir.path().join("state.db"), &locations).unwrap();
        let gi = loaded
            .kubelet
            .iter()
            .find(|h| h.location == vfs[1])
            .unwrap()
            .global_index;
        store
            .write(vec![Mutation::Pool(vfmap_core::Change::KubeletReleasing {
                global_index: gi,
            })])
            .await
            .unwrap();
    }
    let engine = rig.engine().await;
    let views = engine.kubelet_views();
    assert_eq!(views.len(), 1, "{views:?}");
    assert_eq!(views[0].location, vfs[0]);
    assert_eq!(views[0].state, HoldState::Held);
    assert_eq!(views[0].owner, Some(owner()));
    assert_eq!(*rig.host.resets.lock().unwrap(), [vfs[1]]);
    assert_eq!(holder(&engine, vfs[1]), VfHolder::Free);
}

#[tokio::test]
async fn unknown_vfs_and_wrong_functions_are_refused() {
    let rig = Rig::new();
    let engine = rig.engine().await;
    let nowhere: Bdf = "0000:09:00.1".parse().unwrap();
    assert!(matches!(
        engine.kubelet_reserve(&crypto(), &[nowhere], None).await,
        Err(EngineError::Pool(_))
    ));
    let compress = rig
        .tables
        .vfs
        .iter()
        .find(|v| {
            v.function
                .as_ref()
                .is_some_and(|f| f.as_str() == "compress")
        })
        .unwrap()
        .location;
    assert!(
        engine
            .kubelet_reserve(&crypto(), &[compress], None)
            .await
            .is_err()
    );
    assert!(engine.kubelet_views().is_empty());
}
