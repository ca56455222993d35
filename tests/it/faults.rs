//! Faults: targets and applications that reset mid-transfer, an
//! exit killed with SIGKILL, a link cut under the daemons, and the default
//! exit policy against every spelling of a private address. (A peer that
//! exhausts the process's threads has a test binary of its own:
//! `tests/exhaustion.rs`.) In each, the fault reaches exactly the
//! streams it belongs to (docs/protocol.md §8: as a reset, never as a short
//! EOF), every other stream's bytes arrive intact (SHA-256), and nothing
//! hangs: the daemons' stream threads end.

use crate::app::*;
use crate::util::*;
use halfpipe_proto::relay::{end_reason, relay_cmd};
use socket2::SockRef;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Other users' streams during a fault: each asks the payload server for
/// `len` bytes, half-closes, and checks what comes back by SHA-256.
fn bystanders(d: &Daemon, server: &Server, n: u32, len: usize) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let mut s = open(d, server.addr.port());
            let id = 1_000 + i;
            thread::spawn(move || {
                s.write_all(&payload_request(id, len)).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let (got, hash) = read_hashed(&mut s, "a bystander stream");
                assert_eq!(got, len, "bystander {id}: bytes");
                assert!(hash == payload_sha(id, len), "bystander {id}: corrupted");
            })
        })
        .collect()
}

fn join_all(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        h.join().expect("a bystander stream failed");
    }
}

/// Stream threads (`pk C.S`, `dl C.S`) of a daemon.
fn stream_threads(d: &Daemon) -> usize {
    d.thread_names()
        .iter()
        .filter(|n| n.starts_with("pk ") || n.starts_with("dl "))
        .count()
}

fn wait_no_stream_threads(d: &Daemon, what: &str) {
    eventually(&format!("{what}: stream threads end"), || {
        (stream_threads(d) == 0).then_some(())
    });
}

// --------------------------------------------------- resets mid-transfer

fn target_reset_mid_transfer_reaches_only_its_application() {
    // R8.2, R8.8: the target resets after about 1 MiB of a 64 MiB reply;
    // its application sees a reset; three bystanders on the same circuit
    // get their 16 MiB intact.
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let stop_rx = Mutex::new(stop_rx);
    let faulty = Server::start(move |mut s| {
        let stop = stop_rx.lock().unwrap();
        for c in payload_chunks(7, 64 * MIB) {
            if stop.try_recv().is_ok() || s.write_all(&c).is_err() {
                break;
            }
        }
        SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    });
    let server = payload_server(Arc::new(AtomicUsize::new(0)));
    let (_exit, client) = {
        let exit = Daemon::exit(&["--exit-policy", "accept *:*"]);
        let client = Daemon::client(exit.link(), &[]);
        (exit, client)
    };
    let others = bystanders(&client, &server, 3, 16 * MIB);
    let mut s = open(&client, faulty.addr.port());
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if got < MIB && got + n >= MIB {
                    stop_tx.send(()).unwrap();
                }
                got += n;
            }
            Err(e) => break Err(e),
        }
    };
    let err = end.expect_err("a reset, not EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(
        (MIB..64 * MIB).contains(&got),
        "{got} bytes before the reset"
    );
    join_all(others);
    wait_no_stream_threads(&client, "client");
}

