//! Flow control version 2 (docs/protocol.md §14) over real loopback
//! sockets: the negotiation between v1 and v2 edges, the real daemons
//! end to end, and each edge against a hand-driven peer (a raw client
//! for the exit, a raw exit for the client). Each test names the
//! requirements it checks.

use crate::app::{
    assert_same, curl_fetches_whole, netcat_half_close_gets_reply, payload_request, payload_server,
    payload_sha, read_hashed, sha,
};
use crate::client::raw_exit;
use crate::status::streams_doc;
use crate::util::*;
use halfpipe_proto::cell::{cmd, destroy_reason};
use halfpipe_proto::congestion::{self, CWND_MAX, SENDME_INC};
use halfpipe_proto::relay::{self, relay_cmd};
use halfpipe_proto::xonxoff::{AFTER_XOFF_MAX, XOFF_AT, XOFF_GRACE, XON_AT};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

/// How long a check that nothing arrives watches a socket.
const QUIET: Duration = Duration::from_millis(500);

fn exit_v(flow: &str) -> Daemon {
    Daemon::exit(&[
        "--exit-policy",
        "accept *:*",
        "--link",
        "plain",
        "--flow",
        flow,
        "--status",
        "127.0.0.1:0",
    ])
}

fn client_v(exit: &Daemon, flow: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--link", "plain", "--flow", flow, "--status", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Daemon::client(exit.link.unwrap(), &args)
}

