//! The engine with in-process doubles of the hypervisor, the guest channel and the host:
//! the attach path, a failure at each step rolled back, detach, and recovery after a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfmap_core::protocol::{Answer, Entry, GuestPath};
use vfmap_core::{
    AssignState, Bdf, DriverName, LocalIndex, Profiles, Request, SlotId, Tables, VmName, VmSpec,
};
use vfmap_daemon::effects::{
    BoxFuture, ChannelError, GuestChannel, HostError, HostVfs, Hypervisor, HypervisorError,
};
use vfmap_daemon::engine::{Adapters, Engine, EngineError};
use vfmap_daemon::store::Store;
use vfmap_sysfs::Sysfs;
use vfmap_testkit::{PfSpec, SysfsTree};

#[derive(Default)]
struct FakeHv {
    plugged: Mutex<BTreeMap<String, BTreeSet<String>>>,
    fail_attach: Mutex<Option<HypervisorError>>,
    fail_detach: Mutex<bool>,
    /// What `plugged` answers instead of the list, when set.
    plugged_error: Mutex<Option<HypervisorError>>,
    /// How long `plugged` takes to answer.
    plugged_delay: Mutex<Duration>,
}

impl Hypervisor for FakeHv {
    fn attach<'a>(
        &'a self,
        vm: &'a VmSpec,
        slot: &'a SlotId,
        id: &'a str,
        _vf: Bdf,
    ) -> BoxFuture<'a, Result<GuestPath, HypervisorError>> {
        Box::pin(async move {
            if let Some(e) = self.fail_attach.lock().unwrap().clone() {
                return Err(e);
            }
            self.plugged
                .lock()
                .unwrap()
                .entry(vm.name.to_string())
                .or_default()
                .insert(id.to_owned());
            let port = vm.slots.iter().position(|s| s == slot).unwrap() as u8;
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
        vm: &'a VmSpec,
        id: &'a str,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            if *self.fail_detach.lock().unwrap() {
                return Err(HypervisorError::Timeout(Duration::from_secs(1)));
            }
            self.plugged
                .lock()
                .unwrap()
                .entry(vm.name.to_string())
                .or_default()
                .remove(id);
            Ok(())
        })
    }
    fn plugged<'a>(
        &'a self,
        vm: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Vec<String>, HypervisorError>> {
        Box::pin(async move {
            let delay = *self.plugged_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            if let Some(e) = self.plugged_error.lock().unwrap().clone() {
                return Err(e);
            }
            Ok(self
                .plugged
                .lock()
                .unwrap()
                .get(vm.name.as_str())
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .collect())
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum AgentMode {
    Bind,
    WrongDriver,
    Refuse,
    Silent,
}

struct FakeAgent {
    mode: Mutex<AgentMode>,
    seen: Mutex<Vec<Vec<Entry>>>,
}

impl GuestChannel for FakeAgent {
    fn apply<'a>(
        &'a self,
        _vm: &'a VmSpec,
        entries: Vec<Entry>,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<Vec<Answer>, ChannelError>> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(entries.clone());
            let mode = *self.mode.lock().unwrap();
            Ok(match mode {
                AgentMode::Silent => return Err(ChannelError::Timeout(deadline)),
                AgentMode::Refuse => entries
                    .iter()
                    .map(|e| Answer::Failed {
                        local_index: e.local_index,
                        reason: "modprobe failed".into(),
                    })
                    .collect(),
                AgentMode::Bind | AgentMode::WrongDriver => entries
                    .iter()
                    .map(|e| Answer::Bound {
                        local_index: e.local_index,
                        driver: if mode == AgentMode::Bind {
                            e.guest_driver.clone()
                        } else {
                            DriverName::new("nvme").unwrap()
                        },
                        guest_bdf: Bdf::new(0, e.local_index.get() as u8 + 1, 0, 0).unwrap(),
                    })
                    .collect(),
            })
        })
    }
}

#[derive(Default)]
struct FakeHost {
    binds: Mutex<Vec<Bdf>>,
    resets: Mutex<Vec<Bdf>>,
    fail_bind: Mutex<bool>,
}

