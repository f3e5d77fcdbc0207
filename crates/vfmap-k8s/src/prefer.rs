//! GetPreferredAllocation: which of the kubelet's available devices to take, by vfmap's own
//! policy. Pure.
//!
//! The policy is not written a second time here: the candidates are put in a scratch
//! [`vfmap_core::Pool`] with one scratch VM whose slots are the devices wanted, and the pool's
//! own [`Pool::plan_reserve`](vfmap_core::Pool::plan_reserve) chooses (the VM's NUMA node first,
//! then spread over PFs — the PF with the most free VFs first — then the lowest global index).
//! Nothing of that scratch pool is kept or persisted.

use std::collections::{BTreeMap, BTreeSet};

use vfmap_core::{Change, FunctionName, Pool, PoolVf, Request, SlotId, VmBackend, VmName, VmSpec};

use crate::model::{VfView, device_id};

/// The preferred devices for one container: every `must_include` id first, then the pool
/// policy's choice among the other `available` ids of `function` until there are `size`.
///
/// The NUMA node preferred is the one most of the `must_include` devices are on, or else the
/// one with the most available devices (so that a request of several devices fits on one
/// node when it can); ties go to the lowest node. Ids the view does not know, or of another
/// function, are never chosen. When fewer devices are available than wanted, all of them are
/// returned (the kubelet decides what to do).
pub fn preferred(
    view: &[VfView],
    function: &FunctionName,
    available: &[String],
    must_include: &[String],
    size: usize,
) -> Vec<String> {
    let by_id: BTreeMap<String, &VfView> = view
        .iter()
        .filter(|vf| &vf.function == function)
        .map(|vf| (device_id(vf), vf))
        .collect();
    let mut chosen: Vec<String> = Vec::new();
    for id in must_include {
        if !chosen.contains(id) {
            chosen.push(id.clone());
        }
    }
    if chosen.len() >= size {
        return chosen;
    }
    let wanted = size - chosen.len();
    let candidates: Vec<&VfView> = available
        .iter()
        .filter(|id| !chosen.contains(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter_map(|id| by_id.get(id).copied())
        .collect();
    let node = preferred_node(
        must_include.iter().filter_map(|id| by_id.get(id).copied()),
        &candidates,
    );
    match choose(&candidates, function, wanted, node) {
        Some(picked) => chosen.extend(picked),
        // More wanted than the pool can plan (none left, or over its limits): everything.
        None => chosen.extend(candidates.iter().take(wanted).map(|vf| device_id(vf))),
    }
    chosen
}

fn preferred_node<'a>(
    must: impl Iterator<Item = &'a VfView>,
    candidates: &[&VfView],
) -> Option<i32> {
    let most = |nodes: &mut dyn Iterator<Item = i32>| {
        let mut count: BTreeMap<i32, usize> = BTreeMap::new();
        for n in nodes {
            *count.entry(n).or_default() += 1;
        }
        // Highest count; on a tie the lowest node (max_by_key keeps the last maximum).
        count
            .into_iter()
            .rev()
            .max_by_key(|(_, c)| *c)
            .map(|(n, _)| n)
    };
    let mut must_nodes = must.filter_map(|vf| vf.numa_node.filter(|n| *n >= 0));
    most(&mut must_nodes).or_else(|| {
        most(
            &mut candidates
                .iter()
                .filter_map(|vf| vf.numa_node.filter(|n| *n >= 0)),
        )
    })
}

/// `wanted` of `candidates` by the pool's policy, or `None` when the pool refuses the request.
fn choose(
    candidates: &[&VfView],
    function: &FunctionName,
    wanted: usize,
    numa_node: Option<i32>,
) -> Option<Vec<String>> {
    let count = u32::try_from(wanted).ok()?;
    let mut pool = Pool::new(candidates.iter().map(|vf| PoolVf {
        global_index: vf.global_index,
        location: vf.location,
        pf: vf.pf,
        function: Some(vf.function.clone()),
        host_driver: None,
        guest_driver: None,
        numa_node: vf.numa_node,
        vendor: None,
        device: None,
    }));
    let vm = VmName::new("kubelet").ok()?;
    let slots = (0..wanted)
        .map(|i| SlotId::new(&format!("s{i}")))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let spec = VmSpec {
        name: vm.clone(),
        // A scratch VM: never reached, only its slots and NUMA node matter.
        backend: VmBackend::Qmp {
            qmp_socket: "/nonexistent/kubelet.qmp".into(),
            agent_socket: "/nonexistent/kubelet.agent".into(),
        },
        slots,
        numa_node,
    };
    let add = pool.plan_add_vm(spec).ok()?;
    pool.apply(&add);
    let request = Request {
        vm,
        function: function.as_str().to_owned(),
        count,
        numa_node: None,
        pf: None,
    };
    match pool.plan_reserve(&request).ok()? {
        Change::Reserve(assignments) => {
            Some(assignments.iter().map(|a| a.location.to_string()).collect())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::vf;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn crypto() -> FunctionName {
        FunctionName::new("crypto").unwrap()
    }

    /// Two PFs on node 0 (2 VFs each), one PF on node 1 (2 VFs), and a compress VF.
    fn view() -> Vec<VfView> {
        vec![
            vf(0, "0000:01:00.1", "0000:01:00.0", "crypto", Some(0)),
            vf(1, "0000:01:00.2", "0000:01:00.0", "crypto", Some(0)),
            vf(2, "0000:02:00.1", "0000:02:00.0", "crypto", Some(0)),
            vf(3, "0000:02:00.2", "0000:02:00.0", "crypto", Some(0)),
            vf(4, "0000:81:00.1", "0000:81:00.0", "crypto", Some(1)),
            vf(5, "0000:81:00.2", "0000:81:00.0", "crypto", Some(1)),
            vf(6, "0000:01:00.4", "0000:01:00.0", "compress", Some(0)),
        ]
    }

    fn all_crypto() -> Vec<String> {
        view()
            .iter()
            .filter(|v| v.function == crypto())
            .map(device_id)
            .collect()
    }

    #[test]
    fn spreads_over_pfs_on_the_fullest_node() {
        // Node 0 has 4 available: both devices there, one from each PF.
        let got = preferred(&view(), &crypto(), &all_crypto(), &[], 2);
        assert_eq!(got, ids(&["0000:01:00.1", "0000:02:00.1"]));
    }

    #[test]
    fn follows_the_node_of_the_devices_it_must_include() {
        let got = preferred(
            &view(),
            &crypto(),
            &all_crypto(),
            &ids(&["0000:81:00.2"]),
            2,
        );
        assert_eq!(got, ids(&["0000:81:00.2", "0000:81:00.1"]));
    }

    #[test]
    fn spills_to_another_node_only_when_needed() {
        let got = preferred(&view(), &crypto(), &all_crypto(), &[], 5);
        assert_eq!(got.len(), 5);
        let on_node_1 = got.iter().filter(|id| id.starts_with("0000:81")).count();
        assert_eq!(on_node_1, 1);
    }

    #[test]
    fn only_available_devices_of_the_function() {
        let available = ids(&[
            "0000:01:00.4",
            "0000:02:00.2",
            "0000:99:00.1",
            "0000:81:00.1",
        ]);
        let got = preferred(&view(), &crypto(), &available, &[], 1);
        // compress and unknown ids are skipped; node 0 and node 1 tie at one: node 0.
        assert_eq!(got, ids(&["0000:02:00.2"]));
    }

    #[test]
    fn fewer_available_than_wanted_gives_all_of_them() {
        let available = ids(&["0000:81:00.1", "0000:81:00.2"]);
        let mut got = preferred(&view(), &crypto(), &available, &[], 3);
        got.sort();
        assert_eq!(got, available);
    }

    #[test]
    fn must_include_alone_when_it_fills_the_request() {
        let must = ids(&["0000:01:00.2", "0000:01:00.2"]);
        assert_eq!(
            preferred(&view(), &crypto(), &all_crypto(), &must, 1),
            ids(&["0000:01:00.2"])
        );
        assert!(preferred(&view(), &crypto(), &all_crypto(), &[], 0).is_empty());
    }

    #[test]
    fn same_answer_as_the_daemon_for_a_vm_on_that_node() {
        // The chooser is the pool's: the PF with the most free VFs first, then the lowest
        // global index, so a third device goes back to the first PF.
        let got = preferred(&view(), &crypto(), &all_crypto(), &[], 3);
        assert_eq!(got, ids(&["0000:01:00.1", "0000:02:00.1", "0000:01:00.2"]));
    }
}
