//! How the agent learns that the device tree changed: the kernel's uevents (a netlink socket,
//! [`UeventSocket`]), or, where that socket cannot be opened, a fixed-interval poll
//! ([`Polling`]). The agent's waits only see the [`DeviceEvents`] trait, so tests feed events
//! from a double.
//!
//! A waiter subscribes first, then checks sysfs, then waits: an event that comes between the
//! check and the wait is queued in the socket, so nothing is missed.

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SocketFlags, SocketType, bind, recvfrom, socket_with};

use crate::uevent::{self, MAX_UEVENT, Uevent};

/// Why a wait woke up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// The kernel reported this event.
    Event(Uevent),
    /// Something may have changed that no parsed event describes (events were lost, a message
    /// could not be read whole or parsed, or the fallback's poll interval passed): check again.
    Recheck,
    /// The deadline passed.
    TimedOut,
}

/// A source of device events.
pub trait DeviceEvents {
    /// Blocks until the next event, or until `deadline`; returns [`Wake::TimedOut`] at once
    /// when `deadline` has passed.
    fn wait(&mut self, deadline: Instant) -> Wake;

    /// Drops what was queued before now, so a wait that starts with a fresh check of sysfs does
    /// not wake for stale events. The default has nothing to drop.
    fn discard_pending(&mut self) {}
}

/// The fallback: no events, a recheck every `interval`.
#[derive(Debug, Clone, Copy)]
pub struct Polling {
    interval: Duration,
}

impl Polling {
    /// The interval used when the uevent socket cannot be opened.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);

    /// Polls every `interval`.
    pub fn new(interval: Duration) -> Polling {
        Polling { interval }
    }
}

impl DeviceEvents for Polling {
    fn wait(&mut self, deadline: Instant) -> Wake {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Wake::TimedOut;
        }
        std::thread::sleep(left.min(self.interval));
        Wake::Recheck
    }
}

/// The kernel's uevents: a `NETLINK_KOBJECT_UEVENT` socket bound to group 1 (the kernel's own
/// messages, not udev's). Any user may subscribe; messages whose sender is not the kernel
/// (netlink port id 0) are dropped.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
    buffer: Vec<u8>,
    /// Whether a read error was already reported (once per socket).
    warned: bool,
}

/// The kernel's uevent multicast group.
const KERNEL_GROUP: u32 = 1;

impl UeventSocket {
    /// Subscribes. Events from then on are queued in the socket until read.
    pub fn open() -> io::Result<UeventSocket> {
        let fd = socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            Some(netlink::KOBJECT_UEVENT),
        )?;
        bind(&fd, &SocketAddrNetlink::new(0, KERNEL_GROUP))?;
        Ok(UeventSocket {
            fd,
            buffer: vec![0; MAX_UEVENT],
            warned: false,
        })
    }

    /// One queued message, if any. `Ok(None)`: nothing queued, or a message that is not the
    /// kernel's (dropped).
    fn receive(&mut self) -> io::Result<Option<Wake>> {
        let flags = RecvFlags::DONTWAIT | RecvFlags::TRUNC;
        match recvfrom(&self.fd, &mut self.buffer[..], flags) {
            Ok((read, len, from)) => {
                // Only the kernel (port id 0) speaks for the devices.
                let from_kernel = from
                    .and_then(|a| SocketAddrNetlink::try_from(a).ok())
                    .is_some_and(|a| a.pid() == 0);
                if !from_kernel {
                    return Ok(None);
                }
                if len > read {
                    return Ok(Some(Wake::Recheck)); // truncated: something happened
                }
                Ok(Some(match uevent::parse(&self.buffer[..read]) {
                    Ok(event) => Wake::Event(event),
                    Err(_) => Wake::Recheck,
                }))
            }
            Err(Errno::AGAIN | Errno::INTR) => Ok(None),
            // The socket's buffer overflowed: events were lost.
            Err(Errno::NOBUFS) => Ok(Some(Wake::Recheck)),
            Err(e) => Err(e.into()),
        }
    }

    /// After a read error: polls for the rest of this wait, saying so once.
    fn degrade(&mut self, error: &io::Error, deadline: Instant) -> Wake {
        if !self.warned {
            self.warned = true;
            eprintln!(
                "vfmap-agent: warning: reading kernel uevents failed ({error}); polling sysfs every {} ms while it fails",
                Polling::DEFAULT_INTERVAL.as_millis()
            );
        }
        Polling::new(Polling::DEFAULT_INTERVAL).wait(deadline)
    }
}

impl DeviceEvents for UeventSocket {
    fn wait(&mut self, deadline: Instant) -> Wake {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Wake::TimedOut;
            }
            match self.receive() {
                Ok(Some(wake)) => return wake,
                Ok(None) => {}
                Err(e) => return self.degrade(&e, deadline),
            }
            let timeout = Timespec::try_from(left).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            });
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return self.degrade(&e.into(), deadline),
            }
        }
    }

    fn discard_pending(&mut self) {
        // Bounded: the socket's buffer holds a bounded number of messages, and each read
        // takes one or reports the overflow once.
        for _ in 0..100_000 {
            match self.receive() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    }
}
