//! The libvirt adapter: drives libvirt-managed VMs through `virsh` behind [`Hypervisor`].
//!
//! libvirt owns the domain's QEMU monitor, so vfmap asks libvirt: it reads the domain's live
//! XML (`virsh dumpxml`, parsed by the pure [`xml`] module), hot-plugs a `<hostdev
//! managed='no'>` with an explicit guest address on the chosen root port (`virsh
//! attach-device --live`, the XML on stdin, and `dumpxml` in the same run: one `;`-separated
//! virsh command line, the domain name quoted for virsh's own parser), and unplugs by alias
//! (`virsh detach-device-alias`), then re-reads the live XML until the device is gone, with a
//! deadline. Every `virsh` runs with `--connect URI`, its arguments as separate words (no
//! shell), and a time limit; it is killed when the limit passes.
//!
//! Why `virsh` and not the `virt` crate (libvirt's C library): the daemon is also built as a
//! static binary for guests and initramfs images, which a dynamically linked libvirt would
//! break; `virsh` is libvirt's own client, installed with libvirt, and a few tens of
//! milliseconds per call are small beside a hot-plug. See docs/architecture.md.
//!
//! Device ids: the engine names a VF's device `vfmap-vf<N>`; libvirt requires user aliases
//! to start with `ua-`, so the alias is `ua-vfmap-vf<N>` and [`Hypervisor::plugged`] gives
//! the ids back without the prefix.

pub mod xml;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::{Instant, sleep, timeout_at};
use vfmap_api::{NewVm, NewVmBackend};
use vfmap_core::protocol::GuestPath;
use vfmap_core::{Bdf, SlotId, VmBackend, VmSpec};

use crate::effects::{BoxFuture, Hypervisor, HypervisorError};
use xml::{ALIAS_PREFIX, Domain, DomainError};

/// `virsh` output read at most (a domain's XML stays far below it).
const MAX_OUTPUT: usize = xml::MAX_XML;
/// How often the live XML is re-read while a removal is awaited.
const REMOVAL_POLL: Duration = Duration::from_millis(50);

/// The libvirt adapter.
#[derive(Debug)]
pub struct Virsh {
    program: String,
    timeout: Duration,
    /// Per VM: one operation at a time, and the last live XML read of its domain.
    vms: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<LastSeen>>>>>,
}

/// A domain's live XML as last read, kept so an attach needs one `virsh` run, not three: the
/// root port's bus comes from it, and what libvirt reports after the attach is read in the
/// same run. A stale copy costs nothing worse than a refusal checked against a fresh read, or
/// a misplaced device the post-attach check catches (and the engine unplugs).
#[derive(Debug)]
struct LastSeen {
    uri: String,
    domain: Domain,
}

/// Where a libvirt VM is.
struct Target<'a> {
    domain: &'a str,
    uri: &'a str,
    persistent: bool,
}

fn target(vm: &VmSpec) -> Result<Target<'_>, HypervisorError> {
    match &vm.backend {
        VmBackend::Libvirt {
            domain,
            uri,
            persistent,
            ..
        } => Ok(Target {
            domain,
            uri,
            persistent: *persistent,
        }),
        other => Err(HypervisorError::Unsupported(other.kind())),
    }
}

/// The libvirt alias of a vfmap device id; `None` for an id that cannot be an alias.
fn alias_of(device_id: &str) -> Option<String> {
    let ok = !device_id.is_empty()
        && device_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    ok.then(|| format!("{ALIAS_PREFIX}{device_id}"))
}

/// A failed `virsh`, classified from its message (virsh has no structured errors).
fn classify(target: &Target, stderr: &str) -> HypervisorError {
    let text = stderr.trim().replace('\n', " ");
    let lower = text.to_ascii_lowercase();
    if lower.contains("failed to connect") || lower.contains("cannot connect") {
        HypervisorError::Unreachable {
            socket: target.uri.to_owned(),
            reason: text,
        }
    } else if lower.contains("domain not found") || lower.contains("failed to get domain") {
        HypervisorError::UnknownDomain {
            domain: target.domain.to_owned(),
            uri: target.uri.to_owned(),
        }
    } else if lower.contains("domain is not running") {
        HypervisorError::DomainInactive {
            domain: target.domain.to_owned(),
            state: "not running".into(),
        }
    } else {
        HypervisorError::Refused {
            class: "virsh".into(),
            desc: text,
        }
    }
}

