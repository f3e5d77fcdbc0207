//! The daemon's side of `vfmap doctor`: its state directory and socket (with the daemon's own
//! rules, [`vfmap_daemon::paths`]) and a VM's slots and agent channel.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use vfmap_daemon::effects::HypervisorError;
use vfmap_daemon::paths::{PathError, check_private_dir, euid};
use vfmap_daemon::qmp::check_slot;
use vfmap_sysfs::doctor::Check;

use crate::Failure;
use crate::client::call;

/// QMP answers (query-pci on a large VM) stay well under this.
const MAX_QMP_LINE: u64 = 8 * 1024 * 1024;

/// A private directory the daemon needs, checked with the daemon's own rule.
fn private_dir(name: &str, dir: &Path, what: &str, created_mode: &str) -> Check {
    match check_private_dir(dir, what) {
        Ok(()) => Check::ok(
            name,
            format!(
                "{}: a directory owned by this user (uid {}), not writable by others",
                dir.display(),
                euid()
            ),
        ),
        Err(PathError::Unsafe { path, problem, fix }) => {
            Check::error(name, format!("{} {problem}", path.display()), fix)
        }
        Err(PathError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Check::ok(
                name,
                format!(
                    "{} does not exist yet: vfmap serve creates it (mode {created_mode})",
                    dir.display()
                ),
            )
        }
        Err(e) => Check::error(
            name,
            format!("{}: {e}", dir.display()),
            "check the path, and run vfmap doctor as the daemon's user",
        ),
    }
}

/// The state directory: owned by this user, not writable by others.
pub fn state_dir(dir: &Path) -> Check {
    private_dir("state-dir", dir, "the state directory", "0700")
}

/// The socket's directory (same rule) and what sits at the socket path.
pub fn socket(path: &Path, timeout: Duration) -> Vec<Check> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let dir = private_dir("socket-dir", &parent, "the API socket's directory", "0755");
    let name = "socket";
    let socket = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::ok(
            name,
            format!(
                "{} is free: vfmap serve creates it (mode 0600)",
                path.display()
            ),
        ),
        Err(e) => Check::error(
            name,
            format!("{}: {e}", path.display()),
            "check the path, and run vfmap doctor as the daemon's user",
        ),
        Ok(meta) if !meta.file_type().is_socket() => Check::error(
            name,
            format!(
                "{} exists and is not a socket; vfmap serve will not remove it",
                path.display()
            ),
            "move it away or choose another socket path",
        ),
        Ok(_) => match connect(path, timeout) {
            Ok(_) => Check::ok(
                name,
                format!(
                    "{}: a daemon is listening (a second vfmap serve would refuse to start)",
                    path.display()
                ),
            ),
            Err(_) => Check::ok(
                name,
                format!(
                    "{}: a stale socket nobody listens on; vfmap serve replaces it",
                    path.display()
                ),
            ),
        },
    };
    vec![dir, socket]
}

/// Connects to a unix socket, giving up after `timeout` (a full backlog blocks `connect`).
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, String> {
    let path = path.to_owned();
    within(timeout, move || {
        UnixStream::connect(&path).map_err(|e| e.to_string())
    })
}

/// Runs `f` on its own thread and waits at most `timeout` for it (a stuck thread is left
/// behind; the process exits soon after).
fn within<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout)
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

/// Where a VM's pieces are, and (when the daemon told) what vfmap plugged in its slots.
#[derive(Debug)]
pub enum VmTarget {
    /// Given on the command line, or looked up.
    Known {
        /// The VM's name.
        name: String,
        /// QMP socket.
        qmp: String,
        /// Agent channel.
        agent: String,
        /// Slot ids.
        slots: Vec<String>,
        /// slot → what the daemon's table says sits there.
        assigned: Vec<(String, String)>,
    },
    /// The daemon could not say.
    Unknown {
        /// The check saying why.
        check: Check,
    },
}

impl VmTarget {
    /// From `--vm` with `--qmp/--agent/--slot`, or looked up from the daemon at `socket`.
    pub fn from_args(
        name: &str,
        qmp: Option<&str>,
        agent: Option<&str>,
        slots: &[String],
        socket: Option<&Path>,
        timeout: Duration,
    ) -> Result<VmTarget, Failure> {
        if qmp.is_some() || agent.is_some() || !slots.is_empty() {
            let (Some(qmp), Some(agent), false) = (qmp, agent, slots.is_empty()) else {
                return Err(super::bad_arguments(
                    "--vm with its details needs all of --qmp PATH, --agent PATH and --slot ID"
                        .into(),
                ));
            };
            return Ok(VmTarget::Known {
                name: name.to_owned(),
                qmp: qmp.to_owned(),
                agent: agent.to_owned(),
                slots: slots.to_vec(),
                assigned: Vec::new(),
            });
        }
        let Some(socket) = socket else {
            return Err(super::bad_arguments(format!(
                "to check VM {name}, pass --qmp PATH --agent PATH --slot ID..., or the daemon's \
                 --socket (or --config) to look it up"
            )));
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(super::bad_arguments(format!(
                "{name:?} is not a valid VM name (letters, digits, '.', '_', '-')"
            )));
        }
        Ok(lookup(name, socket, timeout))
    }

