//! `vfmap`: inventory and prepare SR-IOV hosts whose VFs carry different functions, run the
//! host daemon, and drive it.

mod client;
mod doctor;
mod generate;
mod remote;
mod render;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;
use vfmap_core::{Profiles, Tables, plan_binds, plan_sriov};
use vfmap_sysfs::{FileWriter, Modprobe, PrepareError, Sysfs, prepare_with_hooks};

/// Per-function SR-IOV VF pass-through: inventory, host preparation, the host daemon and its
/// client.
#[derive(Debug, Parser)]
#[command(name = "vfmap", version, about, propagate_version = true)]
struct Cli {
    /// Print one JSON document on stdout instead of text (errors too).
    #[arg(long, global = true)]
    json: bool,
    /// The daemon's API socket. With it, `inventory` asks the daemon instead of sysfs.
    #[arg(long, global = true, env = "VFMAP_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show SR-IOV PFs, their VFs and the two tables (global index -> function, -> location).
    /// Read-only.
    Inventory {
        #[command(flatten)]
        host: HostArgs,
        /// The daemon's state database, for its stable global indexes (default:
        /// /var/lib/vfmap/state.db when it exists and --sysfs-root is /sys). Without one, the
        /// indexes are provisional.
        #[arg(long, value_name = "FILE")]
        state_db: Option<PathBuf>,
    },
    /// Check the host for pass-through (IOMMU, interrupt remapping, vfio, cards, IOMMU
    /// groups, drivers; optionally the daemon's paths and a VM): ok / warning / error with the
    /// fix per check. Read-only; exits 3 when any check is an error.
    Doctor(doctor::DoctorArgs),
    /// Make the host match the profiles: VF counts, autoprobe off, each VF bound to its
    /// function's host driver. Idempotent.
    Prepare {
        #[command(flatten)]
        host: HostArgs,
        /// Show what would change (for VFs that exist now) without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for a driver that probes asynchronously, in milliseconds.
        #[arg(long, default_value_t = 5000, value_name = "MS")]
        settle_ms: u64,
    },
    /// Run the host daemon (see README.md for the config file).
    Serve {
        /// The daemon's TOML config.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Register, remove and list VMs (daemon).
    Vm {
        #[command(subcommand)]
        command: remote::VmCommand,
    },
    /// Give a VM VFs of a function (daemon).
    Attach(remote::AttachArgs),
    /// Take the VF at a VM's local index back (daemon).
    Detach {
        /// The VM.
        vm: vfmap_core::VmName,
        /// The local index (slot position) to release.
        local_index: vfmap_core::LocalIndex,
    },
    /// Show VMs and their correspondence tables (daemon).
    Status {
        /// Only this VM.
        vm: Option<vfmap_core::VmName>,
    },
    /// Re-program a free VF into another function with its card's hook (daemon; docs/hooks.md).
    Program {
        /// The VF's global index (`vfmap inventory` shows it).
        global_index: vfmap_core::GlobalIndex,
        /// The function it is to carry; its card's profile must allow it (`programmable_to`).
        function: vfmap_core::FunctionName,
    },
    /// List or clear VFs quarantined after a failed scrub (daemon; docs/hooks.md).
    Quarantine {
        #[command(subcommand)]
        command: Option<remote::QuarantineCommand>,
    },
    /// Generate shell completions or man pages from this definition (for packaging).
    #[command(hide = true, subcommand)]
    Generate(generate::Generate),
}

#[derive(Debug, clap::Args)]
struct HostArgs {
    /// Root of the sysfs tree to read (and, for prepare, write).
    #[arg(long, default_value = "/sys", value_name = "DIR")]
    sysfs_root: PathBuf,
    /// Device profile file(s) (TOML, see docs/profiles.md); repeat for several.
    #[arg(long = "profiles", value_name = "FILE")]
    profiles: Vec<PathBuf>,
}

/// Exit codes scripts can rely on (documented in README.md).
pub(crate) mod exit {
    /// What was named does not exist (VM, function, local index).
    pub const NOT_FOUND: u8 = 4;
    /// Bad arguments or profiles: fix the input.
    pub const BAD_INPUT: u8 = 2;
    /// The host is not in a state that allows the change; nothing was changed.
    pub const REFUSED: u8 = 3;
    /// A read or write on the host failed.
    pub const FAILED: u8 = 1;
}

/// An error with the exit code and stable code it maps to.
pub(crate) struct Failure {
    exit: u8,
    code: String,
    error: anyhow::Error,
}

impl Failure {
    /// Whether this is a write to a closed pipe: the reader went away.
    fn is_broken_pipe(&self) -> bool {
        self.code == "output"
            && self.error.chain().any(|e| {
                e.downcast_ref::<io::Error>()
                    .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            })
    }

