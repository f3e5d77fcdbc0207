//! The vfmap guest agent's logic: resolve each correspondence entry to its device, bind the
//! function's driver, answer, release what left the correspondence, and publish the result.
//!
//! Every path is under a configurable sysfs root and run directory, so all of this runs in
//! tests on generated guest trees; `main.rs` only adds the virtio-serial port loop.
//!
//! The correspondence comes from the host (over the port, [`Agent::apply`]) or from the
//! orchestrator's config-drive metadata ([`Agent::apply_metadata`], see [`metadata`] and
//! [`configdrive`]), or from both: each device is bound through the same path, and a device
//! that both sources claim is refused to the second claimant, never taken over.
//!
//! Waiting (for a hot-plugged device to appear, for an asynchronous probe to bind) is driven by
//! [`DeviceEvents`]: the kernel's uevents in the guest ([`UeventSocket`]), a poll where those
//! cannot be had ([`Polling`]), events fed by a test double in tests.

mod bind;
pub mod configdrive;
pub mod events;
pub mod metadata;
mod metadata_mode;
mod publish;
pub mod uevent;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vfmap_core::protocol::{Answer, Entry, GuestPath};
use vfmap_core::{Bdf, DriverName, LocalIndex, PciId};
use vfmap_sysfs::{ModuleLoader, Sysfs, SysfsWriter};

pub use events::{DeviceEvents, Polling, UeventSocket, Wake};
pub use metadata_mode::{FunctionConfig, MetadataConfig, MetadataSource, check_metadata};
pub use uevent::Uevent;

/// The agent's configuration (`/etc/vfmap/agent.toml`, every field optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The virtio-serial port's name (`name=` of the `virtserialport`, or the virtio target
    /// name of a libvirt channel). Unset: `org.vfmap.0`, or else the older `vfmap`.
    pub port_name: Option<String>,
    /// Root of the guest's sysfs.
    pub sysfs_root: PathBuf,
    /// Where device nodes are (`/dev/vportNpM`).
    pub dev_root: PathBuf,
    /// Where `devices.json` and `by-function/` are published.
    pub run_dir: PathBuf,
    /// When set, only these drivers may be bound.
    pub allowed_drivers: Option<Vec<String>>,
    /// How long to wait for a hot-plugged device to appear, in milliseconds.
    pub hotplug_timeout_ms: u64,
    /// How long a driver may take to bind (some probe asynchronously), in milliseconds.
    pub bind_timeout_ms: u64,
    /// `[metadata]`: also take the correspondence from the orchestrator's `meta_data.json`.
    pub metadata: Option<MetadataConfig>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            port_name: None,
            sysfs_root: "/sys".into(),
            dev_root: "/dev".into(),
            run_dir: "/run/vfmap".into(),
            allowed_drivers: None,
            hotplug_timeout_ms: 10_000,
            bind_timeout_ms: 5_000,
            metadata: None,
        }
    }
}

/// Why the agent could not do something for an entry (sent back as the `reason`).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The root port of the path is not on the root bus.
    #[error("no root port at 0000:00:{0} in the guest")]
    NoRootPort(String),
    /// Nothing appeared behind the root port in time.
    #[error("no device at {path} after {waited:?} (hot-plug not seen)")]
    NoDevice {
        /// The path.
        path: GuestPath,
        /// How long the agent waited.
        waited: Duration,
    },
    /// The device reports other IDs than the entry says.
    #[error("device {bdf} reports {found}, the correspondence says {expected}")]
    WrongDevice {
        /// The device.
        bdf: Bdf,
        /// What it reports.
        found: String,
        /// What was expected.
        expected: String,
    },
    /// The driver is not on the allowlist.
    #[error("driver {0} is not in this guest's allowed_drivers")]
    NotAllowed(String),
    /// The driver is not registered and loading its module did not register it.
    #[error("driver {driver} is not available: {reason}")]
    DriverUnavailable {
        /// The driver.
        driver: DriverName,
        /// Why.
        reason: String,
    },
    /// After probing, the device is not bound to the driver wanted.
    #[error(
        "after probing, {bdf} is bound to {}, not {driver} (waited {waited:?}); see `dmesg` for the driver's reason",
        found.as_deref().unwrap_or("no driver")
    )]
    BindNotEffective {
        /// The device.
        bdf: Bdf,
        /// The driver wanted.
        driver: DriverName,
        /// The driver found.
        found: Option<String>,
        /// How long the agent waited for the binding.
        waited: Duration,
    },
    /// Binding failed.
    #[error("{0}")]
    Bind(String),
    /// No device at the address the metadata gives.
    #[error(
        "no device at {bdf} after {waited:?} (the metadata's address is the hypervisor's view; see docs/metadata.md)"
    )]
    NoDeviceAt {
        /// The address.
        bdf: Bdf,
        /// How long the agent waited.
        waited: Duration,
    },
    /// The metadata names a function the config does not describe.
    #[error("function {0} is not in this guest's [metadata.functions]")]
    UnknownFunction(String),
    /// The other source already has the device.
    #[error(
        "device {bdf} is claimed by both the host's correspondence and the config-drive metadata; {holder} has it, so this claim is refused (not overridden)"
    )]
    ClaimedTwice {
        /// The device.
        bdf: Bdf,
        /// Who has it.
        holder: String,
    },
    /// The metadata's address is a bridge (a root port, a switch port, the host bridge).
    #[error(
        "device {bdf} is a PCI bridge (class {class:#08x}), never a VF: the metadata's address is wrong (see docs/metadata.md)"
    )]
    Bridge {
        /// The address.
        bdf: Bdf,
        /// Its class code.
        class: u32,
    },
}