impl HostVfs for FakeHost {
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
}

const PROFILE: &str = r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 4
[[card.function]]
name = "crypto"
vfs = "0-1"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "2-3"
guest_driver = "uio_pci_generic"
"#;

struct Rig {
    dir: tempfile::TempDir,
    tables: Tables,
    hv: Arc<FakeHv>,
    agent: Arc<FakeAgent>,
    host: Arc<FakeHost>,
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
            hv: Arc::default(),
            agent: Arc::new(FakeAgent {
                mode: Mutex::new(AgentMode::Bind),
                seen: Mutex::default(),
            }),
            host: Arc::default(),
        }
    }

    async fn engine(&self) -> Engine {
        let locations: Vec<Bdf> = self.tables.vfs.iter().map(|v| v.location).collect();
        let (store, loaded) = Store::open(&self.dir.path().join("state.db"), &locations).unwrap();
        let adapters = Adapters {
            hypervisor: self.hv.clone(),
            channel: self.agent.clone(),
            host: self.host.clone(),
            agent_deadline: Duration::from_millis(200),
        };
        Engine::new(self.tables.clone(), store, loaded, adapters)
            .await
            .unwrap()
    }
}

/// Free VFs of `function`, from the engine's inventory.
fn free(engine: &Engine, function: &str) -> usize {
    engine
        .inventory()
        .functions
        .iter()
        .find(|f| f.name.as_str() == function)
        .map_or(0, |f| f.free as usize)
}

fn vm(name: &str) -> vfmap_api::NewVm {
    vfmap_api::NewVm {
        name: VmName::new(name).unwrap(),
        backend: vfmap_api::NewVmBackend::Qmp {
            qmp_socket: format!("/run/{name}.qmp"),
            agent_socket: format!("/run/{name}.agent"),
            slots: (0..3)
                .map(|i| SlotId::new(&format!("rp{i}")).unwrap())
                .collect(),
        },
        numa_node: None,
    }
}

fn request(vm: &str, function: &str, count: u32) -> Request {
    Request {
        vm: VmName::new(vm).unwrap(),
        function: function.into(),
        count,
        numa_node: None,
        pf: None,
    }
}

/// The inventory the API writes straight from the pool is the API's `Inventory`, the same as
/// the engine's owned view.
#[tokio::test]
async fn the_streamed_inventory_is_the_api_inventory() {
    let rig = Rig::new();
    let engine = rig.engine().await;
    engine.add_vm(vm("web")).await.unwrap();
    engine.attach(request("web", "crypto", 1)).await.unwrap();
    let streamed: vfmap_api::Inventory =
        serde_json::from_slice(&engine.inventory_json()).expect("the API's Inventory");
    let owned = engine.inventory();
    assert_eq!(streamed, owned);
    assert!(
        owned
            .vfs
            .iter()
            .any(|v| v.state == Some(AssignState::Ready) && v.vm.is_some())
    );
}

#[tokio::test]
async fn attach_reaches_ready_with_the_agents_answer_and_detach_frees() {
    let rig = Rig::new();
    let engine = rig.engine().await;
    engine.add_vm(vm("web")).await.unwrap();
    let rows = engine.attach(request("web", "crypto", 1)).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, AssignState::Ready);
    assert_eq!(rows[0].local_index.get(), 0);
    assert_eq!(
        rows[0].guest_path.map(|p| p.to_string()).as_deref(),
        Some("03.0/00.0")
    );
    assert_eq!(
        rows[0].bound_driver.as_ref().map(|d| d.as_str()),
        Some("pci-stub")
    );
    let rows = engine.attach(request("web", "compress", 1)).await.unwrap();
    assert_eq!(rows[0].local_index.get(), 1);
    // The agent got the whole correspondence the second time: both entries.
    let last = rig.agent.seen.lock().unwrap().last().unwrap().clone();
    assert_eq!(
        last.iter().map(|e| e.local_index.get()).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(last[1].guest_driver.as_str(), "uio_pci_generic");

    engine.detach("web", LocalIndex::new(0)).await.unwrap();
    let view = engine.vm_view("web").unwrap();
    assert_eq!(view.correspondence.len(), 1);
    assert_eq!(
        rig.host.resets.lock().unwrap().len(),
        1,
        "released VF was reset"
    );
    assert_eq!(rig.hv.plugged.lock().unwrap()["web"].len(), 1);
    let inventory = engine.inventory();
    let crypto = inventory
        .functions
        .iter()
        .find(|f| f.name.as_str() == "crypto")
        .unwrap();
    assert_eq!((crypto.total, crypto.free), (2, 2));
    engine.check().unwrap();
}

