//! Limits and timeouts from the command line: `--handshake-timeout`,
//! `--socks-timeout`, `--idle-timeout` (docs/protocol.md §8: END(TIMEOUT)
//! and a reset) and `--max-streams` for the whole process (§5:
//! END(RESOURCELIMIT)).
//! Waits are liveness waits (`PATIENCE`); no assertion depends on timing.

use crate::util::*;
use halfpipe_proto::cell::cmd;
use halfpipe_proto::relay::{end_reason, relay_cmd};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

// Raw-link helpers are shared with wire.rs.
use crate::wire::{expect_relay, expect_reset, next, open_stream, read_until_closed, Targets};

// ------------------------------------------------------------------ tests

#[test]
fn handshake_timeout_flag_closes_a_silent_link() {
    // §1's handshake, on a plain link (tls.rs has §13's).
    use_plain_links();
    // R1.6 with `--handshake-timeout 1s` instead of 10 s (R1.7: closed
    // without VERSIONS; R1.8: other links are unaffected).
    let d = Daemon::exit(&["--handshake-timeout", "1s"]);
    let mut silent = TcpStream::connect(d.link()).unwrap();
    assert!(
        read_until_closed(&mut silent).is_empty(),
        "no VERSIONS sent"
    );
    d.wait_for_log("no complete VERSIONS within 1s");
    // Other links are unaffected.
    RawLink::connect(d.link()).create_circuit(fresh_circ());
}

#[test]
fn socks_timeout_flag_closes_a_silent_socks_client() {
    let d = Daemon::run(&["--socks-timeout", "1s"]);
    let mut silent = TcpStream::connect(d.socks()).unwrap();
    assert!(read_until_closed(&mut silent).is_empty(), "no SOCKS reply");
    // A SOCKS client that talks is served as usual.
    let echo = Server::echo();
    let mut s = socks5(d.socks(), "127.0.0.1", echo.addr.port(), None).expect("CONNECT");
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
}

#[test]
fn socks_timeout_bounds_the_whole_handshake_not_each_read() {
    // A client that sends its handshake a byte every 200 ms keeps every
    // single read within --socks-timeout 1s, but not the whole handshake
    // (a SOCKS5 greeting, username/password and a CONNECT: about 60
    // bytes, 12 s at that pace): the connection is closed without a
    // reply to its request.
    let d = Daemon::run(&["--socks-timeout", "1s"]);
    let mut s = TcpStream::connect(d.socks()).unwrap();
    let mut handshake = vec![5, 1, 2, 1, 20];
    handshake.extend_from_slice(b"a-long-user-name-xyz");
    handshake.extend_from_slice(&[20]);
    handshake.extend_from_slice(b"a-long-password-xyzw");
    handshake.extend_from_slice(&socks5_request(1, "127.0.0.1", 80));
    let mut closed_after = None;
    for (i, b) in handshake.iter().enumerate() {
        if s.write_all(&[*b]).is_err() {
            closed_after = Some(i);
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    // Whatever the writes saw, the daemon closed it: what it sent is at
    // most the method and authentication replies, never a CONNECT reply.
    let got = read_until_closed(&mut s);
    assert!(got.len() <= 4, "got {got:?}");
    assert!(
        closed_after.is_some(),
        "the daemon kept a 12 s handshake open"
    );
}

#[test]
fn idle_timeout_resets_idle_streams_and_spares_active_ones() {
    // R8.3: an idle stream is an error on the stream: END(TIMEOUT); R8.7,
    // R8.8: and a reset at both ends. `halfpipe run` has both edges;
    // whichever notices first sends END, the other resets on receipt.
    let d = Daemon::run(&["--exit-policy", "accept *:*", "--idle-timeout", "1s"]);
    let t = Targets::new();
    let mut idle = socks5(d.socks(), "127.0.0.1", t.addr.port(), None).expect("CONNECT");
    let mut idle_target = t.accept();
    let mut active = socks5(d.socks(), "127.0.0.1", t.addr.port(), None).expect("CONNECT");
    let mut active_target = t.accept();
    // Keep one stream busy while the other idles until it is reset.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let pinger = thread::spawn(move || {
        let mut b = [0u8; 1];
        let mut n = 0u64;
        while done_rx.try_recv().is_err() {
            active.write_all(b"p").unwrap();
            active_target.read_exact(&mut b).unwrap();
            active_target.write_all(b"q").unwrap();
            active.read_exact(&mut b).unwrap();
            n += 1;
            thread::sleep(Duration::from_millis(100));
        }
        (active, active_target, n)
    });
    idle.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 16];
    match idle.read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the idle stream's application expected ECONNRESET, got {other:?}"),
    }
    expect_reset(&mut idle_target);
    done_tx.send(()).unwrap();
    let (mut active, mut active_target, pings) = pinger.join().unwrap();
    assert!(pings > 0);
    // The active stream is still open both ways.
    active.write_all(b"still").unwrap();
    let mut five = [0u8; 5];
    active_target.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"still");
    active_target.write_all(b"here").unwrap();
    let mut four = [0u8; 4];
    active.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"here");
    d.wait_for_log("END(TIMEOUT)");
}

