//! `vfmap-baseline-bind PORT[,PORT...] DRIVER`: the benchmarks' baseline, what a careful person
//! would do by hand without vfmap, run in the guest: bind DRIVER to whatever appears behind the
//! root ports PORT (e.g. `0000:00:03.3`) with `driver_override` and `drivers_probe`, and print
//! `VFMAP-BASELINE-BOUND <bdf>` on stdout once the device is bound to it. Several ports are
//! watched by the one loop (the 3-device baseline).
//!
//! No process is forked (a shell loop's `sleep` and subshells cost milliseconds each under
//! TCG), the port is looked at every 5 ms, and a driver that matched the device's ID and took
//! it first (same-ID VFs: `nvme` for every one) is unbound and the device probed again, which
//! is what made the old shell baseline miss a round. Each bound device is reported once, and
//! again after it went away and came back.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

const POLL: Duration = Duration::from_millis(5);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, driver] = args.as_slice() else {
        eprintln!("usage: vfmap-baseline-bind PORT[,PORT...] DRIVER (e.g. 0000:00:03.3 pci-stub)");
        std::process::exit(2);
    };
    let port_dirs: Vec<PathBuf> = port
        .split(',')
        .map(|p| Path::new("/sys/devices/pci0000:00").join(p))
        .collect();
    let mut reported: HashSet<String> = HashSet::new();
    loop {
        let present: Vec<(PathBuf, String)> = port_dirs
            .iter()
            .flat_map(|dir| {
                devices_behind(dir)
                    .into_iter()
                    .map(|bdf| (dir.join(&bdf), bdf))
            })
            .collect();
        reported.retain(|bdf| present.iter().any(|(_, p)| p == bdf));
        for (dev, bdf) in &present {
            match bound_driver(dev) {
                Some(d) if d == *driver => {
                    if reported.insert(bdf.clone()) {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "VFMAP-BASELINE-BOUND {bdf}");
                        let _ = out.flush();
                    }
                }
                // Another driver took it first: let it go, then probe again below.
                Some(_) => {
                    let _ = fs::write(dev.join("driver/unbind"), bdf);
                }
                None => {
                    // The device may go away under us: then it is looked at again.
                    if fs::write(dev.join("driver_override"), driver).is_ok() {
                        let _ = fs::write("/sys/bus/pci/drivers_probe", bdf);
                    }
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

/// The PCI devices behind the port (its `dddd:bb:dd.f` children with a `vendor` attribute).
fn devices_behind(port_dir: &Path) -> HashSet<String> {
    let Ok(entries) = fs::read_dir(port_dir) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.len() == 12 && name.as_bytes()[4] == b':')
        .filter(|name| port_dir.join(name).join("vendor").exists())
        .collect()
}

/// The name of the driver bound to the device, if any.
fn bound_driver(dev: &Path) -> Option<String> {
    let target = fs::read_link(dev.join("driver")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}
