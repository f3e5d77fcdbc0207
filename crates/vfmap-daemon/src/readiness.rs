//! The daemon's readiness: the API answers from the moment its socket is bound (right after the
//! state directory's lock and the config and profiles are read), while discovery, host
//! preparation, the state database and recovery run behind it.
//!
//! [`Startup`] is the start-up's end: it says each [`StartupPhase`] and, at the end, hands the
//! engine over. [`Readiness`] is the API's end. The contract (README, `docs/openapi.json`):
//!
//! - `GET /v1/health` and `GET /v1/openapi.json` answer at once: health is 200 with
//!   `status: starting` and the phase until the pool is up;
//! - every other request needs the pool. It waits for it, at most [`MAX_WAIT`] or what the
//!   request's `Prefer: wait=N` (RFC 7240, seconds) asks if shorter, and then gets 503
//!   `starting` with `Retry-After: 1`, having changed nothing;
//! - the engine is handed over only after [`crate::engine::Engine::recover`] has finished, so
//!   no request can see or hand out a VF whose state recovery has not settled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::info;
pub use vfmap_api::StartupPhase;

use crate::engine::Engine;

/// The longest a request waits for the pool during start-up, unless it asks for less.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// What the client is told to wait before retrying a 503 `starting`, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Clone)]
enum State {
    Starting(StartupPhase),
    Ready(Arc<Engine>),
    Failed(Arc<str>),
}

/// The start-up's end: reports the phases and hands the engine over once recovered.
pub struct Startup {
    tx: watch::Sender<State>,
    since: Instant,
}

/// The API's end: the engine once ready, the phase until then.
#[derive(Clone)]
pub struct Readiness {
    rx: watch::Receiver<State>,
    since: Instant,
}

/// Why a request did not get the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    /// The phase when the wait ended (`failed` if the start-up failed or the daemon stops).
    pub phase: StartupPhase,
    /// How long the daemon had been starting.
    pub starting_for: Duration,
    /// Why the start-up failed, if it did.
    pub reason: Option<String>,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            Some(reason) => write!(
                f,
                "the daemon's start-up did not finish ({reason}); it is exiting, see its log"
            ),
            None => write!(
                f,
                "the daemon is starting (phase {}, {:.1} s so far): its pool is not ready yet and \
                 nothing was changed; retry in {RETRY_AFTER_SECS} s",
                self.phase,
                self.starting_for.as_secs_f64()
            ),
        }
    }
}

impl Startup {
    /// A start-up in its first phase, and the API's end of it.
    pub fn begin() -> (Startup, Readiness) {
        let since = Instant::now();
        let (tx, rx) = watch::channel(State::Starting(StartupPhase::PreparingHost));
        info!(phase = %StartupPhase::PreparingHost, "starting");
        (Startup { tx, since }, Readiness { rx, since })
    }

    /// Enters the next phase.
    pub fn phase(&self, phase: StartupPhase) {
        info!(phase = %phase, after_ms = self.since.elapsed().as_millis() as u64, "starting");
        self.tx.send_replace(State::Starting(phase));
    }

    /// The pool is up: requests waiting for it go on.
    pub fn ready(self, engine: Arc<Engine>) {
        info!(
            after_ms = self.since.elapsed().as_millis() as u64,
            "ready: the pool is up"
        );
        self.tx.send_replace(State::Ready(engine));
    }

    /// The start-up failed or was stopped: waiting requests are answered at once.
    pub fn fail(self, why: &str) {
        self.tx.send_replace(State::Failed(why.into()));
    }
}

impl Readiness {
    /// Ready from the start (an engine built in-process: tests, benches).
    pub fn ready(engine: Arc<Engine>) -> Readiness {
        let (_, rx) = watch::channel(State::Ready(engine));
        Readiness {
            rx,
            since: Instant::now(),
        }
    }

    /// The phase now.
    pub fn phase(&self) -> StartupPhase {
        match &*self.rx.borrow() {
            State::Starting(phase) => *phase,
            State::Ready(_) => StartupPhase::Ready,
            State::Failed(_) => StartupPhase::Failed,
        }
    }

