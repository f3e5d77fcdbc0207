//! Release without a deallocate call: the device plugin API never says a container is done with
//! its devices, so the VFs the kubelet holds are compared with what its PodResources API lists.
//! Pure: the decisions only; the plugin's reconcile loop carries them out through the pool.

use std::collections::BTreeMap;

use vfmap_core::{Bdf, FunctionName};

use crate::api::podresources as pr;
use crate::model::{ContainerRef, Holder, VfView, resource_name};

/// What one successful PodResources `List` says of this plugin's resources: device id ->
/// (container, resource name). A device listed twice keeps its first container (the kubelet
/// never does that; the second is reported by [`listed`]'s caller through the log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listed {
    /// By device id.
    pub devices: BTreeMap<String, (ContainerRef, String)>,
}

/// Reads a PodResources `List` answer: every device of a resource under `prefix/`.
pub fn listed(response: &pr::ListPodResourcesResponse, prefix: &str) -> Listed {
    let mut devices = BTreeMap::new();
    let ours = format!("{prefix}/");
    for pod in &response.pod_resources {
        for container in &pod.containers {
            let owner = ContainerRef {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                container: container.name.clone(),
            };
            for group in &container.devices {
                if !group.resource_name.starts_with(&ours) {
                    continue;
                }
                for id in &group.device_ids {
                    devices
                        .entry(id.clone())
                        .or_insert_with(|| (owner.clone(), group.resource_name.clone()));
                }
            }
        }
    }
    Listed { devices }
}

/// The clock and delays of one reconciliation, in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Now.
    pub now_ms: u64,
    /// When the kubelet's socket was (re)created: a kubelet that just started may not list
    /// its pods yet.
    pub kubelet_since_ms: u64,
    /// How long a VF may stay unlisted, counted from the latest of its allocation, the
    /// kubelet's start and the last `List` that named it, before it is released. Covers the
    /// gap between Allocate and the kubelet recording the container, and a container still
    /// stopping after its pod left the kubelet's list (a static pod whose manifest is removed
    /// is dropped from PodResources at once, while its containers get their grace period).
    pub grace_ms: u64,
}

/// One thing to do, or to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The kubelet holds the VF for this container: record it as the owner.
    Identify {
        /// The VF.
        location: Bdf,
        /// The container PodResources names.
        owner: ContainerRef,
    },
    /// No pod holds the VF any more: release it (reset, vfio-pci, free).
    Release {
        /// The VF.
        location: Bdf,
        /// The container that held it, if known.
        owner: Option<ContainerRef>,
    },
    /// A free VF that a container holds by the kubelet's own record (vfmap lost the
    /// allocation, e.g. its state was restored from before it): take it for the kubelet, so
    /// nothing else gets it.
    Adopt {
        /// The VF.
        location: Bdf,
        /// The container PodResources names.
        owner: ContainerRef,
    },
    /// The kubelet says a container holds a VF that vfmap gave to a VM, or that failed or is
    /// gone. Nothing is taken from a VM: reported only.
    Conflict {
        /// The device id.
        device: String,
        /// The container PodResources names.
        owner: ContainerRef,
        /// What vfmap says of the VF.
        vfmap: String,
    },
}

