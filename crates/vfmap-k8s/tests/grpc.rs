//! The plugin's gRPC side end to end, in process, over real unix sockets: the DevicePlugin
//! service with a tonic client, and the supervisor against a fake kubelet (Registration and
//! PodResources servers) — both over the pool test double.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::mem_pool::MemPool;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use vfmap_core::FunctionName;
use vfmap_k8s::api::deviceplugin as dp;
use vfmap_k8s::api::deviceplugin::device_plugin_client::DevicePluginClient;
use vfmap_k8s::api::deviceplugin::registration_server::{Registration, RegistrationServer};
use vfmap_k8s::api::podresources as pr;
use vfmap_k8s::api::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use vfmap_k8s::kubelet::{Config, connect, reconcile_once, run};
use vfmap_k8s::model::{ContainerRef, HEALTHY, Holder, UNHEALTHY};
use vfmap_k8s::server::{FunctionPlugin, bind, serve};

fn pool() -> Arc<MemPool> {
    MemPool::new(&[
        ("0000:01:00.1", "0000:01:00.0", "crypto", Some(0), 11),
        ("0000:01:00.2", "0000:01:00.0", "crypto", Some(0), 12),
        ("0000:02:00.1", "0000:02:00.0", "crypto", Some(0), 13),
        ("0000:01:00.3", "0000:01:00.0", "compress", Some(0), 14),
    ])
}

async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..200 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn device_plugin_service_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vfmap-crypto.sock");
    let pool = pool();
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let plugin = FunctionPlugin::new(
        FunctionName::new("crypto").unwrap(),
        "vfmap.io/crypto".into(),
        pool.clone(),
    )
    .with_stop(stop_rx.clone());
    let listener = bind(&socket).unwrap();
    let server = tokio::spawn(serve(plugin, listener, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    let mut client = DevicePluginClient::new(connect(&socket).await.unwrap());

    let options = client
        .get_device_plugin_options(dp::Empty {})
        .await
        .unwrap();
    assert!(options.get_ref().get_preferred_allocation_available);
    assert!(!options.get_ref().pre_start_required);

    // ListAndWatch: the three crypto VFs, healthy, with their NUMA node.
    let mut stream = client
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let ids: Vec<(&str, &str)> = first
        .devices
        .iter()
        .map(|d| (d.id.as_str(), d.health.as_str()))
        .collect();
    assert_eq!(
        ids,
        [
            ("0000:01:00.1", HEALTHY),
            ("0000:01:00.2", HEALTHY),
            ("0000:02:00.1", HEALTHY)
        ]
    );
    assert_eq!(first.devices[0].topology.as_ref().unwrap().nodes[0].id, 0);

    // A VM takes one through vfmap's API: the stream says it is unhealthy now.
    pool.set_holder("0000:01:00.2", Holder::Vm("web-1".into()));
    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(second.devices[1].id, "0000:01:00.2");
    assert_eq!(second.devices[1].health, UNHEALTHY);

    // Preferred: the pool's policy over what the kubelet offers.
    let preferred = client
        .get_preferred_allocation(dp::PreferredAllocationRequest {
            container_requests: vec![dp::ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["0000:01:00.1".into(), "0000:02:00.1".into()],
                must_include_device_i_ds: vec![],
                allocation_size: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        preferred.container_responses[0].device_i_ds,
        ["0000:01:00.1"]
    );

    // Allocate: reserved in the pool, answered with VFIO nodes and the environment.
    let response = client
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["0000:02:00.1".into(), "0000:01:00.1".into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let c = &response.container_responses[0];
    assert_eq!(
        c.envs["PCI_RESOURCE_VFMAP_IO_CRYPTO"],
        "0000:02:00.1,0000:01:00.1"
    );
    assert_eq!(c.envs["VFMAP_FUNCTION_CRYPTO"], "0000:02:00.1,0000:01:00.1");
    let nodes: Vec<&str> = c.devices.iter().map(|d| d.host_path.as_str()).collect();
    assert_eq!(nodes, ["/dev/vfio/vfio", "/dev/vfio/11", "/dev/vfio/13"]);
    assert!(matches!(
        pool.holder("0000:02:00.1"),
        Holder::Kubelet { owner: None, .. }
    ));

    // The VM's VF is refused, and nothing else is taken with it.
    let refused = client
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["0000:01:00.2".into()],
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("held by VM web-1"),
        "{}",
        refused.message()
    );
    // A compress VF is not this plugin's.
    let wrong = client
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["0000:01:00.3".into()],
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
    assert_eq!(pool.holder("0000:01:00.3"), Holder::Free);

    client
        .pre_start_container(dp::PreStartContainerRequest {
            devices_ids: vec![],
        })
        .await
        .unwrap();
    // Stopping ends the open ListAndWatch stream, so the graceful shutdown completes.
    stop_tx.send(true).unwrap();
    assert!(stream.message().await.unwrap().is_none());
    drop(client);
    server.await.unwrap().unwrap();
}

/// A fake kubelet: records registrations, answers PodResources with what the test sets.
#[derive(Clone, Default)]
struct FakeKubelet {
    registrations: Arc<Mutex<Vec<(String, String)>>>,
    pods: Arc<Mutex<pr::ListPodResourcesResponse>>,
}

#[tonic::async_trait]
impl Registration for FakeKubelet {
    async fn register(
        &self,
        request: Request<dp::RegisterRequest>,
    ) -> Result<Response<dp::Empty>, Status> {
        let r = request.into_inner();
        assert_eq!(r.version, "v1beta1");
        assert!(r.options.unwrap().get_preferred_allocation_available);
        self.registrations
            .lock()
            .unwrap()
            .push((r.resource_name, r.endpoint));
        Ok(Response::new(dp::Empty {}))
    }
}

#[tonic::async_trait]
impl PodResourcesLister for FakeKubelet {
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

fn start_fake(
    fake: &FakeKubelet,
    path: &std::path::Path,
    registration: bool,
) -> watch::Sender<bool> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).unwrap();
    let (tx, mut rx) = watch::channel(false);
    let mut builder = tonic::transport::Server::builder();
    let router = if registration {
        builder.add_service(RegistrationServer::new(fake.clone()))
    } else {
        builder.add_service(PodResourcesListerServer::new(fake.clone()))
    };
    tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
    });
    tx
}

