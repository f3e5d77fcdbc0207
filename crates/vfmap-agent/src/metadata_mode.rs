//! The agent's metadata mode: its `[metadata]` config, and the [`Agent`] side of it (read
//! `meta_data.json` from the config drive or a file, bind each device it tags through the same
//! path as the host's entries, refuse a device the host already has). The document itself is
//! parsed by [`crate::metadata`], the drive found and read by [`crate::configdrive`].

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;
use vfmap_core::{Bdf, DriverName, FunctionName, PciId};

use crate::configdrive::{self, ConfigDriveError};
use crate::{
    Agent, AgentError, Config, Published, Source, allows, deadline_after, metadata, published_bdf,
    wait_until,
};

/// `[metadata]`: where the orchestrator's `meta_data.json` is, and what its functions mean.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataConfig {
    /// `"config-drive"` (the default): the block device labelled `config-2`; `"file"`: `path`.
    #[serde(default)]
    pub source: MetadataSource,
    /// The `meta_data.json` to read when `source = "file"`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// How long to wait for the config drive to appear, in milliseconds.
    #[serde(default = "MetadataConfig::default_timeout_ms")]
    pub timeout_ms: u64,
    /// `[metadata.functions.<name>]`: each function the metadata may name (its tags are
    /// `vfmap:<name>`), with its guest driver and the IDs its devices must report.
    #[serde(default)]
    pub functions: BTreeMap<String, FunctionConfig>,
}

impl MetadataConfig {
    fn default_timeout_ms() -> u64 {
        10_000
    }
}

/// Where the metadata is read from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetadataSource {
    /// The block device labelled `config-2`.
    #[default]
    ConfigDrive,
    /// The file at `path`.
    File,
}

/// One function of `[metadata.functions]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// The guest driver to bind, a plain module name (and in `allowed_drivers` when that is set).
    pub driver: String,
    /// Vendor ID the device must report (`"0x1b36"`), when set.
    #[serde(default)]
    pub vendor: Option<PciId>,
    /// Device ID the device must report, when set.
    #[serde(default)]
    pub device: Option<PciId>,
}

