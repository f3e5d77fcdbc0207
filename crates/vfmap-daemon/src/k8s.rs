//! The Kubernetes device plugin inside `vfmap serve` (issue 12): `vfmap_k8s::kubelet::run`
//! over the engine. The engine stays the one owner of every VF: the kubelet is a holder in
//! its pool and database (see `engine/kubelet.rs`), this module only translates.
//!
//! On when the config has a `[kubernetes]` section; its fields are in README.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use vfmap_core::{Bdf, FunctionName, PodContainer};
use vfmap_k8s::allocate::AllocatedVf;
use vfmap_k8s::kubelet;
use vfmap_k8s::model::{ContainerRef, Holder, VfView};
use vfmap_k8s::pool::{PoolRefusal, VfPool};

use crate::effects::chain;
use crate::engine::{Engine, FunctionVf, VfHolder};

/// The `[kubernetes]` section: the device plugin, off when the section is absent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Resources are `<resource_prefix>/<function>` (default `vfmap.io`).
    #[serde(default = "default_prefix")]
    pub resource_prefix: String,
    /// The kubelet's device plugin directory: its `kubelet.sock`, and the plugin's sockets
    /// `vfmap-<function>.sock` (default `/var/lib/kubelet/device-plugins`).
    #[serde(default = "default_plugin_dir")]
    pub device_plugin_dir: PathBuf,
    /// The kubelet's PodResources socket (default
    /// `/var/lib/kubelet/pod-resources/kubelet.sock`).
    #[serde(default = "default_pod_resources")]
    pub pod_resources_socket: PathBuf,
    /// How often to reconcile with PodResources, in milliseconds (default 10,000; at least
    /// 100).
    #[serde(default = "default_reconcile")]
    pub reconcile_interval_ms: u64,
    /// How long a kubelet-held VF may go unlisted by PodResources before it is released, in
    /// milliseconds (default 30,000).
    #[serde(default = "default_grace")]
    pub release_grace_ms: u64,
}

fn default_prefix() -> String {
    vfmap_k8s::model::DEFAULT_PREFIX.to_owned()
}
fn default_plugin_dir() -> PathBuf {
    kubelet::Config::standard().device_plugin_dir
}
fn default_pod_resources() -> PathBuf {
    kubelet::Config::standard().pod_resources_socket
}
fn default_reconcile() -> u64 {
    10_000
}
fn default_grace() -> u64 {
    30_000
}

impl KubernetesConfig {
    /// Checks what the parser cannot: the prefix, absolute paths.
    pub fn check(&self) -> Result<(), String> {
        vfmap_k8s::model::check_prefix(&self.resource_prefix).map_err(|e| e.to_string())?;
        for (field, path) in [
            ("device_plugin_dir", &self.device_plugin_dir),
            ("pod_resources_socket", &self.pod_resources_socket),
        ] {
            if !path.is_absolute() {
                return Err(format!("[kubernetes] `{field}` must be an absolute path"));
            }
        }
        Ok(())
    }

    fn plugin_config(&self) -> kubelet::Config {
        kubelet::Config {
            prefix: self.resource_prefix.clone(),
            device_plugin_dir: self.device_plugin_dir.clone(),
            pod_resources_socket: self.pod_resources_socket.clone(),
            reconcile_every: Duration::from_millis(self.reconcile_interval_ms.max(100)),
            grace: Duration::from_millis(self.release_grace_ms),
            ..kubelet::Config::standard()
        }
    }
}

/// The engine as the device plugin's pool.
pub struct EnginePool {
    engine: Arc<Engine>,
    view: watch::Sender<Arc<Vec<VfView>>>,
}

fn view_of(vfs: Vec<FunctionVf>) -> Vec<VfView> {
    vfs.into_iter()
        .map(|vf| VfView {
            global_index: vf.global_index,
            location: vf.location,
            pf: vf.pf,
            function: vf.function,
            numa_node: vf.numa_node,
            holder: match vf.holder {
                VfHolder::Free => Holder::Free,
                VfHolder::Kubelet {
                    owner,
                    allocated_at_ms,
                } => Holder::Kubelet {
                    owner: owner.map(|o| ContainerRef {
                        namespace: o.namespace,
                        pod: o.pod,
                        container: o.container,
                    }),
                    allocated_at_ms,
                },
                VfHolder::Vm(vm) => Holder::Vm(vm.to_string()),
                VfHolder::Unusable => Holder::Failed,
            },
        })
        .collect()
}

fn owner_of(owner: &ContainerRef) -> Result<PodContainer, PoolRefusal> {
    PodContainer::new(&owner.namespace, &owner.pod, &owner.container).map_err(PoolRefusal)
}

