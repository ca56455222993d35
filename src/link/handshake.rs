//! The VERSIONS handshake that opens a link (docs/protocol.md §1), on the
//! TCP connection itself or, on a TLS link, inside TLS once its handshake is
//! done (§13, R13.3).
//!
//! R1.11: VERSIONS is the only handshake cell either side sends: no CERTS,
//! AUTH_CHALLENGE or NETINFO; the next cell is a circuit's.

use halfpipe_proto::cell;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The bytes of the handshake: the socket, or a TLS session over it. The
/// socket's timeouts bound each read.
pub trait HandshakeIo: Read + Write {}
impl<T: Read + Write> HandshakeIo for T {}

/// The exit's side of the handshake: R1.2, read the client's VERSIONS
/// before `deadline` (R1.6, counted from the accept), and only then answer
/// with ours.
pub fn accept_handshake(
    io: &mut dyn HandshakeIo,
    tcp: &TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), HandshakeFailure> {
    let offered = read_versions(io, tcp, deadline, timeout)?;
    // R1.3: no common version closes the link; R1.7: an exit that closes
    // for any of R1.3 to R1.6 has sent no VERSIONS (it answers only here).
    cell::negotiate(&offered)?;
    let mut out = Vec::new();
    cell::encode_versions(&mut out, &[cell::LINK_VERSION]);
    io.write_all(&out)?;
    io.flush()?;
    tcp.set_read_timeout(None)?;
    Ok(())
}

/// The client's side of the handshake: send VERSIONS, read the answer.
pub fn connect_handshake(
    io: &mut dyn HandshakeIo,
    tcp: &TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), HandshakeFailure> {
    // R1.1: the link begins with VERSIONS listing 4 only: 00 00 07 00 02 00 04.
    let mut out = Vec::new();
    cell::encode_versions(&mut out, &[cell::LINK_VERSION]);
    io.write_all(&out)?;
    io.flush()?;
    let offered = read_versions(io, tcp, deadline, timeout)?;
    // R1.3: adopt 4 if the exit lists it; otherwise the link is closed.
    cell::negotiate(&offered)?;
    tcp.set_read_timeout(None)?;
    Ok(())
}

/// Why a link handshake failed; closes only that link (R1.8).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("{0}")]
    Protocol(#[from] cell::HandshakeError),
    #[error("a TLS ClientHello on a plain link: both edges need the same --link")]
    TlsPeer,
    #[error("{0}")]
    Tls(#[from] super::tls::TlsFailure),
    #[error("no complete VERSIONS within {0:?}")]
    Timeout(Duration),
    #[error("connection closed during the handshake")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads exactly the peer's VERSIONS cell (byte-exact, so that no cell after
/// it is consumed) before `deadline`.
fn read_versions(
    io: &mut dyn HandshakeIo,
    tcp: &TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u16>, HandshakeFailure> {
    // R1.6: one deadline for the whole cell; bytes that trickle in do not
    // extend it. R1.4 and R1.5 are `decode_versions`'s errors.
    let mut buf = Vec::with_capacity(16);
    loop {
        match cell::decode_versions(&buf) {
            Ok(Some((versions, used))) => {
                debug_assert_eq!(used, buf.len());
                return Ok(versions);
            }
            Ok(None) => {}
            // A TLS handshake record (content type 22, version 3.x).
            Err(_) if buf.starts_with(&[0x16, 0x03]) => return Err(HandshakeFailure::TlsPeer),
            Err(e) => return Err(e.into()),
        }
        // Ask only for what the VERSIONS cell still needs.
        let need = if buf.len() < cell::VERSIONS_HEADER_LEN {
            cell::VERSIONS_HEADER_LEN - buf.len()
        } else {
            cell::VERSIONS_HEADER_LEN + u16::from_be_bytes([buf[3], buf[4]]) as usize - buf.len()
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeFailure::Timeout(timeout));
        }
        tcp.set_read_timeout(Some(left))?;
        let mut chunk = vec![0u8; need];
        match io.read(&mut chunk) {
            Ok(0) => return Err(HandshakeFailure::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HandshakeFailure::Timeout(timeout))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The TLS configuration a link is made with (`None`: a plain link).
#[derive(Clone)]
pub enum TlsConfig {
    /// The exit's configuration, and the clients it serves (R13.7), which
    /// SIGHUP may change between a client's handshake and its link's start.
    Exit {
        config: std::sync::Arc<rustls::ServerConfig>,
        clients: Option<super::tls::ClientList>,
    },
    Client(std::sync::Arc<rustls::ClientConfig>),
}

/// Opens a link on a connection just accepted or connected: the TLS
/// handshake if `tls` says so (§13), then VERSIONS (§1), all within
/// `timeout` from now (R1.6, R13.3). Returns what carries the link.
pub fn establish(
    tcp: TcpStream,
    role: halfpipe_proto::Role,
    tls: Option<&TlsConfig>,
    timeout: Duration,
) -> Result<super::Transport, HandshakeFailure> {
    use halfpipe_proto::Role;
    let deadline = Instant::now() + timeout;
    let Some(tls) = tls else {
        let mut io = &tcp;
        match role {
            Role::Exit => accept_handshake(&mut io, &tcp, deadline, timeout)?,
            Role::Client => connect_handshake(&mut io, &tcp, deadline, timeout)?,
        }
        return Ok(super::Transport::plain(tcp));
    };
    let mut session = super::tls::handshake(&tcp, tls, deadline, timeout)?;
    {
        let mut io = super::tls::HandshakeStream {
            tcp: &tcp,
            session: &mut session,
            deadline,
        };
        let versions = match role {
            Role::Exit => accept_handshake(&mut io, &tcp, deadline, timeout),
            Role::Client => connect_handshake(&mut io, &tcp, deadline, timeout),
        };
        // In TLS 1.3 the exit checks the client's certificate after the
        // client's handshake is done: its refusal (R13.7) arrives as an
        // alert where the client reads VERSIONS.
        versions.map_err(|e| match e {
            HandshakeFailure::Io(io) => match io.get_ref().and_then(|e| e.downcast_ref()) {
                Some(tls) => super::tls::TlsFailure::from_rustls(
                    rustls::Error::clone(tls),
                    role == Role::Exit,
                )
                .into(),
                None => HandshakeFailure::Io(io),
            },
            other => other,
        })?;
    }
    tcp.set_write_timeout(None)?;
    Ok(super::Transport::tls(tcp, session))
}
