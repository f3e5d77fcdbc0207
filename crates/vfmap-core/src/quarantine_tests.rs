use super::*;
use crate::pool::{AssignState, PoolVf, Request, SlotId, VmBackend, VmName, VmSpec};
use crate::profile::{DriverName, FunctionName};

const fn g(i: u32) -> GlobalIndex {
    GlobalIndex::new(i)
}

fn pool() -> Pool {
    let pf = Bdf::new(0, 1, 0, 0).unwrap();
    let mut pool = Pool::new((0..2).map(|i| PoolVf {
        global_index: g(i),
        location: pf.vf_location(1, 1, i as u16).unwrap(),
        pf,
        function: Some(FunctionName::new("crypto").unwrap()),
        host_driver: Some(DriverName::new("vfio-pci").unwrap()),
        guest_driver: Some(DriverName::new("pci-stub").unwrap()),
        numa_node: None,
        vendor: None,
        device: None,
    }));
    let vm = VmSpec {
        name: VmName::new("web").unwrap(),
        backend: VmBackend::Qmp {
            qmp_socket: "/run/web.qmp".into(),
            agent_socket: "/run/web.agent".into(),
        },
        slots: vec![SlotId::new("rp0").unwrap(), SlotId::new("rp1").unwrap()],
        numa_node: None,
    };
    let change = pool.plan_add_vm(vm).unwrap();
    pool.apply(&change);
    pool
}

fn request(count: u32) -> Request {
    Request {
        vm: VmName::new("web").unwrap(),
        function: "crypto".into(),
        count,
        numa_node: None,
        pf: None,
    }
}

/// Attaches VF 0 to `web` and takes it to `Releasing`.
fn releasing(pool: &mut Pool) {
    let change = pool.plan_reserve(&request(1)).unwrap();
    pool.apply(&change);
    let mut state = AssignState::Reserved;
    while let Some(next) = state.next_attach_step() {
        let change = pool.plan_set_state(g(0), next).unwrap();
        pool.apply(&change);
        state = next;
    }
    let change = pool.plan_set_state(g(0), AssignState::Releasing).unwrap();
    pool.apply(&change);
}

#[test]
fn a_released_vf_goes_to_quarantine_is_never_handed_out_and_comes_back_when_cleared() {
    let mut pool = pool();
    releasing(&mut pool);
    for change in pool
        .plan_free_into_quarantine(g(0), "bus master on", 7)
        .unwrap()
    {
        pool.apply(&change);
    }
    pool.check_invariants().unwrap();
    assert!(pool.assignment(g(0)).is_none());
    assert!(
        matches!(pool.holder(g(0)), HolderRef::Quarantined(q) if q.reason == "bus master on" && q.since == 7)
    );
    assert_eq!(pool.free_count("crypto"), 1);
    // Two VFs asked: only one is free.
    assert!(matches!(
        pool.plan_reserve(&request(2)),
        Err(PoolError::NoFreeVf { free: 1, .. })
    ));
    let change = pool.plan_reserve(&request(1)).unwrap();
    assert!(matches!(&change, Change::Reserve(a) if a[0].global_index == g(1)));
    assert!(matches!(
        pool.plan_kubelet_reserve("crypto", &[g(0)], None, 0),
        Err(PoolError::Taken { .. })
    ));
    let clear = pool.plan_clear_quarantine(g(0)).unwrap();
    pool.apply(&clear);
    pool.check_invariants().unwrap();
    assert_eq!(pool.free_count("crypto"), 2);
    assert_eq!(
        pool.plan_clear_quarantine(g(0)),
        Err(PoolError::NotQuarantined(g(0)))
    );
}

#[test]
fn a_held_vf_ends_in_quarantine_a_free_or_held_by_the_kubelet_one_does_not() {
    let mut pool = pool();
    assert_eq!(
        pool.plan_free_into_quarantine(g(0), "x", 0),
        Err(PoolError::NotAssigned(g(0)))
    );
    // An attach rolled back.
    let change = pool.plan_reserve(&request(1)).unwrap();
    pool.apply(&change);
    for change in pool.plan_free_into_quarantine(g(0), "x", 0).unwrap() {
        pool.apply(&change);
    }
    pool.check_invariants().unwrap();
    assert_eq!(
        pool.plan_free_into_quarantine(g(0), "x", 0),
        Err(PoolError::NotAssigned(g(0)))
    );
    let change = pool
        .plan_kubelet_reserve("crypto", &[g(1)], None, 0)
        .unwrap();
    pool.apply(&change);
    assert!(matches!(
        pool.plan_free_into_quarantine(g(1), "x", 0),
        Err(PoolError::BadTransition { from: "held", .. })
    ));
}

#[test]
fn a_kubelet_release_can_end_in_quarantine() {
    let mut pool = pool();
    let change = pool
        .plan_kubelet_reserve("crypto", &[g(1)], None, 0)
        .unwrap();
    pool.apply(&change);
    let change = pool.plan_kubelet_release(g(1)).unwrap();
    pool.apply(&change);
    for change in pool
        .plan_free_into_quarantine(g(1), "wipe failed", 1)
        .unwrap()
    {
        pool.apply(&change);
    }
    pool.check_invariants().unwrap();
    assert!(matches!(pool.holder(g(1)), HolderRef::Quarantined(_)));
}

#[test]
fn restored_quarantines_that_clash_are_rejected_and_long_reasons_cut() {
    let mut pool = pool();
    releasing(&mut pool);
    let location = pool.vf(g(0)).unwrap().location;
    let q = |gi: u32, location| Quarantine {
        global_index: g(gi),
        location,
        reason: "r".into(),
        since: 0,
    };
    let other = pool.vf(g(1)).unwrap().location;
    let rejected = pool.restore_quarantine(vec![q(0, location), q(1, location), q(1, other)]);
    assert_eq!(
        rejected.len(),
        2,
        "held, and at another location: {rejected:?}"
    );
    assert!(pool.quarantine_of(g(1)).is_some());
    pool.check_invariants().unwrap();
    let long = "é".repeat(MAX_REASON);
    let mut pool = self::pool();
    releasing(&mut pool);
    let changes = pool.plan_free_into_quarantine(g(0), &long, 0).unwrap();
    let Change::Quarantine(q) = &changes[1] else {
        panic!("{changes:?}")
    };
    assert!(q.reason.len() <= MAX_REASON && q.reason.chars().all(|c| c == 'é'));
}