/// Where an entry of the correspondence came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The host daemon, over the virtio-serial port.
    #[default]
    Host,
    /// The orchestrator's config-drive metadata.
    Metadata,
}

/// One device the agent handles, as published in `devices.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Where the entry came from (`host` when absent, as written before there was a choice).
    #[serde(default)]
    pub source: Source,
    /// Local index (entries from the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_index: Option<LocalIndex>,
    /// Function.
    pub function: String,
    /// Guest path (entries from the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Guest BDF, when found.
    pub guest_bdf: Option<String>,
    /// The driver bound, when bound.
    pub driver: Option<String>,
    /// `bound` or `failed`.
    pub state: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `by-function/`'s links: (function, name) → target.
type Links = BTreeMap<(String, String), PathBuf>;

/// The agent's state across `apply`s (and across restarts, through `devices.json`).
pub struct Agent<'a> {
    config: Config,
    sysfs: Sysfs,
    writer: &'a dyn SysfsWriter,
    loader: &'a dyn ModuleLoader,
    events: Box<dyn DeviceEvents + 'a>,
    /// The host's entries.
    current: BTreeMap<LocalIndex, Published>,
    /// The metadata's entries.
    from_metadata: BTreeMap<Bdf, Published>,
    timings: Vec<Timing>,
    apply_timing: Option<ApplyTiming>,
    /// What this process last published: `devices.json`'s bytes and the `by-function/`
    /// links, (function, name) → target. `None` until the first publish, which writes
    /// everything whole; later ones change only what differs (see [`Agent::publish`]).
    published: Option<(Vec<u8>, Links)>,
}

/// How long the last `apply` took as a whole, for logs and benchmarks: what the host waits
/// for in the guest before the answer is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyTiming {
    /// Entries in the correspondence.
    pub entries: usize,
    /// From receiving the correspondence until every entry was bound (or failed) and its
    /// override pinned.
    pub bound: Duration,
    /// From receiving the correspondence until the result was published (`devices.json`,
    /// `by-function/`), i.e. ready to answer.
    pub applied: Duration,
}

/// How long one entry of the last `apply` took, for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The entry.
    pub local_index: LocalIndex,
    /// From receiving the correspondence until the device was found (hot-plug seen).
    pub device: Duration,
    /// From finding the device until its driver was bound and verified.
    pub bind: Duration,
}

/// `timeout` from now; a timeout too large for the clock waits "forever" (a year).
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// Checks until `check` gives a value: once at once, then after every wake-up that may matter
/// (an event `relevant` accepts, or a [`Wake::Recheck`]), until `deadline`. `None` when the
/// deadline passed first. The caller must be subscribed before calling, so an event that
/// comes between a check and the wait is not missed.
fn wait_until<T>(
    events: &mut dyn DeviceEvents,
    deadline: Instant,
    relevant: impl Fn(&Uevent) -> bool,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        loop {
            match events.wait(deadline) {
                Wake::TimedOut => return None,
                Wake::Event(event) if !relevant(&event) => {}
                Wake::Event(_) | Wake::Recheck => break,
            }
        }
    }
}

