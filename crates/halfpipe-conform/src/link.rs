//! The kit's side of a link: a client edge driven by hand, cell by cell,
//! that writes down every cell it sends and receives (the case's trace).

use crate::case::{fail, CaseError};
use halfpipe_proto::cell::{self, cmd};
use halfpipe_proto::relay::{self, relay_cmd};
use sha1::{Digest, Sha1};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the kit waits for an answer the protocol says must come.
pub const ANSWER: Duration = Duration::from_secs(5);
/// How long the kit watches for something that must not come. A quiet
/// check can only miss a fault, never fail a correct implementation.
pub const QUIET: Duration = Duration::from_millis(300);
/// How long a write may wait for the implementation to read: past it, the
/// case fails (it has stopped reading).
pub const STALLED: Duration = Duration::from_secs(10);

/// The case's record of cells, shared with the runner.
#[derive(Clone, Default)]
pub struct Trace(Arc<Mutex<Vec<String>>>);

impl Trace {
    pub fn note(&self, line: String) {
        if let Ok(mut t) = self.0.lock() {
            t.push(line);
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// A cell as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub circ: u32,
    pub command: u8,
    pub payload: Vec<u8>,
}

impl Cell {
    /// The relay header, if this is a well-formed RELAY or RELAY_EARLY
    /// cell: (command, stream, data).
    pub fn relay(&self) -> Option<(u8, u16, &[u8])> {
        if self.command != cmd::RELAY && self.command != cmd::RELAY_EARLY {
            return None;
        }
        let rc = relay::decode(&self.payload).ok()?;
        Some((rc.command, rc.stream_id, rc.body))
    }

    pub fn is_relay(&self, circ: u32, command: u8, stream: u16) -> bool {
        self.circ == circ && matches!(self.relay(), Some((c, s, _)) if c == command && s == stream)
    }

    pub fn is_destroy(&self, circ: u32) -> bool {
        self.circ == circ && self.command == cmd::DESTROY
    }
}

/// PADDING, VPADDING and the other cells a receiver ignores (R1.10, R2.2,
/// R2.6): never an answer to anything.
pub fn is_padding(c: &Cell) -> bool {
    let known = matches!(
        c.command,
        cmd::CREATE
            | cmd::RELAY
            | cmd::DESTROY
            | cmd::CREATE_FAST
            | cmd::CREATED_FAST
            | cmd::VERSIONS
            | cmd::RELAY_EARLY
            | cmd::CREATE2
    );
    c.command == cmd::PADDING || c.command >= 128 || !known
}

/// One line about a cell, for traces and failures.
pub fn describe(c: &Cell) -> String {
    match c.command {
        cmd::RELAY | cmd::RELAY_EARLY => match relay::decode(&c.payload) {
            Ok(rc) => format!(
                "RELAY {}({}) circ {:#x} stream {} len {}{}",
                relay_cmd::name(rc.command),
                rc.command,
                c.circ,
                rc.stream_id,
                rc.body.len(),
                match rc.command {
                    relay_cmd::END => format!(
                        " reason {}",
                        relay::end_reason::name(rc.body.first().copied().unwrap_or(0))
                    ),
                    _ => String::new(),
                }
            ),
            Err(e) => format!("RELAY (undecodable: {e}) circ {:#x}", c.circ),
        },
        cmd::DESTROY => format!(
            "DESTROY({}) circ {:#x}",
            cell::destroy_reason::name(c.payload.first().copied().unwrap_or(0)),
            c.circ
        ),
        cmd::VERSIONS => format!("VERSIONS {:02x?}", c.payload),
        cmd::CREATED_FAST => format!("CREATED_FAST circ {:#x}", c.circ),
        cmd::CREATE_FAST => format!("CREATE_FAST circ {:#x}", c.circ),
        cmd::PADDING => "PADDING".to_string(),
        other => format!(
            "cell command {other} circ {:#x} len {}",
            c.circ,
            c.payload.len()
        ),
    }
}

/// KDF-TOR(X | Y) cut to 20 bytes (R3.3): SHA-1 of X | Y | 0x00.
pub fn key_hash(x: &[u8; 20], y: &[u8]) -> [u8; 20] {
    let mut h = Sha1::new();
    h.update(x);
    h.update(y);
    h.update([0u8]);
    h.finalize().into()
}

pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS's random numbers");
    b
}

/// What reading the link brought.
#[derive(Debug)]
pub enum Got {
    Cell(Cell),
    /// Nothing within the wait.
    Nothing,
    /// The implementation closed the link (FIN), or reset it.
    Closed(String),
}

pub struct RawLink {
    sock: TcpStream,
    /// A TLS session over `sock` (§13), or none on a plain link.
    tls: Option<rustls::Connection>,
    buf: Vec<u8>,
    since: Instant,
    trace: Trace,
}

impl RawLink {
    /// A TCP connection to `addr`, before any handshake.
    pub fn connect(addr: SocketAddr, trace: &Trace) -> Result<RawLink, CaseError> {
        let sock = TcpStream::connect_timeout(&addr, ANSWER)
            .map_err(|e| fail("a TCP connection to the exit", e.to_string()))?;
        let _ = sock.set_nodelay(true);
        // An implementation that stops reading fails the case, never hangs it.
        let _ = sock.set_write_timeout(Some(STALLED));
        trace.note(format!("connected to {addr}"));
        Ok(RawLink {
            sock,
            tls: None,
            buf: Vec::new(),
            since: Instant::now(),
            trace: trace.clone(),
        })
    }

