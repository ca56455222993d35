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
//! The read is a request the kernel answers at once, not I/O that waits
//! on a peer, and it is done under the lock so that no stream is checked
//! against a list known to be out of date.

use halfpipe_proto::policy::HostAddrs;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How old the list may get when there is no netlink socket to say that
/// it changed.
const FALLBACK_AGE: Duration = Duration::from_secs(1);

pub struct HostAddresses(Mutex<State>);

struct State {
    addrs: Arc<HostAddrs>,
    /// When they were last read; `None` before the first read, or when a
    /// change means they must be read again.
    read_at: Option<Instant>,
    /// Notifications of address changes; `None` if netlink was refused.
    changes: Option<Socket>,
}

impl Default for HostAddresses {
    fn default() -> Self {
        let changes = subscribe()
            .inspect_err(|e| {
                tracing::warn!(
                    "no netlink socket for address changes ({e}): the host's addresses \
                     are read again once a second"
                )
            })
            .ok();
        HostAddresses(Mutex::new(State {
            addrs: Arc::default(),
            read_at: None,
            changes,
        }))
    }
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
    /// Takes every notification waiting on the socket, without waiting:
    /// did anything change?
    fn changed(&mut self) -> bool {
        let Some(sock) = &self.changes else {
            return self.read_at.is_some_and(|t| t.elapsed() >= FALLBACK_AGE);
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
        let mut s = self.0.lock();
        if s.changed() || s.read_at.is_none() {
            // Marked read even if the read fails, so that a failure is
            // tried again (and logged) only at the next change or second.
            s.read_at = Some(Instant::now());
            match if_addrs::get_if_addrs() {
                Ok(interfaces) => {
                    s.addrs = Arc::new(HostAddrs::new(interfaces.iter().map(|i| i.ip())));
                }
                Err(e) => tracing::warn!(
                    "cannot read the host's addresses ({e}): `private` in the exit policy \
                     stands for the fixed networks and the {} addresses read before",
                    s.addrs.len()
                ),
            }
        }
        s.addrs.clone()
    }

    /// Reads them again at the next `current` (SIGHUP).
    pub fn expire(&self) {
        self.0.lock().read_at = None;
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
