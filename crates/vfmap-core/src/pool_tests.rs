use super::*;
const fn g(i: u32) -> GlobalIndex {
    GlobalIndex::new(i)
}
const fn l(i: u32) -> LocalIndex {
    LocalIndex::new(i)
}
use proptest::prelude::*;

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

fn vf(gi: u32, pf: u8, function: &str, numa: i32) -> PoolVf {
    let pf_bdf = Bdf::new(0, pf, 0, 0).unwrap();
    PoolVf {
        global_index: g(gi),
        location: pf_bdf.vf_location(1, 1, gi as u16).unwrap(),
        pf: pf_bdf,
        function: Some(FunctionName::new(function).unwrap()),
        host_driver: Some(DriverName::new("vfio-pci").unwrap()),
        guest_driver: Some(DriverName::new("pci-stub").unwrap()),
        numa_node: Some(numa),
        vendor: None,
        device: None,
    }
}

fn vm(n: &str, slots: usize, numa: Option<i32>) -> VmSpec {
    VmSpec {
        name: name(n),
        backend: VmBackend::Qmp {
            qmp_socket: format!("/run/{n}.qmp"),
            agent_socket: format!("/run/{n}.agent"),
        },
        slots: (0..slots)
            .map(|i| SlotId::new(&format!("rp{i}")).unwrap())
            .collect(),
        numa_node: numa,
    }
}

fn request(v: &str, function: &str, count: u32) -> Request {
    Request {
        vm: name(v),
        function: function.into(),
        count,
        numa_node: None,
        pf: None,
    }
}

fn pool_with(vfs: Vec<PoolVf>, vms: Vec<VmSpec>) -> Pool {
    let mut pool = Pool::new(vfs);
    for v in vms {
        let change = pool.plan_add_vm(v).unwrap();
        pool.apply(&change);
    }
    pool
}

fn reserved(change: &Change) -> &[Assignment] {
    match change {
        Change::Reserve(a) => a,
        other => panic!("not a reservation: {other:?}"),
    }
}

#[test]
fn names_and_slots() {
    assert!(VmName::new("web-1").is_ok());
    assert!(VmName::new("").is_err());
    assert!(VmName::new("a/b").is_err());
    assert!(VmName::new("-x").is_err());
    assert!(SlotId::new("rp0").is_ok());
    assert!(SlotId::new("0rp").is_err());
    assert!(SlotId::new("rp 0").is_err());
}

#[test]
fn reserve_takes_lowest_local_indexes_and_spreads_over_pfs() {
    let vfs = vec![
        vf(0, 1, "crypto", 0),
        vf(1, 1, "crypto", 0),
        vf(2, 2, "crypto", 0),
        vf(3, 2, "crypto", 0),
        vf(4, 2, "crypto", 0),
    ];
    let pool = pool_with(vfs, vec![vm("web", 4, None)]);
    let change = pool.plan_reserve(&request("web", "crypto", 2)).unwrap();
    let got = reserved(&change);
    assert_eq!(
        got.iter().map(|a| a.local_index).collect::<Vec<_>>(),
        [l(0), l(1)]
    );
    let pfs: Vec<u8> = got
        .iter()
        .map(|a| pool.vf(a.global_index).unwrap().pf.bus)
        .collect();
    assert_eq!(
        pfs,
        [2, 1],
        "first from the PF with most free VFs, then the other PF"
    );
    assert!(got.iter().all(|a| a.state == AssignState::Reserved));
}

#[test]
fn reserve_prefers_the_vms_numa_node_and_honours_filters() {
    let vfs = vec![
        vf(0, 1, "crypto", 0),
        vf(1, 2, "crypto", 1),
        vf(2, 2, "crypto", 1),
    ];
    let pool = pool_with(vfs, vec![vm("web", 4, Some(0))]);
    let change = pool.plan_reserve(&request("web", "crypto", 1)).unwrap();
    assert_eq!(reserved(&change)[0].global_index, g(0));
    let mut on_node_1 = request("web", "crypto", 3);
    on_node_1.numa_node = Some(1);
    let err = pool.plan_reserve(&on_node_1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "3 VF(s) of function \"crypto\" requested on NUMA node 1, 2 free"
    );
    let mut on_pf = request("web", "crypto", 1);
    on_pf.pf = Some(Bdf::new(0, 2, 0, 0).unwrap());
    assert_eq!(
        reserved(&pool.plan_reserve(&on_pf).unwrap())[0].global_index,
        g(1)
    );
}

