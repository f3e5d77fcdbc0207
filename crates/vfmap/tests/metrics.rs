//! The daemon's Prometheus metrics, scraped from the real `vfmap serve` (shared test world:
//! fake QEMU and agents) and read with a Prometheus text-format parser (`prometheus-parse`):
//! the counters move exactly as the scenario says, the VF gauges follow the pool, the agent
//! links and recovery are reported, and the optional TCP listener serves only `/metrics`, on
//! loopback unless the operator says otherwise.

mod common;
mod world;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_parse::{LineInfo, Scrape, Value};
use serde_json::Value as Json;
use world::*;

/// One HTTP/1.1 exchange: status, header block (lowercased), body.
fn exchange(mut stream: impl Read + Write, method: &str, path: &str) -> (u16, String, String) {
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: vfmap\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (
        head[9..12].parse().unwrap(),
        head.to_ascii_lowercase(),
        body.to_owned(),
    )
}

/// A parsed exposition.
struct Metrics {
    scrape: Scrape,
    text: String,
}

impl Metrics {
    /// Parses a `/metrics` answer, after checking it is the Prometheus text format and that
    /// the parser understood every line of it (nothing silently skipped).
    fn parse(status: u16, head: &str, text: String) -> Metrics {
        assert_eq!(status, 200, "{head}\n{text}");
        assert!(
            head.contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        for line in text.lines() {
            let understood = match LineInfo::parse(line) {
                LineInfo::Doc { .. } | LineInfo::Type { .. } => line.starts_with('#'),
                LineInfo::Sample { value, .. } => value.parse::<f64>().is_ok(),
                LineInfo::Empty | LineInfo::Ignored => false,
            };
            assert!(understood, "a line the parser does not take: {line:?}");
        }
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        for name in [
            "vfmap_attach_duration_seconds",
            "vfmap_detach_duration_seconds",
            "vfmap_attach_failures_total",
            "vfmap_store_commit_duration_seconds",
            "vfmap_recovery_assignments_total",
            "vfmap_start_time_seconds",
            "vfmap_vfs",
        ] {
            assert!(
                scrape.docs.get(name).is_some_and(|d| !d.is_empty()),
                "{name} has no HELP in\n{text}"
            );
        }
        Metrics { scrape, text }
    }

    /// The value of the series `name` with exactly these labels, if it exists.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .find(|s| {
                let have: BTreeMap<&str, &str> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                have == want
            })
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                other => panic!("{name}{labels:?} is not a plain value: {other:?}"),
            })
    }

    /// [`Metrics::get`], with a missing series read as 0 (a counter not yet touched).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Every series of `name`: its labels → value.
    fn series(&self, name: &str) -> BTreeMap<String, f64> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                    (s.labels.to_string(), *v)
                }
                other => panic!("{name} is not a plain value: {other:?}"),
            })
            .collect()
    }

    /// `vfmap_vfs` of a function: free, assigned, releasing, failed.
    fn vfs(&self, function: &str) -> [f64; 4] {
        ["free", "assigned", "releasing", "failed"].map(|state| {
            self.get("vfmap_vfs", &[("function", function), ("state", state)])
                .unwrap_or_else(|| panic!("no vfmap_vfs for {function} {state}:\n{}", self.text))
        })
    }

    /// The attach or detach histogram's `_count` for an outcome.
    fn operations(&self, which: &str, outcome: &str) -> f64 {
        self.count(
            &format!("vfmap_{which}_duration_seconds_count"),
            &[("backend", "qmp"), ("outcome", outcome)],
        )
    }
}

fn scrape(world: &World) -> Metrics {
    let (status, head, text) = exchange(
        UnixStream::connect(&world.socket).unwrap(),
        "GET",
        "/metrics",
    );
    Metrics::parse(status, &head, text)
}

