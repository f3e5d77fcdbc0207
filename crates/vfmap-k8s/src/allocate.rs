//! Allocate: checking the kubelet's device ids, and the response that gives a container its
//! VFs. Pure.

use std::collections::BTreeSet;

use vfmap_core::{Bdf, FunctionName};

use crate::api::deviceplugin as dp;
use crate::model::{Holder, VfView, function_env, kubevirt_env};

/// A VF the pool reserved for the kubelet and bound to vfio-pci.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatedVf {
    /// Its host location.
    pub location: Bdf,
    /// Its IOMMU group: the container gets `/dev/vfio/<group>`. Read when the VF was bound
    /// (group numbers are not stable across reboots, so never stored as identity).
    pub iommu_group: u32,
}

/// Why an Allocate request is refused before the pool is asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocateError {
    /// The request names no device.
    #[error("the request names no device")]
    Empty,
    /// An id that is not a PCI address.
    #[error("device id {0:?} is not a PCI address")]
    BadId(String),
    /// An id named twice in one container's request.
    #[error("device {0} is requested twice")]
    Duplicate(Bdf),
    /// An id that is not a VF of this function.
    #[error("device {location} is not a VF of function {function}")]
    NotThisFunction {
        /// The device.
        location: Bdf,
        /// The plugin's function.
        function: String,
    },
    /// A VF the pool cannot give to the kubelet now (a VM holds it, it failed, it is gone).
    #[error("device {location} is not available: {why}")]
    Unavailable {
        /// The device.
        location: Bdf,
        /// Who or what holds it.
        why: String,
    },
}

/// Checks one container's device ids against the view: PCI addresses of VFs of `function`,
/// each once, free or already the kubelet's (the kubelet may call Allocate again for devices
/// it holds, after its own restart). Returns the locations in the request's order. The pool
/// checks again when it reserves (the view may be stale); this gives the kubelet a clear error
/// for what is already known.
pub fn check_request(
    view: &[VfView],
    function: &FunctionName,
    ids: &[String],
) -> Result<Vec<Bdf>, AllocateError> {
    if ids.is_empty() {
        return Err(AllocateError::Empty);
    }
    let mut seen = BTreeSet::new();
    let mut locations = Vec::with_capacity(ids.len());
    for id in ids {
        let location: Bdf = id.parse().map_err(|_| AllocateError::BadId(id.clone()))?;
        if !seen.insert(location) {
            return Err(AllocateError::Duplicate(location));
        }
        let vf = view
            .iter()
            .find(|vf| vf.location == location && &vf.function == function)
            .ok_or_else(|| AllocateError::NotThisFunction {
                location,
                function: function.to_string(),
            })?;
        let why = match &vf.holder {
            Holder::Free | Holder::Kubelet { .. } => None,
            Holder::Vm(vm) => Some(format!("held by VM {vm}")),
            Holder::Failed => Some("failed its last reset or bind".to_owned()),
            Holder::Gone => Some("no longer on the host".to_owned()),
        };
        if let Some(why) = why {
            return Err(AllocateError::Unavailable { location, why });
        }
        locations.push(location);
    }
    Ok(locations)
}

