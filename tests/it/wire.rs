//! docs/protocol.md on the wire: a hand-driven link peer (`RawLink`)
//! against the real `halfpipe exit` process over loopback. Every test names
//! the requirements of docs/protocol.md it checks.
//!
//! Ordering arguments used below: the exit's link reader hands cells to a
//! circuit thread in arrival order, and that thread answers a malformed
//! BEGIN with END(TORPROTOCOL) at once (§5). So `ping` proves that every
//! cell sent before it was handled, and that the circuit decided on nothing
//! (but SENDMEs) meanwhile: a DESTROY would have come first. Checks that
//! something does *not* happen on its own (a window that must stay shut)
//! watch the link for `QUIET`; they can only miss a bug, never fail a
//! correct exit.

use crate::util::*;
use halfpipe_proto::cell::{self, cmd, destroy_reason};
use halfpipe_proto::relay::{self, end_reason, relay_cmd};
use socket2::{Domain, SockRef, Socket, Type};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a check that nothing more arrives watches the link.
const QUIET: Duration = Duration::from_millis(300);

// ------------------------------------------------------------------ helpers

/// `halfpipe exit` with a policy that lets streams reach loopback targets.
pub(crate) fn open_exit(extra: &[&str]) -> Daemon {
    let mut args = vec!["--exit-policy", "accept *:*"];
    args.extend_from_slice(extra);
    Daemon::exit(&args)
}

/// A stream ID for pings, away from the small IDs tests use for streams.
pub(crate) fn fresh_stream() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(40_000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A good link with one circuit on it.
pub(crate) fn linked(d: &Daemon, circ: u32) -> RawLink {
    let mut l = RawLink::connect(d.link());
    l.create_circuit(circ);
    l
}

/// One line about a cell, for assertion messages.
pub(crate) fn describe(c: &RawCell) -> String {
    match c.command {
        cmd::RELAY => match relay::decode(&c.payload) {
            Ok(rc) => format!(
                "RELAY {} (command {}) on circ {:#x} stream {} with {} bytes {:?}",
                relay_cmd::name(rc.command),
                rc.command,
                c.circ,
                rc.stream_id,
                rc.body.len(),
                &rc.body[..rc.body.len().min(12)]
            ),
            Err(e) => format!("undecodable RELAY on circ {:#x}: {e}", c.circ),
        },
        cmd::DESTROY => format!(
            "DESTROY({}) on circ {:#x}",
            destroy_reason::name(c.payload[0]),
            c.circ
        ),
        other => format!("cell command {other} on circ {:#x}", c.circ),
    }
}

pub(crate) fn is_relay(c: &RawCell, circ: u32, command: u8, stream: u16) -> bool {
    c.circ == circ && matches!(relay_of(c), Some((rc, sid, _)) if rc == command && sid == stream)
}

/// The next cell that is not a SENDME or PADDING.
pub(crate) fn next(l: &mut RawLink) -> RawCell {
    l.recv_non_sendme().expect("the exit closed the link")
}

pub(crate) fn expect_destroy(l: &mut RawLink, circ: u32, reason: u8) {
    let c = next(l);
    assert!(
        c.command == cmd::DESTROY && c.circ == circ && c.payload[0] == reason,
        "expected DESTROY({}) on circ {circ:#x}, got {}",
        destroy_reason::name(reason),
        describe(&c)
    );
}

/// The next non-SENDME cell must be this relay command; returns its body.
pub(crate) fn expect_relay(l: &mut RawLink, circ: u32, command: u8, stream: u16) -> Vec<u8> {
    let c = next(l);
    match relay_of(&c) {
        Some((rc, sid, body)) if c.circ == circ && rc == command && sid == stream => body,
        _ => panic!(
            "expected RELAY {} on circ {circ:#x} stream {stream}, got {}",
            relay_cmd::name(command),
            describe(&c)
        ),
    }
}

pub(crate) fn expect_end(l: &mut RawLink, circ: u32, stream: u16, reason: u8) {
    let body = expect_relay(l, circ, relay_cmd::END, stream);
    assert_eq!(
        body.first().copied(),
        Some(reason),
        "END reason on stream {stream}: expected {}, got {body:?}",
        end_reason::name(reason)
    );
}

/// Proves that circuit `circ` is alive and sent nothing but SENDMEs since
/// the last cell read: a malformed BEGIN gets END(TORPROTOCOL) at once (§5).
pub(crate) fn ping(l: &mut RawLink, circ: u32) {
    let sid = fresh_stream();
    l.send_relay(circ, relay_cmd::BEGIN, sid, b"ping");
    expect_end(l, circ, sid, end_reason::TORPROTOCOL);
}

/// Like `ping`, returning every cell (SENDMEs included) that came first.
fn ping_collect(l: &mut RawLink, circ: u32) -> Vec<RawCell> {
    let sid = fresh_stream();
    l.send_relay(circ, relay_cmd::BEGIN, sid, b"ping");
    let mut seen = Vec::new();
    loop {
        let c = l.recv_cell().expect("the exit closed the link");
        if is_relay(&c, circ, relay_cmd::END, sid) {
            assert_eq!(relay_of(&c).unwrap().2, [end_reason::TORPROTOCOL]);
            return seen;
        }
        seen.push(c);
    }
}

fn count_sendmes(cells: &[RawCell], circ: u32, stream: u16) -> usize {
    cells
        .iter()
        .filter(|c| is_relay(c, circ, relay_cmd::SENDME, stream))
        .count()
}

/// Proves the link is alive and sent nothing first: a new circuit is
/// created (CREATED_FAST must be the next cell), then destroyed by us.
pub(crate) fn link_alive(l: &mut RawLink) {
    let circ = fresh_circ();
    l.create_circuit(circ);
    l.send_cell(circ, cmd::DESTROY, &[destroy_reason::REQUESTED]);
}

/// DATA cells for `data`, in one write.
pub(crate) fn send_data(l: &mut RawLink, circ: u32, stream: u16, data: &[u8]) {
    let mut out = Vec::new();
    for chunk in data.chunks(relay::DATA_MAX) {
        relay::encode(&mut out, circ, relay_cmd::DATA, stream, chunk);
    }
    l.sock.write_all(&out).unwrap();
}

/// Reads DATA for `stream` until `len` bytes came (SENDMEs skipped; any
/// other cell fails the test).
pub(crate) fn recv_data(l: &mut RawLink, circ: u32, stream: u16, len: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < len {
        got.extend(expect_relay(l, circ, relay_cmd::DATA, stream));
    }
    assert_eq!(got.len(), len, "more data than expected on stream {stream}");
    got
}

/// Target servers whose connections the test drives by hand.
pub(crate) struct Targets {
    pub(crate) addr: SocketAddr,
    conns: mpsc::Receiver<TcpStream>,
}

impl Targets {
    pub(crate) fn new() -> Targets {
        Targets::on("127.0.0.1:0")
    }

    fn on(bind: &str) -> Targets {
        let listener = TcpListener::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, conns) = mpsc::channel();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                if tx.send(conn).is_err() {
                    break;
                }
            }
        });
        Targets { addr, conns }
    }

    /// ADDRESS:PORT as BEGIN spells it (IPv6 in brackets).
    pub(crate) fn target(&self) -> String {
        self.addr.to_string()
    }

    /// The next connection the exit made to us.
    pub(crate) fn accept(&self) -> TcpStream {
        let s = self
            .conns
            .recv_timeout(PATIENCE)
            .expect("the exit never connected to the target");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s
    }
}

/// BEGIN to `targets`, CONNECTED back; returns the target's end.
pub(crate) fn open_stream(l: &mut RawLink, circ: u32, stream: u16, targets: &Targets) -> TcpStream {
    l.send_relay(
        circ,
        relay_cmd::BEGIN,
        stream,
        &begin_body(&targets.target()),
    );
    expect_relay(l, circ, relay_cmd::CONNECTED, stream);
    targets.accept()
}

/// A stream on `circ` through the echo server, both ways, closed with
/// FIN both ways (§7): proves the circuit carries streams.
fn echo_works(l: &mut RawLink, circ: u32) {
    let echo = Server::echo();
    let sid = fresh_stream();
    l.send_relay(
        circ,
        relay_cmd::BEGIN,
        sid,
        &begin_body(&echo.addr.to_string()),
    );
    expect_relay(l, circ, relay_cmd::CONNECTED, sid);
    let data = pattern(3000, sid as u8);
    send_data(l, circ, sid, &data);
    l.send_relay(circ, relay_cmd::FIN, sid, &[]);
    assert_eq!(recv_data(l, circ, sid, data.len()), data);
    expect_relay(l, circ, relay_cmd::FIN, sid);
}

pub(crate) fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("target read");
    v
}

/// The target reads on to EOF (a normal close, not a reset).
pub(crate) fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v)
        .expect("target expected EOF, got an error");
    v
}

/// §8: the application sees a reset, not an EOF.
///
/// A target that already read EOF (the exit had shut its write side, R7.4) keeps
/// reading EOF on Linux after a reset arrives (the socket is in
/// CLOSE_WAIT). There the reset shows as POLLHUP/POLLERR and as the socket
/// error (EPIPE); a normal close by the exit shows neither, since the
/// target's side stays in CLOSE_WAIT.
pub(crate) fn expect_reset(s: &mut TcpStream) {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("the target expected a reset, got {e}"),
        }
    }
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: 0, // POLLHUP and POLLERR are always reported
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, PATIENCE.as_millis() as i32) };
    assert_eq!(
        n, 1,
        "the target saw EOF and no reset (its connection is still half-open)"
    );
    let err = s.take_error().unwrap();
    assert!(
        matches!(
            err.as_ref().and_then(io::Error::raw_os_error),
            Some(libc::EPIPE | libc::ECONNRESET)
        ),
        "the target saw EOF, then {err:?} (revents {:#x}), not a reset",
        pfd.revents
    );
}

