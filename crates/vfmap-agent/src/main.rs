//! `vfmap-agent`: the guest service. With `[metadata]` in its config, it first binds the
//! devices the orchestrator's config-drive metadata assigns. Then it opens the virtio-serial
//! port named in its config, says hello, and answers every `apply` from the host; survives the
//! host side disconnecting (the port then reads EOF) and reconnecting, and the port
//! disappearing. Without a port (metadata only) it keeps waiting for one, quietly.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vfmap_agent::{
    Agent, DeviceEvents, MetadataConfig, Polling, UeventSocket, check_allowlist, check_metadata,
    find_port, load_config, metadata,
};
use vfmap_core::lines::{Line, LineSplitter, read_line_sync};
use vfmap_core::protocol::{
    GuestMessage, HostMessage, MAX_LINE, VERSION, fit_text, parse_host_message, to_line,
};
use vfmap_sysfs::{FileWriter, Modprobe};

/// `eprintln!`, but the line goes out in one write: stderr is unbuffered, so `eprintln!` writes
/// each formatted piece on its own, and on a console shared with other programs their output
/// could land inside the agent's line.
macro_rules! say {
    ($($arg:tt)*) => {{
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

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
                    // The answer goes out first: the host waits for it, and the lines below go
                    // to the console, in most VMs a serial port that is slow to write and
                    // shared with the guest's own output. (Publishing, `devices.json` and
                    // `by-function/`, is done by then: a guest program told by the host that
                    // its device is ready finds it published.)
                    let sent = send(
                        &mut port,
                        &GuestMessage::Result {
                            v: VERSION,
                            id,
                            entries: answers.clone(),
                        },
                    );
                    for a in &answers {
                        say!(
                            "vfmap-agent: {}",
                            serde_json::to_string(a).unwrap_or_default()
                        );
                    }
                    for t in agent.timings() {
                        say!(
                            "vfmap-agent: timing local_index={} device_ms={} bind_ms={}",
                            t.local_index,
                            t.device.as_millis(),
                            t.bind.as_millis()
                        );
                    }
                    if let Some(t) = agent.apply_timing() {
                        let seen = agent.timings().iter().map(|t| t.device).max();
                        say!(
                            "vfmap-agent: timing apply entries={} seen_ms={} bound_ms={} applied_ms={}",
                            t.entries,
                            seen.unwrap_or_default().as_millis(),
                            t.bound.as_millis(),
                            t.applied.as_millis()
                        );
                    }
                    sent?;
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

/// Reads, parses and applies the metadata, saying on stderr what was bound, skipped and why.
fn serve_metadata(agent: &mut Agent<'_>, config: &MetadataConfig) {
    let (bytes, from) = match agent.read_metadata(config) {
        Ok(read) => read,
        Err(e) => {
            say!("vfmap-agent: metadata: {e}; nothing is bound from metadata");
            return;
        }
    };
    let parsed = match metadata::parse(&bytes) {
        Ok(parsed) => parsed,
        Err(e) => {
            say!("vfmap-agent: metadata from {from}: {e}; nothing is bound from metadata");
            return;
        }
    };
    for rejected in &parsed.rejected {
        say!("vfmap-agent: metadata: {rejected}; skipped");
    }
    let published = agent.apply_metadata(&parsed, &config.functions);
    for p in &published {
        let bdf = p.guest_bdf.as_deref().unwrap_or("?");
        match (&p.driver, &p.reason) {
            (Some(driver), _) => say!(
                "vfmap-agent: metadata: {bdf} function {}: bound {driver}",
                p.function
            ),
            (None, reason) => say!(
                "vfmap-agent: metadata: {bdf} function {}: failed: {}",
                p.function,
                reason.as_deref().unwrap_or("unknown")
            ),
        }
    }
    let bound = published.iter().filter(|p| p.state == "bound").count();
    say!(
        "vfmap-agent: metadata from {from}: {bound} bound, {} failed, {} skipped, {} devices not vfmap's",
        published.len() - bound,
        parsed.rejected.len(),
        parsed.ignored
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config_path = match args.as_slice() {
        [] => PathBuf::from("/etc/vfmap/agent.toml"),
        [flag, path] if flag == "--config" => PathBuf::from(path),
        _ => {
            say!("usage: vfmap-agent [--config FILE]   (default /etc/vfmap/agent.toml)");
            return ExitCode::from(2);
        }
    };
    let checked = load_config(&config_path).and_then(|c| {
        check_allowlist(&c)?;
        Ok((check_metadata(&c)?, c))
    });
    let config = match checked {
        Ok((warnings, config)) => {
            for w in warnings {
                say!("vfmap-agent: warning: {}: {w}", config_path.display());
            }
            config
        }
        Err(e) => {
            say!("vfmap-agent: error: {e}");
            return ExitCode::from(2);
        }
    };
    let metadata_config = config.metadata.clone();
    let (sysfs_root, dev_root) = (config.sysfs_root.clone(), config.dev_root.clone());
    let port_names: Vec<String> = config.port_names().into_iter().map(String::from).collect();
    let port_names: Vec<&str> = port_names.iter().map(String::as_str).collect();
    let port_name = port_names.join(" or ");
    // Subscribed once, before anything is checked, for the agent's whole life.
    let events: Box<dyn DeviceEvents> = match UeventSocket::open() {
        Ok(socket) => Box::new(socket),
        Err(e) => {
            say!(
                "vfmap-agent: warning: cannot subscribe to kernel uevents ({e}); polling sysfs every {} ms while waiting for devices and drivers",
                Polling::DEFAULT_INTERVAL.as_millis()
            );
            Box::new(Polling::new(Polling::DEFAULT_INTERVAL))
        }
    };
    let mut agent = Agent::new(config, &FileWriter, &Modprobe, events);
    if let Some(metadata_config) = &metadata_config {
        serve_metadata(&mut agent, metadata_config);
    } else {
        let released = agent.drop_metadata();
        if released > 0 {
            say!(
                "vfmap-agent: no [metadata] in {}: released the {released} devices a previous run bound from metadata",
                config_path.display()
            );
        }
    }
    let mut said_waiting = false;
    loop {
        let Some(path) = find_port(&sysfs_root, &dev_root, &port_names) else {
            if !said_waiting {
                if metadata_config.is_some() {
                    say!(
                        "vfmap-agent: no virtio-serial port {port_name}: serving the metadata's devices only; the port is used if it appears"
                    );
                } else {
                    say!(
                        "vfmap-agent: waiting for virtio-serial port {port_name} (is virtio_console loaded?)"
                    );
                }
                said_waiting = true;
            }
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        said_waiting = false;
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(port) => {
                say!("vfmap-agent: serving on {}", path.display());
                if let Err(e) = serve(&mut agent, port) {
                    say!("vfmap-agent: port {}: {e}; reopening", path.display());
                }
            }
            Err(e) => say!("vfmap-agent: cannot open {}: {e}", path.display()),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