#[tokio::test]
async fn a_failure_at_each_step_rolls_back_and_records_why() {
    for (step, set_up, want) in [
        ("host bind", 0, "vfio-pci refused"),
        ("device_add", 1, "slot rp0 is occupied"),
        (
            "agent refuses",
            2,
            "could not bind pci-stub: modprobe failed",
        ),
        ("agent silent", 3, "did not answer"),
        (
            "agent binds the wrong driver",
            4,
            "bound nvme, not pci-stub",
        ),
    ] {
        let rig = Rig::new();
        match set_up {
            0 => *rig.host.fail_bind.lock().unwrap() = true,
            1 => {
                *rig.hv.fail_attach.lock().unwrap() = Some(HypervisorError::SlotOccupied {
                    slot: "rp0".into(),
                    detail: "x".into(),
                })
            }
            2 => *rig.agent.mode.lock().unwrap() = AgentMode::Refuse,
            3 => *rig.agent.mode.lock().unwrap() = AgentMode::Silent,
            _ => *rig.agent.mode.lock().unwrap() = AgentMode::WrongDriver,
        }
        let engine = rig.engine().await;
        engine.add_vm(vm("web")).await.unwrap();
        let err = engine
            .attach(request("web", "crypto", 1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, EngineError::AttachFailed { .. }),
            "{step}: {err}"
        );
        assert!(err.to_string().contains(want), "{step}: {err}");
        let view = engine.vm_view("web").unwrap();
        assert!(view.correspondence.is_empty(), "{step}: VF not returned");
        assert!(view.failures[0].reason.contains(want), "{step}");
        assert_eq!(free(&engine, "crypto"), 2, "{step}");
        assert!(
            rig.hv
                .plugged
                .lock()
                .unwrap()
                .values()
                .all(BTreeSet::is_empty),
            "{step}: left plugged"
        );
        engine.check().unwrap();
    }
}

#[tokio::test]
async fn a_failed_unplug_during_rollback_keeps_the_vf_out_of_the_pool_until_cleaned_up() {
    let rig = Rig::new();
    *rig.agent.mode.lock().unwrap() = AgentMode::Refuse;
    *rig.hv.fail_detach.lock().unwrap() = true;
    let engine = rig.engine().await;
    engine.add_vm(vm("web")).await.unwrap();
    let err = engine
        .attach(request("web", "crypto", 1))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("retries the cleanup automatically"),
        "{err}"
    );
    // It may still be in the VM: it must not go back to the pool, and it shows why.
    assert_eq!(free(&engine, "crypto"), 1);
    let row = &engine.vm_view("web").unwrap().correspondence[0];
    assert_eq!(row.state, AssignState::Releasing);
    let cleanup = row.cleanup.as_ref().expect("a cleanup is scheduled");
    assert_eq!(cleanup.attempts, 1);
    assert!(cleanup.next_retry_at.is_some());
    // Once the hypervisor answers again, a detach (like the automatic retry) frees it.
    *rig.hv.fail_detach.lock().unwrap() = false;
    engine.detach("web", LocalIndex::new(0)).await.unwrap();
    assert_eq!(free(&engine, "crypto"), 2);
    assert!(engine.vm_view("web").unwrap().correspondence.is_empty());
}

