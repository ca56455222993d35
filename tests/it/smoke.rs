//! The two scenarios that motivate halfpipe (docs/protocol.md §7), end to
//! end.

use crate::util::*;
use std::io::{Read, Write};
use std::net::Shutdown;

/// R7.2, R7.5 at the client and R7.4, R7.3 at the exit: the application
/// writes a request, calls shutdown(SHUT_WR), then reads the whole reply.
/// Tor and Arti lose this reply today.
#[test]
fn request_then_shutdown_write_still_gets_the_whole_reply() {
    let server = Server::request_reply(|req| {
        let mut reply = b"got ".to_vec();
        reply.extend_from_slice(&(req.len() as u64).to_be_bytes());
        reply.extend_from_slice(&pattern(300_000, 7));
        reply
    });
    let d = Daemon::run(&[]);
    let mut s = socks5(d.socks(), "127.0.0.1", server.addr.port(), None).unwrap();
    let request = pattern(100_000, 1);
    s.write_all(&request).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    assert_eq!(&reply[..4], b"got ");
    assert_eq!(
        u64::from_be_bytes(reply[4..12].try_into().unwrap()),
        100_000
    );
    assert_eq!(&reply[12..], &pattern(300_000, 7)[..]);
}
