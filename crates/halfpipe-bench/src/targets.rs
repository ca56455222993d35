//! The target servers the bench runs itself on loopback, and the data they
//! exchange.
//!
//! One listener serves four kinds of target; a connection says which with a
//! 21-byte header, so a TCP relay chain with a single fixed destination (two
//! socat relays, say) reaches all of them:
//!
//! `magic "HPB1" | kind u8 | id u64 | len u64` (big-endian)
//!
//! | kind | does | `len` |
//! |---|---|---|
//! | sink | reads to EOF, hashes what it read, records it under `id` | bytes the client will send |
//! | source | sends `len` bytes of stream `id`'s data, records their hash | bytes to send (`ENDLESS`: until the peer goes) |
//! | echo | echoes to EOF, then half-closes | unused |
//! | request/response | reads the request to EOF, then replies and closes | reply length |
//!
//! Results are checked, never assumed: every byte is counted and hashed
//! (CRC-32) at both ends, and the bench compares the two. The sink and the
//! source run in the bench's own process and record their side in a
//! [`Registry`], so the check works through any proxy, half-close or not.
//!
//! The hold scenario needs thousands of idle target connections; keeping
//! them in this process would double the bench's descriptors (the hard limit
//! is 20,000 here), so [`HoldTarget`] is a small poll(2) echo server in a
//! child process (`halfpipe-bench --serve-hold-target`), single-threaded
//! on epoll.

use crc32fast::Hasher;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 4] = *b"HPB1";
pub const HEADER_LEN: usize = 21;
/// The unit of reads, writes and the data pattern: 256 KiB, a read size
/// large enough that system calls are not what is measured.
pub const BLOCK: usize = 256 * 1024;
/// A source's `len` meaning "until the peer goes away".
pub const ENDLESS: u64 = u64::MAX;
/// The reply of a request/response target starts with the request's byte
/// count (u64) and CRC-32 (u32), so the client can check its request.
pub const REPLY_HEAD: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sink = 1,
    Source = 2,
    Echo = 3,
    RequestReply = 4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub id: u64,
    pub len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4] = self.kind as u8;
        h[5..13].copy_from_slice(&self.id.to_be_bytes());
        h[13..21].copy_from_slice(&self.len.to_be_bytes());
        h
    }

    pub fn decode(h: &[u8; HEADER_LEN]) -> Option<Header> {
        if h[..4] != MAGIC {
            return None;
        }
        let kind = match h[4] {
            1 => Kind::Sink,
            2 => Kind::Source,
            3 => Kind::Echo,
            4 => Kind::RequestReply,
            _ => return None,
        };
        Some(Header {
            kind,
            id: u64::from_be_bytes(h[5..13].try_into().expect("8 bytes")),
            len: u64::from_be_bytes(h[13..21].try_into().expect("8 bytes")),
        })
    }
}

/// A fresh stream id for this process.
pub fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

// ------------------------------------------------------------- the data

/// 256 KiB of pseudo-random bytes (xorshift64*), made once.
fn base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut v = Vec::with_capacity(BLOCK);
        while v.len() < BLOCK {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        v
    })
}

/// Stream `id`'s data: the base block with the stream id and the block
/// number in its first 16 bytes, so no two blocks of any stream are equal
/// (a lost, repeated or misplaced block changes the hash).
pub struct Pattern {
    buf: Vec<u8>,
    block: u64,
}

impl Pattern {
    pub fn new(id: u64) -> Pattern {
        let mut buf = base().to_vec();
        buf[..8].copy_from_slice(&id.to_be_bytes());
        Pattern { buf, block: 0 }
    }

    /// The next block, cut to `max` bytes.
    pub fn next_block(&mut self, max: usize) -> &[u8] {
        self.buf[8..16].copy_from_slice(&self.block.to_be_bytes());
        self.block += 1;
        &self.buf[..max.min(BLOCK)]
    }
}