    /// The next connection on `listener` (non-blocking) within `wait`: a
    /// client under test linking to the kit as its exit.
    pub fn accept(
        listener: &std::net::TcpListener,
        wait: Duration,
        trace: &Trace,
    ) -> Result<RawLink, CaseError> {
        let (sock, peer) = crate::targets::accept_within(
            &[listener],
            wait,
            |_| false,
            "the client to link to the kit's exit",
        )?;
        let _ = sock.set_nodelay(true);
        trace.note(format!("link from {peer}"));
        Ok(RawLink {
            sock,
            tls: None,
            buf: Vec::new(),
            since: Instant::now(),
            trace: trace.clone(),
        })
    }

    /// The exit's side of the handshake: the client's VERSIONS must be
    /// exactly R1.1's seven bytes; ours answers it.
    pub fn accept_handshake(&mut self) -> Result<(), CaseError> {
        let versions = self.recv_versions()?;
        if versions != [4] {
            return Err(fail(
                "VERSIONS listing exactly version 4: 00 00 07 00 02 00 04 (R1.1)",
                format!("VERSIONS {versions:?}"),
            ));
        }
        self.send_raw(&VERSIONS_4, "VERSIONS [4]")
    }

    /// Answers a CREATE_FAST with Y and KH (R3.3), or a wrong KH.
    pub fn answer_create_fast(&mut self, c: &Cell, right_kh: bool) -> Result<(), CaseError> {
        let x: [u8; 20] = c.payload[..20].try_into().expect("20 bytes");
        let y: [u8; 20] = random();
        let mut kh = key_hash(&x, &y);
        if !right_kh {
            kh[0] ^= 0xFF;
        }
        let mut payload = y.to_vec();
        payload.extend_from_slice(&kh);
        self.send_cell(c.circ, cmd::CREATED_FAST, &payload)
    }

    fn note(&self, dir: &str, what: String) {
        self.trace.note(format!(
            "{:>8.3}s {dir} {what}",
            self.since.elapsed().as_secs_f64()
        ));
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8], what: &str) -> Result<(), CaseError> {
        self.note("->", what.to_string());
        self.write_bytes(bytes)
            .map_err(|e| fail(format!("to send {what}"), e.to_string()))
    }

    pub fn send_cell(&mut self, circ: u32, command: u8, payload: &[u8]) -> Result<(), CaseError> {
        let mut out = Vec::new();
        if cell::is_var_cmd(command) {
            cell::encode_var(&mut out, circ, command, payload);
        } else {
            cell::encode_fixed(&mut out, circ, command, payload);
        }
        let mut shown = payload.to_vec();
        if !cell::is_var_cmd(command) {
            shown.resize(cell::PAYLOAD_LEN, 0);
        }
        let what = describe(&Cell {
            circ,
            command,
            payload: shown,
        });
        self.send_raw(&out, &what)
    }

