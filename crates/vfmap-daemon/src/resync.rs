//! Coalescing of correspondence re-sends, and a per-VM budget for guest-triggered log lines.
//!
//! A guest decides when it says `hello`, and each hello asks for the VM's whole correspondence
//! again. However often it asks, at most one re-send runs and at most one waits per VM, so a
//! flood costs a set insert per line, not a task, a queued request and a log line each.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Re-send requests, one entry per VM at most.
#[derive(Debug, Clone, Default)]
pub struct Resyncs(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    /// VMs whose correspondence should be re-sent.
    wanted: BTreeSet<String>,
    /// VMs with a re-send running now.
    running: BTreeSet<String>,
}

impl Resyncs {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.0.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for `vm`'s correspondence to be re-sent; a request already waiting absorbs it.
    pub fn ask(&self, vm: &str) {
        if self.queue().wanted.insert(vm.to_owned()) {
            self.0.wake.notify_one();
        }
    }

    /// The next VM to re-send, marked running; waits until there is one. A VM whose re-send
    /// is still running is not handed out again until [`Resyncs::done`].
    pub async fn next(&self) -> String {
        loop {
            let wake = self.0.wake.notified();
            {
                let mut queue = self.queue();
                let ready = queue
                    .wanted
                    .iter()
                    .find(|vm| !queue.running.contains(*vm))
                    .cloned();
                if let Some(vm) = ready {
                    queue.wanted.remove(&vm);
                    queue.running.insert(vm.clone());
                    return vm;
                }
            }
            wake.await;
        }
    }

    /// Marks `vm`'s re-send finished, letting a waiting request for it run.
    pub fn done(&self, vm: &str) {
        let mut queue = self.queue();
        queue.running.remove(vm);
        if queue.wanted.contains(vm) {
            self.0.wake.notify_one();
        }
    }

    /// How many requests are waiting (tests).
    pub fn waiting(&self) -> usize {
        self.queue().wanted.len()
    }
}

/// At most `per_window` log lines per window for one VM's guest; the rest are counted and
/// summed up in one line when the next window opens.
#[derive(Debug)]
pub struct LogBudget {
    window: Duration,
    per_window: u32,
    started: Instant,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    /// A budget of `per_window` lines per `window`.
    pub fn new(per_window: u32, window: Duration) -> LogBudget {
        LogBudget {
            window,
            per_window,
            started: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now. When a new window opens after lines were dropped,
    /// `Some(n)` says how many, for one summary line.
    pub fn take(&mut self, now: Instant) -> (bool, Option<u64>) {
        let mut summary = None;
        if now.duration_since(self.started) >= self.window {
            self.started = now;
            self.used = 0;
            if self.suppressed > 0 {
                summary = Some(std::mem::take(&mut self.suppressed));
            }
        }
        if self.used < self.per_window {
            self.used += 1;
            (true, summary)
        } else {
            self.suppressed += 1;
            (false, summary)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flood_of_asks_is_one_running_and_one_waiting() {
        let resyncs = Resyncs::default();
        for _ in 0..100_000 {
            resyncs.ask("web");
        }
        resyncs.ask("db");
        assert_eq!(resyncs.waiting(), 2);
        let first = resyncs.next().await;
        let second = resyncs.next().await;
        assert_eq!((first.as_str(), second.as_str()), ("db", "web"));
        // While web's re-send runs, more asks wait as one, and are not handed out.
        for _ in 0..1000 {
            resyncs.ask("web");
        }
        assert_eq!(resyncs.waiting(), 1);
        let blocked = tokio::time::timeout(Duration::from_millis(50), resyncs.next()).await;
        assert!(blocked.is_err(), "web handed out while running");
        resyncs.done("web");
        assert_eq!(resyncs.next().await, "web");
        assert_eq!(resyncs.waiting(), 0);
    }

    #[test]
    fn the_log_budget_drops_and_then_sums_up() {
        let start = Instant::now();
        let mut budget = LogBudget::new(3, Duration::from_secs(10));
        let allowed = (0..10).filter(|_| budget.take(start).0).count();
        assert_eq!(allowed, 3);
        let (ok, summary) = budget.take(start + Duration::from_secs(11));
        assert!(ok);
        assert_eq!(summary, Some(7));
        assert_eq!(budget.take(start + Duration::from_secs(11)).1, None);
    }
}
