//! What carries a link's bytes: its TCP connection alone (a plain link,
//! docs/protocol.md §1), or a TLS session over it (§13).
//!
//! A TLS session is one state shared by the link reader and the link writer
//! (`link-rd N`, `link-wr N`), so it sits behind a lock; neither thread
//! holds that lock while it waits on the socket. The reader reads TLS
//! records from the socket, then takes the lock to decrypt them; the writer
//! takes the lock to encrypt its cells, then writes the records out.

use super::tls::TlsInfo;
use parking_lot::Mutex;
use std::io::{self, BufRead, IoSlice, Write};
use std::net::{Shutdown, TcpStream};

/// Ciphertext the reader asks the socket for at a time: as much as a plain
/// link's reader asks for, so that a busy TLS link also hands its circuits
/// large, well-filled buffers.
const CIPHER_READ: usize = 256 * 1024;

pub struct Transport {
    pub tcp: TcpStream,
    tls: Option<Tls>,
}

struct Tls {
    conn: Mutex<rustls::Connection>,
    info: TlsInfo,
}

/// The reader's side of a TLS session: ciphertext read from the socket and
/// not yet handed to rustls.
#[derive(Default)]
pub struct ReadState {
    cipher: Vec<u8>,
    pos: usize,
    /// The socket has said end of file.
    eof: bool,
}

/// What one `read` brought.
pub struct Read {
    /// Plaintext bytes appended (0 at the end of the link).
    pub n: usize,
    /// The TLS session has records to send that the writer must flush (an
    /// answer to the peer's key update, say).
    pub wants_write: bool,
}

impl Transport {
    pub fn plain(tcp: TcpStream) -> Transport {
        Transport { tcp, tls: None }
    }

    /// A TLS session whose handshake is done.
    pub fn tls(tcp: TcpStream, mut conn: rustls::Connection, info: TlsInfo) -> Transport {
        // The writer drains what it encrypts at once: no limit needed, and
        // none may turn a write into a partial one.
        conn.set_buffer_limit(None);
        Transport {
            tcp,
            tls: Some(Tls {
                conn: Mutex::new(conn),
                info,
            }),
        }
    }

    pub fn tls_info(&self) -> Option<&TlsInfo> {
        self.tls.as_ref().map(|t| &t.info)
    }

    /// The reader: appends what the peer sent to `buf`, at most up to its
    /// capacity (which must not be full). Returns 0 at the end of the link:
    /// the peer's FIN on a plain link, its close_notify on a TLS link (a FIN
    /// without one is an error there, R13.10).
    pub fn read(&self, buf: &mut Vec<u8>, st: &mut ReadState) -> io::Result<Read> {
        match &self.tls {
            None => {
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
                    wants_write: false,
                })
            }
            Some(tls) => self.read_tls(tls, buf, st),
        }
    }

    fn read_tls(&self, tls: &Tls, buf: &mut Vec<u8>, st: &mut ReadState) -> io::Result<Read> {
        loop {
            let room = buf.capacity() - buf.len();
            let (n, end, wants_write) = {
                let mut conn = tls.conn.lock();
                let mut n = 0;
                let mut end = false;
                loop {
                    // Plaintext already decrypted first.
                    loop {
                        let mut reader = conn.reader();
                        match reader.fill_buf() {
                            // Empty: the peer's close_notify (R13.10).
                            Ok([]) => {
                                end = true;
                                break;
                            }
                            Ok(chunk) => {
                                let k = chunk.len().min(room - n);
                                if k == 0 {
                                    break;
                                }
                                buf.extend_from_slice(&chunk[..k]);
                                reader.consume(k);
                                n += k;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            // A FIN without close_notify.
                            Err(e) => return Err(e),
                        }
                    }
                    if end || n == room || st.pos == st.cipher.len() {
                        break;
                    }
                    let mut rest = &st.cipher[st.pos..];
                    match conn.read_tls(&mut rest) {
                        Ok(k) => st.pos += k,
                        // rustls's plaintext buffer is full: drain it first.
                        Err(e) if e.kind() == io::ErrorKind::Other && n < room => continue,
                        Err(e) => return Err(e),
                    }
                    // R13.9: a record that fails authentication ends the link,
                    // before any of its bytes is read.
                    conn.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                (n, end, conn.wants_write())
            };
            if n > 0 || end {
                return Ok(Read { n, wants_write });
            }
            if st.eof {
                // The TCP end, and rustls has nothing more to give: a FIN
                // without close_notify (R13.10), or within a record.
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // Everything read is decrypted: read more from the socket,
            // holding no lock.
            st.cipher.clear();
            st.cipher.reserve(CIPHER_READ);
            st.pos = 0;
            let spare = st.cipher.spare_capacity_mut();
            let k = loop {
                match socket2::SockRef::from(&self.tcp).recv(spare) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            // SAFETY: as above.
            unsafe { st.cipher.set_len(k) };
            if k == 0 {
                // The TCP end: rustls says whether close_notify came first.
                st.eof = true;
                tls.conn
                    .lock()
                    .read_tls(&mut &[][..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
        }
    }

    /// The writer: writes every buffer, in order. `out` is the writer's
    /// scratch space for TLS records.
    pub fn write(&self, bufs: &[Vec<u8>], out: &mut Vec<u8>) -> io::Result<()> {
        match &self.tls {
            None => write_all_vectored(&self.tcp, bufs),
            Some(tls) => {
                {
                    let mut conn = tls.conn.lock();
                    for b in bufs {
                        conn.writer().write_all(b)?;
                    }
                    drain(&mut conn, out)?;
                }
                let r = (&self.tcp).write_all(out);
                out.clear();
                r
            }
        }
    }

    /// The writer: sends the records the TLS session has queued on its own
    /// (answers to what the reader processed).
    pub fn flush(&self, out: &mut Vec<u8>) -> io::Result<()> {
        if let Some(tls) = &self.tls {
            drain(&mut tls.conn.lock(), out)?;
            let r = (&self.tcp).write_all(out);
            out.clear();
            r?;
        }
        Ok(())
    }

    /// The writer, once everything queued is written: shuts the socket
    /// `how`, after a close_notify on a TLS link (R13.10).
    pub fn close(&self, how: Shutdown, out: &mut Vec<u8>) -> io::Result<()> {
        if let Some(tls) = &self.tls {
            {
                let mut conn = tls.conn.lock();
                conn.send_close_notify();
                drain(&mut conn, out)?;
            }
            let r = (&self.tcp).write_all(out);
            out.clear();
            r?;
        }
        self.tcp.shutdown(how)
    }

    /// From any thread: ends the connection at once (the reader wakes).
    pub fn shutdown(&self) {
        let _ = self.tcp.shutdown(Shutdown::Both);
    }
}

/// Moves the records the session has ready into `out`.
fn drain(conn: &mut rustls::Connection, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

fn write_all_vectored(mut sock: &TcpStream, bufs: &[Vec<u8>]) -> io::Result<()> {
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
