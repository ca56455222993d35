//! End to end through the SOCKS port: real application sockets, real target
//! servers, the real binary, all on 127.0.0.1. Each test names the
//! requirements of docs/protocol.md it checks.
//!
//! In `halfpipe run` both edges log to the same debug log. A stream is
//! called "C.S" there: the client edge logs "BEGIN sent stream=C.S
//! target=..." and the exit edge "connected stream=C.S target=...", and
//! both log every §7 transition as "FROM => TO (Event) stream=C.S". The
//! half-close tests use that to check the table rows at each edge, not only
//! the bytes the application and the target see.

use crate::util::*;
use sha2::{Digest, Sha256};
use socket2::{Domain, SockRef, Socket, Type};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) const MIB: usize = 1 << 20;

// The §7 event table, as the edges log its rows.
/// R7.2: read() returns EOF in OPEN: send FIN.
const ROW1: &str = "OPEN => DONE_PACKAGING (ReadEof)";
/// R7.3: read() returns EOF in DONE_DELIVERING: send FIN.
const ROW2: &str = "DONE_DELIVERING => CLOSED (ReadEof)";
/// R7.4: FIN received in OPEN: shutdown(SHUT_WR).
const ROW3: &str = "OPEN => DONE_DELIVERING (FinReceived)";
/// R7.5: FIN received in DONE_PACKAGING: shutdown(SHUT_WR).
const ROW4: &str = "DONE_PACKAGING => CLOSED (FinReceived)";

// ---------------------------------------------------------------- helpers

pub(crate) fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Compares big buffers without printing megabytes on failure.
pub(crate) fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {} bytes; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

/// §8 from the outside: SO_LINGER 0, then close, so the peer gets a RST.
pub(crate) fn reset(s: TcpStream) {
    SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
}

/// Reads until EOF or an error: what was read, and how reading ended.
pub(crate) fn read_until_end(s: &mut impl Read) -> (Vec<u8>, io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (out, Err(e)),
        }
    }
}

/// Reads to EOF; anything else fails the test.
fn read_to_eof(s: &mut impl Read, what: &str) -> Vec<u8> {
    let (data, end) = read_until_end(s);
    if let Err(e) = end {
        panic!(
            "{what}: error after {} bytes instead of EOF: {e}",
            data.len()
        );
    }
    data
}

/// A SOCKS5 stream to 127.0.0.1:`port` through `d`, with reads bounded by
/// PATIENCE so that a lost byte fails the test instead of hanging it.
pub(crate) fn open(d: &Daemon, port: u16) -> TcpStream {
    let s = socks5(d.socks(), "127.0.0.1", port, None)
        .unwrap_or_else(|code| panic!("SOCKS5 CONNECT failed with {code:#04x}:\n{}", d.log()));
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

fn patient(s: &TcpStream) {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
}

/// Waits for a value sent by a target server thread.
fn recv<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|e| panic!("{what}: nothing from the target ({e})"))
}

/// The names ("C.S") of the stream to `target` at the client edge and at
/// the exit edge, from the daemon's debug log.
fn edge_names(d: &Daemon, target: SocketAddr) -> (String, String) {
    let t = format!("target={target}");
    let find = |log: &str, what: &str| {
        log.lines()
            .find(|l| l.contains(what) && l.split_whitespace().any(|w| w == t))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("stream=")))
            .map(str::to_owned)
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = d.log();
        if let (Some(c), Some(e)) = (find(&log, "BEGIN sent "), find(&log, ": connected ")) {
            return (c, e);
        }
        assert!(
            Instant::now() < deadline,
            "no BEGIN sent / connected lines for {target}:\n{log}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The circuit part C of a stream name "C.S".
fn circuit_of(stream: &str) -> &str {
    stream.split('.').next().unwrap()
}

/// Waits until `stream` has logged the §7 transition `row`.
fn wait_row(d: &Daemon, stream: &str, row: &str) {
    d.wait_for_log(&format!("{row} stream={stream}\n"));
}

fn has_row(d: &Daemon, stream: &str, row: &str) -> bool {
    d.log().contains(&format!("{row} stream={stream}\n"))
}

/// Waits until `stream` is CLOSED, and returns the row that closed it.
fn wait_closed(d: &Daemon, stream: &str) -> &'static str {
    eventually(&format!("stream {stream} CLOSED"), || {
        [ROW2, ROW4].into_iter().find(|row| has_row(d, stream, row))
    })
}

/// Deterministic, position-dependent data for stream `id`, made in 64 KiB
/// chunks so that hundreds of streams need no big buffers: every chunk is
/// a shared pattern with the stream ID and the chunk number written over
/// its first 8 bytes.
pub(crate) fn payload_chunks(id: u32, len: usize) -> impl Iterator<Item = Vec<u8>> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    let base = BASE.get_or_init(|| pattern(64 * 1024, 0x5a));
    (0..len.div_ceil(base.len())).map(move |k| {
        let mut c = base[..(len - k * base.len()).min(base.len())].to_vec();
        let mut stamp = [0u8; 8];
        stamp[..4].copy_from_slice(&id.to_be_bytes());
        stamp[4..].copy_from_slice(&(k as u32).to_be_bytes());
        let n = c.len().min(8);
        c[..n].copy_from_slice(&stamp[..n]);
        c
    })
}

pub(crate) fn payload_sha(id: u32, len: usize) -> [u8; 32] {
    let mut h = Sha256::new();
    payload_chunks(id, len).for_each(|c| h.update(&c));
    h.finalize().into()
}

fn write_payload(s: &mut TcpStream, id: u32, len: usize) -> io::Result<()> {
    payload_chunks(id, len).try_for_each(|c| s.write_all(&c))
}

/// Reads to EOF hashing as it goes: (bytes, SHA-256).
pub(crate) fn read_hashed(s: &mut TcpStream, what: &str) -> (usize, [u8; 32]) {
    let mut h = Sha256::new();
    let mut n = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (n, h.finalize().into()),
            Ok(k) => {
                h.update(&buf[..k]);
                n += k;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{what}: error after {n} bytes instead of EOF: {e}"),
        }
    }
}

