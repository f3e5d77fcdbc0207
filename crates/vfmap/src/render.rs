//! Human-readable output: aligned tables.

use std::fmt::Write as _;
use std::path::Path;

use vfmap_core::Tables;
use vfmap_core::index::Numbering;

/// Left-aligned columns sized to their widest cell, two spaces apart.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let columns = self.rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| self.rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for row in &self.rows {
            out.push_str("  ");
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == columns {
                    out.push_str(cell);
                } else {
                    let _ = write!(out, "{cell:<width$}  ", width = widths[c]);
                }
            }
            out.push('\n');
        }
    }
}

/// Renders `rows` under `header` as an aligned table.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = Table::new(header);
    for row in rows {
        table.row(row);
    }
    let mut out = String::new();
    table.render(&mut out);
    out
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn id_pair(vendor: Option<vfmap_core::PciId>, device: Option<vfmap_core::PciId>) -> String {
    match (vendor, device) {
        (Some(v), Some(d)) => format!("{:04x}:{:04x}", v.0, d.0),
        _ => "?".to_owned(),
    }
}

/// The `vfmap inventory` text output.
pub fn inventory(tables: &Tables, root: &Path) -> String {
    let mut out = String::new();
    let denied = tables
        .problems
        .iter()
        .filter(|p| p.permission_denied)
        .count();
    if denied > 0 {
        // Not "no SR-IOV device": what could not be read may well be one.
        let _ = writeln!(
            out,
            "cannot read {denied} attribute{} under {}: permission denied — run as root; {}",
            if denied == 1 { "" } else { "s" },
            root.join("bus/pci/devices").display(),
            if tables.pfs.is_empty() {
                "no SR-IOV PF could be identified without them"
            } else {
                "what follows is incomplete"
            }
        );
    }
    if tables.pfs.is_empty() {
        if denied == 0 {
            let _ = writeln!(
                out,
                "no SR-IOV capable PCI device under {} (none has sriov_totalvfs > 0)",
                root.join("bus/pci/devices").display()
            );
        }
    } else {
        let _ = writeln!(out, "SR-IOV PFs under {}:", root.display());
        let mut pfs = Table::new(&[
            "LOCATION",
            "ID",
            "CARD",
            "VFS NOW/MAX",
            "PROFILE WANTS",
            "DRIVER",
            "NUMA",
        ]);
        for pf in &tables.pfs {
            pfs.row(vec![
                pf.location.to_string(),
                id_pair(pf.vendor, pf.device),
                or_dash(pf.card.as_ref()),
                format!("{}/{}", or_dash(pf.num_vfs), or_dash(pf.total_vfs)),
                or_dash(pf.wanted_vfs),
                or_dash(pf.driver.as_ref()),
                or_dash(pf.numa_node),
            ]);
        }
        pfs.render(&mut out);
    }

    if !tables.vfs.is_empty() {
        let _ = writeln!(out, "\nVFs (T1: index -> function, T2: index -> location):");
        let mut vfs = Table::new(&[
            "INDEX", "FUNCTION", "LOCATION", "PF", "VF", "ID", "NUMA", "IOMMU", "DRIVER", "WANTS",
        ]);
        for vf in &tables.vfs {
            let wants = match (&vf.host_driver, &vf.driver) {
                (Some(want), Some(have)) if want.as_str() == have => "ok".to_owned(),
                (Some(want), _) => want.to_string(),
                (None, _) => "-".to_owned(),
            };
            vfs.row(vec![
                vf.global_index.to_string(),
                vf.function
                    .as_ref()
                    .map_or_else(|| "(unassigned)".to_owned(), ToString::to_string),
                vf.location.to_string(),
                vf.pf.to_string(),
                vf.vf_index.to_string(),
                id_pair(vf.vendor, vf.device),
                or_dash(vf.numa_node),
                or_dash(vf.iommu_group),
                or_dash(vf.driver.as_ref()),
                wants,
            ]);
        }
        vfs.render(&mut out);
    }

    if !tables.functions.is_empty() {
        let _ = writeln!(out, "\nFunctions:");
        let mut functions =
            Table::new(&["NAME", "VFS", "GUEST DRIVER", "HOST DRIVER", "DESCRIPTION"]);
        for f in &tables.functions {
            functions.row(vec![
                f.name.to_string(),
                f.total.to_string(),
                f.guest_driver.to_string(),
                f.host_driver.to_string(),
                f.description.clone(),
            ]);
        }
        functions.render(&mut out);
    }

    if !tables.problems.is_empty() {
        let _ = writeln!(out, "\nProblems ({}):", tables.problems.len());
        for p in &tables.problems {
            let _ = writeln!(out, "  {} {}: {}", p.device, p.attribute, p.message);
        }
    }
    if tables.numbering == Numbering::Provisional && !tables.vfs.is_empty() {
        let _ = writeln!(
            out,
            "\nGlobal indexes are provisional: no state database was read (give --state-db); the daemon's may differ."
        );
    }
    out
}
