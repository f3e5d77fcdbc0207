//! The guest channel: the VM's virtio-serial port, reached through its unix socket on the host.
//!
//! QEMU's chardev socket server takes one client at a time, so each VM has one persistent
//! **link**: a task that keeps the connection up (reconnecting when the VM or agent restarts),
//! multiplexes `apply` requests over it and routes each answer by request id. Whenever the link
//! (re)connects or the agent says hello, the VM's whole current correspondence is re-sent
//! (through the `resync` channel to the engine), so a restarted agent or rebooted guest catches
//! up without waiting for the next attach.
//!
//! Everything the guest sends is hostile input: over-long, malformed, out-of-order and
//! unsolicited lines are dropped, and a guest can only delay its own VM's operations, up to
//! the deadline. Everything a guest can grow is bounded: queued and pending requests (each
//! leaves at its deadline), re-sends (coalesced per VM, see [`crate::resync`]), log lines (a
//! budget per VM) and the lines read per second. A link task that fails is restarted.
//!
//! Each link keeps `vfmap_agent_link_up{vm}` (1 connected, 0 not); the series goes with the
//! link when the VM is removed.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{error, info, warn};
use vfmap_core::protocol::{
    Answer, Entry, GuestMessage, HostMessage, MAX_LINE, VERSION, parse_guest_message, to_line,
};
use vfmap_core::{LocalIndex, VmSpec};

use crate::effects::{BoxFuture, ChannelError, GuestChannel};
use crate::lines::{Line, LineReader};
use crate::metrics::Metrics;
use crate::resync::{LogBudget, Resyncs};

/// How long a link waits between connection attempts.
const RECONNECT: Duration = Duration::from_millis(500);
/// Requests queued for one VM's link before senders wait (up to their deadline).
const MAX_QUEUED: usize = 64;
/// Requests sent and awaiting an answer on one link; more are refused.
const MAX_PENDING: usize = 64;
/// Lines read from one guest per second; past it the link stops reading for the rest of the
/// second, so a flooding guest blocks on its own port instead of taking the daemon's CPU.
const LINES_PER_SECOND: u32 = 10_000;
/// Guest-triggered log lines per VM per window.
const LOG_LINES: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

type Reply = oneshot::Sender<Result<Vec<Answer>, ChannelError>>;

struct Request {
    id: u64,
    line: Vec<u8>,
    sent: BTreeSet<LocalIndex>,
    deadline: Instant,
    reply: Reply,
}

/// A request written to the guest, waiting for its answer until its deadline.
struct Pending {
    reply: Reply,
    sent: BTreeSet<LocalIndex>,
    deadline: Instant,
}

struct Link {
    socket: String,
    requests: mpsc::Sender<Request>,
    task: tokio::task::JoinHandle<()>,
}

/// The real channel.
pub struct AgentChannel {
    next_id: Arc<AtomicU64>,
    links: Mutex<HashMap<String, Link>>,
    resyncs: Resyncs,
    metrics: Arc<Metrics>,
}

impl AgentChannel {
    /// A channel adapter. A VM's name is put in `resyncs` whenever its correspondence should
    /// be re-sent (the link connected, or the agent said hello). Request ids start from the
    /// clock so a restarted daemon does not reuse ids an agent may still answer. Each link's
    /// state goes to `metrics`.
    pub fn new(resyncs: Resyncs, metrics: Arc<Metrics>) -> AgentChannel {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        AgentChannel {
            next_id: Arc::new(AtomicU64::new(seed)),
            links: Mutex::default(),
            resyncs,
            metrics,
        }
    }

    fn link(&self, vm: &VmSpec) -> mpsc::Sender<Request> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let name = vm.name.to_string();
        if let Some(link) = links.get(&name)
            && link.socket == vm.backend.agent_socket()
            && !link.task.is_finished()
        {
            return link.requests.clone();
        }
        let (requests, inbox) = mpsc::channel(MAX_QUEUED);
        let task = tokio::spawn(supervise_link(
            name.clone(),
            vm.backend.agent_socket().to_owned(),
            inbox,
            self.resyncs.clone(),
            self.metrics.clone(),
        ));
        if let Some(old) = links.insert(
            name,
            Link {
                socket: vm.backend.agent_socket().to_owned(),
                requests: requests.clone(),
                task,
            },
        ) {
            old.task.abort();
        }
        requests
    }
}

impl Drop for AgentChannel {
    fn drop(&mut self) {
        for link in self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            link.task.abort();
        }
    }
}