impl Virsh {
    /// An adapter running `program` (normally `virsh`), each call limited to `timeout`; an
    /// unplug waits as long for libvirt to report the device gone.
    pub fn new(program: impl Into<String>, timeout: Duration) -> Virsh {
        Virsh {
            program: program.into(),
            timeout,
            vms: Mutex::new(HashMap::new()),
        }
    }

    fn vm_lock(&self, vm: &VmSpec) -> Arc<tokio::sync::Mutex<Option<LastSeen>>> {
        let mut locks = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(vm.name.to_string()).or_default().clone()
    }

    /// Runs `virsh --connect URI ARGS...` with `stdin`; its standard output, or the error.
    async fn run(
        &self,
        target: &Target<'_>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, HypervisorError> {
        let ran = self.spawn(target, args, stdin).await?;
        if !ran.success {
            return Err(classify(target, &ran.stderr));
        }
        Ok(ran.stdout)
    }

    /// Runs `virsh --connect URI ARGS...` with `stdin` to its end; its exit status and both
    /// outputs (virsh runs every command of a `;` list and exits with the last one's status).
    async fn spawn(
        &self,
        target: &Target<'_>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Ran, HypervisorError> {
        let deadline = Instant::now() + self.timeout;
        let mut child = Command::new(&self.program)
            .arg("--quiet")
            .arg("--connect")
            .arg(target.uri)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| HypervisorError::Unreachable {
                socket: target.uri.to_owned(),
                reason: format!("cannot run {}: {e} (install libvirt-clients)", self.program),
            })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let written = timeout_at(deadline, pipe.write_all(text.as_bytes())).await;
            if !matches!(written, Ok(Ok(()))) {
                return Err(HypervisorError::Protocol(format!(
                    "could not write to {}'s input",
                    self.program
                )));
            }
        }
        let output = timeout_at(deadline, child.wait_with_output())
            .await
            .map_err(|_| HypervisorError::Timeout(self.timeout))?
            .map_err(|e| HypervisorError::Protocol(format!("{}: {e}", self.program)))?;
        if output.stdout.len() > MAX_OUTPUT {
            return Err(HypervisorError::Protocol(format!(
                "{} wrote {} bytes",
                self.program,
                output.stdout.len()
            )));
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Ok(Ran {
            success: output.status.success(),
            stdout: String::from_utf8(output.stdout).map_err(|_| {
                HypervisorError::Protocol(format!("{} wrote non-UTF-8", self.program))
            })?,
            stderr: stderr.chars().take(2000).collect(),
        })
    }

    /// The domain's live XML, read.
    async fn domain(&self, target: &Target<'_>) -> Result<Domain, HypervisorError> {
        let text = self.run(target, &["dumpxml", target.domain], None).await?;
        xml::parse(&text).map_err(|e| HypervisorError::Protocol(e.to_string()))
    }

    /// The live XML of a domain that must be running.
    async fn running(&self, target: &Target<'_>) -> Result<Domain, HypervisorError> {
        let domain = self.domain(target).await?;
        if !domain.active {
            return Err(HypervisorError::DomainInactive {
                domain: target.domain.to_owned(),
                state: "shut off".into(),
            });
        }
        Ok(domain)
    }

    /// `--live`, plus `--config` for a VM registered as persistent.
    fn scope(target: &Target) -> Vec<&'static str> {
        if target.persistent {
            vec!["--live", "--config"]
        } else {
            vec!["--live"]
        }
    }

    async fn register_libvirt(&self, request: &NewVm) -> Result<VmSpec, HypervisorError> {
        let NewVmBackend::Libvirt {
            domain,
            uri,
            port_name,
            persistent,
            slots,
        } = &request.backend
        else {
            return Err(HypervisorError::Unsupported("qmp"));
        };
        // Checked before any virsh runs: they become its arguments.
        for check in [
            vfmap_core::check_domain_name(domain),
            vfmap_core::check_libvirt_uri(uri),
            vfmap_core::check_port_name(port_name),
        ] {
            check.map_err(HypervisorError::NotPrepared)?;
        }
        let target = Target {
            domain,
            uri,
            persistent: *persistent,
        };
        let live = self.domain(&target).await?;
        let registration = xml::registration(&live, port_name, slots).map_err(|e| match e {
            DomainError::NotRunning(domain) => HypervisorError::DomainInactive {
                domain,
                state: "shut off".into(),
            },
            other => HypervisorError::NotPrepared(other.to_string()),
        })?;
        Ok(VmSpec {
            name: request.name.clone(),
            backend: VmBackend::Libvirt {
                domain: domain.clone(),
                uri: uri.clone(),
                port_name: port_name.clone(),
                agent_socket: registration.agent_socket,
                persistent: *persistent,
            },
            slots: registration.slots,
            numa_node: request.numa_node,
        })
    }

    async fn attach_libvirt(
        &self,
        vm: &VmSpec,
        slot: &SlotId,
        device_id: &str,
        vf: Bdf,
    ) -> Result<GuestPath, HypervisorError> {
        let target = target(vm)?;
        let alias = alias_of(device_id)
            .ok_or_else(|| HypervisorError::Protocol(format!("bad device id {device_id:?}")))?;
        let lock = self.vm_lock(vm);
        let mut last_seen = lock.lock().await;
        // The root port from the last live XML when it shows the slot free; otherwise read
        // again, so that a refusal is always told from what libvirt says now.
        let known = last_seen
            .as_ref()
            .filter(|seen| seen.uri == target.uri && seen.domain.name == target.domain)
            .and_then(|seen| free_port(&seen.domain, slot).ok().map(|p| p.index));
        let bus = match known {
            Some(bus) => bus,
            None => {
                let live = self.running(&target).await?;
                let bus = free_port(&live, slot)?.index;
                *last_seen = Some(LastSeen {
                    uri: target.uri.to_owned(),
                    domain: live,
                });
                bus
            }
        };
        // The XML goes on stdin, read back through /proc: /dev/stdin is a link that udev or
        // systemd makes, not the kernel, and minimal systems lack it. The live XML after the
        // attach is read in the same virsh run.
        let domain = virsh_quote(target.domain);
        let script = format!(
            "attach-device --domain {domain} --file /proc/self/fd/0 {}; dumpxml --domain {domain}",
            Self::scope(&target).join(" ")
        );
        let hostdev = xml::hostdev_xml(vf, &alias, bus);
        let ran = self.spawn(&target, &[&script], Some(&hostdev)).await?;
        if !ran.success {
            *last_seen = None;
            return Err(classify(&target, &ran.stderr));
        }
        let after =
            xml::parse(&ran.stdout).map_err(|e| HypervisorError::Protocol(e.to_string()))?;
        let result = placed_at(&after, &alias, slot, bus).map_err(|placement| {
            // Not there: the attach itself failed; say why from libvirt's words, or from the
            // live XML when the port turned out not to be free after all.
            if !after.active {
                HypervisorError::DomainInactive {
                    domain: target.domain.to_owned(),
                    state: "shut off".into(),
                }
            } else if after.hostdev(&alias).is_some() {
                placement
            } else if let Err(e) = free_port(&after, slot) {
                e
            } else if ran.stderr.trim().is_empty() {
                placement
            } else {
                classify(&target, &ran.stderr)
            }
        });
        *last_seen = Some(LastSeen {
            uri: target.uri.to_owned(),
            domain: after,
        });
        result
    }

    async fn detach_libvirt(&self, vm: &VmSpec, device_id: &str) -> Result<(), HypervisorError> {
        let target = target(vm)?;
        let Some(alias) = alias_of(device_id) else {
            // Not a name vfmap gives or libvirt accepts: nothing of it can be plugged.
            return Ok(());
        };
        let lock = self.vm_lock(vm);
        let mut last_seen = lock.lock().await;
        *last_seen = None;
        let live = match self.running(&target).await {
            Err(e @ HypervisorError::DomainInactive { .. }) => {
                // A stopped domain holds nothing live; a persistent one must not bring the
                // device back when it starts again.
                if target.persistent {
                    self.drop_from_config(&target, &alias).await;
                }
                return Err(e);
            }
            other => other?,
        };
        if live.hostdev(&alias).is_none() {
            if target.persistent {
                self.drop_from_config(&target, &alias).await;
            }
            return Ok(());
        }
        self.run(
            &target,
            &["detach-device-alias", target.domain, &alias, "--live"],
            None,
        )
        .await?;
        // detach-device-alias returns before the guest lets the device go: wait until the
        // live XML no longer has it (libvirt's device-removed), with a deadline.
        let deadline = Instant::now() + self.timeout;
        loop {
            let live = match self.domain(&target).await {
                Ok(d) if !d.active => return Ok(()),
                Ok(d) => d,
                Err(e) if e.is_not_running() => return Ok(()),
                Err(e) => return Err(e),
            };
            if live.hostdev(&alias).is_none() {
                *last_seen = Some(LastSeen {
                    uri: target.uri.to_owned(),
                    domain: live,
                });
                break;
            }
            if Instant::now() >= deadline {
                return Err(HypervisorError::Timeout(self.timeout));
            }
            sleep(REMOVAL_POLL).await;
        }
        if target.persistent {
            self.drop_from_config(&target, &alias).await;
        }
        Ok(())
    }

    /// Removes the device from the persistent definition too (best effort: it may not be
    /// there, e.g. attached before the VM was registered as persistent).
    async fn drop_from_config(&self, target: &Target<'_>, alias: &str) {
        let _ = self
            .run(
                target,
                &["detach-device-alias", target.domain, alias, "--config"],
                None,
            )
            .await;
    }

    async fn plugged_libvirt(&self, vm: &VmSpec) -> Result<Vec<String>, HypervisorError> {
        let target = target(vm)?;
        let lock = self.vm_lock(vm);
        let mut last_seen = lock.lock().await;
        let live = self.running(&target).await?;
        let ids = live.device_ids();
        *last_seen = Some(LastSeen {
            uri: target.uri.to_owned(),
            domain: live,
        });
        Ok(ids)
    }
}

