//! Restart of the real daemon (`vfmap serve`) at scale: 256 PFs x 256 VFs (65,536 VFs) on a
//! generated sysfs tree (about 2.6 GB of small files, ~35 s to generate), with 4,096
//! assignments in its state database: 16 QMP VMs x 256 VFs, `ready`, written with the daemon's
//! own store API before every start. The VMs' QMP sockets do not exist, so recovery must find
//! them not running and give every one of their VFs back (rolled back, free).
//!
//! Each round, alternating: discovery alone (`vfmap --json inventory` on the same tree, the
//! floor of any start that reads the host), then the daemon from its start to health 200
//! (serving), to `phase: ready` (recovery done: the moment the socket used to be bound), a
//! full `GET /v1/inventory` (15.5 MB), and its peak RSS (`VmHWM`).
//! Targets (issue 14): health 200 within 1 s (median and every round), peak RSS <= 64 MiB;
//! exits non-zero on a miss or if recovery left an assignment.
//!
//!     cargo bench -p vfmap --bench daemon_rss [-- PFS [ROUNDS]]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vfmap_core::protocol::GuestPath;
use vfmap_core::{
    AssignState, Assignment, Change, FunctionName, GlobalIndex, LocalIndex, SlotId, VmBackend,
    VmName, VmSpec,
};
use vfmap_daemon::store::{Detail, Mutation, Store};
use vfmap_testkit::{PfSpec, SysfsTree};

const VMS: usize = 16;
const PER_VM: usize = 256;

/// One HTTP/1.1 exchange on the daemon's socket: status and body.
fn get(socket: &Path, path: &str, headers: &str) -> Option<(u16, Vec<u8>)> {
    let mut s = UnixStream::connect(socket).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).ok()?;
    let status = std::str::from_utf8(response.get(9..12)?)
        .ok()?
        .parse()
        .ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((status, response.split_off(split)))
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

struct Start {
    health: Duration,
    ready: Duration,
    /// What health said first: `starting` or `ok`.
    first_status: String,
    /// `GET /v1/inventory` with `Prefer: wait=0` right after health 200: its status.
    nowait_status: u16,
    inventory: Value,
    inventory_bytes: usize,
    peak_mib: f64,
    /// From the daemon's log: milliseconds from its start-up's begin to each phase's end
    /// (host prepared, state loaded, recovered).
    phases: [u64; 3],
}

/// The `after_ms` the daemon logged on the line containing `marker`.
fn logged_ms(log: &str, marker: &str) -> u64 {
    log.lines()
        .find(|l| l.contains(marker))
        .and_then(|l| l.split("after_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {marker:?} with after_ms in the daemon's log"))
}

/// Starts the daemon, times it to health 200 and to ready, reads the inventory and the peak.
fn start(config: &Path, socket: &Path) -> Start {
    let log_path = config.with_file_name("daemon.log");
    let log = std::fs::File::create(&log_path).expect("daemon log");
    let started = Instant::now();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .args(["serve", "--config"])
        .arg(config)
        .stderr(log)
        .spawn()
        .expect("start daemon");
    let alive = |daemon: &mut Child| {
        assert!(daemon.try_wait().expect("wait").is_none(), "daemon exited");
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "daemon did not start"
        );
    };
    let (health, first) = loop {
        if let Some((200, body)) = get(socket, "/v1/health", "") {
            break (started.elapsed(), body);
        }
        alive(&mut daemon);
        std::thread::sleep(Duration::from_millis(2));
    };
    let first: Value = serde_json::from_slice(&first).expect("health JSON");
    let nowait_status = get(socket, "/v1/inventory", "Prefer: wait=0\r\n").map_or(0, |r| r.0);
    let ready = loop {
        let (_, body) = get(socket, "/v1/health", "").expect("health");
        let body: Value = serde_json::from_slice(&body).expect("health JSON");
        if body["phase"] == "ready" {
            break started.elapsed();
        }
        alive(&mut daemon);
        std::thread::sleep(Duration::from_millis(2));
    };
    let (status, body) = get(socket, "/v1/inventory", "").expect("inventory");
    assert_eq!(status, 200);
    let peak_mib = vm_hwm_kib(daemon.id()) as f64 / 1024.0;
    // SIGTERM, as systemd stops it.
    let term = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    daemon.wait().expect("wait");
    let log = std::fs::read_to_string(&log_path).expect("daemon log");
    let phases = [
        logged_ms(&log, "phase=loading_state"),
        logged_ms(&log, "phase=recovering"),
        logged_ms(&log, "ready: the pool is up"),
    ];
    Start {
        phases,
        health,
        ready,
        first_status: first["status"].as_str().unwrap_or("?").to_owned(),
        nowait_status,
        inventory_bytes: body.len(),
        inventory: serde_json::from_slice(&body).expect("inventory JSON"),
        peak_mib,
    }
}

