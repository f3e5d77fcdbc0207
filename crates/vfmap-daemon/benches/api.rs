//! Attach+detach round trips through the HTTP API on a unix socket, with instant doubles for
//! the hypervisor, the agent and the host, and the real engine, store and router; beside it,
//! the raw durable-commit rate of the same SQLite setup on the same disk.
//!
//!     cargo bench -p vfmap-daemon --bench api [-- OPS CLIENTS]
//!
//! Targets: median <= 2 ms, p99 <= 10 ms, operations/s >= 50% of the raw commit rate.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use vfmap_core::protocol::{Answer, Entry, GuestPath};
use vfmap_core::{Bdf, DriverName, Profiles, SlotId, Tables, VmSpec};
use vfmap_daemon::effects::{
    BoxFuture, ChannelError, GuestChannel, HostVfs, Hypervisor, HypervisorError,
};
use vfmap_daemon::engine::{Adapters, Engine};
use vfmap_daemon::store::{Store, open_connection};
use vfmap_sysfs::Sysfs;
use vfmap_testkit::{PfSpec, SysfsTree};

struct Instant0;

impl Hypervisor for Instant0 {
    fn attach<'a>(
        &'a self,
        _: &'a VmSpec,
        _: &'a SlotId,
        _: &'a str,
        _: Bdf,
    ) -> BoxFuture<'a, Result<GuestPath, HypervisorError>> {
        Box::pin(async {
            Ok(GuestPath {
                port_device: 3,
                port_function: 0,
                device: 0,
                function: 0,
            })
        })
    }
    fn detach<'a>(
        &'a self,
        _: &'a VmSpec,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async { Ok(()) })
    }
    fn plugged<'a>(&'a self, _: &'a VmSpec) -> BoxFuture<'a, Result<Vec<String>, HypervisorError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

impl GuestChannel for Instant0 {
    fn apply<'a>(
        &'a self,
        _: &'a VmSpec,
        entries: Vec<Entry>,
        _: Duration,
    ) -> BoxFuture<'a, Result<Vec<Answer>, ChannelError>> {
        Box::pin(async move {
            Ok(entries
                .into_iter()
                .map(|e| Answer::Bound {
                    local_index: e.local_index,
                    driver: e.guest_driver,
                    guest_bdf: Bdf {
                        domain: 0,
                        bus: 1,
                        device: 0,
                        function: 0,
                    },
                })
                .collect())
        })
    }
}

impl HostVfs for Instant0 {
    fn bind(&self, _: Bdf, _: &DriverName) -> Result<(), vfmap_daemon::effects::HostError> {
        Ok(())
    }
    fn reset(&self, _: Bdf) -> Result<bool, vfmap_daemon::effects::HostError> {
        Ok(true)
    }
}

/// Sequential single-row durable commits with the daemon's pragmas, on the same disk.
fn raw_commit_rate(dir: &Path) -> f64 {
    let conn = open_connection(&dir.join("raw.db")).expect("open raw db");
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    let n = 2000;
    let started = Instant::now();
    for i in 0..n {
        conn.execute_batch("BEGIN").unwrap();
        conn.execute("INSERT OR REPLACE INTO t (k, v) VALUES (?1, 'x')", [i % 64])
            .unwrap();
        conn.execute_batch("COMMIT").unwrap();
    }
    f64::from(n) / started.elapsed().as_secs_f64()
}

async fn client(socket: &Path, vm: usize, round_trips: usize) -> Vec<Duration> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut latencies = Vec::with_capacity(round_trips * 2);
    for _ in 0..round_trips {
        for (method, path, body) in [
            (
                Method::POST,
                format!("/v1/vms/vm{vm}/attach"),
                r#"{"function":"crypto"}"#,
            ),
            (Method::DELETE, format!("/v1/vms/vm{vm}/devices/0"), ""),
        ] {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "bench")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap();
            let started = Instant::now();
            let response = sender.send_request(request).await.expect("request");
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            latencies.push(started.elapsed());
            assert!(
                status.is_success(),
                "{status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }
    latencies
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let operations = args.first().copied().unwrap_or(10_000);
    let clients = args.get(1).copied().unwrap_or(32);
    let round_trips = operations.div_ceil(2 * clients);

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let tree = SysfsTree::new(dir.path().join("sys"));
    tree.add_pf(&PfSpec::nvme("0000:01:00.0", 64).with_vfs(64));
    let profile = "[[card]]\nname = \"b\"\nvendor = \"0x1b36\"\ndevice = \"0x0010\"\nnum_vfs = 64\n\
                   [[card.function]]\nname = \"crypto\"\nvfs = \"0-63\"\nguest_driver = \"pci-stub\"\n";
    let tables = Tables::build(
        &Sysfs::new(tree.root()).discover().unwrap(),
        &Profiles::parse(profile, "bench").unwrap(),
    );
    let raw = raw_commit_rate(dir.path());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ops_per_s, latencies) = runtime.block_on(async {
        let locations: Vec<Bdf> = tables.vfs.iter().map(|v| v.location).collect();
        let (store, loaded) = Store::open(&dir.path().join("state.db"), &locations).unwrap();
        let doubles = Arc::new(Instant0);
        let adapters = Adapters {
            hypervisor: doubles.clone(),
            channel: doubles.clone(),
            host: doubles,
            agent_deadline: Duration::from_secs(5),
        };
        let engine = Arc::new(Engine::new(tables, store, loaded, adapters).await.unwrap());
        for vm in 0..clients {
            let spec = vfmap_api::NewVm {
                name: vfmap_core::VmName::new(&format!("vm{vm}")).unwrap(),
                backend: vfmap_api::NewVmBackend::Qmp {
                    qmp_socket: "/bench/qmp".into(),
                    agent_socket: "/bench/agent".into(),
                    slots: vec![SlotId::new("rp0").unwrap()],
                },
                numa_node: None,
            };
            engine.add_vm(spec).await.unwrap();
        }
        let socket = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move { axum::serve(listener, vfmap_daemon::api::router(engine)).await });
        // Warm up: one round trip per client.
        let warm: Vec<_> = (0..clients)
            .map(|vm| {
                tokio::spawn({
                    let s = socket.clone();
                    async move { client(&s, vm, 1).await }
                })
            })
            .collect();
        for w in warm {
            w.await.unwrap();
        }
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|vm| {
                tokio::spawn({
                    let s = socket.clone();
                    async move { client(&s, vm, round_trips).await }
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = started.elapsed();
        (all.len() as f64 / elapsed.as_secs_f64(), all)
    });
    let mut latencies = latencies;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (median, p99) = (pct(0.5), pct(0.99));
    let share = ops_per_s / raw;
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!(
        "API benchmark: {} operations (attach or detach), {clients} concurrent clients, instant doubles",
        latencies.len()
    );
    println!(
        "  latency median {:.2} ms (target <= 2): {}",
        ms(median),
        verdict(ms(median) <= 2.0)
    );
    println!(
        "  latency p99    {:.2} ms (target <= 10): {}",
        ms(p99),
        verdict(ms(p99) <= 10.0)
    );
    println!("  throughput     {ops_per_s:.0} operations/s");
    println!("  raw durable commits (same SQLite setup, same disk): {raw:.0} commits/s");
    println!(
        "  throughput / raw commit rate: {:.0}% (target >= 50%): {}",
        share * 100.0,
        verdict(share >= 0.5)
    );
    if !(ms(median) <= 2.0 && ms(p99) <= 10.0 && share >= 0.5) {
        std::process::exit(1);
    }
}
