//! The vfmap guest agent's logic: resolve each correspondence entry to its device, bind the
//! function's driver, answer, release what left the correspondence, and publish the result.
//!
//! Every path is under a configurable sysfs root and run directory, so all of this runs in
//! tests on generated guest trees; `main.rs` only adds the virtio-serial port loop.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vfmap_core::protocol::{Answer, Entry, GuestPath};
use vfmap_core::{Bdf, DriverName, LocalIndex, PciId};
use vfmap_sysfs::{ModuleLoader, Sysfs, SysfsWriter};

/// The agent's configuration (`/etc/vfmap/agent.toml`, every field optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The virtio-serial port's name (`name=` of the `virtserialport`).
    pub port_name: String,
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
}

impl Default for Config {
    fn default() -> Config {
        Config {
            port_name: "vfmap".into(),
            sysfs_root: "/sys".into(),
            dev_root: "/dev".into(),
            run_dir: "/run/vfmap".into(),
            allowed_drivers: None,
            hotplug_timeout_ms: 10_000,
            bind_timeout_ms: 5_000,
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
    /// Binding failed.
    #[error("{0}")]
    Bind(String),
}

/// One device the agent handles, as published in `devices.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Local index.
    pub local_index: LocalIndex,
    /// Function.
    pub function: String,
    /// Guest path.
    pub path: String,
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

/// The agent's state across `apply`s (and across restarts, through `devices.json`).
pub struct Agent<'a> {
    config: Config,
    sysfs: Sysfs,
    writer: &'a dyn SysfsWriter,
    loader: &'a dyn ModuleLoader,
    current: BTreeMap<LocalIndex, Published>,
    timings: Vec<Timing>,
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

fn read_id(dir: &Path, attribute: &str) -> Option<PciId> {
    fs::read_to_string(dir.join(attribute))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl<'a> Agent<'a> {
    /// An agent; picks up what a previous run published, so it can release entries that
    /// disappear after its own restart.
    pub fn new(
        config: Config,
        writer: &'a dyn SysfsWriter,
        loader: &'a dyn ModuleLoader,
    ) -> Agent<'a> {
        let sysfs = Sysfs::new(&config.sysfs_root);
        let current = fs::read(config.run_dir.join("devices.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<Published>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.local_index, p))
            .collect();
        Agent {
            config,
            sysfs,
            writer,
            loader,
            current,
            timings: Vec::new(),
        }
    }

    /// Timings of the entries bound by the last `apply`.
    pub fn timings(&self) -> &[Timing] {
        &self.timings
    }

    /// What is published now.
    pub fn published(&self) -> Vec<Published> {
        self.current.values().cloned().collect()
    }

    /// The device at `path`, waiting for hot-plug until `deadline`.
    pub fn resolve(&self, path: GuestPath, timeout: Duration) -> Result<Bdf, AgentError> {
        let port = Bdf::new(0, 0, path.port_device, path.port_function)
            .ok_or_else(|| AgentError::NoRootPort(path.to_string()))?;
        let started = Instant::now();
        loop {
            let port_dir = fs::canonicalize(self.sysfs.device_dir(port)).map_err(|_| {
                AgentError::NoRootPort(format!("{:02x}.{:x}", path.port_device, path.port_function))
            })?;
            // Devices behind the port are children of its directory, whatever bus number the
            // guest gave the port's secondary bus.
            let found = fs::read_dir(&port_dir).ok().and_then(|entries| {
                entries.flatten().find_map(|e| {
                    let bdf: Bdf = e.file_name().to_str()?.parse().ok()?;
                    (bdf != port && bdf.device == path.device && bdf.function == path.function)
                        .then_some(bdf)
                })
            });
            // The directory shows up before its attributes: wait until the device is complete.
            if let Some(bdf) = found.filter(|b| self.sysfs.device_dir(*b).join("vendor").exists()) {
                return Ok(bdf);
            }
            if started.elapsed() >= timeout {
                return Err(AgentError::NoDevice {
                    path,
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn bind_entry(&self, entry: &Entry, received: Instant) -> Result<(Bdf, Timing), AgentError> {
        if let Some(allowed) = &self.config.allowed_drivers
            && !allowed.iter().any(|d| d == entry.guest_driver.as_str())
        {
            return Err(AgentError::NotAllowed(entry.guest_driver.to_string()));
        }
        let bdf = self.resolve(
            entry.path,
            Duration::from_millis(self.config.hotplug_timeout_ms),
        )?;
        let found = Instant::now();
        let dir = self.sysfs.device_dir(bdf);
        for (attribute, expected) in [("vendor", entry.vendor), ("device", entry.device)] {
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
        let settle = Duration::from_millis(self.config.bind_timeout_ms);
        vfmap_sysfs::ensure_bound(
            &self.sysfs,
            self.writer,
            self.loader,
            bdf,
            &entry.guest_driver,
            settle,
        )
        .map_err(|e| AgentError::Bind(e.to_string()))?;
        // Pin the override too, so a re-probe keeps the function's driver.
        let override_path = dir.join("driver_override");
        let pinned =
            fs::read_to_string(&override_path).map(|t| t.trim() == entry.guest_driver.as_str());
        if !pinned.unwrap_or(false) {
            self.writer
                .write(&override_path, entry.guest_driver.as_str())
                .map_err(|e| AgentError::Bind(format!("cannot pin driver_override: {e}")))?;
        }
        let timing = Timing {
            local_index: entry.local_index,
            device: found - received,
            bind: found.elapsed(),
        };
        Ok((bdf, timing))
    }

    /// Unbinds a device that left the correspondence and clears its override. A device that is
    /// already gone (unplugged) needs nothing.
    fn release(&self, published: &Published) -> io::Result<()> {
        let Some(bdf) = published
            .guest_bdf
            .as_deref()
            .and_then(|b| b.parse::<Bdf>().ok())
        else {
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
        for (local_index, old) in std::mem::take(&mut self.current) {
            if entries.iter().any(|e| e.local_index == local_index) {
                self.current.insert(local_index, old);
            } else if let Err(e) = self.release(&old) {
                eprintln!("vfmap-agent: releasing local index {local_index}: {e}");
            }
        }
        let mut answers = Vec::with_capacity(entries.len());
        for entry in entries {
            let (answer, published) = match self.bind_entry(entry, received) {
                Ok((bdf, timing)) => {
                    self.timings.push(timing);
                    (
                        Answer::Bound {
                            local_index: entry.local_index,
                            driver: entry.guest_driver.clone(),
                            guest_bdf: bdf,
                        },
                        Published {
                            local_index: entry.local_index,
                            function: entry.function.to_string(),
                            path: entry.path.to_string(),
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
                            local_index: entry.local_index,
                            function: entry.function.to_string(),
                            path: entry.path.to_string(),
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
        answers
    }

    /// Writes `devices.json` and `by-function/<function>/<local index>` → the device's sysfs
    /// directory, each replaced atomically.
    pub fn publish(&self) -> io::Result<()> {
        let run = &self.config.run_dir;
        fs::create_dir_all(run)?;
        let json = serde_json::to_vec_pretty(&self.published()).map_err(io::Error::other)?;
        fs::write(run.join("devices.json.tmp"), json)?;
        fs::rename(run.join("devices.json.tmp"), run.join("devices.json"))?;

        let staging = run.join("by-function.tmp");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging)?;
        for p in self.current.values().filter(|p| p.state == "bound") {
            let Some(bdf) = p.guest_bdf.as_deref().and_then(|b| b.parse::<Bdf>().ok()) else {
                continue;
            };
            // Function names are validated ([a-z0-9._-]), so they are safe directory names.
            let dir = staging.join(&p.function);
            fs::create_dir_all(&dir)?;
            std::os::unix::fs::symlink(
                self.sysfs.device_dir(bdf),
                dir.join(p.local_index.to_string()),
            )?;
        }
        let live = run.join("by-function");
        let old = run.join("by-function.old");
        let _ = fs::remove_dir_all(&old);
        if live.exists() {
            fs::rename(&live, &old)?;
        }
        fs::rename(&staging, &live)?;
        let _ = fs::remove_dir_all(&old);
        Ok(())
    }
}

/// The device node of the virtio-serial port named `name`: the `vportNpM` directory under
/// `<sysfs>/class/virtio-ports` whose `name` matches, under `dev_root`.
pub fn find_port(sysfs_root: &Path, dev_root: &Path, name: &str) -> Option<PathBuf> {
    let ports = fs::read_dir(sysfs_root.join("class/virtio-ports")).ok()?;
    ports.flatten().find_map(|e| {
        let port_name = fs::read_to_string(e.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| dev_root.join(e.file_name()))
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
