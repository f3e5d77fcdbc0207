//! `vfmap --json inventory` against `lspci -D -n -A linux-sysfs` on the same generated tree of
//! 16 PFs x 256 VFs, in the same run. Targets: vfmap's median at most 0.5x lspci's, and
//! vfmap's peak RSS under 32 MiB.
//!
//!     cargo bench -p vfmap --bench inventory [-- RUNS]
#![allow(unsafe_code)] // wait4(2) for each child's own peak RSS; std has no wrapper.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vfmap_testkit::{PfSpec, SysfsTree};

const PFS: u16 = 16;
const VFS: u16 = 256;

/// Runs a command to completion with stdout discarded; returns wall time and peak RSS (KiB).
#[allow(clippy::zombie_processes)] // the child is reaped by wait4, which clippy cannot see
fn measure(cmd: &mut Command) -> (Duration, i64) {
    let started = Instant::now();
    let child = cmd.stdout(Stdio::null()).spawn().expect("spawn");
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills; the pid is our own un-waited child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    assert_eq!(pid, child.id() as libc::pid_t, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed: {status}"
    );
    (elapsed, usage.ru_maxrss)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() -> ExitCode {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(21);
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = SysfsTree::new(dir.path().join("sys"));
    for i in 0..PFS {
        let bus = 0x10 + 2 * i;
        let mut spec = PfSpec::nvme(&format!("0000:{bus:02x}:00.0"), VFS).with_vfs(VFS);
        spec.autoprobe = false;
        tree.add_pf(&spec);
    }
    let profiles = dir.path().join("profiles.toml");
    std::fs::write(
        &profiles,
        concat!(
            "[[card]]\nname = \"bench\"\nvendor = \"0x1b36\"\ndevice = \"0x0010\"\nnum_vfs = 256\n",
            "[[card.function]]\nname = \"crypto\"\nvfs = \"0-127\"\nguest_driver = \"pci-stub\"\n",
            "[[card.function]]\nname = \"compress\"\nvfs = \"128-255\"\nguest_driver = \"uio_pci_generic\"\n"
        ),
    )
    .expect("write profiles");
    let root = tree.root().to_str().expect("utf-8 path").to_owned();
    let bus = format!("sysfs.path={root}/bus/pci");

    let mut vfmap = Command::new(env!("CARGO_BIN_EXE_vfmap"));
    vfmap
        .args(["--json", "inventory", "--sysfs-root", &root, "--profiles"])
        .arg(&profiles);
    let mut lspci = Command::new("lspci");
    lspci.args(["-D", "-n", "-A", "linux-sysfs", "-O", &bus]);
    if lspci.output().map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!("error: lspci (pciutils) is needed as the baseline: apt-get install pciutils");
        return ExitCode::FAILURE;
    }

    // Warm the page cache for both, then alternate so drift hits both alike.
    for _ in 0..3 {
        measure(&mut vfmap);
        measure(&mut lspci);
    }
    let (mut ours, mut theirs, mut peak_kib) = (Vec::new(), Vec::new(), 0);
    for _ in 0..runs {
        let (t, rss) = measure(&mut vfmap);
        ours.push(t);
        peak_kib = peak_kib.max(rss);
        theirs.push(measure(&mut lspci).0);
    }
    ours.sort();
    theirs.sort();

    let devices = usize::from(PFS) * (usize::from(VFS) + 1);
    println!(
        "inventory benchmark: {PFS} PFs x {VFS} VFs ({devices} PCI devices), {runs} runs each"
    );
    println!("  {:<28} {:>10} {:>10} {:>10}", "", "median", "p90", "min");
    for (name, times) in [
        ("vfmap --json inventory", &ours),
        ("lspci -D -n -A linux-sysfs", &theirs),
    ] {
        println!(
            "  {name:<28} {:>10} {:>10} {:>10}",
            ms(percentile(times, 0.5)),
            ms(percentile(times, 0.9)),
            ms(times[0])
        );
    }
    let ratio = percentile(&ours, 0.5).as_secs_f64() / percentile(&theirs, 0.5).as_secs_f64();
    let peak_mib = peak_kib as f64 / 1024.0;
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!(
        "  median ratio vfmap/lspci: {ratio:.2} (target <= 0.50): {}",
        verdict(ratio <= 0.5)
    );
    println!(
        "  vfmap peak RSS: {peak_mib:.1} MiB (target < 32 MiB): {}",
        verdict(peak_mib < 32.0)
    );
    if ratio <= 0.5 && peak_mib < 32.0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
