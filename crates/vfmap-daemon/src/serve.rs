//! `vfmap serve`: configuration, start-up (inventory, prepare, state, recovery) and the API
//! socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::info;
use vfmap_core::{Bdf, Profiles};
use vfmap_sysfs::{FileWriter, Modprobe, Sysfs};

use crate::channel::AgentChannel;
use crate::effects::SysfsHost;
use crate::engine::{Adapters, Engine, EngineError};
use crate::paths::{PathError, bind_socket, lock_state_dir};
use crate::qmp::{DeviceTemplate, Qmp};
use crate::resync::Resyncs;
use crate::store::{Store, StoreError};

/// The daemon's configuration file (TOML); every field is documented in README.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Root of the sysfs tree.
    #[serde(default = "default_sysfs_root")]
    pub sysfs_root: PathBuf,
    /// Device profile files.
    pub profiles: Vec<PathBuf>,
    /// Directory for the state database.
    pub state_dir: PathBuf,
    /// The API's unix socket (created mode 0600).
    pub socket: PathBuf,
    /// QEMU `device_add` template for a VF; `{bdf}` is its host address.
    #[serde(default = "default_template")]
    pub device_template: String,
    /// How long the guest agent may take to answer, in milliseconds.
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout_ms: u64,
    /// How long one QMP operation may take, in milliseconds.
    #[serde(default = "default_qmp_timeout")]
    pub qmp_timeout_ms: u64,
    /// How long a host driver bind may take to show, in milliseconds.
    #[serde(default = "default_settle")]
    pub settle_ms: u64,
    /// How often every VM is checked for devices with vfmap's ids that the state database
    /// does not give it (orphans), in milliseconds.
    #[serde(default = "default_reconcile")]
    pub reconcile_interval_ms: u64,
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
    Ok(config)
}

fn setup(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::Setup {
        path: path.to_owned(),
        source,
    }
}

/// Starts the daemon and serves until SIGINT/SIGTERM.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    // One daemon per state directory, checked before anything is read or changed: a second
    // daemon would otherwise prepare and recover under the first one's feet.
    let _lock = lock_state_dir(&config.state_dir)?;
    let profiles = load_profiles(&config.profiles)?;
    let sysfs = Sysfs::new(&config.sysfs_root).with_threads(1);
    let settle = Duration::from_millis(config.settle_ms);
    let report = vfmap_sysfs::prepare(
        &sysfs,
        &profiles,
        &FileWriter,
        &Modprobe,
        settle,
        &mut |step| {
            info!(step = %step, "prepare");
        },
    )?;
    let tables = report.tables;
    info!(
        vfs = tables.vfs.len(),
        functions = tables.functions.len(),
        changes = report.steps.len(),
        "host prepared"
    );
    for problem in &tables.problems {
        tracing::warn!(device = %problem.device, attribute = %problem.attribute, "{}", problem.message);
    }

    let locations: Vec<Bdf> = tables.vfs.iter().map(|v| v.location).collect();
    let (store, loaded) = Store::open(&config.state_dir.join("state.db"), &locations)?;

    let template =
        DeviceTemplate::parse(&config.device_template).map_err(|message| ServeError::Config {
            path: "device_template".into(),
            message,
        })?;
    let resyncs = Resyncs::default();
    let adapters = Adapters {
        hypervisor: Arc::new(Qmp::new(
            template,
            Duration::from_millis(config.qmp_timeout_ms),
        )),
        channel: Arc::new(AgentChannel::new(resyncs.clone())),
        host: Arc::new(SysfsHost { sysfs, settle }),
        agent_deadline: Duration::from_millis(config.agent_timeout_ms),
    };
    let engine = Arc::new(Engine::new(tables, store, loaded, adapters).await?);
    engine.recover().await?;
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

    let (listener, socket) = bind_socket(&config.socket)?;
    listener
        .set_nonblocking(true)
        .map_err(setup(&config.socket))?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(setup(&config.socket))?;
    info!(socket = %socket.path().display(), "API listening");
    let app = crate::api::router(engine);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(setup(&config.socket))?;
    drop(socket);
    info!("stopped");
    Ok(())
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
