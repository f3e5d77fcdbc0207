//! Peak RSS of the real daemon (`vfmap serve`) with 65,536 VFs in its inventory: 256 PFs x
//! 256 VFs on a generated sysfs tree (about 2.6 GB of small files, ~35 s to generate), after
//! start-up (discovery, prepare, state database) and a full `GET /v1/inventory`.
//! Target: at most 64 MiB.
//!
//!     cargo bench -p vfmap --bench daemon_rss [-- PFS]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vfmap_testkit::{PfSpec, SysfsTree};

fn main() {
    let pfs: u16 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(256);
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
    let vfs = u32::from(pfs) * 256;
    eprintln!(
        "generated {vfs} VFs in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(
        dir.path().join("profiles.toml"),
        "[[card]]\nname = \"big\"\nvendor = \"0x1b36\"\ndevice = \"0x0010\"\nnum_vfs = 256\n\
         [[card.function]]\nname = \"crypto\"\nvfs = \"0-127\"\nguest_driver = \"pci-stub\"\n\
         [[card.function]]\nname = \"compress\"\nvfs = \"128-255\"\nguest_driver = \"uio_pci_generic\"\n",
    )
    .expect("profiles");
    let socket = dir.path().join("api.sock");
    std::fs::write(
        dir.path().join("vfmap.toml"),
        format!(
            "sysfs_root = {:?}\nprofiles = [{:?}]\nstate_dir = {:?}\nsocket = {:?}\n",
            tree.root(),
            dir.path().join("profiles.toml"),
            dir.path().join("state"),
            socket
        ),
    )
    .expect("config");
    let started = Instant::now();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .args(["serve", "--config"])
        .arg(dir.path().join("vfmap.toml"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start daemon");
    while UnixStream::connect(&socket).is_err() {
        assert!(daemon.try_wait().expect("wait").is_none(), "daemon exited");
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let startup = started.elapsed();
    let mut s = UnixStream::connect(&socket).expect("connect");
    write!(
        s,
        "GET /v1/inventory HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = Vec::new();
    s.read_to_end(&mut response).expect("response");
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.id())).expect("status");
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    let _ = daemon.kill();
    let _ = daemon.wait();
    let mib = hwm_kib as f64 / 1024.0;
    println!(
        "daemon with {vfs} VFs: start-up {:.1}s, inventory response {:.1} MB",
        startup.as_secs_f64(),
        response.len() as f64 / 1e6
    );
    println!(
        "  peak RSS (VmHWM) {mib:.1} MiB (target <= 64 MiB): {}",
        if mib <= 64.0 { "PASS" } else { "MISS" }
    );
    if mib > 64.0 {
        std::process::exit(1);
    }
}
