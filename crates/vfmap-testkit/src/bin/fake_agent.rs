//! Test double of a guest agent behind a VM's virtio-serial socket: says hello, answers each
//! `apply` with `bound` per entry (or `failed` for one function), optionally misbehaving first.
//!
//!     vfmap-fake-agent --socket PATH [--state FILE] [--fail-function F] [--hostile]
//!                      [--silent] [--delay-ms N]
//!
//! `--hostile` sends, before each real answer, an over-long line, garbage, an answer to another
//! request id and an answer with a bad driver name — all of which the daemon must drop.
//! `--state FILE` holds the last applied correspondence, one `local_index function driver` line
//! per entry.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::json;
use vfmap_core::Bdf;
use vfmap_core::protocol::{
    Answer, GuestMessage, HostMessage, MAX_LINE, parse_host_message, to_line,
};

struct Options {
    state: Option<String>,
    fail_function: Option<String>,
    hostile: bool,
    silent: bool,
    delay: Duration,
}

fn handle(options: &Options, stream: UnixStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    writer.write_all(&to_line(&GuestMessage::Hello {
        v: 1,
        agent: "vfmap-fake-agent".into(),
    }))?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let Ok(HostMessage::Apply { id, entries, .. }) = parse_host_message(line.as_bytes()) else {
            continue;
        };
        std::thread::sleep(options.delay);
        if options.silent {
            continue;
        }
        if let Some(path) = &options.state {
            let text: String = entries
                .iter()
                .map(|e| format!("{} {} {}\n", e.local_index, e.function, e.guest_driver))
                .collect();
            // Atomically, like the fake QEMU: a reader must never see a half-written file.
            let tmp = format!("{path}.tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(tmp, path)?;
        }
        if options.hostile {
            let mut junk = vec![b'x'; MAX_LINE + 10];
            junk.push(b'\n');
            writer.write_all(&junk)?;
            writer.write_all(b"{not json\n")?;
            writer.write_all(
                format!(
                    "{}\n",
                    json!({"type": "result", "v": 1, "id": id.wrapping_add(1), "entries": []})
                )
                .as_bytes(),
            )?;
            let bad = json!({"type": "result", "v": 1, "id": id, "entries": [{"state": "bound", "local_index": 0, "driver": "../../x", "guest_bdf": "0000:01:00.0"}]});
            writer.write_all(format!("{bad}\n").as_bytes())?;
        }
        let answers: Vec<Answer> = entries
            .iter()
            .map(|e| {
                if options.fail_function.as_deref() == Some(e.function.as_str()) {
                    Answer::Failed {
                        local_index: e.local_index,
                        reason: format!("modprobe {}: not found", e.guest_driver),
                    }
                } else {
                    Answer::Bound {
                        local_index: e.local_index,
                        driver: e.guest_driver.clone(),
                        guest_bdf: Bdf::new(
                            0,
                            e.path
                                .port_function
                                .wrapping_add(1)
                                .wrapping_add(8u8.wrapping_mul(e.path.port_device.wrapping_sub(3))),
                            e.path.device,
                            e.path.function,
                        )
                        .unwrap_or(Bdf {
                            domain: 0,
                            bus: 0,
                            device: 0,
                            function: 0,
                        }),
                    }
                }
            })
            .collect();
        writer.write_all(&to_line(&GuestMessage::Result {
            v: 1,
            id,
            entries: answers,
        }))?;
    }
    Ok(())
}

fn main() {
    let flags = vfmap_testkit::Flags::from_env();
    let Some(socket) = flags.value("--socket") else {
        eprintln!(
            "usage: vfmap-fake-agent --socket PATH [--state FILE] [--fail-function F] [--hostile] [--silent] [--delay-ms N]"
        );
        std::process::exit(2);
    };
    let options = Options {
        state: flags.value("--state"),
        fail_function: flags.value("--fail-function"),
        hostile: flags.has("--hostile"),
        silent: flags.has("--silent"),
        delay: flags.millis("--delay-ms"),
    };
    let listener = vfmap_testkit::listen(&socket);
    // Like QEMU's chardev socket server: one host connection at a time.
    for stream in listener.incoming().flatten() {
        let _ = handle(&options, stream);
    }
}
