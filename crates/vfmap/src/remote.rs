//! Commands that run or talk to the daemon. Requests are `vfmap-api`'s request types,
//! serialised; answers are read as its response types (errors as its envelope) and rendered
//! from them. `--json` prints the daemon's JSON as it came.

use std::fmt::Display;
use std::fmt::Write as _;
use std::path::Path;

use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vfmap_api::{
    AttachRequest, Attached, CorrespondenceRow, Detached, ErrorBody, Inventory, NewVm,
    NewVmBackend, Removed, Vm, VmBackend, VmList,
};
use vfmap_core::{Bdf, FunctionName, LocalIndex, SlotId, VmName};

use crate::client::{ClientError, call};
use crate::{Failure, exit, print_json, print_text};

/// `vfmap quarantine ...`
#[derive(Debug, clap::Subcommand)]
pub enum QuarantineCommand {
    /// List the VFs whose scrub failed after a release, with why (the default).
    List,
    /// Return a quarantined VF to the pool: it is reset and scrubbed again first, and stays
    /// quarantined if that fails.
    Clear {
        /// The VF's global index (`vfmap quarantine list` shows it).
        global_index: vfmap_core::GlobalIndex,
        /// Skip the scrub: return it as it is.
        #[arg(long)]
        force: bool,
    },
}

/// `vfmap vm ...`
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Register a running VM: a QEMU with its QMP socket, agent channel and empty hot-plug
    /// slots, or a libvirt domain by name (the daemon reads its slots and channel from the
    /// domain's live XML).
    Add {
        /// The VM's name.
        name: VmName,
        /// QEMU's QMP unix socket (`-qmp unix:PATH,server=on,wait=off`).
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "libvirt",
            requires = "agent",
            conflicts_with = "libvirt"
        )]
        qmp: Option<String>,
        /// The host end of the agent's virtio-serial port (a unix socket; QMP VMs).
        #[arg(long, value_name = "PATH", requires = "qmp")]
        agent: Option<String>,
        /// A libvirt domain to register instead: its free hot-pluggable pcie-root-ports
        /// become the slots, its `<channel>` named by --port-name the agent's channel.
        #[arg(long, value_name = "DOMAIN", value_parser = checked(vfmap_core::check_domain_name))]
        libvirt: Option<String>,
        /// The libvirt connection URI.
        #[arg(long, value_name = "URI", requires = "libvirt", default_value = vfmap_api::DEFAULT_LIBVIRT_URI, value_parser = checked(vfmap_core::check_libvirt_uri))]
        uri: String,
        /// The virtio port name of the agent's channel in the domain (vfmap-agent's
        /// `port_name`).
        #[arg(long, value_name = "NAME", requires = "libvirt", default_value = vfmap_api::DEFAULT_PORT_NAME, value_parser = checked(vfmap_core::check_port_name))]
        port_name: String,
        /// Also write vfmap's devices into the domain's persistent definition (default: live
        /// only).
        #[arg(long, requires = "libvirt")]
        persistent: bool,
        /// A hot-plug slot; repeat in order: local index i is the i-th slot. QMP: an empty
        /// pcie-root-port id (required). libvirt: narrows the domain's root ports to these
        /// controller aliases (`pci.N`).
        #[arg(long = "slot", value_name = "ID", required_unless_present = "libvirt")]
        slots: Vec<SlotId>,
        /// The VM's NUMA node: VFs on it are preferred.
        #[arg(long)]
        numa_node: Option<i32>,
    },
    /// Release everything a VM holds and forget it.
    Rm {
        /// The VM's name.
        name: VmName,
    },
    /// List VMs.
    List,
}

/// A clap value parser from one of the daemon's own checks.
fn checked(
    check: fn(&str) -> Result<(), String>,
) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |text| check(text).map(|()| text.to_owned())
}

