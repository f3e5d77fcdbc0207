//! The DevicePlugin gRPC service of one function (one resource), over a [`VfPool`], and serving
//! it on a unix socket.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};
use vfmap_core::FunctionName;

use crate::allocate::{AllocateError, check_request, container_response};
use crate::api::deviceplugin as dp;
use crate::api::deviceplugin::device_plugin_server::{DevicePlugin, DevicePluginServer};
use crate::model::devices_of;
use crate::pool::VfPool;
use crate::prefer::preferred;

/// The plugin of one function: resource `<prefix>/<function>`.
pub struct FunctionPlugin<P> {
    function: FunctionName,
    resource: String,
    pool: Arc<P>,
    stop: Option<watch::Receiver<bool>>,
}

impl<P: VfPool> FunctionPlugin<P> {
    /// The plugin of `function`, published as `resource` (see [`crate::model::resource_name`]).
    pub fn new(function: FunctionName, resource: String, pool: Arc<P>) -> FunctionPlugin<P> {
        FunctionPlugin {
            function,
            resource,
            pool,
            stop: None,
        }
    }

    /// Ends every ListAndWatch stream when `stop` turns true: a graceful server shutdown waits
    /// for open streams, and the kubelet keeps its ListAndWatch open.
    pub fn with_stop(mut self, stop: watch::Receiver<bool>) -> FunctionPlugin<P> {
        self.stop = Some(stop);
        self
    }
}

/// The options the plugin registers with: GetPreferredAllocation yes, PreStartContainer not
/// needed (Allocate binds vfio-pci already).
pub fn plugin_options() -> dp::DevicePluginOptions {
    dp::DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// The stream ListAndWatch answers with.
pub type DeviceStream =
    Pin<Box<dyn Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<P: VfPool> DevicePlugin for FunctionPlugin<P> {
    async fn get_device_plugin_options(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(plugin_options()))
    }

    type ListAndWatchStream = DeviceStream;

    /// The function's devices now, then again each time they change (a change of the view
    /// that leaves this function's list as it was sends nothing).
    async fn list_and_watch(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let mut view = self.pool.view();
        let function = self.function.clone();
        let (tx, rx) = mpsc::channel(4);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let devices = devices_of(&view.borrow_and_update(), &function);
                if last.as_ref() != Some(&devices) {
                    let message = dp::ListAndWatchResponse {
                        devices: devices.clone(),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                    last = Some(devices);
                }
                let stopped = async {
                    match stop.as_mut() {
                        Some(stop) => {
                            let _ = stop.wait_for(|s| *s).await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = view.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    () = stopped => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let view = self.pool.view().borrow().clone();
        let container_responses = request
            .into_inner()
            .container_requests
            .iter()
            .map(|c| dp::ContainerPreferredAllocationResponse {
                device_i_ds: preferred(
                    &view,
                    &self.function,
                    &c.available_device_i_ds,
                    &c.must_include_device_i_ds,
                    usize::try_from(c.allocation_size).unwrap_or(0),
                ),
            })
            .collect();
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses,
        }))
    }

    /// Checks each container's ids against the view, has the pool reserve them (durably,
    /// bound to vfio-pci), and answers with the VFIO nodes and environment. A failure leaves
    /// earlier containers of the same request reserved: the kubelet then fails the pod, and
    /// reconciliation releases them once PodResources has not listed them for the grace
    /// period.
    async fn allocate(
        &self,
        request: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let mut container_responses = Vec::new();
        for c in request.into_inner().container_requests {
            let view = self.pool.view().borrow().clone();
            let locations =
                check_request(&view, &self.function, &c.devices_ids).map_err(|e| match e {
                    AllocateError::Unavailable { .. } => Status::failed_precondition(e.to_string()),
                    _ => Status::invalid_argument(e.to_string()),
                })?;
            let allocated = self
                .pool
                .reserve(&self.function, &locations)
                .await
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            tracing::info!(resource = %self.resource, devices = ?c.devices_ids, "allocated");
            container_responses.push(container_response(
                &self.resource,
                &self.function,
                &allocated,
            ));
        }
        Ok(Response::new(dp::AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

/// Why serving an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the socket.
    #[error("listening on {path}")]
    Bind {
        /// The socket path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server.
    #[error("serving the device plugin")]
    Serve(#[source] tonic::transport::Error),
}

/// Binds `socket` (a stale file there is removed first), for [`serve`].
pub fn bind(socket: &Path) -> Result<UnixListener, ServeError> {
    let bind_error = |source| ServeError::Bind {
        path: socket.display().to_string(),
        source,
    };
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    UnixListener::bind(socket).map_err(bind_error)
}

/// Serves `plugin` on `listener` until `shutdown` completes.
pub async fn serve<P: VfPool>(
    plugin: FunctionPlugin<P>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    tonic::transport::Server::builder()
        .add_service(DevicePluginServer::new(plugin))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Serve)
}
