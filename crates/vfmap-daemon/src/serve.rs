//! `vfmap serve`: configuration, the API socket (bound first), start-up behind it (inventory,
//! prepare, state, recovery; see [`crate::readiness`]) and the optional metrics listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::info;
use vfmap_core::{Bdf, Profiles};
use vfmap_sysfs::{FileWriter, Modprobe, Sysfs};

use crate::channel::AgentChannel;
use crate::effects::{SysfsHost, chain};
use crate::engine::{Adapters, Engine, EngineError};
use crate::libvirt::{Backends, Virsh};
use crate::metrics::Metrics;
use crate::paths::{PathError, bind_socket, lock_state_dir};
use crate::qmp::{DeviceTemplate, Qmp};
use crate::readiness::{Startup, StartupPhase};
use crate::resync::Resyncs;
use crate::store::{Store, StoreError};

/// The daemon's configuration file (TOML); every field is documented in README.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Root of the sysfs tree (default `/sys`).
    #[serde(default = "default_sysfs_root")]
    pub sysfs_root: PathBuf,
    /// Device profile files (at least one).
    pub profiles: Vec<PathBuf>,
    /// Directory for the state database and the single-instance lock (created mode 0700;
    /// refused when another user owns it or can write it).
    pub state_dir: PathBuf,
    /// The API's unix socket (created mode 0600; its directory must be private to this user).
    pub socket: PathBuf,
    /// QEMU `device_add` template for a VF; `{bdf}` is its host address (default
    /// `vfio-pci,host={bdf}`).
    #[serde(default = "default_template")]
    pub device_template: String,
    /// How long the guest agent may take to answer one correspondence, in milliseconds
    /// (default 30,000); past it the attach is rolled back.
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout_ms: u64,
    /// How long one hypervisor operation may take, in milliseconds (default 10,000): for QMP
    /// the connect, a command, and for an unplug the `DEVICE_DELETED` event; for libvirt each
    /// `virsh` call, and for an unplug libvirt's removal of the device from the live XML.
    #[serde(default = "default_qmp_timeout")]
    pub qmp_timeout_ms: u64,
    /// How long a host driver bind may take to show, in milliseconds (default 5,000).
    #[serde(default = "default_settle")]
    pub settle_ms: u64,
    /// How often every VM is checked for devices with vfmap's ids that the state database
    /// does not give it (orphans), in milliseconds (default 30,000; at least 100).
    #[serde(default = "default_reconcile")]
    pub reconcile_interval_ms: u64,
    /// A TCP address that serves `GET /metrics` (and nothing else of the API); off when unset.
    /// Only loopback addresses unless [`Config::metrics_listen_any`] is set.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow a `metrics_listen` address that is not loopback (the metrics have no
    /// authentication).
    #[serde(default)]
    pub metrics_listen_any: bool,
    /// The Kubernetes device plugin (`[kubernetes]`); off when absent.
    #[serde(default)]
    pub kubernetes: Option<crate::k8s::KubernetesConfig>,
}

fn default_sysfs_root() -> PathBuf {
    PathBuf::from("/sys")
}
fn default_template() -> String {
    "vfio-pci,host={bdf}".into()
}
fn default_agent_timeout() -> u64 {
    30_000
}
fn default_qmp_timeout() -> u64 {
    10_000
}
fn default_settle() -> u64 {
    5_000
}
fn default_reconcile() -> u64 {
    30_000
}