#[test]
fn reserve_errors() {
    let pool = pool_with(vec![vf(0, 1, "crypto", 0)], vec![vm("web", 1, None)]);
    assert_eq!(
        pool.plan_reserve(&request("nope", "crypto", 1)),
        Err(PoolError::UnknownVm("nope".into()))
    );
    assert_eq!(
        pool.plan_reserve(&request("web", "dance", 1)),
        Err(PoolError::UnknownFunction("dance".into()))
    );
    assert!(matches!(
        pool.plan_reserve(&request("web", "crypto", 2)),
        Err(PoolError::NoFreeVf { free: 1, .. })
    ));
    assert!(matches!(
        pool.plan_reserve(&request("web", "crypto", 0)),
        Err(PoolError::InvalidRequest(_))
    ));
    let pool = pool_with(
        vec![vf(0, 1, "crypto", 0), vf(1, 1, "crypto", 0)],
        vec![vm("web", 1, None)],
    );
    assert!(matches!(
        pool.plan_reserve(&request("web", "crypto", 2)),
        Err(PoolError::NoFreeSlot {
            free: 1,
            total: 1,
            ..
        })
    ));
}

#[test]
fn state_machine_allows_only_forward_steps_and_release_from_ready() {
    let mut pool = pool_with(vec![vf(0, 1, "crypto", 0)], vec![vm("web", 2, None)]);
    let change = pool.plan_reserve(&request("web", "crypto", 1)).unwrap();
    pool.apply(&change);
    assert!(matches!(
        pool.plan_release("web", l(0)),
        Err(PoolError::Busy {
            state: "reserved",
            ..
        })
    ));
    assert!(pool.plan_set_state(g(0), AssignState::Plugged).is_err());
    for state in [
        AssignState::HostBound,
        AssignState::Plugged,
        AssignState::Sent,
        AssignState::Ready,
    ] {
        let change = pool.plan_set_state(g(0), state).unwrap();
        pool.apply(&change);
    }
    assert!(pool.plan_set_state(g(0), AssignState::Sent).is_err());
    assert!(matches!(
        pool.plan_remove_vm("web"),
        Err(PoolError::VmHoldsVfs { count: 1, .. })
    ));
    let change = pool.plan_release("web", l(0)).unwrap();
    pool.apply(&change);
    let change = pool.plan_free(g(0)).unwrap();
    pool.apply(&change);
    assert_eq!(pool.free_count("crypto"), 1);
    assert!(pool.plan_remove_vm("web").is_ok());
    assert!(matches!(
        pool.plan_release("web", l(1)),
        Err(PoolError::NoSuchLocalIndex { .. })
    ));
}

#[test]
fn vm_registration_is_validated() {
    let pool = pool_with(vec![], vec![vm("web", 1, None)]);
    assert!(matches!(
        pool.plan_add_vm(vm("web", 1, None)),
        Err(PoolError::VmExists(_))
    ));
    assert!(matches!(
        pool.plan_add_vm(vm("db", 0, None)),
        Err(PoolError::InvalidVm(_))
    ));
    let mut twice = vm("db", 2, None);
    twice.slots[1] = twice.slots[0].clone();
    assert!(matches!(
        pool.plan_add_vm(twice),
        Err(PoolError::InvalidVm(_))
    ));
    let mut relative = vm("db", 1, None);
    relative.backend = VmBackend::Qmp {
        qmp_socket: "qmp.sock".into(),
        agent_socket: "/run/db.agent".into(),
    };
    assert!(matches!(
        pool.plan_add_vm(relative),
        Err(PoolError::InvalidVm(_))
    ));
}

#[test]
fn libvirt_vms_are_checked_like_qmp_ones() {
    let pool = Pool::default();
    let libvirt = |domain: &str, uri: &str, port: &str, socket: &str| VmSpec {
        backend: VmBackend::Libvirt {
            domain: domain.into(),
            uri: uri.into(),
            port_name: port.into(),
            agent_socket: socket.into(),
            persistent: false,
        },
        ..vm("dom", 2, None)
    };
    assert!(
        pool.plan_add_vm(libvirt("dom", "qemu:///system", "org.vfmap.0", "/run/a"))
            .is_ok()
    );
    assert!(
        pool.plan_add_vm(libvirt(
            "dom",
            "qemu+unix:///system?socket=/run/l",
            "vfmap",
            "/run/a"
        ))
        .is_ok()
    );
    for (domain, uri, port, socket) in [
        ("-dom", "qemu:///system", "org.vfmap.0", "/run/a"),
        ("a/b", "qemu:///system", "org.vfmap.0", "/run/a"),
        ("dom", "qemu+ssh://host/system", "org.vfmap.0", "/run/a"),
        ("dom", "qemu://host/system", "org.vfmap.0", "/run/a"),
        ("dom", "qemu:///system", "a b", "/run/a"),
        ("dom", "qemu:///system", "org.vfmap.0", "rel"),
    ] {
        assert!(
            matches!(
                pool.plan_add_vm(libvirt(domain, uri, port, socket)),
                Err(PoolError::InvalidVm(_))
            ),
            "{domain} {uri} {port} {socket}"
        );
    }
}

