//! The kit as the SOCKS application of a client under test (RFC 1928,
//! RFC 1929, SOCKS4 and 4a), written here from those RFCs.

use crate::case::{fail, CaseError};
use crate::link::ANSWER;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// A SOCKS request's target.
pub enum Dest<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

/// A connection to the client's SOCKS port.
pub fn connect(addr: SocketAddr) -> Result<TcpStream, CaseError> {
    let s = TcpStream::connect_timeout(&addr, ANSWER)
        .map_err(|e| fail("a connection to the SOCKS port", e.to_string()))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn send(s: &mut TcpStream, bytes: &[u8]) -> Result<(), CaseError> {
    s.write_all(bytes)
        .map_err(|e| fail("to write to the SOCKS port", e.to_string()))
}

/// The SOCKS5 greeting, with username/password if `creds` (RFC 1929).
pub fn greet5(s: &mut TcpStream, creds: Option<(&str, &str)>) -> Result<(), CaseError> {
    match creds {
        None => send(s, &[5, 1, 0])?,
        Some(_) => send(s, &[5, 1, 2])?,
    }
    let m = crate::targets::read_exact_within(s, 2, ANSWER, "the SOCKS5 method choice")?;
    let want = if creds.is_some() { 2 } else { 0 };
    if m != [5, want] {
        return Err(fail(
            format!("SOCKS5 method {want} accepted (R11.2)"),
            format!("{m:02x?}"),
        ));
    }
    if let Some((user, pass)) = creds {
        let mut auth = vec![1, user.len() as u8];
        auth.extend_from_slice(user.as_bytes());
        auth.push(pass.len() as u8);
        auth.extend_from_slice(pass.as_bytes());
        send(s, &auth)?;
        let r = crate::targets::read_exact_within(s, 2, ANSWER, "the RFC 1929 answer")?;
        if r != [1, 0] {
            return Err(fail(
                "any username and password accepted (R11.2)",
                format!("{r:02x?}"),
            ));
        }
    }
    Ok(())
}

/// A SOCKS5 request: `cmd` 1 CONNECT, 2 BIND, 3 UDP ASSOCIATE.
pub fn request5(s: &mut TcpStream, cmd: u8, dest: &Dest<'_>, port: u16) -> Result<(), CaseError> {
    let mut r = vec![5, cmd, 0];
    match dest {
        Dest::Ip(IpAddr::V4(a)) => {
            r.push(1);
            r.extend_from_slice(&a.octets());
        }
        Dest::Ip(IpAddr::V6(a)) => {
            r.push(4);
            r.extend_from_slice(&a.octets());
        }
        Dest::Name(n) => {
            r.push(3);
            r.push(n.len() as u8);
            r.extend_from_slice(n.as_bytes());
        }
    }
    r.extend_from_slice(&port.to_be_bytes());
    send(s, &r)
}

/// The SOCKS5 reply code, within `wait`; `None` if nothing came.
pub fn reply5(s: &mut TcpStream, wait: Duration) -> Result<Option<u8>, CaseError> {
    s.set_read_timeout(Some(wait)).ok();
    let mut head = [0u8; 4];
    match s.read(&mut head[..1]) {
        Ok(0) => return Err(fail("a SOCKS5 reply", "end of file")),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(fail("a SOCKS5 reply", e.to_string())),
    }
    let rest = crate::targets::read_exact_within(s, 3, ANSWER, "a SOCKS5 reply")?;
    head[1..].copy_from_slice(&rest);
    if head[0] != 5 {
        return Err(fail("a SOCKS5 reply (version 5)", format!("{head:02x?}")));
    }
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            crate::targets::read_exact_within(s, 1, ANSWER, "the reply's name length")?[0] as usize
        }
        other => return Err(fail("a SOCKS5 reply address type", format!("{other}"))),
    };
    crate::targets::read_exact_within(s, addr_len + 2, ANSWER, "the reply's address")?;
    Ok(Some(head[1]))
}

/// A SOCKS4 (or, with `name`, SOCKS4a) CONNECT request.
pub fn request4(
    s: &mut TcpStream,
    ip: [u8; 4],
    port: u16,
    user: &str,
    name: Option<&str>,
) -> Result<(), CaseError> {
    let mut r = vec![4, 1];
    r.extend_from_slice(&port.to_be_bytes());
    match name {
        None => r.extend_from_slice(&ip),
        Some(_) => r.extend_from_slice(&[0, 0, 0, 1]),
    }
    r.extend_from_slice(user.as_bytes());
    r.push(0);
    if let Some(n) = name {
        r.extend_from_slice(n.as_bytes());
        r.push(0);
    }
    send(s, &r)
}

/// The SOCKS4 reply code (0x5A granted, 0x5B refused), within `wait`.
pub fn reply4(s: &mut TcpStream, wait: Duration) -> Result<u8, CaseError> {
    let r = crate::targets::read_exact_within(s, 8, wait, "a SOCKS4 reply")?;
    if r[0] != 0 {
        return Err(fail("a SOCKS4 reply (version 0)", format!("{r:02x?}")));
    }
    Ok(r[1])
}
