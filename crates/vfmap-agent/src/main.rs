//! `vfmap-agent`: the guest service. Opens the virtio-serial port named in its config, says
//! hello, and answers every `apply` from the host; survives the host side disconnecting (the
//! port then reads EOF) and reconnecting, and the port disappearing.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vfmap_agent::{
    Agent, DeviceEvents, Polling, UeventSocket, check_allowlist, find_port, load_config,
};
use vfmap_core::lines::{Line, LineSplitter, read_line_sync};
use vfmap_core::protocol::{
    GuestMessage, HostMessage, MAX_LINE, VERSION, fit_text, parse_host_message, to_line,
};
use vfmap_sysfs::{FileWriter, Modprobe};

fn send(port: &mut File, message: &GuestMessage) -> std::io::Result<()> {
    port.write_all(&to_line(message))
}

/// Serves one opened port until it fails (then the caller reopens it).
fn serve(agent: &mut Agent<'_>, mut port: File) -> std::io::Result<()> {
    send(
        &mut port,
        &GuestMessage::Hello {
            v: VERSION,
            agent: format!("vfmap-agent {}", env!("CARGO_PKG_VERSION")),
        },
    )?;
    let mut reader = BufReader::new(port.try_clone()?);
    let mut splitter = LineSplitter::new(MAX_LINE);
    loop {
        match read_line_sync(&mut reader, &mut splitter)? {
            // The host side is not connected: keep the port open and wait.
            Line::Eof => std::thread::sleep(Duration::from_millis(200)),
            Line::TooLong(n) => {
                let reason = fit_text(&format!(
                    "message of {n} bytes is over the {MAX_LINE}-byte limit"
                ));
                send(&mut port, &GuestMessage::Error { v: VERSION, reason })?;
            }
            Line::Complete(bytes) => match parse_host_message(&bytes) {
                Ok(HostMessage::Apply { id, entries, .. }) => {
                    let answers = agent.apply(&entries);
                    for a in &answers {
                        eprintln!(
                            "vfmap-agent: {}",
                            serde_json::to_string(a).unwrap_or_default()
                        );
                    }
                    for t in agent.timings() {
                        eprintln!(
                            "vfmap-agent: timing local_index={} device_ms={} bind_ms={}",
                            t.local_index,
                            t.device.as_millis(),
                            t.bind.as_millis()
                        );
                    }
                    send(
                        &mut port,
                        &GuestMessage::Result {
                            v: VERSION,
                            id,
                            entries: answers,
                        },
                    )?;
                }
                Err(e) => send(
                    &mut port,
                    &GuestMessage::Error {
                        v: VERSION,
                        reason: fit_text(&e.to_string()),
                    },
                )?,
            },
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config_path = match args.as_slice() {
        [] => PathBuf::from("/etc/vfmap/agent.toml"),
        [flag, path] if flag == "--config" => PathBuf::from(path),
        _ => {
            eprintln!("usage: vfmap-agent [--config FILE]   (default /etc/vfmap/agent.toml)");
            return ExitCode::from(2);
        }
    };
    let config = match load_config(&config_path).and_then(|c| check_allowlist(&c).map(|()| c)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vfmap-agent: error: {e}");
            return ExitCode::from(2);
        }
    };
    let (sysfs_root, dev_root, port_name) = (
        config.sysfs_root.clone(),
        config.dev_root.clone(),
        config.port_name.clone(),
    );
    // Subscribed once, before anything is checked, for the agent's whole life.
    let events: Box<dyn DeviceEvents> = match UeventSocket::open() {
        Ok(socket) => Box::new(socket),
        Err(e) => {
            eprintln!(
                "vfmap-agent: warning: cannot subscribe to kernel uevents ({e}); polling sysfs every {} ms while waiting for devices and drivers",
                Polling::DEFAULT_INTERVAL.as_millis()
            );
            Box::new(Polling::new(Polling::DEFAULT_INTERVAL))
        }
    };
    let mut agent = Agent::new(config, &FileWriter, &Modprobe, events);
    let mut said_waiting = false;
    loop {
        let Some(path) = find_port(&sysfs_root, &dev_root, &port_name) else {
            if !said_waiting {
                eprintln!(
                    "vfmap-agent: waiting for virtio-serial port {port_name:?} (is virtio_console loaded?)"
                );
                said_waiting = true;
            }
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        said_waiting = false;
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(port) => {
                eprintln!("vfmap-agent: serving on {}", path.display());
                if let Err(e) = serve(&mut agent, port) {
                    eprintln!("vfmap-agent: port {}: {e}; reopening", path.display());
                }
            }
            Err(e) => eprintln!("vfmap-agent: cannot open {}: {e}", path.display()),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
