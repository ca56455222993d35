//! The exit edge: accepts links (`link-accept`), and connects streams to
//! their targets (protocol.md §5: name resolution, exit policy, connect,
//! and the END reason for each failure).

use halfpipe_proto::Role;
use crate::ctx::{Config, Ctx};
use crate::limits::MAX_LINKS;
use crate::link::{self, Link};
use halfpipe_proto::relay::{end_reason, Answer, Host};
use crate::stream::Stream;
use crate::threads::{self, Reaper};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Accepts links until the listener is shut down, then joins every link.
pub fn spawn_acceptor(ctx: Arc<Ctx>, listener: TcpListener) -> io::Result<JoinHandle<()>> {
    threads::spawn("link-accept".into(), move || {
        let mut links = Reaper::default();
        for conn in listener.incoming() {
            links.reap();
            if ctx.shutting_down() {
                break;
            }
            let sock = match conn {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accepting a link failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if links.len() >= MAX_LINKS {
                tracing::warn!("{MAX_LINKS} links open: closing a new connection");
                continue;
            }
            let id = ctx.next_link_id();
            let ctx = ctx.clone();
            match threads::spawn(format!("link-rd {id}"), move || serve_link(ctx, id, sock)) {
                Ok(h) => links.push(h),
                Err(e) => tracing::warn!("cannot start a link thread ({e}): link refused"),
            }
        }
        links.join_all();
    })
}

/// One accepted link: handshake, then this thread is its reader.
fn serve_link(ctx: Arc<Ctx>, id: u32, sock: TcpStream) {
    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    if let Err(e) = link::accept_handshake(&sock, ctx.cfg.handshake_timeout) {
        // §1: close without sending VERSIONS; only this link is affected.
        if crate::ratelimit::violation_warning() {
            tracing::warn!(link = id, %peer, "link handshake failed, closing: {e}");
        }
        if matches!(e, link::HandshakeFailure::Protocol(_)) {
            ctx.metrics
                .violation(crate::metrics::ViolationKind::Handshake);
        }
        return;
    }
    let _ = sock.set_nodelay(true);
    match Link::start(ctx, id, Role::Exit, sock) {
        Ok(link) => {
            tracing::info!(link = id, %peer, "link opened");
            link.run();
        }
        Err(e) => tracing::warn!(link = id, %peer, "cannot start the link: {e}"),
    }
}

/// Why a connect did not produce a socket.
pub enum ConnectError {
    /// Answer END with this reason (§5 table).
    Refused(u8),
    /// The stream was aborted meanwhile; send nothing.
    Aborted,
}

/// Resolves `target`, applies the exit policy to every address (§5: the
/// address actually connected to), and connects within the timeout.
pub fn connect(stream: &Stream, cfg: &Config) -> Result<(Arc<Socket>, SocketAddr), ConnectError> {
    let port = stream.target.port;
    let addrs = match &stream.target.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => resolve(name).map_err(ConnectError::Refused)?,
    };
    let allowed: Vec<IpAddr> = addrs
        .into_iter()
        .map(canonical)
        .filter(|ip| cfg.exit_policy.allows(*ip, port))
        .collect();
    if allowed.is_empty() {
        return Err(ConnectError::Refused(end_reason::EXITPOLICY));
    }
    let deadline = Instant::now() + cfg.connect_timeout;
    let mut last = end_reason::MISC;
    for ip in allowed {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectError::Refused(end_reason::TIMEOUT));
        }
        let addr = SocketAddr::new(ip, port);
        let sock =
            new_socket(&addr).map_err(|_| ConnectError::Refused(end_reason::RESOURCELIMIT))?;
        let sock = Arc::new(sock);
        {
            // Published before connecting, so an abort can interrupt it.
            let mut st = stream.state.lock();
            if st.hc.is_closed() {
                return Err(ConnectError::Aborted);
            }
            st.socket = Some(sock.clone());
        }
        // A blocking connect honours SO_SNDTIMEO (EINPROGRESS on expiry).
        let _ = sock.set_write_timeout(Some(left));
        match sock.connect(&SockAddr::from(addr)) {
            Ok(()) => {
                let _ = sock.set_write_timeout(None);
                let _ = sock.set_nodelay(true);
                return Ok((sock, addr));
            }
            Err(e) => {
                if stream.is_aborted() {
                    return Err(ConnectError::Aborted);
                }
                last = connect_error_reason(&e);
                tracing::debug!(stream = %stream.name, %addr, "connect failed: {e}");
            }
        }
    }
    Err(ConnectError::Refused(last))
}

