//! Regression tests for defects found in review, each named after what
//! went wrong.

use crate::util::*;
use halfpipe_proto::cell::cmd;
use halfpipe_proto::relay::{self, relay_cmd};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::thread;
use std::time::Duration;

/// R3.13: a stream that reached CLOSED (both FINs) while its
/// deliverer is still blocked writing to a target that does not read must
/// not hold up circuit teardown (it once waited forever to join that
/// deliverer), nor shutdown.
#[test]
fn teardown_does_not_hang_on_a_closed_stream_still_writing() {
    // The target half-closes at once and never reads.
    let (parked_tx, parked_rx) = std::sync::mpsc::channel();
    let target = Server::start(move |s| {
        s.shutdown(Shutdown::Write).unwrap();
        let _ = parked_tx.send(s); // kept open, never read
    });
    let mut d = Daemon::exit(&["--exit-policy", "accept *:*", "--grace", "1s"]);
    let baseline = d.thread_count();
    let mut link = RawLink::connect(d.link());
    let circ = 0x8000_0001;
    link.create_circuit(circ);
    link.send_relay(
        circ,
        relay_cmd::BEGIN,
        1,
        &begin_body(&target.addr.to_string()),
    );
    let mut got_fin = false;
    let mut window: i64 = 500; // our stream package window (§10)
    let data = [0x5au8; relay::DATA_MAX];
    let mut sent = 0u64;
    // Send DATA while the window allows; the target's buffers fill up, the
    // exit's deliverer blocks, SENDMEs stop and our window runs out.
    loop {
        while window > 0 {
            link.send_relay(circ, relay_cmd::DATA, 1, &data);
            window -= 1;
            sent += 1;
        }
        match link.recv_cell_within(Duration::from_secs(1)) {
            Some(c) if c.command == cmd::RELAY => match c.relay() {
                (relay_cmd::SENDME, 1, _) => window += 50,
                (relay_cmd::FIN, 1, _) => got_fin = true,
                _ => {}
            },
            Some(_) => {}
            None if got_fin => break, // window exhausted and quiet
            None => {}
        }
        assert!(sent < 1_000_000, "the target absorbed 500 MB?");
    }
    let _parked = parked_rx.recv().unwrap();
    // Our FIN: the exit's stream is now CLOSED (R7.5), its deliverer
    // still blocked behind hundreds of cells.
    link.send_relay(circ, relay_cmd::FIN, 1, &[]);
    d.wait_for_log("DONE_PACKAGING => CLOSED (FinReceived)");
    drop(link);
    // Losing the link tears the circuit down (§3) and every thread ends.
    d.wait_for_log("link closed");
    d.wait_for_threads(baseline);
    d.signal(libc::SIGINT);
    assert!(d.wait_exit(PATIENCE).success(), "{}", d.log());
}

/// docs/protocol.md §3 and docs/design.md, invariant 1: an exit that
/// answers one CREATE_FAST with several CREATED_FAST cells must not wedge
/// the client's link reader (it once blocked on a full channel while
/// holding a lock).
#[test]
fn duplicate_created_fast_does_not_wedge_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let exit = listener.local_addr().unwrap();
    let fake = thread::spawn(move || {
        let mut link = RawLink::accept(&listener);
        let c = link.recv_cell().expect("CREATE_FAST");
        assert_eq!(c.command, cmd::CREATE_FAST);
        let x: [u8; 20] = c.payload[..20].try_into().unwrap();
        let answer = halfpipe_proto::kdf::created_fast_payload(&x, &[0x5a; 20]);
        for _ in 0..3 {
            link.send_cell(c.circ, cmd::CREATED_FAST, &answer);
        }
        // The client must still use the circuit: a BEGIN arrives.
        let begin = link.recv_non_sendme().expect("BEGIN");
        assert_eq!(begin.relay().0, relay_cmd::BEGIN);
        link
    });
    let d = Daemon::client(exit, &[]);
    // A SOCKS request makes the client send BEGIN; the fake exit never
    // answers it, so only the BEGIN matters here.
    let proxy = d.socks();
    let req = thread::spawn(move || socks5(proxy, "example.com", 80, None));
    let _link = fake.join().expect("the client sent BEGIN after duplicates");
    drop(req);
    assert!(!d.log().contains("panicked"));
}

