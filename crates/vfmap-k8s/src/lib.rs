//! Kubernetes device plugin pieces for vfmap: every vfmap host a node whose scheduler sees one
//! resource per function (`vfmap.io/<function>`).
//!
//! - [`api`]: the kubelet's device plugin `v1beta1` and PodResources `v1` gRPC APIs, generated
//!   from the vendored upstream `.proto` files (`proto/`, see `proto/NOTICE`);
//! - pure decisions, no I/O: device lists and health ([`model`]), preferred allocation by the
//!   pool's own policy ([`prefer`]), the Allocate response ([`allocate`]), and release by
//!   reconciliation with PodResources ([`reconcile`]);
//! - [`pool::VfPool`]: the boundary the daemon implements, so the daemon's state stays the one
//!   owner of every VF;
//! - [`server`]: the DevicePlugin service of one function over a [`pool::VfPool`];
//! - [`kubelet`]: registration, PodResources, and the supervisor that re-registers after a
//!   kubelet restart and reconciles.
//!
//! docs/kubernetes.md describes the design and the real-kubelet rig.

pub mod allocate;
pub mod kubelet;
pub mod model;
pub mod pool;
pub mod prefer;
pub mod reconcile;
pub mod server;

/// The generated gRPC code.
#[allow(missing_docs, clippy::all)]
pub mod api {
    /// Device plugin API `v1beta1` (`k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1`).
    pub mod deviceplugin {
        tonic::include_proto!("v1beta1");
    }
    /// PodResources API `v1` (`k8s.io/kubelet/pkg/apis/podresources/v1`).
    pub mod podresources {
        tonic::include_proto!("v1");
    }
}
