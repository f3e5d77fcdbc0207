//! Commands that run or talk to the daemon.

use std::fmt::Write as _;
use std::path::Path;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use crate::client::{ClientError, call};
use crate::{Failure, exit, print_json};

/// `vfmap vm ...`
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Register a running VM with its QMP socket, agent channel and empty hot-plug slots.
    Add {
        /// The VM's name.
        name: String,
        /// QEMU's QMP unix socket (`-qmp unix:PATH,server=on,wait=off`).
        #[arg(long, value_name = "PATH")]
        qmp: String,
        /// The host end of the agent's virtio-serial port (a unix socket).
        #[arg(long, value_name = "PATH")]
        agent: String,
        /// An empty pcie-root-port id; repeat in order: local index i is the i-th slot.
        #[arg(long = "slot", value_name = "ID", required = true)]
        slots: Vec<String>,
        /// The VM's NUMA node: VFs on it are preferred.
        #[arg(long)]
        numa_node: Option<i32>,
    },
    /// Release everything a VM holds and forget it.
    Rm {
        /// The VM's name.
        name: String,
    },
    /// List VMs.
    List,
}

/// `vfmap attach ...`
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The VM.
    vm: String,
    /// The function, e.g. crypto.
    function: String,
    /// How many VFs.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Only VFs on this NUMA node.
    #[arg(long)]
    numa_node: Option<i32>,
    /// Only VFs of this PF (domain:bus:device.function).
    #[arg(long)]
    pf: Option<String>,
}

/// One daemon call.
pub enum Call {
    /// `GET /v1/inventory`
    Inventory,
    /// VM commands.
    Vm(VmCommand),
    /// `POST /v1/vms/{vm}/attach`
    Attach(AttachArgs),
    /// `DELETE /v1/vms/{vm}/devices/{local_index}`
    Detach {
        /// The VM.
        vm: String,
        /// The local index.
        local_index: vfmap_core::LocalIndex,
    },
    /// `GET /v1/vms[/{vm}]`
    Status(Option<String>),
}

/// Path segments are user input: keep them to the characters names may have.
fn segment(text: &str) -> Result<&str, Failure> {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Ok(text)
    } else {
        Err(Failure::new(
            exit::BAD_INPUT,
            "bad_arguments",
            anyhow::anyhow!("{text:?} is not a valid VM name (letters, digits, '.', '_', '-')"),
        ))
    }
}

/// Runs a daemon call, prints the result, maps HTTP statuses to exit codes.
pub fn run(socket: &Path, call_spec: Call, json_output: bool) -> Result<(), Failure> {
    let (method, path, body) = match &call_spec {
        Call::Inventory => (Method::GET, "/v1/inventory".to_owned(), None),
        Call::Vm(VmCommand::Add {
            name,
            qmp,
            agent,
            slots,
            numa_node,
        }) => (
            Method::POST,
            "/v1/vms".to_owned(),
            Some(
                json!({"name": name, "qmp_socket": qmp, "agent_socket": agent, "slots": slots, "numa_node": numa_node}),
            ),
        ),
        Call::Vm(VmCommand::Rm { name }) => {
            (Method::DELETE, format!("/v1/vms/{}", segment(name)?), None)
        }
        Call::Vm(VmCommand::List) | Call::Status(None) => (Method::GET, "/v1/vms".to_owned(), None),
        Call::Status(Some(vm)) => (Method::GET, format!("/v1/vms/{}", segment(vm)?), None),
        Call::Attach(a) => (
            Method::POST,
            format!("/v1/vms/{}/attach", segment(&a.vm)?),
            Some(
                json!({"function": a.function, "count": a.count, "numa_node": a.numa_node, "pf": a.pf}),
            ),
        ),
        Call::Detach { vm, local_index } => (
            Method::DELETE,
            format!("/v1/vms/{}/devices/{local_index}", segment(vm)?),
            None,
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILED, "runtime", e))?;
    let (status, value) = runtime
        .block_on(call(socket, method, &path, body.as_ref()))
        .map_err(|e| match e {
            ClientError::Connect { .. } => Failure::new(exit::FAILED, "unreachable", e),
            ClientError::Impostor { .. } => Failure::new(exit::FAILED, "untrusted_daemon", e),
            other => Failure::new(exit::FAILED, "http", other),
        })?;
    if !status.is_success() {
        let code = value
            .pointer("/error/code")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_owned();
        let message = value
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map_or_else(|| format!("HTTP {status}"), str::to_owned);
        let exit_code = match status {
            StatusCode::BAD_REQUEST => exit::BAD_INPUT,
            StatusCode::NOT_FOUND => exit::NOT_FOUND,
            StatusCode::CONFLICT => exit::REFUSED,
            _ => exit::FAILED,
        };
        return Err(Failure::new(exit_code, code, anyhow::anyhow!(message)));
    }
    if json_output {
        return print_json(&value);
    }
    print!("{}", render(&call_spec, &value));
    Ok(())
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    crate::render::table(header, rows)
}