/// The flows of the circuits in a daemon's status document.
fn circuit_flows(d: &Daemon) -> Vec<String> {
    streams_doc(d)["circuits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["flow"].as_str().unwrap().to_owned())
        .collect()
}

/// A half-closed request and its reply through the SOCKS port of `client`:
/// the target reads the request to its end, then answers.
fn request_reply_through(client: &Daemon, request_len: usize, reply_len: usize) {
    let server = Server::request_reply(move |req| {
        let mut r = sha(req).to_vec();
        r.extend_from_slice(&pattern(reply_len, 7));
        r
    });
    let mut s = socks5(client.socks(), "127.0.0.1", server.addr.port(), None).expect("SOCKS");
    let request = pattern(request_len, 3);
    let writer = {
        let mut w = s.try_clone().unwrap();
        let request = request.clone();
        thread::spawn(move || {
            w.write_all(&request).unwrap();
            // R14.12: the FIN follows all of the stream's DATA.
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    writer.join().unwrap();
    assert_eq!(
        &reply[..32],
        &sha(&request),
        "the target got the whole request"
    );
    assert_same(&reply[32..], &pattern(reply_len, 7), "reply after our FIN");
}

// ------------------------------------------------------------ negotiation

#[test]
fn every_mix_of_v1_and_v2_edges_works_and_v2_needs_both() {
    // R14.1, R14.2, R14.3: a circuit runs v2 exactly when the client offers
    // it and the exit accepts it; every other mix runs §10, and a half-closed
    // request gets its whole reply either way (§7 unchanged).
    for (client, exit, want) in [
        ("v1", "v1", "v1"),
        ("v2", "v1", "v1"),
        ("v1", "v2", "v1"),
        ("v2", "v2", "v2"),
    ] {
        let e = exit_v(exit);
        let c = client_v(&e, client, &[]);
        request_reply_through(&c, 3_000_000, 3_000_000);
        let (cf, ef) = (circuit_flows(&c), circuit_flows(&e));
        assert!(!cf.is_empty() && !ef.is_empty(), "circuits at both edges");
        assert!(
            cf.iter().chain(&ef).all(|f| f == want),
            "client {client}, exit {exit}: {cf:?} {ef:?}"
        );
    }
}

#[test]
fn the_exit_accepts_only_the_exact_offer_and_only_with_v2() {
    // R14.2: the acceptance at bytes 40..50 of CREATED_FAST only for an
    // offer, and only from an exit that uses v2.
    let v2 = exit_v("v2");
    let mut link = RawLink::connect(v2.link.unwrap());
    assert!(
        link.create_circuit_v2(fresh_circ()),
        "v2 exit accepts the offer"
    );
    // No offer (a v1 client): no acceptance.
    let circ = fresh_circ();
    let x = halfpipe::link::nonce();
    link.send_cell(circ, cmd::CREATE_FAST, &x);
    let c = link.recv_cell().unwrap();
    assert!(!congestion::has_mark(&c.payload, congestion::ACCEPT_AT));
    // A near miss (flow version 3) is no offer.
    let circ = fresh_circ();
    let mut p = x.to_vec();
    p.extend_from_slice(b"halfpipe\x03\x1f");
    link.send_cell(circ, cmd::CREATE_FAST, &p);
    let c = link.recv_cell().unwrap();
    assert!(!congestion::has_mark(&c.payload, congestion::ACCEPT_AT));
    // A v1 exit ignores the offer.
    let v1 = exit_v("v1");
    let mut link = RawLink::connect(v1.link.unwrap());
    assert!(
        !link.create_circuit_v2(fresh_circ()),
        "v1 exit answers as v1"
    );
}

/// A client with `--flow v2` linked to a raw exit that answers its
/// CREATE_FAST, accepting v2 if `accept`. Returns the daemon, the link and
/// the circuit, after checking the offer (R14.1).
fn client_on_raw_exit(accept: bool) -> (Daemon, RawLink, u32) {
    let (addr, fake) = raw_exit(move |mut link| {
        let c = link.recv_cell().expect("CREATE_FAST");
        assert_eq!(c.command, cmd::CREATE_FAST);
        // R14.1: the offer right after X.
        assert!(
            congestion::has_mark(&c.payload, congestion::OFFER_AT),
            "the offer"
        );
        let x: [u8; 20] = c.payload[..20].try_into().unwrap();
        let mut answer = halfpipe_proto::kdf::created_fast_payload(&x, &[0x5a; 20]);
        if accept {
            congestion::append_mark(&mut answer);
        }
        link.send_cell(c.circ, cmd::CREATED_FAST, &answer);
        (link, c.circ)
    });
    let d = Daemon::client(
        addr,
        &["--link", "plain", "--flow", "v2", "--circuits", "1"],
    );
    let (link, circ) = fake.join().unwrap();
    (d, link, circ)
}

/// Opens a stream from an application on `d`'s SOCKS port through the raw
/// exit: returns the application's socket and the stream ID.
fn app_stream(d: &Daemon, link: &mut RawLink, circ: u32) -> (TcpStream, u16) {
    let proxy = d.socks();
    let app = thread::spawn(move || socks5(proxy, "10.0.0.1", 80, None).expect("SOCKS"));
    let id = loop {
        let c = link.recv_non_sendme().expect("BEGIN");
        if let Some((relay_cmd::BEGIN, id, _)) = relay_of(&c) {
            assert_eq!(c.circ, circ);
            break id;
        }
    };
    link.send_relay(
        circ,
        relay_cmd::CONNECTED,
        id,
        &relay::encode_connected("10.0.0.1".parse().unwrap(), 60),
    );
    (app.join().unwrap(), id)
}

/// The raw exit sends `n` DATA cells of 498 bytes on a new stream, which
/// the application reads whole; returns the stream ID and the relay cells
/// (command, stream) the client sent back until it went quiet.
fn deliver_and_listen(
    d: &Daemon,
    link: &mut RawLink,
    circ: u32,
    n: usize,
) -> (u16, Vec<(u8, u16)>) {
    let (mut app, id) = app_stream(d, link, circ);
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; n * relay::DATA_MAX];
        app.read_exact(&mut got).unwrap();
        app
    });
    let chunk = vec![0x42u8; relay::DATA_MAX];
    for _ in 0..n {
        link.send_relay(circ, relay_cmd::DATA, id, &chunk);
    }
    let mut got = Vec::new();
    while let Some(c) = link.recv_cell_within(QUIET) {
        if let Some((command, stream, _)) = relay_of(&c) {
            got.push((command, stream));
        }
    }
    let _app = reader.join().unwrap();
    (id, got)
}

#[test]
fn a_v2_client_acks_every_31_cells_on_the_circuit_and_never_the_stream() {
    // R14.4: one circuit SENDME per SENDME_INC DATA cells received; R14.8:
    // no stream SENDME, even once the application has read everything.
    let (d, mut link, circ) = client_on_raw_exit(true);
    let (_, got) = deliver_and_listen(&d, &mut link, circ, 124);
    let circuit_sendmes = got.iter().filter(|&&c| c == (relay_cmd::SENDME, 0)).count();
    assert_eq!(circuit_sendmes, 124 / SENDME_INC as usize, "{got:?}");
    assert!(
        !got.iter().any(|&(c, s)| c == relay_cmd::SENDME && s != 0),
        "no stream SENDME: {got:?}"
    );
}

#[test]
fn a_v2_client_whose_offer_is_not_accepted_runs_v1() {
    // R14.3: without the acceptance the circuit runs §10: a stream SENDME
    // once 50 cells are written (R10.3), circuit SENDME at 100 (R10.2).
    let (d, mut link, circ) = client_on_raw_exit(false);
    let (id, got) = deliver_and_listen(&d, &mut link, circ, 100);
    assert!(
        got.contains(&(relay_cmd::SENDME, id)),
        "stream SENDME: {got:?}"
    );
    assert_eq!(
        got.iter().filter(|&&c| c == (relay_cmd::SENDME, 0)).count(),
        1,
        "{got:?}"
    );
}

// ------------------------------------------------------------ the exit's streams

/// A target that accepts one connection with a small receive buffer and
/// reads nothing until told to; then reads everything and reports how much.
struct StalledTarget {
    addr: SocketAddr,
    go: mpsc::Sender<()>,
    done: thread::JoinHandle<usize>,
}

impl StalledTarget {
    fn start() -> StalledTarget {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.listen(1).unwrap();
        let listener: TcpListener = sock.into();
        let addr = listener.local_addr().unwrap();
        let (go, wait) = mpsc::channel();
        let done = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = wait.recv();
            let mut sink = vec![0u8; 1 << 16];
            let mut total = 0;
            while let Ok(n) = s.read(&mut sink) {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        });
        StalledTarget { addr, go, done }
    }
}

