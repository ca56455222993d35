//! The client edge on the wire: the real `halfpipe client` against a
//! hand-driven exit (`RawLink::accept`) over loopback, with applications on
//! its SOCKS port. Each test names the requirements of docs/protocol.md it
//! checks. Checks that something does *not* happen (no SOCKS reply yet)
//! watch for `QUIET`; they can only miss a bug, never fail a correct client.

use crate::app::client_unlinked;
use crate::util::*;
use halfpipe_proto::cell::{cmd, destroy_reason};
use halfpipe_proto::congestion;
use halfpipe_proto::kdf;
use halfpipe_proto::relay::{self, end_reason, relay_cmd};
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How long a check that nothing arrives watches a socket.
const QUIET: Duration = Duration::from_millis(300);

/// A listener for the client to dial, and a thread that plays the exit on
/// the first link it accepts: `exit(link)` runs after the VERSIONS
/// handshake (which `RawLink::accept` checks byte for byte).
pub(crate) fn raw_exit<T: Send + 'static>(
    exit: impl FnOnce(RawLink) -> T + Send + 'static,
) -> (SocketAddr, JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = thread::spawn(move || exit(RawLink::accept(&listener)));
    (addr, fake)
}

/// A client linked to a raw exit that has answered its CREATE_FAST: the
/// daemon, the link and the circuit's CircID.
fn client_and_raw_exit() -> (Daemon, RawLink, u32) {
    let (addr, fake) = raw_exit(|mut link| {
        let circ = link.answer_create_fast();
        (link, circ)
    });
    let d = Daemon::client(addr, &[]);
    let (link, circ) = fake.join().unwrap();
    (d, link, circ)
}

/// The next cell that is not a SENDME or PADDING; the client must not close
/// the link.
fn next(link: &mut RawLink) -> RawCell {
    link.recv_non_sendme().expect("the client closed the link")
}

/// Reads cells until a BEGIN comes, answering CREATE_FASTs on the way (the
/// client creates a circuit when it needs one). Returns the BEGIN's CircID,
/// stream ID and payload.
fn next_begin(link: &mut RawLink) -> (u32, u16, Vec<u8>) {
    loop {
        let c = next(link);
        match c.command {
            cmd::CREATE_FAST => {
                let x: [u8; 20] = c.payload[..20].try_into().unwrap();
                let answer = kdf::created_fast_payload(&x, &[0x5a; 20]);
                link.send_cell(c.circ, cmd::CREATED_FAST, &answer);
            }
            cmd::RELAY => {
                let (command, stream, body) = c.relay();
                assert_eq!(command, relay_cmd::BEGIN, "{c:?}");
                return (c.circ, stream, body);
            }
            other => panic!("expected BEGIN, got cell command {other}: {c:?}"),
        }
    }
}

fn expect_destroy(link: &mut RawLink, circ: u32, reason: u8) {
    let c = next(link);
    assert_eq!(
        (c.command, c.circ, c.payload[0]),
        (cmd::DESTROY, circ, reason),
        "expected DESTROY({}) on {circ:#x}, got {c:?}",
        destroy_reason::name(reason)
    );
}

/// An application's SOCKS5 CONNECT to `host:port`, sent without waiting for
/// the reply (the method reply is read).
fn socks5_request_only(proxy: SocketAddr, host: &str, port: u16) -> TcpStream {
    let mut s = socks5_greeted(proxy);
    s.write_all(&socks5_request(1, host, port)).unwrap();
    s
}

/// An application's SOCKS4 CONNECT to 192.0.2.1:`port`, sent without
/// waiting for the reply.
fn socks4_request_only(proxy: SocketAddr, port: u16) -> TcpStream {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut r = vec![4, 1];
    r.extend_from_slice(&port.to_be_bytes());
    r.extend_from_slice(&[192, 0, 2, 1]);
    r.extend_from_slice(b"\0");
    s.write_all(&r).unwrap();
    s
}