/// The decisions for a view against one successful `List`: for each VF the kubelet holds,
/// identify its container or, once unlisted for a grace period, release it; for each listed
/// device vfmap does not have as the kubelet's, adopt it if free, else report a conflict.
/// Listed VFs whose owner is already recorded need nothing. Never call this with an empty
/// `Listed` standing in for a failed `List`: that would release every VF.
///
/// `last_listed` has, per VF, when a `List` last named it (kept by the caller in memory; a
/// restarted plugin starts empty, and the kubelet's start time covers it).
pub fn decide(
    view: &[VfView],
    prefix: &str,
    listed: &Listed,
    last_listed: &BTreeMap<Bdf, u64>,
    timing: Timing,
) -> Vec<Decision> {
    let mut decisions = Vec::new();
    let mut known = std::collections::BTreeSet::new();
    for vf in view {
        let id = vf.location.to_string();
        let entry = listed
            .devices
            .get(&id)
            .filter(|(_, resource)| is_resource_of(resource, prefix, &vf.function));
        if entry.is_some() {
            known.insert(id.clone());
        }
        match (&vf.holder, entry) {
            (Holder::Kubelet { owner, .. }, Some((listed_owner, _))) => {
                if owner.as_ref() != Some(listed_owner) {
                    decisions.push(Decision::Identify {
                        location: vf.location,
                        owner: listed_owner.clone(),
                    });
                }
            }
            (
                Holder::Kubelet {
                    owner,
                    allocated_at_ms,
                },
                None,
            ) => {
                let seen = last_listed.get(&vf.location).copied().unwrap_or(0);
                let since = (*allocated_at_ms).max(timing.kubelet_since_ms).max(seen);
                if timing.now_ms.saturating_sub(since) >= timing.grace_ms {
                    decisions.push(Decision::Release {
                        location: vf.location,
                        owner: owner.clone(),
                    });
                }
            }
            (Holder::Free, Some((listed_owner, _))) => decisions.push(Decision::Adopt {
                location: vf.location,
                owner: listed_owner.clone(),
            }),
            (other, Some((listed_owner, _))) => decisions.push(Decision::Conflict {
                device: id,
                owner: listed_owner.clone(),
                vfmap: match other {
                    Holder::Vm(vm) => format!("held by VM {vm}"),
                    Holder::Failed => "failed".to_owned(),
                    _ => "gone".to_owned(),
                },
            }),
            (_, None) => {}
        }
    }
    for (id, (owner, _)) in &listed.devices {
        if !known.contains(id) {
            decisions.push(Decision::Conflict {
                device: id.clone(),
                owner: owner.clone(),
                vfmap: "not a VF of that function".to_owned(),
            });
        }
    }
    decisions
}

