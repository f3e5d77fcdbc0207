//! Read views: a VM's correspondence table, the inventory with allocation state.

use super::*;

/// One row of a VM's correspondence table.
#[derive(Debug, Clone, Serialize)]
pub struct CorrespondenceRow {
    /// Local index (slot position).
    pub local_index: LocalIndex,
    /// The slot's id.
    pub slot: String,
    /// The function.
    pub function: String,
    /// Its description.
    pub description: String,
    /// The driver the guest must bind.
    pub guest_driver: Option<String>,
    /// The VF's global index.
    pub global_index: GlobalIndex,
    /// The VF's host location.
    pub host_vf: String,
    /// Assignment state.
    pub state: &'static str,
    /// Guest-side facts.
    #[serde(flatten)]
    pub detail: Detail,
    /// When the release is waiting for the hypervisor: the automatic retries of its cleanup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<Cleanup>,
}

/// A VM with its correspondence table.
#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    /// Registration.
    #[serde(flatten)]
    pub spec: VmSpec,
    /// Local index → function, with state.
    pub correspondence: Vec<CorrespondenceRow>,
    /// Recent failed attaches.
    pub failures: Vec<Failure>,
}

/// A VF with its allocation.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryVf {
    /// The VF.
    #[serde(flatten)]
    pub vf: PoolVf,
    /// Holder, if any.
    pub vm: Option<String>,
    /// Local index in the holder.
    pub local_index: Option<LocalIndex>,
    /// Assignment state, if assigned.
    pub state: Option<&'static str>,
}

/// A function with its counts.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryFunction {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Guest driver.
    pub guest_driver: String,
    /// Host driver.
    pub host_driver: String,
    /// VFs carrying it.
    pub total: usize,
    /// Of which free.
    pub free: usize,
}

/// A VF with its allocation, borrowed from the pool.
#[derive(Serialize)]
struct InventoryVfRef<'a> {
    #[serde(flatten)]
    vf: &'a PoolVf,
    vm: Option<&'a str>,
    local_index: Option<LocalIndex>,
    state: Option<&'static str>,
}

struct VfsRef<'a>(&'a State);

impl Serialize for VfsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.pool.vfs().map(|vf| Engine::inventory_vf(self.0, vf)))
    }
}

#[derive(Serialize)]
struct InventoryRef<'a> {
    functions: &'a [InventoryFunction],
    vfs: VfsRef<'a>,
}

/// The inventory with allocation state.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryView {
    /// Functions.
    pub functions: Vec<InventoryFunction>,
    /// VFs by global index.
    pub vfs: Vec<InventoryVf>,
}

impl Engine {
    /// A VM with its correspondence table.
    pub fn vm_view(&self, name: &str) -> Result<VmView, EngineError> {
        let state = self.lock();
        let spec = state
            .pool
            .vm(name)
            .cloned()
            .ok_or_else(|| PoolError::UnknownVm(name.to_owned()))?;
        let correspondence = state
            .pool
            .assignments_of(&spec.name)
            .map(|a| {
                let vf = state.pool.vf(a.global_index);
                let description = self
                    .functions
                    .iter()
                    .find(|f| f.name == a.function)
                    .map(|f| f.description.clone())
                    .unwrap_or_default();
                CorrespondenceRow {
                    local_index: a.local_index,
                    slot: spec
                        .slots
                        .get(a.local_index.slot())
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    function: a.function.to_string(),
                    description,
                    guest_driver: vf
                        .and_then(|v| v.guest_driver.as_ref())
                        .map(ToString::to_string),
                    global_index: a.global_index,
                    host_vf: a.location.to_string(),
                    state: a.state.as_str(),
                    detail: state
                        .details
                        .get(&a.global_index)
                        .cloned()
                        .unwrap_or_default(),
                    cleanup: state.cleanups.get(&a.global_index).cloned(),
                }
            })
            .collect();
        let failures = state
            .failures
            .iter()
            .filter(|f| f.vm == name)
            .rev()
            .take(20)
            .cloned()
            .collect();
        Ok(VmView {
            spec,
            correspondence,
            failures,
        })
    }

    /// Every VM's view.
    pub fn vm_views(&self) -> Vec<VmView> {
        let names: Vec<String> = self.lock().pool.vms().map(|v| v.name.to_string()).collect();
        names.iter().filter_map(|n| self.vm_view(n).ok()).collect()
    }

    fn function_counts(&self, state: &State) -> Vec<InventoryFunction> {
        self.functions
            .iter()
            .map(|f| InventoryFunction {
                name: f.name.to_string(),
                description: f.description.clone(),
                guest_driver: f.guest_driver.to_string(),
                host_driver: f.host_driver.to_string(),
                total: state
                    .pool
                    .vfs()
                    .filter(|v| v.function.as_ref() == Some(&f.name))
                    .count(),
                free: state.pool.free_count(f.name.as_str()),
            })
            .collect()
    }

    fn inventory_vf<'a>(state: &'a State, vf: &'a PoolVf) -> InventoryVfRef<'a> {
        let a = state.pool.assignment(vf.global_index);
        InventoryVfRef {
            vf,
            vm: a.map(|a| a.vm.as_str()),
            local_index: a.map(|a| a.local_index),
            state: a.map(|a| a.state.as_str()),
        }
    }

    /// The inventory with allocation state (owned; for tests and small pools).
    pub fn inventory(&self) -> InventoryView {
        let state = self.lock();
        InventoryView {
            functions: self.function_counts(&state),
            vfs: state
                .pool
                .vfs()
                .map(|vf| {
                    let r = Self::inventory_vf(&state, vf);
                    InventoryVf {
                        vf: vf.clone(),
                        vm: r.vm.map(str::to_owned),
                        local_index: r.local_index,
                        state: r.state,
                    }
                })
                .collect(),
        }
    }

    /// The inventory as JSON, serialised straight from the pool: no copy of 65,536 VFs.
    pub fn inventory_json(&self) -> Vec<u8> {
        let state = self.lock();
        let functions = self.function_counts(&state);
        let vfs = VfsRef(&state);
        serde_json::to_vec(&InventoryRef {
            functions: &functions,
            vfs,
        })
        .unwrap_or_default()
    }

    /// Checks the pool's invariants (health endpoint, tests).
    pub fn check(&self) -> Result<(), String> {
        self.lock().pool.check_invariants()
    }
}