/// What one `virsh` run gave.
struct Ran {
    success: bool,
    stdout: String,
    stderr: String,
}

/// A word quoted for virsh's own command-line parser (the `;`-separated list): single quotes,
/// and a single quote inside as `'\''`, as in sh.
fn virsh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// The root port `slot` names, if it takes hot-plug and holds nothing; otherwise why not.
fn free_port<'d>(domain: &'d Domain, slot: &SlotId) -> Result<&'d xml::RootPort, HypervisorError> {
    let port = domain
        .root_port(slot.as_str())
        .filter(|p| p.hotplug)
        .ok_or_else(|| HypervisorError::SlotUnknown {
            slot: slot.to_string(),
        })?;
    match port.occupants.first() {
        Some(occupant) => Err(HypervisorError::SlotOccupied {
            slot: slot.to_string(),
            detail: format!("device {occupant} is plugged there"),
        }),
        None => Ok(port),
    }
}

/// The guest path of the hostdev `alias` in `domain`, if it sits at slot 0 behind root port
/// `slot` (bus `bus`), where it was put.
fn placed_at(
    domain: &Domain,
    alias: &str,
    slot: &SlotId,
    bus: u8,
) -> Result<GuestPath, HypervisorError> {
    let placed = domain.hostdev(alias).and_then(|h| h.address);
    if placed.map(|a| (a.bus, a.slot, a.function)) != Some((bus, 0, 0)) {
        return Err(HypervisorError::Protocol(format!(
            "after the attach, libvirt shows {alias} at {placed:?}, not on root port {slot} (bus {bus:#04x}) slot 0"
        )));
    }
    domain.guest_path(alias).ok_or_else(|| {
        HypervisorError::Protocol(format!(
            "root port {slot} has no address on the root bus in the live XML"
        ))
    })
}