#[test]
fn max_streams_is_process_wide_end_resourcelimit() {
    // R5.11: the stream limit is reached → END(RESOURCELIMIT = 11), here
    // `--max-streams 2` over the whole process: two circuits, one stream
    // each, and a third BEGIN on either circuit is refused.
    let d = Daemon::exit(&["--exit-policy", "accept *:*", "--max-streams", "2"]);
    let t = Targets::new();
    let (a, b) = (fresh_circ(), fresh_circ());
    let mut l = RawLink::connect(d.link());
    l.create_circuit(a);
    l.create_circuit(b);
    let _t1 = open_stream(&mut l, a, 1, &t);
    let _t2 = open_stream(&mut l, b, 1, &t);
    l.send_relay(a, relay_cmd::BEGIN, 2, &begin_body(&t.addr.to_string()));
    let body = expect_relay(&mut l, a, relay_cmd::END, 2);
    assert_eq!(body.first().copied(), Some(end_reason::RESOURCELIMIT));
    // Ending a stream makes room again, once the exit has released it.
    l.send_relay(b, relay_cmd::END, 1, &[end_reason::DONE]);
    let deadline = Instant::now() + PATIENCE;
    let mut sid = 10;
    loop {
        l.send_relay(a, relay_cmd::BEGIN, sid, &begin_body(&t.addr.to_string()));
        let c = next(&mut l);
        let (rc, s, body) = c.relay();
        assert_eq!(s, sid);
        if rc == relay_cmd::CONNECTED {
            break;
        }
        assert_eq!(
            (rc, body.first().copied()),
            (relay_cmd::END, Some(end_reason::RESOURCELIMIT))
        );
        assert!(
            Instant::now() < deadline,
            "the ended stream never left the limit"
        );
        thread::sleep(Duration::from_millis(10));
        sid += 1;
    }
}

// ------------------------------------------------------- keepalive (§2)

#[test]
fn keepalive_sends_padding_on_an_idle_link() {
    // R2.2: PADDING (0) is a keepalive, ignored on receipt.
    let d = Daemon::exit(&["--keepalive", "200ms"]);
    let mut l = RawLink::connect(d.link());
    for _ in 0..2 {
        let c = l.recv_cell().expect("the exit closed the link");
        assert_eq!((c.circ, c.command), (0, cmd::PADDING), "{c:?}");
    }
    // PADDING back is ignored, and the link still works.
    l.send_cell(0, cmd::PADDING, &[]);
    l.create_circuit(fresh_circ());
}

// ------------------------------------------------------- --config FILE

