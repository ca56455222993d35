//! Tor's SOCKS RESOLVE extension (command 0xF0) through the client, which
//! becomes RELAY_RESOLVE / RESOLVED on the wire (docs/protocol.md §5, §11). The
//! client resolves nothing itself, so an answer proves the round trip; the
//! exit's side of RESOLVE is checked cell by cell in wire.rs.

use crate::util::*;
use crate::wire::{expect_end, linked};
use halfpipe_proto::relay::{end_reason, relay_cmd};
use std::io::{Read, Write};
use std::net::UdpSocket;

/// Sends a SOCKS5 RESOLVE for `name`; returns (REP, BND.ADDR bytes).
fn socks5_resolve(proxy: std::net::SocketAddr, name: &str) -> (u8, Vec<u8>) {
    let mut s = socks5_greeted(proxy);
    s.write_all(&socks5_request(0xF0, name, 0)).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    let len = match head[3] {
        1 => 4,
        4 => 16,
        other => panic!("unexpected ATYP {other}"),
    };
    let mut addr = vec![0u8; len + 2];
    s.read_exact(&mut addr).unwrap();
    addr.truncate(len);
    (head[1], addr)
}

/// R5.17, R5.18: RESOLVE of a name that exists is answered with its
/// address; §11 (Tor's extension): the SOCKS reply carries it in BND.ADDR.
#[test]
fn socks_resolve_answers_the_address() {
    let d = Daemon::run(&[]);
    let (rep, addr) = socks5_resolve(d.socks(), "localhost");
    assert_eq!(rep, 0, "RESOLVE of localhost succeeds");
    assert!(
        addr == [127, 0, 0, 1] || addr == std::net::Ipv6Addr::LOCALHOST.octets(),
        "localhost resolved to {addr:?}"
    );
}

/// R5.19: a name that does not exist gets RESOLVED 0xF1, which the client
/// answers with a SOCKS failure (host unreachable).
#[test]
fn socks_resolve_of_a_missing_name_fails() {
    let d = Daemon::run(&[]);
    let (rep, _) = socks5_resolve(d.socks(), "nonexistent.invalid");
    assert_eq!(rep, 0x04, "RESOLVE of a missing name is 'host unreachable'");
}

/// R5.9: the name lookup counts against --connect-timeout. The exit runs
/// in a mount namespace of its own (`unshare -m`) whose /etc/resolv.conf
/// names a name server on loopback that takes queries and never answers,
/// with a resolver timeout of 30 s: a BEGIN to a name is answered
/// END(TIMEOUT) at the 1 s connect timeout, not when the resolver gives
/// up, and the lookup's thread ends with the resolver.
#[test]
fn a_lookup_that_never_answers_is_bounded_by_the_connect_timeout() {
    // The silent name server, on a loopback address nothing else uses.
    let dns = UdpSocket::bind("127.0.99.53:53")
        .expect("binding 127.0.99.53:53 (this test needs root, as CI has)");
    let conf = std::env::temp_dir().join(format!("halfpipe-resolv-{}.conf", std::process::id()));
    std::fs::write(
        &conf,
        "nameserver 127.0.99.53\noptions timeout:30 attempts:1\n",
    )
    .unwrap();
    let mount = format!(
        "mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
        conf.display()
    );
    let d = Daemon::start_under(
        &["unshare", "-m", "sh", "-c", &mount],
        &[
            "exit",
            "--listen",
            "127.0.0.1:0",
            "--exit-policy",
            "accept *:*",
            "--connect-timeout",
            "1s",
        ],
        false,
        true,
    );
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    l.send_relay(circ, relay_cmd::BEGIN, 1, &begin_body("slow.example:80"));
    // Within the test's patience (20 s), well before the resolver's 30 s.
    expect_end(&mut l, circ, 1, end_reason::TIMEOUT);
    // The query did reach the silent name server.
    let mut q = [0u8; 512];
    dns.set_read_timeout(Some(PATIENCE)).unwrap();
    assert!(
        dns.recv_from(&mut q).is_ok(),
        "no query reached the name server"
    );
    // 100 more at once: each is answered END(TIMEOUT) at the connect
    // timeout, and no more than 64 lookups (threads) run at a time.
    for sid in 2..102u16 {
        let name = format!("slow{sid}.example:80");
        l.send_relay(circ, relay_cmd::BEGIN, sid, &begin_body(&name));
    }
    let mut most = 0;
    let mut ended = std::collections::HashSet::new();
    while ended.len() < 100 {
        most = most.max(lookups_running(&d));
        let c = l.recv_non_sendme().expect("END");
        let (command, sid, body) = c.relay();
        assert_eq!(
            (command, body.first()),
            (relay_cmd::END, Some(&end_reason::TIMEOUT))
        );
        ended.insert(sid);
    }
    most = most.max(lookups_running(&d));
    eprintln!("{most} lookups at once at most");
    assert!((1..=64).contains(&most), "{most} lookups at once");
    std::fs::remove_file(&conf).unwrap();
}

/// The exit's name lookups in flight: its `dns C.S` threads.
fn lookups_running(d: &Daemon) -> usize {
    d.thread_names()
        .iter()
        .filter(|n| n.starts_with("dns "))
        .count()
}