/// `vfmap attach ...`
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The VM.
    vm: VmName,
    /// The function, e.g. crypto.
    function: FunctionName,
    /// How many VFs.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Only VFs on this NUMA node.
    #[arg(long)]
    numa_node: Option<i32>,
    /// Only VFs of this PF (domain:bus:device.function).
    #[arg(long)]
    pf: Option<Bdf>,
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
        vm: VmName,
        /// The local index.
        local_index: LocalIndex,
    },
    /// `GET /v1/vms[/{vm}]`
    Status(Option<VmName>),
    /// `GET /v1/quarantine`, `POST /v1/quarantine/{global_index}/clear`
    Quarantine(QuarantineCommand),
    /// `POST /v1/vfs/{global_index}/program`
    Program {
        /// The VF.
        global_index: vfmap_core::GlobalIndex,
        /// The function it is to carry.
        function: vfmap_core::FunctionName,
    },
}

/// A request body, serialised.
fn body(request: &impl Serialize) -> Result<Option<Vec<u8>>, Failure> {
    serde_json::to_vec(request)
        .map(Some)
        .map_err(|e| Failure::new(exit::FAILED, "request", e))
}

/// The method, path and body of a call. Names in paths are validated values (their
/// characters need no escaping).
fn request(call_spec: &Call) -> Result<(Method, String, Option<Vec<u8>>), Failure> {
    Ok(match call_spec {
        Call::Inventory => (Method::GET, "/v1/inventory".to_owned(), None),
        Call::Vm(VmCommand::Add {
            name,
            qmp,
            agent,
            libvirt,
            uri,
            port_name,
            persistent,
            slots,
            numa_node,
        }) => {
            let backend = match (libvirt, qmp, agent) {
                (Some(domain), _, _) => NewVmBackend::Libvirt {
                    domain: domain.clone(),
                    uri: uri.clone(),
                    port_name: port_name.clone(),
                    persistent: *persistent,
                    slots: slots.clone(),
                },
                (None, Some(qmp), Some(agent)) => NewVmBackend::Qmp {
                    qmp_socket: qmp.clone(),
                    agent_socket: agent.clone(),
                    slots: slots.clone(),
                },
                _ => {
                    return Err(Failure::new(
                        exit::BAD_INPUT,
                        "bad_arguments",
                        anyhow::anyhow!("give --qmp and --agent, or --libvirt"),
                    ));
                }
            };
            let spec = NewVm {
                name: name.clone(),
                backend,
                numa_node: *numa_node,
            };
            (Method::POST, "/v1/vms".to_owned(), body(&spec)?)
        }
        Call::Vm(VmCommand::Rm { name }) => (Method::DELETE, format!("/v1/vms/{name}"), None),
        Call::Vm(VmCommand::List) | Call::Status(None) => (Method::GET, "/v1/vms".to_owned(), None),
        Call::Status(Some(vm)) => (Method::GET, format!("/v1/vms/{vm}"), None),
        Call::Attach(a) => {
            let attach = AttachRequest {
                function: a.function.to_string(),
                count: a.count,
                numa_node: a.numa_node,
                pf: a.pf,
            };
            (
                Method::POST,
                format!("/v1/vms/{}/attach", a.vm),
                body(&attach)?,
            )
        }
        Call::Detach { vm, local_index } => (
            Method::DELETE,
            format!("/v1/vms/{vm}/devices/{local_index}"),
            None,
        ),
        Call::Quarantine(QuarantineCommand::List) => {
            (Method::GET, "/v1/quarantine".to_owned(), None)
        }
        Call::Program {
            global_index,
            function,
        } => (
            Method::POST,
            format!("/v1/vfs/{global_index}/program"),
            body(&vfmap_api::ProgramRequest {
                function: function.clone(),
            })?,
        ),
        Call::Quarantine(QuarantineCommand::Clear {
            global_index,
            force,
        }) => (
            Method::POST,
            format!("/v1/quarantine/{global_index}/clear"),
            body(&vfmap_api::ClearQuarantine { force: *force })?,
        ),
    })
}