/// R9.3: after the client aborts a stream before CONNECTED, the exit's
/// DATA and FIN for it are late cells, dropped silently (and so is its
/// CONNECTED); they once destroyed the whole circuit as "DATA before
/// CONNECTED".
#[test]
fn late_cells_after_an_abort_before_connected_are_dropped() {
    let (d, mut link, circ) = client_with_raw_exit();

    // Stream 1: the application resets before the exit answers.
    let mut app = std::net::TcpStream::connect(d.socks()).unwrap();
    app.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    app.read_exact(&mut m).unwrap();
    app.write_all(&socks5_request(1, "one.example", 80))
        .unwrap();
    let begin = link.recv_non_sendme().expect("BEGIN");
    let (command, sid, _) = begin.relay();
    assert_eq!(command, relay_cmd::BEGIN);
    socket2::SockRef::from(&app)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(app);
    let end = link.recv_non_sendme().expect("END after the reset");
    assert_eq!(end.relay().0, relay_cmd::END);
    assert_eq!(end.relay().1, sid);

    // The exit had already answered: CONNECTED, DATA, FIN arrive late.
    link.send_relay(
        circ,
        relay_cmd::CONNECTED,
        sid,
        &relay::encode_connected("192.0.2.1".parse().unwrap(), 60),
    );
    link.send_relay(circ, relay_cmd::DATA, sid, b"banner");
    link.send_relay(circ, relay_cmd::FIN, sid, &[]);

    // Stream 2 on the same circuit still works: BEGIN, CONNECTED, data.
    let proxy = d.socks();
    let app2 = thread::spawn(move || {
        let mut s = socks5(proxy, "two.example", 80, None).expect("stream 2 connects");
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        got
    });
    let begin = loop {
        let c = link.recv_non_sendme().expect("BEGIN of stream 2");
        assert_ne!(c.command, cmd::DESTROY, "circuit destroyed by a late cell");
        if c.relay().0 == relay_cmd::BEGIN {
            break c;
        }
    };
    let sid2 = begin.relay().1;
    link.send_relay(
        circ,
        relay_cmd::CONNECTED,
        sid2,
        &relay::encode_connected("192.0.2.2".parse().unwrap(), 60),
    );
    link.send_relay(circ, relay_cmd::DATA, sid2, b"hello");
    assert_eq!(&app2.join().unwrap(), b"hello");
    assert!(!d.log().contains("protocol violation"), "{}", d.log());
}

/// A peer that sends requests but never reads the answers must not make
/// the exit queue answers without bound: past the cap the link is closed,
/// and other links carry on. (Found in review; each CREATE is answered
/// with a 514-byte DESTROY.)
#[test]
fn peer_that_never_reads_is_cut_off() {
    let d = Daemon::exit(&[]);
    let mut hostile = RawLink::connect(d.link());
    // We never read: the exit's answers fill the socket buffers (a few
    // MB on loopback), then its queue. (A tiny SO_RCVBUF here made the
    // kernel stall our own sends for seconds: left at the default.)
    hostile.sock.set_write_timeout(Some(PATIENCE)).unwrap();
    let mut cells = Vec::new();
    for i in 0..1000u32 {
        halfpipe_proto::cell::encode_fixed(&mut cells, 0x8000_0000 | i, cmd::CREATE, &[]);
    }
    let mut closed = false;
    for _ in 0..200 {
        // 200 x 1000 CREATE cells = 100 MiB of DESTROY answers at most.
        if hostile.sock.write_all(&cells).is_err() {
            closed = true;
            break;
        }
        if d.log().contains("peer is not reading") {
            closed = true;
            break;
        }
    }
    assert!(closed, "the exit kept queueing answers:\n{}", d.log());
    d.wait_for_log("peer is not reading");
    // Another link is served as usual.
    let mut good = RawLink::connect(d.link());
    good.create_circuit(0x8000_0001);
}

