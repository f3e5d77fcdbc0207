//! A fake kubelet for tests of the real daemon binary: the Registration service on
//! `<device plugin dir>/kubelet.sock`, PodResources on its own socket answering with the pods
//! the test sets, and a client for the plugin's endpoints (ListAndWatch, Allocate). It runs on
//! a thread with its own tokio runtime, so synchronous tests (which drive `vfmap` processes)
//! can use it. Not a kubelet: no checkpoint, no admission; the test plays those.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use vfmap_k8s::api::deviceplugin as dp;
use vfmap_k8s::api::deviceplugin::device_plugin_client::DevicePluginClient;
use vfmap_k8s::api::deviceplugin::registration_server::{Registration, RegistrationServer};
use vfmap_k8s::api::podresources as pr;
use vfmap_k8s::api::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use vfmap_k8s::kubelet::connect;

#[derive(Clone, Default)]
struct Shared {
    registrations: Arc<Mutex<Vec<(String, String)>>>,
    pods: Arc<Mutex<pr::ListPodResourcesResponse>>,
}

#[tonic::async_trait]
impl Registration for Shared {
    async fn register(
        &self,
        request: Request<dp::RegisterRequest>,
    ) -> Result<Response<dp::Empty>, Status> {
        let r = request.into_inner();
        if r.version != "v1beta1" {
            return Err(Status::invalid_argument("unsupported version"));
        }
        self.registrations
            .lock()
            .unwrap()
            .push((r.resource_name, r.endpoint));
        Ok(Response::new(dp::Empty {}))
    }
}

#[tonic::async_trait]
impl PodResourcesLister for Shared {
    async fn list(
        &self,
        _: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        Ok(Response::new(self.pods.lock().unwrap().clone()))
    }
    async fn get_allocatable_resources(
        &self,
        _: Request<pr::AllocatableResourcesRequest>,
    ) -> Result<Response<pr::AllocatableResourcesResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    async fn get(
        &self,
        _: Request<pr::GetPodResourcesRequest>,
    ) -> Result<Response<pr::GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

/// What an Allocate gave one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    /// The environment variables.
    pub envs: BTreeMap<String, String>,
    /// The device nodes' container paths (`/dev/vfio/vfio`, `/dev/vfio/<group>`).
    pub devices: Vec<String>,
}

/// The fake kubelet; stops (and removes its sockets) on drop.
pub struct FakeKubelet {
    shared: Shared,
    plugin_dir: PathBuf,
    pod_resources: PathBuf,
    runtime: tokio::runtime::Runtime,
    registration_stop: Option<watch::Sender<bool>>,
    pod_resources_stop: watch::Sender<bool>,
}

fn serve_on(
    runtime: &tokio::runtime::Runtime,
    shared: &Shared,
    path: &Path,
    registration: bool,
) -> watch::Sender<bool> {
    let _ = std::fs::remove_file(path);
    let listener = runtime
        .block_on(async { UnixListener::bind(path) })
        .unwrap();
    let (tx, mut rx) = watch::channel(false);
    let mut builder = tonic::transport::Server::builder();
    let router = if registration {
        builder.add_service(RegistrationServer::new(shared.clone()))
    } else {
        builder.add_service(PodResourcesListerServer::new(shared.clone()))
    };
    runtime.spawn(async move {
        let _ = router
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
    });
    tx
}

impl FakeKubelet {
    /// Serves `<plugin_dir>/kubelet.sock` (created with its directory) and `pod_resources`.
    pub fn start(plugin_dir: &Path, pod_resources: &Path) -> FakeKubelet {
        std::fs::create_dir_all(plugin_dir).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let shared = Shared::default();
        let registration_stop = serve_on(&runtime, &shared, &plugin_dir.join("kubelet.sock"), true);
        let pod_resources_stop = serve_on(&runtime, &shared, pod_resources, false);
        FakeKubelet {
            shared,
            plugin_dir: plugin_dir.to_owned(),
            pod_resources: pod_resources.to_owned(),
            runtime,
            registration_stop: Some(registration_stop),
            pod_resources_stop,
        }
    }