    pub(crate) fn new(
        exit: u8,
        code: impl Into<String>,
        error: impl Into<anyhow::Error>,
    ) -> Failure {
        Failure {
            exit,
            code: code.into(),
            error: error.into(),
        }
    }
}

fn main() -> ExitCode {
    let (json, result) = match Cli::try_parse() {
        Ok(cli) => (cli.json, run(cli)),
        Err(error) => (json_requested(), Err(bad_value(error))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`vfmap inventory | head`): stop quietly with the
        // status of a process killed by SIGPIPE, as other tools in a pipeline do.
        Err(failure) if failure.is_broken_pipe() => ExitCode::from(128 + 13),
        Err(failure) => {
            // One line: the error and its causes joined, the way operators grep logs.
            let message = failure
                .error
                .chain()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": ");
            if json {
                let doc = serde_json::json!({"error": {"code": failure.code, "message": message}});
                // Best effort: the message also goes to stderr below.
                let _ = writeln!(io::stdout(), "{doc}");
            }
            eprintln!("vfmap: error: {message}");
            ExitCode::from(failure.exit)
        }
    }
}

/// A value the argument parsers refused (a VM name, a PCI address, ...): one line and, with
/// `--json`, a JSON error, like every other error. Clap answers the rest itself (help, version,
/// unknown or missing arguments).
fn bad_value(error: clap::Error) -> Failure {
    if error.kind() != clap::error::ErrorKind::ValueValidation {
        error.exit();
    }
    let text = error.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    Failure::new(exit::BAD_INPUT, "bad_arguments", anyhow::anyhow!("{line}"))
}

/// Whether `--json` was given, when the arguments as a whole did not parse (clap takes no
/// option value that starts with `--`, so such an argument before `--` is the flag).
fn json_requested() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

fn run(cli: Cli) -> Result<(), Failure> {
    let remote = |socket: Option<PathBuf>| {
        socket.ok_or_else(|| {
            Failure::new(
                exit::BAD_INPUT,
                "bad_arguments",
                anyhow::anyhow!(
                    "this command talks to the daemon: pass --socket PATH or set VFMAP_SOCKET"
                ),
            )
        })
    };
    match cli.command {
        Command::Inventory { .. } if cli.socket.is_some() => {
            remote::run(&remote(cli.socket)?, remote::Call::Inventory, cli.json)
        }
        Command::Serve { config } => remote::serve(&config),
        Command::Generate(what) => generate::run(what),
        Command::Vm { command } => {
            remote::run(&remote(cli.socket)?, remote::Call::Vm(command), cli.json)
        }
        Command::Attach(args) => {
            remote::run(&remote(cli.socket)?, remote::Call::Attach(args), cli.json)
        }
        Command::Detach { vm, local_index } => remote::run(
            &remote(cli.socket)?,
            remote::Call::Detach { vm, local_index },
            cli.json,
        ),
        Command::Status { vm } => {
            remote::run(&remote(cli.socket)?, remote::Call::Status(vm), cli.json)
        }
        Command::Program {
            global_index,
            function,
        } => remote::run(
            &remote(cli.socket)?,
            remote::Call::Program {
                global_index,
                function,
            },
            cli.json,
        ),
        Command::Quarantine { command } => remote::run(
            &remote(cli.socket)?,
            remote::Call::Quarantine(command.unwrap_or(remote::QuarantineCommand::List)),
            cli.json,
        ),
        Command::Inventory { host, state_db } => inventory(&host, state_db.as_deref(), cli.json),
        Command::Doctor(args) => doctor::run(&args, cli.socket.as_deref(), cli.json),
        Command::Prepare {
            host,
            dry_run,
            settle_ms,
        } => run_prepare(&host, cli.json, dry_run, Duration::from_millis(settle_ms)),
    }
}

fn load_profiles(paths: &[PathBuf]) -> Result<Profiles, Failure> {
    vfmap_daemon::serve::load_profiles(paths)
        .map_err(|e| Failure::new(exit::BAD_INPUT, "bad_profiles", e))
}

fn discover(root: &Path) -> Result<vfmap_core::HostFacts, Failure> {
    Sysfs::new(root)
        .discover()
        .map_err(|e| Failure::new(exit::FAILED, "sysfs", e))
}

/// Writes `text` to stdout; a failed write is a failure (a closed pipe a quiet one), not a panic.
pub(crate) fn print_text(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(exit::FAILED, "output", e))
}

pub(crate) fn print_json(value: &impl Serialize) -> Result<(), Failure> {
    let stdout = io::stdout().lock();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout);
    serde_json::to_writer(&mut out, value)
        .map_err(io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(exit::FAILED, "output", e))
}

#[derive(Serialize)]
struct InventoryDoc<'a> {
    sysfs_root: &'a Path,
    #[serde(flatten)]
    tables: &'a Tables,
}

/// Where the daemon keeps its state database by default.
const DEFAULT_STATE_DB: &str = "/var/lib/vfmap/state.db";

