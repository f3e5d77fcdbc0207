//! What the plugin sees of vfmap's pool, and the names it gives things in Kubernetes: resource
//! names, device ids, health, the environment variable names. Pure.

use std::fmt;

use vfmap_core::{Bdf, FunctionName, GlobalIndex};

use crate::api::deviceplugin as dp;

/// The kubelet's word for a usable device (`v1beta1.Healthy`).
pub const HEALTHY: &str = "Healthy";
/// The kubelet's word for a device it must not hand out (`v1beta1.Unhealthy`).
pub const UNHEALTHY: &str = "Unhealthy";
/// The device plugin API version this crate speaks.
pub const API_VERSION: &str = "v1beta1";
/// The default prefix of the resource names: `vfmap.io/<function>`.
pub const DEFAULT_PREFIX: &str = "vfmap.io";

/// A container as the kubelet's PodResources API names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerRef {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container's name in the pod.
    pub container: String,
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.pod, self.container)
    }
}

/// Who holds a VF, as the daemon's state says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nobody: the pool may give it out.
    Free,
    /// The kubelet, through this plugin's Allocate. The container is known once PodResources
    /// has listed it (Allocate does not name the container).
    Kubelet {
        /// The container holding it, when known.
        owner: Option<ContainerRef>,
        /// When Allocate reserved it (milliseconds since the Unix epoch, recorded durably):
        /// reconciliation gives a fresh allocation time to show up in PodResources.
        allocated_at_ms: u64,
    },
    /// A VM registered through vfmap's own API.
    Vm(String),
    /// The VF's last reset or driver bind failed; it is kept out of the pool.
    Failed,
    /// The VF is in the daemon's tables but no longer on the host (PF gone, VFs disabled).
    Gone,
}

/// One VF carrying a function, as the daemon shows it to the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfView {
    /// vfmap's stable global index.
    pub global_index: GlobalIndex,
    /// The VF's host location: the device id the kubelet sees.
    pub location: Bdf,
    /// Its PF.
    pub pf: Bdf,
    /// Its function.
    pub function: FunctionName,
    /// Its NUMA node, when the kernel reports one (`numa_node` >= 0).
    pub numa_node: Option<i32>,
    /// Who holds it.
    pub holder: Holder,
}

/// The kubelet's device id of a VF: its host location (`0000:3b:00.2`).
///
/// Not the global index: the location is what the kubelet checkpoints, what PodResources
/// reports and what `PCI_RESOURCE_*` carries, so every consumer (KubeVirt, SR-IOV aware apps,
/// an operator reading `kubectl describe`) can use it directly; and it names the same VF even
/// to a daemon that lost its database, where an index would name nothing.
pub fn device_id(vf: &VfView) -> String {
    vf.location.to_string()
}

/// Whether the kubelet may count a VF as allocatable (or keep it held): free VFs and those it
/// already holds are healthy; those held by a VM, failed or gone are not.
pub fn health(holder: &Holder) -> &'static str {
    match holder {
        Holder::Free | Holder::Kubelet { .. } => HEALTHY,
        Holder::Vm(_) | Holder::Failed | Holder::Gone => UNHEALTHY,
    }
}

/// The device list of one function for ListAndWatch, sorted by device id: one device per VF of
/// the function, with its health and NUMA node.
pub fn devices_of(view: &[VfView], function: &FunctionName) -> Vec<dp::Device> {
    let mut devices: Vec<dp::Device> = view
        .iter()
        .filter(|vf| &vf.function == function)
        .map(|vf| dp::Device {
            id: device_id(vf),
            health: health(&vf.holder).to_owned(),
            topology: vf.numa_node.filter(|n| *n >= 0).map(|n| dp::TopologyInfo {
                nodes: vec![dp::NumaNode { id: i64::from(n) }],
            }),
        })
        .collect();
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    devices
}