/// R3.7: a CircID is free again once its circuit has been destroyed; R3.11:
/// nothing of the old circuit may pass for the new one's. A peer that destroys
/// a circuit and creates a new one on the same CircID at once must see nothing
/// of the old circuit after the new CREATED_FAST: the old stream's packager,
/// busy sending DATA, once queued cells after the CircID was freed, so the new
/// circuit got the old one's DATA. (Found by
/// `hostile::random_well_framed_cells_*`; so was the circuit-initiated variant,
/// a DESTROY(PROTOCOL) queued after the new circuit's CREATED_FAST.)
#[test]
fn nothing_of_a_destroyed_circuit_follows_a_new_one_on_its_circid() {
    // A target that sends as fast as the exit reads.
    let target = Server::start(|mut s| {
        let chunk = vec![0x5A; 64 * 1024];
        while s.write_all(&chunk).is_ok() {}
    });
    let d = Daemon::exit(&["--exit-policy", "accept *:*"]);
    let mut l = RawLink::connect(d.link());
    let circ = 0x8000_0abc;
    for round in 0..30 {
        l.create_circuit(circ);
        l.send_relay(
            circ,
            relay_cmd::BEGIN,
            1,
            &begin_body(&target.addr.to_string()),
        );
        // Keep the packager busy: give its windows back as DATA comes
        // (§10), then, with fresh window in hand, destroy and re-create in
        // the same write as the last SENDMEs.
        let mut out = Vec::new();
        let mut data = 0;
        while data < 400 {
            let c = l.recv_cell().expect("link open");
            if c.circ == circ && c.command == cmd::RELAY && c.relay().0 == relay_cmd::DATA {
                data += 1;
                if data % 50 == 0 {
                    relay::encode(&mut out, circ, relay_cmd::SENDME, 1, &[]);
                }
                if data % 100 == 0 {
                    relay::encode(&mut out, circ, relay_cmd::SENDME, 0, &[]);
                }
                if data < 400 && !out.is_empty() {
                    l.sock.write_all(&out).unwrap();
                    out.clear();
                }
            }
        }
        halfpipe_proto::cell::encode_fixed(&mut out, circ, cmd::DESTROY, &[0]);
        halfpipe_proto::cell::encode_fixed(&mut out, circ, cmd::CREATE_FAST, &[1; 20]);
        l.sock.write_all(&out).unwrap();
        // Old DATA may come until the new CREATED_FAST; nothing after it.
        loop {
            let c = l.recv_cell().expect("link open");
            if c.circ == circ && c.command == cmd::CREATED_FAST {
                break;
            }
        }
        l.send_relay(circ, relay_cmd::BEGIN, 9, b"ping");
        loop {
            let c = l.recv_cell().expect("link open");
            assert!(
                c.circ != circ || c.command == cmd::RELAY,
                "round {round}: cell {} on the new circuit",
                c.command
            );
            let (command, stream, _) = c.relay();
            assert!(
                stream != 1,
                "round {round}: the new circuit got the old stream's {}",
                relay::relay_cmd::name(command)
            );
            if stream == 9 {
                break; // END(TORPROTOCOL) for the ping: all sent before it seen
            }
        }
        l.send_cell(circ, cmd::DESTROY, &[0]);
    }
}