/// A raw client's v2 circuit and stream at `exit` to `target`.
fn raw_v2_stream(exit: &Daemon, target: SocketAddr) -> (RawLink, u32, u16) {
    let mut link = RawLink::connect(exit.link.unwrap());
    let circ = fresh_circ();
    assert!(link.create_circuit_v2(circ));
    link.send_relay(circ, relay_cmd::BEGIN, 1, &begin_body(&target.to_string()));
    let c = link.recv_non_sendme().unwrap();
    assert_eq!(
        relay_of(&c).map(|r| r.0),
        Some(relay_cmd::CONNECTED),
        "{c:?}"
    );
    (link, circ, 1)
}

/// Sends DATA on the stream in rounds of SENDME_INC cells until the exit
/// answers with XOFF or `limit` cells have gone; returns the cells sent
/// before XOFF came, if it did.
fn send_until_xoff(link: &mut RawLink, circ: u32, id: u16, limit: usize) -> Option<usize> {
    let chunk = vec![0x42u8; relay::DATA_MAX];
    let mut sent = 0;
    while sent < limit {
        for _ in 0..SENDME_INC {
            link.send_relay(circ, relay_cmd::DATA, id, &chunk);
        }
        sent += SENDME_INC as usize;
        while let Some(c) = link.recv_cell_within(Duration::from_millis(1)) {
            match relay_of(&c) {
                Some((relay_cmd::XOFF, s, body)) if s == id => {
                    assert_eq!(body.first(), Some(&0), "R14.14: version 0");
                    return Some(sent);
                }
                _ => {}
            }
        }
    }
    None
}

