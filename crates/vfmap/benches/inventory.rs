//! `vfmap --json inventory` against `lspci -D -n -A linux-sysfs` on the same generated tree of
//! 16 PFs x 256 VFs, in the same run, twice: on every core (wall time), then with the bench and
//! its children pinned to one core (CPU time, user + system). Targets: vfmap's median wall time
//! at most 0.35x lspci's, its median CPU time on one core at most 0.5x lspci's, and its peak
//! RSS under 32 MiB.
//!
//!     cargo bench -p vfmap --bench inventory [-- RUNS]
#![allow(unsafe_code)] // wait4(2) for each child's own rusage, sched_setaffinity(2) to pin.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vfmap_testkit::{PfSpec, SysfsTree};

const PFS: u16 = 16;
const VFS: u16 = 256;

/// One run of a command: wall time, CPU time (user + system) and peak RSS (KiB).
struct Run {
    wall: Duration,
    cpu: Duration,
    peak_kib: i64,
}

fn timeval(tv: libc::timeval) -> Duration {
    Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
}

/// Runs a command to completion with stdout discarded.
#[allow(clippy::zombie_processes)] // the child is reaped by wait4, which clippy cannot see
fn measure(cmd: &mut Command) -> Run {
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
    Run {
        wall: elapsed,
        cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
        peak_kib: usage.ru_maxrss,
    }
}

/// Pins this process, and so every child started after, to the first CPU it may run on.
fn pin_to_one_core() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data, filled by sched_getaffinity for this process (pid 0).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return None;
    }
    let cpu = (0..libc::CPU_SETSIZE as usize).find(|&c| unsafe { libc::CPU_ISSET(c, &set) })?;
    // SAFETY: as above; the set holds exactly `cpu`.
    unsafe {
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        (libc::sched_setaffinity(0, size, &set) == 0).then_some(cpu)
    }
}

/// Medians of `runs` alternating runs of each command (after 3 warm-up runs each, so drift
/// hits both alike), sorted, and vfmap's peak RSS.
fn alternate(runs: usize, ours: &mut Command, theirs: &mut Command) -> (Vec<Run>, Vec<Run>) {
    for _ in 0..3 {
        measure(ours);
        measure(theirs);
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        a.push(measure(ours));
        b.push(measure(theirs));
    }
    (a, b)
}

/// The median, p90 and minimum of `runs` by `key`.
fn spread(runs: &[Run], key: impl Fn(&Run) -> Duration) -> [Duration; 3] {
    let mut times: Vec<Duration> = runs.iter().map(key).collect();
    times.sort();
    [percentile(&times, 0.5), percentile(&times, 0.9), times[0]]
}

/// Prints one comparison and returns vfmap's median over lspci's.
fn report(title: &str, ours: &[Run], theirs: &[Run], key: impl Fn(&Run) -> Duration) -> f64 {
    println!("  {title}");
    println!("  {:<28} {:>10} {:>10} {:>10}", "", "median", "p90", "min");
    let ours = spread(ours, &key);
    let theirs = spread(theirs, &key);
    for (name, [median, p90, min]) in [
        ("vfmap --json inventory", ours),
        ("lspci -D -n -A linux-sysfs", theirs),
    ] {
        println!(
            "  {name:<28} {:>10} {:>10} {:>10}",
            ms(median),
            ms(p90),
            ms(min)
        );
    }
    ours[0].as_secs_f64() / theirs[0].as_secs_f64()
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

    let devices = usize::from(PFS) * (usize::from(VFS) + 1);
    println!(
        "inventory benchmark: {PFS} PFs x {VFS} VFs ({devices} PCI devices), {runs} runs each"
    );
    let (ours, theirs) = alternate(runs, &mut vfmap, &mut lspci);
    let wall = report("wall time, every core", &ours, &theirs, |r| r.wall);
    let peak_mib = ours.iter().map(|r| r.peak_kib).max().unwrap_or(0) as f64 / 1024.0;
    let Some(cpu) = pin_to_one_core() else {
        eprintln!("error: cannot pin the bench to one core (sched_setaffinity)");
        return ExitCode::FAILURE;
    };
    let (ours, theirs) = alternate(runs, &mut vfmap, &mut lspci);
    let one_core = report(
        &format!("CPU time (user + system), pinned to CPU {cpu}"),
        &ours,
        &theirs,
        |r| r.cpu,
    );

    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let checks = [
        (
            format!("median wall ratio vfmap/lspci: {wall:.2} (target <= 0.35)"),
            wall <= 0.35,
        ),
        (
            format!("median one-core CPU ratio vfmap/lspci: {one_core:.2} (target <= 0.50)"),
            one_core <= 0.5,
        ),
        (
            format!("vfmap peak RSS: {peak_mib:.1} MiB (target < 32 MiB)"),
            peak_mib < 32.0,
        ),
    ];
    for (line, ok) in &checks {
        println!("  {line}: {}", verdict(*ok));
    }
    if checks.iter().all(|(_, ok)| *ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
