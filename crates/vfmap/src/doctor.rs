//! `vfmap doctor`: checks the host (and optionally the daemon's paths and a VM) and says, per
//! check, ok / warning / error with the fix. Read-only.

mod daemon;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use vfmap_sysfs::discover_hook::{self, discover_runs};
use vfmap_sysfs::doctor::{Check, ModulesDir, Status, assess, probe, profile_modules};
use vfmap_sysfs::{Sysfs, run_hook};

use crate::{Failure, exit, load_profiles, print_json, print_text};

/// `vfmap doctor` options.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Root of the sysfs tree to read [default: the config's sysfs_root, else /sys].
    #[arg(long, value_name = "DIR")]
    sysfs_root: Option<PathBuf>,
    /// The root holding proc/ (cmdline, interrupts, kernel release) and lib/modules/
    /// [default: the directory above --sysfs-root, / for /sys].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Device profile file(s): their cards, VF counts and drivers are checked.
    #[arg(long = "profiles", value_name = "FILE")]
    profiles: Vec<PathBuf>,
    /// The daemon's config: its profiles, sysfs_root, state_dir and socket are checked.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The daemon's state directory, to check [default: the config's state_dir].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Check this VM's hot-plug slots (over QMP) and agent channel; with --qmp, --agent and
    /// --slot, or looked up from the daemon (--socket).
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// The VM's QMP socket.
    #[arg(long, value_name = "PATH", requires = "vm")]
    qmp: Option<String>,
    /// The host end of the VM's agent channel.
    #[arg(long, value_name = "PATH", requires = "vm")]
    agent: Option<String>,
    /// A hot-plug slot (pcie-root-port id) of the VM; repeat for each.
    #[arg(long = "slot", value_name = "ID", requires = "vm")]
    slots: Vec<String>,
    /// How long to wait for QEMU, the agent channel or the daemon, in milliseconds.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    timeout_ms: u64,
}

fn bad_arguments(message: String) -> Failure {
    Failure::new(exit::BAD_INPUT, "bad_arguments", anyhow::anyhow!(message))
}

/// Runs every check, prints them, and exits 3 when any is an error.
pub fn run(args: &DoctorArgs, socket: Option<&Path>, json: bool) -> Result<(), Failure> {
    let config = args
        .config
        .as_deref()
        .map(vfmap_daemon::serve::load_config)
        .transpose()
        .map_err(|e| Failure::new(exit::BAD_INPUT, "bad_config", e))?;
    let sysfs_root = args
        .sysfs_root
        .clone()
        .or_else(|| config.as_ref().map(|c| c.sysfs_root.clone()))
        .unwrap_or_else(|| PathBuf::from("/sys"));
    let root = args
        .root
        .clone()
        .unwrap_or_else(|| match sysfs_root.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        });
    let mut profile_paths: Vec<PathBuf> = config
        .as_ref()
        .map(|c| c.profiles.clone())
        .unwrap_or_default();
    profile_paths.extend(args.profiles.iter().cloned());
    let profiles = load_profiles(&profile_paths)?;
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| config.as_ref().map(|c| c.state_dir.clone()));
    let socket = socket
        .map(Path::to_owned)
        .or_else(|| config.as_ref().map(|c| c.socket.clone()));
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let vm = match &args.vm {
        None => None,
        Some(name) => Some(daemon::VmTarget::from_args(
            name,
            args.qmp.as_deref(),
            args.agent.as_deref(),
            &args.slots,
            socket.as_deref(),
            timeout,
        )?),
    };

    let sysfs = Sysfs::new(&sysfs_root);
    let index = ModulesDir::for_root(&root);
    let facts = probe(&sysfs, &root, &index, &profile_modules(&profiles));
    let mut checks = assess(&facts, &profiles);
    // Each card's discover hook, run on its PFs and checked against the profile.
    if let Ok(discovered) = &facts.discovered {
        let tables = vfmap_core::Tables::build(discovered, &profiles);
        let runs = discover_runs(&sysfs_root, &profiles, &tables, &run_hook);
        checks.extend(discover_hook::doctor_checks(&profiles, &runs));
    }
    if let Some(dir) = &state_dir {
        checks.push(daemon::state_dir(dir));
    }
    if let Some(path) = &socket {
        checks.extend(daemon::socket(path, timeout));
    }
    if let Some(vm) = vm {
        checks.extend(vm.checks(timeout));
    }

    let ready = checks.iter().all(|c| c.status != Status::Error);
    if json {
        let checks = checks
            .iter()
            .map(|c| CheckDoc {
                name: &c.name,
                status: c.status.as_str(),
                detail: &c.detail,
                fix: c.fix.as_deref(),
            })
            .collect();
        print_json(&Doc { ready, checks })?;
    } else {
        print_text(&render(&checks))?;
    }
    if ready {
        return Ok(());
    }
    let errors = checks.iter().filter(|c| c.status == Status::Error).count();
    eprintln!("vfmap: error: the host is not ready for pass-through: {errors} check(s) failed");
    // The report is the output: no second error document. Exit 3 like a refused `prepare`.
    std::process::exit(i32::from(exit::REFUSED));
}

/// `--json`: `{"ready", "checks": [{"name", "status", "detail", "fix"}]}`.
#[derive(Serialize)]
struct Doc<'a> {
    ready: bool,
    checks: Vec<CheckDoc<'a>>,
}

#[derive(Serialize)]
struct CheckDoc<'a> {
    name: &'a str,
    status: &'static str,
    detail: &'a str,
    fix: Option<&'a str>,
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// One line per check (`status  name  detail; fix: fix`), then the summary.
fn render(checks: &[Check]) -> String {
    let width = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .min(32);
    let mut out = String::new();
    for check in checks {
        let fix = check
            .fix
            .as_deref()
            .map_or(String::new(), |fix| format!("; fix: {fix}"));
        out += &format!(
            "{:<7}  {:<width$}  {}{fix}\n",
            check.status.as_str(),
            check.name,
            check.detail
        );
    }
    let count = |status| checks.iter().filter(|c| c.status == status).count();
    let (ok, warnings, errors) = (
        count(Status::Ok),
        count(Status::Warning),
        count(Status::Error),
    );
    out += &format!(
        "{}: {}, {}, {} ok\n",
        if errors == 0 { "ready" } else { "not ready" },
        plural(errors, "error"),
        plural(warnings, "warning"),
        ok
    );
    out
}