#[test]
fn the_exit_sends_xoff_when_its_target_stalls_and_xon_when_it_drains() {
    // R14.9: XOFF once XOFF_AT cells are held unwritten; R14.10: XON once
    // the target reads and few enough are held; every byte arrives.
    let exit = exit_v("v2");
    let target = StalledTarget::start();
    let (mut link, circ, id) = raw_v2_stream(&exit, target.addr);
    // The socket buffers on the way take some megabytes first.
    let sent = send_until_xoff(&mut link, circ, id, 40_000).expect("XOFF");
    let doc = streams_doc(&exit);
    let s = &doc["streams"][0];
    assert_eq!(s["xoff_sent"], true, "{s}");
    let held = s["cells_queued"].as_u64().unwrap();
    assert!(
        held > u64::from(XON_AT) && held <= u64::from(XOFF_AT + AFTER_XOFF_MAX),
        "held {held}"
    );
    target.go.send(()).unwrap();
    let xon = eventually("XON", || {
        let c = link.recv_cell()?;
        match relay_of(&c) {
            Some((relay_cmd::XON, s, body)) if s == id => Some(body),
            _ => None,
        }
    });
    assert_eq!(
        xon,
        vec![0, 0, 0, 0, 0],
        "R14.14: version 0, rate 0 (no limit)"
    );
    let doc = streams_doc(&exit);
    assert!(doc["streams"][0]["cells_queued"].as_u64().unwrap() <= u64::from(XON_AT));
    link.send_relay(circ, relay_cmd::FIN, id, &[]);
    assert_eq!(
        target.done.join().unwrap(),
        sent * relay::DATA_MAX,
        "every byte delivered"
    );
}

#[test]
fn a_sender_that_ignores_xoff_loses_its_circuit_not_the_link() {
    // R14.15: DATA beyond CWND_MAX + XOFF_GRACE cells after XOFF is a violation:
    // DESTROY(PROTOCOL) (R3.12), and the link carries on.
    let exit = exit_v("v2");
    let target = StalledTarget::start();
    let (mut link, circ, id) = raw_v2_stream(&exit, target.addr);
    send_until_xoff(&mut link, circ, id, 40_000).expect("XOFF");
    let chunk = vec![0x42u8; relay::DATA_MAX];
    for _ in 0..=AFTER_XOFF_MAX {
        link.send_relay(circ, relay_cmd::DATA, id, &chunk);
    }
    let destroy = eventually("DESTROY", || {
        let c = link.recv_cell()?;
        (c.command == cmd::DESTROY).then_some(c)
    });
    assert_eq!(
        (destroy.circ, destroy.payload[0]),
        (circ, destroy_reason::PROTOCOL)
    );
    assert!(
        link.create_circuit_v2(fresh_circ()),
        "the link still serves"
    );
    // The target's thread ends once its connection is reset with the circuit.
    drop(target.go);
    target.done.join().unwrap();
}

#[test]
fn the_exit_stops_reading_its_target_on_xoff_until_xon() {
    // R14.11: after XOFF no more DATA on the stream (once what was already
    // sent has come), whatever the congestion window allows; XON resumes.
    let exit = exit_v("v2");
    let server = Server::start(|mut s| {
        let block = vec![0x33u8; 1 << 16];
        while s.write_all(&block).is_ok() {}
    });
    let (mut link, circ, id) = raw_v2_stream(&exit, server.addr);
    // Acknowledge what arrives, as a v2 receiver must (R14.4), so that the
    // congestion window never holds the exit back. Returns the DATA cells
    // that came within `span`.
    let mut received = 0u32;
    let mut pump = |link: &mut RawLink, span: Duration| -> u32 {
        let deadline = std::time::Instant::now() + span;
        let mut data = 0;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return data;
            }
            let Some(c) = link.recv_cell_within(left) else {
                return data;
            };
            if let Some((relay_cmd::DATA, s, _)) = relay_of(&c) {
                assert_eq!(s, id);
                data += 1;
                received += 1;
                if received % SENDME_INC == 0 {
                    link.send_relay(circ, relay_cmd::SENDME, 0, &[]);
                }
            }
        }
    };
    assert!(
        pump(&mut link, Duration::from_millis(200)) > 0,
        "DATA flows"
    );
    link.send_relay(circ, relay_cmd::XOFF, id, &[0]);
    // What was in flight drains (at most a congestion window); then nothing.
    let mut drained = 0;
    loop {
        let n = pump(&mut link, QUIET);
        if n == 0 {
            break;
        }
        drained += n;
        assert!(
            drained <= CWND_MAX + XOFF_GRACE,
            "DATA keeps coming after XOFF"
        );
    }
    assert_eq!(pump(&mut link, QUIET), 0, "DATA after XOFF");
    link.send_relay(circ, relay_cmd::XON, id, &[0, 0, 0, 0, 0]);
    assert!(
        pump(&mut link, Duration::from_millis(500)) > 0,
        "DATA again after XON"
    );
}

