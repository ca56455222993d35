//! The VERSIONS handshake that opens a link (docs/protocol.md §1).
//!
//! R1.11: this is the whole handshake. Links are plain TCP, with no TLS
//! around them, and VERSIONS is the only handshake cell either side sends:
//! no CERTS, AUTH_CHALLENGE or NETINFO; the next cell is a circuit's.

use halfpipe_proto::cell;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The exit's side of the handshake: R1.2, read the client's VERSIONS
/// within the timeout (R1.6), and only then answer with ours.
pub fn accept_handshake(sock: &TcpStream, timeout: Duration) -> Result<(), HandshakeFailure> {
    let offered = read_versions(sock, timeout)?;
    // R1.3: no common version closes the link; R1.7: an exit that closes
    // for any of R1.3 to R1.6 has sent no VERSIONS (it answers only here).
    cell::negotiate(&offered)?;
    let mut out = Vec::new();
    cell::encode_versions(&mut out, &[cell::LINK_VERSION]);
    (&*sock).write_all(&out)?;
    sock.set_read_timeout(None)?;
    Ok(())
}

/// The client's side of the handshake: send VERSIONS, read the answer.
pub fn connect_handshake(sock: &TcpStream, timeout: Duration) -> Result<(), HandshakeFailure> {
    // R1.1: the link begins with VERSIONS listing 4 only: 00 00 07 00 02 00 04.
    let mut out = Vec::new();
    cell::encode_versions(&mut out, &[cell::LINK_VERSION]);
    (&*sock).write_all(&out)?;
    let offered = read_versions(sock, timeout)?;
    // R1.3: adopt 4 if the exit lists it; otherwise the link is closed.
    cell::negotiate(&offered)?;
    sock.set_read_timeout(None)?;
    Ok(())
}

/// Why a link handshake failed; closes only that link (R1.8).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("{0}")]
    Protocol(#[from] cell::HandshakeError),
    #[error("no complete VERSIONS within {0:?}")]
    Timeout(Duration),
    #[error("connection closed during the handshake")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads exactly the peer's VERSIONS cell (byte-exact, so that no cell after
/// it is consumed) before `timeout` runs out, counted from now.
fn read_versions(mut sock: &TcpStream, timeout: Duration) -> Result<Vec<u16>, HandshakeFailure> {
    // R1.6: one deadline for the whole cell; bytes that trickle in do not
    // extend it. R1.4 and R1.5 are `decode_versions`'s errors.
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(16);
    loop {
        if let Some((versions, used)) = cell::decode_versions(&buf)? {
            debug_assert_eq!(used, buf.len());
            return Ok(versions);
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
        sock.set_read_timeout(Some(left))?;
        let mut chunk = vec![0u8; need];
        match sock.read(&mut chunk) {
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