/// A target that answers a 12-byte request (stream ID, length) with that
/// payload, half-closes, and then waits for the application's EOF.
/// `progress` counts the bytes it has written.
pub(crate) fn payload_server(progress: Arc<AtomicUsize>) -> Server {
    Server::start(move |mut s| {
        let mut req = [0u8; 12];
        if s.read_exact(&mut req).is_err() {
            return;
        }
        let id = u32::from_be_bytes(req[..4].try_into().unwrap());
        let len = u64::from_be_bytes(req[4..].try_into().unwrap()) as usize;
        for c in payload_chunks(id, len) {
            if s.write_all(&c).is_err() {
                return;
            }
            progress.fetch_add(c.len(), Ordering::SeqCst);
        }
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.set_read_timeout(Some(PATIENCE));
        let _ = read_until_end(&mut s);
    })
}

pub(crate) fn payload_request(id: u32, len: usize) -> Vec<u8> {
    let mut r = id.to_be_bytes().to_vec();
    r.extend_from_slice(&(len as u64).to_be_bytes());
    r
}

/// A free port below the kernel's ephemeral range, so that a client dialing
/// it while nothing listens can never connect to itself.
pub(crate) fn free_port_below_ephemeral() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let start = 20000 + (std::process::id() % 5000) as u16;
    (start..low)
        .chain(10000..start)
        .find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// `halfpipe exit` on an explicit address, accepting everything.
pub(crate) fn exit_on(addr: &str) -> Daemon {
    Daemon::start(
        &["exit", "--listen", addr, "--exit-policy", "accept *:*"],
        false,
        true,
    )
}

/// `halfpipe client` started without waiting for its link (the exit may be
/// unreachable on purpose): ready once it says where SOCKS listens.
pub(crate) fn client_unlinked(exit: &str) -> Daemon {
    let mut d = Daemon::start(
        &["client", "--socks", "127.0.0.1:0", "--exit", exit],
        false,
        false,
    );
    let prefix = "SOCKS listening on ";
    d.socks = Some(eventually("the client's SOCKS line", || {
        let out = d.stdout();
        let rest = &out[out.find(prefix)? + prefix.len()..];
        rest.split_whitespace().next()?.parse().ok()
    }));
    d
}

/// An exit with `policy` and a client linked to it, as separate processes.
fn split(policy: &str, exit_extra: &[&str]) -> (Daemon, Daemon) {
    let mut args = vec!["--exit-policy", policy];
    args.extend_from_slice(exit_extra);
    let exit = Daemon::exit(&args);
    let client = Daemon::client(exit.link(), &[]);
    (exit, client)
}

/// The SOCKS5 reply code for `command` (1 CONNECT, 2 BIND, 3 UDP) to
/// `host:port`, without authentication.
fn socks5_code(proxy: SocketAddr, command: u8, host: &str, port: u16) -> u8 {
    let mut s = TcpStream::connect(proxy).unwrap();
    patient(&s);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    s.write_all(&socks5_request(command, host, port)).unwrap();
    read_socks5_reply(&mut s)
}

/// A SOCKS4 CONNECT (SOCKS4a when `host` is given): the stream and CD.
fn socks4(proxy: SocketAddr, ip: [u8; 4], port: u16, host: Option<&str>) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(proxy).unwrap();
    patient(&s);
    let mut r = vec![4, 1];
    r.extend_from_slice(&port.to_be_bytes());
    r.extend_from_slice(&ip);
    r.extend_from_slice(b"tester\0");
    if let Some(h) = host {
        r.extend_from_slice(h.as_bytes());
        r.push(0);
    }
    s.write_all(&r).unwrap();
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 0, "SOCKS4 reply VN: {reply:?}");
    (s, reply[1])
}

/// One round trip through an echo target.
fn echo_round_trip(s: &mut TcpStream, what: &str) {
    let msg = pattern(10_000, 77);
    s.write_all(&msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)
        .unwrap_or_else(|e| panic!("{what}: echo: {e}"));
    assert_same(&back, &msg, what);
}

/// A listener whose accept queue is full: a connect to it hangs (Linux
/// drops the SYN), which is how the exit's connect times out on loopback.
fn hanging_listener() -> (Socket, SocketAddr, Vec<Socket>) {
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let fill: Vec<Socket> = (0..4)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            s
        })
        .collect();
    // Let the fillers' handshakes settle (setup, not a measurement).
    thread::sleep(Duration::from_millis(100));
    (l, addr, fill)
}

/// Finds `tool` on PATH; CI installs it, so a missing tool is a failure.
fn require(tool: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| dir.join(tool).is_file());
    assert!(
        found,
        "`{tool}` is not installed: this test needs it (apt-get install -y {package})"
    );
}

/// Runs a command with `stdin` as its input; its exit status and stdout.
/// Killed (and the test failed) if it runs longer than PATIENCE.
fn run_tool(cmd: &mut Command, stdin: Vec<u8>) -> (std::process::ExitStatus, Vec<u8>, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the tool");
    let mut input = child.stdin.take().unwrap();
    let feeder = thread::spawn(move || {
        let _ = input.write_all(&stdin);
        // Dropping stdin is the tool's EOF.
    });
    let mut out = child.stdout.take().unwrap();
    let reader = thread::spawn(move || read_until_end(&mut out).0);
    let mut err = child.stderr.take().unwrap();
    let err_reader = thread::spawn(move || read_until_end(&mut err).0);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish");
        }
        thread::sleep(Duration::from_millis(10));
    };
    feeder.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    (status, reader.join().unwrap(), stderr)
}

/// A tiny HTTP/1.x server: reads the request head, answers 200 with `body`.
fn http_server(body: Vec<u8>) -> Server {
    Server::start(move |mut s| {
        patient(&s);
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&body);
        let _ = s.shutdown(Shutdown::Write);
        let _ = read_until_end(&mut s);
    })
}

// ------------------------------------------------------- §7 half-close