fn refusal(e: crate::engine::EngineError) -> PoolRefusal {
    PoolRefusal(chain(&e))
}

impl EnginePool {
    /// The pool over `engine`, its view kept current by a task that follows the engine's
    /// changes.
    pub fn new(engine: Arc<Engine>) -> Arc<EnginePool> {
        let (view, _) = watch::channel(Arc::new(view_of(engine.function_vfs())));
        let pool = Arc::new(EnginePool { engine, view });
        let follower = pool.clone();
        tokio::spawn(async move {
            let mut changes = follower.engine.changes();
            while changes.changed().await.is_ok() {
                let next = view_of(follower.engine.function_vfs());
                follower.view.send_if_modified(|current| {
                    let modified = **current != next;
                    if modified {
                        *current = Arc::new(next);
                    }
                    modified
                });
            }
        });
        pool
    }
}

impl VfPool for EnginePool {
    fn view(&self) -> watch::Receiver<Arc<Vec<VfView>>> {
        self.view.subscribe()
    }

    async fn reserve(
        &self,
        function: &FunctionName,
        locations: &[Bdf],
    ) -> Result<Vec<AllocatedVf>, PoolRefusal> {
        let given = self
            .engine
            .kubelet_reserve(function, locations, None)
            .await
            .map_err(refusal)?;
        given
            .into_iter()
            .map(|vf| {
                let iommu_group = vf.iommu_group.ok_or_else(|| {
                    PoolRefusal(format!(
                        "VF {} has no IOMMU group: is the IOMMU on (intel_iommu=on / amd_iommu)?",
                        vf.location
                    ))
                })?;
                Ok(AllocatedVf {
                    location: vf.location,
                    iommu_group,
                })
            })
            .collect()
    }

    async fn identify(&self, location: Bdf, owner: &ContainerRef) -> Result<(), PoolRefusal> {
        self.engine
            .kubelet_identify(location, owner_of(owner)?)
            .await
            .map_err(refusal)
    }

    async fn adopt(&self, location: Bdf, owner: &ContainerRef) -> Result<(), PoolRefusal> {
        let function = self
            .engine
            .function_vfs()
            .into_iter()
            .find(|vf| vf.location == location)
            .map(|vf| vf.function)
            .ok_or_else(|| PoolRefusal(format!("no VF at {location} carries a function")))?;
        self.engine
            .kubelet_reserve(&function, &[location], Some(owner_of(owner)?))
            .await
            .map(|_| ())
            .map_err(refusal)
    }

    async fn release(&self, location: Bdf) -> Result<(), PoolRefusal> {
        self.engine.kubelet_release(location).await.map_err(refusal)
    }
}

/// Starts the device plugin, for the life of the process: one endpoint per function,
/// registered with the kubelet (waiting for its socket), re-registered after a kubelet
/// restart, reconciled with PodResources.
pub fn start(engine: &Arc<Engine>, config: &KubernetesConfig) {
    let pool = EnginePool::new(engine.clone());
    let plugin_config = config.plugin_config();
    tracing::info!(
        prefix = %plugin_config.prefix,
        dir = %plugin_config.device_plugin_dir.display(),
        "Kubernetes device plugin starting"
    );
    tokio::spawn(async move {
        // Never set: the plugin stops with the process (the kubelet sees its streams end).
        let (_stop, shutdown) = watch::channel(false);
        if let Err(e) = kubelet::run(pool, plugin_config, shutdown).await {
            tracing::error!(error = %chain(&e), "the Kubernetes device plugin stopped");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KubernetesConfig, String> {
        let config: KubernetesConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    #[test]
    fn defaults_and_checks() {
        let config = parse("").unwrap();
        assert_eq!(config.resource_prefix, "vfmap.io");
        assert_eq!(
            config.device_plugin_dir,
            PathBuf::from("/var/lib/kubelet/device-plugins")
        );
        assert_eq!(
            config.pod_resources_socket,
            PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock")
        );
        let plugin = config.plugin_config();
        assert_eq!(plugin.reconcile_every, Duration::from_secs(10));
        assert_eq!(plugin.grace, Duration::from_secs(30));
        assert!(parse("resource_prefix = \"example.com\"").is_ok());
        assert!(parse("resource_prefix = \"k8s.io\"").is_err());
        assert!(parse("resource_prefix = \"Bad\"").is_err());
        assert!(parse("device_plugin_dir = \"relative\"").is_err());
        assert!(parse("surprise = 1").is_err());
    }
}