fn inventory(host: &HostArgs, state_db: Option<&Path>, json: bool) -> Result<(), Failure> {
    let profiles = load_profiles(&host.profiles)?;
    let facts = discover(&host.sysfs_root)?;
    let mut tables = Tables::build(&facts, &profiles);
    // The cards' discover hooks, checked against the profiles: disagreements are problems.
    let discovered = vfmap_sysfs::discover_problems(&host.sysfs_root, &profiles, &tables);
    tables.problems.extend(discovered);
    // The daemon's numbering, when its database is given or found: the same core function
    // numbers VFs here and in the daemon, so both show the same global index for a VF.
    let default = Path::new(DEFAULT_STATE_DB);
    let db = state_db
        .or_else(|| (host.sysfs_root == Path::new("/sys") && default.exists()).then_some(default));
    if let Some(db) = db {
        let known = vfmap_daemon::store::read_numbering(db).map_err(|e| {
            Failure::new(
                exit::BAD_INPUT,
                "bad_state_db",
                anyhow::anyhow!("{}", vfmap_daemon::effects::chain(&e)),
            )
        })?;
        tables.renumber(&known);
    }
    if json {
        print_json(&InventoryDoc {
            sysfs_root: &host.sysfs_root,
            tables: &tables,
        })
    } else {
        print_text(&render::inventory(&tables, &host.sysfs_root))
    }
}

#[derive(Serialize)]
struct PrepareDoc<'a> {
    dry_run: bool,
    changed: bool,
    steps: &'a [vfmap_core::Step],
    #[serde(skip_serializing_if = "Option::is_none")]
    tables: Option<&'a Tables>,
}

fn run_prepare(
    host: &HostArgs,
    json: bool,
    dry_run: bool,
    settle: Duration,
) -> Result<(), Failure> {
    if host.profiles.is_empty() {
        return Err(Failure::new(
            exit::BAD_INPUT,
            "bad_arguments",
            anyhow::anyhow!("prepare needs --profiles FILE: it makes the host match them"),
        ));
    }
    let profiles = load_profiles(&host.profiles)?;
    let sysfs = Sysfs::new(&host.sysfs_root);

    if dry_run {
        let facts = discover(&host.sysfs_root)?;
        let mut steps = plan_sriov(&facts, &profiles)
            .map_err(|e| Failure::new(exit::REFUSED, "refused", PrepareError::Refused(e)))?;
        // Each VF's bring_up hook, listed, not run (VFs this would create are not known yet,
        // as for their binds).
        let tables = Tables::build(&facts, &profiles);
        steps.extend(vfmap_core::plan::plan_bring_ups(&tables, &profiles));
        steps.extend(plan_binds(&tables));
        if json {
            return print_json(&PrepareDoc {
                dry_run,
                changed: false,
                steps: &steps,
                tables: None,
            });
        }
        let mut out = String::new();
        if steps.is_empty() {
            out.push_str("nothing to do: the host already matches the profiles\n");
        }
        for step in &steps {
            out.push_str(&format!("would: {step}\n"));
        }
        return print_text(&out);
    }

    let started = Instant::now();
    let mut count = 0usize;
    let mut on_step = |step: &vfmap_core::Step| {
        count += 1;
        if !json {
            eprintln!("{:>7.2}s  {step}", started.elapsed().as_secs_f64());
        }
    };
    // A bring_up hook's kept stderr lines (its progress and reasons) under its step's line.
    let hooks = |inv: &vfmap_sysfs::Invocation<'_>| {
        let result = vfmap_sysfs::run_hook(inv);
        if let (Ok(out), false) = (&result, json) {
            for line in &out.stderr_tail {
                eprintln!("           {line}");
            }
        }
        result
    };
    let report = prepare_with_hooks(
        &sysfs,
        &profiles,
        &FileWriter,
        &Modprobe,
        &hooks,
        settle,
        &mut on_step,
    )
    .map_err(|e| match e {
        PrepareError::Refused(_) => Failure::new(exit::REFUSED, "refused", e),
        other => Failure::new(exit::FAILED, "prepare_failed", other),
    })?;
    // bring_up hooks run at every prepare; they are not changes vfmap made to sysfs.
    let hook_runs = report.steps.iter().filter(|s| s.is_hook()).count();
    let changes = report.steps.len() - hook_runs;
    if json {
        return print_json(&PrepareDoc {
            dry_run,
            changed: changes > 0,
            steps: &report.steps,
            tables: Some(&report.tables),
        });
    }
    let bound = report
        .tables
        .vfs
        .iter()
        .filter(|v| v.host_driver.is_some())
        .count();
    let ran = match hook_runs {
        0 => String::new(),
        1 => "; 1 bring_up hook ran".to_owned(),
        n => format!("; {n} bring_up hooks ran"),
    };
    print_text(&if changes == 0 {
        format!(
            "nothing to do: the host already matches the profiles ({bound} VFs with a function{ran})\n"
        )
    } else {
        format!(
            "prepared: {changes} changes in {:.2}s; {bound} VFs with a function are bound to their host driver{ran}\n",
            started.elapsed().as_secs_f64()
        )
    })
}