fn new_socket(addr: &SocketAddr) -> io::Result<Socket> {
    Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )
}

/// §5 table: the END reason for a failed connect.
fn connect_error_reason(e: &io::Error) -> u8 {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => end_reason::CONNECTREFUSED,
        Some(libc::EINPROGRESS | libc::EAGAIN | libc::ETIMEDOUT) => end_reason::TIMEOUT,
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EHOSTDOWN) => {
            end_reason::NOROUTE
        }
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            end_reason::RESOURCELIMIT
        }
        _ => end_reason::MISC,
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 addresses (so the policy sees
/// ::ffff:127.0.0.1 as 127.0.0.1).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// RFC 6761 §6.4: names under `invalid.` never exist, and resolvers
/// "SHOULD always return immediately with a negative response", without
/// asking a name server.
fn special_use_invalid(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    let tld = name.rsplit('.').next().unwrap_or(name);
    tld.eq_ignore_ascii_case("invalid")
}

/// Resolves a hostname; the error is the END reason (§5: RESOLVEFAILED).
pub fn resolve(name: &str) -> Result<Vec<IpAddr>, u8> {
    if special_use_invalid(name) {
        return Err(end_reason::RESOLVEFAILED);
    }
    match dns_lookup::lookup_host(name) {
        Ok(addrs) => {
            let mut v: Vec<IpAddr> = addrs.collect();
            v.dedup();
            if v.is_empty() {
                Err(end_reason::RESOLVEFAILED)
            } else {
                Ok(v)
            }
        }
        Err(_) => Err(end_reason::RESOLVEFAILED),
    }
}

/// RESOLVED answers for a RESOLVE (§5): the addresses, 0xF1 when the name
/// does not exist, 0xF0 when the lookup failed otherwise.
pub fn resolve_answers(name: &str) -> Vec<Answer> {
    use dns_lookup::LookupErrorKind;
    if special_use_invalid(name) {
        return vec![Answer::NontransientError];
    }
    match dns_lookup::lookup_host(name) {
        Ok(addrs) => {
            let mut v: Vec<Answer> = Vec::new();
            for ip in addrs {
                let a = Answer::Ip(canonical(ip));
                if !v.contains(&a) {
                    v.push(a);
                }
            }
            if v.is_empty() {
                vec![Answer::NontransientError]
            } else {
                v
            }
        }
        Err(e) => match e.kind() {
            LookupErrorKind::NoName | LookupErrorKind::NoData => vec![Answer::NontransientError],
            _ => vec![Answer::TransientError],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_fail_without_a_lookup() {
        // RFC 6761 §6.4; no name server is asked (tests stay on loopback).
        for name in ["nonexistent.invalid", "a.b.INVALID.", "invalid"] {
            assert!(special_use_invalid(name), "{name}");
            assert_eq!(resolve(name), Err(end_reason::RESOLVEFAILED));
            assert_eq!(resolve_answers(name), vec![Answer::NontransientError]);
        }
        for name in ["invalid.example", "localhost", "notinvalid"] {
            assert!(!special_use_invalid(name), "{name}");
        }
    }

    #[test]
    fn connect_errors_map_to_the_end_reasons_of_section_5() {
        // protocol.md §5 table: refused → CONNECTREFUSED, no answer before the
        // timeout → TIMEOUT, unreachable → NOROUTE, no descriptor → RESOURCELIMIT,
        // anything else → MISC.
        let e = |code| io::Error::from_raw_os_error(code);
        assert_eq!(
            connect_error_reason(&e(libc::ECONNREFUSED)),
            end_reason::CONNECTREFUSED
        );
        assert_eq!(
            connect_error_reason(&e(libc::EINPROGRESS)),
            end_reason::TIMEOUT
        );
        assert_eq!(
            connect_error_reason(&e(libc::ETIMEDOUT)),
            end_reason::TIMEOUT
        );
        assert_eq!(
            connect_error_reason(&e(libc::ENETUNREACH)),
            end_reason::NOROUTE
        );
        assert_eq!(
            connect_error_reason(&e(libc::EHOSTUNREACH)),
            end_reason::NOROUTE
        );
        assert_eq!(
            connect_error_reason(&e(libc::EMFILE)),
            end_reason::RESOURCELIMIT
        );
        assert_eq!(connect_error_reason(&e(libc::EACCES)), end_reason::MISC);
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(canonical(mapped), "127.0.0.1".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