/// Writes `text` to a file of its own in the temp directory.
fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("halfpipe-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn config_file_values_take_effect_and_flags_win() {
    // The file's handshake timeout is seen on a plain link's VERSIONS.
    use_plain_links();
    let path = config_file(
        "exit",
        "# test\nlisten = \"127.0.0.1:0\"\nexit-policy = \"accept 127.0.0.1:7,reject *:*\"\n\
         handshake-timeout = \"1s\"\nsocks = \"127.0.0.1:1\"  # not for exit: ignored\n",
    );
    let p = path.to_str().unwrap();
    // No --listen: the file's ephemeral port is used, not 9001.
    let d = Daemon::start(&["exit", "--config", p], false, true);
    assert_ne!(d.link().port(), 9001);
    assert!(
        d.stdout()
            .contains("exit policy: accept 127.0.0.1:7, reject *:*"),
        "{}",
        d.stdout()
    );
    let mut silent = TcpStream::connect(d.link()).unwrap();
    assert!(read_until_closed(&mut silent).is_empty());
    d.wait_for_log("no complete VERSIONS within 1s");
    drop(d);
    // A flag on the command line wins over the file.
    let d = Daemon::start(
        &["exit", "--config", p, "--exit-policy", "reject *:*"],
        false,
        true,
    );
    assert!(
        d.stdout().contains("exit policy: reject *:*"),
        "{}",
        d.stdout()
    );
    drop(d);
    let _ = std::fs::remove_file(path);
}

#[test]
fn config_file_unknown_key_is_exit_2_with_key_and_line() {
    let path = config_file("bad", "grace = \"1s\"\n\nbogus-key = 1\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args([
            "exit",
            "--listen",
            "127.0.0.1:0",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("line 3") && err.contains("bogus-key"), "{err}");
    // A bad value names its key and line too.
    let path = config_file("badvalue", "\nconnect-timeout = \"soon\"\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args([
            "exit",
            "--listen",
            "127.0.0.1:0",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("line 2") && err.contains("connect-timeout"),
        "{err}"
    );
}

// ------------------------------------------------------ log rate limit

#[test]
fn protocol_violation_warnings_are_rate_limited() {
    // A peer that fails the §1 handshake over and over: the warnings are
    // limited, and one line says how many were left out.
    let d = Daemon::exit(&[]);
    let deadline = Instant::now() + PATIENCE;
    let mut sent = 0;
    while !d.log().contains("more protocol violations suppressed") {
        assert!(Instant::now() < deadline, "never suppressed:\n{}", d.log());
        let mut socks: Vec<TcpStream> = (0..40)
            .map(|_| TcpStream::connect(d.link()).unwrap())
            .collect();
        for s in &mut socks {
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        }
        for s in &mut socks {
            read_until_closed(s);
        }
        sent += socks.len();
    }
    assert!(d.log_count("link handshake failed") < sent, "{}", d.log());
}

#[test]
fn half_closed_streams_whose_answer_never_comes_are_reclaimed() {
    // 50 applications send a request, half-close, and go away (close their
    // sockets) while the target never answers: each stream stays half-
    // closed, its open direction silent. At --half-closed-timeout they end
    // with END(TIMEOUT) and every thread is freed. A half-closed stream
    // whose answer keeps coming (a byte every 300 ms for 2 s) is not
    // silent and gets its whole answer.
    let d = Daemon::run(&["--half-closed-timeout", "1s"]);
    let baseline = d.thread_count();
    let never = Server::start(|mut s| {
        let mut req = Vec::new();
        let _ = s.read_to_end(&mut req);
        thread::sleep(Duration::from_secs(3600)); // the answer never comes
    });
    for _ in 0..50 {
        let mut s = socks5(d.socks(), "127.0.0.1", never.addr.port(), None).expect("CONNECT");
        s.write_all(b"request").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    } // and gone
    let slow = Server::start(|mut s| {
        let mut req = Vec::new();
        let _ = s.read_to_end(&mut req);
        for i in 0..7u8 {
            thread::sleep(Duration::from_millis(300));
            if s.write_all(&[b'0' + i]).is_err() {
                return;
            }
        }
    });
    let mut s = socks5(d.socks(), "127.0.0.1", slow.addr.port(), None).expect("CONNECT");
    s.write_all(b"request").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"0123456", "the slow answer arrives whole");
    d.wait_for_log("half-closed and silent for 1s: END(TIMEOUT)");
    d.wait_for_threads(baseline);
}