fn correspondence(rows: &Value) -> String {
    let rows: Vec<Vec<String>> = rows
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            [
                "local_index",
                "slot",
                "function",
                "host_vf",
                "state",
                "guest_path",
                "guest_bdf",
                "bound_driver",
            ]
            .iter()
            .map(|k| text(r, k))
            .collect()
        })
        .collect();
    if rows.is_empty() {
        return "  (no VFs)\n".into();
    }
    table(
        &[
            "LOCAL",
            "SLOT",
            "FUNCTION",
            "HOST VF",
            "STATE",
            "GUEST PATH",
            "GUEST BDF",
            "BOUND DRIVER",
        ],
        rows,
    )
}

fn vm_block(vm: &Value) -> String {
    let mut out = format!(
        "VM {} (slots: {}; qmp {}; agent {})\n",
        text(vm, "name"),
        vm["slots"].as_array().map_or(0, Vec::len),
        text(vm, "qmp_socket"),
        text(vm, "agent_socket")
    );
    out += &correspondence(&vm["correspondence"]);
    for f in vm["failures"].as_array().into_iter().flatten().take(3) {
        let _ = writeln!(
            out,
            "  recent failure at local index {}: {}",
            text(f, "local_index"),
            text(f, "reason")
        );
    }
    out
}

fn render(call_spec: &Call, value: &Value) -> String {
    match call_spec {
        Call::Inventory => {
            let functions = value["functions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    ["name", "total", "free", "guest_driver", "host_driver"]
                        .iter()
                        .map(|k| text(f, k))
                        .collect()
                })
                .collect();
            let vfs = value["vfs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    [
                        "global_index",
                        "function",
                        "location",
                        "pf",
                        "vm",
                        "local_index",
                        "state",
                    ]
                    .iter()
                    .map(|k| text(v, k))
                    .collect()
                })
                .collect();
            format!(
                "Functions:\n{}\nVFs:\n{}",
                table(
                    &["NAME", "TOTAL", "FREE", "GUEST DRIVER", "HOST DRIVER"],
                    functions
                ),
                table(
                    &[
                        "INDEX", "FUNCTION", "LOCATION", "PF", "VM", "LOCAL", "STATE"
                    ],
                    vfs
                )
            )
        }
        Call::Vm(VmCommand::Add { name, slots, .. }) => {
            format!("registered VM {name} with {} slot(s)\n", slots.len())
        }
        Call::Vm(VmCommand::Rm { name }) => format!(
            "removed VM {name}; released {} VF(s)\n",
            text(value, "released")
        ),
        Call::Vm(VmCommand::List) => {
            let rows = value["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|vm| {
                    vec![
                        text(vm, "name"),
                        vm["slots"].as_array().map_or(0, Vec::len).to_string(),
                        vm["correspondence"]
                            .as_array()
                            .map_or(0, Vec::len)
                            .to_string(),
                        text(vm, "qmp_socket"),
                    ]
                })
                .collect();
            table(&["NAME", "SLOTS", "VFS", "QMP"], rows)
        }
        Call::Attach(a) => format!(
            "attached to VM {}:\n{}",
            a.vm,
            correspondence(&value["attached"])
        ),
        Call::Detach { vm, local_index } => {
            format!("detached local index {local_index} from VM {vm}\n")
        }
        Call::Status(Some(_)) => vm_block(value),
        Call::Status(None) => {
            let vms: Vec<String> = value["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(vm_block)
                .collect();
            if vms.is_empty() {
                "no VM registered\n".into()
            } else {
                vms.join("\n")
            }
        }
    }
}

/// `vfmap serve --config FILE`.
pub fn serve(config: &Path) -> Result<(), Failure> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let config = vfmap_daemon::serve::load_config(config)
        .map_err(|e| Failure::new(exit::BAD_INPUT, "bad_config", e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILED, "runtime", e))?;
    runtime
        .block_on(vfmap_daemon::serve::serve(config))
        .map_err(|e| Failure::new(exit::FAILED, "serve_failed", e))
}
