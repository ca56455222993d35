//! A minimal SOCKS5 CONNECT client (RFC 1928, no authentication), enough
//! to drive any SOCKS5 proxy: halfpipe, `ssh -D`, Tor, ...
//!
//! The greeting and the request go out one round trip apart, as ordinary
//! clients (curl) do, so every proxy sees the handshake it expects; the
//! handshake is part of what the setup scenario measures.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// The CONNECT request for `dest` (an IP literal: the bench's targets are
/// on loopback).
pub fn connect_request(dest: SocketAddr) -> Vec<u8> {
    let mut r = vec![5, 1, 0];
    match dest.ip() {
        IpAddr::V4(ip) => {
            r.push(1);
            r.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            r.push(4);
            r.extend_from_slice(&ip.octets());
        }
    }
    r.extend_from_slice(&dest.port().to_be_bytes());
    r
}

/// What the reply code means (RFC 1928 §6).
pub fn reply_text(code: u8) -> &'static str {
    match code {
        0 => "succeeded",
        1 => "general failure",
        2 => "not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unknown reply",
    }
}

/// Opens a stream to `dest` through the SOCKS5 proxy at `proxy` (on
/// loopback: a plain connect). `timeout` bounds each handshake read.
pub fn connect(proxy: SocketAddr, dest: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(&[5, 1, 0])?;
    let mut method = [0u8; 2];
    s.read_exact(&mut method)?;
    if method != [5, 0] {
        return Err(io::Error::other(format!(
            "SOCKS5 proxy refused no-auth (answered {method:02x?})"
        )));
    }
    s.write_all(&connect_request(dest))?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if head[0] != 5 {
        return Err(io::Error::other(format!("not a SOCKS5 reply: {head:02x?}")));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            l[0] as usize + 2
        }
        t => {
            return Err(io::Error::other(format!(
                "SOCKS5 reply with address type {t}"
            )))
        }
    };
    let mut skip = [0u8; 257];
    s.read_exact(&mut skip[..rest])?;
    if head[1] != 0 {
        return Err(io::Error::other(format!(
            "SOCKS5 reply 0x{:02x} ({})",
            head[1],
            reply_text(head[1])
        )));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_address() {
        assert_eq!(
            connect_request("127.0.0.1:4660".parse().unwrap()),
            [5, 1, 0, 1, 127, 0, 0, 1, 0x12, 0x34]
        );
        let v6 = connect_request("[::1]:80".parse().unwrap());
        assert_eq!(&v6[..4], &[5, 1, 0, 4]);
        assert_eq!(v6.len(), 4 + 16 + 2);
        assert_eq!(&v6[20..], &[0, 80]);
    }
}