/// Fails if the application got anything (a SOCKS reply) within `QUIET`.
fn assert_no_reply_yet(app: &mut TcpStream, what: &str) {
    app.set_read_timeout(Some(QUIET)).unwrap();
    let mut b = [0u8; 1];
    match app.read(&mut b) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("{what}: the application got {other:?} before CONNECTED or END"),
    }
    app.set_read_timeout(Some(PATIENCE)).unwrap();
}

/// The SOCKS4 reply's CD byte.
fn read_socks4_reply(app: &mut TcpStream) -> u8 {
    let mut reply = [0u8; 8];
    app.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 0, "SOCKS4 reply VN: {reply:?}");
    reply[1]
}

// ------------------------------------------------------------ §1, §3 link

#[test]
fn the_client_opens_with_versions_4_then_create_fast_on_fresh_circids() {
    // R1.1: the link begins with exactly 00 00 07 00 02 00 04 (checked by
    // `RawLink::accept`); R1.11: plain TCP, and no other handshake cell:
    // the next cell is a CREATE_FAST. R3.1: each circuit's CircID has its
    // most significant bit set and is not in use on the link; R3.2: the
    // payload starts with 20 random bytes X (the KH we compute from them
    // is what the client accepts).
    let (addr, fake) = raw_exit(|mut link| {
        let mut circuits = Vec::new();
        for _ in 0..3 {
            let c = link.recv_cell().expect("CREATE_FAST");
            assert_eq!(c.command, cmd::CREATE_FAST, "{c:?}");
            let x: [u8; 20] = c.payload[..20].try_into().unwrap();
            // The padding: zeros after the offer of flow control v2, which
            // the client makes by default (R14.1).
            assert!(
                congestion::has_mark(&c.payload, congestion::OFFER_AT),
                "R14.1"
            );
            assert!(c.payload[30..].iter().all(|&b| b == 0), "padding");
            let answer = kdf::created_fast_payload(&x, &[0x5a; 20]);
            link.send_cell(c.circ, cmd::CREATED_FAST, &answer);
            circuits.push((c.circ, x));
        }
        (link, circuits)
    });
    let d = Daemon::client(addr, &["--circuits", "3"]);
    let (_link, circuits) = fake.join().unwrap();
    let ids: HashSet<u32> = circuits.iter().map(|&(circ, _)| circ).collect();
    let xs: HashSet<[u8; 20]> = circuits.iter().map(|&(_, x)| x).collect();
    assert_eq!(ids.len(), 3, "CircIDs in use are not chosen again");
    assert!(ids.iter().all(|circ| circ & 0x8000_0000 != 0), "{ids:x?}");
    assert_eq!(xs.len(), 3, "a fresh X for every circuit");
    assert!(!xs.contains(&[0; 20]));
    assert!(d.log().contains("circuits=3"), "{}", d.log());
}

#[test]
fn the_client_closes_a_link_with_no_version_in_common() {
    // R1.3: an exit that lists only version 3 has no version in common
    // with the client, which closes the connection; R1.8: one log line
    // says why.
    let (addr, fake) = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut hello = [0u8; 7];
            sock.read_exact(&mut hello).unwrap();
            sock.write_all(&[0, 0, 7, 0, 2, 0, 3]).unwrap();
            let mut rest = Vec::new();
            // EOF or a reset: either way the client closed it. A timeout
            // means it did not.
            let closed = match sock.read_to_end(&mut rest) {
                Ok(_) => true,
                Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
            };
            assert!(closed, "the client kept the connection open");
            (listener, rest)
        });
        (addr, fake)
    };
    let d = client_unlinked(&addr.to_string());
    let (_listener, rest) = fake.join().unwrap();
    assert!(rest.is_empty(), "the client sent {rest:?} after VERSIONS");
    d.wait_for_log("no common link version");
    assert!(!d.log().contains("link to exit ready"), "{}", d.log());
}

