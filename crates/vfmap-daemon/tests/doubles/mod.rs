//! In-process doubles of the hypervisor, the guest channel and the host, instant unless told
//! to wait, and a rig of `vms` VMs with `slots` slots each over one PF whose VFs all serve
//! `crypto`. Shared by `tests/engine_pipeline.rs` and `benches/attach_pipeline.rs`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfmap_core::protocol::{Answer, Entry, GuestPath};
use vfmap_core::{Bdf, DriverName, LocalIndex, Profiles, Request, SlotId, Tables, VmName, VmSpec};
use vfmap_daemon::effects::{
    BoxFuture, ChannelError, GuestChannel, HostError, HostVfs, Hypervisor, HypervisorError,
};
use vfmap_daemon::engine::{Adapters, Engine};
use vfmap_daemon::store::Store;
use vfmap_sysfs::Sysfs;
use vfmap_testkit::{PfSpec, SysfsTree};

/// A hypervisor that plugs at once (or after a per-VM delay) and remembers what is plugged.
#[derive(Default)]
pub struct FakeHv {
    pub plugged: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Every device_add, in order: (VM, device id).
    pub adds: Mutex<Vec<(String, String)>>,
    /// How long each device_add takes, per VM.
    pub add_delay: Mutex<BTreeMap<String, Duration>>,
    /// Fails the device_add with this number (1-based, counted over all VMs).
    pub fail_add: Mutex<Option<usize>>,
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
            let delay = self
                .add_delay
                .lock()
                .unwrap()
                .get(vm.name.as_str())
                .copied();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let n = {
                let mut adds = self.adds.lock().unwrap();
                adds.push((vm.name.to_string(), id.to_owned()));
                adds.len()
            };
            if *self.fail_add.lock().unwrap() == Some(n) {
                return Err(HypervisorError::Refused {
                    class: "GenericError".into(),
                    desc: format!("device_add {n} refused"),
                });
            }
            self.plugged
                .lock()
                .unwrap()
                .entry(vm.name.to_string())
                .or_default()
                .insert(id.to_owned());
            let port = vm.slots.iter().position(|s| s == slot).unwrap() as u8;
            Ok(GuestPath {
                port_device: 3 + port / 8,
                port_function: port % 8,
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
            Ok(self
                .plugged
                .lock()
                .unwrap()
                .get(vm.name.as_str())
                .map(|ids| ids.iter().cloned().collect())
                .unwrap_or_default())
        })
    }
}

/// An agent that binds every entry at once (or after a delay per round trip), except the
/// local indexes it is told to refuse.
#[derive(Default)]
pub struct FakeAgent {
    /// Every correspondence received: (VM, entries).
    pub seen: Mutex<Vec<(String, Vec<Entry>)>>,
    /// Local indexes answered `failed`.
    pub refuse: Mutex<BTreeSet<LocalIndex>>,
    /// How long each round trip takes.
    pub delay: Mutex<Duration>,
    /// How long the next round trips take, one each, before `delay` applies again.
    pub next_delays: Mutex<std::collections::VecDeque<Duration>>,
}

impl GuestChannel for FakeAgent {
    fn apply<'a>(
        &'a self,
        vm: &'a VmSpec,
        entries: Vec<Entry>,
        _deadline: Duration,
    ) -> BoxFuture<'a, Result<Vec<Answer>, ChannelError>> {
        Box::pin(async move {
            let next = self.next_delays.lock().unwrap().pop_front();
            let delay = next.unwrap_or(*self.delay.lock().unwrap());
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let refuse = self.refuse.lock().unwrap().clone();
            let answers = entries
                .iter()
                .map(|e| match refuse.contains(&e.local_index) {
                    true => Answer::Failed {
                        local_index: e.local_index,
                        reason: "modprobe failed".into(),
                    },
                    false => Answer::Bound {
                        local_index: e.local_index,
                        driver: e.guest_driver.clone(),
                        guest_bdf: Bdf::new(0, e.local_index.get() as u8 + 1, 0, 0).unwrap(),
                    },
                })
                .collect();
            self.seen
                .lock()
                .unwrap()
                .push((vm.name.to_string(), entries));
            Ok(answers)
        })
    }
}

/// A host whose binds and resets succeed at once.
#[derive(Default)]
pub struct FakeHost {
    pub resets: Mutex<Vec<Bdf>>,
}

impl HostVfs for FakeHost {
    fn bind(&self, _vf: Bdf, _driver: &DriverName) -> Result<(), HostError> {
        Ok(())
    }
    fn reset(&self, vf: Bdf) -> Result<bool, HostError> {
        self.resets.lock().unwrap().push(vf);
        Ok(true)
    }
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub tables: Tables,
    pub slots: usize,
    pub hv: Arc<FakeHv>,
    pub agent: Arc<FakeAgent>,
    pub host: Arc<FakeHost>,
}

impl Rig {
    /// `vfs` VFs of `crypto` (at most 255) for VMs of `slots` slots each.
    pub fn new(vfs: u16, slots: usize) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let tree = SysfsTree::new(dir.path().join("sys"));
        tree.add_pf(&PfSpec::nvme("0000:01:00.0", vfs).with_vfs(vfs));
        let facts = Sysfs::new(tree.root()).discover().unwrap();
        let profile = format!(
            "[[card]]\nname = \"acme\"\nvendor = \"0x1b36\"\ndevice = \"0x0010\"\nnum_vfs = {vfs}\n\
             [[card.function]]\nname = \"crypto\"\nvfs = \"0-{}\"\nguest_driver = \"pci-stub\"\n",
            vfs - 1
        );
        let tables = Tables::build(&facts, &Profiles::parse(&profile, "p.toml").unwrap());
        Rig {
            dir,
            tables,
            slots,
            hv: Arc::default(),
            agent: Arc::default(),
            host: Arc::default(),
        }
    }

    /// An engine over the rig's database (a restart when one ran before).
    pub async fn engine(&self) -> Engine {
        let locations: Vec<Bdf> = self.tables.vfs.iter().map(|v| v.location).collect();
        let (store, loaded) = Store::open(&self.dir.path().join("state.db"), &locations).unwrap();
        let adapters = Adapters {
            hypervisor: self.hv.clone(),
            channel: self.agent.clone(),
            host: self.host.clone(),
            agent_deadline: Duration::from_secs(5),
        };
        Engine::new(self.tables.clone(), store, loaded, adapters)
            .await
            .unwrap()
    }

    /// Registers VM `name` with the rig's slot count.
    pub async fn add_vm(&self, engine: &Engine, name: &str) {
        let vm = vfmap_api::NewVm {
            name: VmName::new(name).unwrap(),
            backend: vfmap_api::NewVmBackend::Qmp {
                qmp_socket: format!("/run/{name}.qmp"),
                agent_socket: format!("/run/{name}.agent"),
                slots: (0..self.slots)
                    .map(|i| SlotId::new(&format!("rp{i}")).unwrap())
                    .collect(),
            },
            numa_node: None,
        };
        engine.add_vm(vm).await.unwrap();
    }
}

/// A request for `count` crypto VFs for `vm`.
pub fn request(vm: &str, count: u32) -> Request {
    Request {
        vm: VmName::new(vm).unwrap(),
        function: "crypto".into(),
        count,
        numa_node: None,
        pf: None,
    }
}

/// Free crypto VFs.
pub fn free(engine: &Engine) -> u64 {
    engine
        .inventory()
        .functions
        .iter()
        .find(|f| f.name.as_str() == "crypto")
        .map_or(0, |f| f.free)
}