/// The least time between two re-sends of one VM's correspondence.
const RESYNC_SPACING: Duration = Duration::from_millis(500);

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The config file cannot be read or parsed.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A profile file cannot be read or parsed.
    #[error(transparent)]
    Profile(#[from] ProfileLoadError),
    /// Preparing the host failed.
    #[error("preparing the host failed")]
    Prepare(#[from] vfmap_sysfs::PrepareError),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Start-up recovery failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The state directory or socket path is unsafe, taken or locked.
    #[error(transparent)]
    Paths(#[from] PathError),
    /// The metrics listener cannot listen on its address.
    #[error("cannot listen on metrics_listen = \"{address}\"")]
    MetricsListen {
        /// The configured address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket or state directory cannot be set up.
    #[error("cannot set up {}", path.display())]
    Setup {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A profile file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileLoadError {
    /// Unreadable.
    #[error("cannot read profile file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Invalid.
    #[error(transparent)]
    Invalid(#[from] vfmap_core::ProfileError),
}

/// Reads and validates profile files, checked against each other.
pub fn load_profiles(paths: &[PathBuf]) -> Result<Profiles, ProfileLoadError> {
    let mut profiles = Profiles::default();
    for path in paths {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileLoadError::Read {
            path: name.clone(),
            source,
        })?;
        for card in Profiles::parse(&text, &name)?.cards {
            profiles.add_card(card, &name)?;
        }
    }
    Ok(profiles)
}

/// Reads a config file.
pub fn load_config(path: &Path) -> Result<Config, ServeError> {
    let bad = |message: String| ServeError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    parse_config(&text).map_err(bad)
}

/// Parses and checks a config file's text (the fuzz target `daemon_config` runs this).
pub fn parse_config(text: &str) -> Result<Config, String> {
    let config: Config = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    DeviceTemplate::parse(&config.device_template)?;
    if config.profiles.is_empty() {
        return Err("`profiles` is empty: give at least one profile file".into());
    }
    match config.metrics_listen {
        Some(address) if !address.ip().is_loopback() && !config.metrics_listen_any => {
            return Err(format!(
                "`metrics_listen = \"{address}\"` is not a loopback address, and the metrics have \
                 no authentication: anyone who reaches it could read VM names and failures. Use \
                 127.0.0.1 or [::1] (with a proxy in front if needed), or set \
                 `metrics_listen_any = true` to serve them there anyway"
            ));
        }
        None if config.metrics_listen_any => {
            return Err("`metrics_listen_any` is set without `metrics_listen`".into());
        }
        _ => {}
    }
    if let Some(kubernetes) = &config.kubernetes {
        kubernetes.check()?;
    }
    Ok(config)
}

fn setup(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::Setup {
        path: path.to_owned(),
        source,
    }
}

/// Starts the daemon and serves until SIGINT/SIGTERM.
///
/// The API socket is bound right after the lock, the config and the profiles: it answers
/// within milliseconds, whatever the size of the host. Discovery, host preparation, the state
/// database and recovery run behind it (`start`); until they are done, health says the
/// phase and requests that need the pool wait for it (bounded) or get 503 `starting`
/// ([`crate::readiness`]). A start-up that fails stops the daemon with its error, as before.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    // One daemon per state directory, checked before anything is read or changed: a second
    // daemon would otherwise prepare and recover under the first one's feet.
    let _lock = lock_state_dir(&config.state_dir)?;
    let metrics = Arc::new(Metrics::new());
    // Bound before anything changes on the host, so a taken port stops the start cleanly.
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some((
            address,
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| ServeError::MetricsListen { address, source })?,
        )),
        None => None,
    };
    let profiles = load_profiles(&config.profiles)?;
    let template =
        DeviceTemplate::parse(&config.device_template).map_err(|message| ServeError::Config {
            path: "device_template".into(),
            message,
        })?;

    let (startup, readiness) = Startup::begin();
    let (listener, socket) = bind_socket(&config.socket)?;
    listener
        .set_nonblocking(true)
        .map_err(setup(&config.socket))?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(setup(&config.socket))?;
    info!(socket = %socket.path().display(), "API listening (starting: requests that need the pool wait for it)");
    if let Some((configured, listener)) = metrics_listener {
        // The port the system chose, when the address asked for port 0.
        let address = listener
            .local_addr()
            .map_err(|source| ServeError::MetricsListen {
                address: configured,
                source,
            })?;
        info!(address = %address, "metrics listening (GET /metrics only)");
        let app = crate::api::metrics_router(readiness.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
    }
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stop = Arc::new(stop);
    let signalled = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signalled.send_replace(true);
    });
    let server = tokio::spawn(
        axum::serve(listener, crate::api::router_with(readiness))
            .with_graceful_shutdown(stopped(stopping.clone()))
            .into_future(),
    );

    let started = tokio::select! {
        started = start(&config, profiles, template, metrics, &startup) => Some(started),
        () = stopped(stopping) => None,
    };
    let result = match started {
        Some(Ok((engine, resyncs))) => {
            upkeep(&engine, resyncs, &config);
            startup.ready(engine);
            Ok(())
        }
        Some(Err(error)) => {
            tracing::error!(error = %chain(&error), "start-up failed; stopping");
            startup.fail(&chain(&error));
            stop.send_replace(true);
            Err(error)
        }
        // A signal during the start-up: what was in flight is left as a crash would leave
        // it, for the next start's recovery.
        None => {
            startup.fail("the daemon is stopping");
            Ok(())
        }
    };
    let served = server
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    drop(socket);
    result?;
    served.map_err(setup(&config.socket))?;
    info!("stopped");
    Ok(())
}

/// Resolves once `stopping` turns true (or its sender is gone).
async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// Runs blocking work (sysfs, SQLite) in place: the API keeps answering on the runtime's other
/// threads. In place rather than on a blocking-pool thread, so the scan allocates from the
/// same malloc arena as the rest of the start-up (a thread of its own kept ~1 MiB more at
/// 65,536 VFs).
async fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// The start-up behind the socket: inventory and prepare, state, engine, recovery. The engine
/// is returned only once recovery is done: no VF is handed out before its state is known.
async fn start(
    config: &Config,
    profiles: Profiles,
    template: DeviceTemplate,
    metrics: Arc<Metrics>,
    startup: &Startup,
) -> Result<(Arc<Engine>, Resyncs), ServeError> {
    // Discovery is most of the start on a big host: spread it over up to 4 cores. Their
    // allocator arenas keep ~9 MiB after the scan (65,536 VFs: peak 55 MiB, steady 41 MiB,
    // against 46 and 32 single-threaded, and half the time to serving on 2 cores).
    let sysfs = Sysfs::new(&config.sysfs_root).with_threads(4);
    let settle = Duration::from_millis(config.settle_ms);
    let scanned = sysfs.clone();
    // The hooks of the cards found, by VF, once the tables are known.
    let profiles_for_hooks = profiles.clone();
    let prepare_metrics = metrics.clone();
    let report = blocking(move || {
        // The bring_up hooks prepare runs, VF by VF before the binds: logged and timed.
        let hooks =
            |inv: &vfmap_sysfs::Invocation<'_>| crate::hooks::run_logged(&prepare_metrics, inv);
        vfmap_sysfs::prepare_with_hooks(
            &scanned,
            &profiles,
            &FileWriter,
            &Modprobe,
            &hooks,
            settle,
            &mut |step| {
                info!(step = %step, "prepare");
            },
        )
    })
    .await?;
    let tables = report.tables;
    info!(
        vfs = tables.vfs.len(),
        functions = tables.functions.len(),
        changes = report.steps.len(),
        "host prepared"
    );
    // The cards' discover hooks, checked against the profile: disagreements are problems.
    let mut tables = tables;
    let runs = blocking(|| {
        let run = |inv: &vfmap_sysfs::Invocation<'_>| crate::hooks::run_logged(&metrics, inv);
        vfmap_sysfs::discover_runs(&config.sysfs_root, &profiles_for_hooks, &tables, &run)
    })
    .await;
    for run in &runs {
        tables.problems.extend(run.problems());
    }
    for problem in &tables.problems {
        tracing::warn!(device = %problem.device, attribute = %problem.attribute, "{}", problem.message);
    }

    startup.phase(StartupPhase::LoadingState);
    let locations: Vec<Bdf> = tables.vfs.iter().map(|v| v.location).collect();
    let (path, store_metrics) = (config.state_dir.join("state.db"), metrics.clone());
    let (store, loaded) =
        blocking(move || Store::open_with_metrics(&path, &locations, store_metrics)).await?;

    let card_hooks = Arc::new(crate::hooks::CardHooks::new(
        &profiles_for_hooks,
        &tables,
        config.sysfs_root.clone(),
        metrics.clone(),
    ));
    let resyncs = Resyncs::default();
    let adapters = Adapters {
        // Each VM's backend is chosen per VM; both adapters share the operation timeout.
        hypervisor: Arc::new(Backends {
            qmp: Arc::new(Qmp::new(
                template,
                Duration::from_millis(config.qmp_timeout_ms),
            )),
            libvirt: Arc::new(Virsh::new(
                "virsh",
                Duration::from_millis(config.qmp_timeout_ms),
            )),
        }),
        channel: Arc::new(AgentChannel::new(resyncs.clone(), metrics.clone())),
        host: Arc::new(SysfsHost {
            sysfs,
            settle,
            hooks: card_hooks,
        }),
        agent_deadline: Duration::from_millis(config.agent_timeout_ms),
    };
    let engine = Arc::new(Engine::with_metrics(tables, store, loaded, adapters, metrics).await?);
    startup.phase(StartupPhase::Recovering);
    engine.recover().await?;
    Ok((engine, resyncs))
}

/// The background work of a running daemon: correspondence re-sends and cleanups.
fn upkeep(engine: &Arc<Engine>, resyncs: Resyncs, config: &Config) {
    // An agent that (re)connects gets its VM's whole correspondence again: one re-send per
    // VM at a time, at most one waiting, and none sooner than RESYNC_SPACING after the last.
    let resyncer = engine.clone();
    tokio::spawn(async move {
        loop {
            let vm = resyncs.next().await;
            let (engine, resyncs) = (resyncer.clone(), resyncs.clone());
            tokio::spawn(async move {
                engine.resync(&vm).await;
                tokio::time::sleep(RESYNC_SPACING).await;
                resyncs.done(&vm);
            });
        }
    });

    // Background upkeep: due cleanup retries every second, the orphan check every interval.
    let janitor = engine.clone();
    let reconcile = Duration::from_millis(config.reconcile_interval_ms.max(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1).min(reconcile));
        let mut last_check = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            janitor.retry_cleanups().await;
            if last_check.elapsed() >= reconcile {
                last_check = tokio::time::Instant::now();
                janitor.reconcile_orphans().await;
            }
        }
    });

    if let Some(kubernetes) = &config.kubernetes {
        crate::k8s::start(engine, kubernetes);
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<Config, String> {
        parse_config(&format!(
            "profiles = [\"/p.toml\"]\nstate_dir = \"/s\"\nsocket = \"/a.sock\"\n{extra}"
        ))
    }

    #[test]
    fn the_metrics_listener_is_off_by_default_and_loopback_only_unless_told() {
        assert_eq!(config("").unwrap().metrics_listen, None);
        for loopback in ["127.0.0.1:9464", "127.0.0.2:0", "[::1]:9464"] {
            let parsed = config(&format!("metrics_listen = \"{loopback}\"")).unwrap();
            assert_eq!(parsed.metrics_listen, Some(loopback.parse().unwrap()));
        }
        for other in [
            "0.0.0.0:9464",
            "[::]:9464",
            "192.0.2.1:9464",
            "[::ffff:127.0.0.1]:1",
        ] {
            let error = config(&format!("metrics_listen = \"{other}\"")).unwrap_err();
            assert!(
                error.contains(&format!(
                    "`metrics_listen = \"{other}\"` is not a loopback address"
                )) && error.contains("`metrics_listen_any = true`"),
                "{error}"
            );
            let allowed = config(&format!(
                "metrics_listen = \"{other}\"\nmetrics_listen_any = true"
            ))
            .unwrap();
            assert_eq!(allowed.metrics_listen, Some(other.parse().unwrap()));
        }
        assert!(config("metrics_listen_any = true").is_err());
        // An address, not a name: nothing is resolved.
        assert!(config("metrics_listen = \"localhost:9464\"").is_err());
        assert!(config("metrics_listen = \"127.0.0.1\"").is_err());
    }
}
