//! Binding the function's driver to devices, many at once: every device's probe is started
//! (module loaded, `driver_override` set, old driver unbound, `drivers_probe` written) before
//! any is waited for, and one wait watches them all. So N devices whose drivers probe
//! asynchronously (nvme, most network drivers) take about one probe's time, not N.
//!
//! It stays on one thread: the kernel probes different devices concurrently by itself, and the
//! agent's own writes stay in order (no two writers on one device, one module load per driver:
//! the second device of a driver finds it registered).

use std::time::{Duration, Instant};

use vfmap_core::{Bdf, DriverName};

use crate::{Agent, AgentError, deadline_after, wait_until};

/// A device whose probe was started and whose binding is awaited.
struct Pending {
    /// Position in the caller's list.
    at: usize,
    bdf: Bdf,
    name: String,
    driver: DriverName,
    started: Instant,
    done: Option<Instant>,
}

impl Agent<'_> {
    /// Binds `driver` to `bdf` (see [`Agent::bind_all`]).
    pub(crate) fn bind(&mut self, bdf: Bdf, driver: &DriverName) -> Result<(), AgentError> {
        self.bind_all(&[(bdf, driver.clone())])
            .pop()
            .expect("one result per device")
            .map(|_| ())
    }

    /// Binds each device's driver: loads the module if the driver is not registered, sets
    /// `driver_override`, unbinds the current driver and probes, for every device first; then
    /// waits up to `bind_timeout_ms` for all the bindings to show (some drivers probe
    /// asynchronously). If another driver takes a device meanwhile (the ID-matched driver's
    /// own asynchronous probe, racing ours), it is unbound and the device probed again: the
    /// override makes ours win. One result per device, in order: when it was seen bound.
    pub(crate) fn bind_all(
        &mut self,
        jobs: &[(Bdf, DriverName)],
    ) -> Vec<Result<Instant, AgentError>> {
        let mut results: Vec<Option<Result<Instant, AgentError>>> = Vec::new();
        let mut pending = Vec::new();
        for (at, (bdf, driver)) in jobs.iter().enumerate() {
            match self.start_bind(*bdf, driver) {
                Ok(true) => results.push(Some(Ok(Instant::now()))),
                Ok(false) => {
                    results.push(None);
                    pending.push(Pending {
                        at,
                        bdf: *bdf,
                        name: bdf.to_string(),
                        driver: driver.clone(),
                        started: Instant::now(),
                        done: None,
                    });
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if !pending.is_empty() {
            self.wait_bound(&mut pending);
        }
        for p in pending {
            results[p.at] = Some(p.done.ok_or_else(|| AgentError::BindNotEffective {
                bdf: p.bdf,
                driver: p.driver.clone(),
                found: self.sysfs.driver_of(p.bdf).ok().flatten(),
                waited: p.started.elapsed(),
            }));
        }
        results
            .into_iter()
            .map(|r| r.expect("every device has its result"))
            .collect()
    }

    /// Starts binding `driver` to `bdf`; `true` when it is bound already.
    fn start_bind(&mut self, bdf: Bdf, driver: &DriverName) -> Result<bool, AgentError> {
        let bound = self.sysfs.driver_of(bdf).ok().flatten();
        if bound.as_deref() == Some(driver.as_str()) {
            return Ok(true);
        }
        if !self.sysfs.driver_dir(driver.as_str()).is_dir() {
            let unavailable = |reason: String| AgentError::DriverUnavailable {
                driver: driver.clone(),
                reason,
            };
            self.loader.load(driver).map_err(unavailable)?;
            if !self.sysfs.driver_dir(driver.as_str()).is_dir() {
                return Err(unavailable(format!(
                    "module {driver} loaded, but no PCI driver named {driver} appeared"
                )));
            }
        }
        let name = bdf.to_string();
        self.write(
            &self.sysfs.device_dir(bdf).join("driver_override"),
            driver.as_str(),
        )?;
        if let Some(old) = &bound {
            self.write(&self.sysfs.driver_dir(old).join("unbind"), &name)?;
        }
        self.write(&self.sysfs.drivers_probe(), &name)?;
        Ok(false)
    }

    /// Waits until every pending device is bound to its driver, or `bind_timeout_ms` passed;
    /// marks each when it was seen bound.
    fn wait_bound(&mut self, pending: &mut [Pending]) {
        let (sysfs, writer) = (&self.sysfs, self.writer);
        let names: Vec<String> = pending.iter().map(|p| p.name.clone()).collect();
        wait_until(
            &mut *self.events,
            deadline_after(Duration::from_millis(self.config.bind_timeout_ms)),
            |event| names.iter().any(|n| event.name() == n),
            || {
                for p in pending.iter_mut().filter(|p| p.done.is_none()) {
                    let Some(found) = sysfs.driver_of(p.bdf).ok().flatten() else {
                        continue;
                    };
                    if found == p.driver.as_str() {
                        p.done = Some(Instant::now());
                        continue;
                    }
                    // Best effort: the other driver may be gone already; its unbind event
                    // tells.
                    let _ = writer.write(&sysfs.driver_dir(&found).join("unbind"), &p.name);
                    let _ = writer.write(&sysfs.drivers_probe(), &p.name);
                }
                pending.iter().all(|p| p.done.is_some()).then_some(())
            },
        );
    }
}