/// Writes `len` bytes of stream `id`'s data; returns the bytes written and
/// their CRC-32. `progress` counts them as they go.
pub fn send_pattern(
    w: &mut impl Write,
    id: u64,
    len: u64,
    progress: &AtomicU64,
) -> io::Result<(u64, u32)> {
    let mut pattern = Pattern::new(id);
    let mut hash = Hasher::new();
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(BLOCK as u64) as usize;
        let block = pattern.next_block(n);
        w.write_all(block)?;
        hash.update(block);
        sent += n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok((sent, hash.finalize()))
}

/// What a reader saw: bytes, CRC-32, and when it had `expect` bytes.
pub struct Received {
    pub bytes: u64,
    pub crc: u32,
    pub full_at: Option<Instant>,
}

/// Reads to EOF, counting and hashing; `progress` counts bytes as they come.
pub fn receive(r: &mut impl Read, expect: u64, progress: &AtomicU64) -> io::Result<Received> {
    let mut buf = vec![0u8; BLOCK];
    let mut hash = Hasher::new();
    let mut bytes = 0u64;
    let mut full_at = None;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash.update(&buf[..n]);
        bytes += n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
        if full_at.is_none() && bytes >= expect {
            full_at = Some(Instant::now());
        }
    }
    Ok(Received {
        bytes,
        crc: hash.finalize(),
        full_at,
    })
}

// ------------------------------------------------------------- registry

/// What a sink or source recorded when its connection ended.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub bytes: u64,
    pub crc: u32,
    /// Sink: when it had all the bytes announced (else when it saw EOF).
    /// Source: when its last write returned.
    pub at: Instant,
    /// The connection failed before EOF (a reset, say).
    pub failed: bool,
}

#[derive(Default)]
struct Entry {
    progress: Arc<AtomicU64>,
    done: Option<Done>,
}

/// The targets' side of each stream, by stream id, shared with the bench.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<u64, Entry>>,
    changed: Condvar,
}

impl Registry {
    /// The byte counter of stream `id` (created if new).
    pub fn progress(&self, id: u64) -> Arc<AtomicU64> {
        self.map.lock().entry(id).or_default().progress.clone()
    }

    fn finish(&self, id: u64, done: Done) {
        self.map.lock().entry(id).or_default().done = Some(done);
        self.changed.notify_all();
    }

    /// Waits for stream `id`'s record. Gives up when its byte count has not
    /// moved for `stall` (a stuck proxy), not after a fixed time.
    pub fn wait_done(&self, id: u64, stall: Duration) -> Result<Done, String> {
        let progress = self.progress(id);
        let mut last = progress.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        let mut map = self.map.lock();
        loop {
            if let Some(done) = map.get(&id).and_then(|e| e.done) {
                map.remove(&id);
                return Ok(done);
            }
            let now = progress.load(Ordering::Relaxed);
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() > stall {
                map.remove(&id);
                return Err(format!(
                    "target side of stream {id} stuck at {now} bytes for {stall:?}"
                ));
            }
            self.changed.wait_for(&mut map, Duration::from_millis(200));
        }
    }

    /// Forgets stream `id`.
    pub fn remove(&self, id: u64) {
        self.map.lock().remove(&id);
    }
}

// -------------------------------------------------------------- targets

/// Threads waiting in accept() on the targets' listener.
const ACCEPTORS: usize = 8;

/// The target servers: one loopback listener. A pool of acceptor threads
/// answers request/response connections itself (no thread to start, so
/// the setup scenario measures the route, not us); every other connection
/// gets a thread of its own.
pub struct Targets {
    addr: SocketAddr,
    registry: Arc<Registry>,
    stop: Arc<AtomicBool>,
    acceptors: Vec<JoinHandle<()>>,
}

