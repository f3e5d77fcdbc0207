//! Prometheus metrics: one registry with typed handles, shared as an `Arc<Metrics>` by the
//! engine, the guest channel and the store's writer thread, each updating them where the thing
//! happens; served as `GET /metrics` on the API socket and, when `metrics_listen` is set, on a
//! TCP address of its own (`serve.rs`).
//!
//! The format is the Prometheus text format, version 0.0.4 ([`CONTENT_TYPE`]). The VF gauges
//! (`vfmap_vfs`) are counted from the engine's state at each scrape (one pass over the pool,
//! no copy of it); everything else is kept here as it happens. README.md lists every metric.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use vfmap_api::ErrorCode;
use vfmap_core::Recovery;

/// The `Content-Type` of [`Metrics::encode`]'s text: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Buckets of the attach and detach durations, in seconds: an attach waits for the host bind,
/// the hypervisor and the agent, each up to its own deadline (seconds to tens of seconds).
const OPERATION_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of the state database's batch commits, in seconds (WAL with `synchronous = FULL`:
/// one fsync or two per batch).
const COMMIT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// How an attach or a detach ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Done: every VF ready (attach), or the VF free again (detach).
    Ok,
    /// The pool refused before anything was tried (no free VF, unknown VM, busy, ...).
    Refused,
    /// A step failed: rolled back (attach), or left `releasing` to retry (detach); or the
    /// state could not be committed.
    Failed,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// What start-up recovery did with one stored assignment (the `decision` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Recovered {
    /// Ready and still plugged: kept.
    Keep,
    /// An attach the restart interrupted: rolled back.
    RollBack,
    /// A release the restart interrupted: finished.
    FinishRelease,
    /// Ready, but the VM no longer has the device: freed.
    Lost,
    /// The VM's hypervisor could not be asked: unfinished attaches and releases became
    /// background cleanups, ready ones were left as they were.
    Deferred,
}

impl Recovered {
    /// Every decision, so each series exists (at 0) from the start.
    pub const ALL: [Recovered; 5] = [
        Recovered::Keep,
        Recovered::RollBack,
        Recovered::FinishRelease,
        Recovered::Lost,
        Recovered::Deferred,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Recovered::Keep => "keep",
            Recovered::RollBack => "rollback",
            Recovered::FinishRelease => "finish_release",
            Recovered::Lost => "lost",
            Recovered::Deferred => "deferred",
        }
    }
}

impl From<Recovery> for Recovered {
    fn from(decision: Recovery) -> Recovered {
        match decision {
            Recovery::Keep => Recovered::Keep,
            Recovery::RollBack => Recovered::RollBack,
            Recovery::FinishRelease => Recovered::FinishRelease,
            Recovery::Lost => Recovered::Lost,
        }
    }
}

