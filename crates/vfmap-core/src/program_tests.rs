use super::*;
use crate::pool::{PoolVf, Request, SlotId, VmBackend, VmName, VmSpec};

const fn g(i: u32) -> GlobalIndex {
    GlobalIndex::new(i)
}

fn f(name: &str) -> FunctionName {
    FunctionName::new(name).unwrap()
}

fn d(name: &str) -> DriverName {
    DriverName::new(name).unwrap()
}

fn compress() -> Drivers {
    Drivers {
        host: d("vfio-pci"),
        guest: d("uio_pci_generic"),
    }
}

/// VF 0 and 1 carry crypto, VF 2 compress; VM `web` has two slots.
fn pool() -> Pool {
    let pf = Bdf::new(0, 1, 0, 0).unwrap();
    let mut pool = Pool::new((0..3).map(|i| PoolVf {
        global_index: g(i),
        location: pf.vf_location(1, 1, i as u16).unwrap(),
        pf,
        function: Some(f(if i < 2 { "crypto" } else { "compress" })),
        host_driver: Some(d("vfio-pci")),
        guest_driver: Some(d(if i < 2 { "pci-stub" } else { "uio_pci_generic" })),
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

fn request(function: &str, count: u32) -> Request {
    Request {
        vm: VmName::new("web").unwrap(),
        function: function.into(),
        count,
        numa_node: None,
        pf: None,
    }
}

#[test]
fn a_free_vf_is_out_of_the_pool_while_programmed_then_carries_the_new_function() {
    let mut pool = pool();
    let start = pool.plan_program(g(0), &f("compress")).unwrap();
    pool.apply(&start);
    pool.check_invariants().unwrap();
    assert!(matches!(pool.holder(g(0)), HolderRef::Programming(p) if p.from.as_str() == "crypto"));
    assert_eq!(pool.free_count("crypto"), 1);
    assert_eq!(pool.free_count("compress"), 1);
    assert!(matches!(
        pool.plan_program(g(0), &f("compress")),
        Err(PoolError::Taken { .. })
    ));
    assert!(matches!(
        pool.plan_kubelet_reserve("crypto", &[g(0)], None, 0),
        Err(PoolError::Taken { .. })
    ));
    let done = pool.plan_programmed(g(0), compress()).unwrap();
    pool.apply(&done);
    pool.check_invariants().unwrap();
    let vf = pool.vf(g(0)).unwrap();
    assert_eq!(vf.function.as_ref().unwrap().as_str(), "compress");
    assert_eq!(
        vf.guest_driver.as_ref().unwrap().as_str(),
        "uio_pci_generic"
    );
    assert_eq!(pool.free_count("compress"), 2);
    let reserve = pool.plan_reserve(&request("compress", 2)).unwrap();
    pool.apply(&reserve);
    pool.check_invariants().unwrap();
    assert_eq!(
        pool.plan_programmed(g(0), compress()),
        Err(PoolError::NotProgramming(g(0)))
    );
}

#[test]
fn a_held_vf_or_one_already_carrying_the_function_is_refused() {
    let mut pool = pool();
    let reserve = pool.plan_reserve(&request("compress", 1)).unwrap();
    pool.apply(&reserve);
    assert!(matches!(
        pool.plan_program(g(2), &f("crypto")),
        Err(PoolError::Taken { by, .. }) if by == "VM web"
    ));
    assert!(matches!(
        pool.plan_program(g(1), &f("crypto")),
        Err(PoolError::FunctionConflict { problem, .. }) if problem == "already carries crypto"
    ));
    assert_eq!(
        pool.plan_program(g(9), &f("crypto")),
        Err(PoolError::UnknownVf(g(9)))
    );
}

#[test]
fn a_failed_re_programming_ends_in_quarantine_with_the_old_function() {
    let mut pool = pool();
    let start = pool.plan_program(g(1), &f("compress")).unwrap();
    pool.apply(&start);
    for change in pool.plan_program_failed(g(1), "exit status 3", 5).unwrap() {
        pool.apply(&change);
    }
    pool.check_invariants().unwrap();
    let HolderRef::Quarantined(q) = pool.holder(g(1)) else {
        panic!("{:?}", pool.holder(g(1)))
    };
    assert_eq!(
        q.reason,
        "re-programming from crypto into compress failed: exit status 3"
    );
    assert_eq!(
        pool.vf(g(1)).unwrap().function.as_ref().unwrap().as_str(),
        "crypto"
    );
}

#[test]
fn stored_functions_and_interrupted_re_programmings_are_restored() {
    let mut pool = pool();
    let gone = pool.restore_functions(vec![
        (g(0), f("compress"), compress()),
        (g(7), f("x"), compress()),
    ]);
    assert_eq!(gone, [g(7)]);
    assert_eq!(pool.free_count("compress"), 2);
    let location = pool.vf(g(1)).unwrap().location;
    let p = |gi: u32, location| Programming {
        global_index: g(gi),
        location,
        from: f("crypto"),
        to: f("compress"),
    };
    let rejected = pool.restore_programming(vec![p(1, location), p(1, location), p(2, location)]);
    assert_eq!(
        rejected.len(),
        2,
        "twice, and at another location: {rejected:?}"
    );
    assert!(matches!(pool.holder(g(1)), HolderRef::Programming(_)));
    pool.check_invariants().unwrap();
}
