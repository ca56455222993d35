//! What carries a link's bytes: its TCP connection alone (a plain link,
//! docs/protocol.md §1), or a TLS session over it (§13).
//!
//! A TLS session's two directions are independent once its handshake is
//! done (`record`): the link reader takes the half that opens the peer's
//! records, the link writer the half that seals its own, and neither
//! shares a lock with the other on the way.

use super::record::{Opener, Sealer};
use super::tls::{Session, TlsInfo};
use parking_lot::Mutex;
use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, TcpStream};

pub struct Transport {
    pub tcp: TcpStream,
    tls: Option<Tls>,
}

struct Tls {
    /// Each taken once, by the thread that uses it.
    opener: Mutex<Option<Opener>>,
    sealer: Mutex<Option<Sealer>>,
    info: TlsInfo,
}

/// The link reader's own state: on a TLS link, the opening half.
pub struct ReadState(Option<Opener>);

/// The link writer's own state: on a TLS link, the sealing half.
pub struct WriteState(Option<Sealer>);

/// What one `read` brought: on a plain link, `end` is the peer's FIN and
/// `wants_write` is never set.
pub use super::record::Opened as Read;

fn fatal(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn taken() -> io::Error {
    io::Error::other("a TLS link's half is taken by one thread only")
}

impl Transport {
    pub fn plain(tcp: TcpStream) -> Transport {
        Transport { tcp, tls: None }
    }

    /// A TLS session whose handshake is done.
    pub fn tls(tcp: TcpStream, session: Session) -> Transport {
        Transport {
            tcp,
            tls: Some(Tls {
                opener: Mutex::new(Some(session.opener)),
                sealer: Mutex::new(Some(session.sealer)),
                info: session.info,
            }),
        }
    }

    pub fn tls_info(&self) -> Option<&TlsInfo> {
        self.tls.as_ref().map(|t| &t.info)
    }

    /// For the link reader, once.
    pub fn read_state(&self) -> ReadState {
        ReadState(self.tls.as_ref().and_then(|t| t.opener.lock().take()))
    }

    /// For the link writer, once.
    pub fn write_state(&self) -> WriteState {
        WriteState(self.tls.as_ref().and_then(|t| t.sealer.lock().take()))
    }

    /// The reader: appends what the peer sent to `buf`, at most up to its
    /// capacity (which must not be full).
    pub fn read(&self, buf: &mut Vec<u8>, st: &mut ReadState) -> io::Result<Read> {
        if self.tls.is_some() {
            return st.0.as_mut().ok_or_else(taken)?.read(&self.tcp, buf);
        }
        let spare = buf.spare_capacity_mut();
        let n = loop {
            match socket2::SockRef::from(&self.tcp).recv(spare) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        // SAFETY: recv() initialised the first `n` bytes of the spare
        // capacity (socket2's contract for `recv` into MaybeUninit).
        unsafe { buf.set_len(buf.len() + n) };
        Ok(Read {
            n,
            end: n == 0,
            wants_write: false,
        })
    }

    /// The writer: writes every buffer, in order.
    pub fn write(&self, bufs: &[Vec<u8>], st: &mut WriteState) -> io::Result<()> {
        if self.tls.is_none() {
            return write_all_vectored(&self.tcp, bufs);
        }
        let sealer = st.0.as_mut().ok_or_else(taken)?;
        sealer.seal(bufs).map_err(fatal)?;
        sealer.write_to(&self.tcp)
    }

    /// The writer: sends our key update if the peer asked for it.
    pub fn flush(&self, st: &mut WriteState) -> io::Result<()> {
        if let Some(sealer) = st.0.as_mut() {
            sealer.answer_key_update().map_err(fatal)?;
            sealer.write_to(&self.tcp)?;
        }
        Ok(())
    }

    /// The writer, once everything queued is written: shuts the socket
    /// `how`, after a close_notify on a TLS link (R13.10).
    pub fn close(&self, how: Shutdown, st: &mut WriteState) -> io::Result<()> {
        if let Some(sealer) = st.0.as_mut() {
            sealer.seal_close_notify().map_err(fatal)?;
            sealer.write_to(&self.tcp)?;
        }
        self.tcp.shutdown(how)
    }

    /// From any thread: ends the connection at once (the reader wakes).
    pub fn shutdown(&self) {
        let _ = self.tcp.shutdown(Shutdown::Both);
    }
}

pub(super) fn write_all_vectored(mut sock: &TcpStream, bufs: &[Vec<u8>]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| IoSlice::new(b))
        .collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match sock.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
