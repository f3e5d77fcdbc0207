//! Which driver each PCI device is bound to, read from the drivers' side.

use std::collections::HashMap;
use std::path::Path;

use rustix::fs::CWD;

use vfmap_core::Bdf;

use super::read::{list_dir, open_dir};

/// Every bound device's driver, from the `bus/pci/drivers/<driver>/<address>` links.
///
/// The kernel links a bound device both ways, and makes and removes the two links together:
/// the device's `driver` link and its driver's `<address>` link. Listing each driver's
/// directory costs a few system calls per driver; reading each device's `driver` link costs
/// one per device, a failed lookup for every unbound VF. With thousands of VFs the listing is
/// much cheaper, and with a few it costs well under a millisecond.
pub(super) struct BoundDrivers(HashMap<Bdf, String>);

impl BoundDrivers {
    /// The links under `<root>/bus/pci/drivers`; `None` when they cannot all be listed, or
    /// when there are none (a copy of a tree that kept only the devices' side, or a bare test
    /// tree): then each device's own `driver` link says.
    pub(super) fn read(root: &Path) -> Option<BoundDrivers> {
        let drivers = open_dir(CWD, root.join("bus/pci/drivers")).ok()?;
        let mut names = list_dir(&drivers).ok()?;
        names.sort_unstable();
        let mut bound = HashMap::new();
        for driver in names {
            let dir = open_dir(&drivers, driver.as_str()).ok()?;
            for entry in list_dir(&dir).ok()? {
                // A driver's other entries (bind, unbind, new_id, module...) are no address.
                if let Ok(device) = entry.parse::<Bdf>() {
                    bound.entry(device).or_insert_with(|| driver.clone());
                }
            }
        }
        (!bound.is_empty()).then_some(BoundDrivers(bound))
    }

    /// The driver `device` is bound to, if any.
    pub(super) fn driver_of(&self, device: Bdf) -> Option<String> {
        self.0.get(&device).cloned()
    }
}
