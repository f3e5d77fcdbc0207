//! Generates a synthetic sysfs tree for benchmarks and manual testing:
//!
//!     vfmap-gen-sysfs OUT_DIR [PFS] [VFS_PER_PF] [--bound DRIVER]
//!
//! PFs are emulated-NVMe-like (1b36:0010) with all VFs enabled, 64 PFs per PCI domain, each PF
//! two buses apart so 256 VFs spill onto the next bus. With `--bound DRIVER` every VF is
//! bound to DRIVER with `driver_override` pinned (a host `vfmap prepare` already ran on).

use std::process::ExitCode;

use vfmap_testkit::{PfSpec, SysfsTree};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let bound = args.iter().position(|a| a == "--bound").map(|i| {
        let driver = args.get(i + 1).cloned().unwrap_or_default();
        args.drain(i..(i + 2).min(args.len()));
        driver
    });
    let usage = "usage: vfmap-gen-sysfs OUT_DIR [PFS (default 16)] [VFS_PER_PF (default 256)]";
    let Some(out) = args.first() else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let number = |i: usize, default: u16| -> Option<u16> {
        args.get(i).map_or(Some(default), |s| s.parse().ok())
    };
    let (Some(pfs), Some(vfs)) = (number(1, 16), number(2, 256)) else {
        eprintln!("error: PFS and VFS_PER_PF must be numbers\n{usage}");
        return ExitCode::from(2);
    };
    if std::path::Path::new(out).exists() {
        eprintln!("error: {out} exists; give a new directory");
        return ExitCode::from(2);
    }
    let tree = SysfsTree::new(out);
    if let Some(driver) = &bound {
        tree.add_driver(driver);
    }
    for i in 0..pfs {
        let domain = u32::from(i / 64);
        let bus = 0x10 + 2 * (i % 64);
        let mut spec = PfSpec::nvme(&format!("{domain:04x}:{bus:02x}:00.0"), vfs).with_vfs(vfs);
        spec.autoprobe = false;
        spec.numa_node = i32::from(i % 2);
        tree.add_pf(&spec);
        if let Some(driver) = &bound {
            for n in 0..vfs {
                let Some(vf) = spec.location.vf_location(spec.offset, spec.stride, n) else {
                    continue;
                };
                tree.link_driver(vf, driver);
                if let Err(e) = std::fs::write(
                    tree.device_link(vf).join("driver_override"),
                    format!("{driver}\n"),
                ) {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    println!("generated {pfs} PFs x {vfs} VFs under {out}");
    ExitCode::SUCCESS
}