/// The functions present in a view, sorted, each once.
pub fn functions_of(view: &[VfView]) -> Vec<FunctionName> {
    let mut functions: Vec<FunctionName> = view.iter().map(|vf| vf.function.clone()).collect();
    functions.sort();
    functions.dedup();
    functions
}

/// Why a function cannot be published under a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The prefix is not a DNS subdomain, or is Kubernetes' own.
    #[error("resource prefix {0:?} is not a DNS subdomain outside kubernetes.io and k8s.io")]
    Prefix(String),
    /// The function name is not a valid resource name part.
    #[error(
        "function {0:?} cannot be a Kubernetes resource name: it must end with a letter or \
         digit and be at most 63 characters"
    )]
    Function(String),
}

/// Checks a resource prefix: a DNS subdomain (lowercase labels of letters, digits and `-`,
/// separated by dots, at most 253 bytes) that Kubernetes accepts for extended resources (not
/// `kubernetes.io` or `k8s.io` or below them; `requests.` prefixes are for quotas).
pub fn check_prefix(prefix: &str) -> Result<(), NameError> {
    let labels_ok = !prefix.is_empty()
        && prefix.len() <= 253
        && prefix.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let reserved = ["kubernetes.io", "k8s.io"]
        .iter()
        .any(|r| prefix == *r || prefix.ends_with(&format!(".{r}")))
        || prefix.starts_with("requests.");
    if labels_ok && !reserved {
        Ok(())
    } else {
        Err(NameError::Prefix(prefix.to_owned()))
    }
}

/// The resource name of a function: `<prefix>/<function>`. vfmap's function names are
/// lowercase letters, digits, `.`, `_` and `-` starting with a letter or digit; Kubernetes
/// also wants the last character a letter or digit and at most 63 characters.
pub fn resource_name(prefix: &str, function: &FunctionName) -> Result<String, NameError> {
    check_prefix(prefix)?;
    let name = function.as_str();
    let last_ok = name
        .bytes()
        .last()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    if !last_ok || name.len() > 63 {
        return Err(NameError::Function(name.to_owned()));
    }
    Ok(format!("{prefix}/{name}"))
}

/// The environment variable KubeVirt reads for an external device plugin's resource:
/// `PCI_RESOURCE_` + the resource name upper-cased with `/` and `.` turned into `_`
/// (`vfmap.io/crypto` -> `PCI_RESOURCE_VFMAP_IO_CRYPTO`), KubeVirt's own rule.
pub fn kubevirt_env(resource: &str) -> String {
    let mut name = String::from("PCI_RESOURCE_");
    name.extend(resource.chars().map(|c| match c {
        '/' | '.' => '_',
        c => c.to_ascii_uppercase(),
    }));
    name
}

