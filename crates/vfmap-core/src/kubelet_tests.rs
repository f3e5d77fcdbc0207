use proptest::prelude::*;

use super::*;
use crate::pool::{AssignState, PoolVf, Request, SlotId, VmBackend, VmName, VmSpec};
use crate::profile::DriverName;

const fn g(i: u32) -> GlobalIndex {
    GlobalIndex::new(i)
}

fn vf(gi: u32, function: &str) -> PoolVf {
    let pf = Bdf::new(0, 1, 0, 0).unwrap();
    PoolVf {
        global_index: g(gi),
        location: pf.vf_location(1, 1, gi as u16).unwrap(),
        pf,
        function: Some(FunctionName::new(function).unwrap()),
        host_driver: Some(DriverName::new("vfio-pci").unwrap()),
        guest_driver: Some(DriverName::new("pci-stub").unwrap()),
        numa_node: Some(0),
        vendor: None,
        device: None,
    }
}

fn vm(name: &str) -> VmSpec {
    VmSpec {
        name: VmName::new(name).unwrap(),
        backend: VmBackend::Qmp {
            qmp_socket: format!("/run/{name}.qmp"),
            agent_socket: format!("/run/{name}.agent"),
        },
        slots: (0..4)
            .map(|i| SlotId::new(&format!("rp{i}")).unwrap())
            .collect(),
        numa_node: None,
    }
}

fn request(vm: &str, function: &str, count: u32) -> Request {
    Request {
        vm: VmName::new(vm).unwrap(),
        function: function.into(),
        count,
        numa_node: None,
        pf: None,
    }
}

fn pool(n: u32) -> Pool {
    let mut pool = Pool::new((0..n).map(|i| vf(i, ["crypto", "compress"][(i % 2) as usize])));
    let change = pool.plan_add_vm(vm("web")).unwrap();
    pool.apply(&change);
    pool
}

fn owner(pod: &str) -> PodContainer {
    PodContainer::new("default", pod, "app").unwrap()
}

#[test]
fn container_names_are_checked() {
    assert!(PodContainer::new("default", "vf-pod", "app").is_ok());
    assert!(PodContainer::new("", "p", "c").is_err());
    assert!(PodContainer::new("a/b", "p", "c").is_err());
    assert!(PodContainer::new("n", "p c", "c").is_err());
    assert!(PodContainer::new("n", "p", &"c".repeat(254)).is_err());
    assert_eq!(owner("x").to_string(), "default/x/app");
}

#[test]
fn a_kubelet_hold_lives_reserve_identify_release_free() {
    let mut pool = pool(4);
    let change = pool
        .plan_kubelet_reserve("crypto", &[g(0), g(2)], None, 1000)
        .unwrap();
    pool.apply(&change);
    assert_eq!(pool.kubelet_holds().count(), 2);
    assert_eq!(pool.free_count("crypto"), 0);
    // Asked again (a kubelet restart): accepted, nothing new.
    assert_eq!(
        pool.plan_kubelet_reserve("crypto", &[g(0)], None, 2000),
        Ok(Change::KubeletReserve(vec![]))
    );
    let change = pool.plan_kubelet_owner(g(0), owner("p")).unwrap();
    pool.apply(&change);
    assert_eq!(pool.kubelet_hold(g(0)).unwrap().owner, Some(owner("p")));
    assert_eq!(pool.kubelet_hold(g(0)).unwrap().allocated_at_ms, 1000);
    // Freed only through releasing.
    assert!(matches!(
        pool.plan_kubelet_free(g(0)),
        Err(PoolError::BadTransition { .. })
    ));
    let change = pool.plan_kubelet_release(g(0)).unwrap();
    pool.apply(&change);
    // Not given again while it is being released.
    assert!(matches!(
        pool.plan_kubelet_reserve("crypto", &[g(0)], None, 3000),
        Err(PoolError::Taken { .. })
    ));
    assert!(pool.plan_kubelet_owner(g(0), owner("p")).is_err());
    let change = pool.plan_kubelet_free(g(0)).unwrap();
    pool.apply(&change);
    assert_eq!(pool.free_count("crypto"), 1);
    assert!(matches!(
        pool.plan_kubelet_release(g(0)),
        Err(PoolError::NotAssigned(_))
    ));
    pool.check_invariants().unwrap();
}

