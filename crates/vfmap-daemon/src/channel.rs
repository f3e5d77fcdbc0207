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
//! unsolicited lines are dropped with a log line, and a guest can only delay its own VM's
//! operations, up to the deadline.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use vfmap_core::VmSpec;
use vfmap_core::protocol::{
    Answer, Entry, GuestMessage, HostMessage, MAX_LINE, VERSION, parse_guest_message, to_line,
};

use crate::effects::{BoxFuture, ChannelError, GuestChannel};
use crate::lines::{Line, read_line};

/// How long a link waits between connection attempts.
const RECONNECT: Duration = Duration::from_millis(500);

struct Request {
    id: u64,
    line: Vec<u8>,
    reply: oneshot::Sender<Vec<Answer>>,
}

struct Link {
    socket: String,
    requests: mpsc::UnboundedSender<Request>,
    task: tokio::task::JoinHandle<()>,
}

/// The real channel.
pub struct AgentChannel {
    next_id: Arc<AtomicU64>,
    links: Mutex<HashMap<String, Link>>,
    resync: mpsc::UnboundedSender<String>,
}

impl AgentChannel {
    /// A channel adapter. `resync` receives a VM's name whenever its correspondence should be
    /// re-sent (the link connected, or the agent said hello). Request ids start from the clock
    /// so a restarted daemon does not reuse ids an agent may still answer.
    pub fn new(resync: mpsc::UnboundedSender<String>) -> AgentChannel {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        AgentChannel {
            next_id: Arc::new(AtomicU64::new(seed)),
            links: Mutex::default(),
            resync,
        }
    }

    fn link(&self, vm: &VmSpec) -> mpsc::UnboundedSender<Request> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let name = vm.name.to_string();
        if let Some(link) = links.get(&name)
            && link.socket == vm.agent_socket
            && !link.task.is_finished()
        {
            return link.requests.clone();
        }
        let (requests, inbox) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_link(
            name.clone(),
            vm.agent_socket.clone(),
            inbox,
            self.resync.clone(),
        ));
        if let Some(old) = links.insert(
            name,
            Link {
                socket: vm.agent_socket.clone(),
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

/// Keeps one VM's link up until its request sender is dropped.
async fn run_link(
    vm: String,
    socket: String,
    mut inbox: mpsc::UnboundedReceiver<Request>,
    resync: mpsc::UnboundedSender<String>,
) {
    let mut said_down = false;
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
        info!(vm = %vm, "guest channel connected");
        let _ = resync.send(vm.clone());
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut pending: HashMap<u64, (oneshot::Sender<Vec<Answer>>, BTreeSet<u32>)> =
            HashMap::new();
        loop {
            tokio::select! {
                request = inbox.recv() => {
                    let Some(request) = request else { return };
                    let sent = sent_indexes(&request.line);
                    if let Err(e) = write.write_all(&request.line).await {
                        warn!(vm = %vm, error = %e, "guest channel write failed; reconnecting");
                        break;
                    }
                    pending.insert(request.id, (request.reply, sent));
                }
                line = read_line(&mut reader, MAX_LINE) => {
                    let bytes = match line {
                        Ok(Line::Complete(bytes)) => bytes,
                        Ok(Line::TooLong(n)) => {
                            warn!(vm = %vm, bytes = n, "dropped an over-long line from the guest");
                            continue;
                        }
                        Ok(Line::Eof) | Err(_) => {
                            info!(vm = %vm, "guest channel closed; reconnecting");
                            break;
                        }
                    };
                    match parse_guest_message(&bytes) {
                        Ok(GuestMessage::Result { id, entries, .. }) => match pending.remove(&id) {
                            Some((reply, sent)) => {
                                // Only answers to what was asked; the first answer per entry counts.
                                let mut seen = BTreeSet::new();
                                let answers = entries
                                    .into_iter()
                                    .filter(|a| sent.contains(&a.local_index()) && seen.insert(a.local_index()))
                                    .collect();
                                let _ = reply.send(answers);
                            }
                            None => warn!(vm = %vm, id, "dropped an answer to no pending request"),
                        },
                        Ok(GuestMessage::Hello { agent, .. }) => {
                            info!(vm = %vm, agent = %agent.escape_debug(), "agent hello; re-sending the correspondence");
                            let _ = resync.send(vm.clone());
                        }
                        Ok(GuestMessage::Error { reason, .. }) => {
                            warn!(vm = %vm, reason = %reason.escape_debug(), "the agent rejected a message");
                        }
                        Err(e) => warn!(vm = %vm, error = %e, "dropped a bad message from the guest"),
                    }
                }
            }
        }
        // Requests in flight on the broken connection fail now (their senders drop).
        drop(pending);
        tokio::time::sleep(RECONNECT / 5).await;
    }
}

/// Resolves when the request sender is gone (`true`), never otherwise within a reconnect wait.
async fn inbox_closed(inbox: &mpsc::UnboundedReceiver<Request>) -> bool {
    if inbox.is_closed() {
        return true;
    }
    std::future::pending::<()>().await;
    false
}

/// The local indexes of an `apply` line we built ourselves.
fn sent_indexes(line: &[u8]) -> BTreeSet<u32> {
    match serde_json::from_slice::<HostMessage>(line.strip_suffix(b"\n").unwrap_or(line)) {
        Ok(HostMessage::Apply { entries, .. }) => entries.iter().map(|e| e.local_index).collect(),
        Err(_) => BTreeSet::new(),
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
            let (reply, answer) = oneshot::channel();
            let line = to_line(&HostMessage::Apply {
                v: VERSION,
                id,
                entries,
            });
            self.link(vm)
                .send(Request { id, line, reply })
                .map_err(|_| ChannelError::Io("the guest channel link stopped".into()))?;
            match tokio::time::timeout(deadline, answer).await {
                Ok(Ok(answers)) => Ok(answers),
                Ok(Err(_)) => Err(ChannelError::Io(
                    "the guest channel closed before the agent answered".into(),
                )),
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