impl Hypervisor for Virsh {
    fn attach<'a>(
        &'a self,
        vm: &'a VmSpec,
        slot: &'a SlotId,
        device_id: &'a str,
        vf: Bdf,
    ) -> BoxFuture<'a, Result<GuestPath, HypervisorError>> {
        Box::pin(self.attach_libvirt(vm, slot, device_id, vf))
    }

    fn detach<'a>(
        &'a self,
        vm: &'a VmSpec,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.detach_libvirt(vm, device_id))
    }

    fn plugged<'a>(
        &'a self,
        vm: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Vec<String>, HypervisorError>> {
        Box::pin(self.plugged_libvirt(vm))
    }

    fn register<'a>(
        &'a self,
        request: &'a NewVm,
    ) -> BoxFuture<'a, Result<VmSpec, HypervisorError>> {
        Box::pin(self.register_libvirt(request))
    }

    fn backends(&self) -> &'static [&'static str] {
        &["libvirt"]
    }
}

/// The hypervisor of a daemon: each VM's operations go to its backend's adapter, so the
/// engine never learns which backend a VM has.
pub struct Backends {
    /// QEMU over QMP.
    pub qmp: Arc<dyn Hypervisor>,
    /// libvirt.
    pub libvirt: Arc<dyn Hypervisor>,
}