#[test]
fn restore_rejects_what_breaks_invariants() {
    let mut pool = Pool::new(vec![vf(0, 1, "crypto", 0), vf(1, 1, "crypto", 0)]);
    let a = |gi: u32, local: u32, v: &str| Assignment {
        global_index: g(gi),
        location: pool_vf_location(gi),
        vm: name(v),
        local_index: l(local),
        function: FunctionName::new("crypto").unwrap(),
        state: AssignState::Ready,
    };
    let rejected = pool.restore(
        vec![vm("web", 2, None)],
        vec![a(0, 0, "web"), a(1, 0, "web"), a(1, 1, "ghost")],
    );
    assert_eq!(rejected.len(), 2);
    pool.check_invariants().unwrap();
}

fn pool_vf_location(gi: u32) -> Bdf {
    Bdf::new(0, 1, 0, 0)
        .unwrap()
        .vf_location(1, 1, gi as u16)
        .unwrap()
}

#[test]
fn recovery_rolls_back_attaches_and_finishes_releases() {
    assert_eq!(
        plan_recovery(AssignState::Reserved, false),
        Recovery::RollBack
    );
    assert_eq!(
        plan_recovery(AssignState::Plugged, true),
        Recovery::RollBack
    );
    assert_eq!(plan_recovery(AssignState::Sent, true), Recovery::RollBack);
    assert_eq!(plan_recovery(AssignState::Ready, true), Recovery::Keep);
    assert_eq!(plan_recovery(AssignState::Ready, false), Recovery::Lost);
    assert_eq!(
        plan_recovery(AssignState::Releasing, true),
        Recovery::FinishRelease
    );
}

/// One step of a random history: attach, advance, release, free, or crash-and-recover.
#[derive(Debug, Clone)]
enum Op {
    Attach {
        vm: usize,
        function: usize,
        count: u32,
    },
    Advance {
        pick: usize,
    },
    /// A pipelined request's step: every attaching VF of the VM moves on in one commit.
    AdvanceVm {
        vm: usize,
    },
    /// A pipelined request's rollback: every attaching VF of the VM is freed.
    FailVm {
        vm: usize,
    },
    Fail {
        pick: usize,
    },
    Release {
        vm: usize,
        local: u32,
    },
    Finish {
        pick: usize,
    },
    Crash {
        plugged_mask: u64,
    },
    RemoveVm {
        vm: usize,
    },
    AddVm {
        vm: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, 0..2usize, 1..4u32).prop_map(|(vm, function, count)| Op::Attach {
            vm,
            function,
            count
        }),
        (0..64usize).prop_map(|pick| Op::Advance { pick }),
        (0..3usize).prop_map(|vm| Op::AdvanceVm { vm }),
        (0..3usize).prop_map(|vm| Op::FailVm { vm }),
        (0..64usize).prop_map(|pick| Op::Fail { pick }),
        (0..3usize, 0..5u32).prop_map(|(vm, local)| Op::Release { vm, local }),
        (0..64usize).prop_map(|pick| Op::Finish { pick }),
        any::<u64>().prop_map(|plugged_mask| Op::Crash { plugged_mask }),
        (0..3usize).prop_map(|vm| Op::RemoveVm { vm }),
        (0..3usize).prop_map(|vm| Op::AddVm { vm }),
    ]
}

const VMS: [&str; 3] = ["a", "b", "c"];
const FUNCTIONS: [&str; 2] = ["crypto", "compress"];

