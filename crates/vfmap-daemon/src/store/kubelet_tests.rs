//! The store's kubelet holds: the version-1 to version-2 migration, and holds kept with VMs'
//! assignments in one table.

use super::*;
use vfmap_core::SlotId;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

fn vm(name: &str) -> VmSpec {
    VmSpec {
        name: VmName::new(name).unwrap(),
        backend: vfmap_core::VmBackend::Qmp {
            qmp_socket: "/run/q".into(),
            agent_socket: "/run/a".into(),
        },
        slots: vec![SlotId::new("rp0").unwrap()],
        numa_node: None,
    }
}

fn hold(gi: u32, location: &str) -> KubeletHold {
    KubeletHold {
        global_index: GlobalIndex::new(gi),
        location: bdf(location),
        function: FunctionName::new("crypto").unwrap(),
        owner: None,
        allocated_at_ms: 1_700_000_000_000,
        state: HoldState::Held,
    }
}

/// The tables as a version-1 daemon created them.
const SCHEMA_V1: &str = "
CREATE TABLE vfs (global_index INTEGER PRIMARY KEY, location TEXT NOT NULL UNIQUE);
CREATE TABLE vms (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE assignments (
    global_index INTEGER PRIMARY KEY REFERENCES vfs(global_index),
    location     TEXT NOT NULL,
    vm           TEXT NOT NULL REFERENCES vms(name),
    local_index  INTEGER NOT NULL,
    function     TEXT NOT NULL,
    state        TEXT NOT NULL,
    guest_path   TEXT,
    guest_bdf    TEXT,
    guest_driver TEXT,
    UNIQUE (vm, local_index)
);
CREATE TABLE failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, local_index INTEGER NOT NULL,
    function TEXT NOT NULL, global_index INTEGER NOT NULL, reason TEXT NOT NULL,
    at INTEGER NOT NULL
);
PRAGMA user_version = 1;
";

#[tokio::test]
async fn a_version_1_database_is_migrated_with_its_assignments() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    {
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute(
            "INSERT INTO vms (name, spec) VALUES ('web', ?1)",
            [serde_json::to_string(&vm("web")).unwrap()],
        )
        .unwrap();
        conn.execute_batch(
            "INSERT INTO vfs VALUES (0, '0000:01:00.1'), (1, '0000:01:00.2');
             INSERT INTO assignments (global_index, location, vm, local_index, function, state, guest_path)
             VALUES (0, '0000:01:00.1', 'web', 0, 'crypto', 'ready', '03.0/00.0');",
        )
        .unwrap();
    }
    let locations = [bdf("0000:01:00.1"), bdf("0000:01:00.2")];
    let (store, loaded) = Store::open(&db, &locations).unwrap();
    assert_eq!(loaded.vms, [vm("web")]);
    assert_eq!(loaded.assignments.len(), 1);
    let (a, detail) = &loaded.assignments[0];
    assert_eq!((a.vm.as_str(), a.state), ("web", AssignState::Ready));
    assert_eq!(
        detail.guest_path.map(|p| p.to_string()).as_deref(),
        Some("03.0/00.0")
    );
    assert!(loaded.kubelet.is_empty());
    // The migrated table takes kubelet rows.
    store
        .write(vec![Mutation::Pool(Change::KubeletReserve(vec![hold(
            1,
            "0000:01:00.2",
        )]))])
        .await
        .unwrap();
    drop(store);
    let (_, loaded) = Store::open(&db, &locations).unwrap();
    assert_eq!(loaded.assignments.len(), 1);
    assert_eq!(loaded.kubelet, [hold(1, "0000:01:00.2")]);
    let conn = Connection::open(&db).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let old: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'assignments_v1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old, 0);
}

#[tokio::test]
async fn kubelet_holds_share_the_table_and_changes_check_their_holder() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let locations = [bdf("0000:01:00.1"), bdf("0000:01:00.2")];
    let (store, _) = Store::open(&db, &locations).unwrap();
    store
        .write(vec![Mutation::Pool(Change::AddVm(vm("web")))])
        .await
        .unwrap();
    store
        .write(vec![Mutation::Pool(Change::KubeletReserve(vec![hold(
            0,
            "0000:01:00.1",
        )]))])
        .await
        .unwrap();
    // The same VF for a VM: the one table refuses it.
    let vm_too = store
        .write(vec![Mutation::Pool(Change::Reserve(vec![Assignment {
            global_index: GlobalIndex::new(0),
            location: bdf("0000:01:00.1"),
            vm: VmName::new("web").unwrap(),
            local_index: LocalIndex::new(0),
            function: FunctionName::new("crypto").unwrap(),
            state: AssignState::Reserved,
        }]))])
        .await;
    assert!(vm_too.is_err());
    // A VM's change does not touch a kubelet row, nor a kubelet change a missing one.
    let vm_free = store
        .write(vec![Mutation::Pool(Change::SetState {
            global_index: GlobalIndex::new(0),
            from: AssignState::Releasing,
            state: AssignState::Releasing,
        })])
        .await;
    assert!(vm_free.is_err());
    assert!(
        store
            .write(vec![Mutation::Pool(Change::KubeletFree {
                global_index: GlobalIndex::new(1)
            })])
            .await
            .is_err()
    );
    let owner = PodContainer::new("default", "vf-pod", "app").unwrap();
    store
        .write(vec![Mutation::Pool(Change::KubeletOwner {
            global_index: GlobalIndex::new(0),
            owner: owner.clone(),
        })])
        .await
        .unwrap();
    drop(store);
    let (store, loaded) = Store::open(&db, &locations).unwrap();
    let mut want = hold(0, "0000:01:00.1");
    want.owner = Some(owner);
    assert_eq!(loaded.kubelet, [want]);
    assert!(loaded.assignments.is_empty());
    store
        .write(vec![
            Mutation::Pool(Change::KubeletReleasing {
                global_index: GlobalIndex::new(0),
            }),
            Mutation::Pool(Change::KubeletFree {
                global_index: GlobalIndex::new(0),
            }),
        ])
        .await
        .unwrap();
    drop(store);
    let (_, loaded) = Store::open(&db, &locations).unwrap();
    assert!(loaded.kubelet.is_empty());
}