// ------------------------------------------------------------ hostile cells

/// Sends `cells` on a fresh circuit (v2 if `v2`) with one open stream,
/// then says whether the exit destroyed the circuit with PROTOCOL.
fn destroys(exit: &Daemon, v2: bool, cells: &[(u8, u16, &[u8])]) -> bool {
    let server = Server::echo();
    let mut link = RawLink::connect(exit.link.unwrap());
    let circ = fresh_circ();
    if v2 {
        assert!(link.create_circuit_v2(circ));
    } else {
        link.create_circuit(circ);
    }
    link.send_relay(
        circ,
        relay_cmd::BEGIN,
        1,
        &begin_body(&server.addr.to_string()),
    );
    assert_eq!(
        relay_of(&link.recv_non_sendme().unwrap()).unwrap().0,
        relay_cmd::CONNECTED
    );
    for &(command, stream, body) in cells {
        link.send_relay(circ, command, stream, body);
    }
    let mut destroyed = false;
    while let Some(c) = link.recv_cell_within(QUIET) {
        if c.command == cmd::DESTROY && c.circ == circ {
            assert_eq!(c.payload[0], destroy_reason::PROTOCOL);
            destroyed = true;
        }
    }
    if !destroyed {
        // The circuit still works: the echo answers.
        link.send_relay(circ, relay_cmd::DATA, 1, b"still there");
        let echo = eventually("echo", || {
            let c = link.recv_cell()?;
            matches!(relay_of(&c), Some((relay_cmd::DATA, 1, _))).then(|| relay_of(&c).unwrap().2)
        });
        assert_eq!(echo, b"still there");
    }
    destroyed
}

#[test]
fn hostile_flow_cells_destroy_only_their_circuit() {
    let exit = exit_v("v2");
    // R14.8: a stream SENDME on a v2 circuit.
    assert!(destroys(&exit, true, &[(relay_cmd::SENDME, 1, &[])]));
    // R14.6: a circuit SENDME for cells never sent.
    assert!(destroys(&exit, true, &[(relay_cmd::SENDME, 0, &[])]));
    // R14.14: XOFF on stream 0, XON too short, XOFF of another version.
    assert!(destroys(&exit, true, &[(relay_cmd::XOFF, 0, &[0])]));
    assert!(destroys(&exit, true, &[(relay_cmd::XON, 1, &[0, 0, 0])]));
    assert!(destroys(&exit, true, &[(relay_cmd::XOFF, 1, &[1])]));
    // R14.13: XOFF and XON for a stream that is not open: dropped.
    assert!(!destroys(
        &exit,
        true,
        &[
            (relay_cmd::XOFF, 9, &[0]),
            (relay_cmd::XON, 9, &[0, 0, 0, 0, 0])
        ]
    ));
    // R14.16: on a v1 circuit even malformed ones are dropped, and an XOFF
    // holds nothing back (the echo still answers).
    assert!(!destroys(
        &exit,
        false,
        &[(relay_cmd::XOFF, 0, &[]), (relay_cmd::XOFF, 1, &[0])]
    ));
    // R14.11 on the wire: an XON without an XOFF changes nothing.
    assert!(!destroys(
        &exit,
        true,
        &[(relay_cmd::XON, 1, &[0, 0, 0, 0, 0])]
    ));
    // Each destroyed circuit counted once: the two SENDMEs, the short XON
    // and the XOFF of version 1 as flow_control, XOFF on stream 0 apart.
    let text = metrics_text(&exit);
    assert_metric(
        &text,
        "halfpipe_protocol_violations_total{kind=\"flow_control\"}",
        4.0,
    );
    assert_metric(
        &text,
        "halfpipe_protocol_violations_total{kind=\"stream_zero\"}",
        1.0,
    );
}