impl Agent<'_> {
    /// The device at `bdf` (an address from the metadata), waiting until `deadline` for it:
    /// orchestrator-placed devices are there at boot, but the agent may start first. One
    /// deadline serves every entry of a document, so a document of absent addresses costs one
    /// `hotplug_timeout_ms`, not one per entry.
    fn wait_for_device(&mut self, bdf: Bdf, deadline: Instant) -> Result<(), AgentError> {
        let started = Instant::now();
        let vendor = self.sysfs.device_dir(bdf).join("vendor");
        wait_until(
            &mut *self.events,
            deadline,
            |event| event.is_pci() && event.name() == bdf.to_string(),
            || vendor.exists().then_some(()),
        )
        .ok_or_else(|| AgentError::NoDeviceAt {
            bdf,
            waited: started.elapsed(),
        })
    }

    /// Refuses a bridge (class 06: the host bridge, root and switch ports, the LPC bridge):
    /// never a VF, and rebinding one would cut the guest off its other devices.
    fn check_not_bridge(&self, bdf: Bdf) -> Result<(), AgentError> {
        let class = fs::read_to_string(self.sysfs.device_dir(bdf).join("class"))
            .ok()
            .and_then(|t| u32::from_str_radix(t.trim().trim_start_matches("0x"), 16).ok());
        match class {
            Some(class) if class >> 16 == 0x06 => Err(AgentError::Bridge { bdf, class }),
            _ => Ok(()),
        }
    }

    fn bind_metadata_entry(
        &mut self,
        entry: &metadata::MetaEntry,
        functions: &BTreeMap<String, FunctionConfig>,
        deadline: Instant,
    ) -> Result<DriverName, AgentError> {
        let function = functions
            .get(entry.function.as_str())
            .ok_or_else(|| AgentError::UnknownFunction(entry.function.to_string()))?;
        let driver = DriverName::new(&function.driver).map_err(AgentError::Bind)?;
        self.check_allowed(&driver)?;
        let bdf = entry.guest_bdf;
        if let Some((local_index, _)) = self
            .current
            .iter()
            .find(|(_, p)| p.state == "bound" && published_bdf(p) == Some(bdf))
        {
            return Err(AgentError::ClaimedTwice {
                bdf,
                holder: format!("the host's local index {local_index}"),
            });
        }
        self.wait_for_device(bdf, deadline)?;
        self.check_not_bridge(bdf)?;
        self.bind_device(bdf, &driver, function.vendor, function.device)?;
        Ok(driver)
    }

    /// Makes the guest match the metadata's devices (`parsed.entries`, functions and drivers
    /// from `functions`): binds each through the same path as the host's entries, releases
    /// what a previous run bound from metadata that is no longer there, and publishes. A
    /// device the host's correspondence already has is refused, and so is a bridge. Devices
    /// are waited for until one `hotplug_timeout_ms` after the call. Returns the metadata's
    /// entries as published (each `bound` or `failed` with its reason).
    pub fn apply_metadata(
        &mut self,
        parsed: &metadata::Parsed,
        functions: &BTreeMap<String, FunctionConfig>,
    ) -> Vec<Published> {
        self.events.discard_pending();
        for (bdf, old) in std::mem::take(&mut self.from_metadata) {
            if parsed.entries.iter().any(|e| e.guest_bdf == bdf) {
                self.from_metadata.insert(bdf, old);
            } else if let Err(e) = self.release(&old) {
                eprintln!("vfmap-agent: releasing {bdf} (metadata): {e}");
            }
        }
        let deadline = deadline_after(Duration::from_millis(self.config.hotplug_timeout_ms));
        for entry in &parsed.entries {
            let bound = self.bind_metadata_entry(entry, functions, deadline);
            let (driver, state, reason) = match bound {
                Ok(driver) => (Some(driver.to_string()), "bound", None),
                Err(e) => (
                    None,
                    "failed",
                    Some(vfmap_core::protocol::fit_text(&e.to_string())),
                ),
            };
            self.from_metadata.insert(
                entry.guest_bdf,
                Published {
                    source: Source::Metadata,
                    local_index: None,
                    function: entry.function.to_string(),
                    path: None,
                    guest_bdf: Some(entry.guest_bdf.to_string()),
                    driver,
                    state: state.into(),
                    reason,
                },
            );
        }
        if let Err(e) = self.publish() {
            eprintln!(
                "vfmap-agent: publishing to {}: {e}",
                self.config.run_dir.display()
            );
        }
        self.from_metadata.values().cloned().collect()
    }

    /// Without `[metadata]`: releases what a run with it bound from metadata (the agent
    /// restarted with the section removed), so those devices neither stay pinned to the
    /// function's driver nor block the host's claims. Returns how many entries there were.
    pub fn drop_metadata(&mut self) -> usize {
        let held = self.from_metadata.len();
        if held > 0 {
            self.apply_metadata(&metadata::Parsed::default(), &BTreeMap::new());
        }
        held
    }

    /// Reads the `meta_data.json` that `config` names, at most [`metadata::MAX_METADATA`]
    /// bytes: the file, or the config drive, waited for up to `timeout_ms` (checked at once,
    /// then on each block device uevent). Returns it with a description of where it was.
    pub fn read_metadata(
        &mut self,
        config: &MetadataConfig,
    ) -> Result<(Vec<u8>, String), ConfigDriveError> {
        let limit = metadata::MAX_METADATA;
        if config.source == MetadataSource::File {
            let path = config.path.as_ref().ok_or(ConfigDriveError::NoPath)?;
            let bytes = configdrive::read_file(path, limit)?;
            return Ok((bytes, path.display().to_string()));
        }
        let started = Instant::now();
        let (sysfs_root, dev_root) = (&self.config.sysfs_root, &self.config.dev_root);
        let drives = wait_until(
            &mut *self.events,
            deadline_after(Duration::from_millis(config.timeout_ms)),
            |event| event.subsystem.as_deref() == Some("block"),
            || Some(configdrive::find(sysfs_root, dev_root)).filter(|d| !d.is_empty()),
        )
        .ok_or_else(|| ConfigDriveError::NotFound {
            waited_ms: started.elapsed().as_millis(),
        })?;
        let [drive] = drives.as_slice() else {
            let names: Vec<&str> = drives.iter().map(|d| d.name.as_str()).collect();
            return Err(ConfigDriveError::Several(names.join(", ")));
        };
        let bytes = configdrive::read_drive(drive, &std::env::temp_dir(), self.loader, limit)?;
        let from = format!(
            "{} ({}, label {})",
            drive.node.display(),
            drive.filesystem.mount_type(),
            configdrive::LABEL
        );
        Ok((bytes, from))
    }
}

/// Checks `[metadata]`: a `path` exactly when `source = "file"`, at least one function, valid
/// function and driver names. Returns warnings: functions whose driver the allowlist refuses
/// (their devices are reported and skipped), functions without IDs (any device tagged with
/// them is rebound).
pub fn check_metadata(config: &Config) -> Result<Vec<String>, String> {
    let Some(metadata) = &config.metadata else {
        return Ok(Vec::new());
    };
    match (metadata.source, &metadata.path) {
        (MetadataSource::File, None) => return Err(ConfigDriveError::NoPath.to_string()),
        (MetadataSource::ConfigDrive, Some(_)) => {
            return Err(
                "[metadata] path is read only with source = \"file\"; set source = \"file\" or remove path"
                    .into(),
            );
        }
        _ => {}
    }
    if metadata.functions.is_empty() {
        return Err(
            "[metadata] has no functions: add [metadata.functions.<name>] with driver = \"<module>\" for each function the metadata's vfmap:<name> tags name"
                .into(),
        );
    }
    let mut warnings = Vec::new();
    for (name, function) in &metadata.functions {
        FunctionName::new(name).map_err(|e| format!("[metadata.functions.{name}]: {e}"))?;
        let driver = DriverName::new(&function.driver)
            .map_err(|e| format!("[metadata.functions.{name}] driver: {e}"))?;
        if !allows(config, &driver) {
            warnings.push(format!(
                "[metadata.functions.{name}] driver {driver} is not in allowed_drivers: its devices will be skipped; add it to allowed_drivers or change the driver"
            ));
        }
        if function.vendor.is_none() && function.device.is_none() {
            warnings.push(format!(
                "[metadata.functions.{name}] has no vendor or device: a vfmap:{name} tag on any device (a disk, a NIC) rebinds it to {driver}; set the IDs its VFs report"
            ));
        }
    }
    Ok(warnings)
}