#[tokio::test]
async fn requests_are_all_or_nothing_and_errors_change_nothing() {
    let rig = Rig::new();
    let engine = rig.engine().await;
    engine.add_vm(vm("web")).await.unwrap();
    let before = serde_json::to_value(engine.inventory()).unwrap();
    for (req, want) in [
        (
            request("web", "crypto", 3),
            "3 VF(s) of function \"crypto\" requested, 2 free",
        ),
        (request("nope", "crypto", 1), "no VM named \"nope\""),
        (
            request("web", "dance", 1),
            "no VF carries function \"dance\"",
        ),
        (request("web", "crypto", 0), "`count` must be 1-256"),
    ] {
        let err = engine.attach(req).await.unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert_eq!(serde_json::to_value(engine.inventory()).unwrap(), before);
    }
    assert!(matches!(
        engine.add_vm(vm("web")).await,
        Err(EngineError::Pool(_))
    ));
    let rows = engine.attach(request("web", "crypto", 2)).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.local_index.get()).collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(matches!(
        engine.detach("web", LocalIndex::new(2)).await,
        Err(EngineError::Pool(_))
    ));
    assert_eq!(engine.remove_vm("web").await.unwrap(), 2);
    assert_eq!(free(&engine, "crypto"), 2);
}

#[tokio::test]
async fn restart_recovers_in_flight_work_from_the_database() {
    let rig = Rig::new();
    {
        let engine = rig.engine().await;
        engine.add_vm(vm("web")).await.unwrap();
        engine.attach(request("web", "crypto", 1)).await.unwrap();
        engine.attach(request("web", "compress", 1)).await.unwrap();
    }
    // Between runs: the compress VF vanished from the VM (as if the VM restarted), and a stale
    // attach of the other crypto VF was left at "plugged" (as if the daemon died there).
    rig.hv
        .plugged
        .lock()
        .unwrap()
        .get_mut("web")
        .unwrap()
        .retain(|id| id != "vfmap-vf2");
    {
        let conn = vfmap_daemon::store::open_connection(&rig.dir.path().join("state.db")).unwrap();
        conn.execute(
            "INSERT INTO assignments (global_index, location, vm, local_index, function, state) VALUES (1, '0000:01:00.2', 'web', 2, 'crypto', 'plugged')",
            [],
        )
        .unwrap();
    }
    rig.hv
        .plugged
        .lock()
        .unwrap()
        .get_mut("web")
        .unwrap()
        .insert("vfmap-vf1".into());

    let engine = rig.engine().await;
    engine.recover().await.unwrap();
    let view = engine.vm_view("web").unwrap();
    let kept: Vec<(u32, AssignState)> = view
        .correspondence
        .iter()
        .map(|r| (r.local_index.get(), r.state))
        .collect();
    assert_eq!(
        kept,
        [(0, AssignState::Ready)],
        "ready+plugged kept; lost and in-flight freed"
    );
    assert_eq!(
        rig.hv.plugged.lock().unwrap()["web"]
            .iter()
            .collect::<Vec<_>>(),
        ["vfmap-vf0"]
    );
    let inventory = engine.inventory();
    assert_eq!(
        inventory.vfs.iter().filter(|v| v.state.is_some()).count(),
        1
    );
    assert!(
        view.failures
            .iter()
            .any(|f| f.reason.contains("restarted during the attach"))
    );
    engine.check().unwrap();
}

#[tokio::test]
async fn recovery_frees_only_what_a_vm_that_is_not_running_cannot_hold() {
    for (error, kept) in [
        (
            HypervisorError::NotRunning {
                socket: "/run/web.qmp".into(),
                reason: "refused".into(),
            },
            0,
        ),
        (HypervisorError::Timeout(Duration::from_secs(1)), 1),
        (
            HypervisorError::Unreachable {
                socket: "/run/web.qmp".into(),
                reason: "permission denied".into(),
            },
            1,
        ),
    ] {
        let rig = Rig::new();
        {
            let engine = rig.engine().await;
            engine.add_vm(vm("web")).await.unwrap();
            engine.attach(request("web", "crypto", 1)).await.unwrap();
        }
        *rig.hv.plugged_error.lock().unwrap() = Some(error.clone());
        let engine = rig.engine().await;
        engine.recover().await.unwrap();
        // A VM we merely cannot ask may still hold its VF: it must stay reserved, not reused.
        assert_eq!(
            engine.vm_view("web").unwrap().correspondence.len(),
            kept,
            "{error}"
        );
        assert_eq!(free(&engine, "crypto"), 2 - kept, "{error}");
    }
}