/// Scrapes until `done` holds (the agent links connect in the background).
fn scrape_until(world: &World, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = scrape(world);
        if done(&metrics) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "{what}; last scrape:\n{}",
            metrics.text
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An attach over the API; the error code it answered, if it failed.
fn attach(world: &World, vm: &str, body: &str) -> Option<String> {
    let (status, answer) = world.raw("POST", &format!("/v1/vms/{vm}/attach"), body);
    match status {
        200 => None,
        _ => Some(answer["error"]["code"].as_str().unwrap().to_owned()),
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn the_counters_move_as_the_scenario_says() {
    let mut world = World::new();
    world.configure("qmp_timeout_ms = 1000\n");
    let started = now();
    world.start(None);
    let _web = world.vm("web", 4, &[], &[]);
    let _bad = world.vm("bad", 2, &[], &["--fail-add", "rp0"]);
    // A hung QEMU and no agent: its attach times out, and the rollback's unplug too.
    let _stuck = world.vm("stuck", 1, NO_AGENT, &["--hang"]);
    let links =
        |m: &Metrics| ["web", "bad", "stuck"].map(|vm| m.get("vfmap_agent_link_up", &[("vm", vm)]));
    let before = scrape_until(&world, "the agent links did not come up", |m| {
        links(m) == [Some(1.0), Some(1.0), Some(0.0)]
    });
    assert_eq!(before.vfs("crypto"), [8.0, 0.0, 0.0, 0.0]);
    assert_eq!(before.vfs("compress"), [8.0, 0.0, 0.0, 0.0]);
    let start_time = before.get("vfmap_start_time_seconds", &[]).unwrap();
    assert!(
        (started - 1.0..=now()).contains(&start_time),
        "{started} {start_time}"
    );
    // Nothing was stored, so recovery decided nothing; every decision is there at 0.
    for decision in ["keep", "rollback", "finish_release", "lost", "deferred"] {
        assert_eq!(
            before.get(
                "vfmap_recovery_assignments_total",
                &[("decision", decision)]
            ),
            Some(0.0),
            "{decision}"
        );
    }

    // Three attaches and a detach that work.
    assert_eq!(attach(&world, "web", r#"{"function":"crypto"}"#), None);
    assert_eq!(
        attach(&world, "web", r#"{"function":"compress","count":2}"#),
        None
    );
    assert_eq!(attach(&world, "web", r#"{"function":"crypto"}"#), None);
    let (status, body) = world.raw("DELETE", "/v1/vms/web/devices/0", "");
    assert_eq!(status, 200, "{body}");
    // Three that fail: the hypervisor refuses the plug (rolled back), the pool has too few
    // VFs (refused before anything is tried), the hypervisor hangs (the VF cannot be
    // unplugged, so it waits for a cleanup).
    let refused_plug = attach(&world, "bad", r#"{"function":"crypto"}"#).expect("bad fails");
    let too_many = attach(&world, "web", r#"{"function":"crypto","count":9}"#);
    assert_eq!(too_many.as_deref(), Some("no_free_vf"));
    let hung = attach(&world, "stuck", r#"{"function":"crypto"}"#).expect("stuck fails");
    assert_eq!(
        (refused_plug.as_str(), hung.as_str()),
        ("hypervisor_failed", "hypervisor_timeout")
    );

    let after = scrape(&world);
    let delta = |which: &str, outcome: &str| {
        after.operations(which, outcome) - before.operations(which, outcome)
    };
    assert_eq!(delta("attach", "ok"), 3.0, "{}", after.text);
    assert_eq!(delta("attach", "failed"), 2.0, "{}", after.text);
    assert_eq!(delta("attach", "refused"), 1.0, "{}", after.text);
    assert_eq!(delta("detach", "ok"), 1.0, "{}", after.text);
    assert_eq!(delta("detach", "failed") + delta("detach", "refused"), 0.0);
    // Failures by the code each client got, and no other code moved.
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for code in [&refused_plug, "no_free_vf", &hung] {
        *want.entry(format!("code=\"{code}\"")).or_default() += 1.0;
    }
    let (failures_before, failures_after) = (
        before.series("vfmap_attach_failures_total"),
        after.series("vfmap_attach_failures_total"),
    );
    // Every code is listed from the start, at 0.
    for code in [
        "bad_request",
        "unknown_vm",
        "no_free_vf",
        "attach_failed",
        "degraded",
    ] {
        let labels = format!("code=\"{code}\"");
        assert_eq!(
            failures_before.get(&labels),
            Some(&0.0),
            "{failures_before:?}"
        );
    }
    for (labels, value) in &failures_after {
        let moved = value - failures_before.get(labels).copied().unwrap_or(0.0);
        assert_eq!(
            moved,
            want.get(labels).copied().unwrap_or(0.0),
            "{labels} (the scenario's failures: {want:?})"
        );
    }
    // VFs per state: web holds one crypto VF (local index 3) and two compress ones, the hung
    // VM's crypto VF waits for its cleanup, the refused plug's VF went back to the pool.
    assert_eq!(after.vfs("crypto"), [6.0, 1.0, 0.0, 1.0], "{}", after.text);
    assert_eq!(
        after.vfs("compress"),
        [6.0, 2.0, 0.0, 0.0],
        "{}",
        after.text
    );
    // Every change was committed, and each commit measured.
    let commits = |m: &Metrics| m.count("vfmap_store_commit_duration_seconds_count", &[]);
    assert!(commits(&after) - commits(&before) >= 10.0, "{}", after.text);
    assert!(after.count("vfmap_store_commit_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(
        links(&after),
        [Some(1.0), Some(1.0), Some(0.0)],
        "{}",
        after.text
    );

    // A removed VM leaves no link series behind.
    let (status, body) = world.raw("DELETE", "/v1/vms/bad", "");
    assert_eq!(status, 200, "{body}");
    // (The link task stops in the background.)
    scrape_until(&world, "the removed VM's link series stayed", |m| {
        links(m) == [Some(1.0), None, Some(0.0)]
    });

    // After a restart: web's three ready VFs are kept; the hung VM's hypervisor cannot be
    // asked, so its VF is deferred to the background cleanup.
    world.kill9();
    world.start(None);
    let recovered = scrape(&world);
    let decisions: BTreeMap<&str, f64> = ["keep", "rollback", "finish_release", "lost", "deferred"]
        .into_iter()
        .map(|d| {
            (
                d,
                recovered.count("vfmap_recovery_assignments_total", &[("decision", d)]),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        BTreeMap::from([
            ("deferred", 1.0),
            ("finish_release", 0.0),
            ("keep", 3.0),
            ("lost", 0.0),
            ("rollback", 0.0),
        ]),
        "{}",
        recovered.text
    );
    assert_eq!(
        recovered.vfs("crypto"),
        [6.0, 1.0, 0.0, 1.0],
        "{}",
        recovered.text
    );
    assert_eq!(recovered.vfs("compress"), [6.0, 2.0, 0.0, 0.0]);
    // A new process: its own start time, its own counts.
    assert!(recovered.get("vfmap_start_time_seconds", &[]).unwrap() >= start_time);
    assert_eq!(recovered.operations("attach", "ok"), 0.0);

    // Only GET (and HEAD) on /metrics, with the API's error envelope otherwise.
    let (status, body) = world.raw("POST", "/metrics", "");
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

/// The port the daemon's metrics listener took, from its log.
fn metrics_address(world: &World) -> String {
    let log = world.log_text();
    log.lines()
        .filter(|l| l.contains("metrics listening"))
        .flat_map(str::split_whitespace)
        .find_map(|w| w.strip_prefix("address="))
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .to_owned()
}

#[test]
fn the_tcp_listener_serves_only_metrics_and_only_on_loopback_unless_told() {
    let mut world = World::new();
    world.configure("metrics_listen = \"127.0.0.1:0\"\n");
    world.start(None);
    let address = metrics_address(&world);
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    assert_ne!(address, "127.0.0.1:0", "an ephemeral port was chosen");
    let tcp = || TcpStream::connect(&address).unwrap();
    let (status, head, text) = exchange(tcp(), "GET", "/metrics");
    let metrics = Metrics::parse(status, &head, text);
    assert_eq!(metrics.vfs("crypto"), [8.0, 0.0, 0.0, 0.0]);
    // Nothing of the API is there: every other path is a 404, other methods a 405, both in
    // the API's error envelope.
    for path in [
        "/v1/health",
        "/v1/openapi.json",
        "/v1/vms",
        "/",
        "/metrics/x",
    ] {
        let (status, head, body) = exchange(tcp(), "GET", path);
        assert_eq!(status, 404, "{path}: {head}");
        let body: Json = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    let (status, head, body) = exchange(tcp(), "POST", "/v1/vms");
    assert_eq!(status, 404, "{head}");
    assert!(body.contains("only GET /metrics"), "{body}");
    let (status, head, _) = exchange(tcp(), "DELETE", "/metrics");
    assert_eq!(status, 405, "{head}");
    assert!(head.contains("\r\nallow: get,head"), "{head}");
    // The unix socket serves the same document.
    assert!(
        scrape(&world).get("vfmap_vfs", &[("function", "crypto"), ("state", "free")]) == Some(8.0)
    );
    drop(world);

    // Other addresses are refused before anything starts, saying how to allow them.
    for address in ["0.0.0.0:9464", "[::]:9464", "192.0.2.1:9464"] {
        let world = World::new();
        world.configure(&format!("metrics_listen = \"{address}\"\n"));
        let out = Command::new(env!("CARGO_BIN_EXE_vfmap"))
            .args(["serve", "--config"])
            .arg(&world.config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{address}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "`metrics_listen = \"{address}\"` is not a loopback address"
            )) && stderr.contains("metrics_listen_any = true"),
            "{address}: {stderr}"
        );
        assert!(!world.socket.exists(), "nothing started");
        assert!(
            !world.dir.path().join("state").exists(),
            "nothing was touched"
        );
    }
}