/// Writes the VMs (once) and their 4,096 `ready` assignments with the daemon's store API.
fn seed(runtime: &tokio::runtime::Runtime, db: &Path, vfs: &[(GlobalIndex, String, String)]) {
    let (store, loaded) = Store::open(db, &[]).expect("open the state database");
    assert!(
        loaded.assignments.is_empty(),
        "a previous start left {} assignments",
        loaded.assignments.len()
    );
    let mut mutations = Vec::new();
    let slots: Vec<SlotId> = (0..PER_VM)
        .map(|i| SlotId::new(&format!("rp{i}")).expect("slot"))
        .collect();
    for v in 0..VMS {
        let name = VmName::new(&format!("vm{v:02}")).expect("name");
        if !loaded.vms.iter().any(|spec| spec.name == name) {
            mutations.push(Mutation::Pool(Change::AddVm(VmSpec {
                name: name.clone(),
                // Nothing listens there: the VM is not running.
                backend: VmBackend::Qmp {
                    qmp_socket: format!("/nonexistent/vfmap-bench/{name}.qmp"),
                    agent_socket: format!("/nonexistent/vfmap-bench/{name}.agent"),
                },
                slots: slots.clone(),
                numa_node: None,
            })));
        }
        let mine = &vfs[v * PER_VM..(v + 1) * PER_VM];
        let assignments: Vec<Assignment> = mine
            .iter()
            .enumerate()
            .map(|(i, (gi, location, function))| Assignment {
                global_index: *gi,
                location: location.parse().expect("location"),
                vm: name.clone(),
                local_index: LocalIndex::new(i as u32),
                function: FunctionName::new(function).expect("function"),
                state: AssignState::Ready,
            })
            .collect();
        let path: GuestPath = "03.0/00.0".parse().expect("guest path");
        let details: Vec<Mutation> = assignments
            .iter()
            .map(|a| {
                Mutation::Detail(
                    a.global_index,
                    Detail {
                        guest_path: Some(path),
                        ..Detail::default()
                    },
                )
            })
            .collect();
        mutations.push(Mutation::Pool(Change::Reserve(assignments)));
        mutations.extend(details);
    }
    runtime
        .block_on(store.write(mutations))
        .expect("seed the assignments");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let mut numbers = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u16>().ok());
    let pfs = numbers.next().unwrap_or(256);
    let rounds = numbers.next().unwrap_or(5).max(1);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let started = Instant::now();
    let tree = SysfsTree::new(dir.path().join("sys"));
    tree.add_driver("vfio-pci");
    for i in 0..pfs {
        let (domain, bus) = (i / 64, 0x10 + 2 * (i % 64));
        let mut spec = PfSpec::nvme(&format!("{domain:04x}:{bus:02x}:00.0"), 256).with_vfs(256);
        spec.autoprobe = false;
        tree.add_pf(&spec);
        for n in 0..256 {
            let vf = spec.location.vf_location(1, 1, n).expect("VF address");
            tree.link_driver(vf, "vfio-pci");
            std::fs::write(tree.device_link(vf).join("driver_override"), "vfio-pci\n")
                .expect("override");
        }
    }
    let total = u32::from(pfs) * 256;
    assert!(
        total as usize >= VMS * PER_VM,
        "at least 16 PFs for 4,096 assignments"
    );
    eprintln!(
        "generated {total} VFs in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let profiles = dir.path().join("profiles.toml");
    std::fs::write(
        &profiles,
        "[[card]]\nname = \"big\"\nvendor = \"0x1b36\"\ndevice = \"0x0010\"\nnum_vfs = 256\n\
         [[card.function]]\nname = \"crypto\"\nvfs = \"0-127\"\nguest_driver = \"pci-stub\"\n\
         [[card.function]]\nname = \"compress\"\nvfs = \"128-255\"\nguest_driver = \"uio_pci_generic\"\n",
    )
    .expect("profiles");
    let socket = dir.path().join("api.sock");
    let config = dir.path().join("vfmap.toml");
    std::fs::write(
        &config,
        format!(
            "sysfs_root = {:?}\nprofiles = [{:?}]\nstate_dir = {:?}\nsocket = {:?}\n",
            tree.root(),
            profiles,
            dir.path().join("state"),
            socket
        ),
    )
    .expect("config");

    // A first start numbers the VFs (a fresh database); its inventory says which is which.
    let first = start(&config, &socket);
    eprintln!(
        "first start (fresh database, {total} VFs numbered): health {:.0} ms, ready {:.0} ms",
        first.health.as_secs_f64() * 1e3,
        first.ready.as_secs_f64() * 1e3
    );
    let vfs: Vec<(GlobalIndex, String, String)> = first.inventory["vfs"]
        .as_array()
        .expect("vfs")
        .iter()
        .take(VMS * PER_VM)
        .map(|v| {
            (
                GlobalIndex::new(v["global_index"].as_u64().expect("index") as u32),
                v["location"].as_str().expect("location").to_owned(),
                v["function"].as_str().expect("function").to_owned(),
            )
        })
        .collect();
    drop(first);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let db = dir.path().join("state/state.db");

    println!(
        "daemon restart, {total} VFs, {} assignments in {VMS} VMs not running, {rounds} rounds",
        VMS * PER_VM
    );
    println!(
        "{:>5} {:>14} {:>12} {:>12} {:>10} {:>10} {:>9}   daemon's log: prepared / state loaded / recovered (ms)",
        "round", "discovery(ms)", "health(ms)", "ready(ms)", "first", "wait=0", "peak MiB"
    );
    let (mut discoveries, mut healths, mut readies, mut peaks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    let mut leftovers = 0;
    for round in 1..=rounds {
        seed(&runtime, &db, &vfs);
        // Discovery alone, on the same tree, just before.
        let t = Instant::now();
        let status = Command::new(env!("CARGO_BIN_EXE_vfmap"))
            .args(["--json", "inventory", "--sysfs-root"])
            .arg(tree.root())
            .arg("--profiles")
            .arg(&profiles)
            .stdout(Stdio::null())
            .status()
            .expect("run vfmap inventory");
        assert!(status.success());
        let discovery = t.elapsed();
        let s = start(&config, &socket);
        // Recovery gave back every VF of the VMs that are not running.
        leftovers += s.inventory["vfs"]
            .as_array()
            .expect("vfs")
            .iter()
            .filter(|v| !v["vm"].is_null())
            .count();
        println!(
            "{round:>5} {:>14.0} {:>12.0} {:>12.0} {:>10} {:>10} {:>9.1}   {} / {} / {}",
            discovery.as_secs_f64() * 1e3,
            s.health.as_secs_f64() * 1e3,
            s.ready.as_secs_f64() * 1e3,
            s.first_status,
            s.nowait_status,
            s.peak_mib,
            s.phases[0],
            s.phases[1],
            s.phases[2]
        );
        discoveries.push(discovery.as_secs_f64());
        healths.push(s.health.as_secs_f64());
        readies.push(s.ready.as_secs_f64());
        peaks.push(s.peak_mib);
        bytes = s.inventory_bytes;
    }
    let worst_health = healths.iter().copied().fold(0.0, f64::max);
    let peak = peaks.iter().copied().fold(0.0, f64::max);
    let (health, ready, discovery) = (median(healths), median(readies), median(discoveries));
    println!(
        "median: discovery alone {:.0} ms; daemon health 200 {:.0} ms (worst {:.0} ms), ready {:.0} ms \
         (where the socket used to open); inventory {:.1} MB",
        discovery * 1e3,
        health * 1e3,
        worst_health * 1e3,
        ready * 1e3,
        bytes as f64 / 1e6
    );
    let health_ok = worst_health <= 1.0;
    let rss_ok = peak <= 64.0;
    println!(
        "  time to health 200 <= 1 s in every round: {}",
        if health_ok { "PASS" } else { "MISS" }
    );
    println!(
        "  peak RSS (VmHWM) {peak:.1} MiB (target <= 64 MiB): {}",
        if rss_ok { "PASS" } else { "MISS" }
    );
    println!(
        "  assignments left after recovery: {leftovers} (want 0): {}",
        if leftovers == 0 { "PASS" } else { "MISS" }
    );
    if !(health_ok && rss_ok && leftovers == 0) {
        std::process::exit(1);
    }
}
