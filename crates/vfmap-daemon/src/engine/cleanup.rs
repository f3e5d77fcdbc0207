//! Cleanups the hypervisor did not confirm, and devices it holds that vfmap does not.
//!
//! A hung or unreachable hypervisor cannot say whether a VF is still in the VM. Such a VF is
//! never handed out, but it must not stay pinned either: its assignment becomes `releasing`
//! and the release is retried in the background with a growing delay, a bounded number of
//! times, visible in the VM's view. An operator's `detach` (or a restart) retries at once.
//!
//! Orphans are devices with vfmap's ids in a VM that the database does not give that VM, e.g.
//! a `device_add` from a daemon that died, landing after its successor freed the VF. Recovery
//! and a periodic check unplug them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vfmap_core::{Assignment, GlobalIndex, VmSpec};

use super::{Engine, Mutation, device_id};
use crate::effects::{Lifecycle, chain};

/// Automatic attempts before a cleanup waits for an operator.
pub const MAX_ATTEMPTS: u32 = 8;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The state of a cleanup waiting for the hypervisor (the API shows [`Cleanup::view`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cleanup {
    /// Failed attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: String,
    /// When the next automatic attempt runs (seconds since the epoch); `None` once the
    /// attempts are used up: then `vfmap detach` retries, or stopping the VM frees the VF.
    pub next_retry_at: Option<u64>,
    /// When the next attempt is due.
    due: Option<Instant>,
}

/// The wait before attempt `attempts + 1`: 1 s, doubling, at most [`MAX_BACKOFF`].
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(6)).min(MAX_BACKOFF)
}

impl Cleanup {
    /// The cleanup as the VM's view shows it.
    pub fn view(&self) -> vfmap_api::Cleanup {
        vfmap_api::Cleanup {
            attempts: self.attempts,
            last_error: self.last_error.clone(),
            next_retry_at: self.next_retry_at,
        }
    }

    /// The cleanup after one more failed attempt.
    fn after_failure(previous: Option<&Cleanup>, error: &str, now: Instant) -> Cleanup {
        let attempts = previous.map_or(0, |c| c.attempts) + 1;
        let wait = (attempts < MAX_ATTEMPTS).then(|| backoff(attempts));
        Cleanup {
            attempts,
            last_error: error.to_owned(),
            next_retry_at: wait.map(|w| crate::store::now() + w.as_secs()),
            due: wait.map(|w| now + w),
        }
    }
}

/// A VF's release in progress; dropping it lets the next one start.
pub(super) struct Claim<'a> {
    engine: &'a Engine,
    global_index: GlobalIndex,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.engine.lock().busy.remove(&self.global_index);
    }
}

/// `vfmap-vf<N>` → N: only ids vfmap itself gives.
fn vfmap_index(id: &str) -> Option<GlobalIndex> {
    // GlobalIndex parses decimal digits only; the round trip refuses leading zeros.
    let index: GlobalIndex = id.strip_prefix("vfmap-vf")?.parse().ok()?;
    (device_id(index) == id).then_some(index)
}