/// Aborts a task when dropped, so aborting the supervisor also stops the link it runs.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one VM's link and restarts it if it fails: nothing a guest sends should make it
/// panic, and if something still does, the link comes back by itself instead of staying
/// dead until the next API call for the VM.
async fn supervise_link(
    vm: String,
    socket: String,
    inbox: mpsc::Receiver<Request>,
    resyncs: Resyncs,
    metrics: Arc<Metrics>,
) {
    let inbox = Arc::new(tokio::sync::Mutex::new(inbox));
    loop {
        let mut task = AbortOnDrop(tokio::spawn(run_link(
            vm.clone(),
            socket.clone(),
            inbox.clone(),
            resyncs.clone(),
            metrics.clone(),
        )));
        match (&mut task.0).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                error!(vm = %vm, "the guest channel link failed; restarting it");
                tokio::time::sleep(RECONNECT).await;
            }
            Err(_) => return,
        }
    }
}

/// Test hook: panic the link once on the first hello (`VFMAP_FAILPOINT=link-panic`), so tests
/// can prove a failed link comes back by itself.
fn link_failpoint() {
    static FIRED: AtomicBool = AtomicBool::new(false);
    if std::env::var("VFMAP_FAILPOINT").is_ok_and(|v| v == "link-panic")
        && !FIRED.swap(true, Ordering::Relaxed)
    {
        panic!("failpoint link-panic");
    }
}

/// Per-connection reading limits and the VM's log budget.
struct Limits {
    budget: LogBudget,
    second: Instant,
    lines: u32,
}

impl Limits {
    /// Whether a guest-triggered line may be logged; logs the summary of dropped ones.
    fn log(&mut self, vm: &str) -> bool {
        let (allowed, summary) = self.budget.take(std::time::Instant::now());
        if let Some(n) = summary {
            warn!(vm = %vm, suppressed = n, "suppressed log lines about this guest's messages");
        }
        allowed
    }

    /// Counts a line read; past the per-second cap, waits for the next second.
    async fn pace(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.second) >= Duration::from_secs(1) {
            self.second = now;
            self.lines = 0;
        }
        self.lines += 1;
        if self.lines > LINES_PER_SECOND {
            tokio::time::sleep_until(self.second + Duration::from_secs(1)).await;
        }
    }
}

/// A link's `vfmap_agent_link_up` series, removed when the link task ends or is aborted, so
/// a removed VM leaves none behind (a link that is restarted sets it again).
struct LinkGauge {
    metrics: Arc<Metrics>,
    vm: String,
}

impl LinkGauge {
    fn set(&self, up: bool) {
        self.metrics.agent_link(&self.vm, up);
    }
}

impl Drop for LinkGauge {
    fn drop(&mut self) {
        self.metrics.forget_agent_link(&self.vm);
    }
}

/// Keeps one VM's link up until its request sender is dropped.
async fn run_link(
    vm: String,
    socket: String,
    inbox: Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>,
    resyncs: Resyncs,
    metrics: Arc<Metrics>,
) {
    let gauge = LinkGauge {
        metrics,
        vm: vm.clone(),
    };
    gauge.set(false);
    let mut inbox = inbox.lock().await;
    let mut said_down = false;
    let mut limits = Limits {
        budget: LogBudget::new(LOG_LINES, LOG_WINDOW),
        second: Instant::now(),
        lines: 0,
    };
    loop {
        let stream = match UnixStream::connect(&socket).await {
            Ok(stream) => stream,
            Err(e) => {
                if !said_down {
                    info!(vm = %vm, socket = %socket, error = %e, "guest channel down; retrying");
                    said_down = true;
                }
                // Requests wait (up to their own deadline) for the link to come back.
                tokio::select! {
                    () = tokio::time::sleep(RECONNECT) => continue,
                    closed = inbox_closed(&inbox) => if closed { return } else { continue },
                }
            }
        };
        said_down = false;
        gauge.set(true);
        info!(vm = %vm, "guest channel connected");
        resyncs.ask(&vm);
        let (read, mut write) = stream.into_split();
        let mut reader = LineReader::new(BufReader::new(read), MAX_LINE);
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                request = inbox.recv() => {
                    let Some(request) = request else { return };
                    drop_expired(&mut pending);
                    if pending.len() >= MAX_PENDING {
                        let _ = request.reply.send(Err(ChannelError::Io(format!(
                            "{MAX_PENDING} requests already wait for this VM's agent"
                        ))));
                        continue;
                    }
                    if let Err(e) = write.write_all(&request.line).await {
                        warn!(vm = %vm, error = %e, "guest channel write failed; reconnecting");
                        break;
                    }
                    pending.insert(request.id, Pending {
                        reply: request.reply,
                        sent: request.sent,
                        deadline: request.deadline,
                    });
                }
                _ = sweep.tick() => drop_expired(&mut pending),
                line = reader.next_line() => {
                    let bytes = match line {
                        Ok(Line::Complete(bytes)) => bytes,
                        Ok(Line::TooLong(n)) => {
                            if limits.log(&vm) {
                                warn!(vm = %vm, bytes = n, "dropped an over-long line from the guest");
                            }
                            limits.pace().await;
                            continue;
                        }
                        Ok(Line::Eof) | Err(_) => {
                            info!(vm = %vm, "guest channel closed; reconnecting");
                            break;
                        }
                    };
                    handle_guest_line(&vm, &bytes, &mut pending, &resyncs, &mut limits);
                    limits.pace().await;
                }
            }
        }
        gauge.set(false);
        // Requests in flight on the broken connection fail now (their senders drop).
        drop(pending);
        tokio::time::sleep(RECONNECT / 5).await;
    }
}