    /// The VM's checks: QMP answers, each slot is an empty root port (or holds vfmap's own
    /// device), the agent channel accepts connections.
    pub fn checks(self, timeout: Duration) -> Vec<Check> {
        let (name, qmp, agent, slots, assigned) = match self {
            VmTarget::Unknown { check } => return vec![check],
            VmTarget::Known {
                name,
                qmp,
                agent,
                slots,
                assigned,
            } => (name, qmp, agent, slots, assigned),
        };
        let mut checks = Vec::new();
        let qmp_name = format!("vm:{name}:qmp");
        match query_pci(&qmp, timeout) {
            Ok((version, answer)) => {
                checks.push(Check::ok(
                    qmp_name,
                    format!("QEMU {version} answers on {qmp}"),
                ));
                for slot in &slots {
                    checks.push(slot_check(&name, slot, &answer, &assigned));
                }
            }
            Err(e) => {
                let fix = format!(
                    "start the VM with -qmp unix:{qmp},server=on,wait=off, or pass its QMP socket"
                );
                checks.push(Check::error(qmp_name, e.to_string(), fix));
                checks.push(Check::unchecked(
                    format!("vm:{name}:slots"),
                    &format!("{} slot(s): QMP did not answer", slots.len()),
                    "fix the QMP check first",
                ));
            }
        }
        checks.push(agent_check(&name, &agent, timeout));
        checks
    }
}

/// Asks the daemon for the VM's registration.
fn lookup(name: &str, socket: &Path, timeout: Duration) -> VmTarget {
    let check_name = format!("vm:{name}");
    let unknown = |detail: String, fix: String| VmTarget::Unknown {
        check: Check::error(check_name.clone(), detail, fix),
    };
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|runtime| {
            let path = format!("/v1/vms/{name}");
            runtime
                .block_on(async {
                    tokio::time::timeout(timeout, call(socket, Method::GET, &path, None)).await
                })
                .map_err(|_| {
                    format!(
                        "the daemon did not answer within {} ms",
                        timeout.as_millis()
                    )
                })?
                .map_err(|e| e.to_string())
        });
    let value = match answer {
        Err(e) => {
            return unknown(
                format!("cannot look the VM up: {e}"),
                "start vfmap serve, or pass --qmp, --agent and --slot".into(),
            );
        }
        Ok((StatusCode::NOT_FOUND, _)) => {
            return unknown(
                format!("the daemon at {} has no VM {name}", socket.display()),
                format!("vfmap vm add {name} --qmp PATH --agent PATH --slot ID..."),
            );
        }
        Ok((status, value)) if !status.is_success() => {
            return unknown(
                format!("the daemon answered {status}: {value}"),
                "see the daemon's log".into(),
            );
        }
        Ok((_, value)) => value,
    };
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    if let Some(domain) = value
        .pointer("/backend/libvirt/domain")
        .and_then(Value::as_str)
    {
        return unknown(
            format!(
                "VM {name} is the libvirt domain {domain:?}: doctor checks the slots and channel of QMP VMs only"
            ),
            format!(
                "virsh dumpxml {domain} (vfmap vm add checked its root ports and channel at registration)"
            ),
        );
    }
    let qmp_backend = &value["backend"]["qmp"];
    let (Some(qmp), Some(agent)) = (
        text(qmp_backend, "qmp_socket"),
        text(qmp_backend, "agent_socket"),
    ) else {
        return unknown(
            format!("the daemon's answer lacks the VM's sockets: {value}"),
            "check that vfmap and the daemon are the same version".into(),
        );
    };
    let slots = value["slots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    let assigned = value["correspondence"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|row| {
            let slot = text(row, "slot")?;
            let what = format!(
                "local index {}, function {}, host VF {}",
                row["local_index"],
                text(row, "function").unwrap_or_default(),
                text(row, "host_vf").unwrap_or_default()
            );
            Some((slot, what))
        })
        .collect();
    VmTarget::Known {
        name: name.to_owned(),
        qmp,
        agent,
        slots,
        assigned,
    }
}

fn slot_check(vm: &str, slot: &str, answer: &Value, assigned: &[(String, String)]) -> Check {
    let name = format!("vm:{vm}:slot:{slot}");
    match check_slot(answer, slot) {
        Ok(()) => Check::ok(name, "an empty pcie-root-port"),
        Err(HypervisorError::SlotUnknown { .. }) => Check::error(
            name,
            format!("the VM has no pcie-root-port with id {slot} (query-pci)"),
            format!(
                "start QEMU with -device pcie-root-port,id={slot},chassis=N (N unique per \
                 port), or fix the VM's slot list"
            ),
        ),
        Err(HypervisorError::SlotOccupied { detail, .. }) => {
            let occupant = occupant(answer, slot).unwrap_or_default();
            if occupant.starts_with("vfmap-vf") {
                let what = assigned
                    .iter()
                    .find(|(s, _)| s == slot)
                    .map_or(String::new(), |(_, what)| format!(" ({what})"));
                Check::ok(name, format!("holds vfmap's device {occupant}{what}"))
            } else {
                Check::error(
                    name,
                    format!("not empty: {detail}; vfmap can plug nothing there"),
                    format!(
                        "unplug it (QMP device_del), or give vfmap another empty \
                         pcie-root-port instead of {slot}"
                    ),
                )
            }
        }
        Err(other) => Check::error(name, other.to_string(), "see the QMP check"),
    }
}

