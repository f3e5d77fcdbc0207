//! The pipelined multi-VF attach with in-process doubles: one request plugs every VF in order
//! and asks the agent once; a failure anywhere rolls back the whole request; an attach cut off
//! between two plugs is recovered; a slow VM delays no other.

mod doubles;

use std::time::{Duration, Instant};

use doubles::{Rig, free, request};
use vfmap_core::{AssignState, LocalIndex};
use vfmap_daemon::engine::{EngineError, StepError};

#[tokio::test]
async fn one_request_plugs_every_vf_in_order_and_asks_the_agent_once() {
    let rig = Rig::new(8, 4);
    let engine = rig.engine().await;
    rig.add_vm(&engine, "web").await;
    let rows = engine.attach(request("web", 3)).await.unwrap();
    let got: Vec<(u32, AssignState)> = rows
        .iter()
        .map(|r| (r.local_index.get(), r.state))
        .collect();
    assert_eq!(
        got,
        [
            (0, AssignState::Ready),
            (1, AssignState::Ready),
            (2, AssignState::Ready)
        ]
    );
    // device_add in local-index order, one correspondence holding all three entries.
    let adds: Vec<String> = rig
        .hv
        .adds
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    let ids: Vec<String> = rows
        .iter()
        .map(|r| format!("vfmap-vf{}", r.global_index))
        .collect();
    assert_eq!(adds, ids);
    let seen = rig.agent.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one round trip");
    assert_eq!(
        seen[0]
            .1
            .iter()
            .map(|e| e.local_index.get())
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(
        rows.iter()
            .all(|r| r.bound_driver.as_ref().map(|d| d.as_str()) == Some("pci-stub"))
    );
    // The next request sends the whole correspondence again: five entries.
    engine.attach(request("web", 1)).await.unwrap();
    assert_eq!(rig.agent.seen.lock().unwrap()[1].1.len(), 4);
    engine.check().unwrap();
}

#[tokio::test]
async fn a_refused_device_add_in_the_middle_rolls_back_the_whole_request() {
    let rig = Rig::new(8, 4);
    let engine = rig.engine().await;
    rig.add_vm(&engine, "web").await;
    *rig.hv.fail_add.lock().unwrap() = Some(2);
    let err = engine.attach(request("web", 3)).await.unwrap_err();
    let EngineError::AttachFailed { failures, .. } = &err else {
        panic!("{err}")
    };
    // The VF whose device_add failed comes first (it decides the API's code); the others were
    // rolled back cleanly, so they are not listed.
    assert_eq!(failures.len(), 1, "{err}");
    assert_eq!(failures[0].local_index, LocalIndex::new(1));
    assert!(
        matches!(failures[0].error, StepError::Hypervisor(_)),
        "{err}"
    );
    assert!(err.to_string().contains("device_add 2 refused"), "{err}");
    assert_eq!(
        rig.hv.adds.lock().unwrap().len(),
        2,
        "the third was never tried"
    );
    assert!(
        rig.hv.plugged.lock().unwrap()["web"].is_empty(),
        "the first was unplugged"
    );
    assert!(
        rig.agent.seen.lock().unwrap().is_empty(),
        "the agent heard nothing"
    );
    assert_eq!(free(&engine), 8);
    let view = engine.vm_view("web").unwrap();
    assert!(view.correspondence.is_empty());
    let reasons: Vec<&str> = view.failures.iter().map(|f| f.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("device_add 2 refused")),
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("another VF of the request failed"))
            .count(),
        2
    );
    engine.check().unwrap();
}

#[tokio::test]
async fn an_entry_the_agent_refuses_rolls_back_every_vf_of_the_request() {
    let rig = Rig::new(8, 4);
    let engine = rig.engine().await;
    rig.add_vm(&engine, "web").await;
    rig.agent.refuse.lock().unwrap().insert(LocalIndex::new(1));
    let err = engine.attach(request("web", 3)).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("could not bind pci-stub: modprobe failed"),
        "{err}"
    );
    let EngineError::AttachFailed { failures, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].local_index, LocalIndex::new(1));
    // The agent, which bound two of them, is told to let all three go before the unplugs.
    let seen: Vec<usize> = rig
        .agent
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, entries)| entries.len())
        .collect();
    assert_eq!(seen, [3, 0]);
    assert!(
        rig.hv.plugged.lock().unwrap()["web"].is_empty(),
        "all three unplugged"
    );
    assert_eq!(rig.host.resets.lock().unwrap().len(), 3, "all three reset");
    assert_eq!(free(&engine), 8);
    // Nothing is left behind: the same request succeeds at the same local indexes.
    rig.agent.refuse.lock().unwrap().clear();
    let rows = engine.attach(request("web", 3)).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.local_index.get()).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    engine.check().unwrap();
}

