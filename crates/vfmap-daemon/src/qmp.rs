//! The QEMU adapter: a small typed QMP client (QEMU Machine Protocol, JSON lines over a unix
//! socket) implementing [`Hypervisor`].
//!
//! QEMU's QMP socket serves one client at a time, so the adapter opens a connection per
//! operation and serialises operations per VM.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, timeout_at};
use vfmap_core::protocol::GuestPath;
use vfmap_core::{Bdf, SlotId, VmBackend, VmSpec};

use crate::effects::{BoxFuture, Hypervisor, HypervisorError};
use crate::lines::{Line, LineReader};

/// QMP answers (query-pci on a large VM) stay well under this.
const MAX_QMP_LINE: usize = 8 * 1024 * 1024;

/// The `device_add` properties for a VF, from a template such as `vfio-pci,host={bdf}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTemplate {
    driver: String,
    properties: Vec<(String, String)>,
}

impl DeviceTemplate {
    /// Parses `driver[,key=value...]`; `{bdf}` in a value becomes the VF's host address.
    pub fn parse(text: &str) -> Result<DeviceTemplate, String> {
        let mut parts = text.split(',');
        let driver = parts.next().unwrap_or_default().trim();
        if driver.is_empty()
            || !driver
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(format!(
                "device template {text:?} must start with a QEMU device driver, e.g. vfio-pci,host={{bdf}}"
            ));
        }
        let mut properties = Vec::new();
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("device template {text:?}: {part:?} is not key=value"))?;
            if ["id", "bus", "addr", "driver"].contains(&key) {
                return Err(format!("device template {text:?}: {key} is set by vfmap"));
            }
            properties.push((key.to_owned(), value.to_owned()));
        }
        Ok(DeviceTemplate {
            driver: driver.to_owned(),
            properties,
        })
    }

    /// The `device_add` arguments for `vf` as `id` at `bus` (slot 0 behind the root port).
    /// QMP is strictly typed: numbers and on/off become JSON numbers and booleans.
    pub fn arguments(&self, vf: Bdf, id: &str, bus: &str) -> Value {
        let mut args = Map::new();
        args.insert("driver".into(), json!(self.driver));
        args.insert("id".into(), json!(id));
        args.insert("bus".into(), json!(bus));
        args.insert("addr".into(), json!("0"));
        for (key, value) in &self.properties {
            let value = value.replace("{bdf}", &vf.to_string());
            let typed = match value.as_str() {
                "on" | "true" => json!(true),
                "off" | "false" => json!(false),
                v => v
                    .strip_prefix("0x")
                    .map_or_else(
                        || v.parse::<u64>().ok(),
                        |hex| u64::from_str_radix(hex, 16).ok(),
                    )
                    .map_or_else(|| json!(v), |n| json!(n)),
            };
            args.insert(key.clone(), typed);
        }
        Value::Object(args)
    }
}

/// The QMP adapter.
#[derive(Debug)]
pub struct Qmp {
    template: DeviceTemplate,
    timeout: Duration,
    vm_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct Session {
    reader: LineReader<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    events: Vec<Value>,
    deadline: Instant,
    timeout: Duration,
}

enum Reply {
    Return(Value),
    Error { class: String, desc: String },
}

impl Session {
    async fn connect(socket: &str, timeout: Duration) -> Result<Session, HypervisorError> {
        let deadline = Instant::now() + timeout;
        let stream = timeout_at(deadline, UnixStream::connect(socket))
            .await
            // A connect that hangs means a full backlog: QEMU is there but busy.
            .map_err(|_| HypervisorError::Timeout(timeout))?
            .map_err(|e| {
                let (socket, reason) = (socket.to_owned(), e.to_string());
                match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        HypervisorError::NotRunning { socket, reason }
                    }
                    _ => HypervisorError::Unreachable { socket, reason },
                }
            })?;
        let (read, writer) = stream.into_split();
        let mut session = Session {
            reader: LineReader::new(BufReader::new(read), MAX_QMP_LINE),
            writer,
            events: Vec::new(),
            deadline,
            timeout,
        };
        let greeting = session.next_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(HypervisorError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        session.execute("qmp_capabilities", json!({})).await?;
        Ok(session)
    }