fn application_reset_mid_transfer_reaches_only_its_target() {
    // R8.2, R8.8 the other way: the application resets while its target
    // sends a large reply; the target's writes fail with a reset; the
    // bystanders' bytes arrive intact.
    let (tx, rx) = mpsc::channel();
    let faulty = Server::start(move |mut s| {
        let end = payload_chunks(8, 256 * MIB).try_for_each(|c| s.write_all(&c));
        tx.send(end.map_err(|e| e.kind())).unwrap();
    });
    let server = payload_server(Arc::new(AtomicUsize::new(0)));
    let exit = Daemon::exit(&["--exit-policy", "accept *:*"]);
    let client = Daemon::client(exit.link(), &[]);
    let others = bystanders(&client, &server, 3, 16 * MIB);
    let mut s = open(&client, faulty.addr.port());
    let mut first = vec![0u8; MIB];
    s.read_exact(&mut first).unwrap();
    reset(s);
    let end = rx.recv_timeout(PATIENCE).expect("the target's writes end");
    assert!(
        matches!(
            end,
            Err(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
        ),
        "the target's write ended with {end:?}"
    );
    join_all(others);
    wait_no_stream_threads(&exit, "exit");
    wait_no_stream_threads(&client, "client");
}

// ------------------------------------------------------ the exit is killed

fn exit_killed_mid_transfer_resets_applications_and_the_client_recovers() {
    // R3.13: losing the link aborts its streams as in §8. The exit gets
    // SIGKILL while three streams are mid-transfer: each application sees
    // a reset, a new SOCKS request is refused at once (R11.15: 0x01), and
    // the client links again when an exit listens again (R11.16). The
    // times are printed for the closing note, not asserted (shared, noisy
    // machines).
    let addr = format!("127.0.0.1:{}", free_port_below_ephemeral());
    let server = payload_server(Arc::new(AtomicUsize::new(0)));
    let exit = exit_on(&addr);
    let client = Daemon::client(exit.link(), &[]);
    let (tx, rx) = mpsc::channel();
    for i in 0..3u32 {
        let mut s = open(&client, server.addr.port());
        let tx = tx.clone();
        thread::spawn(move || {
            s.write_all(&payload_request(i, 1 << 40)).unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0usize;
            let end = loop {
                match s.read(&mut buf) {
                    Ok(0) => break Ok(got),
                    Ok(n) => got += n,
                    Err(e) => break Err(e.kind()),
                }
            };
            tx.send((got, end, Instant::now())).unwrap();
        });
    }
    // Mid-transfer: each stream has moved data.
    thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    drop(exit); // SIGKILL
    for _ in 0..3 {
        let (got, end, at) = rx.recv_timeout(PATIENCE).expect("every stream ends");
        assert!(got > 0, "a stream moved nothing before the kill");
        assert_eq!(
            end,
            Err(io::ErrorKind::ConnectionReset),
            "after {got} bytes"
        );
        eprintln!(
            "kill -9 of the exit: application saw the reset after {:?}",
            at - killed
        );
    }
    client.wait_for_log("link to exit lost");
    let asked = Instant::now();
    assert_eq!(
        socks5(client.socks(), "127.0.0.1", server.addr.port(), None).unwrap_err(),
        0x01
    );
    eprintln!(
        "kill -9 of the exit: a new SOCKS request was refused in {:?}",
        asked.elapsed()
    );
    wait_no_stream_threads(&client, "client");
    let _exit = exit_on(&addr);
    eventually("the client links again", || {
        (client.log_count("link to exit ready") >= 2).then_some(())
    });
    let mut s = open(&client, server.addr.port());
    s.write_all(&payload_request(9, MIB)).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, hash) = read_hashed(&mut s, "after the exit came back");
    assert_eq!((got, hash), (MIB, payload_sha(9, MIB)));
}

// ------------------------------------------------------------ the link cut

/// A TCP relay between client and exit whose connections the test can cut.
struct Cutter {
    addr: std::net::SocketAddr,
    /// (client side, exit side) of every relayed connection.
    conns: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
}