#[tokio::test]
async fn an_attach_cut_off_between_two_plugs_is_rolled_back_at_the_next_start() {
    for plugs in 1..=3usize {
        let rig = Rig::new(8, 4);
        {
            let engine = rig.engine().await;
            rig.add_vm(&engine, "web").await;
            rig.add_vm(&engine, "db").await;
            engine.attach(request("db", 2)).await.unwrap();
            rig.hv
                .add_delay
                .lock()
                .unwrap()
                .insert("web".into(), Duration::from_millis(300));
            // Dropped in the middle of device_add number `plugs`: the ones before are in
            // the VM, the database says host_bound, and nothing else happens (as for a kill).
            let cut = Duration::from_millis(300 * plugs as u64 - 150);
            let attach = tokio::time::timeout(cut, engine.attach(request("web", 3))).await;
            assert!(attach.is_err(), "{plugs}: finished before the cut");
            let in_vm = rig
                .hv
                .plugged
                .lock()
                .unwrap()
                .get("web")
                .map_or(0, |s| s.len());
            assert_eq!(in_vm, plugs - 1, "{plugs}");
            let states: Vec<AssignState> = engine
                .vm_view("web")
                .unwrap()
                .correspondence
                .iter()
                .map(|r| r.state)
                .collect();
            assert_eq!(states, [AssignState::HostBound; 3], "{plugs}");
        }
        let engine = rig.engine().await;
        engine.recover().await.unwrap();
        assert!(
            engine.vm_view("web").unwrap().correspondence.is_empty(),
            "{plugs}"
        );
        assert!(
            rig.hv
                .plugged
                .lock()
                .unwrap()
                .get("web")
                .is_none_or(|ids| ids.is_empty()),
            "{plugs}: unplugged"
        );
        assert_eq!(
            engine.vm_view("db").unwrap().correspondence.len(),
            2,
            "{plugs}"
        );
        assert_eq!(free(&engine), 6, "{plugs}");
        engine.check().unwrap();
    }
}

#[tokio::test]
async fn a_slow_hot_plug_delays_only_its_own_vm() {
    let rig = Rig::new(16, 8);
    let engine = rig.engine().await;
    rig.add_vm(&engine, "slow").await;
    rig.add_vm(&engine, "fast").await;
    rig.hv
        .add_delay
        .lock()
        .unwrap()
        .insert("slow".into(), Duration::from_millis(400));
    let slow = async {
        let started = Instant::now();
        engine.attach(request("slow", 4)).await.unwrap();
        started.elapsed()
    };
    let fast = async {
        // Once the slow request is plugging.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        engine.attach(request("fast", 8)).await.unwrap();
        started.elapsed()
    };
    let (slow, fast) = tokio::join!(slow, fast);
    assert!(slow >= Duration::from_millis(1600), "slow took {slow:?}");
    assert!(
        fast < Duration::from_millis(400),
        "fast waited for slow: {fast:?}"
    );
    assert_eq!(free(&engine), 4);
    engine.check().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_one_vm_leave_the_agent_with_the_whole_correspondence() {
    let rig = Rig::new(8, 8);
    let engine = rig.engine().await;
    rig.add_vm(&engine, "web").await;
    // The first correspondence is slow to be answered: had a later one (with more entries)
    // overtaken it, the agent would end up with the first's smaller set, releasing the rest.
    rig.agent
        .next_delays
        .lock()
        .unwrap()
        .push_back(Duration::from_millis(200));
    let attaches = (0..3u64).map(|i| {
        let engine = &engine;
        async move {
            // The first request's correspondence is on its way when the others start.
            tokio::time::sleep(Duration::from_millis(60 * i)).await;
            engine.attach(request("web", 2)).await
        }
    });
    for rows in futures_util::future::join_all(attaches).await {
        assert_eq!(rows.unwrap().len(), 2);
    }
    // In the order the agent answered.
    let seen: Vec<Vec<u32>> = rig
        .agent
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, entries)| entries.iter().map(|e| e.local_index.get()).collect())
        .collect();
    assert_eq!(seen.last().unwrap(), &[0, 1, 2, 3, 4, 5], "{seen:?}");
    engine.check().unwrap();
}