#[test]
fn reservations_are_all_or_nothing_and_checked() {
    let mut pool = pool(4);
    let change = pool.plan_reserve(&request("web", "crypto", 1)).unwrap();
    pool.apply(&change);
    let vm_held = pool.assignments().next().unwrap().global_index;
    let other = if vm_held == g(0) { g(2) } else { g(0) };
    let before = pool.clone();
    let refused = pool.plan_kubelet_reserve("crypto", &[other, vm_held], None, 1);
    assert!(
        matches!(&refused, Err(PoolError::Taken { by, .. }) if by == "VM web"),
        "{refused:?}"
    );
    assert_eq!(pool, before);
    for (function, vfs) in [
        ("compress", vec![other]),
        ("crypto", vec![other, other]),
        ("crypto", vec![]),
        ("crypto", vec![g(99)]),
    ] {
        assert!(
            matches!(
                pool.plan_kubelet_reserve(function, &vfs, None, 1),
                Err(PoolError::InvalidRequest(_))
            ),
            "{function} {vfs:?}"
        );
    }
}

#[test]
fn vms_never_get_kubelet_held_vfs() {
    let mut pool = pool(4);
    let change = pool
        .plan_kubelet_reserve("crypto", &[g(0)], Some(owner("p")), 1)
        .unwrap();
    pool.apply(&change);
    let change = pool.plan_reserve(&request("web", "crypto", 1)).unwrap();
    let Change::Reserve(got) = &change else {
        panic!("{change:?}")
    };
    assert_eq!(got[0].global_index, g(2));
    pool.apply(&change);
    assert!(matches!(
        pool.plan_reserve(&request("web", "crypto", 1)),
        Err(PoolError::NoFreeVf { free: 0, .. })
    ));
    // VM operations do not reach a kubelet hold.
    assert!(pool.plan_set_state(g(0), AssignState::HostBound).is_err());
    assert!(pool.plan_free(g(0)).is_err());
    pool.check_invariants().unwrap();
}

#[test]
fn restore_rejects_holds_that_break_invariants() {
    let mut pool = pool(4);
    let hold = |gi: u32, function: &str| KubeletHold {
        global_index: g(gi),
        location: vf(gi, function).location,
        function: FunctionName::new(function).unwrap(),
        owner: None,
        allocated_at_ms: 5,
        state: HoldState::Held,
    };
    let mut moved = hold(2, "crypto");
    moved.location = vf(3, "crypto").location;
    let rejected = pool.restore_kubelet(vec![
        hold(0, "crypto"),
        hold(0, "crypto"),
        hold(1, "crypto"),
        moved,
        hold(9, "crypto"),
    ]);
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    assert_eq!(pool.kubelet_holds().count(), 1);
    pool.check_invariants().unwrap();
}

/// One step of a random history of VMs and the kubelet sharing the pool.
#[derive(Debug, Clone)]
enum Op {
    VmAttach { function: usize, count: u32 },
    VmFinish { pick: usize },
    VmRelease { pick: usize },
    KubeletReserve { function: usize, mask: u16 },
    KubeletIdentify { pick: usize },
    KubeletRelease { pick: usize },
    KubeletFree { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize, 1..4u32).prop_map(|(function, count)| Op::VmAttach { function, count }),
        (0..64usize).prop_map(|pick| Op::VmFinish { pick }),
        (0..64usize).prop_map(|pick| Op::VmRelease { pick }),
        (0..2usize, any::<u16>())
            .prop_map(|(function, mask)| Op::KubeletReserve { function, mask }),
        (0..64usize).prop_map(|pick| Op::KubeletIdentify { pick }),
        (0..64usize).prop_map(|pick| Op::KubeletRelease { pick }),
        (0..64usize).prop_map(|pick| Op::KubeletFree { pick }),
    ]
}

