//! The boundary the daemon implements: the plugin never owns a VF. It reads the daemon's view
//! and asks the daemon to reserve, identify, adopt and release; the daemon's state (and its
//! database) stays the one allocation table, shared with the VMs registered through its API.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use vfmap_core::{Bdf, FunctionName};

use crate::allocate::AllocatedVf;
use crate::model::{ContainerRef, VfView};

/// The daemon's answer when it will not do what the plugin asks; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PoolRefusal(pub String);

/// The daemon's pool as the device plugin uses it.
pub trait VfPool: Send + Sync + 'static {
    /// Every VF that carries a function, with its holder; a new value whenever that changes
    /// (holders, health, VFs coming or going). ListAndWatch streams from it.
    fn view(&self) -> watch::Receiver<Arc<Vec<VfView>>>;

    /// Reserves `locations`, VFs of `function`, for the kubelet, all or nothing: records the
    /// assignment durably (holder: the kubelet, owner not yet known, allocation time now),
    /// binds each VF to vfio-pci, and returns each one's IOMMU group. VFs the kubelet already
    /// holds are accepted as they are (the kubelet may ask again after its own restart). A VF
    /// a VM holds, or that failed or is gone, is refused.
    fn reserve(
        &self,
        function: &FunctionName,
        locations: &[Bdf],
    ) -> impl Future<Output = Result<Vec<AllocatedVf>, PoolRefusal>> + Send;

    /// Records which container holds a VF the kubelet holds (learned from PodResources).
    fn identify(
        &self,
        location: Bdf,
        owner: &ContainerRef,
    ) -> impl Future<Output = Result<(), PoolRefusal>> + Send;

    /// Takes a free VF for the kubelet on the kubelet's own record that `owner` holds it
    /// (vfmap lost that allocation): as [`VfPool::reserve`], with the owner known.
    fn adopt(
        &self,
        location: Bdf,
        owner: &ContainerRef,
    ) -> impl Future<Output = Result<(), PoolRefusal>> + Send;

    /// Returns a VF the kubelet no longer holds to the pool: reset, host driver, free. Refused
    /// unless the kubelet holds it.
    fn release(&self, location: Bdf) -> impl Future<Output = Result<(), PoolRefusal>> + Send;
}