/// Runs a daemon call, prints the result, maps HTTP statuses to exit codes.
pub fn run(socket: &Path, call_spec: Call, json_output: bool) -> Result<(), Failure> {
    let (method, path, body) = request(&call_spec)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILED, "runtime", e))?;
    let (status, value) = runtime
        .block_on(call(socket, method, &path, body))
        .map_err(|e| match e {
            ClientError::Connect { .. } => Failure::new(exit::FAILED, "unreachable", e),
            ClientError::Impostor { .. } => Failure::new(exit::FAILED, "untrusted_daemon", e),
            other => Failure::new(exit::FAILED, "http", other),
        })?;
    if !status.is_success() {
        let (code, message) = match ErrorBody::deserialize(&value) {
            Ok(ErrorBody { error }) => (error.code.as_str().to_owned(), error.message),
            Err(_) => ("error".to_owned(), format!("HTTP {status}")),
        };
        let exit_code = match status {
            StatusCode::BAD_REQUEST => exit::BAD_INPUT,
            StatusCode::NOT_FOUND => exit::NOT_FOUND,
            StatusCode::CONFLICT => exit::REFUSED,
            _ => exit::FAILED,
        };
        return Err(Failure::new(exit_code, code, anyhow::anyhow!(message)));
    }
    // Read as the API's type either way: an answer that is not is an error, not printed.
    let text = render(&call_spec, &value)?;
    if json_output {
        return print_json(&value);
    }
    print_text(&text)
}

/// `value` as the API's response type `T`.
fn answer<T: DeserializeOwned>(value: &Value) -> Result<T, Failure> {
    T::deserialize(value).map_err(|e| {
        let what = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("answer");
        Failure::new(
            exit::FAILED,
            "bad_answer",
            anyhow::anyhow!("the daemon's answer is not the API's {what}: {e}"),
        )
    })
}

fn or_dash(value: Option<impl Display>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    crate::render::table(header, rows)
}

fn correspondence(rows: &[CorrespondenceRow]) -> String {
    if rows.is_empty() {
        return "  (no VFs)\n".into();
    }
    let rows = rows
        .iter()
        .map(|r| {
            vec![
                r.local_index.to_string(),
                r.slot.clone(),
                r.function.to_string(),
                r.host_vf.to_string(),
                r.state.as_str().to_owned(),
                or_dash(r.guest_path),
                or_dash(r.guest_bdf),
                or_dash(r.bound_driver.as_ref()),
            ]
        })
        .collect();
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

/// How the daemon reaches the VM, in a few words.
fn backend_text(backend: &VmBackend) -> String {
    match backend {
        VmBackend::Qmp { qmp_socket, .. } => format!("qmp {qmp_socket}"),
        VmBackend::Libvirt { domain, uri, .. } => format!("libvirt {domain} ({uri})"),
    }
}

fn vm_block(vm: &Vm) -> String {
    let mut out = format!(
        "VM {} (slots: {}; {}; agent {})\n",
        vm.name,
        vm.slots.len(),
        backend_text(&vm.backend),
        vm.backend.agent_socket()
    );
    out += &correspondence(&vm.correspondence);
    for f in vm.failures.iter().take(3) {
        let _ = writeln!(
            out,
            "  recent failure at local index {}: {}",
            f.local_index, f.reason
        );
    }
    out
}

fn inventory(inventory: &Inventory) -> String {
    let functions = inventory
        .functions
        .iter()
        .map(|f| {
            vec![
                f.name.to_string(),
                f.total.to_string(),
                f.free.to_string(),
                f.guest_driver.to_string(),
                f.host_driver.to_string(),
            ]
        })
        .collect();
    let vfs = inventory
        .vfs
        .iter()
        .map(|v| {
            vec![
                v.global_index.to_string(),
                or_dash(v.function.as_ref()),
                v.location.to_string(),
                v.pf.to_string(),
                match (&v.kubelet, &v.quarantined, &v.programming) {
                    (Some(k), _, _) => holder_text(k.owner.as_ref()),
                    (None, Some(_), _) => "(quarantine)".to_owned(),
                    (None, None, Some(_)) => "(its card)".to_owned(),
                    (None, None, None) => or_dash(v.vm.as_ref()),
                },
                or_dash(v.local_index),
                match (&v.kubelet, &v.quarantined, &v.programming) {
                    (Some(k), _, _) => k.state.as_str().to_owned(),
                    (None, Some(_), _) => "quarantined".to_owned(),
                    (None, None, Some(to)) => format!("programming into {to}"),
                    (None, None, None) => or_dash(v.state.map(|s| s.as_str())),
                },
            ]
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
                "INDEX", "FUNCTION", "LOCATION", "PF", "HOLDER", "LOCAL", "STATE"
            ],
            vfs
        )
    )
}