impl Backends {
    fn of(&self, vm: &VmSpec) -> &dyn Hypervisor {
        match vm.backend {
            VmBackend::Qmp { .. } => self.qmp.as_ref(),
            VmBackend::Libvirt { .. } => self.libvirt.as_ref(),
        }
    }
}

impl Hypervisor for Backends {
    fn attach<'a>(
        &'a self,
        vm: &'a VmSpec,
        slot: &'a SlotId,
        device_id: &'a str,
        vf: Bdf,
    ) -> BoxFuture<'a, Result<GuestPath, HypervisorError>> {
        self.of(vm).attach(vm, slot, device_id, vf)
    }

    fn detach<'a>(
        &'a self,
        vm: &'a VmSpec,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        self.of(vm).detach(vm, device_id)
    }

    fn plugged<'a>(
        &'a self,
        vm: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Vec<String>, HypervisorError>> {
        self.of(vm).plugged(vm)
    }

    fn register<'a>(
        &'a self,
        request: &'a NewVm,
    ) -> BoxFuture<'a, Result<VmSpec, HypervisorError>> {
        match request.backend {
            NewVmBackend::Qmp { .. } => self.qmp.register(request),
            NewVmBackend::Libvirt { .. } => self.libvirt.register(request),
        }
    }

    fn backends(&self) -> &'static [&'static str] {
        &["qmp", "libvirt"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases() {
        assert_eq!(alias_of("vfmap-vf3").as_deref(), Some("ua-vfmap-vf3"));
        assert_eq!(alias_of("a'b"), None);
        assert_eq!(alias_of(""), None);
    }

    #[test]
    fn virsh_errors_are_classified() {
        let t = Target {
            domain: "web",
            uri: "qemu:///system",
            persistent: false,
        };
        let cases = [
            (
                "error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory",
                "Unreachable",
            ),
            (
                "error: failed to get domain 'web'\nerror: Domain not found: no domain with matching name 'web'",
                "UnknownDomain",
            ),
            (
                "error: Requested operation is not valid: domain is not running",
                "DomainInactive",
            ),
            (
                "error: internal error: unable to execute QEMU command 'device_add'",
                "Refused",
            ),
        ];
        for (stderr, kind) in cases {
            let e = classify(&t, stderr);
            assert!(format!("{e:?}").starts_with(kind), "{stderr}: {e:?}");
        }
    }
}

#[cfg(test)]
#[path = "adapter_tests.rs"]
mod adapter_tests;