fn nth_assignment(
    pool: &Pool,
    pick: usize,
    filter: impl Fn(&Assignment) -> bool,
) -> Option<GlobalIndex> {
    let matching: Vec<_> = pool
        .assignments()
        .filter(|a| filter(a))
        .map(|a| a.global_index)
        .collect();
    (!matching.is_empty()).then(|| matching[pick % matching.len()])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random attach/advance/fail/release/crash histories never double-book a VF, never
    /// leak one, and keep local indexes unique per VM; a rejected plan changes nothing.
    #[test]
    fn histories_never_double_book_or_leak(ops in proptest::collection::vec(op(), 1..80)) {
        let vfs: Vec<PoolVf> = (0..10)
            .map(|i| vf(i, (i % 3) as u8 + 1, FUNCTIONS[(i % 2) as usize], (i % 2) as i32))
            .collect();
        let mut pool = pool_with(vfs, VMS.iter().map(|n| vm(n, 4, None)).collect());
        for op in ops {
            let before = pool.clone();
            let change = match op {
                Op::Attach { vm, function, count } => pool.plan_reserve(&request(VMS[vm], FUNCTIONS[function], count)),
                Op::Advance { pick } => match nth_assignment(&pool, pick, |a| a.state.is_attaching()) {
                    Some(gi) => {
                        let next = pool.assignment(gi).and_then(|a| a.state.next_attach_step());
                        pool.plan_set_state(gi, next.unwrap_or(AssignState::Ready))
                    }
                    None => continue,
                },
                Op::AdvanceVm { vm } | Op::FailVm { vm } => {
                    // Planned all on the same state, then applied all (one commit).
                    let attaching: Vec<Assignment> = pool
                        .assignments_of(&name(VMS[vm]))
                        .filter(|a| a.state.is_attaching())
                        .cloned()
                        .collect();
                    let planned: Result<Vec<Vec<Change>>, PoolError> = attaching
                        .iter()
                        .map(|a| match op {
                            Op::AdvanceVm { .. } => pool.plan_advance(
                                a.global_index,
                                &[a.state.next_attach_step().unwrap_or(AssignState::Ready)],
                            ),
                            _ => pool.plan_free(a.global_index).map(|c| vec![c]),
                        })
                        .collect();
                    match planned {
                        Ok(changes) => {
                            for change in changes.iter().flatten() {
                                pool.apply(change);
                            }
                        }
                        Err(_) => prop_assert_eq!(&pool, &before, "a refused plan changed the pool"),
                    }
                    pool.check_invariants().map_err(TestCaseError::fail)?;
                    let assigned = pool.assignments().count();
                    let free: usize = FUNCTIONS.iter().map(|f| pool.free_count(f)).sum();
                    prop_assert_eq!(assigned + free, 10);
                    continue;
                }
                Op::Fail { pick } => match nth_assignment(&pool, pick, |a| a.state.is_attaching()) {
                    Some(gi) => pool.plan_free(gi),
                    None => continue,
                },
                Op::Release { vm, local } => pool.plan_release(VMS[vm], l(local)),
                Op::Finish { pick } => match nth_assignment(&pool, pick, |a| a.state == AssignState::Releasing) {
                    Some(gi) => pool.plan_free(gi),
                    None => continue,
                },
                Op::Crash { plugged_mask } => {
                    // Restart: reload from "disk" (a copy), then recover every assignment.
                    let vms: Vec<VmSpec> = pool.vms().cloned().collect();
                    let held: Vec<Assignment> = pool.assignments().cloned().collect();
                    let mut reloaded = Pool::new(pool.vfs().cloned().collect::<Vec<_>>());
                    prop_assert!(reloaded.restore(vms, held).is_empty());
                    for a in reloaded.assignments().cloned().collect::<Vec<_>>() {
                        let plugged = plugged_mask & (1 << a.global_index.get()) != 0;
                        if plan_recovery(a.state, plugged) != Recovery::Keep {
                            let change = reloaded.plan_free(a.global_index).unwrap();
                            reloaded.apply(&change);
                        }
                    }
                    prop_assert!(reloaded.assignments().all(|a| a.state == AssignState::Ready));
                    pool = reloaded;
                    pool.check_invariants().map_err(TestCaseError::fail)?;
                    continue;
                }
                Op::RemoveVm { vm } => pool.plan_remove_vm(VMS[vm]),
                Op::AddVm { vm: v } => pool.plan_add_vm(vm(VMS[v], 4, None)),
            };
            match change {
                Ok(change) => pool.apply(&change),
                Err(_) => prop_assert_eq!(&pool, &before, "a refused plan changed the pool"),
            }
            pool.check_invariants().map_err(TestCaseError::fail)?;
            // No leak: every VF is either free or in exactly one assignment.
            let assigned = pool.assignments().count();
            let free: usize = FUNCTIONS.iter().map(|f| pool.free_count(f)).sum();
            prop_assert_eq!(assigned + free, 10);
        }
    }
}