#[test]
fn a_wrong_kh_is_answered_with_destroy_protocol() {
    // R3.4: the client checks KH in CREATED_FAST and, if it is wrong,
    // sends DESTROY(PROTOCOL) for that CircID. The circuit is one the
    // client creates on demand, after its general circuit was destroyed, so
    // the link stays up; the SOCKS request that wanted it gets 0x01.
    let (d, mut link, circ) = client_and_raw_exit();
    link.send_cell(circ, cmd::DESTROY, &[destroy_reason::FINISHED]);
    // The circuit thread logs this after the link forgot the CircID.
    d.wait_for_log("DESTROY(FINISHED) received");
    let mut app = socks5_request_only(d.socks(), "192.0.2.1", 80);
    let c = next(&mut link);
    assert_eq!(c.command, cmd::CREATE_FAST, "{c:?}");
    let x: [u8; 20] = c.payload[..20].try_into().unwrap();
    let mut answer = kdf::created_fast_payload(&x, &[0x5a; 20]);
    answer[25] ^= 1; // a bit of KH
    link.send_cell(c.circ, cmd::CREATED_FAST, &answer);
    expect_destroy(&mut link, c.circ, destroy_reason::PROTOCOL);
    assert_eq!(read_socks5_reply(&mut app), 0x01);
    d.wait_for_log("wrong KH");
}

#[test]
fn a_wrong_kh_on_the_links_first_circuit_is_answered_before_the_link_closes() {
    // R3.4 on the circuit the client creates as the link comes up: the
    // client gives the link up, but only after its DESTROY(PROTOCOL) went
    // out. (It once closed the link at once, which lost the DESTROY when
    // the link writer had not written it yet: a race this test catches
    // only when it loses.)
    let (addr, fake) = raw_exit(|mut link| {
        let c = link.recv_non_sendme().expect("CREATE_FAST");
        assert_eq!(c.command, cmd::CREATE_FAST, "{c:?}");
        let x: [u8; 20] = c.payload[..20].try_into().unwrap();
        let mut answer = kdf::created_fast_payload(&x, &[0x5a; 20]);
        answer[30] ^= 1; // a bit of KH
        link.send_cell(c.circ, cmd::CREATED_FAST, &answer);
        let d = link
            .recv_non_sendme()
            .expect("DESTROY before the link closes");
        (c.circ, d)
    });
    let exit = addr.to_string();
    let d = Daemon::start(
        &["client", "--socks", "127.0.0.1:0", "--exit", &exit],
        false,
        false,
    );
    let (circ, destroy) = fake.join().unwrap();
    assert_eq!(
        (destroy.command, destroy.circ, destroy.payload[0]),
        (cmd::DESTROY, circ, destroy_reason::PROTOCOL)
    );
    d.wait_for_log("wrong KH");
}

#[test]
fn begin_or_resolve_sent_to_the_client_destroys_the_circuit() {
    // R4.7: BEGIN or RESOLVE received by the client is a protocol
    // violation whatever its StreamID: DESTROY(PROTOCOL) (R3.12). A stream
    // waiting for CONNECTED on that circuit gets SOCKS 0x01 (R11.6).
    let (d, mut link, circ) = client_and_raw_exit();
    link.send_relay(circ, relay_cmd::RESOLVE, 7, b"name.example\0");
    expect_destroy(&mut link, circ, destroy_reason::PROTOCOL);
    // A SOCKS request makes the client create a new circuit.
    let mut app = socks5_request_only(d.socks(), "192.0.2.1", 80);
    let (circ, _, _) = next_begin(&mut link);
    let mut body = b"192.0.2.9:80".to_vec();
    body.push(0);
    link.send_relay(circ, relay_cmd::BEGIN, 9, &body);
    expect_destroy(&mut link, circ, destroy_reason::PROTOCOL);
    assert_eq!(read_socks5_reply(&mut app), 0x01);
}

// ------------------------------------------------------------ §5 BEGIN