/// Who holds a kubelet-held VF: `pod <namespace>/<pod>/<container>`, or the kubelet while
/// PodResources has not named the container yet.
fn holder_text(owner: Option<&vfmap_core::PodContainer>) -> String {
    owner.map_or_else(
        || "kubelet (container not yet known)".to_owned(),
        |o| format!("pod {o}"),
    )
}

/// `vfmap status`'s part for Kubernetes: the VFs the kubelet holds, with their containers.
fn kubelet_block(vfs: &[vfmap_api::KubeletVf]) -> String {
    let rows = vfs
        .iter()
        .map(|v| {
            vec![
                v.function.to_string(),
                v.location.to_string(),
                v.state.as_str().to_owned(),
                holder_text(v.owner.as_ref()),
            ]
        })
        .collect();
    format!(
        "\nKubernetes (held by the kubelet, {} VF(s)):\n{}",
        vfs.len(),
        table(&["FUNCTION", "HOST VF", "STATE", "HELD BY"], rows)
    )
}

/// The text of a call's answer, read as the API's type for that call.
fn render(call_spec: &Call, value: &Value) -> Result<String, Failure> {
    Ok(match call_spec {
        Call::Inventory => inventory(&answer(value)?),
        Call::Vm(VmCommand::Add { name, .. }) => {
            let vm: Vm = answer(value)?;
            let slots: Vec<&str> = vm.slots.iter().map(|s| s.as_str()).collect();
            format!(
                "registered VM {name} ({}) with {} slot(s): {}\n",
                backend_text(&vm.backend),
                slots.len(),
                slots.join(" ")
            )
        }
        Call::Vm(VmCommand::Rm { name }) => {
            let removed: Removed = answer(value)?;
            format!("removed VM {name}; released {} VF(s)\n", removed.released)
        }
        Call::Vm(VmCommand::List) => {
            let list: VmList = answer(value)?;
            let rows = list
                .vms
                .iter()
                .map(|vm| {
                    vec![
                        vm.name.to_string(),
                        vm.slots.len().to_string(),
                        vm.correspondence.len().to_string(),
                        backend_text(&vm.backend),
                    ]
                })
                .collect();
            table(&["NAME", "SLOTS", "VFS", "BACKEND"], rows)
        }
        Call::Quarantine(QuarantineCommand::List) => {
            let list: vfmap_api::QuarantineList = answer(value)?;
            if list.vfs.is_empty() {
                return Ok("no VF is quarantined\n".into());
            }
            let rows = list
                .vfs
                .iter()
                .map(|q| {
                    vec![
                        q.global_index.to_string(),
                        q.location.to_string(),
                        or_dash(q.function.as_ref()),
                        q.reason.clone(),
                    ]
                })
                .collect();
            table(&["INDEX", "VF", "FUNCTION", "WHY"], rows)
        }
        Call::Program { .. } => {
            let done: vfmap_api::Programmed = answer(value)?;
            format!(
                "VF {} ({}) re-programmed: {} -> {}\n",
                done.global_index, done.location, done.from, done.to
            )
        }
        Call::Quarantine(QuarantineCommand::Clear { .. }) => {
            let cleared: vfmap_api::Cleared = answer(value)?;
            format!(
                "VF {} ({}) is back in the pool{}\n",
                cleared.global_index,
                cleared.location,
                if cleared.scrubbed {
                    " after a clean scrub"
                } else {
                    " (not scrubbed: --force)"
                }
            )
        }
        Call::Attach(a) => {
            let attached: Attached = answer(value)?;
            format!(
                "attached to VM {}:\n{}",
                a.vm,
                correspondence(&attached.attached)
            )
        }
        Call::Detach { vm, local_index } => {
            let _: Detached = answer(value)?;
            format!("detached local index {local_index} from VM {vm}\n")
        }
        Call::Status(Some(_)) => vm_block(&answer(value)?),
        Call::Status(None) => {
            let list: VmList = answer(value)?;
            let mut text = if list.vms.is_empty() {
                "no VM registered\n".into()
            } else {
                let vms: Vec<String> = list.vms.iter().map(vm_block).collect();
                vms.join("\n")
            };
            if !list.kubelet.is_empty() {
                text += &kubelet_block(&list.kubelet);
            }
            text
        }
    })
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
