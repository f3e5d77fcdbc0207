//! The kubelet's side: connecting to its unix sockets, registering with it, listing
//! PodResources, and the supervisor that keeps the plugin registered across kubelet restarts
//! and reconciles.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};
use vfmap_core::FunctionName;

use crate::api::deviceplugin as dp;
use crate::api::deviceplugin::registration_client::RegistrationClient;
use crate::api::podresources as pr;
use crate::api::podresources::pod_resources_lister_client::PodResourcesListerClient;
use crate::model::{API_VERSION, endpoint_name, functions_of, resource_name};
use crate::pool::VfPool;
use crate::reconcile::{Decision, Timing, decide, listed};
use crate::server::{FunctionPlugin, ServeError, bind, plugin_options, serve};

/// Why a call to the kubelet failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// Connecting to its socket.
    #[error("connecting to {path}")]
    Connect {
        /// The socket.
        path: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The call itself.
    #[error("{call} on {path}")]
    Call {
        /// Which call.
        call: &'static str,
        /// The socket.
        path: String,
        /// The kubelet's status.
        #[source]
        source: tonic::Status,
    },
}

/// A gRPC channel over the unix socket `path` (connected once, now).
pub async fn connect(path: &Path) -> Result<Channel, KubeletError> {
    let socket = path.to_path_buf();
    // The URI is required by the API and unused: every connection goes to the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| KubeletError::Connect {
            path: path.display().to_string(),
            source,
        })
}

/// Registers one resource served on `endpoint` (a socket file name in the kubelet's device
/// plugin directory).
pub async fn register(
    kubelet_socket: &Path,
    endpoint: &str,
    resource: &str,
) -> Result<(), KubeletError> {
    let mut client = RegistrationClient::new(connect(kubelet_socket).await?);
    client
        .register(dp::RegisterRequest {
            version: API_VERSION.to_owned(),
            endpoint: endpoint.to_owned(),
            resource_name: resource.to_owned(),
            options: Some(plugin_options()),
        })
        .await
        .map_err(|source| KubeletError::Call {
            call: "Register",
            path: kubelet_socket.display().to_string(),
            source,
        })?;
    Ok(())
}

/// PodResources `List`.
pub async fn list_pod_resources(
    socket: &Path,
) -> Result<pr::ListPodResourcesResponse, KubeletError> {
    let mut client = PodResourcesListerClient::new(connect(socket).await?);
    client
        .list(pr::ListPodResourcesRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|source| KubeletError::Call {
            call: "List",
            path: socket.display().to_string(),
            source,
        })
}

/// PodResources `GetAllocatableResources`: what the kubelet counts as allocatable, per
/// resource (its capacity as a standalone kubelet reports it).
pub async fn allocatable_resources(
    socket: &Path,
) -> Result<pr::AllocatableResourcesResponse, KubeletError> {
    let mut client = PodResourcesListerClient::new(connect(socket).await?);
    client
        .get_allocatable_resources(pr::AllocatableResourcesRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|source| KubeletError::Call {
            call: "GetAllocatableResources",
            path: socket.display().to_string(),
            source,
        })
}

/// Where the kubelet is and how the plugin behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Resource prefix: resources are `<prefix>/<function>`.
    pub prefix: String,
    /// The kubelet's device plugin directory (`/var/lib/kubelet/device-plugins`): its
    /// `kubelet.sock` and the plugin's sockets.
    pub device_plugin_dir: PathBuf,
    /// The kubelet's PodResources socket (`/var/lib/kubelet/pod-resources/kubelet.sock`).
    pub pod_resources_socket: PathBuf,
    /// How often the kubelet's socket is checked for a restart.
    pub poll: Duration,
    /// How often to reconcile with PodResources.
    pub reconcile_every: Duration,
    /// How long an allocation may stay unlisted (see [`Timing::grace_ms`]).
    pub grace: Duration,
}

impl Config {
    /// The kubelet's standard paths, prefix `vfmap.io`, 1 s poll, 10 s reconcile, 30 s grace.
    pub fn standard() -> Config {
        Config {
            prefix: crate::model::DEFAULT_PREFIX.to_owned(),
            device_plugin_dir: PathBuf::from("/var/lib/kubelet/device-plugins"),
            pod_resources_socket: PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock"),
            poll: Duration::from_secs(1),
            reconcile_every: Duration::from_secs(10),
            grace: Duration::from_secs(30),
        }
    }
}

/// A socket file's identity: it changes when the kubelet recreates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketId {
    dev: u64,
    ino: u64,
    ctime_ms: u64,
}

