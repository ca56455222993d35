//! How the exit reaches a stream's target (docs/protocol.md §5, R5.3):
//! resolve the name, apply the exit policy to every address (the address
//! actually connected to), connect within the timeout, and name the END
//! reason of each failure (R5.6 to R5.12). Also the answers to RESOLVE.

use crate::process::Ctx;
use crate::runtime::threads;
use halfpipe_proto::relay::{end_reason, Answer, Host, Target};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// What `connect` needs of the stream it connects for.
pub trait Connecting {
    /// Keeps `sock` where an abort of the stream finds it (and resets it),
    /// before the connect starts; false if the stream already closed.
    fn publish(&self, sock: &Arc<Socket>) -> bool;
    /// Was the stream aborted meanwhile?
    fn aborted(&self) -> bool;
    /// For logs: the stream's "C.S" name.
    fn name(&self) -> &str;
}

/// Why a connect did not produce a socket.
pub enum ConnectError {
    /// Answer END with this reason (§5 table).
    Refused(u8),
    /// The stream was aborted meanwhile; send nothing.
    Aborted,
}

/// Resolves `target`, applies the exit policy to every address (§5: the
/// address actually connected to), and connects, all within the connect
/// timeout (R5.9). A lookup that has not answered by then is left running
/// in `lookup`, its thread, for the caller to join once it has answered
/// the stream.
pub fn connect(
    target: &Target,
    ctx: &Ctx,
    stream: &impl Connecting,
    lookup: &mut Option<JoinHandle<()>>,
) -> Result<(Arc<Socket>, SocketAddr), ConnectError> {
    let port = target.port;
    let policy = ctx.exit_policy();
    // R5.9: one connect timeout for the lookup and all the addresses tried.
    let deadline = Instant::now() + ctx.cfg.connect_timeout;
    let addrs = match &target.host {
        Host::Ip(ip) => vec![*ip],
        // R5.7: a name that does not resolve is END(RESOLVEFAILED).
        Host::Name(_)
            if crate::fault::active(crate::fault::Fault::PolicyBeforeResolution)
                && !policy.allows_on(&Default::default(), IpAddr::from([0, 0, 0, 0]), port) =>
        {
            return Err(ConnectError::Refused(end_reason::EXITPOLICY));
        }
        Host::Name(name) => resolve_until(name, ctx, deadline, stream.name(), lookup)
            .map_err(ConnectError::Refused)?,
    };
    let addrs: Vec<IpAddr> = addrs.into_iter().map(canonical).collect();
    // `private` covers the host's own addresses too.
    let host = if policy.mentions_private() {
        ctx.host.current()
    } else {
        Default::default()
    };
    let allowed: Vec<IpAddr> = addrs
        .iter()
        .copied()
        .filter(|ip| policy.allows_on(&host, *ip, port))
        .collect();
    if allowed.is_empty() {
        if crate::runtime::ratelimit::refusal_line() {
            let why: Vec<String> = addrs
                .iter()
                .filter_map(|ip| Some(format!("{ip}: {}", policy.refusal_on(&host, *ip, port)?)))
                .collect();
            tracing::info!(
                stream = stream.name(),
                "exit policy refuses {target} ({}): END(EXITPOLICY)",
                why.join("; ")
            );
        }
        // R5.6: the exit policy refuses every address.
        return Err(ConnectError::Refused(end_reason::EXITPOLICY));
    }
    // R5.12: a failure no row names is MISC.
    let mut last = end_reason::MISC;
    for ip in allowed {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectError::Refused(end_reason::TIMEOUT));
        }
        let addr = SocketAddr::new(ip, port);
        // R5.11: no descriptor for the stream is RESOURCELIMIT.
        let sock =
            new_socket(&addr).map_err(|_| ConnectError::Refused(end_reason::RESOURCELIMIT))?;
        let sock = Arc::new(sock);
        // Published before connecting, so an abort can interrupt it.
        if !stream.publish(&sock) {
            return Err(ConnectError::Aborted);
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
                if stream.aborted() {
                    return Err(ConnectError::Aborted);
                }
                last = connect_error_reason(&e);
                tracing::debug!(stream = stream.name(), %addr, "connect failed: {e}");
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

/// The table of §5: the END reason for a failed connect.
fn connect_error_reason(e: &io::Error) -> u8 {
    match e.raw_os_error() {
        // R5.8: the target refuses the connection.
        Some(libc::ECONNREFUSED) => end_reason::CONNECTREFUSED,
        // R5.9: no answer before the connect timeout (SO_SNDTIMEO).
        Some(libc::EINPROGRESS | libc::EAGAIN | libc::ETIMEDOUT) => end_reason::TIMEOUT,
        // R5.10: the target's host or network is unreachable.
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EHOSTDOWN) => {
            end_reason::NOROUTE
        }
        // R5.11: no descriptor or buffer for the stream.
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            end_reason::RESOURCELIMIT
        }
        // R5.12: any other failure.
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

/// Resolves `name` by `deadline` (R5.9: the lookup counts against the
/// connect timeout): on a thread of its own (`getaddrinfo` blocks, and
/// for as long as the system's resolver settings say), one of at most
/// `limits::MAX_LOOKUPS` in flight. The error is the END reason: TIMEOUT
/// when no answer (or no lookup slot) came in time, else RESOLVEFAILED. A
/// lookup still running is left in `lookup` for the caller to join.
fn resolve_until(
    name: &str,
    ctx: &Ctx,
    deadline: Instant,
    stream: &str,
    lookup: &mut Option<JoinHandle<()>>,
) -> Result<Vec<IpAddr>, u8> {
    if special_use_invalid(name) {
        return Err(end_reason::RESOLVEFAILED);
    }
    let Some(permit) = ctx.lookups.acquire_until(deadline) else {
        tracing::debug!(stream, "no lookup slot free before the connect timeout");
        return Err(end_reason::TIMEOUT);
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let owned = name.to_owned();
    let thread = threads::spawn(format!("dns {stream}"), move || {
        let _permit = permit;
        let _ = tx.send(resolve(&owned));
    })
    .map_err(|_| end_reason::RESOURCELIMIT)?;
    match rx.recv_deadline(deadline) {
        Ok(result) => {
            threads::join(thread);
            result
        }
        Err(_) => {
            tracing::debug!(
                stream,
                name,
                "no answer from the resolver before the connect timeout"
            );
            *lookup = Some(thread);
            Err(end_reason::TIMEOUT)
        }
    }
}

/// Resolves a hostname; the error is the END reason (R5.7: RESOLVEFAILED).
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

/// RESOLVED answers for a RESOLVE (R5.17): the addresses, 0xF1 when the
/// name does not exist, 0xF0 when the lookup failed otherwise (R5.19).
pub fn resolve_answers(name: &str) -> Vec<Answer> {
    if special_use_invalid(name) {
        return vec![Answer::NontransientError];
    }
    answers_for(dns_lookup::lookup_host(name))
}

/// The answers for the outcome of a lookup: its addresses, or the error
/// answer that fits the failure (R5.19).
fn answers_for(
    lookup: Result<impl Iterator<Item = IpAddr>, dns_lookup::LookupError>,
) -> Vec<Answer> {
    use dns_lookup::LookupErrorKind;
    match lookup {
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
            // R5.19: the name does not exist: one 0xF1 answer.
            LookupErrorKind::NoName | LookupErrorKind::NoData => vec![Answer::NontransientError],
            // R5.19: any other failure (a timeout, a server failure): 0xF0.
            _ => vec![Answer::TransientError],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_fail_without_a_lookup() {
        // R5.7 (RESOLVEFAILED) and R5.19 (0xF1) for names that cannot
        // exist: RFC 6761 §6.4; no name server is asked (tests stay on
        // loopback).
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
        // The table of §5: R5.8 refused → CONNECTREFUSED, R5.9 no answer
        // before the timeout → TIMEOUT, R5.10 unreachable → NOROUTE, R5.11
        // no descriptor → RESOURCELIMIT, R5.12 anything else → MISC.
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
    fn lookup_failures_are_answered_f1_for_no_such_name_and_f0_otherwise() {
        // R5.19: a name that does not exist gets one 0xF1 answer; a timeout,
        // a server failure or any other failure gets one 0xF0 answer;
        // addresses are answered as such.
        use dns_lookup::LookupError;
        let failed = |code| answers_for(Err::<std::iter::Empty<IpAddr>, _>(LookupError::new(code)));
        assert_eq!(failed(libc::EAI_NONAME), vec![Answer::NontransientError]);
        assert_eq!(failed(libc::EAI_NODATA), vec![Answer::NontransientError]);
        for code in [libc::EAI_AGAIN, libc::EAI_FAIL, libc::EAI_MEMORY] {
            assert_eq!(failed(code), vec![Answer::TransientError], "{code}");
        }
        let found = ["127.0.0.1", "::1", "127.0.0.1"].map(|a| a.parse::<IpAddr>().unwrap());
        assert_eq!(
            answers_for(Ok::<_, LookupError>(found.into_iter())),
            vec![
                Answer::Ip("127.0.0.1".parse().unwrap()),
                Answer::Ip("::1".parse().unwrap())
            ]
        );
        assert_eq!(
            answers_for(Ok::<_, LookupError>(std::iter::empty())),
            vec![Answer::NontransientError]
        );
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(canonical(mapped), "127.0.0.1".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