    async fn next_message(&mut self) -> Result<Value, HypervisorError> {
        let line = timeout_at(self.deadline, self.reader.next_line())
            .await
            .map_err(|_| HypervisorError::Timeout(self.timeout))?
            .map_err(|e| HypervisorError::Protocol(e.to_string()))?;
        match line {
            Line::Complete(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| HypervisorError::Protocol(e.to_string()))
            }
            Line::TooLong(n) => Err(HypervisorError::Protocol(format!("a {n}-byte answer"))),
            Line::Eof => Err(HypervisorError::Protocol(
                "QEMU closed the QMP connection".into(),
            )),
        }
    }

    /// Runs a command; events that arrive meanwhile are kept for [`Session::wait_event`].
    async fn execute(&mut self, command: &str, arguments: Value) -> Result<Reply, HypervisorError> {
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))
            .map_err(|e| HypervisorError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|e| HypervisorError::Protocol(e.to_string()))?;
        loop {
            let message = self.next_message().await?;
            if let Some(value) = message.get("return") {
                return Ok(Reply::Return(value.clone()));
            }
            if let Some(error) = message.get("error") {
                let text = |k: &str| {
                    error
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                return Ok(Reply::Error {
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            if message.get("event").is_some() {
                self.events.push(message);
            }
        }
    }

    async fn wait_event(&mut self, name: &str, device: &str) -> Result<(), HypervisorError> {
        let matches = |e: &Value| {
            e.get("event").and_then(Value::as_str) == Some(name)
                && e.pointer("/data/device").and_then(Value::as_str) == Some(device)
        };
        if self.events.iter().any(matches) {
            return Ok(());
        }
        loop {
            let message = self.next_message().await?;
            if matches(&message) {
                return Ok(());
            }
        }
    }

    async fn query_pci(&mut self) -> Result<Value, HypervisorError> {
        match self.execute("query-pci", json!({})).await? {
            Reply::Return(value) => Ok(value),
            Reply::Error { class, desc } => Err(HypervisorError::Refused { class, desc }),
        }
    }
}

/// Every device in a `query-pci` answer, with the bridge it sits behind (if any).
fn walk_devices<'a>(
    devices: &'a Value,
    parent: Option<&'a Value>,
    out: &mut Vec<(&'a Value, Option<&'a Value>)>,
) {
    for device in devices.as_array().into_iter().flatten() {
        out.push((device, parent));
        if let Some(children) = device.pointer("/pci_bridge/devices") {
            walk_devices(children, Some(device), out);
        }
    }
}

fn all_devices(answer: &Value) -> Vec<(&Value, Option<&Value>)> {
    let mut out = Vec::new();
    for bus in answer.as_array().into_iter().flatten() {
        if let Some(devices) = bus.get("devices") {
            walk_devices(devices, None, &mut out);
        }
    }
    out
}

fn devfn(device: &Value) -> Option<(u8, u8)> {
    let slot = u8::try_from(device.get("slot")?.as_u64()?).ok()?;
    let function = u8::try_from(device.get("function")?.as_u64()?).ok()?;
    (slot <= 0x1f && function <= 7).then_some((slot, function))
}

/// Whether `slot` is a root port in `query-pci` with nothing behind it.
pub fn check_slot(answer: &Value, slot: &str) -> Result<(), HypervisorError> {
    let port = all_devices(answer)
        .into_iter()
        .find(|(d, _)| d.get("qdev_id").and_then(Value::as_str) == Some(slot))
        .map(|(d, _)| d)
        .filter(|d| d.get("pci_bridge").is_some())
        .ok_or_else(|| HypervisorError::SlotUnknown {
            slot: slot.to_owned(),
        })?;
    let occupant = port
        .pointer("/pci_bridge/devices")
        .and_then(Value::as_array)
        .and_then(|devices| devices.first());
    match occupant {
        None => Ok(()),
        Some(device) => Err(HypervisorError::SlotOccupied {
            slot: slot.to_owned(),
            detail: match device.get("qdev_id").and_then(Value::as_str) {
                Some(id) if !id.is_empty() => format!("device {id} is plugged there"),
                _ => "a device without an id is plugged there".into(),
            },
        }),
    }
}

/// The guest path of device `id` from a `query-pci` answer: its root port's devfn on the root
/// bus, then its own devfn.
pub fn guest_path(answer: &Value, id: &str) -> Option<GuestPath> {
    let (device, port) = all_devices(answer)
        .into_iter()
        .find(|(d, _)| d.get("qdev_id").and_then(Value::as_str) == Some(id))?;
    let (port_device, port_function) = devfn(port?)?;
    let (device, function) = devfn(device)?;
    Some(GuestPath {
        port_device,
        port_function,
        device,
        function,
    })
}

/// The VM's QMP socket; a VM of another backend is not this adapter's.
fn qmp_socket(vm: &VmSpec) -> Result<&str, HypervisorError> {
    match &vm.backend {
        VmBackend::Qmp { qmp_socket, .. } => Ok(qmp_socket),
        other => Err(HypervisorError::Unsupported(other.kind())),
    }
}

impl Qmp {
    /// An adapter that plugs devices built from `template`, waiting at most `timeout` per step.
    pub fn new(template: DeviceTemplate, timeout: Duration) -> Qmp {
        Qmp {
            template,
            timeout,
            vm_locks: Mutex::new(HashMap::new()),
        }
    }

    fn vm_lock(&self, vm: &VmSpec) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(vm.name.to_string()).or_default().clone()
    }
}