fn read_id(dir: &Path, attribute: &str) -> Option<PciId> {
    fs::read_to_string(dir.join(attribute))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl<'a> Agent<'a> {
    /// An agent that waits on `events`; picks up what a previous run published, so it can
    /// release entries that disappear after its own restart.
    pub fn new(
        config: Config,
        writer: &'a dyn SysfsWriter,
        loader: &'a dyn ModuleLoader,
        events: Box<dyn DeviceEvents + 'a>,
    ) -> Agent<'a> {
        let sysfs = Sysfs::new(&config.sysfs_root);
        let (mut current, mut from_metadata) = (BTreeMap::new(), BTreeMap::new());
        let previous = fs::read(config.run_dir.join("devices.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<Published>>(&bytes).ok())
            .unwrap_or_default();
        for p in previous {
            match (p.source, p.local_index, published_bdf(&p)) {
                (Source::Host, Some(local_index), _) => {
                    current.insert(local_index, p);
                }
                (Source::Metadata, _, Some(bdf)) => {
                    from_metadata.insert(bdf, p);
                }
                _ => {}
            }
        }
        Agent {
            config,
            sysfs,
            writer,
            loader,
            events,
            current,
            from_metadata,
            timings: Vec::new(),
            apply_timing: None,
            published: None,
        }
    }

    /// Timings of the entries bound by the last `apply`.
    pub fn timings(&self) -> &[Timing] {
        &self.timings
    }

    /// How long the last `apply` took as a whole.
    pub fn apply_timing(&self) -> Option<ApplyTiming> {
        self.apply_timing
    }

    /// What is published now: the host's entries, then the metadata's.
    pub fn published(&self) -> Vec<Published> {
        self.current
            .values()
            .chain(self.from_metadata.values())
            .cloned()
            .collect()
    }

    /// The device at `path`, waiting up to `timeout` for it to be hot-plugged: checked at
    /// once, then again on each PCI uevent.
    pub fn resolve(&mut self, path: GuestPath, timeout: Duration) -> Result<Bdf, AgentError> {
        let started = Instant::now();
        let port = Bdf::new(0, 0, path.port_device, path.port_function)
            .ok_or_else(|| AgentError::NoRootPort(path.to_string()))?;
        // Root ports are not hot-plugged: one that is not there now will not come.
        let port_dir = fs::canonicalize(self.sysfs.device_dir(port)).map_err(|_| {
            AgentError::NoRootPort(format!("{:02x}.{:x}", path.port_device, path.port_function))
        })?;
        let sysfs = &self.sysfs;
        let find = || {
            // Devices behind the port are children of its directory, whatever bus number the
            // guest gave the port's secondary bus.
            let bdf = fs::read_dir(&port_dir).ok()?.flatten().find_map(|e| {
                let bdf: Bdf = e.file_name().to_str()?.parse().ok()?;
                (bdf != port && bdf.device == path.device && bdf.function == path.function)
                    .then_some(bdf)
            })?;
            // The kernel sends `add` once the attributes exist; without events (or before the
            // event is read) the directory can be seen first: wait until the device is complete.
            sysfs.device_dir(bdf).join("vendor").exists().then_some(bdf)
        };
        wait_until(
            &mut *self.events,
            deadline_after(timeout),
            Uevent::is_pci,
            find,
        )
        .ok_or_else(|| AgentError::NoDevice {
            path,
            waited: started.elapsed(),
        })
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), AgentError> {
        self.writer.write(path, value).map_err(|e| {
            AgentError::Bind(format!("cannot write {value:?} to {}: {e}", path.display()))
        })
    }

    fn check_allowed(&self, driver: &DriverName) -> Result<(), AgentError> {
        if allows(&self.config, driver) {
            Ok(())
        } else {
            Err(AgentError::NotAllowed(driver.to_string()))
        }
    }

    /// Checks the IDs the correspondence gives, binds `driver` and pins `driver_override`:
    /// the one binding path of both sources (the host's entries go through
    /// [`Agent::bind_all`] together, with the same checks before and the same pin after).
    fn bind_device(
        &mut self,
        bdf: Bdf,
        driver: &DriverName,
        vendor: Option<PciId>,
        device: Option<PciId>,
    ) -> Result<(), AgentError> {
        self.check_ids(bdf, vendor, device)?;
        self.bind(bdf, driver)?;
        self.pin_override(bdf, driver)
    }

    /// Checks the device reports the IDs the correspondence gives (when it gives them).
    fn check_ids(
        &self,
        bdf: Bdf,
        vendor: Option<PciId>,
        device: Option<PciId>,
    ) -> Result<(), AgentError> {
        let dir = self.sysfs.device_dir(bdf);
        for (attribute, expected) in [("vendor", vendor), ("device", device)] {
            if let Some(expected) = expected {
                let found = read_id(&dir, attribute);
                if found != Some(expected) {
                    return Err(AgentError::WrongDevice {
                        bdf,
                        found: found.map_or_else(|| "nothing".into(), |f| f.to_string()),
                        expected: expected.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Pins `driver_override` to the bound driver, so a re-probe keeps the function's driver.
    fn pin_override(&self, bdf: Bdf, driver: &DriverName) -> Result<(), AgentError> {
        let override_path = self.sysfs.device_dir(bdf).join("driver_override");
        let pinned = fs::read_to_string(&override_path).map(|t| t.trim() == driver.as_str());
        if !pinned.unwrap_or(false) {
            self.writer
                .write(&override_path, driver.as_str())
                .map_err(|e| AgentError::Bind(format!("cannot pin driver_override: {e}")))?;
        }
        Ok(())
    }

    /// An entry's device, checked and ready to bind: allowed driver, found (waiting for its
    /// hot-plug), not the metadata's, the IDs it should report; with when it was found.
    fn find_entry(&mut self, entry: &Entry) -> Result<(Bdf, Instant), AgentError> {
        self.check_allowed(&entry.guest_driver)?;
        let bdf = self.resolve(
            entry.path,
            Duration::from_millis(self.config.hotplug_timeout_ms),
        )?;
        if let Some(holder) = self.from_metadata.get(&bdf).filter(|p| p.state == "bound") {
            return Err(AgentError::ClaimedTwice {
                bdf,
                holder: format!("the metadata's function {}", holder.function),
            });
        }
        let found = Instant::now();
        self.check_ids(bdf, entry.vendor, entry.device)?;
        Ok((bdf, found))
    }

    /// Binds every entry: each device found first (they were all hot-plugged before the
    /// correspondence was sent, so their waits overlap), then all bound together
    /// ([`Agent::bind_all`]), then each `driver_override` pinned.
    fn bind_entries(
        &mut self,
        entries: &[Entry],
        received: Instant,
    ) -> Vec<Result<(Bdf, Timing), AgentError>> {
        let found: Vec<Result<(Bdf, Instant), AgentError>> =
            entries.iter().map(|e| self.find_entry(e)).collect();
        let jobs: Vec<(Bdf, DriverName)> = entries
            .iter()
            .zip(&found)
            .filter_map(|(e, f)| Some((f.as_ref().ok()?.0, e.guest_driver.clone())))
            .collect();
        let mut bound = self.bind_all(&jobs).into_iter();
        entries
            .iter()
            .zip(found)
            .map(|(entry, found)| {
                let (bdf, found) = found?;
                let done = bound.next().expect("one result per device found")?;
                self.pin_override(bdf, &entry.guest_driver)?;
                let timing = Timing {
                    local_index: entry.local_index,
                    device: found - received,
                    bind: done.saturating_duration_since(found),
                };
                Ok((bdf, timing))
            })
            .collect()
    }

    /// Unbinds a device that left the correspondence and clears its override. A device that is
    /// already gone (unplugged) needs nothing.
    fn release(&self, published: &Published) -> io::Result<()> {
        let Some(bdf) = published_bdf(published).filter(|_| published.state == "bound") else {
            return Ok(());
        };
        let dir = self.sysfs.device_dir(bdf);
        if !dir.exists() {
            return Ok(());
        }
        if let Some(driver) = self.sysfs.driver_of(bdf)? {
            self.writer.write(
                &self.sysfs.driver_dir(&driver).join("unbind"),
                &bdf.to_string(),
            )?;
        }
        // An empty write clears driver_override.
        self.writer.write(&dir.join("driver_override"), "\n")
    }

    /// Makes the guest match `entries` (the whole correspondence), answers per entry, and
    /// publishes the result.
    pub fn apply(&mut self, entries: &[Entry]) -> Vec<Answer> {
        let received = Instant::now();
        self.timings.clear();
        // Subscribed since start-up: what was queued while idle is stale, as every wait starts
        // by checking sysfs.
        self.events.discard_pending();
        for (local_index, old) in std::mem::take(&mut self.current) {
            if entries.iter().any(|e| e.local_index == local_index) {
                self.current.insert(local_index, old);
            } else if let Err(e) = self.release(&old) {
                eprintln!("vfmap-agent: releasing local index {local_index}: {e}");
            }
        }
        let mut answers = Vec::with_capacity(entries.len());
        let results = self.bind_entries(entries, received);
        let bound = received.elapsed();
        for (entry, result) in entries.iter().zip(results) {
            let (answer, published) = match result {
                Ok((bdf, timing)) => {
                    self.timings.push(timing);
                    (
                        Answer::Bound {
                            local_index: entry.local_index,
                            driver: entry.guest_driver.clone(),
                            guest_bdf: bdf,
                        },
                        Published {
                            source: Source::Host,
                            local_index: Some(entry.local_index),
                            function: entry.function.to_string(),
                            path: Some(entry.path.to_string()),
                            guest_bdf: Some(bdf.to_string()),
                            driver: Some(entry.guest_driver.to_string()),
                            state: "bound".into(),
                            reason: None,
                        },
                    )
                }
                Err(e) => {
                    let reason = vfmap_core::protocol::fit_text(&e.to_string());
                    (
                        Answer::Failed {
                            local_index: entry.local_index,
                            reason: reason.clone(),
                        },
                        Published {
                            source: Source::Host,
                            local_index: Some(entry.local_index),
                            function: entry.function.to_string(),
                            path: Some(entry.path.to_string()),
                            guest_bdf: None,
                            driver: None,
                            state: "failed".into(),
                            reason: Some(reason),
                        },
                    )
                }
            };
            answers.push(answer);
            self.current.insert(entry.local_index, published);
        }
        if let Err(e) = self.publish() {
            eprintln!(
                "vfmap-agent: publishing to {}: {e}",
                self.config.run_dir.display()
            );
        }
        self.apply_timing = Some(ApplyTiming {
            entries: entries.len(),
            bound,
            applied: received.elapsed(),
        });
        answers
    }
}

/// Whether `allowed_drivers` (when set) lists `driver`.
fn allows(config: &Config, driver: &DriverName) -> bool {
    config
        .allowed_drivers
        .as_ref()
        .is_none_or(|allowed| allowed.iter().any(|d| d == driver.as_str()))
}

/// The guest address a published entry names, if any.
fn published_bdf(published: &Published) -> Option<Bdf> {
    published.guest_bdf.as_deref()?.parse().ok()
}

impl Config {
    /// The port names the agent serves, in order of preference: the configured one, or the
    /// default and then the legacy name.
    pub fn port_names(&self) -> Vec<&str> {
        match &self.port_name {
            Some(name) => vec![name.as_str()],
            None => vec![vfmap_core::DEFAULT_PORT_NAME, vfmap_core::LEGACY_PORT_NAME],
        }
    }
}

/// The device node of the virtio-serial port with the first of `names` that exists: the
/// `vportNpM` directory under `<sysfs>/class/virtio-ports` whose `name` matches, under
/// `dev_root`.
pub fn find_port(sysfs_root: &Path, dev_root: &Path, names: &[&str]) -> Option<PathBuf> {
    let ports: Vec<(String, PathBuf)> = fs::read_dir(sysfs_root.join("class/virtio-ports"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let port_name = fs::read_to_string(e.path().join("name")).ok()?;
            Some((port_name.trim().to_owned(), dev_root.join(e.file_name())))
        })
        .collect();
    names.iter().find_map(|name| {
        ports
            .iter()
            .find(|(port_name, _)| port_name == name)
            .map(|(_, node)| node.clone())
    })
}

/// Reads the agent's config file; a missing file means defaults.
pub fn load_config(path: &Path) -> Result<Config, String> {
    match fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Checks an allowlist entry is a plain module name.
pub fn check_allowlist(config: &Config) -> Result<(), String> {
    for d in config.allowed_drivers.iter().flatten() {
        DriverName::new(d)?;
    }
    Ok(())
}