impl Engine {
    /// Claims a VF for a release; `None` when another release of it runs now.
    pub(super) fn claim(&self, global_index: GlobalIndex) -> Option<Claim<'_>> {
        // The state lock is released before a Claim can exist: a Claim refused while the
        // lock was held (`then_some` builds its value eagerly) would be dropped under it,
        // and its drop takes the lock (a deadlock of the whole daemon) and would free the
        // other holder's claim.
        let claimed = self.lock().busy.insert(global_index);
        claimed.then(|| Claim {
            engine: self,
            global_index,
        })
    }

    /// Records a failed cleanup attempt and when the next one is due.
    pub(super) fn cleanup_failed(&self, global_index: GlobalIndex, error: &str) {
        let mut state = self.lock();
        if state.pool.assignment(global_index).is_none() {
            return;
        }
        let next = Cleanup::after_failure(state.cleanups.get(&global_index), error, Instant::now());
        if next.due.is_none() {
            error!(vf = %global_index, attempts = next.attempts, error = %error, "giving up the automatic cleanup; `vfmap detach` retries it");
        }
        state.cleanups.insert(global_index, next);
    }

    /// Gives up an attach whose rollback could not unplug: durable `releasing`, then retried.
    pub(super) async fn abandon(&self, vm: &VmSpec, a: &Assignment, error: &str) {
        let abandoned = self
            .commit(|s| Ok(vec![Mutation::Pool(s.pool.plan_abandon(a.global_index)?)]))
            .await;
        match abandoned {
            Ok(_) => {
                info!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, state = "releasing", "assignment state");
                self.cleanup_failed(a.global_index, error);
            }
            Err(e) => {
                warn!(vf = %a.location, error = %chain(&e), "could not mark the VF for cleanup")
            }
        }
    }

    /// After a failed hypervisor query at start-up: unfinished attaches of `vm` become
    /// releases, and every release of it is retried in the background.
    pub(super) async fn defer_cleanups(&self, vm: &VmSpec, held: &[&Assignment], error: &str) {
        for a in held {
            if a.state.is_attaching() {
                self.abandon(vm, a, error).await;
            } else if a.state == vfmap_core::AssignState::Releasing {
                self.cleanup_failed(a.global_index, error);
            }
        }
    }

    /// Runs every cleanup that is due, each in its own task (one hung VM delays no other).
    pub async fn retry_cleanups(self: &Arc<Self>) {
        let now = Instant::now();
        let due: Vec<GlobalIndex> = self
            .lock()
            .cleanups
            .iter()
            .filter(|(_, c)| c.due.is_some_and(|d| d <= now))
            .map(|(gi, _)| *gi)
            .collect();
        for global_index in due {
            let engine = self.clone();
            tokio::spawn(async move { engine.retry_cleanup(global_index).await });
        }
    }

    async fn retry_cleanup(&self, global_index: GlobalIndex) {
        let Some(_claim) = self.claim(global_index) else {
            return;
        };
        let found = {
            // Still the same release: a VF freed and taken again since is someone else's.
            let state = self.lock();
            state
                .pool
                .assignment(global_index)
                .filter(|a| a.state == vfmap_core::AssignState::Releasing)
                .filter(|_| state.cleanups.contains_key(&global_index))
                .cloned()
                .and_then(|a| {
                    let vm = state.pool.vm(a.vm.as_str()).cloned()?;
                    Some((vm, a))
                })
        };
        let Some((vm, a)) = found else { return };
        info!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, "retrying the cleanup");
        if let Err(e) = self.finish_release(&vm, &a, false, true).await {
            warn!(vm = %vm.name, vf = %a.location, error = %chain(&e), "cleanup attempt failed");
        }
    }

    /// Unplugs devices with vfmap's ids that `vm` does not hold in the database.
    pub(super) async fn remove_orphans(&self, vm: &VmSpec, plugged: &[String]) {
        let held: BTreeSet<String> = self
            .lock()
            .pool
            .assignments_of(&vm.name)
            .map(|a| device_id(a.global_index))
            .collect();
        for id in plugged {
            if vfmap_index(id).is_none() || held.contains(id) {
                continue;
            }
            warn!(vm = %vm.name, device = %id, "removing a device vfmap does not hold (an attach that outlived its daemon?)");
            match self.adapters.hypervisor.detach(vm, id).await {
                Ok(()) => info!(vm = %vm.name, device = %id, "orphan removed"),
                Err(e) => {
                    warn!(vm = %vm.name, device = %id, error = %chain(&e), "could not remove the orphan; retrying at the next check")
                }
            }
        }
    }

    /// A VM its manager reports stopped (shut down, crashed, destroyed) holds nothing: each
    /// VF it held is released (reset, host driver, free) without telling the agent; the unplug
    /// step lets the adapter drop the device from a persistent definition. Attaches in flight
    /// are left to fail and roll back by themselves; a release already running is left alone.
    pub(super) async fn vm_stopped(&self, vm: &VmSpec, why: &str) {
        let held: Vec<Assignment> = self
            .lock()
            .pool
            .assignments_of(&vm.name)
            .filter(|a| !a.state.is_attaching())
            .cloned()
            .collect();
        if held.is_empty() {
            return;
        }
        info!(vm = %vm.name, vfs = held.len(), why = %why, "the VM stopped; releasing its VFs");
        self.release_all(vm, held).await;
    }

    /// Releases each of these assignments of `vm` (still held as they were, and not being
    /// released by another task) without telling the agent: reset, host driver, free.
    async fn release_all(&self, vm: &VmSpec, held: Vec<Assignment>) {
        for a in held {
            let Some(_claim) = self.claim(a.global_index) else {
                continue;
            };
            if let Some(current) = self.unchanged(&a) {
                self.release_lost(vm, &current).await;
            }
        }
    }

    /// The assignment as it is now, if it is still `a`'s (same VM and local index) and not
    /// attaching.
    fn unchanged(&self, a: &Assignment) -> Option<Assignment> {
        self.lock()
            .pool
            .assignment(a.global_index)
            .filter(|c| c.vm == a.vm && c.local_index == a.local_index)
            .filter(|c| !c.state.is_attaching())
            .cloned()
    }

    /// Releases a VF its VM lost; the caller holds its claim.
    async fn release_lost(&self, vm: &VmSpec, a: &Assignment) {
        if a.state != vfmap_core::AssignState::Releasing {
            let released = self
                .commit(|s| {
                    Ok(vec![Mutation::Pool(
                        s.pool.plan_release(vm.name.as_str(), a.local_index)?,
                    )])
                })
                .await;
            if let Err(e) = released {
                warn!(vm = %vm.name, vf = %a.location, error = %chain(&e), "could not release a lost VF");
                return;
            }
        }
        if let Err(e) = self.finish_release(vm, a, false, true).await {
            warn!(vm = %vm.name, vf = %a.location, error = %chain(&e), "releasing a lost VF failed; retried at the next check");
        }
    }

    /// The VM's ready assignments now.
    fn ready_of(&self, vm: &VmSpec) -> Vec<Assignment> {
        self.lock()
            .pool
            .assignments_of(&vm.name)
            .filter(|a| a.state == vfmap_core::AssignState::Ready)
            .cloned()
            .collect()
    }

    /// Releases the VFs that were ready in `vm` before its devices were listed as `plugged`
    /// and are not among them: the VM lost them (it was restarted between two checks, and a
    /// live-only device does not survive that). Each is checked again while its release is
    /// claimed (no detach or re-attach can run then), with a fresh list.
    pub(super) async fn release_missing(
        &self,
        vm: &VmSpec,
        ready_before: &[Assignment],
        plugged: &[String],
    ) {
        for a in ready_before {
            if plugged.contains(&device_id(a.global_index)) {
                continue;
            }
            let Some(_claim) = self.claim(a.global_index) else {
                continue;
            };
            let Some(current) = self.unchanged(a) else {
                continue;
            };
            match self.adapters.hypervisor.plugged(vm).await {
                Ok(now) if !now.contains(&device_id(a.global_index)) => {
                    warn!(vm = %vm.name, local_index = %a.local_index, vf = %a.location, "the VM no longer has this VF (restarted?); releasing it");
                    self.release_lost(vm, &current).await;
                }
                _ => {}
            }
        }
    }

    /// A VM its manager no longer defines is forgotten, after its VFs are released.
    pub(super) async fn vm_undefined(&self, vm: &VmSpec, why: &str) {
        info!(vm = %vm.name, why = %why, "the VM is no longer defined; forgetting it");
        // Its VFs first, as for a stopped VM: no agent to tell (waiting for one would take the
        // whole agent timeout per VF) and nothing plugged.
        self.vm_stopped(vm, why).await;
        if let Err(e) = self.remove_vm(vm.name.as_str()).await {
            warn!(vm = %vm.name, error = %chain(&e), "could not forget the VM yet; retried at the next check");
        }
    }

    /// The periodic orphan check over every VM, one task per VM; a VM still being checked
    /// from the last round is skipped. A VM its manager reports stopped gives its VFs back;
    /// one it reports undefined is forgotten.
    pub async fn reconcile_orphans(self: &Arc<Self>) {
        let vms: Vec<VmSpec> = self.lock().pool.vms().cloned().collect();
        for vm in vms {
            if !self.lock().checking.insert(vm.name.to_string()) {
                continue;
            }
            let engine = self.clone();
            tokio::spawn(async move {
                // Only what was ready before asking can be missing from the answer (an attach
                // that completes meanwhile is not in it yet).
                let ready_before = engine.ready_of(&vm);
                match engine.adapters.hypervisor.plugged(&vm).await {
                    Ok(ids) => {
                        engine.remove_orphans(&vm, &ids).await;
                        engine.release_missing(&vm, &ready_before, &ids).await;
                    }
                    Err(e) => match e.lifecycle() {
                        Some(Lifecycle::Stopped) => engine.vm_stopped(&vm, &chain(&e)).await,
                        Some(Lifecycle::Undefined) => engine.vm_undefined(&vm, &chain(&e)).await,
                        None => {}
                    },
                }
                engine.lock().checking.remove(vm.name.as_str());
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        let waits: Vec<u64> = (1..=10).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
    }

    #[test]
    fn attempts_run_out() {
        let now = Instant::now();
        let mut c = Cleanup::after_failure(None, "timeout", now);
        assert_eq!((c.attempts, c.due), (1, Some(now + Duration::from_secs(1))));
        for _ in 1..MAX_ATTEMPTS {
            c = Cleanup::after_failure(Some(&c), "timeout", now);
        }
        assert_eq!(c.attempts, MAX_ATTEMPTS);
        assert_eq!((c.due, c.next_retry_at), (None, None));
    }

    #[test]
    fn only_vfmap_ids_are_orphans() {
        assert_eq!(vfmap_index("vfmap-vf12"), Some(GlobalIndex::new(12)));
        for other in [
            "vfmap-vf",
            "vfmap-vf012",
            "vfmap-vf1x",
            "rp0",
            "vfmap-vf+1",
            "",
        ] {
            assert_eq!(vfmap_index(other), None, "{other}");
        }
    }
}
