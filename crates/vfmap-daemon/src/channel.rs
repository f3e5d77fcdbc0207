//! The guest channel: the VM's virtio-serial port, reached through its unix socket on the host.
//!
//! Each `apply` opens a connection, sends the VM's whole current correspondence, and reads
//! until the answer with the same request id arrives or the deadline passes. Sending the whole
//! correspondence every time is what makes a reconnect (a restarted VM or agent) harmless.
//! Everything the guest sends is hostile input: over-long, malformed, out-of-order and
//! unsolicited lines are dropped with a log line, and a guest can only delay its own VM's
//! operations, up to the deadline.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::{Instant, timeout_at};
use tracing::warn;
use vfmap_core::VmSpec;
use vfmap_core::protocol::{
    Answer, Entry, GuestMessage, HostMessage, MAX_LINE, VERSION, parse_guest_message, to_line,
};

use crate::effects::{BoxFuture, ChannelError, GuestChannel};
use crate::lines::{Line, read_line};

/// The real channel.
#[derive(Debug, Default)]
pub struct AgentChannel {
    next_id: AtomicU64,
    vm_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl AgentChannel {
    /// A channel adapter; request ids start from the clock so a restarted daemon does not
    /// reuse ids an agent may still answer.
    pub fn new() -> AgentChannel {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        AgentChannel {
            next_id: AtomicU64::new(seed),
            vm_locks: Mutex::default(),
        }
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
            let lock = {
                let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
                locks.entry(vm.name.to_string()).or_default().clone()
            };
            let _guard = lock.lock().await;
            let until = Instant::now() + deadline;
            let socket = &vm.agent_socket;
            let stream = timeout_at(until, UnixStream::connect(socket))
                .await
                .map_err(|_| ChannelError::Timeout(deadline))?
                .map_err(|e| ChannelError::Unreachable {
                    socket: socket.clone(),
                    reason: e.to_string(),
                })?;
            let (read, mut write) = stream.into_split();
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let sent: BTreeSet<u32> = entries.iter().map(|e| e.local_index).collect();
            let line = to_line(&HostMessage::Apply {
                v: VERSION,
                id,
                entries,
            });
            write
                .write_all(&line)
                .await
                .map_err(|e| ChannelError::Io(e.to_string()))?;
            let mut reader = BufReader::new(read);
            loop {
                let line = timeout_at(until, read_line(&mut reader, MAX_LINE))
                    .await
                    .map_err(|_| ChannelError::Timeout(deadline))?
                    .map_err(|e| ChannelError::Io(e.to_string()))?;
                let bytes = match line {
                    Line::Complete(bytes) => bytes,
                    Line::TooLong(n) => {
                        warn!(vm = %vm.name, bytes = n, "dropped an over-long line from the guest");
                        continue;
                    }
                    Line::Eof => {
                        return Err(ChannelError::Io("the guest side closed the channel".into()));
                    }
                };
                match parse_guest_message(&bytes) {
                    Ok(GuestMessage::Result {
                        id: got, entries, ..
                    }) if got == id => {
                        // Only answers to what was asked; the first answer per entry counts.
                        let mut seen = BTreeSet::new();
                        return Ok(entries
                            .into_iter()
                            .filter(|a| {
                                sent.contains(&a.local_index()) && seen.insert(a.local_index())
                            })
                            .collect());
                    }
                    Ok(GuestMessage::Result { id: got, .. }) => {
                        warn!(vm = %vm.name, id = got, expected = id, "dropped an answer to another request");
                    }
                    Ok(GuestMessage::Error { reason, .. }) => {
                        warn!(vm = %vm.name, reason = %reason.escape_debug(), "the agent rejected a message");
                    }
                    Ok(GuestMessage::Hello { agent, .. }) => {
                        tracing::debug!(vm = %vm.name, agent = %agent.escape_debug(), "agent hello");
                    }
                    Err(e) => {
                        warn!(vm = %vm.name, error = %e, "dropped a bad message from the guest")
                    }
                }
            }
        })
    }
}
