//! Fuzz checks for code in `vfmap-daemon` (and the line splitter it shares with the agent).
//! Each function takes one raw input and panics only when the code under test panics or
//! breaks one of the properties asserted here.
//!
//! Included by path from `crates/vfmap-daemon/tests/fuzz_regressions.rs`: use nothing but the
//! daemon's own dependencies and `std`.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use vfmap_core::lines::{Line, LineSplitter, read_line_sync};
use vfmap_core::protocol::{self, MAX_LINE};
use vfmap_core::{Bdf, FunctionName};
use vfmap_daemon::api::{AttachBody, parse_attach};
use vfmap_daemon::lines::LineReader;
use vfmap_daemon::qmp::DeviceTemplate;

/// Runs a future that never waits (its reader is in memory) to completion.
fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("an in-memory read waited"),
    }
}

/// The lines a stream holds, by definition: newline-terminated pieces of at most `max` bytes
/// are complete, longer ones and an unterminated tail are reported by length.
fn lines_by_definition(stream: &[u8], max: usize) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut rest = stream;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let piece = &rest[..i];
        lines.push(if piece.len() <= max {
            Line::Complete(piece.to_vec())
        } else {
            Line::TooLong(piece.len())
        });
        rest = &rest[i + 1..];
    }
    if !rest.is_empty() {
        lines.push(Line::TooLong(rest.len()));
    }
    lines.push(Line::Eof);
    lines
}

/// The channel link fed an arbitrary byte stream. The first three bytes choose the daemon's
/// read buffer capacity (1-64), the agent's (1-64) and the line bound (0-254, or 255 for
/// the protocol's [`MAX_LINE`]); the rest is the stream.
///
/// The daemon's `LineReader` (async, as each link reads its VM's socket) and the agent's
/// `read_line_sync` give the same lines as the definition, whatever the buffer sizes; a
/// complete line is never longer than the bound; each complete line then goes through the
/// parser of its direction without a panic.
pub fn channel_lines(data: &[u8]) {
    let [daemon_capacity, agent_capacity, bound, stream @ ..] = data else {
        return;
    };
    let max = match bound {
        255 => MAX_LINE,
        n => usize::from(*n),
    };
    let expected = lines_by_definition(stream, max);

    let reader = tokio::io::BufReader::with_capacity(1 + usize::from(daemon_capacity % 64), stream);
    let mut link = LineReader::new(reader, max);
    let mut daemon = Vec::new();
    loop {
        let line = now(link.next_line()).expect("in-memory reads do not fail");
        assert!(
            daemon.len() < expected.len(),
            "more lines than the stream holds"
        );
        let eof = line == Line::Eof;
        if let Line::Complete(bytes) = &line {
            assert!(
                bytes.len() <= max,
                "a complete line of {} bytes, bound {max}",
                bytes.len()
            );
            assert!(!bytes.contains(&b'\n'));
            let _ = protocol::parse_guest_message(bytes);
        }
        daemon.push(line);
        if eof {
            break;
        }
    }
    assert_eq!(daemon, expected, "daemon's lines");

    let mut reader =
        std::io::BufReader::with_capacity(1 + usize::from(agent_capacity % 64), stream);
    let mut splitter = LineSplitter::new(max);
    let mut agent = Vec::new();
    loop {
        let line = read_line_sync(&mut reader, &mut splitter).expect("in-memory reads do not fail");
        assert!(
            agent.len() < expected.len(),
            "more lines than the stream holds"
        );
        let eof = line == Line::Eof;
        if let Line::Complete(bytes) = &line {
            let _ = protocol::parse_host_message(bytes);
        }
        agent.push(line);
        if eof {
            break;
        }
    }
    assert_eq!(agent, expected, "agent's lines");
}

/// The daemon's config file (`vfmap serve --config`): TOML into `Config`, then the checks.
///
/// Never panics; an accepted config has profiles and a device template whose `device_add`
/// arguments keep the driver, id, bus and addr vfmap sets (the template cannot override
/// them).
pub fn daemon_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = vfmap_daemon::serve::parse_config(text) else {
        return;
    };
    assert!(!config.profiles.is_empty());
    let template = DeviceTemplate::parse(&config.device_template).expect("checked above");
    let driver = config
        .device_template
        .split(',')
        .next()
        .unwrap_or_default()
        .trim();
    let vf = Bdf::new(0, 0x3b, 0x10, 2).expect("a valid BDF");
    let arguments = template.arguments(vf, "vfmap-vf-7", "vfmap-slot-2");
    assert_eq!(arguments["driver"], driver);
    assert_eq!(arguments["id"], "vfmap-vf-7");
    assert_eq!(arguments["bus"], "vfmap-slot-2");
    assert_eq!(arguments["addr"], "0");
}

/// `POST /v1/vms/{name}/attach`: the text before the first newline is the path's VM name
/// (`vm1` when there is no newline), the rest is the body. `AttachBody` from JSON (the API's
/// `Json` extractor is `serde_json::from_slice`), then `parse_attach`.
///
/// Never panics; an accepted request names the VM it was sent to and a valid function name,
/// and keeps the body's fields; a refusal is a 400.
pub fn api_attach(data: &[u8]) {
    let (vm, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"vm1"[..], data),
    };
    let Ok(vm) = std::str::from_utf8(vm) else {
        return;
    };
    let Ok(body) = serde_json::from_slice::<AttachBody>(body) else {
        return;
    };
    let (function, count, numa_node, pf) =
        (body.function.clone(), body.count, body.numa_node, body.pf);
    match parse_attach(vm, body) {
        Ok(request) => {
            assert_eq!(request.vm.as_str(), vm);
            assert!(FunctionName::new(&request.function).is_ok());
            assert_eq!(
                (
                    &request.function,
                    request.count,
                    request.numa_node,
                    request.pf
                ),
                (&function, count, numa_node, pf)
            );
        }
        Err(e) => assert_eq!(e.into_response().status(), StatusCode::BAD_REQUEST),
    }
}