#[tokio::test]
async fn a_failed_vf_releases_the_rest_of_its_request() {
    let rig = Rig::new();
    let engine = rig.engine().await;
    engine.add_vm(vm("web")).await.unwrap();
    *rig.agent.mode.lock().unwrap() = AgentMode::Refuse;
    let err = engine
        .attach(request("web", "crypto", 2))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("modprobe failed"), "{err}");
    assert_eq!(free(&engine, "crypto"), 2, "both VFs back in the pool");
    assert!(engine.vm_view("web").unwrap().correspondence.is_empty());
    // One correspondence for the whole request, then one without it before the rollback.
    let seen: Vec<usize> = rig
        .agent
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(seen, [2, 0]);
    engine.check().unwrap();
}

#[tokio::test]
async fn a_restart_that_cannot_ask_the_hypervisor_turns_unfinished_attaches_into_cleanups() {
    let rig = Rig::new();
    {
        let engine = rig.engine().await;
        engine.add_vm(vm("web")).await.unwrap();
    }
    {
        let conn = vfmap_daemon::store::open_connection(&rig.dir.path().join("state.db")).unwrap();
        conn.execute(
            "INSERT INTO assignments (global_index, location, vm, local_index, function, state) VALUES (1, '0000:01:00.2', 'web', 0, 'crypto', 'host_bound')",
            [],
        )
        .unwrap();
    }
    *rig.hv.plugged_error.lock().unwrap() = Some(HypervisorError::Timeout(Duration::from_secs(1)));
    let engine = rig.engine().await;
    engine.recover().await.unwrap();
    // Not handed out (it may be in the VM), not pinned: a release with a scheduled cleanup.
    assert_eq!(free(&engine, "crypto"), 1);
    let row = &engine.vm_view("web").unwrap().correspondence[0];
    assert_eq!(row.state, AssignState::Releasing);
    assert_eq!(row.cleanup.as_ref().map(|c| c.attempts), Some(1));
    // The hypervisor answers again: the operator's detach (or the retry) frees it.
    *rig.hv.plugged_error.lock().unwrap() = None;
    engine.detach("web", LocalIndex::new(0)).await.unwrap();
    assert_eq!(free(&engine, "crypto"), 2);
}

#[tokio::test]
async fn recovery_asks_every_vm_at_once_so_a_slow_hypervisor_does_not_hold_the_others_back() {
    let rig = Rig::new();
    {
        let engine = rig.engine().await;
        for (name, function) in [("a", "crypto"), ("b", "crypto"), ("c", "compress")] {
            engine.add_vm(vm(name)).await.unwrap();
            engine.attach(request(name, function, 1)).await.unwrap();
        }
    }
    *rig.hv.plugged_delay.lock().unwrap() = Duration::from_millis(600);
    let engine = rig.engine().await;
    let started = std::time::Instant::now();
    engine.recover().await.unwrap();
    let took = started.elapsed();
    // One after another would take 3 x 600 ms.
    assert!(took < Duration::from_millis(1500), "recovery took {took:?}");
    for name in ["a", "b", "c"] {
        let view = engine.vm_view(name).unwrap();
        assert_eq!(view.correspondence.len(), 1, "{name} kept its VF");
        assert_eq!(view.correspondence[0].state, AssignState::Ready);
    }
}

#[tokio::test]
async fn recovery_unplugs_devices_with_vfmap_ids_the_database_does_not_hold() {
    let rig = Rig::new();
    {
        let engine = rig.engine().await;
        engine.add_vm(vm("web")).await.unwrap();
        engine.attach(request("web", "crypto", 1)).await.unwrap();
    }
    // A device_add from a dead daemon landed for VF 1, which the database holds for no one;
    // a device of the operator's own stays.
    rig.hv
        .plugged
        .lock()
        .unwrap()
        .get_mut("web")
        .unwrap()
        .extend(["vfmap-vf1".to_owned(), "their-nic".to_owned()]);
    let engine = rig.engine().await;
    engine.recover().await.unwrap();
    let mut left: Vec<String> = rig.hv.plugged.lock().unwrap()["web"]
        .iter()
        .cloned()
        .collect();
    left.sort();
    assert_eq!(left, ["their-nic", "vfmap-vf0"]);
    assert_eq!(engine.vm_view("web").unwrap().correspondence.len(), 1);
}