/// One complete line from the guest.
fn handle_guest_line(
    vm: &str,
    bytes: &[u8],
    pending: &mut HashMap<u64, Pending>,
    resyncs: &Resyncs,
    limits: &mut Limits,
) {
    match parse_guest_message(bytes) {
        Ok(GuestMessage::Result { id, entries, .. }) => match pending.remove(&id) {
            Some(p) => {
                // Only answers to what was asked; the first answer per entry counts.
                let mut seen = BTreeSet::new();
                let answers = entries
                    .into_iter()
                    .filter(|a| p.sent.contains(&a.local_index()) && seen.insert(a.local_index()))
                    .collect();
                let _ = p.reply.send(Ok(answers));
            }
            None => {
                if limits.log(vm) {
                    warn!(vm = %vm, id, "dropped an answer to no pending request");
                }
            }
        },
        Ok(GuestMessage::Hello { agent, .. }) => {
            if limits.log(vm) {
                info!(vm = %vm, agent = %agent.escape_debug(), "agent hello; re-sending the correspondence");
            }
            link_failpoint();
            resyncs.ask(vm);
        }
        Ok(GuestMessage::Error { reason, .. }) => {
            if limits.log(vm) {
                warn!(vm = %vm, reason = %reason.escape_debug(), "the agent rejected a message");
            }
        }
        Err(e) => {
            if limits.log(vm) {
                warn!(vm = %vm, error = %e, "dropped a bad message from the guest");
            }
        }
    }
}

/// Requests whose caller stopped waiting (deadline passed or future dropped) leave the table.
fn drop_expired(pending: &mut HashMap<u64, Pending>) {
    let now = Instant::now();
    pending.retain(|_, p| p.deadline > now && !p.reply.is_closed());
}

/// Resolves when the request sender is gone (`true`), never otherwise within a reconnect wait.
async fn inbox_closed(inbox: &mpsc::Receiver<Request>) -> bool {
    if inbox.is_closed() {
        return true;
    }
    std::future::pending::<()>().await;
    false
}

/// Why a request's answer never came when its reply was dropped. The link's sweep drops a
/// request at its deadline, and may get there before the caller's own timer fires: that is still
/// the agent not answering in time, not a broken channel.
fn lost_answer(until: Instant, now: Instant, deadline: Duration) -> ChannelError {
    if now >= until {
        ChannelError::Timeout(deadline)
    } else {
        ChannelError::Io("the guest channel closed before the agent answered".into())
    }
}

impl GuestChannel for AgentChannel {
    fn apply<'a>(
        &'a self,
        vm: &'a VmSpec,
        entries: Vec<Entry>,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<Vec<Answer>, ChannelError>> {
        Box::pin(async move {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let until = Instant::now() + deadline;
            let (reply, answer) = oneshot::channel();
            let sent = entries.iter().map(|e| e.local_index).collect();
            let line = to_line(&HostMessage::Apply {
                v: VERSION,
                id,
                entries,
            });
            let request = Request {
                id,
                line,
                sent,
                deadline: until,
                reply,
            };
            match tokio::time::timeout_at(until, self.link(vm).send(request)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(ChannelError::Io("the guest channel link stopped".into()));
                }
                Err(_) => return Err(ChannelError::Timeout(deadline)),
            }
            match tokio::time::timeout_at(until, answer).await {
                Ok(Ok(answers)) => answers,
                Ok(Err(_)) => Err(lost_answer(until, Instant::now(), deadline)),
                Err(_) => Err(ChannelError::Timeout(deadline)),
            }
        })
    }

    fn watch(&self, vm: &VmSpec) {
        self.link(vm);
    }

    fn forget(&self, vm: &str) {
        if let Some(link) = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm)
        {
            link.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_dropped_at_the_deadline_is_a_timeout_and_before_it_a_broken_channel() {
        let until = Instant::now();
        let deadline = Duration::from_secs(2);
        assert_eq!(
            lost_answer(until, until, deadline),
            ChannelError::Timeout(deadline)
        );
        assert_eq!(
            lost_answer(until, until + Duration::from_millis(3), deadline),
            ChannelError::Timeout(deadline)
        );
        assert!(matches!(
            lost_answer(until, until - Duration::from_millis(3), deadline),
            ChannelError::Io(_)
        ));
    }
}