/// R5.20: the exit answers a BEGIN with CONNECTED (or END) before anything
/// else of the stream, so DATA first is a protocol violation that destroys
/// the circuit; after CONNECTED the same DATA is delivered. (The circuit thread remembers CONNECTED per stream to skip the
/// stream's lock for each DATA cell: this checks both sides of that shortcut.)
#[test]
fn data_before_connected_destroys_the_circuit_and_after_it_is_delivered() {
    let (d, mut link, circ) = client_with_raw_exit();
    let open = |link: &mut RawLink| {
        let proxy = d.socks();
        let app = thread::spawn(move || {
            let mut s = socks5(proxy, "one.example", 80, None).ok()?;
            let mut got = [0u8; 5];
            s.read_exact(&mut got).ok().map(|_| got)
        });
        // The previous stream's FIN or END may come first.
        let begin = loop {
            let c = link.recv_non_sendme().expect("BEGIN");
            assert_ne!(c.command, cmd::DESTROY, "circuit destroyed early");
            if c.relay().0 == relay_cmd::BEGIN {
                break c;
            }
        };
        (app, begin.relay().1)
    };

    // After CONNECTED: delivered.
    let (app, sid) = open(&mut link);
    let connected = relay::encode_connected("192.0.2.1".parse().unwrap(), 60);
    link.send_relay(circ, relay_cmd::CONNECTED, sid, &connected);
    link.send_relay(circ, relay_cmd::DATA, sid, b"hello");
    assert_eq!(app.join().unwrap(), Some(*b"hello"));

    // Before CONNECTED: DESTROY(PROTOCOL), and the application gets no data.
    let (app, sid) = open(&mut link);
    link.send_relay(circ, relay_cmd::DATA, sid, b"early");
    let destroy = loop {
        let c = link.recv_non_sendme().expect("DESTROY");
        if c.command == cmd::DESTROY {
            break c;
        }
    };
    assert_eq!(destroy.circ, circ);
    assert_eq!(
        destroy.payload[0],
        halfpipe_proto::cell::destroy_reason::PROTOCOL
    );
    assert_eq!(app.join().unwrap(), None);
    assert!(d.log().contains("DATA before CONNECTED"), "{}", d.log());
}

/// A client daemon linked to a raw exit (this test), which has answered
/// its CREATE_FAST: the daemon, the link and the circuit's CircID.
fn client_with_raw_exit() -> (Daemon, RawLink, u32) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let exit = listener.local_addr().unwrap();
    let fake = thread::spawn(move || {
        let mut link = RawLink::accept(&listener);
        let circ = link.answer_create_fast();
        (link, circ)
    });
    let d = Daemon::client(exit, &[]);
    let (link, circ) = fake.join().unwrap();
    (d, link, circ)
}

/// R10.8, R10.9 at the client edge: once the packager has stopped at a
/// stream package window of 0, one SENDME (50 cells) must let it go on (a
/// held-out check once found that it did not). The application sends far
/// more than a window; the raw exit sees exactly 500 DATA cells, then after
/// each single SENDME exactly 50 more.
#[test]
fn the_client_resumes_after_one_stream_sendme_at_a_window_of_zero() {
    let (d, mut link, circ) = client_with_raw_exit();
    let proxy = d.socks();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let app = thread::spawn(move || {
        let mut s = socks5(proxy, "bulk.example", 80, None).expect("SOCKS connect");
        opened_tx.send(()).unwrap();
        // Ten windows' worth: the packager must stop long before the end.
        let _ = s.write_all(&vec![7u8; 5000 * 498]);
        s
    });
    let begin = link.recv_non_sendme().expect("BEGIN");
    let sid = begin.relay().1;
    let connected = relay::encode_connected("192.0.2.1".parse().unwrap(), 60);
    link.send_relay(circ, relay_cmd::CONNECTED, sid, &connected);
    opened_rx.recv().unwrap();
    // Counts the DATA cells of the stream until none comes for a while.
    let count_data = |link: &mut RawLink| {
        let mut n = 0;
        while let Some(c) = link.recv_cell_within(Duration::from_millis(700)) {
            if c.command == cmd::RELAY && c.relay().0 == relay_cmd::DATA {
                assert_eq!(c.relay().1, sid);
                n += 1;
            }
        }
        n
    };
    assert_eq!(count_data(&mut link), 500, "the stream window's 500 cells");
    for round in 1..=3 {
        link.send_relay(circ, relay_cmd::SENDME, sid, &[]);
        assert_eq!(count_data(&mut link), 50, "after SENDME {round}: 50 more");
    }
    link.send_relay(circ, relay_cmd::END, sid, &[relay::end_reason::DONE]);
    drop(app.join().unwrap());
}