/// Waits (at most 5 s) until `done` holds.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not reached in 5 s");
}

#[tokio::test]
async fn a_vm_its_manager_stopped_gives_its_vfs_back_and_an_undefined_one_is_forgotten() {
    let rig = Rig::new();
    let engine = Arc::new(rig.engine().await);
    engine.add_vm(vm("web")).await.unwrap();
    engine.attach(request("web", "crypto", 2)).await.unwrap();
    assert_eq!(free(&engine, "crypto"), 0);
    // A QEMU whose QMP socket is gone is not managed: its VFs wait for an operator.
    *rig.hv.plugged_error.lock().unwrap() = Some(HypervisorError::NotRunning {
        socket: "/run/web.qmp".into(),
        reason: "gone".into(),
    });
    engine.reconcile_orphans().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(free(&engine, "crypto"), 0);
    // libvirt says the domain is shut off: the VFs come back by themselves, reset.
    *rig.hv.plugged_error.lock().unwrap() = Some(HypervisorError::DomainInactive {
        domain: "web".into(),
        state: "shut off".into(),
    });
    engine.reconcile_orphans().await;
    until(|| free(&engine, "crypto") == 2).await;
    assert!(engine.vm_view("web").unwrap().correspondence.is_empty());
    // It starts again and gets a VF; then it is undefined: forgotten, its VF free.
    *rig.hv.plugged_error.lock().unwrap() = None;
    engine.attach(request("web", "crypto", 1)).await.unwrap();
    *rig.hv.plugged_error.lock().unwrap() = Some(HypervisorError::UnknownDomain {
        domain: "web".into(),
        uri: "qemu:///system".into(),
    });
    let told = rig.agent.seen.lock().unwrap().len();
    engine.reconcile_orphans().await;
    until(|| engine.vm_view("web").is_err()).await;
    assert_eq!(free(&engine, "crypto"), 2);
    // A domain that is gone has no agent to tell: waiting for one would cost the whole agent
    // deadline per VF (minutes in the nested rig).
    assert_eq!(
        rig.agent.seen.lock().unwrap().len(),
        told,
        "the agent was not asked"
    );
}

#[tokio::test]
async fn recovery_forgets_a_vm_whose_domain_was_undefined_meanwhile() {
    let rig = Rig::new();
    {
        let engine = rig.engine().await;
        engine.add_vm(vm("web")).await.unwrap();
        engine.attach(request("web", "crypto", 1)).await.unwrap();
    }
    *rig.hv.plugged_error.lock().unwrap() = Some(HypervisorError::UnknownDomain {
        domain: "web".into(),
        uri: "qemu:///system".into(),
    });
    let engine = rig.engine().await;
    engine.recover().await.unwrap();
    assert!(engine.vm_view("web").is_err());
    assert_eq!(free(&engine, "crypto"), 2);
}

#[tokio::test]
async fn a_vf_the_vm_lost_is_released_at_the_next_check() {
    let rig = Rig::new();
    let engine = Arc::new(rig.engine().await);
    engine.add_vm(vm("web")).await.unwrap();
    engine.attach(request("web", "crypto", 2)).await.unwrap();
    // The VM was restarted between two checks: one live-only device did not come back.
    rig.hv
        .plugged
        .lock()
        .unwrap()
        .get_mut("web")
        .unwrap()
        .remove("vfmap-vf0");
    engine.reconcile_orphans().await;
    until(|| free(&engine, "crypto") == 1).await;
    let view = engine.vm_view("web").unwrap();
    assert_eq!(view.correspondence.len(), 1);
    assert_eq!(view.correspondence[0].global_index.get(), 1);
    // Nothing else changes at the next check.
    engine.reconcile_orphans().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(free(&engine, "crypto"), 1);
}