    /// `send_relay` without a trace line: for the thousands of cells of a
    /// bulk send, or of a case that answers each of them.
    pub fn send_relay_quiet(
        &mut self,
        circ: u32,
        command: u8,
        stream: u16,
        body: &[u8],
    ) -> Result<(), CaseError> {
        let mut out = Vec::with_capacity(cell::CELL_LEN);
        relay::encode(&mut out, circ, command, stream, body);
        self.write_bytes(&out).map_err(|e| {
            fail(
                format!("to send RELAY {}", relay_cmd::name(command)),
                e.to_string(),
            )
        })
    }

    pub fn send_relay(
        &mut self,
        circ: u32,
        command: u8,
        stream: u16,
        body: &[u8],
    ) -> Result<(), CaseError> {
        self.note(
            "->",
            format!(
                "RELAY {}({command}) circ {circ:#x} stream {stream} len {}",
                relay_cmd::name(command),
                body.len()
            ),
        );
        self.send_relay_quiet(circ, command, stream, body)
    }

    /// The next cell within `wait`.
    pub fn recv(&mut self, wait: Duration) -> Got {
        let deadline = Instant::now() + wait;
        loop {
            if let Some((c, used)) = cell::decode(&self.buf) {
                let c = Cell {
                    circ: c.circ_id,
                    command: c.command,
                    payload: c.payload.to_vec(),
                };
                self.buf.drain(..used);
                self.note("<-", describe(&c));
                return Got::Cell(c);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Nothing;
            }
            let _ = self.sock.set_read_timeout(Some(left));
            let mut chunk = [0u8; 16 * 1024];
            match self.read_some(&mut chunk) {
                Ok(0) => {
                    self.note("<-", "FIN".into());
                    return Got::Closed("end of file".into());
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.note("<-", format!("error: {e}"));
                    return Got::Closed(e.to_string());
                }
            }
        }
    }

    /// The next cell that `want` accepts, skipping PADDING and those `skip`
    /// accepts (SENDMEs, say); anything else is a failure.
    pub fn expect(
        &mut self,
        what: &str,
        want: impl Fn(&Cell) -> bool,
        skip: impl Fn(&Cell) -> bool,
    ) -> Result<Cell, CaseError> {
        self.expect_within(what, ANSWER, want, skip)
    }

