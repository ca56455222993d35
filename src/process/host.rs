//! The exit host's own addresses, which `private` in the exit policy
//! stands for too (halfpipe-proto's `HostAddrs`, as Tor's
//! ExitPolicyRejectLocalInterfaces): a BEGIN to the exit's public address
//! must not reach a service that listens on all of the host's addresses.
//!
//! They are read (getifaddrs) when first needed and again whenever they
//! have changed: a netlink socket subscribed to the kernel's address
//! notifications receives one as part of every address change, before the
//! change is done, and each BEGIN looks at it (a recv that does not wait).
//! So a BEGIN that follows an address change is checked against the new
//! list, with no thread and no polling. Without that socket (netlink
//! refused) the list is read again when it is older than `FALLBACK_AGE`.
//!
//! One thread reads at a time, holding no lock while it does; a BEGIN
//! that comes meanwhile waits for that read rather than use a list known
//! to be out of date.

use crate::runtime::monitor::Monitor;
use halfpipe_proto::policy::HostAddrs;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How old the list may get when there is no netlink socket to say that
/// it changed.
const FALLBACK_AGE: Duration = Duration::from_secs(1);

/// Never set: a wait for another thread's read ends when the read does.
static NEVER: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
pub struct HostAddresses(Monitor<State>);

#[derive(Default)]
struct State {
    addrs: Arc<HostAddrs>,
    /// When they were last read; `None` before the first read, or when
    /// they must be read again.
    read_at: Option<Instant>,
    /// A thread is reading them.
    reading: bool,
    /// Notifications of address changes, opened at the first read (only an
    /// exit ever reads); `None` if netlink was refused.
    changes: Option<Socket>,
}

/// A netlink socket that receives a message for each IPv4 or IPv6 address
/// added to or removed from an interface.
fn subscribe() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
    s.bind(&SocketAddr::new(0, groups))?;
    Ok(s)
}

impl State {
    /// Must the list be read (again)? Takes every notification waiting on
    /// the socket, without waiting.
    fn stale(&mut self) -> bool {
        let Some(read_at) = self.read_at else {
            return true;
        };
        let Some(sock) = &self.changes else {
            return read_at.elapsed() >= FALLBACK_AGE;
        };
        let mut changed = false;
        let mut buf = Vec::with_capacity(4096);
        loop {
            buf.clear();
            match sock.recv(&mut buf, libc::MSG_DONTWAIT | libc::MSG_TRUNC) {
                Ok(_) => changed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return changed,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ENOBUFS: notifications were lost, so something changed.
                Err(_) => return true,
            }
        }
    }
}

impl HostAddresses {
    /// The host's addresses as they are now.
    pub fn current(&self) -> Arc<HostAddrs> {
        // Some(list): fresh; None: this thread is to read it.
        let fresh = self.0.wait_until(&NEVER, |s| {
            if s.reading {
                return None; // wait for that read
            }
            if !s.stale() {
                return Some(Some(s.addrs.clone()));
            }
            if s.read_at.is_none() && s.changes.is_none() {
                // Subscribed before reading, so no change can fall between.
                s.changes = subscribe()
                    .inspect_err(|e| {
                        tracing::warn!(
                            "no netlink socket for address changes ({e}): the host's \
                             addresses are read again once a second"
                        )
                    })
                    .ok();
            }
            s.reading = true;
            Some(None)
        });
        match fresh {
            Ok(Some(addrs)) => addrs,
            Ok(None) => self.read(),
            // The monitor is never closed and NEVER never set.
            Err(_) => self.0.lock().addrs.clone(),
        }
    }

    /// Reads the addresses, holding no lock, and wakes whoever waits.
    fn read(&self) -> Arc<HostAddrs> {
        let interfaces = if_addrs::get_if_addrs();
        self.0.update(|s| {
            s.reading = false;
            // Marked read even if the read failed, so that a failure is
            // tried again (and logged) only at the next change or second.
            s.read_at = Some(Instant::now());
            match interfaces {
                Ok(i) => s.addrs = Arc::new(HostAddrs::new(i.iter().map(|i| i.ip()))),
                Err(e) => tracing::warn!(
                    "cannot read the host's addresses ({e}): `private` in the exit policy \
                     stands for the fixed networks and the {} addresses read before",
                    s.addrs.len()
                ),
            }
            s.addrs.clone()
        })
    }

    /// Reads them again at the next `current` (SIGHUP).
    pub fn expire(&self) {
        self.0.update(|s| s.read_at = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn the_hosts_addresses_include_loopback_and_are_reread_when_expired() {
        let h = HostAddresses::default();
        let first = h.current();
        // Every Linux host (and network namespace) has a loopback device,
        // and it is up where the tests run.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(first.contains(lo), "{first:?}");
        h.expire();
        assert!(!Arc::ptr_eq(&first, &h.current()));
    }
}