fn socket_id(path: &Path) -> Option<SocketId> {
    let m = std::fs::metadata(path).ok()?;
    let ctime_ms =
        u64::try_from(m.ctime()).ok()? * 1000 + u64::try_from(m.ctime_nsec()).ok()? / 1_000_000;
    Some(SocketId {
        dev: m.dev(),
        ino: m.ino(),
        ctime_ms,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs the plugin until `shutdown` turns true: one endpoint per function of the pool's view
/// (functions whose name is not a valid resource name are skipped with a warning), registered
/// with the kubelet; when the kubelet's socket is recreated (a kubelet restart, which also
/// deletes the plugins' sockets) or a plugin socket disappears, the endpoints are started
/// again and registered again. Reconciliation with PodResources runs every
/// `reconcile_every` and after each registration.
pub async fn run<P: VfPool>(
    pool: Arc<P>,
    config: Config,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let kubelet_socket = config.device_plugin_dir.join("kubelet.sock");
    let mut resources: BTreeMap<FunctionName, String> = BTreeMap::new();
    for function in functions_of(&pool.view().borrow()) {
        match resource_name(&config.prefix, &function) {
            Ok(r) => {
                resources.insert(function, r);
            }
            Err(e) => tracing::warn!("not published: {e}"),
        }
    }
    let mut kubelet: Option<SocketId> = None;
    let mut last_listed = BTreeMap::new();
    let mut reconcile = tokio::time::interval(config.reconcile_every);
    loop {
        // Wait for the kubelet's socket.
        let id = loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            if let Some(id) = socket_id(&kubelet_socket) {
                break id;
            }
            tokio::select! {
                () = tokio::time::sleep(config.poll) => {}
                _ = shutdown.changed() => {}
            }
        };
        if kubelet.is_some() {
            tracing::info!("the kubelet's socket was recreated: starting the endpoints again");
        }
        kubelet = Some(id);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut endpoints = Vec::new();
        for (function, resource) in &resources {
            let name = endpoint_name(function);
            let path = config.device_plugin_dir.join(&name);
            let listener = bind(&path)?;
            let plugin = FunctionPlugin::new(function.clone(), resource.clone(), pool.clone())
                .with_stop(stop_rx.clone());
            let mut stop = stop_rx.clone();
            let task = tokio::spawn(serve(plugin, listener, async move {
                let _ = stop.wait_for(|s| *s).await;
            }));
            endpoints.push((name, path, resource.clone(), task));
        }
        for (name, _, resource, _) in &endpoints {
            match register(&kubelet_socket, name, resource).await {
                Ok(()) => {
                    tracing::info!(%resource, endpoint = %name, "registered with the kubelet")
                }
                Err(e) => tracing::warn!(%resource, "registration failed: {}", chain(&e)),
            }
        }
        reconcile.reset_immediately();
        // Watch for a kubelet restart, a lost endpoint, the reconcile tick, or shutdown.
        loop {
            tokio::select! {
                () = tokio::time::sleep(config.poll) => {}
                _ = reconcile.tick() => {
                    reconcile_once(pool.as_ref(), &config, id.ctime_ms, &mut last_listed).await;
                }
                _ = shutdown.changed() => {}
            }
            let restarted = socket_id(&kubelet_socket) != Some(id);
            let lost = endpoints
                .iter()
                .any(|(_, path, _, task)| task.is_finished() || !path.exists());
            if *shutdown.borrow() || restarted || lost {
                break;
            }
        }
        let _ = stop_tx.send(true);
        for (_, path, _, task) in endpoints {
            // Streams end on the stop signal; a connection that still hangs is cut.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
            let _ = std::fs::remove_file(path);
        }
        if *shutdown.borrow() {
            return Ok(());
        }
    }
}

/// One reconciliation: list PodResources, decide, carry the decisions out through the pool.
/// A failed list decides nothing. `kubelet_since_ms` is when the kubelet last (re)started as
/// the caller knows it; the PodResources socket's creation is taken if later.
/// `last_listed` is updated with the devices this `List` names.
pub async fn reconcile_once<P: VfPool>(
    pool: &P,
    config: &Config,
    kubelet_since_ms: u64,
    last_listed: &mut BTreeMap<vfmap_core::Bdf, u64>,
) {
    let response = match list_pod_resources(&config.pod_resources_socket).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("reconcile skipped: {}", chain(&e));
            return;
        }
    };
    // The kubelet that answered may be a new one that the supervisor has not seen yet (its
    // registration socket is polled apart): a restarted kubelet serves PodResources before it
    // has re-admitted its pods, and answers without their devices for a while. Its grace
    // counts from its own PodResources socket, whose creation is its start; otherwise a
    // kubelet down for longer than the grace (while every `List` failed) would have its
    // running pods' VFs released at its first answer.
    let kubelet_since_ms = socket_id(&config.pod_resources_socket)
        .map_or(kubelet_since_ms, |s| s.ctime_ms.max(kubelet_since_ms));
    let view = pool.view().borrow().clone();
    let timing = Timing {
        now_ms: now_ms(),
        kubelet_since_ms,
        grace_ms: u64::try_from(config.grace.as_millis()).unwrap_or(u64::MAX),
    };
    let listed = listed(&response, &config.prefix);
    for id in listed.devices.keys() {
        if let Ok(location) = id.parse() {
            last_listed.insert(location, timing.now_ms);
        }
    }
    for decision in decide(&view, &config.prefix, &listed, last_listed, timing) {
        let result = match &decision {
            Decision::Identify { location, owner } => pool.identify(*location, owner).await,
            Decision::Adopt { location, owner } => pool.adopt(*location, owner).await,
            Decision::Release { location, .. } => pool.release(*location).await,
            Decision::Conflict { .. } => Ok(()),
        };
        match result {
            Ok(()) => tracing::info!(?decision, "reconciled"),
            Err(e) => tracing::warn!(?decision, "reconcile step refused: {e}"),
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