fn cutter(exit: std::net::SocketAddr) -> Cutter {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(Mutex::new(Vec::new()));
    let keep = conns.clone();
    thread::spawn(move || {
        for a in listener.incoming() {
            let Ok(a) = a else { break };
            let Ok(b) = TcpStream::connect(exit) else {
                continue;
            };
            for (mut from, mut to) in [
                (a.try_clone().unwrap(), b.try_clone().unwrap()),
                (b.try_clone().unwrap(), a.try_clone().unwrap()),
            ] {
                thread::spawn(move || {
                    let _ = io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
            keep.lock().unwrap().push((a, b));
        }
    });
    Cutter { addr, conns }
}

fn a_cut_link_resets_streams_and_the_client_links_again() {
    // R3.13: when a link is lost, each side tears down every circuit that
    // was on it, aborting their streams as in §8. The TCP connection under
    // the link is cut, first both ways (shutdown of both directions), then
    // only from the client towards the exit (the exit reads EOF but could
    // still write): both edges must see the link as lost, reset every
    // stream, end its threads, and the client must link again.
    let server = payload_server(Arc::new(AtomicUsize::new(0)));
    let exit = Daemon::exit(&["--exit-policy", "accept *:*"]);
    let cut = cutter(exit.link());
    let client = Daemon::client(cut.addr, &exit.link_args());
    for (round, both) in [(1usize, true), (2, false)] {
        let mut streams: Vec<TcpStream> = (0..3)
            .map(|i| {
                let mut s = open(&client, server.addr.port());
                s.write_all(&payload_request(i, 1 << 40)).unwrap();
                let mut first = vec![0u8; 64 * 1024];
                s.read_exact(&mut first).unwrap();
                s
            })
            .collect();
        {
            let conns = cut.conns.lock().unwrap();
            let (to_client, to_exit) = conns.last().unwrap();
            // Cutting one side may already have closed the other (the
            // relay's copy thread ends): NotConnected is a cut link too.
            let cut_ok = |r: io::Result<()>| match r {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => panic!("cut: {e}"),
                _ => {}
            };
            if both {
                cut_ok(to_client.shutdown(Shutdown::Both));
                cut_ok(to_exit.shutdown(Shutdown::Both));
            } else {
                cut_ok(to_exit.shutdown(Shutdown::Write));
            }
        }
        for s in &mut streams {
            let (_, end) = read_until_end(s);
            let err = end.expect_err("a reset, not EOF, when the link is cut");
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "round {round}");
        }
        wait_no_stream_threads(&exit, "exit");
        wait_no_stream_threads(&client, "client");
        eventually("the client links again", || {
            (client.log_count("link to exit ready") > round).then_some(())
        });
        let mut s = open(&client, server.addr.port());
        s.write_all(&payload_request(50, MIB)).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (got, hash) = read_hashed(&mut s, "after the cut");
        assert_eq!((got, hash), (MIB, payload_sha(50, MIB)), "round {round}");
    }
    assert!(exit.log_count("link closed") >= 2, "{}", exit.log());
}

// ------------------------------------------------------------- exit policy

fn default_exit_policy_refuses_private_addresses_in_every_spelling() {
    // R5.6: the exit policy refuses → END(EXITPOLICY); R5.3: checked
    // against the addresses a name resolves to. The default
    // `reject private:*,accept *:*` refuses loopback, RFC 1918,
    // carrier-grade NAT, link-local, "this network", unique-local IPv6,
    // IPv4-mapped IPv6 forms of them, and hostnames that resolve to them,
    // including the numeric spellings getaddrinfo accepts without DNS
    // (127.1, 0x7f000001, 2130706433, 10.1). None is connected.
    let d = Daemon::exit(&[]);
    let mut l = RawLink::connect(d.link());
    let circ = fresh_circ();
    l.create_circuit(circ);
    let targets = [
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "127.0.0.2",
        "[::ffff:10.1.2.3]",
        "[::ffff:192.168.0.1]",
        "[::ffff:169.254.169.254]",
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",
        "[fe80::1]",
        "[fc00::1]",
        "[fd12:3456::1]",
        "[::]",
        "[::1]",
        "localhost",
        "127.1",
        "0x7f000001",
        "2130706433",
        "10.1",
    ];
    for (i, t) in targets.iter().enumerate() {
        let sid = 1 + i as u16;
        let mut body = format!("{t}:80").into_bytes();
        body.push(0);
        l.send_relay(circ, relay_cmd::BEGIN, sid, &body);
        let c = l.recv_non_sendme().expect("link open");
        assert_eq!(
            relay_of(&c),
            Some((relay_cmd::END, sid, vec![end_reason::EXITPOLICY])),
            "BEGIN {t}:80 (command {})",
            c.command
        );
    }
}

over_both_links!(
    target_reset_mid_transfer_reaches_only_its_application,
    application_reset_mid_transfer_reaches_only_its_target,
    exit_killed_mid_transfer_resets_applications_and_the_client_recovers,
    a_cut_link_resets_streams_and_the_client_links_again,
    default_exit_policy_refuses_private_addresses_in_every_spelling,
);