/// The VFs of one function, by state, as counted at a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VfCounts {
    /// The function.
    pub function: String,
    /// Free: in the pool.
    pub free: u64,
    /// Held by a VM: reserved, host bound, plugged, sent or ready.
    pub assigned: u64,
    /// Held by the kubelet for a Kubernetes container (the device plugin).
    pub kubelet: u64,
    /// Being released now (by a VM or the kubelet).
    pub releasing: u64,
    /// Releasing, but the hypervisor did not confirm the unplug: waiting for a cleanup retry
    /// (or, once the attempts are used up, for `vfmap detach`).
    pub failed: u64,
    /// Out of the pool after a failed scrub, until an operator clears it.
    pub quarantined: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    backend: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    phase: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VfLabels {
    function: String,
    state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn operation_histogram() -> Histogram {
    Histogram::new(OPERATION_BUCKETS)
}

/// The daemon's registry and the handles that update it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    attach_duration: Histograms<OperationLabels>,
    detach_duration: Histograms<OperationLabels>,
    attach_failures: Family<CodeLabels, Counter>,
    agent_link_up: Family<VmLabels, Gauge>,
    store_commit: Histogram,
    recovery: Family<DecisionLabels, Counter>,
    hook_duration: Histograms<HookLabels>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every metric registered; `vfmap_start_time_seconds` is now.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vfmap");
        let attach_duration: Histograms<OperationLabels> =
            Family::new_with_constructor(operation_histogram);
        registry.register_with_unit(
            "attach_duration",
            "Duration of attach requests (every VF ready, or rolled back), by hypervisor backend and outcome (ok, refused, failed)",
            Unit::Seconds,
            attach_duration.clone(),
        );
        let detach_duration: Histograms<OperationLabels> =
            Family::new_with_constructor(operation_histogram);
        registry.register_with_unit(
            "detach_duration",
            "Duration of VF releases (detach, VM removal), by hypervisor backend and outcome (ok, refused, failed)",
            Unit::Seconds,
            detach_duration.clone(),
        );
        let attach_failures = Family::<CodeLabels, Counter>::default();
        for code in ErrorCode::ALL {
            attach_failures.get_or_create_owned(&CodeLabels {
                code: code.as_str(),
            });
        }
        registry.register(
            "attach_failures",
            "Attach requests answered with an error, by the API's error code",
            attach_failures.clone(),
        );
        let agent_link_up = Family::<VmLabels, Gauge>::default();
        registry.register(
            "agent_link_up",
            "Whether the daemon is connected to the VM's guest channel (1) or not (0)",
            agent_link_up.clone(),
        );
        let store_commit = Histogram::new(COMMIT_BUCKETS);
        registry.register_with_unit(
            "store_commit_duration",
            "Duration of the state database's batch commits (one transaction per batch)",
            Unit::Seconds,
            store_commit.clone(),
        );
        let recovery = Family::<DecisionLabels, Counter>::default();
        for decision in Recovered::ALL {
            recovery.get_or_create_owned(&DecisionLabels {
                decision: decision.as_str(),
            });
        }
        registry.register(
            "recovery_assignments",
            "Stored assignments recovery handled at start-up, by decision",
            recovery.clone(),
        );
        let hook_duration: Histograms<HookLabels> =
            Family::new_with_constructor(operation_histogram);
        registry.register_with_unit(
            "hook_duration",
            "Duration of card hook runs (docs/hooks.md), by phase (bring_up, program, scrub, discover) and outcome (ok, failed)",
            Unit::Seconds,
            hook_duration.clone(),
        );
        let start_time = Gauge::<f64, AtomicU64>::default();
        start_time.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        registry.register_with_unit(
            "start_time",
            "When the daemon started, in seconds since the Unix epoch",
            Unit::Seconds,
            start_time,
        );
        Metrics {
            registry,
            attach_duration,
            detach_duration,
            attach_failures,
            agent_link_up,
            store_commit,
            recovery,
            hook_duration,
        }
    }

    /// A card hook (or the scrub's config-space check, phase `scrub`) ran.
    pub fn hook_ran(&self, phase: &'static str, ok: bool, took: Duration) {
        self.hook_duration
            .get_or_create(&HookLabels {
                phase,
                outcome: if ok { "ok" } else { "failed" },
            })
            .observe(took.as_secs_f64());
    }

    /// Creates the attach and detach series of `backend` (at 0) for every outcome, so they
    /// are there before the first operation.
    pub fn add_backend(&self, backend: &'static str) {
        for outcome in [Outcome::Ok, Outcome::Refused, Outcome::Failed] {
            let labels = OperationLabels {
                backend,
                outcome: outcome.as_str(),
            };
            self.attach_duration.get_or_create_owned(&labels);
            self.detach_duration.get_or_create_owned(&labels);
        }
    }

    /// An attach request ended.
    pub fn attach_done(&self, backend: &'static str, outcome: Outcome, took: Duration) {
        self.attach_duration
            .get_or_create(&OperationLabels {
                backend,
                outcome: outcome.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    /// A release (detach) ended.
    pub fn detach_done(&self, backend: &'static str, outcome: Outcome, took: Duration) {
        self.detach_duration
            .get_or_create(&OperationLabels {
                backend,
                outcome: outcome.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    /// An attach request was answered with this error code.
    pub fn attach_failed(&self, code: ErrorCode) {
        self.attach_failures
            .get_or_create(&CodeLabels {
                code: code.as_str(),
            })
            .inc();
    }

    /// The VM's guest channel link went up or down.
    pub fn agent_link(&self, vm: &str, up: bool) {
        self.agent_link_up
            .get_or_create(&VmLabels { vm: vm.to_owned() })
            .set(i64::from(up));
    }

    /// The VM's link is gone (the VM was removed): its series goes too.
    pub fn forget_agent_link(&self, vm: &str) {
        self.agent_link_up.remove(&VmLabels { vm: vm.to_owned() });
    }

    /// The store's writer committed a batch.
    pub fn store_committed(&self, took: Duration) {
        self.store_commit.observe(took.as_secs_f64());
    }

    /// Recovery handled one stored assignment.
    pub fn recovered(&self, decision: Recovered) {
        self.recovery
            .get_or_create(&DecisionLabels {
                decision: decision.as_str(),
            })
            .inc();
    }

    /// The exposition: every metric kept here, then `vfmap_vfs` from `vfs` (one series per
    /// function and state, zeros included).
    pub fn encode(&self, vfs: &[VfCounts]) -> String {
        let gauge = Family::<VfLabels, Gauge>::default();
        for counts in vfs {
            for (state, n) in [
                ("free", counts.free),
                ("assigned", counts.assigned),
                ("kubelet", counts.kubelet),
                ("releasing", counts.releasing),
                ("failed", counts.failed),
                ("quarantined", counts.quarantined),
            ] {
                gauge
                    .get_or_create(&VfLabels {
                        function: counts.function.clone(),
                        state,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        let mut scraped = Registry::with_prefix("vfmap");
        scraped.register(
            "vfs",
            "VFs that carry a function, by function and state (free, assigned: held by a VM, kubelet: held for a Kubernetes container, releasing, failed: releasing with an unplug the hypervisor did not confirm, waiting for a cleanup retry, quarantined: out of the pool after a failed scrub until an operator clears it)",
            gauge,
        );
        let mut text = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        let _ = prometheus_text::encode(&mut text, &scraped);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `name{labels} value` lines of the text, sorted (series order within a family is not
    /// fixed).
    fn samples(text: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        lines.sort_unstable();
        lines
    }

    #[test]
    fn names_follow_the_conventions_and_every_family_is_described() {
        let metrics = Metrics::new();
        metrics.add_backend("qmp");
        metrics.attach_done("qmp", Outcome::Ok, Duration::from_millis(30));
        metrics.detach_done("qmp", Outcome::Failed, Duration::from_secs(2));
        metrics.attach_failed(ErrorCode::NoFreeVf);
        metrics.agent_link("web", true);
        metrics.store_committed(Duration::from_micros(300));
        metrics.recovered(Recovered::Keep);
        metrics.hook_ran("scrub", false, Duration::from_millis(20));
        let text = metrics.encode(&[VfCounts {
            function: "crypto".into(),
            free: 6,
            assigned: 1,
            kubelet: 2,
            releasing: 0,
            failed: 1,
            quarantined: 3,
        }]);
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "vfmap_attach_duration_seconds histogram",
                "vfmap_detach_duration_seconds histogram",
                "vfmap_attach_failures_total counter",
                "vfmap_agent_link_up gauge",
                "vfmap_store_commit_duration_seconds histogram",
                "vfmap_recovery_assignments_total counter",
                "vfmap_hook_duration_seconds histogram",
                "vfmap_start_time_seconds gauge",
                "vfmap_vfs gauge",
            ],
            "{text}"
        );
        for name in types.iter().map(|t| t.split(' ').next().unwrap()) {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        let samples = samples(&text);
        for want in [
            r#"vfmap_attach_duration_seconds_bucket{backend="qmp",outcome="ok",le="0.05"} 1"#,
            r#"vfmap_attach_duration_seconds_count{backend="qmp",outcome="ok"} 1"#,
            r#"vfmap_attach_duration_seconds_count{backend="qmp",outcome="refused"} 0"#,
            r#"vfmap_detach_duration_seconds_bucket{backend="qmp",outcome="failed",le="1"} 0"#,
            r#"vfmap_detach_duration_seconds_bucket{backend="qmp",outcome="failed",le="2.5"} 1"#,
            r#"vfmap_attach_failures_total{code="no_free_vf"} 1"#,
            r#"vfmap_attach_failures_total{code="busy"} 0"#,
            r#"vfmap_agent_link_up{vm="web"} 1"#,
            r#"vfmap_hook_duration_seconds_count{phase="scrub",outcome="failed"} 1"#,
            r#"vfmap_vfs{function="crypto",state="quarantined"} 3"#,
            r#"vfmap_store_commit_duration_seconds_count 1"#,
            r#"vfmap_recovery_assignments_total{decision="keep"} 1"#,
            r#"vfmap_recovery_assignments_total{decision="deferred"} 0"#,
            r#"vfmap_vfs{function="crypto",state="free"} 6"#,
            r#"vfmap_vfs{function="crypto",state="failed"} 1"#,
            r#"vfmap_vfs{function="crypto",state="kubelet"} 2"#,
        ] {
            assert!(samples.contains(&want), "{want} missing in\n{text}");
        }
        // Every error code is there from the start, at 0 unless counted.
        assert_eq!(
            samples
                .iter()
                .filter(|l| l.starts_with("vfmap_attach_failures_total{"))
                .count(),
            ErrorCode::ALL.len()
        );
        let start = samples
            .iter()
            .find_map(|l| l.strip_prefix("vfmap_start_time_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!(start > 1.7e9, "{start}");
    }

    #[test]
    fn a_forgotten_link_leaves_no_series() {
        let metrics = Metrics::new();
        metrics.agent_link("web", false);
        metrics.agent_link("db", true);
        metrics.forget_agent_link("web");
        let text = metrics.encode(&[]);
        assert!(!text.contains(r#"vm="web""#), "{text}");
        assert!(text.contains(r#"vfmap_agent_link_up{vm="db"} 1"#), "{text}");
    }
}
