//! The servers a stream reaches through the exit under test: each case
//! starts its own on 127.0.0.1 and drives its side by hand.

use crate::case::{fail, CaseError};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub struct Target {
    listener: TcpListener,
    /// The same port on ::1, for a target named `localhost`.
    v6: Option<TcpListener>,
    pub addr: SocketAddr,
}

impl Target {
    pub fn new() -> Target {
        Target::on(TcpListener::bind("127.0.0.1:0").expect("a loopback port"))
    }

    /// A target accepting on `listener` (127.0.0.1 only).
    fn on(listener: TcpListener) -> Target {
        listener.set_nonblocking(true).expect("non-blocking accept");
        let addr = listener.local_addr().expect("its address");
        Target {
            listener,
            v6: None,
            addr,
        }
    }

    /// A target on 127.0.0.1 and on ::1, at one port: what a name that
    /// resolves to both reaches, whichever address the exit tries.
    pub fn dual() -> Target {
        for _ in 0..20 {
            let mut t = Target::new();
            let v6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), t.addr.port());
            if let Ok(l) = TcpListener::bind(v6) {
                l.set_nonblocking(true).expect("non-blocking accept");
                t.v6 = Some(l);
                return t;
            }
        }
        // No IPv6 loopback: 127.0.0.1 alone.
        Target::new()
    }

    /// A target whose connections have a small receive buffer (64 KiB, no
    /// autotuning): one that reads nothing fills up soon.
    pub fn small() -> Target {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket");
        s.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .expect("a loopback port");
        s.listen(16).expect("listen");
        Target::on(s.into())
    }

    /// A BEGIN payload for this target (R5.2): `127.0.0.1:PORT` NUL.
    pub fn begin(&self) -> Vec<u8> {
        let mut b = format!("127.0.0.1:{}", self.addr.port()).into_bytes();
        b.push(0);
        b
    }

    /// The exit's connection to this target.
    pub fn accept(&self, wait: Duration) -> Result<TcpStream, CaseError> {
        let listeners: Vec<&TcpListener> = std::iter::once(&self.listener)
            .chain(self.v6.as_ref())
            .collect();
        accept_within(
            &listeners,
            wait,
            |_| false,
            "the exit to connect to the target",
        )
        .map(|(s, _)| s)
    }

    /// Whether a connection arrives within `wait` (for cases where none
    /// may).
    pub fn connected_within(&self, wait: Duration) -> bool {
        self.accept(wait).is_ok()
    }
}

impl Default for Target {
    fn default() -> Self {
        Target::new()
    }
}

/// The next connection on any of `listeners` (non-blocking) within `wait`
/// whose peer `skip` does not pass over, made blocking and given the kit's
/// write timeout; `what` is what was expected.
pub fn accept_within(
    listeners: &[&TcpListener],
    wait: Duration,
    skip: impl Fn(&SocketAddr) -> bool,
    what: &str,
) -> Result<(TcpStream, SocketAddr), CaseError> {
    let deadline = Instant::now() + wait;
    loop {
        for l in listeners {
            match l.accept() {
                Ok((_, peer)) if skip(&peer) => {}
                Ok((s, peer)) => {
                    s.set_nonblocking(false)
                        .map_err(|e| fail(what, e.to_string()))?;
                    let _ = s.set_write_timeout(Some(crate::link::STALLED));
                    return Ok((s, peer));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(fail(what, e.to_string())),
            }
        }
        if Instant::now() > deadline {
            return Err(fail(what, format!("no connection within {wait:?}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads exactly `n` bytes from the exit's connection within `wait`.
pub fn read_n(s: &mut TcpStream, n: usize, wait: Duration) -> Result<Vec<u8>, CaseError> {
    read_exact_within(s, n, wait, &format!("{n} bytes at the target"))
}

/// Reads exactly `n` bytes within `wait`; `what` is what was expected.
pub fn read_exact_within(
    s: &mut TcpStream,
    n: usize,
    wait: Duration,
    what: &str,
) -> Result<Vec<u8>, CaseError> {
    let deadline = Instant::now() + wait;
    let mut got = vec![0u8; n];
    let mut have = 0;
    while have < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(what, format!("{have} of {n} bytes within {wait:?}")));
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| fail(what, e.to_string()))?;
        match s.read(&mut got[have..]) {
            Ok(0) => return Err(fail(what, format!("end of file after {have} bytes"))),
            Ok(k) => have += k,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(fail(what, format!("{e} after {have} bytes"))),
        }
    }
    Ok(got)
}

/// Shuts the write side of `s`: the half-close a case is about, so a
/// failure fails the case.
pub fn half_close(s: &TcpStream) -> Result<(), CaseError> {
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| fail("to shut the write side (a half-close)", e.to_string()))
}

/// How a TCP connection ended, as its peer sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// End of file, after these bytes.
    Eof(Vec<u8>),
    /// A reset, after these bytes.
    Reset(Vec<u8>),
    /// Still open after the wait, with these bytes.
    Open(Vec<u8>),
}

/// Reads until the connection ends or `wait` passes.
pub fn ending(s: &mut TcpStream, wait: Duration) -> Ending {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ending::Open(got);
        }
        s.set_read_timeout(Some(left)).ok();
        match s.read(&mut chunk) {
            Ok(0) => return Ending::Eof(got),
            Ok(k) => got.extend_from_slice(&chunk[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ending::Reset(got),
        }
    }
}

/// Resets `s` (SO_LINGER 0, then close): its peer sees a RST.
pub fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

pub fn write_all(s: &mut TcpStream, data: &[u8]) -> Result<(), CaseError> {
    s.write_all(data)
        .map_err(|e| fail("to write to the exit's connection", e.to_string()))
}

/// A loopback port that answers no SYN: a listen(0) socket whose accept
/// queue is full of connections nobody accepts (Linux then drops SYNs), so
/// a connect to it waits until it times out.
pub struct Unanswering {
    pub addr: SocketAddr,
    listener: socket2::Socket,
    fill: Vec<TcpStream>,
}

impl Unanswering {
    pub fn new() -> Result<Unanswering, CaseError> {
        use socket2::{Domain, Socket, Type};
        let what = "a loopback port that answers no SYN";
        let listener =
            Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| fail(what, e.to_string()))?;
        listener
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .map_err(|e| fail(what, e.to_string()))?;
        listener.listen(0).map_err(|e| fail(what, e.to_string()))?;
        let addr = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| fail(what, "no address"))?;
        let mut fill = Vec::new();
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => fill.push(s),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
                {
                    return Ok(Unanswering {
                        addr,
                        listener,
                        fill,
                    })
                }
                Err(e) => return Err(fail(what, e.to_string())),
            }
        }
        Err(fail(what, "listen(0) kept accepting SYNs"))
    }
}

impl Unanswering {
    /// Frees the accept queue, so that the next SYN a connecting peer
    /// retries gets through (Linux retries after 1 s, then 3 s), and
    /// returns that peer's connection: a connect held up for a second.
    pub fn release(self) -> Result<TcpStream, CaseError> {
        let fillers: Vec<SocketAddr> = self
            .fill
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect();
        let listener: TcpListener = self.listener.into();
        listener.set_nonblocking(true).expect("non-blocking accept");
        accept_within(
            &[&listener],
            Duration::from_secs(10),
            |peer| fillers.contains(peer),
            "the exit to connect once the target answers (R5.3)",
        )
        .map(|(s, _)| s)
    }
}