fn pod(name: &str, resource: &str, ids: &[&str]) -> pr::PodResources {
    pr::PodResources {
        name: name.into(),
        namespace: "default".into(),
        containers: vec![pr::ContainerResources {
            name: "app".into(),
            devices: vec![pr::ContainerDevices {
                resource_name: resource.into(),
                device_ids: ids.iter().map(|s| s.to_string()).collect(),
                topology: None,
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test]
async fn supervisor_registers_reconciles_and_survives_a_kubelet_restart() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("device-plugins");
    std::fs::create_dir(&plugins).unwrap();
    let kubelet_sock = plugins.join("kubelet.sock");
    let pod_resources = dir.path().join("pod-resources.sock");
    let fake = FakeKubelet::default();
    let kubelet_stop = start_fake(&fake, &kubelet_sock, true);
    let _pr_stop = start_fake(&fake, &pod_resources, false);

    let pool = pool();
    let config = Config {
        prefix: "vfmap.io".into(),
        device_plugin_dir: plugins.clone(),
        pod_resources_socket: pod_resources.clone(),
        poll: Duration::from_millis(50),
        reconcile_every: Duration::from_millis(100),
        grace: Duration::from_millis(300),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let supervisor = tokio::spawn(run(pool.clone(), config, shutdown_rx));

    let registered = |n: usize| {
        let fake = fake.clone();
        move || fake.registrations.lock().unwrap().len() >= n
    };
    eventually("two registrations", registered(2)).await;
    let mut regs = fake.registrations.lock().unwrap().clone();
    regs.sort();
    assert_eq!(
        regs,
        [
            (
                "vfmap.io/compress".to_string(),
                "vfmap-compress.sock".to_string()
            ),
            (
                "vfmap.io/crypto".to_string(),
                "vfmap-crypto.sock".to_string()
            ),
        ]
    );

    // The kubelet allocates through the registered endpoint, and lists the pod.
    let mut client =
        DevicePluginClient::new(connect(&plugins.join("vfmap-crypto.sock")).await.unwrap());
    client
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["0000:01:00.1".into()],
            }],
        })
        .await
        .unwrap();
    fake.pods.lock().unwrap().pod_resources = vec![pod("p1", "vfmap.io/crypto", &["0000:01:00.1"])];
    let owner = ContainerRef {
        namespace: "default".into(),
        pod: "p1".into(),
        container: "app".into(),
    };
    eventually("the owner recorded", || {
        pool.holder("0000:01:00.1")
            == Holder::Kubelet {
                owner: Some(owner.clone()),
                allocated_at_ms: match pool.holder("0000:01:00.1") {
                    Holder::Kubelet {
                        allocated_at_ms, ..
                    } => allocated_at_ms,
                    _ => 0,
                },
            }
    })
    .await;

    // The kubelet restarts: its socket is recreated and the plugins' sockets deleted. The
    // plugin registers again; the allocation stays.
    kubelet_stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for name in ["vfmap-crypto.sock", "vfmap-compress.sock"] {
        let _ = std::fs::remove_file(plugins.join(name));
    }
    let _kubelet_stop = start_fake(&fake, &kubelet_sock, true);
    eventually("re-registration", registered(4)).await;
    assert!(matches!(
        pool.holder("0000:01:00.1"),
        Holder::Kubelet { owner: Some(_), .. }
    ));
    eventually("the endpoint back", || {
        plugins.join("vfmap-crypto.sock").exists()
    })
    .await;

    // The pod goes away: after the grace period the VF is released.
    fake.pods.lock().unwrap().pod_resources.clear();
    eventually("the release", || {
        pool.holder("0000:01:00.1") == Holder::Free
    })
    .await;
    assert!(
        pool.calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c == "release 0000:01:00.1")
    );

    shutdown_tx.send(true).unwrap();
    supervisor.await.unwrap().unwrap();
    assert!(!plugins.join("vfmap-crypto.sock").exists());
}