impl Targets {
    pub fn start(listen: SocketAddr) -> io::Result<Targets> {
        let listener = Arc::new(listen_deep(listen)?);
        let addr = listener.local_addr()?;
        let registry = Arc::new(Registry::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut acceptors = Vec::with_capacity(ACCEPTORS);
        for i in 0..ACCEPTORS {
            let (l, r, st) = (listener.clone(), registry.clone(), stop.clone());
            let spawned = thread::Builder::new()
                .name(format!("bench-accept {i}"))
                .spawn(move || accept_loop(&l, &r, &st));
            match spawned {
                Ok(h) => acceptors.push(h),
                Err(e) => {
                    let t = Targets {
                        addr,
                        registry,
                        stop,
                        acceptors,
                    };
                    drop(t);
                    return Err(e);
                }
            }
        }
        Ok(Targets {
            addr,
            registry,
            stop,
            acceptors,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake each acceptor with a connection it drops.
        for _ in 0..self.acceptors.len() {
            let _ = TcpStream::connect(self.addr);
        }
        for h in self.acceptors.drain(..) {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, registry: &Arc<Registry>, stop: &AtomicBool) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut conn = match accepted {
            Ok((c, _)) => c,
            // EMFILE and friends: the client sees its stream fail.
            Err(_) => {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let mut h = [0u8; HEADER_LEN];
        let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
        if conn.read_exact(&mut h).is_err() {
            continue;
        }
        let Some(header) = Header::decode(&h) else {
            continue;
        };
        let _ = conn.set_read_timeout(None);
        if header.kind == Kind::RequestReply {
            serve(conn, header, registry);
            continue;
        }
        let registry = registry.clone();
        // Detached on purpose: a connection thread ends when its peer goes
        // away, and the bench process exits once the report is out. If the
        // thread cannot start, the connection drops with the closure and
        // the client sees its stream fail.
        let _ = thread::Builder::new()
            .name("bench-target".into())
            .stack_size(128 * 1024)
            .spawn(move || serve(conn, header, &registry));
    }
}

/// Serves one connection whose header has been read.
fn serve(mut s: TcpStream, header: Header, registry: &Registry) {
    match header.kind {
        Kind::Sink => {
            let progress = registry.progress(header.id);
            let (r, failed) = match receive(&mut s, header.len, &progress) {
                Ok(r) => (r, false),
                Err(_) => (
                    Received {
                        bytes: progress.load(Ordering::Relaxed),
                        crc: 0,
                        full_at: None,
                    },
                    true,
                ),
            };
            registry.finish(
                header.id,
                Done {
                    bytes: r.bytes,
                    crc: r.crc,
                    at: r.full_at.unwrap_or_else(Instant::now),
                    failed,
                },
            );
        }
        Kind::Source => {
            let progress = registry.progress(header.id);
            let result = send_pattern(&mut s, header.id, header.len, &progress);
            let at = Instant::now();
            let (bytes, crc, failed) = match result {
                Ok((b, c)) => (b, c, false),
                Err(_) => (progress.load(Ordering::Relaxed), 0, true),
            };
            registry.finish(
                header.id,
                Done {
                    bytes,
                    crc,
                    at,
                    failed,
                },
            );
            // Half-close, then wait for the client to close first, so the
            // TIME_WAIT lands on its side.
            let _ = s.shutdown(Shutdown::Write);
            let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
            let mut sink = [0u8; 4096];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
        Kind::Echo => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        }
        Kind::RequestReply => {
            let mut req = Vec::new();
            let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
            if s.read_to_end(&mut req).is_err() {
                return;
            }
            let reply = make_reply(&req, header.len as usize);
            let _ = s.write_all(&reply);
            let _ = s.shutdown(Shutdown::Write);
        }
    }
}

/// A request/response target's reply: the request's byte count and CRC-32,
/// then pattern bytes up to `len` (at least the 12-byte head).
pub fn make_reply(req: &[u8], len: usize) -> Vec<u8> {
    let mut reply = Vec::with_capacity(len.max(REPLY_HEAD));
    reply.extend_from_slice(&(req.len() as u64).to_be_bytes());
    reply.extend_from_slice(&crc32fast::hash(req).to_be_bytes());
    let rest = len.saturating_sub(REPLY_HEAD);
    reply.extend_from_slice(&base()[..rest.min(BLOCK)]);
    reply.resize(len.max(REPLY_HEAD), 0);
    reply
}

/// A request body of `len` bytes for stream `id` (pattern bytes, the id
/// first so that no two requests are equal).
pub fn request_body(id: u64, len: usize) -> Vec<u8> {
    let mut body = base()[..len.min(BLOCK)].to_vec();
    let n = body.len().min(8);
    body[..n].copy_from_slice(&id.to_be_bytes()[..n]);
    body
}

/// Checks a reply made by [`make_reply`] for `req`.
pub fn check_reply(req: &[u8], reply: &[u8], len: usize) -> Result<(), String> {
    if reply.len() != len.max(REPLY_HEAD) {
        return Err(format!(
            "reply is {} bytes, expected {}",
            reply.len(),
            len.max(REPLY_HEAD)
        ));
    }
    let count = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
    let crc = u32::from_be_bytes(reply[8..12].try_into().expect("4 bytes"));
    if count != req.len() as u64 || crc != crc32fast::hash(req) {
        return Err(format!(
            "target got {count} request bytes (crc {crc:08x}), sent {} (crc {:08x})",
            req.len(),
            crc32fast::hash(req)
        ));
    }
    if reply != make_reply(req, len).as_slice() {
        return Err("reply bytes differ from what the target sent".into());
    }
    Ok(())
}

// ----------------------------------------------------------- hold target

/// The hold scenario's echo server, in a child process of its own so the
/// idle streams' target ends do not count against the bench's descriptors.
pub struct HoldTarget {
    child: Child,
    stdin: Option<ChildStdin>,
    pub addr: SocketAddr,
}

impl HoldTarget {
    /// Starts `halfpipe-bench --serve-hold-target`. Call it from the main
    /// thread: the child's parent-death signal fires when the spawning
    /// thread ends.
    pub fn start() -> io::Result<HoldTarget> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("--serve-hold-target")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        super::die_with_parent(&mut cmd);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("hold target listening on ")
            .and_then(|a| a.parse().ok());
        match addr {
            Some(addr) => Ok(HoldTarget { child, stdin, addr }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(io::Error::other(format!(
                    "hold target did not start (said {line:?})"
                )))
            }
        }
    }
}

impl Drop for HoldTarget {
    fn drop(&mut self) {
        // Closing its stdin ends it; kill in case it is stuck.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One echo connection of the hold target.
struct EchoConn {
    sock: TcpStream,
    pending: Vec<u8>,
    eof: bool,
}

/// Listens with a deep accept queue: the hold scenario opens streams
/// faster than one thread accepts them, and a full queue drops SYNs (a
/// one-second retransmit each, which would be measured as setup time).
fn listen_deep(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

fn epoll_ctl(ep: i32, op: i32, fd: i32, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: ep is our epoll descriptor and ev a valid epoll_event.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads what is there and echoes it. Ok(false): the connection is done
/// (EOF echoed and half-closed, or failed) and can be dropped.
fn service(c: &mut EchoConn, buf: &mut [u8]) -> bool {
    while !c.eof {
        match c.sock.read(buf) {
            Ok(0) => c.eof = true,
            Ok(n) => c.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    while !c.pending.is_empty() {
        match c.sock.write(&c.pending) {
            Ok(n) => {
                c.pending.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    if c.eof {
        let _ = c.sock.shutdown(Shutdown::Write);
        return false;
    }
    true
}

/// `halfpipe-bench --serve-hold-target`: a single-threaded epoll echo
/// server on an ephemeral loopback port. Prints its address, then serves
/// until its stdin closes (the bench went away).
pub fn serve_hold_target() -> ExitCode {
    halfpipe::process::limits::KernelLimits::read(); // raises RLIMIT_NOFILE to the hard limit
    let listener = match listen_deep("127.0.0.1:0".parse().expect("literal")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("halfpipe-bench: hold target: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = listener.local_addr().expect("bound");
    // SAFETY: plain system call, no pointers.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let lfd = listener.as_raw_fd();
    let ready = listener.set_nonblocking(true).is_ok()
        && ep >= 0
        && epoll_ctl(ep, libc::EPOLL_CTL_ADD, 0, libc::EPOLLIN as u32).is_ok()
        && epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32).is_ok();
    if !ready {
        eprintln!(
            "halfpipe-bench: hold target: {}",
            io::Error::last_os_error()
        );
        return ExitCode::from(2);
    }
    println!("hold target listening on {addr}");
    let _ = io::stdout().flush();

    let mut conns: HashMap<i32, EchoConn> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: events is a valid buffer of events.len() entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            return ExitCode::from(1);
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as i32;
            if fd == 0 {
                let mut b = [0u8; 64];
                // SAFETY: reading into a valid 64-byte buffer from fd 0.
                if unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) } <= 0 {
                    return ExitCode::SUCCESS;
                }
            } else if fd == lfd {
                loop {
                    match listener.accept() {
                        Ok((sock, _)) => {
                            let cfd = sock.as_raw_fd();
                            if sock.set_nonblocking(true).is_ok()
                                && epoll_ctl(ep, libc::EPOLL_CTL_ADD, cfd, libc::EPOLLIN as u32)
                                    .is_ok()
                            {
                                conns.insert(
                                    cfd,
                                    EchoConn {
                                        sock,
                                        pending: Vec::new(),
                                        eof: false,
                                    },
                                );
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        // WouldBlock, or out of descriptors: next time.
                        Err(_) => break,
                    }
                }
            } else if let Some(c) = conns.get_mut(&fd) {
                if service(c, &mut buf) {
                    // Wait for room to write while output is pending.
                    let want = if c.pending.is_empty() {
                        libc::EPOLLIN
                    } else {
                        libc::EPOLLOUT
                    };
                    let _ = epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, want as u32);
                } else {
                    let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, 0);
                    conns.remove(&fd);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            kind: Kind::RequestReply,
            id: 0x0102_0304_0506_0708,
            len: ENDLESS,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        let mut bad = h.encode();
        bad[0] = b'X';
        assert_eq!(Header::decode(&bad), None);
        bad = h.encode();
        bad[4] = 9;
        assert_eq!(Header::decode(&bad), None);
    }

    #[test]
    fn pattern_blocks_differ_and_hash_matches_receiver() {
        let mut p = Pattern::new(7);
        let a = p.next_block(BLOCK).to_vec();
        let b = p.next_block(BLOCK).to_vec();
        assert_ne!(a, b);
        assert_ne!(Pattern::new(8).next_block(BLOCK), &a[..]);

        let len = 3 * BLOCK as u64 + 1234;
        let mut wire = Vec::new();
        let sent = AtomicU64::new(0);
        let (n, crc) = send_pattern(&mut wire, 9, len, &sent).unwrap();
        assert_eq!(n, len);
        assert_eq!(sent.load(Ordering::Relaxed), len);
        let got = AtomicU64::new(0);
        let r = receive(&mut &wire[..], len, &got).unwrap();
        assert_eq!((r.bytes, r.crc), (len, crc));
        assert!(r.full_at.is_some());
    }

    #[test]
    fn replies_are_checked() {
        let req = b"some request".to_vec();
        let reply = make_reply(&req, 1000);
        assert_eq!(reply.len(), 1000);
        check_reply(&req, &reply, 1000).unwrap();
        assert!(check_reply(b"other", &reply, 1000).is_err());
        assert!(check_reply(&req, &reply[..999], 1000).is_err());
    }
}