/// The qdev id of what sits behind root port `slot`.
fn occupant(answer: &Value, slot: &str) -> Option<String> {
    fn find<'a>(devices: &'a Value, slot: &str) -> Option<&'a Value> {
        devices.as_array()?.iter().find_map(|d| {
            if d.get("qdev_id").and_then(Value::as_str) == Some(slot) {
                return Some(d);
            }
            find(d.pointer("/pci_bridge/devices")?, slot)
        })
    }
    let port = answer
        .as_array()?
        .iter()
        .find_map(|bus| find(bus.get("devices")?, slot))?;
    port.pointer("/pci_bridge/devices/0/qdev_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// One QMP exchange: greeting, `qmp_capabilities`, `query-pci`. Returns QEMU's version and
/// the `query-pci` answer.
fn query_pci(socket: &str, timeout: Duration) -> Result<(String, Value), HypervisorError> {
    let path = socket.to_owned();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(qmp_exchange(&path, timeout));
    });
    rx.recv_timeout(timeout + Duration::from_millis(100))
        .map_err(|_| HypervisorError::Timeout(timeout))?
}

fn qmp_exchange(socket: &str, timeout: Duration) -> Result<(String, Value), HypervisorError> {
    let protocol = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            HypervisorError::Timeout(timeout)
        } else {
            HypervisorError::Protocol(e.to_string())
        }
    };
    let stream = UnixStream::connect(socket).map_err(|e| {
        let (socket, reason) = (socket.to_owned(), e.to_string());
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                HypervisorError::NotRunning { socket, reason }
            }
            _ => HypervisorError::Unreachable { socket, reason },
        }
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(protocol)?;
    stream.set_write_timeout(Some(timeout)).map_err(protocol)?;
    let mut writer = stream.try_clone().map_err(protocol)?;
    let mut reader = BufReader::new(stream);
    let mut next = || -> Result<Value, HypervisorError> {
        let mut line = Vec::new();
        (&mut reader)
            .take(MAX_QMP_LINE)
            .read_until(b'\n', &mut line)
            .map_err(protocol)?;
        if line.is_empty() {
            return Err(HypervisorError::Protocol(
                "QEMU closed the QMP connection".into(),
            ));
        }
        serde_json::from_slice(&line).map_err(|e| HypervisorError::Protocol(e.to_string()))
    };
    let greeting = next()?;
    let Some(version) = greeting.pointer("/QMP/version/qemu") else {
        return Err(HypervisorError::Protocol(format!(
            "{socket} is not a QMP socket: it said {greeting}"
        )));
    };
    let version = format!(
        "{}.{}.{}",
        version["major"], version["minor"], version["micro"]
    );
    let mut answer = Value::Null;
    for command in ["qmp_capabilities", "query-pci"] {
        let mut line = json!({"execute": command}).to_string();
        line.push('\n');
        writer.write_all(line.as_bytes()).map_err(protocol)?;
        answer = loop {
            let message = next()?;
            if let Some(value) = message.get("return") {
                break value.clone();
            }
            if let Some(error) = message.get("error") {
                let text = |k: &str| error[k].as_str().unwrap_or_default().to_owned();
                return Err(HypervisorError::Refused {
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            // An event: not ours to act on.
        };
    }
    Ok((version, answer))
}

fn agent_check(vm: &str, path: &str, timeout: Duration) -> Check {
    let name = format!("vm:{vm}:agent");
    let fix = format!(
        "start QEMU with -chardev socket,id=vfmap0,path={path},server=on,wait=off -device \
         virtio-serial -device virtserialport,chardev=vfmap0,name=org.vfmap.0"
    );
    match std::fs::symlink_metadata(path) {
        Err(e) => Check::error(name, format!("{path}: {e}"), fix),
        Ok(meta) if !meta.file_type().is_socket() => {
            Check::error(name, format!("{path} is not a socket"), fix)
        }
        Ok(_) => match connect(Path::new(path), timeout) {
            Ok(_) => Check::ok(
                name,
                format!("{path} accepts connections (doctor sent nothing and closed)"),
            ),
            Err(e) if e.starts_with("no answer") => Check::warning(
                name,
                format!("connecting to {path}: {e}"),
                "QEMU serves one client at a time: check that the daemon is connected to it",
            ),
            Err(e) => Check::error(
                name,
                format!("nobody accepts connections on {path} ({e}): is the VM running?"),
                fix,
            ),
        },
    }
}