#[test]
fn begin_payloads_follow_the_grammar_and_stream_ids_are_new() {
    // R5.2: BEGIN payloads match ADDRESS ":" PORT NUL (an IPv4 address, a
    // bracketed IPv6 address, a hostname); R5.1: stream IDs that are not 0
    // and not open on the circuit; R4.2: Recognized and Digest are zero.
    let (d, mut link, circ) = client_and_raw_exit();
    let targets = [
        ("192.0.2.1", "192.0.2.1:80"),
        ("2001:db8::1", "[2001:db8::1]:80"),
        ("name.example", "name.example:80"),
        ("a-b_c.example", "a-b_c.example:80"),
    ];
    let mut apps = Vec::new();
    let mut ids = HashSet::new();
    for (host, want) in targets {
        let app = socks5_request_only(d.socks(), host, 80);
        let c = next(&mut link);
        let p = &c.payload;
        assert_eq!((c.circ, c.command), (circ, cmd::RELAY), "{c:?}");
        assert_eq!(p[0], relay_cmd::BEGIN, "{c:?}");
        assert_eq!(&p[1..3], &[0, 0], "Recognized");
        assert_eq!(&p[5..9], &[0, 0, 0, 0], "Digest");
        let (_, sid, body) = c.relay();
        let mut expected = want.as_bytes().to_vec();
        expected.push(0);
        assert_eq!(body, expected, "BEGIN for {host}");
        relay::parse_begin(&body).expect("a well-formed BEGIN");
        assert_ne!(sid, 0, "R5.1: stream ID 0 is the circuit");
        assert!(ids.insert(sid), "R5.1: stream ID {sid} is open already");
        apps.push((sid, app));
    }
    for (sid, mut app) in apps {
        link.send_relay(circ, relay_cmd::END, sid, &[end_reason::MISC]);
        assert_eq!(read_socks5_reply(&mut app), 0x01);
    }
}

// ------------------------------------------------------------ §11 SOCKS

#[test]
fn socks_replies_wait_for_connected_or_end_and_follow_the_end_reason() {
    // R11.5: no SOCKS reply before the stream's CONNECTED or END; CONNECTED
    // gets 0x00 (SOCKS4: 0x5A). R8.10: an END before CONNECTED is answered
    // with the failure of its reason: R11.7 EXITPOLICY 0x02, R11.8 NOROUTE
    // 0x03, R11.9 RESOLVEFAILED 0x04, R11.10 CONNECTREFUSED 0x05, R11.11
    // TIMEOUT 0x06, R11.12 any other reason (an empty END is MISC) 0x01;
    // R11.14: SOCKS4 failures are 0x5B.
    let (d, mut link, circ) = client_and_raw_exit();
    let cases: [(&[u8], u8); 11] = [
        (&[end_reason::EXITPOLICY], 0x02),
        (&[end_reason::NOROUTE], 0x03),
        (&[end_reason::RESOLVEFAILED], 0x04),
        (&[end_reason::CONNECTREFUSED], 0x05),
        (&[end_reason::TIMEOUT], 0x06),
        (&[end_reason::MISC], 0x01),
        (&[end_reason::TORPROTOCOL], 0x01),
        (&[end_reason::RESOURCELIMIT], 0x01),
        (&[end_reason::HIBERNATING], 0x01),
        (&[end_reason::CONNRESET], 0x01),
        (&[], 0x01),
    ];
    for (end, want) in cases {
        let mut app = socks5_request_only(d.socks(), "192.0.2.1", 80);
        let (_, sid, _) = next_begin(&mut link);
        assert_no_reply_yet(&mut app, &format!("END {end:?}"));
        link.send_relay(circ, relay_cmd::END, sid, end);
        assert_eq!(read_socks5_reply(&mut app), want, "END {end:?}");
    }
    let mut app = socks5_request_only(d.socks(), "192.0.2.1", 80);
    let (_, sid, _) = next_begin(&mut link);
    assert_no_reply_yet(&mut app, "CONNECTED");
    let connected = relay::encode_connected("192.0.2.1".parse().unwrap(), 300);
    link.send_relay(circ, relay_cmd::CONNECTED, sid, &connected);
    assert_eq!(read_socks5_reply(&mut app), 0x00);
    // SOCKS4: 0x5B for a failure, 0x5A for CONNECTED.
    let mut app4 = socks4_request_only(d.socks(), 80);
    let (_, sid, _) = next_begin(&mut link);
    assert_no_reply_yet(&mut app4, "SOCKS4 END");
    link.send_relay(circ, relay_cmd::END, sid, &[end_reason::CONNECTREFUSED]);
    assert_eq!(read_socks4_reply(&mut app4), 0x5B);
    let mut app4 = socks4_request_only(d.socks(), 80);
    let (_, sid, _) = next_begin(&mut link);
    assert_no_reply_yet(&mut app4, "SOCKS4 CONNECTED");
    link.send_relay(circ, relay_cmd::CONNECTED, sid, &connected);
    assert_eq!(read_socks4_reply(&mut app4), 0x5A);
}