const FUNCTIONS: [&str; 2] = ["crypto", "compress"];
const VFS: u32 = 10;

fn nth<T: Copy>(items: &[T], pick: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[pick % items.len()])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random histories of VM attaches and kubelet holds: a VF is never held by a VM and the
    /// kubelet at once, a VM is never given a kubelet-held VF nor the kubelet a VM's, nothing
    /// leaks, and a refused plan changes nothing.
    #[test]
    fn vms_and_the_kubelet_never_share_a_vf(ops in proptest::collection::vec(op(), 1..80)) {
        let mut pool = pool(VFS);
        for (step, op) in ops.into_iter().enumerate() {
            let before = pool.clone();
            let kubelet_held: Vec<GlobalIndex> = pool.kubelet_holds().map(|h| h.global_index).collect();
            let vm_held: Vec<GlobalIndex> = pool.assignments().map(|a| a.global_index).collect();
            let change = match op {
                Op::VmAttach { function, count } => pool.plan_reserve(&request("web", FUNCTIONS[function], count)),
                Op::VmFinish { pick } => {
                    let attaching: Vec<_> = pool.assignments().filter(|a| a.state.is_attaching()).map(|a| a.global_index).collect();
                    let Some(gi) = nth(&attaching, pick) else { continue };
                    let next = pool.assignment(gi).and_then(|a| a.state.next_attach_step()).unwrap();
                    pool.plan_set_state(gi, next)
                }
                Op::VmRelease { pick } => {
                    let Some(gi) = nth(&vm_held, pick) else { continue };
                    pool.plan_free(gi)
                }
                Op::KubeletReserve { function, mask } => {
                    let vfs: Vec<GlobalIndex> = (0..VFS).filter(|i| mask & (1 << i) != 0).map(g).collect();
                    pool.plan_kubelet_reserve(FUNCTIONS[function], &vfs, None, step as u64)
                }
                Op::KubeletIdentify { pick } => {
                    let Some(gi) = nth(&kubelet_held, pick) else { continue };
                    pool.plan_kubelet_owner(gi, owner("p"))
                }
                Op::KubeletRelease { pick } => {
                    let Some(gi) = nth(&kubelet_held, pick) else { continue };
                    pool.plan_kubelet_release(gi)
                }
                Op::KubeletFree { pick } => {
                    let Some(gi) = nth(&kubelet_held, pick) else { continue };
                    pool.plan_kubelet_free(gi)
                }
            };
            match change {
                Ok(change) => {
                    // Neither side is ever handed the other's VF.
                    match &change {
                        Change::Reserve(new) => for a in new {
                            prop_assert!(!kubelet_held.contains(&a.global_index), "a VM got kubelet-held {}", a.global_index);
                        },
                        Change::KubeletReserve(new) => for h in new {
                            prop_assert!(!vm_held.contains(&h.global_index), "the kubelet got VM-held {}", h.global_index);
                        },
                        _ => {}
                    }
                    pool.apply(&change);
                }
                Err(_) => prop_assert_eq!(&pool, &before, "a refused plan changed the pool"),
            }
            pool.check_invariants().map_err(TestCaseError::fail)?;
            let held = pool.assignments().count() + pool.kubelet_holds().count();
            let free: usize = FUNCTIONS.iter().map(|f| pool.free_count(f)).sum();
            prop_assert_eq!(held + free, VFS as usize);
            for vf in pool.vfs() {
                let by_vm = pool.assignment(vf.global_index).is_some();
                let by_kubelet = pool.kubelet_hold(vf.global_index).is_some();
                prop_assert!(!(by_vm && by_kubelet));
            }
        }
    }
}