/// R7.2 and R7.5 at the client edge, R7.4 and R7.3 at the exit edge: the
/// application half-closes first (request, SHUT_WR, whole reply), as in
/// smoke.rs, here checked at both edges; R7.9: the application reads a
/// normal end of file, not a reset.
#[test]
fn app_half_closes_first_rows_at_both_edges() {
    let server = Server::request_reply(|req| {
        let mut reply = sha(req).to_vec();
        reply.extend_from_slice(&pattern(200_000, 3));
        reply
    });
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    let request = pattern(150_000, 2);
    s.write_all(&request).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let reply = read_to_eof(&mut s, "reply");
    assert_eq!(
        reply[..32],
        sha(&request),
        "the target got the whole request"
    );
    assert_same(&reply[32..], &pattern(200_000, 3), "reply");
    let (client, exit) = edge_names(&d, server.addr);
    wait_row(&d, &client, ROW1);
    wait_row(&d, &client, ROW4);
    wait_row(&d, &exit, ROW3);
    wait_row(&d, &exit, ROW2);
}

/// R7.2 and R7.5 at the exit edge, R7.4 and R7.3 at the client edge (the
/// mirror image): the target sends a greeting and shuts its write side;
/// the application reads EOF, then sends 1 MB, which the target still
/// receives whole before the application shuts down (R7.9: a normal EOF).
#[test]
fn target_half_closes_first_and_still_receives_everything() {
    let (tx, rx) = mpsc::channel();
    let server = Server::start(move |mut s| {
        patient(&s);
        s.write_all(b"220 hello; I only listen from now on\r\n")
            .unwrap();
        s.write_all(&pattern(100_000, 9)).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (got, end) = read_until_end(&mut s);
        tx.send((got, end.map_err(|e| e.to_string()))).unwrap();
    });
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    let greeting = read_to_eof(&mut s, "greeting");
    let mut want = b"220 hello; I only listen from now on\r\n".to_vec();
    want.extend_from_slice(&pattern(100_000, 9));
    assert_same(&greeting, &want, "greeting");

    let (client, exit) = edge_names(&d, server.addr);
    wait_row(&d, &exit, ROW1);
    wait_row(&d, &client, ROW3);

    let upload = pattern(MIB, 10);
    s.write_all(&upload).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, end) = recv(&rx, "upload");
    assert_eq!(end, Ok(()), "the target reads EOF after the upload");
    assert_same(&got, &upload, "what the target received after its FIN");
    wait_row(&d, &client, ROW2);
    wait_row(&d, &exit, ROW4);
    // The application's side is finished too: EOF, and again EOF.
    assert_eq!(s.read(&mut [0u8; 16]).unwrap(), 0);
}

/// Both sides send, then both shut down their write side before reading
/// anything; `app_first` says whose shutdown() comes first (the other
/// follows at once, without waiting for the first's EOF).
fn both_half_close(app_first: bool) {
    let up = pattern(64_000, 31);
    let down = pattern(64_000, 32);
    let (app_shut_tx, app_shut_rx) = mpsc::channel::<()>();
    let (srv_shut_tx, srv_shut_rx) = mpsc::channel::<()>();
    let (res_tx, res_rx) = mpsc::channel();
    let app_shut_rx = Mutex::new(app_shut_rx);
    let server = {
        let down = down.clone();
        Server::start(move |mut s| {
            patient(&s);
            s.write_all(&down).unwrap();
            if app_first {
                recv(&app_shut_rx.lock().unwrap(), "application's shutdown");
            }
            s.shutdown(Shutdown::Write).unwrap();
            srv_shut_tx.send(()).unwrap();
            let (got, end) = read_until_end(&mut s);
            res_tx.send((got, end.map_err(|e| e.to_string()))).unwrap();
        })
    };
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    s.write_all(&up).unwrap();
    if !app_first {
        recv(&srv_shut_rx, "target's shutdown");
    }
    s.shutdown(Shutdown::Write).unwrap();
    app_shut_tx.send(()).unwrap();
    let got = read_to_eof(&mut s, "application");
    assert_same(&got, &down, "what the application received");
    let (got, end) = recv(&res_rx, "target's result");
    assert_eq!(end, Ok(()), "the target reads EOF");
    assert_same(&got, &up, "what the target received");
    // Each edge went OPEN → half-closed → CLOSED by legal rows only.
    let (client, exit) = edge_names(&d, server.addr);
    for name in [&client, &exit] {
        match wait_closed(&d, name) {
            r if r == ROW4 => assert!(has_row(&d, name, ROW1), "{name}:\n{}", d.log()),
            _ => assert!(has_row(&d, name, ROW3), "{name}:\n{}", d.log()),
        }
    }
}

/// R7.2, R7.3, R7.4, R7.5: the application half-closes first, the target
/// right after, before either has seen the other's EOF.
#[test]
fn both_half_close_application_first() {
    both_half_close(true);
}

/// R7.2, R7.3, R7.4, R7.5: the target half-closes first, the application
/// right after, before either has seen the other's EOF.
#[test]
fn both_half_close_target_first() {
    both_half_close(false);
}