/// Resets a target connection (SO_LINGER 0, then close).
fn reset(s: TcpStream) {
    SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
}

/// Fails if anything connected to `listener`. A connect completes in the
/// kernel before connect() returns, so a connection the exit made before
/// answering is already queued here.
pub(crate) fn assert_no_connection(listener: &TcpListener) {
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("the exit connected to the target (from {peer})"),
        Err(e) => panic!("accept: {e}"),
    }
}

/// A loopback listener that answers no SYN: listen(0) with its accept
/// queue filled by connections never accepted. Linux drops SYNs to a full
/// accept queue, so a connect to it hangs until its timeout.
struct Unanswering {
    addr: SocketAddr,
    _listener: Socket,
    _fill: Vec<TcpStream>,
}

fn unanswering() -> Unanswering {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fill = vec![TcpStream::connect(addr).unwrap()];
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                return Unanswering {
                    addr,
                    _listener: listener,
                    _fill: fill,
                };
            }
            Ok(s) => fill.push(s),
            Err(e) => panic!("probe connect: {e}"),
        }
    }
    panic!("a listen(0) socket kept accepting SYNs: cannot build a target that never answers");
}

/// Reads until the peer closes the connection; returns what it sent.
pub(crate) fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the exit did not close the connection: {e} (it sent {got:?})"),
        }
    }
}

// ------------------------------------------------------------ §1 handshake

#[test]
fn handshake_versions_answered_with_4_then_cells_flow() {
    // §1's handshake, on a plain link (tls.rs has §13's).
    use_plain_links();
    // R1.2: the exit reads our VERSIONS, then answers with its own listing
    // 4; R1.11: nothing else (no CERTS, AUTH_CHALLENGE or NETINFO, no TLS):
    // the next cell answers our CREATE_FAST; R1.9: in link-v4 framing.
    let d = Daemon::exit(&[]);
    let mut l = RawLink::connect(d.link()); // asserts the answer [0,0,7,0,2,0,4]
    l.create_circuit(fresh_circ());
    // R1.3: the highest version in both lists: offering 3, 4 and 5 still
    // gets exactly 4 back.
    let mut s = TcpStream::connect(d.link()).unwrap();
    let mut v = Vec::new();
    cell::encode_versions(&mut v, &[3, 4, 5]);
    s.write_all(&v).unwrap();
    let mut reply = [0u8; 7];
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply, [0, 0, 7, 0, 2, 0, 4]);
}

/// R1.7: a bad first cell closes the link without a VERSIONS of the exit's
/// own; R1.8: one log line says why, and nothing else is affected.
fn bad_handshake(bytes: &[u8], log_says: &str) {
    let d = Daemon::exit(&[]);
    let mut good = RawLink::connect(d.link());
    let circ = fresh_circ();
    good.create_circuit(circ);
    let mut s = TcpStream::connect(d.link()).unwrap();
    s.write_all(bytes).unwrap();
    let got = read_until_closed(&mut s);
    assert!(
        got.is_empty(),
        "the exit sent {got:?} before closing; §1: close without sending VERSIONS"
    );
    d.wait_for_log("link handshake failed");
    d.wait_for_log(log_says);
    // Nothing else is affected: the link opened before still works, and a
    // new one does too.
    ping(&mut good, circ);
    link_alive(&mut good);
    let mut fresh = RawLink::connect(d.link());
    fresh.create_circuit(fresh_circ());
}

#[test]
fn handshake_garbage_first_cell_closes_link() {
    // §1's handshake, on a plain link (tls.rs has §13's).
    use_plain_links();
    // R1.5: a first cell that is not VERSIONS → closed; R1.7, R1.8.
    bad_handshake(
        &[0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04],
        "first cell is not VERSIONS",
    );
}

#[test]
fn handshake_http_request_closes_link() {
    // §1's handshake, on a plain link (tls.rs has §13's).
    use_plain_links();
    // R1.5: a first cell that is not VERSIONS (an HTTP client on the link
    // port); R1.8: the log line says what it looks like; R1.7.
    bad_handshake(b"GET / HTTP/1.1\r\n\r\n", "looks like an HTTP client");
}

#[test]
fn handshake_odd_versions_length_closes_link() {
    // §1's handshake, on a plain link (tls.rs has §13's).
    use_plain_links();
    // R1.4: an odd Length → closed; R1.7: without VERSIONS; R1.8.
    bad_handshake(&[0, 0, 7, 0, 3, 0, 4, 0], "odd length 3");
}

#[test]
fn handshake_without_version_4_closes_link() {
    // §1's handshake, on a plain link (tls.rs has §13's).
    use_plain_links();
    // R1.3: no common version → closed; R1.7: without VERSIONS; R1.8.
    bad_handshake(&[0, 0, 7, 0, 4, 0, 3, 0, 5], "no common link version");
}

#[test]
fn handshake_with_empty_version_list_closes_link() {
    // §1's handshake, on a plain link (tls.rs has §13's).
    use_plain_links();
    // R1.3: an empty list has no common version either; R1.7, R1.8.
    bad_handshake(&[0, 0, 7, 0, 0], "no common link version");
}

#[test]
fn handshake_timeout_closes_silent_and_partial_links() {
    // §1's handshake, on a plain link (tls.rs has §13's).
    use_plain_links();
    // R1.6: no complete VERSIONS 10 seconds after the TCP connection was
    // accepted → closed (R1.7: without VERSIONS; R1.8: one log line each).
    // The default timeout is what is checked, so this test takes the full
    // 10 s (once, for a silent peer and a peer that stalls in the middle of
    // VERSIONS).
    let d = Daemon::exit(&[]);
    let mut silent = TcpStream::connect(d.link()).unwrap();
    let mut partial = TcpStream::connect(d.link()).unwrap();
    let since = Instant::now();
    partial.write_all(&[0, 0, 7, 0, 2, 0]).unwrap(); // 6 of 7 bytes
                                                     // Meanwhile other links are served (nothing else is affected).
    let circ = fresh_circ();
    let mut good = linked(&d, circ);
    let waiter = thread::spawn(move || read_until_closed(&mut partial));
    assert!(read_until_closed(&mut silent).is_empty());
    assert!(waiter.join().unwrap().is_empty());
    // A lower bound only: the exit's clock starts after our connect
    // returned, so closing earlier than 10 s would break R1.6.
    assert!(
        since.elapsed() >= Duration::from_millis(9_900),
        "closed after {:?}, before the 10 s handshake timeout",
        since.elapsed()
    );
    let deadline = Instant::now() + PATIENCE;
    while d.log_count("no complete VERSIONS within 10s") < 2 {
        assert!(Instant::now() < deadline, "log:\n{}", d.log());
        thread::sleep(Duration::from_millis(10));
    }
    ping(&mut good, circ);
    RawLink::connect(d.link()).create_circuit(fresh_circ());
}