// ------------------------------------------------------------ both daemons

#[test]
fn a_stalled_reader_is_held_back_while_its_circuit_neighbour_runs() {
    // R14.9 to R14.11 end to end: a download whose application stops reading
    // holds no more than R14.15 allows at the client (sampled for a second
    // after the XOFF, as the cells in flight land), and the exit stops
    // packaging it (XOFF received), while a second
    // stream on the same circuit completes; then the stalled reader reads
    // and gets every byte.
    let exit = exit_v("v2");
    let client = client_v(&exit, "v2", &["--circuits", "1"]);
    let big = 64 << 20;
    let server = payload_server(Arc::new(AtomicUsize::new(0)));
    let open = |id: u32, len: usize| {
        let mut s = socks5(client.socks(), "127.0.0.1", server.addr.port(), None).unwrap();
        s.write_all(&payload_request(id, len)).unwrap();
        s
    };
    let mut stalled = open(1, big);
    // The cells the client holds for a stream it has said XOFF on.
    let held_after_xoff = || {
        let doc = streams_doc(&client);
        let s = doc["streams"]
            .as_array()?
            .iter()
            .find(|s| s["xoff_sent"] == true)?
            .clone();
        s["cells_queued"].as_u64()
    };
    let mut most = eventually("XOFF at the client", held_after_xoff);
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(50));
        most = most.max(held_after_xoff().unwrap_or(0));
    }
    // The run of DATA that crossed XOFF_AT is at most a link read (512
    // cells) on top of the bound.
    let bound = u64::from(XOFF_AT + 512 + AFTER_XOFF_MAX);
    assert!(
        most >= u64::from(XOFF_AT) && most <= bound,
        "held {most}, bound {bound}"
    );
    eventually("XOFF at the exit", || {
        let doc = streams_doc(&exit);
        doc["streams"]
            .as_array()?
            .iter()
            .any(|s| s["xoff_received"] == true)
            .then_some(())
    });
    let mut other = open(2, 16 << 20);
    assert_eq!(
        read_hashed(&mut other, "the neighbour's download"),
        (16 << 20, payload_sha(2, 16 << 20)),
        "the neighbour's download"
    );
    assert_eq!(circuit_flows(&client), vec!["v2"], "one v2 circuit");
    assert_eq!(
        read_hashed(&mut stalled, "the stalled download"),
        (big, payload_sha(1, big)),
        "the stalled download, once read"
    );
}

#[test]
fn curl_through_v2_edges() {
    // A real client over a v2 circuit: the body arrives whole.
    let exit = exit_v("v2");
    let client = client_v(&exit, "v2", &[]);
    curl_fetches_whole(&client, "--socks5-hostname", 5_000_000);
    assert_eq!(circuit_flows(&client), vec!["v2"]);
}

#[test]
fn netcat_half_close_over_v2_edges() {
    // R14.12, §7: nc -N shuts its write side after stdin; the reply after
    // that comes back whole over a v2 circuit.
    let exit = exit_v("v2");
    let client = client_v(&exit, "v2", &[]);
    netcat_half_close_gets_reply(&client, 1_000_000, 2_000_000);
    assert_eq!(circuit_flows(&client), vec!["v2"]);
}
