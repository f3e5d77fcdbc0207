//! A test double of the daemon's pool: VFs in memory, holders changed by the trait's calls,
//! the view published on a watch channel. No sysfs, no vfio: `reserve` returns IOMMU groups
//! from a table given at creation. Shared by the tests and the `mem-plugin` example.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use vfmap_core::{Bdf, FunctionName, GlobalIndex};
use vfmap_k8s::allocate::AllocatedVf;
use vfmap_k8s::model::{ContainerRef, Holder, VfView};
use vfmap_k8s::pool::{PoolRefusal, VfPool};

/// The double.
pub struct MemPool {
    vfs: Mutex<Vec<VfView>>,
    groups: BTreeMap<Bdf, u32>,
    tx: watch::Sender<Arc<Vec<VfView>>>,
    /// Every call, in order, for the tests to check.
    pub calls: Mutex<Vec<String>>,
}

impl MemPool {
    /// `(location, pf, function, numa node, iommu group)` per VF; global indexes in order.
    pub fn new(vfs: &[(&str, &str, &str, Option<i32>, u32)]) -> Arc<MemPool> {
        let views: Vec<VfView> = vfs
            .iter()
            .enumerate()
            .map(|(i, (location, pf, function, numa, _))| VfView {
                global_index: GlobalIndex::new(i as u32),
                location: location.parse().unwrap(),
                pf: pf.parse().unwrap(),
                function: FunctionName::new(function).unwrap(),
                numa_node: *numa,
                holder: Holder::Free,
            })
            .collect();
        let groups = vfs
            .iter()
            .map(|(location, _, _, _, group)| (location.parse().unwrap(), *group))
            .collect();
        let (tx, _) = watch::channel(Arc::new(views.clone()));
        Arc::new(MemPool {
            vfs: Mutex::new(views),
            groups,
            tx,
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Sets a VF's holder (e.g. a VM took it through vfmap's API) and publishes the view.
    pub fn set_holder(&self, location: &str, holder: Holder) {
        let location: Bdf = location.parse().unwrap();
        let mut vfs = self.vfs.lock().unwrap();
        if let Some(vf) = vfs.iter_mut().find(|v| v.location == location) {
            vf.holder = holder;
        }
        self.tx.send_replace(Arc::new(vfs.clone()));
    }

    /// A VF's holder now.
    pub fn holder(&self, location: &str) -> Holder {
        let location: Bdf = location.parse().unwrap();
        let vfs = self.vfs.lock().unwrap();
        vfs.iter()
            .find(|v| v.location == location)
            .unwrap()
            .holder
            .clone()
    }

    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl VfPool for MemPool {
    fn view(&self) -> watch::Receiver<Arc<Vec<VfView>>> {
        self.tx.subscribe()
    }

    async fn reserve(
        &self,
        function: &FunctionName,
        locations: &[Bdf],
    ) -> Result<Vec<AllocatedVf>, PoolRefusal> {
        self.log(format!("reserve {function} {locations:?}"));
        let mut vfs = self.vfs.lock().unwrap();
        for location in locations {
            let vf = vfs
                .iter()
                .find(|v| v.location == *location && &v.function == function)
                .ok_or_else(|| PoolRefusal(format!("{location} is not a {function} VF")))?;
            if !matches!(vf.holder, Holder::Free | Holder::Kubelet { .. }) {
                return Err(PoolRefusal(format!("{location} is taken: {:?}", vf.holder)));
            }
        }
        let at = now_ms();
        for vf in vfs.iter_mut().filter(|v| locations.contains(&v.location)) {
            if vf.holder == Holder::Free {
                vf.holder = Holder::Kubelet {
                    owner: None,
                    allocated_at_ms: at,
                };
            }
        }
        self.tx.send_replace(Arc::new(vfs.clone()));
        Ok(locations
            .iter()
            .map(|l| AllocatedVf {
                location: *l,
                iommu_group: self.groups[l],
            })
            .collect())
    }

    async fn identify(&self, location: Bdf, owner: &ContainerRef) -> Result<(), PoolRefusal> {
        self.log(format!("identify {location} {owner}"));
        let mut vfs = self.vfs.lock().unwrap();
        let vf = vfs.iter_mut().find(|v| v.location == location).unwrap();
        match &mut vf.holder {
            Holder::Kubelet { owner: o, .. } => *o = Some(owner.clone()),
            other => return Err(PoolRefusal(format!("not the kubelet's: {other:?}"))),
        }
        self.tx.send_replace(Arc::new(vfs.clone()));
        Ok(())
    }

    async fn adopt(&self, location: Bdf, owner: &ContainerRef) -> Result<(), PoolRefusal> {
        self.log(format!("adopt {location} {owner}"));
        let mut vfs = self.vfs.lock().unwrap();
        let vf = vfs.iter_mut().find(|v| v.location == location).unwrap();
        if vf.holder != Holder::Free {
            return Err(PoolRefusal("not free".into()));
        }
        vf.holder = Holder::Kubelet {
            owner: Some(owner.clone()),
            allocated_at_ms: now_ms(),
        };
        self.tx.send_replace(Arc::new(vfs.clone()));
        Ok(())
    }

    async fn release(&self, location: Bdf) -> Result<(), PoolRefusal> {
        self.log(format!("release {location}"));
        let mut vfs = self.vfs.lock().unwrap();
        let vf = vfs.iter_mut().find(|v| v.location == location).unwrap();
        if !matches!(vf.holder, Holder::Kubelet { .. }) {
            return Err(PoolRefusal("not the kubelet's".into()));
        }
        vf.holder = Holder::Free;
        self.tx.send_replace(Arc::new(vfs.clone()));
        Ok(())
    }
}