#[test]
fn variable_cells_padding_and_other_commands_are_ignored() {
    // R1.10: variable-length cells after the handshake (VPADDING, a
    // repeated VERSIONS) are read in full and ignored. R2.2: PADDING is
    // ignored; R2.6: fixed-length commands not in the table of §2 are
    // dropped.
    let d = Daemon::exit(&[]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut out = Vec::new();
    cell::encode_var(&mut out, 0, cmd::VPADDING, &[0xAB; 3000]);
    cell::encode_var(&mut out, 0, cmd::VERSIONS, &[0, 4]);
    cell::encode_var(&mut out, circ, 200, &[7; 10]);
    l.sock.write_all(&out).unwrap();
    l.send_cell(0, cmd::PADDING, &[]);
    l.send_cell(circ, cmd::PADDING, &[1, 2, 3]);
    // CREATED (2), CREATED_FAST (6, sent the wrong way), NETINFO (8), 11, 127.
    for command in [2, cmd::CREATED_FAST, 8, 11, 127] {
        l.send_cell(circ, command, &[9; 100]);
    }
    ping(&mut l, circ);
    link_alive(&mut l);
}

// -------------------------------------------------------- §2, §3 circuits

#[test]
fn create_fast_answers_created_fast_with_y_and_kh() {
    // R3.3: CREATED_FAST on the same CircID = Y [20] | KH [20], Y fresh
    // and random, KH the first 20 bytes of KDF-TOR(X | Y) = SHA1(X | Y |
    // 0x00) (tor-spec 5.2.1), computed here independently of halfpipe's kdf
    // module.
    use sha1::{Digest, Sha1};
    let d = Daemon::exit(&[]);
    let mut l = RawLink::connect(d.link());
    let mut ys = Vec::new();
    for i in 0..2u8 {
        let circ = fresh_circ();
        let x: [u8; 20] = std::array::from_fn(|j| (j as u8).wrapping_mul(7) ^ i);
        l.send_cell(circ, cmd::CREATE_FAST, &x);
        let c = l.recv_cell().expect("CREATED_FAST");
        assert_eq!(
            (c.circ, c.command),
            (circ, cmd::CREATED_FAST),
            "{}",
            describe(&c)
        );
        let (y, kh) = (&c.payload[..20], &c.payload[20..40]);
        let mut h = Sha1::new();
        h.update(x);
        h.update(y);
        h.update([0u8]);
        assert_eq!(kh, &h.finalize()[..], "KH = SHA1(X|Y|00)");
        assert_ne!(y, &x[..], "Y is the exit's own randomness");
        ys.push(y.to_vec());
    }
    assert_ne!(ys[0], ys[1], "Y is random per circuit");
}

#[test]
fn create_and_create2_are_answered_destroy_protocol() {
    // R2.5: CREATE (1) and CREATE2 (10) are answered with DESTROY(PROTOCOL
    // = 1) on the same CircID; R2.4: the reason is the first payload byte.
    // The link carries on, and the CircIDs were never taken.
    let d = Daemon::exit(&[]);
    let mut l = RawLink::connect(d.link());
    let (a, b) = (fresh_circ(), fresh_circ());
    l.send_cell(a, cmd::CREATE, &[0x55; 200]);
    expect_destroy(&mut l, a, destroy_reason::PROTOCOL);
    l.send_cell(b, cmd::CREATE2, &[0, 2, 0, 84]);
    expect_destroy(&mut l, b, destroy_reason::PROTOCOL);
    l.create_circuit(a);
    l.create_circuit(b);
    ping(&mut l, a);
    ping(&mut l, b);
}

#[test]
fn create_fast_with_circid_top_bit_clear_is_destroy_protocol() {
    // R3.6: a CREATE_FAST on a CircID whose most significant bit is clear
    // is a protocol violation → DESTROY(PROTOCOL) (R3.12); the link
    // carries on.
    let d = Daemon::exit(&[]);
    let mut l = RawLink::connect(d.link());
    for circ in [0x0000_0042, 0x7fff_ffff, 0] {
        l.send_cell(circ, cmd::CREATE_FAST, &[1; 20]);
        expect_destroy(&mut l, circ, destroy_reason::PROTOCOL);
        // No circuit was made: a relay cell for it is dropped silently (R3.14).
        l.send_relay(circ, relay_cmd::BEGIN, 1, b"ping");
    }
    link_alive(&mut l);
}

#[test]
fn create_fast_on_a_circid_in_use_destroys_that_circuit() {
    // R3.6: a CREATE_FAST on a CircID already in use is a protocol
    // violation; R3.12: that circuit gets DESTROY(PROTOCOL), its streams
    // are aborted (R3.10, R8.7: the target sees a reset), the link and the
    // other circuits carry on, and the CircID is free again (R3.7).
    let d = open_exit(&[]);
    let t = Targets::new();
    let (a, b) = (fresh_circ(), fresh_circ());
    let mut l = linked(&d, a);
    l.create_circuit(b);
    let mut target = open_stream(&mut l, a, 1, &t);
    l.send_cell(a, cmd::CREATE_FAST, &[2; 20]);
    expect_destroy(&mut l, a, destroy_reason::PROTOCOL);
    expect_reset(&mut target);
    echo_works(&mut l, b);
    l.create_circuit(a);
    echo_works(&mut l, a);
}

#[test]
fn circuits_past_the_limit_get_destroy_resourcelimit() {
    // R3.8: an exit at its per-link circuit limit answers a further
    // CREATE_FAST with DESTROY(RESOURCELIMIT = 5); R3.9: the limit is
    // configurable. The limit is per link, and a destroyed circuit no
    // longer counts.
    let d = Daemon::exit(&["--max-circuits-per-link", "2"]);
    let (a, b, c) = (fresh_circ(), fresh_circ(), fresh_circ());
    let mut l = linked(&d, a);
    l.create_circuit(b);
    l.send_cell(c, cmd::CREATE_FAST, &[3; 20]);
    expect_destroy(&mut l, c, destroy_reason::RESOURCELIMIT);
    ping(&mut l, a);
    ping(&mut l, b);
    // Another link has its own limit.
    let mut other = RawLink::connect(d.link());
    other.create_circuit(fresh_circ());
    other.create_circuit(fresh_circ());
    // Once a circuit is destroyed, there is room again.
    l.send_cell(a, cmd::DESTROY, &[destroy_reason::REQUESTED]);
    l.create_circuit(c);
    ping(&mut l, c);
}

#[test]
fn destroy_and_relay_for_unknown_circuits_are_dropped_silently() {
    // R3.14: RELAY and DESTROY cells for a CircID that was never created
    // are dropped silently; R3.11: so are those for a circuit already
    // destroyed, by either side.
    let d = Daemon::exit(&[]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let never = fresh_circ();
    l.send_cell(never, cmd::DESTROY, &[destroy_reason::REQUESTED]);
    l.send_relay(never, relay_cmd::BEGIN, 1, b"ping");
    l.send_relay(never, relay_cmd::DATA, 1, b"data");
    l.send_relay(never, relay_cmd::SENDME, 0, &[]);
    // Already destroyed (by us).
    l.send_cell(circ, cmd::DESTROY, &[destroy_reason::REQUESTED]);
    l.send_cell(circ, cmd::DESTROY, &[destroy_reason::REQUESTED]);
    l.send_relay(circ, relay_cmd::BEGIN, 1, b"ping");
    l.send_relay(circ, relay_cmd::SENDME, 0, &[]);
    // Already destroyed (by the exit, for a violation).
    let gone = fresh_circ();
    l.create_circuit(gone);
    l.send_relay(gone, relay_cmd::DATA, 0, b"x");
    expect_destroy(&mut l, gone, destroy_reason::PROTOCOL);
    l.send_relay(gone, relay_cmd::BEGIN, 1, b"ping");
    l.send_cell(gone, cmd::DESTROY, &[destroy_reason::REQUESTED]);
    // Nothing came back for any of them: the next cell answers this.
    link_alive(&mut l);
}

#[test]
fn circid_is_reusable_after_destroy() {
    // R3.7: a CircID is free again once its circuit has been destroyed,
    // whichever side destroyed it.
    let d = open_exit(&[]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    l.send_cell(circ, cmd::DESTROY, &[destroy_reason::FINISHED]);
    l.create_circuit(circ);
    l.send_relay(circ, relay_cmd::FIN, 0, &[]);
    expect_destroy(&mut l, circ, destroy_reason::PROTOCOL);
    l.create_circuit(circ);
    echo_works(&mut l, circ);
}

#[test]
fn relay_early_is_treated_as_relay() {
    // R2.3: RELAY_EARLY (9) is handled exactly as RELAY.
    let d = Daemon::exit(&[]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut out = Vec::new();
    relay::encode(&mut out, circ, relay_cmd::BEGIN, 7, b"no-nul:80");
    out[4] = cmd::RELAY_EARLY;
    l.sock.write_all(&out).unwrap();
    expect_end(&mut l, circ, 7, end_reason::TORPROTOCOL);
}

// ------------------------------------------------------------ §4 relay cells

/// A RELAY cell with its header bytes patched by `patch`.
fn patched_relay(circ: u32, command: u8, stream: u16, patch: impl Fn(&mut [u8])) -> Vec<u8> {
    let mut out = Vec::new();
    relay::encode(&mut out, circ, command, stream, b"abc");
    patch(&mut out[5..]);
    out
}

#[test]
fn relay_header_violations_destroy_only_that_circuit() {
    // R4.4: Recognized != 0 or Length > 498 is a protocol violation →
    // R3.12: DESTROY(PROTOCOL), and the link and every other circuit carry
    // on. R4.3: padding that is not zero is ignored.
    let d = open_exit(&[]);
    let sibling = fresh_circ();
    let mut l = linked(&d, sibling);
    // (what, offset in the relay header, bytes written there)
    let cases: [(&str, usize, &[u8]); 4] = [
        ("Recognized = 1", 1, &[0, 1]),
        ("Recognized = 0x0100", 1, &[1, 0]),
        ("Length = 499", 9, &[1, 0xf3]),
        ("Length = 0xffff", 9, &[0xff, 0xff]),
    ];
    for (what, at, bytes) in cases {
        let circ = fresh_circ();
        l.create_circuit(circ);
        let bad = patched_relay(circ, relay_cmd::DROP, 0, |p| {
            p[at..at + bytes.len()].copy_from_slice(bytes)
        });
        l.sock.write_all(&bad).unwrap();
        let c = next(&mut l);
        assert!(
            c.command == cmd::DESTROY && c.circ == circ && c.payload[0] == destroy_reason::PROTOCOL,
            "{what}: expected DESTROY(PROTOCOL), got {}",
            describe(&c)
        );
    }
    // Length = 498, and padding that is not zero, are fine (R4.3).
    let padded = patched_relay(sibling, relay_cmd::DROP, 0, |p| {
        p[9..11].copy_from_slice(&498u16.to_be_bytes())
    });
    l.sock.write_all(&padded).unwrap();
    let mut out = Vec::new();
    relay::encode(&mut out, sibling, relay_cmd::DROP, 0, b"x");
    out[20..].fill(0xAA);
    l.sock.write_all(&out).unwrap();
    echo_works(&mut l, sibling);
}

#[test]
fn a_bad_relay_header_inside_a_run_of_data_destroys_the_circuit() {
    // R4.4 applies to every relay cell, also to one that follows
    // DATA cells of the same stream in the same read (the circuit takes
    // such a run at once): the good DATA, then a DATA cell with
    // Recognized = 1 or Length = 499, in one write.
    let d = open_exit(&[]);
    let t = Targets::new();
    let sibling = fresh_circ();
    let mut l = linked(&d, sibling);
    for (what, at, bytes) in [
        ("Recognized = 1", 1usize, [0u8, 1]),
        ("Length = 499", 9, [1, 0xf3]),
    ] {
        let circ = fresh_circ();
        l.create_circuit(circ);
        let mut target = open_stream(&mut l, circ, 1, &t);
        let mut out = Vec::new();
        relay::encode(&mut out, circ, relay_cmd::DATA, 1, b"good");
        out.extend_from_slice(&patched_relay(circ, relay_cmd::DATA, 1, |p| {
            p[at..at + 2].copy_from_slice(&bytes)
        }));
        l.sock.write_all(&out).unwrap();
        eprintln!("{what} after DATA");
        expect_destroy(&mut l, circ, destroy_reason::PROTOCOL);
        // R3.12: the destroyed circuit's stream is aborted (R3.10, R8.7).
        expect_reset(&mut target);
    }
    echo_works(&mut l, sibling);
}

#[test]
fn wrong_way_commands_and_stream_zero_destroy_only_that_circuit() {
    // R4.6: CONNECTED or RESOLVED received by the exit is a protocol
    // violation whatever its StreamID; R4.8: so is DATA, FIN or END on
    // stream 0, and R4.10 BEGIN or RESOLVE on stream 0. R3.12: circuit B,
    // with a stream open, carries on through all of it.
    let d = open_exit(&[]);
    let t = Targets::new();
    let b = fresh_circ();
    let mut l = linked(&d, b);
    let mut target_b = open_stream(&mut l, b, 1, &t);
    let cases = [
        (relay_cmd::CONNECTED, 1, "CONNECTED on a new stream ID"),
        (relay_cmd::CONNECTED, 0, "CONNECTED on stream 0"),
        (relay_cmd::CONNECTED, 2, "CONNECTED on an open stream"),
        (relay_cmd::RESOLVED, 3, "RESOLVED"),
        (relay_cmd::RESOLVED, 2, "RESOLVED on an open stream"),
        (relay_cmd::DATA, 0, "DATA on stream 0"),
        (relay_cmd::FIN, 0, "FIN on stream 0"),
        (relay_cmd::END, 0, "END on stream 0"),
        (relay_cmd::BEGIN, 0, "BEGIN on stream 0"),
        (relay_cmd::RESOLVE, 0, "RESOLVE on stream 0"),
    ];
    for (command, stream, what) in cases {
        let a = fresh_circ();
        l.create_circuit(a);
        let mut target_a = None;
        if stream == 2 {
            target_a = Some(open_stream(&mut l, a, 2, &t));
        }
        let body: &[u8] = if command == relay_cmd::CONNECTED {
            &[127, 0, 0, 1, 0, 0, 0, 60]
        } else {
            &[1]
        };
        l.send_relay(a, command, stream, body);
        let c = next(&mut l);
        assert!(
            c.command == cmd::DESTROY && c.circ == a && c.payload[0] == destroy_reason::PROTOCOL,
            "{what}: expected DESTROY(PROTOCOL) on {a:#x}, got {}",
            describe(&c)
        );
        if let Some(mut ta) = target_a {
            expect_reset(&mut ta);
        }
    }
    // Circuit B and its stream are untouched.
    send_data(&mut l, b, 1, b"still here");
    assert_eq!(read_n(&mut target_b, 10), b"still here");
    target_b.write_all(b"and back").unwrap();
    assert_eq!(recv_data(&mut l, b, 1, 8), b"and back");
    echo_works(&mut l, b);
}

#[test]
fn drop_and_unknown_relay_commands_are_ignored() {
    // R4.9: DROP (10), and relay commands not in the table of §4, are
    // dropped: on stream 0, on an open stream and on an unused ID.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    for stream in [0, 1, 999] {
        for command in [relay_cmd::DROP, 6, 22, 30, 32, 99, 255] {
            l.send_relay(circ, command, stream, b"whatever");
        }
    }
    ping(&mut l, circ);
    send_data(&mut l, circ, 1, b"ok");
    assert_eq!(read_n(&mut target, 2), b"ok");
    target.write_all(b"ok too").unwrap();
    assert_eq!(recv_data(&mut l, circ, 1, 6), b"ok too");
}

// ------------------------------------------------------- §5 opening streams

#[test]
fn begin_to_ipv4_target_answers_connected_with_its_address() {
    // R5.3: a well-formed BEGIN is connected; R5.4: CONNECTED for IPv4 is
    // address [4] | TTL [4]; data then flows. R3.5: the raw peer reads and
    // writes every relay cell in the clear.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    l.send_relay(circ, relay_cmd::BEGIN, 1, &begin_body(&t.target()));
    let body = expect_relay(&mut l, circ, relay_cmd::CONNECTED, 1);
    assert_eq!(body.len(), 8, "IPv4 CONNECTED is 8 bytes: {body:?}");
    assert_eq!(&body[..4], &[127, 0, 0, 1]);
    let mut target = t.accept();
    send_data(&mut l, circ, 1, b"hello");
    assert_eq!(read_n(&mut target, 5), b"hello");
    // BEGIN with the optional FLAGS after the NUL (tor-spec 6.2) works too.
    let mut with_flags = begin_body(&t.target());
    with_flags.extend_from_slice(&[0, 0, 0, 1]);
    l.send_relay(circ, relay_cmd::BEGIN, 2, &with_flags);
    expect_relay(&mut l, circ, relay_cmd::CONNECTED, 2);
    t.accept();
}

#[test]
fn begin_to_ipv6_target_answers_connected_with_its_address() {
    // R5.4: CONNECTED for IPv6 is 0 [4] | 6 [1] | address [16] | TTL [4].
    let d = open_exit(&[]);
    let t = Targets::on("[::1]:0");
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    l.send_relay(circ, relay_cmd::BEGIN, 1, &begin_body(&t.target()));
    let body = expect_relay(&mut l, circ, relay_cmd::CONNECTED, 1);
    assert_eq!(body.len(), 25, "IPv6 CONNECTED is 25 bytes: {body:?}");
    assert_eq!(&body[..5], &[0, 0, 0, 0, 6]);
    assert_eq!(&body[5..21], &std::net::Ipv6Addr::LOCALHOST.octets());
    t.accept();
}

#[test]
fn malformed_begin_is_end_torprotocol() {
    // R5.5: a malformed BEGIN payload is answered END(TORPROTOCOL = 13),
    // R8.1: the reason as END's first byte: no NUL, other bytes, a bad
    // port, an unclosed bracket. The circuit is not destroyed, and nothing
    // is connected.
    let d = open_exit(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let long = "a".repeat(256);
    let cases: Vec<Vec<u8>> = vec![
        format!("127.0.0.1:{port}").into_bytes(),          // no NUL
        b"".to_vec(),                                      // nothing at all
        b"\0".to_vec(),                                    // empty
        format!("127.0.0.1\0:{port}").into_bytes(),        // NUL before the port
        b"localhost\0".to_vec(),                           // no port
        b"127.0.0.1:0\0".to_vec(),                         // port 0
        b"127.0.0.1:65536\0".to_vec(),                     // port too big
        b"127.0.0.1:http\0".to_vec(),                      // port not decimal
        b"127.0.0.1:\0".to_vec(),                          // empty port
        b"127.0.0.1:+80\0".to_vec(),                       // sign
        b"127.0.0.1:-1\0".to_vec(),                        // negative
        format!(":{port}\0").into_bytes(),                 // empty address
        format!("exa mple.com:{port}\0").into_bytes(),     // space
        format!("ex\u{e9}mple.com:{port}\0").into_bytes(), // non-ASCII
        format!("a/b:{port}\0").into_bytes(),              // '/'
        format!("{long}:{port}\0").into_bytes(),           // 256-byte name
        format!("[::1:{port}\0").into_bytes(),             // unclosed bracket
        format!("[127.0.0.1]:{port}\0").into_bytes(),      // IPv4 in brackets
        format!("[not-v6]:{port}\0").into_bytes(),         // bad IPv6
        format!("::1:{port}\0").into_bytes(),              // IPv6 without brackets
    ];
    for (i, body) in cases.iter().enumerate() {
        let sid = 100 + i as u16;
        l.send_relay(circ, relay_cmd::BEGIN, sid, body);
        let c = next(&mut l);
        assert!(
            is_relay(&c, circ, relay_cmd::END, sid)
                && relay_of(&c).unwrap().2.first() == Some(&end_reason::TORPROTOCOL),
            "BEGIN {:?}: expected END(TORPROTOCOL), got {}",
            String::from_utf8_lossy(body),
            describe(&c)
        );
    }
    ping(&mut l, circ);
    assert_no_connection(&listener);
}

#[test]
fn default_exit_policy_refuses_loopback_with_end_exitpolicy() {
    // R5.6: the exit policy refuses → END(EXITPOLICY = 4); R5.3: checked
    // against the address resolved, not the name. The default policy
    // `reject private:*,accept *:*` refuses loopback, whether named by
    // IPv4, by a hostname resolving to it, as an IPv4-mapped IPv6 address,
    // or as ::1. Nothing is connected.
    let d = Daemon::exit(&[]);
    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    let (p4, p6) = (
        v4.local_addr().unwrap().port(),
        v6.local_addr().unwrap().port(),
    );
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let targets = [
        format!("127.0.0.1:{p4}"),
        format!("localhost:{p4}"),
        format!("LocalHost:{p4}"),
        format!("[::ffff:127.0.0.1]:{p4}"),
        format!("[::1]:{p6}"),
        format!("10.0.0.1:{p4}"),
    ];
    for (i, target) in targets.iter().enumerate() {
        let sid = 1 + i as u16;
        l.send_relay(circ, relay_cmd::BEGIN, sid, &begin_body(target));
        let c = next(&mut l);
        assert!(
            is_relay(&c, circ, relay_cmd::END, sid)
                && relay_of(&c).unwrap().2.first() == Some(&end_reason::EXITPOLICY),
            "BEGIN {target}: expected END(EXITPOLICY), got {}",
            describe(&c)
        );
    }
    ping(&mut l, circ);
    assert_no_connection(&v4);
    assert_no_connection(&v6);
}

#[test]
fn closed_port_is_end_connectrefused() {
    // R5.8: the target refuses the connection → END(CONNECTREFUSED = 3).
    let d = open_exit(&[]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let target = format!("127.0.0.1:{}", closed_port());
    l.send_relay(circ, relay_cmd::BEGIN, 1, &begin_body(&target));
    expect_end(&mut l, circ, 1, end_reason::CONNECTREFUSED);
    ping(&mut l, circ);
}

#[test]
fn unresolvable_name_is_end_resolvefailed() {
    // R5.7: the name does not resolve → END(RESOLVEFAILED = 2) (.invalid
    // never resolves, RFC 6761).
    let d = open_exit(&[]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    l.send_relay(
        circ,
        relay_cmd::BEGIN,
        1,
        &begin_body("nonexistent.invalid:80"),
    );
    expect_end(&mut l, circ, 1, end_reason::RESOLVEFAILED);
    ping(&mut l, circ);
}

#[test]
fn connect_timeout_is_end_timeout() {
    // R5.9: no answer before the connect timeout → END(TIMEOUT = 7): a
    // target whose accept queue is full drops our SYNs.
    let quiet = unanswering();
    let d = open_exit(&["--connect-timeout", "1s"]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    l.send_relay(
        circ,
        relay_cmd::BEGIN,
        1,
        &begin_body(&quiet.addr.to_string()),
    );
    expect_end(&mut l, circ, 1, end_reason::TIMEOUT);
    ping(&mut l, circ);
}

#[test]
fn stream_limit_is_end_resourcelimit() {
    // R5.11: the stream limit is reached → END(RESOURCELIMIT = 11); R3.9:
    // the limit is configurable, per circuit, and counts open streams only.
    let d = open_exit(&["--max-streams-per-circuit", "2"]);
    let t = Targets::new();
    let (a, b) = (fresh_circ(), fresh_circ());
    let mut l = linked(&d, a);
    l.create_circuit(b);
    let _t1 = open_stream(&mut l, a, 1, &t);
    let _t2 = open_stream(&mut l, a, 2, &t);
    l.send_relay(a, relay_cmd::BEGIN, 3, &begin_body(&t.target()));
    expect_end(&mut l, a, 3, end_reason::RESOURCELIMIT);
    ping(&mut l, a);
    // Circuit B has its own limit.
    let _t3 = open_stream(&mut l, b, 1, &t);
    // Closing a stream makes room again, once the exit has released it.
    l.send_relay(a, relay_cmd::END, 1, &[end_reason::DONE]);
    let deadline = Instant::now() + PATIENCE;
    let mut sid = 10;
    loop {
        l.send_relay(a, relay_cmd::BEGIN, sid, &begin_body(&t.target()));
        let c = next(&mut l);
        if is_relay(&c, a, relay_cmd::CONNECTED, sid) {
            break;
        }
        assert!(
            is_relay(&c, a, relay_cmd::END, sid)
                && relay_of(&c).unwrap().2.first() == Some(&end_reason::RESOURCELIMIT),
            "{}",
            describe(&c)
        );
        assert!(
            Instant::now() < deadline,
            "the closed stream never left the limit"
        );
        thread::sleep(Duration::from_millis(10));
        sid += 1;
    }
    t.accept();
}

#[test]
fn begin_reusing_an_open_stream_id_destroys_the_circuit() {
    // R5.13: a BEGIN whose stream ID is open is a protocol violation →
    // DESTROY(PROTOCOL); the stream is aborted (R3.10, R8.7).
    let d = open_exit(&[]);
    let t = Targets::new();
    let (a, b) = (fresh_circ(), fresh_circ());
    let mut l = linked(&d, a);
    l.create_circuit(b);
    let mut target = open_stream(&mut l, a, 5, &t);
    l.send_relay(a, relay_cmd::BEGIN, 5, &begin_body(&t.target()));
    expect_destroy(&mut l, a, destroy_reason::PROTOCOL);
    expect_reset(&mut target);
    // Half-closed is still open: same for a stream in DONE_DELIVERING.
    let mut target = open_stream(&mut l, b, 6, &t);
    l.send_relay(b, relay_cmd::FIN, 6, &[]);
    assert!(read_to_eof(&mut target).is_empty());
    l.send_relay(b, relay_cmd::BEGIN, 6, &begin_body(&t.target()));
    expect_destroy(&mut l, b, destroy_reason::PROTOCOL);
    expect_reset(&mut target);
    link_alive(&mut l);
}

#[test]
fn begin_on_a_recently_closed_stream_id_opens_a_new_stream() {
    // R5.14: a BEGIN on an ID in the exit's recently-closed set opens a new
    // stream; R9.1: a stream's ID is recently closed once END was sent or
    // received, or FIN went both ways. The BEGIN comes right after the
    // close, as a (careless) client may send it.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let check_new_stream = |l: &mut RawLink, sid: u16| {
        expect_relay(l, circ, relay_cmd::CONNECTED, sid);
        let mut target = t.accept();
        send_data(l, circ, sid, b"new");
        assert_eq!(read_n(&mut target, 3), b"new");
        target
    };
    // The new streams' targets stay open: a close would send FIN (R7.2).
    let mut keep = Vec::new();

    // 1. We sent END: BEGIN in the same write.
    let mut old = open_stream(&mut l, circ, 1, &t);
    let mut out = Vec::new();
    relay::encode(&mut out, circ, relay_cmd::END, 1, &[end_reason::DONE]);
    relay::encode(
        &mut out,
        circ,
        relay_cmd::BEGIN,
        1,
        &begin_body(&t.target()),
    );
    l.sock.write_all(&out).unwrap();
    expect_reset(&mut old);
    keep.push(check_new_stream(&mut l, 1));

    // 2. The exit sent END (connect refused).
    let refused = format!("127.0.0.1:{}", closed_port());
    l.send_relay(circ, relay_cmd::BEGIN, 2, &begin_body(&refused));
    expect_end(&mut l, circ, 2, end_reason::CONNECTREFUSED);
    l.send_relay(circ, relay_cmd::BEGIN, 2, &begin_body(&t.target()));
    keep.push(check_new_stream(&mut l, 2));

    // 3. The exit sent END (malformed BEGIN).
    l.send_relay(circ, relay_cmd::BEGIN, 3, b"bad");
    expect_end(&mut l, circ, 3, end_reason::TORPROTOCOL);
    l.send_relay(circ, relay_cmd::BEGIN, 3, &begin_body(&t.target()));
    keep.push(check_new_stream(&mut l, 3));

    // 4. FIN both ways: the target's FIN last, then BEGIN at once.
    let mut old = open_stream(&mut l, circ, 4, &t);
    l.send_relay(circ, relay_cmd::FIN, 4, &[]);
    assert!(read_to_eof(&mut old).is_empty());
    old.shutdown(Shutdown::Write).unwrap();
    expect_relay(&mut l, circ, relay_cmd::FIN, 4);
    l.send_relay(circ, relay_cmd::BEGIN, 4, &begin_body(&t.target()));
    keep.push(check_new_stream(&mut l, 4));

    // 5. FIN both ways: our FIN last, with the BEGIN in the same write.
    let mut old = open_stream(&mut l, circ, 5, &t);
    old.shutdown(Shutdown::Write).unwrap();
    expect_relay(&mut l, circ, relay_cmd::FIN, 5);
    let mut out = Vec::new();
    relay::encode(&mut out, circ, relay_cmd::FIN, 5, &[]);
    relay::encode(
        &mut out,
        circ,
        relay_cmd::BEGIN,
        5,
        &begin_body(&t.target()),
    );
    l.sock.write_all(&out).unwrap();
    assert!(read_to_eof(&mut old).is_empty());
    keep.push(check_new_stream(&mut l, 5));
    ping(&mut l, circ);
}

#[test]
fn optimistic_data_and_fin_are_delivered_once_connected() {
    // R5.15: DATA and FIN sent right after BEGIN are held while the exit
    // connects, and delivered in the order they arrived once connected.
    // The target reads the data, then EOF (R7.4), and its reply comes back
    // after CONNECTED.
    let d = open_exit(&[]);
    let server = Server::request_reply(|req| req.to_vec());
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let request = pattern(5 * relay::DATA_MAX + 17, 3);
    let mut out = Vec::new();
    relay::encode(
        &mut out,
        circ,
        relay_cmd::BEGIN,
        1,
        &begin_body(&server.addr.to_string()),
    );
    for chunk in request.chunks(relay::DATA_MAX) {
        relay::encode(&mut out, circ, relay_cmd::DATA, 1, chunk);
    }
    relay::encode(&mut out, circ, relay_cmd::FIN, 1, &[]);
    l.sock.write_all(&out).unwrap(); // one write: all of it before CONNECTED
    expect_relay(&mut l, circ, relay_cmd::CONNECTED, 1);
    // The server replies only after EOF, so the reply proves data then EOF.
    assert_eq!(recv_data(&mut l, circ, 1, request.len()), request);
    expect_relay(&mut l, circ, relay_cmd::FIN, 1);
    ping(&mut l, circ);
}

#[test]
fn optimistic_data_after_a_refused_begin_is_discarded_silently() {
    // R5.16: the exit discards the held DATA and FIN if it answers END: no
    // DESTROY, the circuit stays usable (R9.3 for what comes later).
    // Refusals from the parser, the policy and the connect.
    let d = Daemon::exit(&["--exit-policy", "reject 127.0.0.2:*,accept *:*"]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let refused = format!("127.0.0.1:{}", closed_port());
    let cases: [(&[u8], u8); 3] = [
        (b"no-nul:80", end_reason::TORPROTOCOL),
        (b"127.0.0.2:80\0", end_reason::EXITPOLICY),
        (&begin_body(&refused), end_reason::CONNECTREFUSED),
    ];
    for (i, (body, reason)) in cases.iter().enumerate() {
        let sid = 1 + i as u16;
        let mut out = Vec::new();
        relay::encode(&mut out, circ, relay_cmd::BEGIN, sid, body);
        for chunk in pattern(3 * relay::DATA_MAX, 1).chunks(relay::DATA_MAX) {
            relay::encode(&mut out, circ, relay_cmd::DATA, sid, chunk);
        }
        relay::encode(&mut out, circ, relay_cmd::FIN, sid, &[]);
        l.sock.write_all(&out).unwrap();
        expect_end(&mut l, circ, sid, *reason);
        // More of it, after the END came (in flight from a client).
        send_data(&mut l, circ, sid, b"late");
        ping(&mut l, circ);
    }
    echo_works(&mut l, circ);
}

#[test]
fn resolve_answers_resolved_without_a_stream() {
    // R5.17: RESOLVE (payload: hostname NUL) is answered by one RESOLVED on
    // the same ID, and no stream is created; R5.18: its payload is a
    // sequence of tor-spec 6.4 answers; R5.19: a name that does not exist
    // gets one answer of type 0xF1.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    l.send_relay(circ, relay_cmd::RESOLVE, 1, b"localhost\0");
    let body = expect_relay(&mut l, circ, relay_cmd::RESOLVED, 1);
    // Answers: type [1] | length [1] | value | TTL [4].
    let mut answers = Vec::new();
    let mut rest = &body[..];
    while rest.len() >= 2 {
        let len = rest[1] as usize;
        assert!(rest.len() >= 2 + len + 4, "truncated answer in {body:?}");
        answers.push((rest[0], rest[2..2 + len].to_vec()));
        rest = &rest[2 + len + 4..];
    }
    assert!(rest.is_empty(), "trailing bytes in {body:?}");
    assert!(
        answers.contains(&(4, vec![127, 0, 0, 1])),
        "localhost → type 4, 127.0.0.1; got {answers:?}"
    );
    l.send_relay(circ, relay_cmd::RESOLVE, 2, b"nonexistent.invalid\0");
    let body = expect_relay(&mut l, circ, relay_cmd::RESOLVED, 2);
    assert_eq!(body.len(), 6, "one answer, no value: {body:?}");
    assert_eq!(&body[..2], &[0xF1, 0], "type 0xF1 (nontransient error)");
    // No stream was created: DATA for the ID is dropped, and BEGIN on it
    // opens a stream rather than reusing an open one.
    send_data(&mut l, circ, 1, b"nothing here");
    ping(&mut l, circ);
    l.send_relay(circ, relay_cmd::BEGIN, 2, &begin_body(&t.target()));
    expect_relay(&mut l, circ, relay_cmd::CONNECTED, 2);
    t.accept();
}

// ------------------------------------------------------------------ §6 data

#[test]
fn the_exit_never_sends_an_empty_data_cell() {
    // R6.2: every DATA cell the exit sends carries at least one byte, for
    // small reads as for large ones, and the end of file is a FIN (R7.2),
    // not an empty DATA; R6.1: at most 498 bytes a cell, in order.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for i in 0..12u8 {
        // One write at a time, each read back before the next, so that the
        // exit's reads come in every size from 1 byte to a few cells.
        let piece = pattern(1 + usize::from(i) * 211, i);
        target.write_all(&piece).unwrap();
        sent.extend_from_slice(&piece);
        while got.len() < sent.len() {
            let body = expect_relay(&mut l, circ, relay_cmd::DATA, 1);
            assert!(
                (1..=relay::DATA_MAX).contains(&body.len()),
                "a DATA cell of {} bytes",
                body.len()
            );
            got.extend(body);
        }
    }
    assert_eq!(got, sent);
    target.shutdown(Shutdown::Write).unwrap();
    expect_relay(&mut l, circ, relay_cmd::FIN, 1);
    ping(&mut l, circ);
}

#[test]
fn empty_data_cells_are_accepted_counted_and_write_nothing() {
    // R6.3: DATA cells with Length 0 are accepted: nothing is written to
    // the target for them, and they count against the deliver windows like
    // any DATA cell: with a one-byte marker after them, 101 DATA cells earn
    // one circuit SENDME (R10.2) and, written, two stream SENDMEs (R10.3).
    // Every empty cell is counted as written before the marker's byte is
    // written (runtime/batch.rs), so once the target has the marker both
    // stream SENDMEs are queued, and a ping sees them.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    let mut out = Vec::new();
    for _ in 0..100 {
        relay::encode(&mut out, circ, relay_cmd::DATA, 1, &[]);
    }
    relay::encode(&mut out, circ, relay_cmd::DATA, 1, b"x");
    l.sock.write_all(&out).unwrap();
    assert_eq!(read_n(&mut target, 1), b"x");
    let seen = ping_collect(&mut l, circ);
    assert_eq!(count_sendmes(&seen, circ, 0), 1, "circuit SENDMEs");
    assert_eq!(count_sendmes(&seen, circ, 1), 2, "stream SENDMEs");
    assert_eq!(
        seen.len(),
        3,
        "{:?}",
        seen.iter().map(describe).collect::<Vec<_>>()
    );
    // Nothing but the marker was written: after our FIN the target reads
    // EOF at once.
    l.send_relay(circ, relay_cmd::FIN, 1, &[]);
    assert!(read_to_eof(&mut target).is_empty());
    ping(&mut l, circ);
}

// ---------------------------------------------------- §7 half-close, §8 abort

#[test]
fn target_eof_sends_fin_then_our_fin_gives_the_target_eof() {
    // R7.2: read() on the TCP connection returns EOF | OPEN | send FIN
    // after every DATA read before the EOF | DONE_PACKAGING; first table:
    // DONE_PACKAGING still delivers; R7.5: FIN received | DONE_PACKAGING |
    // write every DATA received before it, then shutdown(SHUT_WR) | CLOSED;
    // R7.9: and CLOSED closes normally (the target reads EOF, no reset).
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    let reply = pattern(3000, 1);
    target.write_all(&reply).unwrap();
    target.shutdown(Shutdown::Write).unwrap();
    assert_eq!(recv_data(&mut l, circ, 1, reply.len()), reply);
    expect_relay(&mut l, circ, relay_cmd::FIN, 1);
    let request = pattern(2000, 2);
    send_data(&mut l, circ, 1, &request);
    assert_eq!(read_n(&mut target, request.len()), request);
    let late = pattern(700, 3);
    send_data(&mut l, circ, 1, &late);
    l.send_relay(circ, relay_cmd::FIN, 1, &[]);
    assert_eq!(read_to_eof(&mut target), late, "data before FIN, then EOF");
    // CLOSED after FIN both ways: no END, nothing more on the stream.
    ping(&mut l, circ);
}

#[test]
fn our_fin_gives_the_target_eof_and_the_target_can_still_send() {
    // R7.4: FIN received | OPEN | write every DATA received before it, then
    // shutdown(SHUT_WR) | DONE_DELIVERING; first table: DONE_DELIVERING
    // still packages; R7.3: read() returns EOF | DONE_DELIVERING | send FIN
    // | CLOSED.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    let request = pattern(5000, 4);
    send_data(&mut l, circ, 1, &request);
    l.send_relay(circ, relay_cmd::FIN, 1, &[]);
    assert_eq!(read_to_eof(&mut target), request);
    let reply = pattern(7000, 5);
    target.write_all(&reply).unwrap();
    assert_eq!(recv_data(&mut l, circ, 1, reply.len()), reply);
    let more = pattern(1000, 6);
    target.write_all(&more).unwrap();
    target.shutdown(Shutdown::Write).unwrap();
    assert_eq!(recv_data(&mut l, circ, 1, more.len()), more);
    expect_relay(&mut l, circ, relay_cmd::FIN, 1);
    ping(&mut l, circ);
}

#[test]
fn data_or_fin_after_our_fin_destroys_the_circuit() {
    // R7.6: DATA or FIN received | DONE_DELIVERING | protocol violation
    // (the circuit is destroyed, R3.12); the stream's target sees a reset
    // (R3.10), other circuits carry on.
    let d = open_exit(&[]);
    let t = Targets::new();
    let sibling = fresh_circ();
    let mut l = linked(&d, sibling);
    for second in [relay_cmd::DATA, relay_cmd::FIN] {
        let circ = fresh_circ();
        l.create_circuit(circ);
        let mut target = open_stream(&mut l, circ, 1, &t);
        l.send_relay(circ, relay_cmd::FIN, 1, &[]);
        assert!(read_to_eof(&mut target).is_empty()); // now DONE_DELIVERING
        l.send_relay(circ, second, 1, b"x");
        expect_destroy(&mut l, circ, destroy_reason::PROTOCOL);
        expect_reset(&mut target);
    }
    echo_works(&mut l, sibling);
}

#[test]
fn end_right_after_data_discards_the_data() {
    // R8.8: END aborts the stream and what was queued for the application
    // is discarded. DATA and END in one write reach the exit in
    // one read (2 KB on loopback), so the data is still queued in the
    // circuit thread when END comes: the target sees a reset or an EOF,
    // never the data.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    let mut out = Vec::new();
    for _ in 0..3 {
        relay::encode(&mut out, circ, relay_cmd::DATA, 1, b"zzz");
    }
    relay::encode(&mut out, circ, relay_cmd::END, 1, &[end_reason::MISC]);
    l.sock.write_all(&out).unwrap();
    target
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    match target.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "data written despite END: {:?}", &buf[..n]),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
    }
    ping(&mut l, circ);
}

#[test]
fn end_received_resets_the_target_in_every_state() {
    // R7.8: END received | any | abort without sending | CLOSED; R8.8: the
    // edge resets its TCP connection (the target sees a reset, not an EOF);
    // R8.9: and sends nothing more on the stream.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    // OPEN
    let mut open = open_stream(&mut l, circ, 1, &t);
    // DONE_PACKAGING: the target's EOF made the exit send FIN.
    let mut done_packaging = open_stream(&mut l, circ, 2, &t);
    done_packaging.shutdown(Shutdown::Write).unwrap();
    expect_relay(&mut l, circ, relay_cmd::FIN, 2);
    // DONE_DELIVERING: our FIN.
    let mut done_delivering = open_stream(&mut l, circ, 3, &t);
    l.send_relay(circ, relay_cmd::FIN, 3, &[]);
    assert!(read_to_eof(&mut done_delivering).is_empty());
    for (sid, target) in [
        (1, &mut open),
        (2, &mut done_packaging),
        (3, &mut done_delivering),
    ] {
        l.send_relay(circ, relay_cmd::END, sid, &[end_reason::MISC]);
        expect_reset(target);
    }
    // Nothing was sent back for any of them (no END, no FIN).
    ping(&mut l, circ);
}

#[test]
fn target_reset_sends_end_connreset() {
    // R7.7: error on the stream | any | abort | CLOSED; R8.2: a reset on the
    // TCP connection → END(CONNRESET = 12), R8.1: the reason as END's first
    // byte. In OPEN, and in DONE_DELIVERING after our FIN.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let target = open_stream(&mut l, circ, 1, &t);
    reset(target);
    expect_end(&mut l, circ, 1, end_reason::CONNRESET);
    let mut target = open_stream(&mut l, circ, 2, &t);
    l.send_relay(circ, relay_cmd::FIN, 2, &[]);
    assert!(read_to_eof(&mut target).is_empty());
    reset(target);
    expect_end(&mut l, circ, 2, end_reason::CONNRESET);
    ping(&mut l, circ);
}

// ---------------------------------------------------------- §9 late cells

/// Sends every cell R9.3 says is dropped silently for a closed stream, in
/// one write after `first` (our cell that closes the stream, if any), so
/// that they reach the exit while it still tracks the CLOSED stream.
fn send_late_cells(l: &mut RawLink, circ: u32, sid: u16, first: Option<u8>) {
    let mut out = Vec::new();
    if let Some(command) = first {
        let body: &[u8] = if command == relay_cmd::END {
            &[end_reason::DONE]
        } else {
            &[]
        };
        relay::encode(&mut out, circ, command, sid, body);
    }
    relay::encode(&mut out, circ, relay_cmd::SENDME, sid, &[]);
    relay::encode(&mut out, circ, relay_cmd::DATA, sid, b"late data");
    relay::encode(&mut out, circ, relay_cmd::FIN, sid, &[]);
    relay::encode(&mut out, circ, relay_cmd::END, sid, &[end_reason::DONE]);
    relay::encode(&mut out, circ, relay_cmd::SENDME, sid, &[]);
    relay::encode(&mut out, circ, relay_cmd::DATA, sid, b"more late data");
    l.sock.write_all(&out).unwrap();
}

#[test]
fn late_cells_for_closed_streams_are_dropped_silently() {
    // R9.3: after END, or CLOSED, SENDME, DATA, FIN and END for the stream
    // (its ID recently closed, R9.1) are dropped silently; the circuit keeps
    // working.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    // We sent END.
    let mut target = open_stream(&mut l, circ, 1, &t);
    send_late_cells(&mut l, circ, 1, Some(relay_cmd::END));
    expect_reset(&mut target);
    send_late_cells(&mut l, circ, 1, None); // and once it is long gone
    ping(&mut l, circ);
    // The exit sent END (target reset).
    let target = open_stream(&mut l, circ, 2, &t);
    reset(target);
    expect_end(&mut l, circ, 2, end_reason::CONNRESET);
    send_late_cells(&mut l, circ, 2, None);
    ping(&mut l, circ);
    // The exit refused the BEGIN.
    l.send_relay(
        circ,
        relay_cmd::BEGIN,
        3,
        &begin_body("nonexistent.invalid:1"),
    );
    expect_end(&mut l, circ, 3, end_reason::RESOLVEFAILED);
    send_late_cells(&mut l, circ, 3, None);
    ping(&mut l, circ);
    // FIN both ways (CLOSED normally).
    let mut target = open_stream(&mut l, circ, 4, &t);
    target.shutdown(Shutdown::Write).unwrap();
    expect_relay(&mut l, circ, relay_cmd::FIN, 4);
    send_late_cells(&mut l, circ, 4, Some(relay_cmd::FIN));
    assert!(read_to_eof(&mut target).is_empty());
    send_late_cells(&mut l, circ, 4, None);
    ping(&mut l, circ);
    echo_works(&mut l, circ);
}

#[test]
fn cells_for_never_opened_streams_are_dropped_silently() {
    // R9.5: cells for a stream ID that is neither open nor recently closed
    // are dropped.
    let d = open_exit(&[]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    for sid in [1, 77, 65535] {
        send_late_cells(&mut l, circ, sid, None);
    }
    ping(&mut l, circ);
    echo_works(&mut l, circ);
}

// ------------------------------------------------------- §10 flow control

/// `n` full DATA cells for `stream`, in one write.
fn send_cells(l: &mut RawLink, circ: u32, stream: u16, n: usize, seed: u8) -> Vec<u8> {
    let data = pattern(n * relay::DATA_MAX, seed);
    send_data(l, circ, stream, &data);
    data
}

#[test]
fn exit_sends_a_circuit_sendme_every_100_data_cells() {
    // R10.2: the receiver sends a circuit SENDME (StreamID 0) when a DATA
    // cell brings its deliver window down to 900; R10.5: counting every
    // DATA cell on the circuit, also for unknown streams; R10.4: each
    // SENDME sent raises the window by 100 again. The circuit thread sends
    // it on receipt, so a ping after the DATA sees exactly the SENDMEs due.
    let d = open_exit(&[]);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let unknown = 31_000;
    send_cells(&mut l, circ, unknown, 99, 1);
    let seen = ping_collect(&mut l, circ);
    assert!(
        seen.is_empty(),
        "after 99 cells: {:?}",
        seen.iter().map(describe).collect::<Vec<_>>()
    );
    send_cells(&mut l, circ, unknown, 1, 2);
    let seen = ping_collect(&mut l, circ);
    assert_eq!(
        seen.len(),
        1,
        "after 100 cells: {:?}",
        seen.iter().map(describe).collect::<Vec<_>>()
    );
    assert!(is_relay(&seen[0], circ, relay_cmd::SENDME, 0));
    send_cells(&mut l, circ, unknown, 250, 3);
    let seen = ping_collect(&mut l, circ);
    assert_eq!(count_sendmes(&seen, circ, 0), 2, "after 350 cells");
    assert_eq!(seen.len(), 2);
    send_cells(&mut l, circ, unknown, 50, 4);
    let seen = ping_collect(&mut l, circ);
    assert_eq!(count_sendmes(&seen, circ, 0), 1, "after 400 cells");
}

#[test]
fn exit_sends_stream_sendmes_as_it_writes_50_cells() {
    // R10.3: a stream SENDME when the receiver has written to the TCP
    // connection 50 more cells' data since its last stream SENDME, and its
    // deliver window is at most 450 (R10.6: each DATA lowered it; R10.7:
    // written means accepted by the kernel).
    //
    // Sync: the deliverer writes cells in arrival order and sends the
    // SENDMEs a write earned before writing the next batch. So once the
    // target has read a marker cell sent after everything before it was
    // read, every SENDME for the earlier cells is queued; a ping then sees
    // them. Markers are placed so that they never earn a SENDME themselves.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    let mut phase = |cells: usize, seed: u8| -> Vec<RawCell> {
        let data = send_cells(&mut l, circ, 1, cells, seed);
        assert_eq!(read_n(&mut target, data.len()), data);
        send_data(&mut l, circ, 1, &[seed]);
        assert_eq!(read_n(&mut target, 1), [seed]);
        ping_collect(&mut l, circ)
    };
    // Cells 1-48 and marker 49: window 451, no SENDME.
    let seen = phase(48, 1);
    assert_eq!(
        count_sendmes(&seen, circ, 1),
        0,
        "49 cells: window above 450"
    );
    // Cell 50 and marker 51: 50 written, window 450 → one SENDME.
    let seen = phase(1, 2);
    assert_eq!(count_sendmes(&seen, circ, 1), 1, "after 50 cells written");
    assert_eq!(count_sendmes(&seen, circ, 0), 0);
    // Cells 52-100 and marker 101: 50 more written by cell 100 → one more;
    // and the 100th DATA cell on the circuit earned a circuit SENDME.
    let seen = phase(49, 3);
    assert_eq!(count_sendmes(&seen, circ, 1), 1, "after 100 cells written");
    assert_eq!(count_sendmes(&seen, circ, 0), 1);
    assert_eq!(
        seen.len(),
        2,
        "{:?}",
        seen.iter().map(describe).collect::<Vec<_>>()
    );
    // Cells 102-148 and marker 149: none (the third is due at cell 150).
    let seen = phase(47, 4);
    assert_eq!(count_sendmes(&seen, circ, 1), 0, "149 cells");
}

/// A target that writes `len` bytes of `pattern(len, seed)` (or until the
/// stream is torn down).
fn target_writes(mut target: TcpStream, len: usize, seed: u8) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let _ = target.write_all(&pattern(len, seed));
        let _ = target.shutdown(Shutdown::Write);
        // Keep the connection until the exit resets it.
        let mut sink = [0u8; 64];
        let _ = target.read(&mut sink);
    })
}

/// Reads DATA cells until `n` arrived (per stream counted in `counts`);
/// fails on any other cell but SENDMEs.
fn recv_data_cells(
    l: &mut RawLink,
    circ: u32,
    n: usize,
    counts: &mut std::collections::HashMap<u16, (usize, Vec<u8>)>,
) {
    for _ in 0..n {
        let c = next(l);
        match relay_of(&c) {
            Some((relay_cmd::DATA, sid, body)) if c.circ == circ => {
                let e = counts.entry(sid).or_default();
                e.0 += 1;
                e.1.extend_from_slice(&body);
            }
            _ => panic!("expected DATA, got {}", describe(&c)),
        }
    }
}

/// Checks that no DATA arrives for `QUIET` (a window is shut).
fn assert_no_data(l: &mut RawLink, why: &str) {
    while let Some(c) = l.recv_cell_within(QUIET) {
        assert!(
            !matches!(relay_of(&c), Some((rc, _, _)) if rc == relay_cmd::DATA || rc == relay_cmd::FIN),
            "{why}, yet the exit sent {}",
            describe(&c)
        );
    }
}

#[test]
fn exit_stops_at_its_stream_package_window_until_our_sendme() {
    // R10.3, R10.4, R10.8, R10.9: stream window start 500, SENDME adds 50;
    // a sender whose package window is 0 stops reading, and one SENDME lets
    // it send the 50 cells it opens; R6.1: the bytes come in order.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let target = open_stream(&mut l, circ, 1, &t);
    let len = 2_000_000;
    let _writer = target_writes(target, len, 7);
    let stream_sendmes = |l: &mut RawLink, n: usize| {
        for _ in 0..n {
            l.send_relay(circ, relay_cmd::SENDME, 1, &[]);
        }
    };
    let mut counts = Default::default();
    recv_data_cells(&mut l, circ, 500, &mut counts);
    assert_no_data(&mut l, "the stream package window is 0");
    // Stopped at 0, one SENDME resumes it for exactly 50 cells (R10.9)...
    stream_sendmes(&mut l, 1);
    recv_data_cells(&mut l, circ, 50, &mut counts);
    assert_no_data(&mut l, "the stream package window is 0 after 50");
    // ... and four more for exactly 200.
    stream_sendmes(&mut l, 4);
    recv_data_cells(&mut l, circ, 200, &mut counts);
    assert_no_data(&mut l, "the stream package window is 0 again");
    let (cells, data) = &counts[&1];
    assert_eq!(*cells, 750);
    assert_eq!(
        data[..],
        pattern(len, 7)[..data.len()],
        "stream bytes in order"
    );
    // Ten SENDMEs at window 0 lift it exactly to its start (500): fine.
    // The circuit window (1000, 750 used) lets 250 of them go.
    stream_sendmes(&mut l, 10);
    recv_data_cells(&mut l, circ, 250, &mut counts);
    assert_no_data(&mut l, "the circuit package window is 0");
    // The stream window is at 250. Two circuit SENDMEs release 200...
    l.send_relay(circ, relay_cmd::SENDME, 0, &[]);
    l.send_relay(circ, relay_cmd::SENDME, 0, &[]);
    recv_data_cells(&mut l, circ, 200, &mut counts);
    assert_no_data(&mut l, "the circuit package window is 0 (stream has 50)");
    // ... one more the stream's last 50.
    l.send_relay(circ, relay_cmd::SENDME, 0, &[]);
    recv_data_cells(&mut l, circ, 50, &mut counts);
    assert_no_data(&mut l, "the stream package window is 0 (circuit has 50)");
    // One stream SENDME: the stream may send 50, which the circuit's
    // remaining 50 allow.
    stream_sendmes(&mut l, 1);
    recv_data_cells(&mut l, circ, 50, &mut counts);
    assert_no_data(&mut l, "both windows are 0");
    let (cells, data) = &counts[&1];
    assert_eq!(*cells, 1300);
    assert_eq!(data[..], pattern(len, 7)[..data.len()]);
}

#[test]
fn exit_stops_at_its_circuit_package_window_across_streams() {
    // R10.2, R10.4: start 1000, SENDME adds 100; R10.8: the window is
    // shared by the circuit's streams, which all stop at 0, and each also
    // has its own window of 500.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    // All three open before any target writes: a CONNECTED is then never
    // queued behind another stream's DATA.
    let targets: Vec<_> = (1..=3u16)
        .map(|sid| (sid, open_stream(&mut l, circ, sid, &t)))
        .collect();
    let _writers: Vec<_> = targets
        .into_iter()
        .map(|(sid, target)| target_writes(target, 1_000_000, sid as u8))
        .collect();
    let mut counts = Default::default();
    recv_data_cells(&mut l, circ, 1000, &mut counts);
    assert_no_data(&mut l, "the circuit package window is 0");
    for (sid, (cells, data)) in &counts {
        assert!(
            *cells <= 500,
            "stream {sid} sent {cells} cells, over its window"
        );
        assert_eq!(data[..], pattern(1_000_000, *sid as u8)[..data.len()]);
    }
    l.send_relay(circ, relay_cmd::SENDME, 0, &[]);
    recv_data_cells(&mut l, circ, 100, &mut counts);
    assert_no_data(&mut l, "the circuit package window is 0 again");
    let total: usize = counts.values().map(|(c, _)| c).sum();
    assert_eq!(total, 1100);
    for (sid, (cells, _)) in &counts {
        assert!(
            *cells <= 500,
            "stream {sid} sent {cells} cells, over its window"
        );
    }
}

#[test]
fn sendme_above_the_start_window_destroys_the_circuit() {
    // R10.11: a SENDME that would raise a package window beyond its start
    // value is a protocol violation → DESTROY(PROTOCOL), for the circuit
    // window (StreamID 0) and for a stream window.
    let d = open_exit(&[]);
    let t = Targets::new();
    let sibling = fresh_circ();
    let mut l = linked(&d, sibling);
    let circ = fresh_circ();
    l.create_circuit(circ);
    l.send_relay(circ, relay_cmd::SENDME, 0, &[]);
    expect_destroy(&mut l, circ, destroy_reason::PROTOCOL);
    let circ = fresh_circ();
    l.create_circuit(circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    // One DATA cell from the exit: the stream window is 499, still no room
    // for a SENDME's 50.
    target.write_all(b"x").unwrap();
    assert_eq!(recv_data(&mut l, circ, 1, 1), b"x");
    l.send_relay(circ, relay_cmd::SENDME, 1, &[]);
    expect_destroy(&mut l, circ, destroy_reason::PROTOCOL);
    expect_reset(&mut target);
    echo_works(&mut l, sibling);
}

#[test]
fn sendme_payloads_are_ignored_and_the_exits_sendmes_are_empty() {
    // R10.12: a SENDME with a version-0 payload, or with any other payload,
    // is a SENDME all the same (its payload ignored), at the stream and at
    // the circuit level; the SENDMEs the exit sends have an empty payload.
    let d = open_exit(&[]);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let target = open_stream(&mut l, circ, 1, &t);
    let _writer = target_writes(target, 2_000_000, 11);
    let mut counts = Default::default();
    recv_data_cells(&mut l, circ, 500, &mut counts);
    assert_no_data(&mut l, "the stream package window is 0");
    let mut version_1 = vec![1, 0, 20];
    version_1.extend_from_slice(&[0xAB; 20]);
    for payload in [&[0u8, 0, 0][..], &version_1, &[0xFF; 100]] {
        l.send_relay(circ, relay_cmd::SENDME, 1, payload);
        recv_data_cells(&mut l, circ, 50, &mut counts);
        assert_no_data(&mut l, "the stream package window is 0 again");
    }
    // 650 of the circuit's 1000 cells are out: a circuit SENDME with a
    // payload is no violation either.
    l.send_relay(circ, relay_cmd::SENDME, 0, &[0, 0, 0]);
    ping(&mut l, circ);
    // The exit's own SENDMEs: 100 DATA cells for the stream earn one
    // circuit SENDME and, once written, two stream SENDMEs.
    send_cells(&mut l, circ, 1, 100, 12);
    let mut sendmes = 0;
    while sendmes < 3 {
        let c = l.recv_cell().expect("the exit closed the link");
        if let Some((relay_cmd::SENDME, stream, body)) = relay_of(&c) {
            assert!(stream == 0 || stream == 1, "{}", describe(&c));
            assert!(body.is_empty(), "{}", describe(&c));
            sendmes += 1;
        }
    }
}

#[test]
fn data_beyond_the_stream_deliver_window_destroys_the_circuit() {
    // R10.10: a DATA cell that would take a deliver window below 0 is a
    // protocol violation. The target never answers the connect, so the exit
    // can write nothing and sends no stream SENDME: 500 cells are fine
    // (R5.15: held while connecting), the 501st is a violation.
    let quiet = unanswering();
    let d = open_exit(&[]);
    let sibling = fresh_circ();
    let mut l = linked(&d, sibling);
    let circ = fresh_circ();
    l.create_circuit(circ);
    l.send_relay(
        circ,
        relay_cmd::BEGIN,
        1,
        &begin_body(&quiet.addr.to_string()),
    );
    send_cells(&mut l, circ, 1, 500, 1);
    let seen = ping_collect(&mut l, circ);
    assert_eq!(count_sendmes(&seen, circ, 0), 5, "circuit SENDMEs only");
    assert_eq!(
        seen.len(),
        5,
        "{:?}",
        seen.iter().map(describe).collect::<Vec<_>>()
    );
    send_cells(&mut l, circ, 1, 1, 2);
    expect_destroy(&mut l, circ, destroy_reason::PROTOCOL);
    ping(&mut l, sibling);
}

// ---------------------------------------------- threads (docs/design.md)

#[test]
fn losing_the_link_resets_streams_and_threads_return_to_baseline() {
    // R3.13: when the link is lost, every circuit on it is torn down and
    // their streams aborted as in §8, so the targets see a reset (in every
    // §7 state); docs/design.md, invariant 6: after all streams close, the
    // thread count returns to what it was before.
    let d = open_exit(&[]);
    let baseline = d.thread_count();
    let t = Targets::new();
    let (a, b) = (fresh_circ(), fresh_circ());
    let mut l = linked(&d, a);
    l.create_circuit(b);
    let mut open = open_stream(&mut l, a, 1, &t);
    let mut half = open_stream(&mut l, b, 1, &t);
    half.shutdown(Shutdown::Write).unwrap();
    expect_relay(&mut l, b, relay_cmd::FIN, 1);
    let mut other_half = open_stream(&mut l, b, 2, &t);
    l.send_relay(b, relay_cmd::FIN, 2, &[]);
    assert!(read_to_eof(&mut other_half).is_empty());
    let quiet = unanswering();
    l.send_relay(a, relay_cmd::BEGIN, 2, &begin_body(&quiet.addr.to_string()));
    ping(&mut l, a);
    assert!(d.thread_count() > baseline);
    drop(l);
    expect_reset(&mut open);
    expect_reset(&mut half);
    expect_reset(&mut other_half);
    d.wait_for_threads(baseline);
    d.wait_for_log("link closed");
    // Also after a protocol violation and after a failed handshake.
    let mut l = linked(&d, a);
    let _s = open_stream(&mut l, a, 1, &t);
    l.send_relay(a, relay_cmd::DATA, 0, b"x");
    expect_destroy(&mut l, a, destroy_reason::PROTOCOL);
    drop(l);
    let mut s = TcpStream::connect(d.link()).unwrap();
    s.write_all(b"nonsense").unwrap();
    read_until_closed(&mut s);
    d.wait_for_threads(baseline);
}