/// R7.10: a half-closed stream lives on: the application has half-closed;
/// the stream stays in DONE_PACKAGING (client) and DONE_DELIVERING (exit)
/// with its threads alive, and the target keeps sending, piece by piece,
/// until it finishes.
#[test]
fn stream_half_closed_by_the_application_lives_on() {
    const CHUNKS: u8 = 10;
    let (eof_tx, eof_rx) = mpsc::channel();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let ack_rx = Mutex::new(ack_rx);
    let server = Server::start(move |mut s| {
        patient(&s);
        let req = read_to_eof(&mut s, "request");
        eof_tx.send(req).unwrap();
        for i in 0..CHUNKS {
            recv(&ack_rx.lock().unwrap(), "go-ahead");
            s.write_all(&pattern(10_000, i)).unwrap();
        }
    });
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    s.write_all(b"SUBSCRIBE news\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(recv(&eof_rx, "request"), b"SUBSCRIBE news\n");
    let (client, exit) = edge_names(&d, server.addr);
    wait_row(&d, &client, ROW1);
    wait_row(&d, &exit, ROW3);
    // Leave it half-closed a moment: nothing times it out.
    thread::sleep(Duration::from_millis(500));
    let names = d.thread_names();
    for t in [format!("dl {client}"), format!("pk {exit}")] {
        assert!(names.contains(&t), "{t} is gone: {names:?}");
    }
    for i in 0..CHUNKS {
        ack_tx.send(()).unwrap();
        let mut chunk = vec![0u8; 10_000];
        s.read_exact(&mut chunk).unwrap();
        assert_same(&chunk, &pattern(10_000, i), "chunk");
        thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(
        s.read(&mut [0u8; 16]).unwrap(),
        0,
        "EOF after the last chunk"
    );
    wait_row(&d, &exit, ROW2);
    wait_row(&d, &client, ROW4);
}

/// R7.10, mirrored: the target has half-closed; the stream stays in
/// DONE_DELIVERING (client) and DONE_PACKAGING (exit), and the application
/// keeps sending, piece by piece, until it finishes.
#[test]
fn stream_half_closed_by_the_target_lives_on() {
    const CHUNKS: u8 = 10;
    let (ack_tx, ack_rx) = mpsc::channel();
    let server = Server::start(move |mut s| {
        patient(&s);
        s.write_all(b"READY\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        for i in 0..CHUNKS {
            let mut chunk = vec![0u8; 10_000];
            let ok = s.read_exact(&mut chunk).is_ok() && chunk == pattern(10_000, i);
            ack_tx.send(ok).unwrap();
        }
        let (rest, end) = read_until_end(&mut s);
        ack_tx.send(rest.is_empty() && end.is_ok()).unwrap();
    });
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    assert_eq!(read_to_eof(&mut s, "greeting"), b"READY\n");
    let (client, exit) = edge_names(&d, server.addr);
    wait_row(&d, &exit, ROW1);
    wait_row(&d, &client, ROW3);
    thread::sleep(Duration::from_millis(500));
    let names = d.thread_names();
    for t in [format!("pk {client}"), format!("dl {exit}")] {
        assert!(names.contains(&t), "{t} is gone: {names:?}");
    }
    for i in 0..CHUNKS {
        s.write_all(&pattern(10_000, i)).unwrap();
        assert!(recv(&ack_rx, "chunk"), "chunk {i} arrived intact");
        thread::sleep(Duration::from_millis(30));
    }
    s.shutdown(Shutdown::Write).unwrap();
    assert!(recv(&ack_rx, "EOF"), "the target reads a clean EOF");
    wait_row(&d, &client, ROW2);
    wait_row(&d, &exit, ROW4);
}

// ---------------------------------------------------- §8 abortive close

/// R8.2: a target that resets (SO_LINGER 0, close) makes the exit send
/// END(CONNRESET); R8.8: the client resets the application's connection,
/// which sees ECONNRESET, not EOF.
#[test]
fn target_reset_reaches_the_application_as_a_reset() {
    let server = Server::start(|mut s| {
        patient(&s);
        let mut go = [0u8; 2];
        if s.read_exact(&mut go).is_ok() {
            reset(s);
        }
    });
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    s.write_all(b"go").unwrap();
    let (data, end) = read_until_end(&mut s);
    assert!(data.is_empty());
    let err = end.expect_err("a reset, not EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    d.wait_for_log("END(CONNRESET) received");
}

/// R8.2, R8.8, the other way: an application that resets makes the client
/// send END(CONNRESET), and the target see ECONNRESET.
#[test]
fn application_reset_reaches_the_target_as_a_reset() {
    let (got_tx, got_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel();
    let server = Server::start(move |mut s| {
        patient(&s);
        let mut hi = [0u8; 2];
        s.read_exact(&mut hi).unwrap();
        got_tx.send(()).unwrap();
        let (rest, end) = read_until_end(&mut s);
        end_tx
            .send((rest.len(), end.map_err(|e| e.kind())))
            .unwrap();
    });
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    s.write_all(b"hi").unwrap();
    recv(&got_rx, "hello");
    reset(s);
    let (rest, end) = recv(&end_rx, "target's read");
    assert_eq!(rest, 0);
    assert_eq!(end, Err(io::ErrorKind::ConnectionReset), "a reset, not EOF");
    d.wait_for_log("END(CONNRESET) received");
}

/// R8.2, R8.8 mid-transfer: the target resets while the application is
/// receiving a large reply. The application gets an intact prefix and then
/// ECONNRESET, never a clean EOF.
#[test]
fn target_reset_mid_transfer_is_a_reset_not_a_short_reply() {
    const TOTAL: usize = 64 * MIB;
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let stop_rx = Mutex::new(stop_rx);
    let server = Server::start(move |mut s| {
        let stop = stop_rx.lock().unwrap();
        for c in payload_chunks(7, TOTAL) {
            if stop.try_recv().is_ok() {
                break;
            }
            if s.write_all(&c).is_err() {
                return;
            }
        }
        reset(s);
    });
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if received.len() < MIB && received.len() + n >= MIB {
                    stop_tx.send(()).unwrap();
                }
                received.extend_from_slice(&buf[..n]);
            }
            Err(e) => break Err(e),
        }
    };
    let err = end.expect_err("a reset, not EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(received.len() >= MIB && received.len() < TOTAL);
    let want: Vec<u8> = payload_chunks(7, TOTAL)
        .flatten()
        .take(received.len())
        .collect();
    assert_same(&received, &want, "prefix before the reset");
}

/// R8.2, R8.8 mid-transfer, the other way: the application resets while
/// the target is sending it a large reply; the target's next write fails
/// with a reset (or EPIPE once the reset has been seen), never blocks.
#[test]
fn application_reset_mid_transfer_reaches_the_target() {
    let (tx, rx) = mpsc::channel();
    let server = Server::start(move |mut s| {
        let mut sent = 0usize;
        let end = payload_chunks(8, 256 * MIB).try_for_each(|c| {
            s.write_all(&c)?;
            sent += c.len();
            Ok::<_, io::Error>(())
        });
        tx.send((sent, end.map_err(|e| e.kind()))).unwrap();
    });
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    let mut got = vec![0u8; MIB];
    s.read_exact(&mut got).unwrap();
    let want: Vec<u8> = payload_chunks(8, MIB).flatten().collect();
    assert_same(&got, &want, "first MiB");
    reset(s);
    let (sent, end) = recv(&rx, "target's writes");
    assert!(
        sent < 256 * MIB,
        "the target sent everything: no reset reached it"
    );
    assert!(
        matches!(
            end,
            Err(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
        ),
        "target's write ended with {end:?}"
    );
    d.wait_for_log("END(CONNRESET) received");
}

// ------------------------------------------- §5 and §11: SOCKS replies

/// R5.6: the exit policy refuses → END(EXITPOLICY); R8.10, R11.7: the
/// client answers SOCKS5 0x02, while the same exit still serves a port its
/// policy accepts.
#[test]
fn exit_policy_refusal_is_socks5_0x02() {
    let refused = Server::echo();
    let allowed = Server::echo();
    let policy = format!("reject 127.0.0.1:{},accept *:*", refused.addr.port());
    let (exit, client) = split(&policy, &[]);
    assert_eq!(
        socks5(client.socks(), "127.0.0.1", refused.addr.port(), None).unwrap_err(),
        0x02
    );
    let mut s = socks5(client.socks(), "127.0.0.1", allowed.addr.port(), None).unwrap();
    patient(&s);
    echo_round_trip(&mut s, "allowed port");
    exit.wait_for_log("END(EXITPOLICY)");
}

/// R5.8, R11.10: END(CONNECTREFUSED) → 0x05 (a closed port); R5.7,
/// R11.9: END(RESOLVEFAILED) → 0x04 (a name that does not resolve).
#[test]
fn refused_and_unresolvable_are_socks5_0x05_and_0x04() {
    let (_exit, client) = split("accept *:*", &[]);
    assert_eq!(
        socks5(client.socks(), "127.0.0.1", closed_port(), None).unwrap_err(),
        0x05
    );
    assert_eq!(
        socks5(client.socks(), "nonexistent.invalid", 80, None).unwrap_err(),
        0x04
    );
}

/// R5.9, R11.11: a connect with no answer before the exit's connect
/// timeout → END(TIMEOUT) → 0x06. The target's accept queue is full, so
/// Linux drops the exit's SYN and the connect hangs.
#[test]
fn connect_timeout_is_socks5_0x06() {
    let (_listener, addr, _fill) = hanging_listener();
    let (_exit, client) = split("accept *:*", &["--connect-timeout", "1s"]);
    let code = socks5(client.socks(), "127.0.0.1", addr.port(), None).unwrap_err();
    assert_eq!(
        code, 0x06,
        "a connect to a full accept queue should hang until the exit's timeout"
    );
}

/// R11.13: BIND (2) and UDP ASSOCIATE (3) get 0x07.
#[test]
fn bind_and_udp_associate_are_socks5_0x07() {
    let server = Server::echo();
    let d = Daemon::run(&[]);
    for command in [2, 3] {
        assert_eq!(
            socks5_code(d.socks(), command, "127.0.0.1", server.addr.port()),
            0x07,
            "command {command}"
        );
    }
    // CONNECT on the same daemon works: 0x07 was about the command.
    assert_eq!(
        socks5_code(d.socks(), 1, "127.0.0.1", server.addr.port()),
        0x00
    );
}

/// R11.14: SOCKS4 replies 0x5B for any failure (policy, refused, a name
/// that does not resolve); R11.3: SOCKS4 and SOCKS4a (DSTIP 0.0.0.x and a
/// hostname) connect and carry data.
#[test]
fn socks4_failures_are_0x5b_and_socks4a_connects() {
    let refused = Server::echo();
    let allowed = Server::echo();
    let policy = format!("reject 127.0.0.1:{},accept *:*", refused.addr.port());
    let (_exit, client) = split(&policy, &[]);
    let (_, cd) = socks4(client.socks(), [127, 0, 0, 1], refused.addr.port(), None);
    assert_eq!(cd, 0x5B, "exit policy");
    let (_, cd) = socks4(client.socks(), [127, 0, 0, 1], closed_port(), None);
    assert_eq!(cd, 0x5B, "connection refused");
    let (_, cd) = socks4(
        client.socks(),
        [0, 0, 0, 1],
        80,
        Some("nonexistent.invalid"),
    );
    assert_eq!(cd, 0x5B, "unresolvable name");
    let (mut s, cd) = socks4(client.socks(), [127, 0, 0, 1], allowed.addr.port(), None);
    assert_eq!(cd, 0x5A, "SOCKS4");
    echo_round_trip(&mut s, "SOCKS4");
    let (mut s, cd) = socks4(
        client.socks(),
        [0, 0, 0, 1],
        allowed.addr.port(),
        Some("localhost"),
    );
    assert_eq!(cd, 0x5A, "SOCKS4a");
    echo_round_trip(&mut s, "SOCKS4a");
}

/// R11.15: with no link to the exit (nothing listens where the client
/// dials), SOCKS requests get 0x01 (R11.14, SOCKS4: 0x5B) at once rather
/// than waiting.
#[test]
fn no_link_to_the_exit_is_socks5_0x01() {
    let client = client_unlinked(&format!("127.0.0.1:{}", closed_port()));
    client.wait_for_log("cannot reach the exit");
    assert_eq!(
        socks5(client.socks(), "127.0.0.1", 80, None).unwrap_err(),
        0x01
    );
    let (_, cd) = socks4(client.socks(), [127, 0, 0, 1], 80, None);
    assert_eq!(cd, 0x5B);
}

/// R3.13: the exit dies: the client's open streams see a reset; R11.15:
/// new requests get 0x01 at once; R11.16: the client links again (with
/// backoff) once an exit listens on the same address again.
#[test]
fn exit_killed_resets_streams_and_client_reconnects() {
    let addr = format!("127.0.0.1:{}", free_port_below_ephemeral());
    let server = Server::echo();
    let exit = exit_on(&addr);
    let client = Daemon::client(exit.link(), &[]);
    let mut s = open(&client, server.addr.port());
    echo_round_trip(&mut s, "before the exit dies");

    drop(exit); // SIGKILL
    let (_, end) = read_until_end(&mut s);
    let err = end.expect_err("a reset, not EOF, when the link is lost");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    client.wait_for_log("link to exit lost");
    assert_eq!(
        socks5(client.socks(), "127.0.0.1", server.addr.port(), None).unwrap_err(),
        0x01
    );

    let _exit = exit_on(&addr);
    eventually("the client reconnects", || {
        (client.log_count("link to exit ready") >= 2).then_some(())
    });
    let mut s = open(&client, server.addr.port());
    echo_round_trip(&mut s, "after the reconnect");
}

// ------------------------------------------------- §5 optimistic data

/// §5 optimistic data: the SOCKS5 greeting, the request and the first
/// application bytes go in one write, before any SOCKS reply is read; R5.15,
/// R6.4: the bytes reach the target, in order, before the later ones.
#[test]
fn optimistic_data_in_the_same_write_as_the_socks_request() {
    let server = Server::request_reply(|req| req.to_vec());
    let d = Daemon::run(&[]);
    let early = pattern(2_000, 41);
    let late = pattern(200_000, 42);
    let mut s = TcpStream::connect(d.socks()).unwrap();
    patient(&s);
    let mut first = vec![5, 1, 0];
    first.extend_from_slice(&socks5_request(1, "127.0.0.1", server.addr.port()));
    first.extend_from_slice(&early);
    s.write_all(&first).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    assert_eq!(read_socks5_reply(&mut s), 0);
    s.write_all(&late).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let echoed = read_to_eof(&mut s, "echo");
    let mut want = early;
    want.extend_from_slice(&late);
    assert_same(&echoed, &want, "what the target received");
}

/// §5 optimistic FIN: the application sends its request and data and
/// shuts its write side before the SOCKS reply (FIN before CONNECTED,
/// R5.15); it still gets the reply and the whole answer (R7.2, R7.5).
#[test]
fn fin_before_connected_still_gets_the_socks_reply_and_answer() {
    let server = Server::request_reply(|req| {
        let mut r = sha(req).to_vec();
        r.extend_from_slice(&pattern(100_000, 44));
        r
    });
    let d = Daemon::run(&[]);
    let request = pattern(3_000, 43);
    let mut s = TcpStream::connect(d.socks()).unwrap();
    patient(&s);
    let mut first = vec![5, 1, 0];
    first.extend_from_slice(&socks5_request(1, "127.0.0.1", server.addr.port()));
    first.extend_from_slice(&request);
    s.write_all(&first).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    assert_eq!(read_socks5_reply(&mut s), 0);
    let reply = read_to_eof(&mut s, "answer");
    assert_eq!(reply[..32], sha(&request), "the target got the request");
    assert_same(&reply[32..], &pattern(100_000, 44), "answer");
    let (client, _) = edge_names(&d, server.addr);
    wait_row(&d, &client, ROW1);
    wait_row(&d, &client, ROW4);
}

/// R5.16: optimistic data and FIN for a stream the exit refuses are
/// discarded, and R8.10: the application gets the failure reply (R11.10:
/// 0x05 for a closed port), then a closed connection.
#[test]
fn optimistic_data_for_a_refused_stream_gets_the_failure_reply() {
    let d = Daemon::run(&[]);
    let mut s = TcpStream::connect(d.socks()).unwrap();
    patient(&s);
    let mut first = vec![5, 1, 0];
    first.extend_from_slice(&socks5_request(1, "127.0.0.1", closed_port()));
    first.extend_from_slice(&pattern(2_000, 45));
    s.write_all(&first).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    assert_eq!(read_socks5_reply(&mut s), 0x05);
    let (rest, _) = read_until_end(&mut s);
    assert!(rest.is_empty(), "nothing after a failure reply");
    // The daemon is fine afterwards.
    let server = Server::echo();
    let mut s = open(&d, server.addr.port());
    echo_round_trip(&mut s, "next stream");
}

// ------------------------------------------------------ §11 isolation

/// R11.4 (IsolateSOCKSAuth): streams with different username/password use
/// different circuits; the same credentials share one; streams without
/// credentials use the general circuit. R11.2: any credentials are
/// accepted.
#[test]
fn socks_credentials_isolate_circuits() {
    let d = Daemon::run(&[]);
    let creds: [Option<(&str, &str)>; 5] = [
        Some(("alice", "pw")),
        Some(("bob", "pw")),
        Some(("alice", "pw")),
        Some(("alice", "other")),
        None,
    ];
    let servers: Vec<Server> = creds.iter().map(|_| Server::echo()).collect();
    let mut streams = Vec::new();
    for (auth, server) in creds.iter().zip(&servers) {
        let mut s = socks5(d.socks(), "127.0.0.1", server.addr.port(), *auth).unwrap();
        patient(&s);
        echo_round_trip(&mut s, "isolated stream");
        streams.push(s);
    }
    let circ: Vec<String> = servers
        .iter()
        .map(|s| circuit_of(&edge_names(&d, s.addr).0).to_owned())
        .collect();
    assert_eq!(circ[0], circ[2], "alice/pw twice shares a circuit");
    for (i, j) in [(0, 1), (0, 3), (0, 4), (1, 3), (1, 4), (3, 4)] {
        assert_ne!(circ[i], circ[j], "{:?} and {:?}", creds[i], creds[j]);
    }
    // One general circuit plus three isolated ones, each logged by both
    // edges: 8 "circuit opened" lines, no more.
    eventually("8 circuits", || {
        (d.log_count("circuit opened") >= 8).then_some(())
    });
    assert_eq!(d.log_count("circuit opened"), 8, "{}", d.log());
}

// -------------------------------------------------- §10 flow control

/// R10.3, R10.7: a stream whose application stops reading (its target
/// sends 20 MB) holds back its own SENDMEs only, so it throttles only
/// itself (R10.8): four 8 MB streams on the same circuit complete intact
/// while it is stalled; then the stalled reader reads all 20 MB intact.
#[test]
fn stalled_reader_does_not_stop_other_streams() {
    const STALLED: usize = 20 * MIB;
    const OTHERS: usize = 8 * MIB;
    let progress = Arc::new(AtomicUsize::new(0));
    let stalled_server = payload_server(progress.clone());
    let server = payload_server(Arc::new(AtomicUsize::new(0)));
    let d = Daemon::run(&[]);

    let mut stalled = open(&d, stalled_server.addr.port());
    stalled.write_all(&payload_request(1000, STALLED)).unwrap();
    // Wait until the target is blocked: the buffers and the stream's
    // window are full and nothing moves any more.
    let mut last = 0;
    let mut still = 0;
    eventually("the stalled stream fills up", || {
        thread::sleep(Duration::from_millis(200));
        let now = progress.load(Ordering::SeqCst);
        still = if now == last && now > 0 { still + 1 } else { 0 };
        last = now;
        (still >= 3).then_some(())
    });
    assert!(
        last < STALLED,
        "buffers absorbed all {STALLED} bytes: the test needs a bigger transfer"
    );

    let others: Vec<_> = (0..4u32)
        .map(|id| {
            let mut s = open(&d, server.addr.port());
            thread::spawn(move || {
                s.write_all(&payload_request(id, OTHERS)).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                read_hashed(&mut s, "other stream")
            })
        })
        .collect();
    for (id, t) in others.into_iter().enumerate() {
        let (n, h) = t.join().unwrap();
        assert_eq!(n, OTHERS, "stream {id} length");
        assert_eq!(h, payload_sha(id as u32, OTHERS), "stream {id} SHA-256");
    }
    // The stalled stream was stalled all along: its target is still stuck.
    assert_eq!(
        progress.load(Ordering::SeqCst),
        last,
        "the stalled stream moved"
    );

    stalled.shutdown(Shutdown::Write).unwrap();
    let (n, h) = read_hashed(&mut stalled, "stalled stream");
    assert_eq!(n, STALLED);
    assert_eq!(h, payload_sha(1000, STALLED), "stalled stream SHA-256");
}

// ------------------------------------------- §7 and §10 at scale

/// §7 and §10, docs/design.md, invariant 6: 200 concurrent streams on one
/// circuit, 1 MiB each way: every application sends 1 MiB and
/// half-closes, every target answers with the request's SHA-256 and its
/// own 1 MiB and half-closes. Both directions check out, every stream
/// takes R7.2 and R7.5 at the client and R7.4 and R7.3 at the exit, and
/// afterwards the daemon has exactly the threads it started with.
#[test]
fn two_hundred_concurrent_half_closed_streams() {
    const STREAMS: u32 = 200;
    let server = Server::start(|mut s| {
        patient(&s);
        let mut head = [0u8; 8];
        if s.read_exact(&mut head).is_err() {
            return;
        }
        let id = u32::from_be_bytes(head[..4].try_into().unwrap());
        let mut h = Sha256::new();
        h.update(head);
        let (rest, end) = read_until_end(&mut s);
        if end.is_err() {
            return;
        }
        h.update(&rest);
        let digest: [u8; 32] = h.finalize().into();
        let _ = s.write_all(&digest);
        let _ = write_payload(&mut s, id + 10_000, MIB);
        let _ = s.shutdown(Shutdown::Write);
    });
    let d = Daemon::run(&[]);
    eventually("both circuit threads", || {
        (d.log_count("circuit opened") == 2).then_some(())
    });
    let baseline = d.thread_count();

    let apps: Vec<_> = (0..STREAMS)
        .map(|id| {
            let socks = d.socks();
            let port = server.addr.port();
            thread::spawn(move || {
                let mut s = socks5(socks, "127.0.0.1", port, None)
                    .unwrap_or_else(|c| panic!("stream {id}: SOCKS {c:#04x}"));
                patient(&s);
                write_payload(&mut s, id, MIB).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let mut digest = [0u8; 32];
                s.read_exact(&mut digest).unwrap();
                let (n, h) = read_hashed(&mut s, "reply");
                (digest, n, h)
            })
        })
        .collect();
    for (id, t) in apps.into_iter().enumerate() {
        let id = id as u32;
        let (digest, n, h) = t.join().unwrap();
        assert_eq!(digest, payload_sha(id, MIB), "stream {id}: request SHA-256");
        assert_eq!(n, MIB, "stream {id}: reply length");
        assert_eq!(
            h,
            payload_sha(id + 10_000, MIB),
            "stream {id}: reply SHA-256"
        );
    }
    let n = STREAMS as usize;
    for row in [ROW1, ROW2, ROW3, ROW4] {
        eventually(&format!("{n} × {row}"), || {
            (d.log_count(row) >= n).then_some(())
        });
        assert_eq!(d.log_count(row), n, "{row}");
    }
    d.wait_for_threads(baseline);
}

// ------------------------------------------------------- real clients

/// R11.1 with a real client: curl --socks5-hostname (a DOMAINNAME; the
/// exit resolves "localhost") fetching from a local HTTP server.
#[test]
fn curl_socks5_hostname() {
    curl_through("--socks5-hostname");
}

/// R11.3 with a real client: curl --socks4a.
#[test]
fn curl_socks4a() {
    curl_through("--socks4a");
}

fn curl_through(flag: &str) {
    curl_fetches_whole(&Daemon::run(&[]), flag, 500_000);
}

/// curl with `flag` through `d`'s SOCKS port fetches a body of `len` bytes
/// from a local HTTP server, whole.
pub(crate) fn curl_fetches_whole(d: &Daemon, flag: &str, len: usize) {
    require("curl", "curl");
    let body = pattern(len, 51);
    let server = http_server(body.clone());
    let (status, out, err) = run_tool(
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "20", flag])
            .arg(d.socks().to_string())
            .arg(format!("http://localhost:{}/file", server.addr.port())),
        Vec::new(),
    );
    assert!(status.success(), "curl {flag}: {status}: {err}");
    assert_same(&out, &body, "body fetched by curl");
}

/// R7.2, R7.5 with a real client: OpenBSD netcat through SOCKS5, -N shuts
/// its write side at the end of stdin; the reply must come back whole
/// after that.
#[test]
fn netcat_half_closed_request_gets_the_whole_reply() {
    netcat_half_close_gets_reply(&Daemon::run(&[]), 50_000, 300_000);
}

/// `nc -N` through `d`'s SOCKS port sends a request of `request_len` bytes
/// and shuts its write side; the target reads it to EOF and answers with
/// `reply_len` bytes, which come back whole.
pub(crate) fn netcat_half_close_gets_reply(d: &Daemon, request_len: usize, reply_len: usize) {
    require("nc", "netcat-openbsd");
    let server = Server::request_reply(move |req| {
        let mut r = format!("got {} bytes\n", req.len()).into_bytes();
        r.extend_from_slice(&pattern(reply_len, 61));
        r
    });
    let (status, out, err) = run_tool(
        Command::new("nc")
            .args(["-N", "-X", "5", "-x"])
            .arg(d.socks().to_string())
            .args(["127.0.0.1", &server.addr.port().to_string()]),
        pattern(request_len, 60),
    );
    assert!(status.success(), "nc: {status}: {err}");
    let mut want = format!("got {request_len} bytes\n").into_bytes();
    want.extend_from_slice(&pattern(reply_len, 61));
    assert_same(&out, &want, "what nc printed");
}

// ------------------------------------------------------------ shutdown

/// Is the SOCKS port refusing service (connection refused, or closed
/// before the method reply)?
pub(crate) fn socks_refused(proxy: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(proxy) else {
        return true;
    };
    patient(&s);
    if s.write_all(&[5, 1, 0]).is_err() {
        return true;
    }
    let mut m = [0u8; 2];
    s.read_exact(&mut m).is_err()
}

/// docs/operations.md, "Signals and shutdown", and R8.5 (the shutdown
/// deadline): after `sig`, new SOCKS connections are refused, a stream
/// that finishes within the grace period completes normally, one still
/// open after it is ended (END(HIBERNATING), and R8.7: the application
/// and the target see a reset), and the process exits with status 0.
fn graceful_shutdown(sig: i32) {
    let finishing_server = Server::request_reply(|req| {
        let mut r = sha(req).to_vec();
        r.extend_from_slice(&pattern(100_000, 71));
        r
    });
    let (idle_tx, idle_rx) = mpsc::channel();
    let idle_server = Server::start(move |mut s| {
        let (_, end) = read_until_end(&mut s);
        idle_tx.send(end.map_err(|e| e.kind())).unwrap();
    });
    let mut d = Daemon::run(&["--grace", "2s"]);
    let mut finishing = open(&d, finishing_server.addr.port());
    let mut idle = open(&d, idle_server.addr.port());

    d.signal(sig);
    d.wait_for_log("shutting down:");
    let request = pattern(20_000, 70);
    finishing.write_all(&request).unwrap();
    finishing.shutdown(Shutdown::Write).unwrap();
    let reply = read_to_eof(&mut finishing, "stream finishing in the grace period");
    assert_eq!(reply[..32], sha(&request));
    assert_same(
        &reply[32..],
        &pattern(100_000, 71),
        "reply after the signal",
    );
    assert!(
        socks_refused(d.socks()),
        "a new SOCKS connection was served after the signal"
    );

    let (_, end) = read_until_end(&mut idle);
    let err = end.expect_err("the idle stream is reset at the deadline, not closed");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(
        recv(&idle_rx, "idle target"),
        Err(io::ErrorKind::ConnectionReset),
        "the idle stream's target sees a reset"
    );
    let status = d.wait_exit(PATIENCE);
    assert!(status.success(), "exit status {status}:\n{}", d.log());
    assert!(d.log().contains("END(HIBERNATING)"), "{}", d.log());
}

/// R8.5, R8.7 (and docs/operations.md, "Signals and shutdown"): Ctrl-C
/// (SIGINT).
#[test]
fn sigint_lets_streams_finish_then_resets_the_rest_and_exits_0() {
    graceful_shutdown(libc::SIGINT);
}

/// R8.5, R8.7 (and docs/operations.md, "Signals and shutdown"): SIGTERM.
#[test]
fn sigterm_lets_streams_finish_then_resets_the_rest_and_exits_0() {
    graceful_shutdown(libc::SIGTERM);
}

/// docs/operations.md, "Signals and shutdown": a second signal exits at
/// once, even with a stream open and a grace period far longer than
/// PATIENCE.
fn second_signal_exits_at_once(first: i32, second: i32) {
    let server = Server::echo();
    let mut d = Daemon::run(&["--grace", "300s"]);
    let mut s = open(&d, server.addr.port());
    echo_round_trip(&mut s, "before the signal");
    d.signal(first);
    d.wait_for_log("shutting down:");
    assert!(
        d.is_running(),
        "exited on the first signal with a stream open"
    );
    d.signal(second);
    d.wait_exit(PATIENCE);
    d.wait_for_log("second signal");
}

/// docs/operations.md, "Signals and shutdown": Ctrl-C twice.
#[test]
fn second_sigint_exits_at_once() {
    second_signal_exits_at_once(libc::SIGINT, libc::SIGINT);
}

/// docs/operations.md, "Signals and shutdown": SIGTERM, then SIGTERM
/// again.
#[test]
fn second_sigterm_exits_at_once() {
    second_signal_exits_at_once(libc::SIGTERM, libc::SIGTERM);
}

/// docs/design.md, "Threads": while a stream is open, `top -H` shows the names
/// of the thread table: pk C.S, dl C.S (both edges), circ L.C, link-rd N,
/// link-wr N, socks-accept, link-accept.
#[test]
fn thread_names_follow_the_design_table() {
    let server = Server::echo();
    let d = Daemon::run(&[]);
    let mut s = open(&d, server.addr.port());
    echo_round_trip(&mut s, "open stream");
    let (client, exit) = edge_names(&d, server.addr);
    let names = d.thread_names();
    let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    let dotted = |s: &str| matches!(s.split_once('.'), Some((a, b)) if numeric(a) && numeric(b));
    for want in [
        format!("pk {client}"),
        format!("dl {client}"),
        format!("pk {exit}"),
        format!("dl {exit}"),
        "socks-accept".to_string(),
        "link-accept".to_string(),
    ] {
        assert!(names.contains(&want), "no thread {want:?}: {names:?}");
    }
    for c in [circuit_of(&client), circuit_of(&exit)] {
        assert!(
            names.iter().any(|n| n
                .strip_prefix("circ ")
                .is_some_and(|lc| dotted(lc) && lc.ends_with(&format!(".{c}")))),
            "no circ L.{c}: {names:?}"
        );
    }
    for prefix in ["link-rd ", "link-wr "] {
        let n = names
            .iter()
            .filter(|n| n.strip_prefix(prefix).is_some_and(numeric))
            .count();
        assert_eq!(n, 2, "one {prefix}N per link end in `run`: {names:?}");
    }
}
