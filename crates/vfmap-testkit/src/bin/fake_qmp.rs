//! Test double of a QEMU VM's QMP socket: greeting, `qmp_capabilities`, `device_add` into
//! empty root ports, `device_del` with a `DEVICE_DELETED` event, `query-pci`.
//!
//!     vfmap-fake-qmp --socket PATH --slots rp0,rp1 [--state FILE] [--add-delay-ms N]
//!                    [--fail-add SLOT] [--hang]
//!
//! `--hang` accepts connections and never says anything: a hung QEMU.
//! `--state FILE` is rewritten after each change with the plugged devices, one
//! `slot id host` line each, so tests can compare what the daemon believes with the "VM".

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Default)]
struct Vm {
    slots: Vec<String>,
    /// slot → (device id, host)
    plugged: BTreeMap<String, (String, String)>,
    state_file: Option<String>,
    add_delay: Duration,
    fail_add: Option<String>,
    hang: bool,
}

impl Vm {
    fn save(&self) {
        if let Some(path) = &self.state_file {
            let text: String = self
                .plugged
                .iter()
                .map(|(slot, (id, host))| format!("{slot} {id} {host}\n"))
                .collect();
            let tmp = format!("{path}.tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(tmp, path);
            }
        }
    }

    fn query_pci(&self) -> Value {
        let ports: Vec<Value> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let devices: Vec<Value> = self
                    .plugged
                    .get(slot)
                    .map(|(id, _)| {
                        vec![json!({"bus": i + 1, "slot": 0, "function": 0, "qdev_id": id})]
                    })
                    .unwrap_or_default();
                json!({"bus": 0, "slot": 3 + i / 8, "function": i % 8, "qdev_id": slot,
                       "pci_bridge": {"bus": {"number": i + 1}, "devices": devices}})
            })
            .collect();
        json!([{"bus": 0, "devices": ports}])
    }
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn handle(vm: &Arc<Mutex<Vm>>, stream: UnixStream) -> std::io::Result<()> {
    if vm.lock().unwrap().hang {
        // Hold the connection open and never answer, like a QEMU stuck in its main loop.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let mut writer = stream.try_clone()?;
    let mut send = |v: &Value| -> std::io::Result<()> { writeln!(writer, "{v}") };
    send(
        &json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}),
    )?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let Ok(request) = serde_json::from_str::<Value>(&line) else {
            send(&error("GenericError", "JSON parse error"))?;
            continue;
        };
        let args = request.get("arguments").cloned().unwrap_or(json!({}));
        let arg = |k: &str| {
            args.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        match request
            .get("execute")
            .and_then(Value::as_str)
            .unwrap_or_default()
        {
            "qmp_capabilities" => send(&json!({"return": {}}))?,
            "query-pci" => {
                let answer = vm.lock().unwrap().query_pci();
                send(&json!({"return": answer}))?;
            }
            "device_add" => {
                let delay = vm.lock().unwrap().add_delay;
                std::thread::sleep(delay);
                let mut vm = vm.lock().unwrap();
                let (bus, id) = (arg("bus"), arg("id"));
                let reply = if !vm.slots.contains(&bus) {
                    error("GenericError", &format!("Bus '{bus}' not found"))
                } else if vm.fail_add.as_deref() == Some(bus.as_str()) {
                    error(
                        "GenericError",
                        "vfio 0000:00:00.0: failed to setup container",
                    )
                } else if vm.plugged.contains_key(&bus) {
                    error(
                        "GenericError",
                        &format!(
                            "PCI: slot 0 function 0 not available for {}, in use by {}",
                            arg("driver"),
                            vm.plugged[&bus].0
                        ),
                    )
                } else if vm.plugged.values().any(|(d, _)| *d == id) {
                    error("GenericError", &format!("Duplicate device ID '{id}'"))
                } else {
                    vm.plugged.insert(bus, (id, arg("host")));
                    vm.save();
                    json!({"return": {}})
                };
                send(&reply)?;
            }
            "device_del" => {
                let id = arg("id");
                let mut vm = vm.lock().unwrap();
                let slot = vm
                    .plugged
                    .iter()
                    .find(|(_, (d, _))| *d == id)
                    .map(|(s, _)| s.clone());
                match slot {
                    Some(slot) => {
                        vm.plugged.remove(&slot);
                        vm.save();
                        send(&json!({"return": {}}))?;
                        send(
                            &json!({"event": "DEVICE_DELETED", "data": {"path": format!("/machine/peripheral/{id}/virtio-backend")}}),
                        )?;
                        send(
                            &json!({"event": "DEVICE_DELETED", "data": {"device": id, "path": format!("/machine/peripheral/{id}")}}),
                        )?;
                    }
                    None => send(&error(
                        "DeviceNotFound",
                        &format!("Device '{id}' not found"),
                    ))?,
                }
            }
            other => send(&error(
                "CommandNotFound",
                &format!("The command {other} has not been found"),
            ))?,
        }
    }
    Ok(())
}

fn main() {
    let flags = vfmap_testkit::Flags::from_env();
    let Some(socket) = flags.value("--socket") else {
        eprintln!(
            "usage: vfmap-fake-qmp --socket PATH --slots rp0,rp1 [--state FILE] [--add-delay-ms N] [--fail-add SLOT] [--hang]"
        );
        std::process::exit(2);
    };
    let vm = Vm {
        slots: flags
            .value("--slots")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        state_file: flags.value("--state"),
        add_delay: flags.millis("--add-delay-ms"),
        fail_add: flags.value("--fail-add"),
        hang: flags.has("--hang"),
        ..Vm::default()
    };
    vm.save();
    let vm = Arc::new(Mutex::new(vm));
    let listener = vfmap_testkit::listen(&socket);
    for stream in listener.incoming().flatten() {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let _ = handle(&vm, stream);
        });
    }
}
