//! Read views: a VM's correspondence table, the inventory with allocation state, built as the
//! API's types (`vfmap-api`) from the engine's state.

use super::*;

impl Engine {
    /// A VM with its correspondence table.
    pub fn vm_view(&self, name: &str) -> Result<vfmap_api::Vm, EngineError> {
        let state = self.lock();
        let spec = state
            .pool
            .vm(name)
            .cloned()
            .ok_or_else(|| PoolError::UnknownVm(name.to_owned()))?;
        let correspondence = state
            .pool
            .assignments_of(&spec.name)
            .map(|a| self.row(&state, &spec, a))
            .collect();
        let failures = state
            .failures
            .iter()
            .filter(|f| f.vm == name)
            .rev()
            .take(20)
            .cloned()
            .collect();
        let VmSpec {
            name,
            backend,
            slots,
            numa_node,
        } = spec;
        Ok(vfmap_api::Vm {
            name,
            backend,
            slots,
            numa_node,
            correspondence,
            failures,
        })
    }

    /// One row of a VM's correspondence table.
    fn row(&self, state: &State, spec: &VmSpec, a: &Assignment) -> vfmap_api::CorrespondenceRow {
        let vf = state.pool.vf(a.global_index);
        let description = self
            .functions
            .iter()
            .find(|f| f.name == a.function)
            .map(|f| f.description.clone())
            .unwrap_or_default();
        let detail = state
            .details
            .get(&a.global_index)
            .cloned()
            .unwrap_or_default();
        vfmap_api::CorrespondenceRow {
            local_index: a.local_index,
            slot: spec
                .slots
                .get(a.local_index.slot())
                .map(ToString::to_string)
                .unwrap_or_default(),
            function: a.function.clone(),
            description,
            guest_driver: vf.and_then(|v| v.guest_driver.clone()),
            global_index: a.global_index,
            host_vf: a.location,
            state: a.state,
            guest_path: detail.guest_path,
            guest_bdf: detail.guest_bdf,
            bound_driver: detail.guest_driver,
            stored_value_error: detail.unreadable,
            cleanup: state.cleanups.get(&a.global_index).map(Cleanup::view),
        }
    }

    /// Every VM's view.
    pub fn vm_views(&self) -> Vec<vfmap_api::Vm> {
        let names: Vec<String> = self.lock().pool.vms().map(|v| v.name.to_string()).collect();
        names.iter().filter_map(|n| self.vm_view(n).ok()).collect()
    }

    fn function_counts(&self, state: &State) -> Vec<vfmap_api::InventoryFunction> {
        self.functions
            .iter()
            .map(|f| vfmap_api::InventoryFunction {
                name: f.name.clone(),
                description: f.description.clone(),
                guest_driver: f.guest_driver.clone(),
                host_driver: f.host_driver.clone(),
                total: state
                    .pool
                    .vfs()
                    .filter(|v| v.function.as_ref() == Some(&f.name))
                    .count() as u64,
                free: state.pool.free_count(f.name.as_str()) as u64,
            })
            .collect()
    }

    /// A VF with its allocation (cheap: the names are shared, only a holder's name is copied).
    fn inventory_vf(state: &State, vf: &PoolVf) -> vfmap_api::InventoryVf {
        let a = state.pool.assignment(vf.global_index);
        vfmap_api::InventoryVf {
            global_index: vf.global_index,
            location: vf.location,
            pf: vf.pf,
            function: vf.function.clone(),
            host_driver: vf.host_driver.clone(),
            guest_driver: vf.guest_driver.clone(),
            numa_node: vf.numa_node,
            vendor: vf.vendor,
            device: vf.device,
            vm: a.map(|a| a.vm.clone()),
            local_index: a.map(|a| a.local_index),
            state: a.map(|a| a.state),
            kubelet: state
                .pool
                .kubelet_hold(vf.global_index)
                .map(|h| vfmap_api::KubeletHolding {
                    owner: h.owner.clone(),
                    allocated_at_ms: h.allocated_at_ms,
                    state: h.state,
                }),
            quarantined: state
                .pool
                .quarantine_of(vf.global_index)
                .map(|q| q.reason.clone()),
            programming: match state.pool.holder(vf.global_index) {
                vfmap_core::HolderRef::Programming(p) => Some(p.to.clone()),
                _ => None,
            },
        }
    }

    /// The inventory with allocation state (owned; for tests and small pools).
    pub fn inventory(&self) -> vfmap_api::Inventory {
        let state = self.lock();
        vfmap_api::Inventory {
            functions: self.function_counts(&state),
            vfs: state
                .pool
                .vfs()
                .map(|vf| Self::inventory_vf(&state, vf))
                .collect(),
        }
    }

    /// The inventory as JSON, serialised straight from the pool one VF at a time: no copy of
    /// 65,536 VFs. The same document as [`Engine::inventory`] gives (tested).
    pub fn inventory_json(&self) -> Vec<u8> {
        let state = self.lock();
        let functions = self.function_counts(&state);
        serde_json::to_vec(&InventoryRef {
            functions: &functions,
            vfs: VfsRef(&state),
        })
        .unwrap_or_default()
    }

    /// VFs by function and state, for the metrics: one pass over the pool under the lock,
    /// counts only. Every function of the tables is there, with zeros; VFs no function
    /// covers are not counted.
    pub fn vf_counts(&self) -> Vec<VfCounts> {
        let mut counts: Vec<VfCounts> = self
            .functions
            .iter()
            .map(|f| VfCounts {
                function: f.name.to_string(),
                ..VfCounts::default()
            })
            .collect();
        let position: BTreeMap<&str, usize> = self
            .functions
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.as_str(), i))
            .collect();
        let state = self.lock();
        for vf in state.pool.vfs() {
            let Some(i) = vf.function.as_ref().and_then(|f| position.get(f.as_str())) else {
                continue;
            };
            let c = &mut counts[*i];
            if let Some(h) = state.pool.kubelet_hold(vf.global_index) {
                match h.state {
                    vfmap_core::HoldState::Held => c.kubelet += 1,
                    vfmap_core::HoldState::Releasing => c.releasing += 1,
                }
                continue;
            }
            if state.pool.quarantine_of(vf.global_index).is_some() {
                c.quarantined += 1;
                continue;
            }
            match state.pool.assignment(vf.global_index) {
                None => c.free += 1,
                Some(a) if a.state != AssignState::Releasing => c.assigned += 1,
                Some(_) if state.cleanups.contains_key(&vf.global_index) => c.failed += 1,
                Some(_) => c.releasing += 1,
            }
        }
        counts
    }

    /// Checks the pool's invariants (health endpoint, tests).
    pub fn check(&self) -> Result<(), String> {
        self.lock().pool.check_invariants()
    }
}

/// [`vfmap_api::Inventory`], with its VFs made one at a time while they are written.
#[derive(Serialize)]
struct InventoryRef<'a> {
    functions: &'a [vfmap_api::InventoryFunction],
    vfs: VfsRef<'a>,
}

struct VfsRef<'a>(&'a State);

impl Serialize for VfsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.pool.vfs().map(|vf| Engine::inventory_vf(self.0, vf)))
    }
}