#[test]
fn a_circuit_or_link_lost_before_connected_is_socks_0x01() {
    // R11.6: the circuit fails (DESTROY) before CONNECTED or END: 0x01;
    // then the link fails the same way: 0x01.
    let (d, mut link, circ) = client_and_raw_exit();
    let mut app = socks5_request_only(d.socks(), "192.0.2.1", 80);
    next_begin(&mut link);
    link.send_cell(circ, cmd::DESTROY, &[destroy_reason::FINISHED]);
    assert_eq!(read_socks5_reply(&mut app), 0x01, "circuit destroyed");
    // The next request gets a new circuit (`next_begin` answers its
    // CREATE_FAST); this time the link goes.
    let mut app = socks5_request_only(d.socks(), "192.0.2.1", 80);
    next_begin(&mut link);
    drop(link);
    assert_eq!(read_socks5_reply(&mut app), 0x01, "link lost");
}

#[test]
fn the_client_links_again_with_doubling_waits() {
    // R11.16: without a link the client tries again, waiting 250 ms, then
    // twice as long each time (capped at 30 s: a unit test in
    // src/edge/client.rs checks the cap). The waits are read from the log
    // lines, not timed.
    let d = client_unlinked(&format!("127.0.0.1:{}", closed_port()));
    for wait in ["250ms", "500ms", "1s", "2s"] {
        d.wait_for_log(&format!("(retrying in {wait})"));
    }
}

#[test]
fn a_frozen_exit_gets_socks_requests_answered_and_its_link_dropped() {
    // The exit answers CREATE_FAST and then nothing (a stopped process
    // whose kernel still holds the connection): a SOCKS request is
    // answered 0x06 (END(TIMEOUT), R11.11) at --begin-timeout, not left
    // waiting, and since nothing came on the link since its BEGIN, the
    // client drops the link and dials again.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = thread::spawn(move || {
        let mut link = RawLink::accept(&listener);
        link.answer_create_fast();
        let mut seen = Vec::new();
        // Until the client closes the link: what it sent after CREATED_FAST.
        while let Some(c) = link.recv_cell() {
            seen.push(c);
        }
        // The client dials again.
        let again = RawLink::accept(&listener);
        drop(again);
        seen
    });
    let d = Daemon::client(addr, &["--begin-timeout", "1s"]);
    let mut app = socks5_request_only(d.socks(), "192.0.2.1", 80);
    assert_eq!(read_socks5_reply(&mut app), 0x06, "TTL expired (TIMEOUT)");
    let seen = frozen.join().unwrap();
    let relays: Vec<u8> = seen
        .iter()
        .filter(|c| c.command == cmd::RELAY)
        .map(|c| c.relay().0)
        .collect();
    assert_eq!(relays, [relay_cmd::BEGIN, relay_cmd::END], "{seen:?}");
    let end = seen
        .iter()
        .find(|c| c.command == cmd::RELAY && c.relay().0 == relay_cmd::END);
    assert_eq!(end.unwrap().relay().2.first(), Some(&end_reason::TIMEOUT));
    d.wait_for_log("the exit has said nothing");
}
