//! Generates a synthetic sysfs tree for benchmarks and manual testing:
//!
//!     vfmap-gen-sysfs OUT_DIR [PFS] [VFS_PER_PF]
//!
//! PFs are emulated-NVMe-like (1b36:0010) with all VFs enabled and unbound, spread over
//! domains 0000 and 0001, each PF two buses apart so 256 VFs spill onto the next bus.

use std::process::ExitCode;

use vfmap_testkit::{PfSpec, SysfsTree};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
    let half = pfs.div_ceil(2);
    for i in 0..pfs {
        let domain = u32::from(i >= half);
        let bus = 0x10 + 2 * (i % half);
        let mut spec = PfSpec::nvme(&format!("{domain:04x}:{bus:02x}:00.0"), vfs).with_vfs(vfs);
        spec.autoprobe = false;
        spec.numa_node = i32::from(domain as u16);
        tree.add_pf(&spec);
    }
    println!("generated {pfs} PFs x {vfs} VFs under {out}");
    ExitCode::SUCCESS
}