    /// `expect`, waiting up to `wait` (for answers that take long: a
    /// connect timeout, a shutdown deadline).
    pub fn expect_within(
        &mut self,
        what: &str,
        wait: Duration,
        want: impl Fn(&Cell) -> bool,
        skip: impl Fn(&Cell) -> bool,
    ) -> Result<Cell, CaseError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Got::Cell(c) if want(&c) => return Ok(c),
                Got::Cell(c) if is_padding(&c) || skip(&c) => {}
                Got::Cell(c) => return Err(fail(what, describe(&c))),
                Got::Nothing => return Err(fail(what, format!("nothing within {wait:?}"))),
                Got::Closed(why) => return Err(fail(what, format!("the link closed ({why})"))),
            }
        }
    }

    /// Cells within `wait`, skipping PADDING; stops early if the link closes.
    pub fn collect(&mut self, wait: Duration) -> (Vec<Cell>, Option<String>) {
        let deadline = Instant::now() + wait;
        let mut cells = Vec::new();
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Got::Cell(c) if is_padding(&c) => {}
                Got::Cell(c) => cells.push(c),
                Got::Nothing => return (cells, None),
                Got::Closed(why) => return (cells, Some(why)),
            }
        }
    }

    /// Bytes (not cells: no framing is agreed before the handshake) that
    /// arrive within `wait`, and why the connection ended if it did.
    pub fn raw_within(&mut self, wait: Duration) -> (Vec<u8>, Option<String>) {
        let deadline = Instant::now() + wait;
        let mut got = std::mem::take(&mut self.buf);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (got, None);
            }
            let _ = self.sock.set_read_timeout(Some(left));
            let mut chunk = [0u8; 4096];
            match self.read_some(&mut chunk) {
                Ok(0) => return (got, Some("end of file".into())),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (got, Some(e.to_string())),
            }
        }
    }

    /// The peer's VERSIONS cell, framed as §1 says (a 2-byte CircID before
    /// the link version is known): its versions, or the failure.
    pub fn recv_versions(&mut self) -> Result<Vec<u16>, CaseError> {
        let what = "VERSIONS listing 4 (R1.2)";
        let deadline = Instant::now() + ANSWER;
        loop {
            if self.buf.len() >= 5 {
                if self.buf[..3] != [0, 0, cmd::VERSIONS] {
                    return Err(fail(what, format!("bytes {:02x?}", &self.buf[..5])));
                }
                let len = u16::from_be_bytes([self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() >= 5 + len {
                    let body: Vec<u8> = self.buf.drain(..5 + len).skip(5).collect();
                    self.note("<-", format!("VERSIONS {body:02x?}"));
                    return Ok(body
                        .chunks_exact(2)
                        .map(|v| u16::from_be_bytes([v[0], v[1]]))
                        .collect());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(fail(
                    what,
                    format!("{} bytes within {ANSWER:?}", self.buf.len()),
                ));
            }
            let _ = self.sock.set_read_timeout(Some(left));
            let mut chunk = [0u8; 1024];
            match self.read_some(&mut chunk) {
                Ok(0) => return Err(fail(what, "the link closed")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(what, e.to_string())),
            }
        }
    }

    /// Our side of the VERSIONS handshake (R1.1), and the exit's answer.
    pub fn handshake(&mut self) -> Result<(), CaseError> {
        self.send_raw(&VERSIONS_4, "VERSIONS [4]")?;
        let versions = self.recv_versions()?;
        if !versions.contains(&4) {
            return Err(fail(
                "VERSIONS listing 4 (R1.2)",
                format!("VERSIONS {versions:?}"),
            ));
        }
        Ok(())
    }

    /// CREATE_FAST on `circ`, and a CREATED_FAST whose KH is right (R3.3).
    /// `offer` goes after X (flow control version 2's, §14).
    pub fn create_circuit_with(&mut self, circ: u32, offer: &[u8]) -> Result<Vec<u8>, CaseError> {
        let x: [u8; 20] = random();
        let mut payload = x.to_vec();
        payload.extend_from_slice(offer);
        self.send_cell(circ, cmd::CREATE_FAST, &payload)?;
        let c = self.expect(
            "CREATED_FAST on the CircID of the CREATE_FAST (R3.3)",
            |c| c.circ == circ && c.command == cmd::CREATED_FAST,
            |_| false,
        )?;
        let (y, kh) = (&c.payload[..20], &c.payload[20..40]);
        if kh != key_hash(&x, y) {
            return Err(fail(
                "KH = KDF-TOR(X | Y), first 20 bytes (R3.3)",
                format!("KH {kh:02x?}"),
            ));
        }
        Ok(c.payload)
    }

    pub fn create_circuit(&mut self, circ: u32) -> Result<(), CaseError> {
        self.create_circuit_with(circ, &[]).map(|_| ())
    }

    pub fn shutdown_write(&mut self) {
        self.note("->", "FIN".into());
        let _ = self.sock.shutdown(Shutdown::Write);
    }

    /// TLS: a close_notify, then FIN (R13.10).
    pub fn close_notify(&mut self) {
        if let Some(c) = &mut self.tls {
            c.send_close_notify();
            while c.wants_write() {
                if c.write_tls(&mut self.sock).is_err() {
                    break;
                }
            }
        }
        self.note("->", "close_notify".into());
        self.shutdown_write();
    }

    /// TLS: `bytes` sealed into a record with one bit of its ciphertext
    /// flipped, as a tampering path would (R13.9).
    pub fn send_tampered(&mut self, bytes: &[u8]) -> Result<(), CaseError> {
        let Some(c) = &mut self.tls else {
            return Err(fail("a TLS link", "a plain one"));
        };
        c.writer()
            .write_all(bytes)
            .map_err(|e| fail("to seal a record", e.to_string()))?;
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire)
                .map_err(|e| fail("to seal a record", e.to_string()))?;
        }
        let at = wire.len() / 2;
        wire[at] ^= 0x08;
        self.note(
            "->",
            format!("a record of {} bytes with a bit flipped", wire.len()),
        );
        self.sock
            .write_all(&wire)
            .map_err(|e| fail("to send the record", e.to_string()))
    }

    /// A TLS handshake on a link just connected or accepted, within
    /// `ANSWER`; the error is rustls's (or the socket's) message.
    fn tls_handshake(&mut self, mut conn: rustls::Connection) -> Result<(), String> {
        let _ = self.sock.set_read_timeout(Some(ANSWER));
        let deadline = Instant::now() + ANSWER;
        while conn.is_handshaking() {
            if Instant::now() > deadline {
                return Err(format!("no TLS handshake within {ANSWER:?}"));
            }
            match conn.complete_io(&mut self.sock) {
                Ok((0, 0)) if conn.is_handshaking() => return Err("end of file".into()),
                Ok(_) => {}
                Err(e) => {
                    // Tell the peer why, as rustls has queued it.
                    let _ = conn.write_tls(&mut self.sock);
                    return Err(e.to_string());
                }
            }
        }
        // The last flight (the client's Finished).
        while conn.wants_write() {
            conn.write_tls(&mut self.sock).map_err(|e| e.to_string())?;
        }
        self.note(
            "==",
            format!(
                "TLS {:?} {:?} ALPN {:?}",
                conn.protocol_version(),
                conn.negotiated_cipher_suite().map(|s| s.suite()),
                conn.alpn_protocol().map(String::from_utf8_lossy)
            ),
        );
        self.tls = Some(conn);
        Ok(())
    }

    /// A TLS client link to `addr`: `Err` carries why the handshake failed.
    pub fn connect_tls(
        addr: SocketAddr,
        config: std::sync::Arc<rustls::ClientConfig>,
        trace: &Trace,
    ) -> Result<Result<RawLink, String>, CaseError> {
        let mut l = RawLink::connect(addr, trace)?;
        let conn = rustls::ClientConnection::new(config, addr.ip().into())
            .map_err(|e| fail("a TLS client", e.to_string()))?;
        Ok(l.tls_handshake(conn.into()).map(|()| l))
    }

    /// A TLS link accepted on `listener`, handshake done as the exit.
    pub fn accept_tls(
        listener: &std::net::TcpListener,
        wait: Duration,
        config: std::sync::Arc<rustls::ServerConfig>,
        trace: &Trace,
    ) -> Result<Result<RawLink, String>, CaseError> {
        let mut l = RawLink::accept(listener, wait, trace)?;
        let conn = rustls::ServerConnection::new(config)
            .map_err(|e| fail("a TLS server", e.to_string()))?;
        Ok(l.tls_handshake(conn.into()).map(|()| l))
    }

    /// Writes `bytes` on the link: as TLS records on a TLS link.
    fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            None => self.sock.write_all(bytes),
            Some(c) => {
                c.writer().write_all(bytes)?;
                while c.wants_write() {
                    c.write_tls(&mut self.sock)?;
                }
                Ok(())
            }
        }
    }

    /// One read from the link, within the socket's read timeout: 0 is the
    /// end (close_notify on a TLS link; a FIN without it is an error).
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(c) = &mut self.tls else {
            return self.sock.read(buf);
        };
        let mut eof = false;
        loop {
            match c.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !eof => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "end of file without close_notify",
                    ))
                }
                Err(e) => return Err(e),
            }
            eof = c.read_tls(&mut self.sock)? == 0;
            c.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

/// R1.1: the client's VERSIONS cell.
pub const VERSIONS_4: [u8; 7] = [0, 0, 7, 0, 2, 0, 4];