impl Hypervisor for Qmp {
    fn attach<'a>(
        &'a self,
        vm: &'a VmSpec,
        slot: &'a SlotId,
        device_id: &'a str,
        vf: Bdf,
    ) -> BoxFuture<'a, Result<GuestPath, HypervisorError>> {
        Box::pin(async move {
            let lock = self.vm_lock(vm);
            let _guard = lock.lock().await;
            let mut session = Session::connect(qmp_socket(vm)?, self.timeout).await?;
            // The slot is checked from QEMU's own device tree first, so an unknown or
            // occupied slot is told apart structurally, not from the wording of an error.
            check_slot(&session.query_pci().await?, slot.as_str())?;
            let args = self.template.arguments(vf, device_id, slot.as_str());
            if let Reply::Error { class, desc } = session.execute("device_add", args).await? {
                return Err(HypervisorError::Refused { class, desc });
            }
            let answer = session.query_pci().await?;
            guest_path(&answer, device_id).ok_or_else(|| {
                HypervisorError::Protocol(format!(
                    "device {device_id} is not behind a root port in query-pci after device_add"
                ))
            })
        })
    }

    fn detach<'a>(
        &'a self,
        vm: &'a VmSpec,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            let lock = self.vm_lock(vm);
            let _guard = lock.lock().await;
            let mut session = Session::connect(qmp_socket(vm)?, self.timeout).await?;
            match session
                .execute("device_del", json!({"id": device_id}))
                .await?
            {
                Reply::Return(_) => session.wait_event("DEVICE_DELETED", device_id).await,
                Reply::Error { class, .. } if class == "DeviceNotFound" => Ok(()),
                Reply::Error { class, desc } => Err(HypervisorError::Refused { class, desc }),
            }
        })
    }

    fn plugged<'a>(
        &'a self,
        vm: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Vec<String>, HypervisorError>> {
        Box::pin(async move {
            let lock = self.vm_lock(vm);
            let _guard = lock.lock().await;
            let mut session = Session::connect(qmp_socket(vm)?, self.timeout).await?;
            let answer = session.query_pci().await?;
            Ok(all_devices(&answer)
                .into_iter()
                .filter_map(|(d, _)| d.get("qdev_id").and_then(Value::as_str))
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let t = DeviceTemplate::parse(
            "vfio-pci,host={bdf},rombar=0,x-pci-device-id=0x1234,multifunction=on",
        )
        .unwrap();
        let args = t.arguments("0000:01:00.2".parse().unwrap(), "vfmap-vf2", "rp1");
        assert_eq!(
            args,
            json!({"driver": "vfio-pci", "id": "vfmap-vf2", "bus": "rp1", "addr": "0",
                   "host": "0000:01:00.2", "rombar": 0, "x-pci-device-id": 0x1234, "multifunction": true})
        );
        assert!(DeviceTemplate::parse("").is_err());
        assert!(DeviceTemplate::parse("vfio-pci,host").is_err());
        assert!(DeviceTemplate::parse("vfio-pci,bus=x").is_err());
        assert!(DeviceTemplate::parse("vfio pci").is_err());
    }

    #[test]
    fn slots_are_checked_from_the_device_tree() {
        let answer = json!([{"bus": 0, "devices": [
            {"bus": 0, "slot": 1, "function": 0, "qdev_id": "nic0"},
            {"bus": 0, "slot": 3, "function": 0, "qdev_id": "rp0", "pci_bridge": {"bus": {"number": 1}, "devices": []}},
            {"bus": 0, "slot": 3, "function": 1, "qdev_id": "rp1", "pci_bridge": {"bus": {"number": 2}, "devices": [
                {"bus": 2, "slot": 0, "function": 0, "qdev_id": "vfmap-vf7"}
            ]}}
        ]}]);
        assert_eq!(check_slot(&answer, "rp0"), Ok(()));
        assert!(matches!(
            check_slot(&answer, "rp1"),
            Err(HypervisorError::SlotOccupied { detail, .. }) if detail.contains("vfmap-vf7")
        ));
        for unknown in ["rp9", "nic0"] {
            assert!(matches!(
                check_slot(&answer, unknown),
                Err(HypervisorError::SlotUnknown { .. })
            ));
        }
    }

    #[test]
    fn guest_path_from_query_pci() {
        let answer = json!([{"bus": 0, "devices": [
            {"bus": 0, "slot": 1, "function": 0, "qdev_id": ""},
            {"bus": 0, "slot": 3, "function": 0, "qdev_id": "rp0", "pci_bridge": {"bus": {"number": 1}, "devices": []}},
            {"bus": 0, "slot": 3, "function": 1, "qdev_id": "rp1", "pci_bridge": {"bus": {"number": 2}, "devices": [
                {"bus": 2, "slot": 0, "function": 0, "qdev_id": "vfmap-vf7"}
            ]}}
        ]}]);
        assert_eq!(
            guest_path(&answer, "vfmap-vf7").unwrap().to_string(),
            "03.1/00.0"
        );
        assert_eq!(
            guest_path(&answer, "rp0"),
            None,
            "a root port is not behind a root port"
        );
        assert_eq!(guest_path(&answer, "nope"), None);
    }
}