    /// The engine, if the pool is up.
    pub fn engine(&self) -> Option<Arc<Engine>> {
        match &*self.rx.borrow() {
            State::Ready(engine) => Some(engine.clone()),
            _ => None,
        }
    }

    /// The engine, waiting at most `limit` for the pool to come up.
    pub async fn wait(&self, limit: Duration) -> Result<Arc<Engine>, NotReady> {
        let mut rx = self.rx.clone();
        let settled =
            tokio::time::timeout(limit, rx.wait_for(|s| !matches!(s, State::Starting(_)))).await;
        let failed = |reason: &str| NotReady {
            phase: StartupPhase::Failed,
            starting_for: self.since.elapsed(),
            reason: Some(reason.to_owned()),
        };
        match settled {
            Ok(Ok(state)) => match &*state {
                State::Ready(engine) => Ok(engine.clone()),
                State::Failed(why) => Err(failed(why)),
                State::Starting(_) => unreachable!("wait_for returned a starting state"),
            },
            // The start-up's end is gone without a verdict: the daemon is stopping.
            Ok(Err(_)) => Err(failed("the daemon is stopping")),
            Err(_) => Err(NotReady {
                phase: self.phase(),
                starting_for: self.since.elapsed(),
                reason: None,
            }),
        }
    }
}

/// The wait a request asks for with `Prefer: wait=N` (RFC 7240: seconds, the smallest if
/// given more than once), among the header values; `None` when it asks for none.
pub fn preferred_wait<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Duration> {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|preference| {
            // A preference's parameters follow `;`; its value may be quoted.
            let token = preference.split(';').next()?.trim();
            let (name, value) = token.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            value.trim().trim_matches('"').parse::<u64>().ok()
        })
        .min()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_wait_is_read_as_rfc_7240_says() {
        let wait = |values: &[&str]| preferred_wait(values.iter().copied());
        assert_eq!(wait(&[]), None);
        assert_eq!(wait(&["wait=0"]), Some(Duration::ZERO));
        assert_eq!(
            wait(&["respond-async, wait=5"]),
            Some(Duration::from_secs(5))
        );
        assert_eq!(wait(&["Wait = \"3\""]), Some(Duration::from_secs(3)));
        assert_eq!(wait(&["wait=7", "wait=2"]), Some(Duration::from_secs(2)));
        assert_eq!(wait(&["wait=2;x=1"]), Some(Duration::from_secs(2)));
        for ignored in ["handling=lenient", "wait=-1", "wait=1.5", "wait", "waits=1"] {
            assert_eq!(wait(&[ignored]), None, "{ignored}");
        }
    }

    #[tokio::test]
    async fn requests_wait_for_the_phase_to_end_and_are_told_why_not() {
        let (startup, readiness) = Startup::begin();
        assert_eq!(readiness.phase(), StartupPhase::PreparingHost);
        assert!(readiness.engine().is_none());
        startup.phase(StartupPhase::Recovering);
        let not_ready = readiness
            .wait(Duration::ZERO)
            .await
            .err()
            .expect("not ready");
        assert_eq!(
            (not_ready.phase, not_ready.reason.as_deref()),
            (StartupPhase::Recovering, None)
        );
        assert!(
            not_ready.to_string().contains("phase recovering"),
            "{not_ready}"
        );
        let waiter = {
            let readiness = readiness.clone();
            tokio::spawn(async move { readiness.wait(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        startup.fail("prepare failed");
        let failed = waiter.await.unwrap().err().expect("not ready");
        assert_eq!(failed.phase, StartupPhase::Failed);
        assert!(failed.to_string().contains("prepare failed"), "{failed}");
        assert_eq!(readiness.phase(), StartupPhase::Failed);

        // A start-up dropped without a verdict (the daemon stops) answers waiters at once.
        let (startup, readiness) = Startup::begin();
        drop(startup);
        let stopped = readiness.wait(MAX_WAIT).await.err().expect("not ready");
        assert_eq!(stopped.reason.as_deref(), Some("the daemon is stopping"));
    }
}