/// The environment variable naming a function's VFs for applications that are not KubeVirt,
/// whatever the resource prefix: `VFMAP_FUNCTION_` + the function upper-cased, with every
/// character that is not a letter or digit turned into `_` (`crypto` ->
/// `VFMAP_FUNCTION_CRYPTO`). A container lists its functions with `env | grep
/// ^VFMAP_FUNCTION_`.
pub fn function_env(function: &FunctionName) -> String {
    let mut name = String::from("VFMAP_FUNCTION_");
    name.extend(function.as_str().chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    name
}

/// The socket file name of a function's plugin endpoint in the kubelet's device plugin
/// directory: `vfmap-<function>.sock`.
pub fn endpoint_name(function: &FunctionName) -> String {
    format!("vfmap-{}.sock", function.as_str())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn vf(
        index: u32,
        location: &str,
        pf: &str,
        function: &str,
        numa: Option<i32>,
    ) -> VfView {
        VfView {
            global_index: GlobalIndex::new(index),
            location: location.parse().unwrap(),
            pf: pf.parse().unwrap(),
            function: FunctionName::new(function).unwrap(),
            numa_node: numa,
            holder: Holder::Free,
        }
    }

    fn f(name: &str) -> FunctionName {
        FunctionName::new(name).unwrap()
    }

    #[test]
    fn health_follows_the_holder() {
        let owner = ContainerRef {
            namespace: "default".into(),
            pod: "p".into(),
            container: "c".into(),
        };
        assert_eq!(health(&Holder::Free), HEALTHY);
        let held = |owner| Holder::Kubelet {
            owner,
            allocated_at_ms: 1,
        };
        assert_eq!(health(&held(None)), HEALTHY);
        assert_eq!(health(&held(Some(owner))), HEALTHY);
        assert_eq!(health(&Holder::Vm("web-1".into())), UNHEALTHY);
        assert_eq!(health(&Holder::Failed), UNHEALTHY);
        assert_eq!(health(&Holder::Gone), UNHEALTHY);
    }

    #[test]
    fn devices_are_one_function_sorted_with_numa() {
        let mut view = vec![
            vf(2, "0000:01:00.3", "0000:01:00.0", "crypto", Some(1)),
            vf(0, "0000:01:00.1", "0000:01:00.0", "crypto", None),
            vf(1, "0000:01:00.2", "0000:01:00.0", "compress", Some(0)),
            vf(3, "0000:02:00.1", "0000:02:00.0", "crypto", Some(-1)),
        ];
        view[0].holder = Holder::Vm("web-1".into());
        let devices = devices_of(&view, &f("crypto"));
        let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["0000:01:00.1", "0000:01:00.3", "0000:02:00.1"]);
        assert_eq!(devices[0].health, HEALTHY);
        assert_eq!(devices[0].topology, None);
        assert_eq!(devices[1].health, UNHEALTHY);
        assert_eq!(
            devices[1].topology,
            Some(dp::TopologyInfo {
                nodes: vec![dp::NumaNode { id: 1 }]
            })
        );
        // The kernel's -1 means "no node".
        assert_eq!(devices[2].topology, None);
        assert_eq!(functions_of(&view), [f("compress"), f("crypto")]);
        assert!(devices_of(&view, &f("net")).is_empty());
    }

    #[test]
    fn resource_names_follow_kubernetes_rules() {
        assert_eq!(
            resource_name("vfmap.io", &f("crypto")).unwrap(),
            "vfmap.io/crypto"
        );
        assert_eq!(
            resource_name("example.com", &f("a.b_c-d")).unwrap(),
            "example.com/a.b_c-d"
        );
        assert!(matches!(
            resource_name("vfmap.io", &f("crypto-")),
            Err(NameError::Function(_))
        ));
        assert!(matches!(
            resource_name("vfmap.io", &f(&"a".repeat(64))),
            Err(NameError::Function(_))
        ));
        assert!(resource_name("vfmap.io", &f(&"a".repeat(63))).is_ok());
        for bad in [
            "",
            "Vfmap.io",
            "vfmap..io",
            "-x.io",
            "x-.io",
            "kubernetes.io",
            "a.k8s.io",
            "requests.vfmap.io",
            "a/b",
        ] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(check_prefix("vfmap").is_ok());
    }

    #[test]
    fn environment_names() {
        assert_eq!(
            kubevirt_env("vfmap.io/crypto"),
            "PCI_RESOURCE_VFMAP_IO_CRYPTO"
        );
        // KubeVirt keeps '-' and '_' as they are.
        assert_eq!(
            kubevirt_env("example.com/a-b_c.d"),
            "PCI_RESOURCE_EXAMPLE_COM_A-B_C_D"
        );
        assert_eq!(function_env(&f("a-b.c_d9")), "VFMAP_FUNCTION_A_B_C_D9");
        assert_eq!(endpoint_name(&f("crypto")), "vfmap-crypto.sock");
    }

    #[test]
    fn device_id_is_the_location() {
        assert_eq!(
            device_id(&vf(7, "0001:3b:00.2", "0001:3b:00.0", "crypto", None)),
            "0001:3b:00.2"
        );
    }
}