    /// Every registration so far, `(resource, endpoint)`, in order.
    pub fn registrations(&self) -> Vec<(String, String)> {
        self.shared.registrations.lock().unwrap().clone()
    }

    /// What PodResources lists from now on: `(namespace, pod, container, resource, ids)`.
    pub fn set_pods(&self, pods: &[(&str, &str, &str, &str, &[&str])]) {
        let pod_resources = pods
            .iter()
            .map(
                |(namespace, pod, container, resource, ids)| pr::PodResources {
                    name: (*pod).into(),
                    namespace: (*namespace).into(),
                    containers: vec![pr::ContainerResources {
                        name: (*container).into(),
                        devices: vec![pr::ContainerDevices {
                            resource_name: (*resource).into(),
                            device_ids: ids.iter().map(|s| s.to_string()).collect(),
                            topology: None,
                        }],
                        ..Default::default()
                    }],
                },
            )
            .collect();
        self.shared.pods.lock().unwrap().pod_resources = pod_resources;
    }

    /// A kubelet restart as the plugin sees it: `kubelet.sock` goes and comes back (a new
    /// file), and the plugins' sockets in the directory are deleted.
    pub fn restart(&mut self) {
        if let Some(stop) = self.registration_stop.take() {
            let _ = stop.send(true);
        }
        std::thread::sleep(Duration::from_millis(100));
        for entry in std::fs::read_dir(&self.plugin_dir).unwrap().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        self.registration_stop = Some(serve_on(
            &self.runtime,
            &self.shared,
            &self.plugin_dir.join("kubelet.sock"),
            true,
        ));
    }

    /// The first ListAndWatch answer of the plugin endpoint `endpoint` (a socket name in the
    /// directory): `(device id, health, NUMA nodes)` per device.
    pub fn list_devices(&self, endpoint: &str) -> Result<Vec<(String, String, Vec<i64>)>, String> {
        let path = self.plugin_dir.join(endpoint);
        self.runtime.block_on(async move {
            let channel = connect(&path).await.map_err(|e| e.to_string())?;
            let mut client = DevicePluginClient::new(channel);
            let mut stream = client
                .list_and_watch(dp::Empty {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .map_err(|_| "no ListAndWatch answer in 10 s".to_owned())?
                .map_err(|e| e.to_string())?
                .ok_or("the stream ended")?;
            Ok(first
                .devices
                .into_iter()
                .map(|d| {
                    let nodes = d
                        .topology
                        .map(|t| t.nodes.into_iter().map(|n| n.id).collect())
                        .unwrap_or_default();
                    (d.id, d.health, nodes)
                })
                .collect())
        })
    }

    /// Allocate through the plugin endpoint `endpoint`, one container asking for `ids`.
    /// `Err` carries the gRPC code and message.
    pub fn allocate(&self, endpoint: &str, ids: &[&str]) -> Result<Allocated, String> {
        let path = self.plugin_dir.join(endpoint);
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        self.runtime.block_on(async move {
            let channel = connect(&path).await.map_err(|e| e.to_string())?;
            let mut client = DevicePluginClient::new(channel);
            let response = client
                .allocate(dp::AllocateRequest {
                    container_requests: vec![dp::ContainerAllocateRequest { devices_ids: ids }],
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let container = response
                .container_responses
                .into_iter()
                .next()
                .ok_or("no container response")?;
            Ok(Allocated {
                envs: container.envs.into_iter().collect(),
                devices: container
                    .devices
                    .into_iter()
                    .map(|d| d.container_path)
                    .collect(),
            })
        })
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        if let Some(stop) = self.registration_stop.take() {
            let _ = stop.send(true);
        }
        let _ = self.pod_resources_stop.send(true);
        let _ = std::fs::remove_file(&self.pod_resources);
    }
}
