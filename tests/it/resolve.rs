//! Tor's SOCKS RESOLVE extension (command 0xF0) through the client, which
//! becomes RELAY_RESOLVE / RESOLVED on the wire (docs/protocol.md §5, §11). The
//! client resolves nothing itself, so an answer proves the round trip; the
//! exit's side of RESOLVE is checked cell by cell in wire.rs.

use crate::util::*;
use std::io::{Read, Write};

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