/// Found by the real kubelet (scripts/k8s/nested-kubelet.sh): a kubelet restarted after being
/// down for longer than the grace period answers PodResources before it has re-admitted its
/// pods, without their devices; the supervisor may not have seen its new registration socket
/// yet, so the kubelet's start it knows is the old one. The VF of a running pod must not be
/// released then: the grace counts from the PodResources socket's creation too.
#[tokio::test]
async fn a_kubelet_back_from_a_long_restart_gets_the_grace_period_before_any_release() {
    let dir = tempfile::tempdir().unwrap();
    let pod_resources = dir.path().join("pod-resources.sock");
    let pool = pool();
    pool.set_holder(
        "0000:01:00.1",
        Holder::Kubelet {
            owner: Some(ContainerRef {
                namespace: "default".into(),
                pod: "p1".into(),
                container: "app".into(),
            }),
            allocated_at_ms: 1,
        },
    );
    // The new kubelet, just started, lists no pod yet.
    let fake = FakeKubelet::default();
    let _stop = start_fake(&fake, &pod_resources, false);
    let config = Config {
        prefix: "vfmap.io".into(),
        device_plugin_dir: dir.path().into(),
        pod_resources_socket: pod_resources,
        poll: Duration::from_millis(50),
        reconcile_every: Duration::from_millis(100),
        grace: Duration::from_secs(30),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Last listed a minute ago, by the kubelet that started two minutes ago (as the caller
    // knows it); every List since failed.
    let mut last_listed = std::collections::BTreeMap::new();
    last_listed.insert("0000:01:00.1".parse().unwrap(), now - 60_000);
    reconcile_once(pool.as_ref(), &config, now - 120_000, &mut last_listed).await;
    assert!(
        matches!(
            pool.holder("0000:01:00.1"),
            Holder::Kubelet { owner: Some(_), .. }
        ),
        "{:?}",
        pool.calls.lock().unwrap()
    );
    assert!(
        !pool
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("release")),
        "{:?}",
        pool.calls.lock().unwrap()
    );
}
