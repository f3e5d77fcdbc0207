//! Multi-VF attach requests through the real engine and store with in-process doubles of the
//! hypervisor, the agent and the host (issue 14 item 1): 8 VMs × 8 VFs, one request per VM,
//! the 8 requests at once against the same 8 one after another, and against 8 one-VF requests
//! per VM (what a request of 8 cost before the attach was pipelined: one hot-plug and one
//! agent round trip after another). Twice: with instant doubles, and with doubles that take a
//! fixed time per device_add and per agent round trip.
//!
//!     cargo bench -p vfmap-daemon --bench attach_pipeline [-- ROUNDS [ADD_MS AGENT_MS]]
//!
//! Prints p50/p99 per request (per VM for the one-VF requests) and the time for all 8 VMs.

#[path = "../tests/doubles/mod.rs"]
mod doubles;

use std::time::{Duration, Instant};

use doubles::{Rig, request};
use futures_util::future::join_all;
use vfmap_core::LocalIndex;
use vfmap_daemon::engine::Engine;

const VMS: usize = 8;
const PER_VM: u32 = 8;

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// One 8-VF request per VM, all VMs at once.
    Concurrent,
    /// One 8-VF request per VM, one VM after another.
    Sequential,
    /// 8 one-VF requests per VM one after another, all VMs at once.
    OneVfConcurrent,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Concurrent => "8 VMs x 1 request of 8 VFs, concurrently",
            Shape::Sequential => "8 VMs x 1 request of 8 VFs, sequentially",
            Shape::OneVfConcurrent => "8 VMs x 8 one-VF requests, VMs concurrently",
        }
    }
}

fn vm_name(i: usize) -> String {
    format!("vm{i}")
}

/// One VM's part of a round: its request(s), timed.
async fn serve_vm(engine: &Engine, vm: &str, shape: Shape) -> Duration {
    let started = Instant::now();
    if shape == Shape::OneVfConcurrent {
        for _ in 0..PER_VM {
            engine.attach(request(vm, 1)).await.expect("attach");
        }
    } else {
        let rows = engine.attach(request(vm, PER_VM)).await.expect("attach");
        assert_eq!(rows.len(), PER_VM as usize);
    }
    started.elapsed()
}

/// One round: every VM gets 8 VFs; returns each VM's time and the round's.
async fn round(engine: &Engine, shape: Shape) -> (Vec<Duration>, Duration) {
    let started = Instant::now();
    let names: Vec<String> = (0..VMS).map(vm_name).collect();
    let times = match shape {
        Shape::Sequential => {
            let mut times = Vec::new();
            for vm in &names {
                times.push(serve_vm(engine, vm, shape).await);
            }
            times
        }
        _ => join_all(names.iter().map(|vm| serve_vm(engine, vm, shape))).await,
    };
    let total = started.elapsed();
    // Give everything back (not timed).
    join_all(names.iter().map(|vm| async move {
        for i in (0..PER_VM).rev() {
            engine.detach(vm, LocalIndex::new(i)).await.expect("detach");
        }
    }))
    .await;
    (times, total)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn run(rounds: usize, add: Duration, agent: Duration) {
    let rig = Rig::new((VMS * PER_VM as usize) as u16, PER_VM as usize);
    let engine = rig.engine().await;
    for i in 0..VMS {
        rig.add_vm(&engine, &vm_name(i)).await;
        rig.hv.add_delay.lock().unwrap().insert(vm_name(i), add);
    }
    *rig.agent.delay.lock().unwrap() = agent;
    let shapes = [Shape::Concurrent, Shape::Sequential, Shape::OneVfConcurrent];
    // Warm-up, then the shapes interleaved round by round.
    for shape in shapes {
        round(&engine, shape).await;
    }
    let mut samples: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); 3];
    for _ in 0..rounds {
        for (k, shape) in shapes.into_iter().enumerate() {
            let (times, total) = round(&engine, shape).await;
            samples[k].0.extend(times);
            samples[k].1.push(total);
        }
    }
    println!(
        "doubles: device_add {}, agent round trip {}; {rounds} rounds, {} requests per shape",
        ms(add),
        ms(agent),
        rounds * VMS
    );
    println!("| shape | per request p50 | p99 | all 8 VMs p50 | p99 |\n|---|---|---|---|---|");
    for (k, shape) in shapes.into_iter().enumerate() {
        let (mut each, mut totals) = samples[k].clone();
        each.sort();
        totals.sort();
        println!(
            "| {} | {} | {} | {} | {} |",
            shape.name(),
            ms(percentile(&each, 50.0)),
            ms(percentile(&each, 99.0)),
            ms(percentile(&totals, 50.0)),
            ms(percentile(&totals, 99.0)),
        );
    }
    engine.check().expect("consistent after the bench");
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let number = |i: usize, default: u64| {
        args.get(i)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let rounds = number(0, 20) as usize;
    let add = Duration::from_millis(number(1, 2));
    let agent = Duration::from_millis(number(2, 20));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        run(rounds, Duration::ZERO, Duration::ZERO).await;
        run(rounds, add, agent).await;
    });
}