fn is_resource_of(resource: &str, prefix: &str, function: &FunctionName) -> bool {
    resource_name(prefix, function).is_ok_and(|r| r == resource)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::vf;

    fn owner(pod: &str) -> ContainerRef {
        ContainerRef {
            namespace: "default".into(),
            pod: pod.into(),
            container: "app".into(),
        }
    }

    fn response(entries: &[(&str, &str, &[&str])]) -> pr::ListPodResourcesResponse {
        pr::ListPodResourcesResponse {
            pod_resources: entries
                .iter()
                .map(|(pod, resource, ids)| pr::PodResources {
                    name: pod.to_string(),
                    namespace: "default".into(),
                    containers: vec![pr::ContainerResources {
                        name: "app".into(),
                        devices: vec![pr::ContainerDevices {
                            resource_name: resource.to_string(),
                            device_ids: ids.iter().map(|s| s.to_string()).collect(),
                            topology: None,
                        }],
                        ..Default::default()
                    }],
                })
                .collect(),
        }
    }

    fn held(owner: Option<ContainerRef>, at: u64) -> Holder {
        Holder::Kubelet {
            owner,
            allocated_at_ms: at,
        }
    }

    fn none() -> BTreeMap<Bdf, u64> {
        BTreeMap::new()
    }

    #[test]
    fn a_vf_listed_lately_waits_its_grace_period_again() {
        // Listed 10 s ago, gone now: its container may still be stopping.
        let seen: BTreeMap<Bdf, u64> = [("0000:01:00.1".parse().unwrap(), 90_000)].into();
        let d = decide(&view(), "vfmap.io", &Listed::default(), &seen, T);
        assert_eq!(
            d,
            [Decision::Release {
                location: "0000:01:00.2".parse().unwrap(),
                owner: Some(owner("a")),
            }]
        );
    }

    const T: Timing = Timing {
        now_ms: 100_000,
        kubelet_since_ms: 10_000,
        grace_ms: 30_000,
    };

    fn view() -> Vec<VfView> {
        let mut v = vec![
            vf(0, "0000:01:00.1", "0000:01:00.0", "crypto", None),
            vf(1, "0000:01:00.2", "0000:01:00.0", "compress", None),
            vf(2, "0000:01:00.3", "0000:01:00.0", "crypto", None),
            vf(3, "0000:01:00.4", "0000:01:00.0", "crypto", None),
        ];
        v[0].holder = held(None, 20_000);
        v[1].holder = held(Some(owner("a")), 20_000);
        v
    }

    #[test]
    fn reads_only_this_prefix() {
        let l = listed(
            &response(&[
                ("a", "vfmap.io/crypto", &["0000:01:00.1"]),
                ("b", "intel.com/qat", &["0000:09:00.1"]),
                ("c", "vfmap.io/crypto", &["0000:01:00.1"]),
            ]),
            "vfmap.io",
        );
        assert_eq!(l.devices.len(), 1);
        assert_eq!(l.devices["0000:01:00.1"].0, owner("a"));
    }

    #[test]
    fn identifies_keeps_and_releases() {
        let l = listed(
            &response(&[
                ("a", "vfmap.io/crypto", &["0000:01:00.1"]),
                ("a", "vfmap.io/compress", &["0000:01:00.2"]),
            ]),
            "vfmap.io",
        );
        // Listed: identified (owner unknown) and kept (owner known).
        assert_eq!(
            decide(&view(), "vfmap.io", &l, &none(), T),
            [Decision::Identify {
                location: "0000:01:00.1".parse().unwrap(),
                owner: owner("a"),
            }]
        );
        // The pod is gone: both released.
        let d = decide(&view(), "vfmap.io", &Listed::default(), &none(), T);
        assert_eq!(
            d,
            [
                Decision::Release {
                    location: "0000:01:00.1".parse().unwrap(),
                    owner: None,
                },
                Decision::Release {
                    location: "0000:01:00.2".parse().unwrap(),
                    owner: Some(owner("a")),
                },
            ]
        );
    }

    #[test]
    fn waits_a_grace_period_after_allocation_and_after_a_kubelet_restart() {
        let mut v = view();
        v[0].holder = held(None, 80_000);
        let d = decide(&v, "vfmap.io", &Listed::default(), &none(), T);
        assert_eq!(d.len(), 1, "only the old allocation: {d:?}");
        // A kubelet started 10 s ago may not list its pods yet: nothing is released.
        let fresh = Timing {
            kubelet_since_ms: 90_000,
            ..T
        };
        assert!(decide(&view(), "vfmap.io", &Listed::default(), &none(), fresh).is_empty());
        // Exactly at the grace period it goes.
        let edge = Timing {
            now_ms: 50_000,
            ..T
        };
        assert_eq!(
            decide(&view(), "vfmap.io", &Listed::default(), &none(), edge).len(),
            2
        );
    }

    #[test]
    fn adopts_free_vfs_the_kubelet_gave_out_and_reports_conflicts() {
        let mut v = view();
        v[3].holder = Holder::Vm("web-1".into());
        let l = listed(
            &response(&[
                ("a", "vfmap.io/crypto", &["0000:01:00.1", "0000:01:00.3"]),
                ("a", "vfmap.io/compress", &["0000:01:00.2"]),
                ("b", "vfmap.io/crypto", &["0000:01:00.4", "0000:07:00.1"]),
                // Listed under the wrong function's resource: not that VF's.
                ("c", "vfmap.io/compress", &["0000:01:00.1"]),
            ]),
            "vfmap.io",
        );
        let d = decide(&v, "vfmap.io", &l, &none(), T);
        assert!(d.contains(&Decision::Adopt {
            location: "0000:01:00.3".parse().unwrap(),
            owner: owner("a"),
        }));
        assert!(d.contains(&Decision::Conflict {
            device: "0000:01:00.4".into(),
            owner: owner("b"),
            vfmap: "held by VM web-1".into(),
        }));
        assert!(d.contains(&Decision::Conflict {
            device: "0000:07:00.1".into(),
            owner: owner("b"),
            vfmap: "not a VF of that function".into(),
        }));
        assert!(!d.iter().any(|x| matches!(x, Decision::Release { .. })));
        assert_eq!(d.len(), 4, "{d:?}");
    }
}