/// The response for one container: the VFIO container node and each VF's group node (read and
/// write, each group once), and two environment variables with the VFs' locations in the
/// request's order, comma-separated: KubeVirt's `PCI_RESOURCE_<RESOURCE>` and vfmap's own
/// `VFMAP_FUNCTION_<FUNCTION>`, which does not depend on the resource prefix.
pub fn container_response(
    resource: &str,
    function: &FunctionName,
    vfs: &[AllocatedVf],
) -> dp::ContainerAllocateResponse {
    let node = |path: String| dp::DeviceSpec {
        container_path: path.clone(),
        host_path: path,
        permissions: "rw".to_owned(),
    };
    let mut devices = vec![node("/dev/vfio/vfio".to_owned())];
    let groups: BTreeSet<u32> = vfs.iter().map(|vf| vf.iommu_group).collect();
    devices.extend(groups.iter().map(|g| node(format!("/dev/vfio/{g}"))));
    let list = vfs
        .iter()
        .map(|vf| vf.location.to_string())
        .collect::<Vec<_>>()
        .join(",");
    dp::ContainerAllocateResponse {
        envs: [
            (kubevirt_env(resource), list.clone()),
            (function_env(function), list),
        ]
        .into_iter()
        .collect(),
        mounts: Vec::new(),
        devices,
        annotations: Default::default(),
        cdi_devices: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::vf;

    fn crypto() -> FunctionName {
        FunctionName::new("crypto").unwrap()
    }

    fn view() -> Vec<VfView> {
        let mut v = vec![
            vf(0, "0000:01:00.1", "0000:01:00.0", "crypto", Some(0)),
            vf(1, "0000:01:00.2", "0000:01:00.0", "crypto", Some(0)),
            vf(2, "0000:01:00.3", "0000:01:00.0", "compress", Some(0)),
            vf(3, "0000:01:00.4", "0000:01:00.0", "crypto", Some(0)),
            vf(4, "0000:01:00.5", "0000:01:00.0", "crypto", Some(0)),
        ];
        v[1].holder = Holder::Kubelet {
            owner: None,
            allocated_at_ms: 0,
        };
        v[3].holder = Holder::Vm("web-1".into());
        v[4].holder = Holder::Gone;
        v
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accepts_free_and_kubelet_held_vfs_in_order() {
        let got =
            check_request(&view(), &crypto(), &ids(&["0000:01:00.2", "0000:01:00.1"])).unwrap();
        assert_eq!(
            got,
            [
                "0000:01:00.2".parse().unwrap(),
                "0000:01:00.1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn refuses_what_it_cannot_give() {
        let check = |list: &[&str]| check_request(&view(), &crypto(), &ids(list)).unwrap_err();
        assert_eq!(check(&[]), AllocateError::Empty);
        assert_eq!(check(&["nope"]), AllocateError::BadId("nope".into()));
        assert!(matches!(
            check(&["0000:01:00.1", "0000:01:00.1"]),
            AllocateError::Duplicate(_)
        ));
        assert!(matches!(
            check(&["0000:01:00.3"]),
            AllocateError::NotThisFunction { .. }
        ));
        assert!(matches!(
            check(&["0000:09:00.1"]),
            AllocateError::NotThisFunction { .. }
        ));
        let vm = check(&["0000:01:00.1", "0000:01:00.4"]);
        assert_eq!(
            vm.to_string(),
            "device 0000:01:00.4 is not available: held by VM web-1"
        );
        assert!(matches!(
            check(&["0000:01:00.5"]),
            AllocateError::Unavailable { .. }
        ));
    }

    #[test]
    fn response_has_vfio_nodes_and_both_environment_variables() {
        let vfs = [
            AllocatedVf {
                location: "0000:01:00.2".parse().unwrap(),
                iommu_group: 12,
            },
            AllocatedVf {
                location: "0000:01:00.1".parse().unwrap(),
                iommu_group: 11,
            },
            AllocatedVf {
                location: "0000:01:00.6".parse().unwrap(),
                iommu_group: 12,
            },
        ];
        let r = container_response("vfmap.io/crypto", &crypto(), &vfs);
        let paths: Vec<(&str, &str, &str)> = r
            .devices
            .iter()
            .map(|d| {
                (
                    d.container_path.as_str(),
                    d.host_path.as_str(),
                    d.permissions.as_str(),
                )
            })
            .collect();
        assert_eq!(
            paths,
            [
                ("/dev/vfio/vfio", "/dev/vfio/vfio", "rw"),
                ("/dev/vfio/11", "/dev/vfio/11", "rw"),
                ("/dev/vfio/12", "/dev/vfio/12", "rw"),
            ]
        );
        let list = "0000:01:00.2,0000:01:00.1,0000:01:00.6";
        assert_eq!(r.envs.len(), 2);
        assert_eq!(r.envs["PCI_RESOURCE_VFMAP_IO_CRYPTO"], list);
        assert_eq!(r.envs["VFMAP_FUNCTION_CRYPTO"], list);
        assert!(r.mounts.is_empty() && r.annotations.is_empty() && r.cdi_devices.is_empty());
    }
}
