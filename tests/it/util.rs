//! Shared helpers for the integration tests: the real binary on loopback
//! ports, a SOCKS client, target servers, and a raw link peer that speaks
//! docs/protocol.md cell by cell.
#![allow(dead_code)]

use halfpipe_proto::cell::{self, cmd};
use halfpipe_proto::kdf;
use halfpipe_proto::relay::{self, relay_cmd};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------- identities and TLS

/// The data directory every test daemon shares (XDG_DATA_HOME), one per
/// test process: one identity, so that an exit restarted on the same port
/// keeps its fingerprint, and a client can pin it.
pub fn data_home() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| std::env::temp_dir().join(format!("halfpipe-it-{}", std::process::id())))
}

/// The test identity's fingerprint (made on first use).
pub fn test_fingerprint() -> &'static str {
    static FP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FP.get_or_init(|| test_identity().fingerprint.to_string())
}

/// The test identity itself, for the TLS side of a raw link peer.
pub fn test_identity() -> &'static halfpipe::process::identity::Identity {
    static ID: std::sync::OnceLock<halfpipe::process::identity::Identity> =
        std::sync::OnceLock::new();
    ID.get_or_init(|| {
        halfpipe::process::identity::Identity::load_or_create(&data_home().join("halfpipe"))
            .expect("the test identity")
    })
}

/// The link addresses of the TLS exits the tests started.
/// (An exit is listed from its start until its drop; one restarted on the
/// same address replaces the entry.)
static TLS_EXITS: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

pub fn is_tls_exit(addr: SocketAddr) -> bool {
    TLS_EXITS.lock().unwrap().contains(&addr)
}

thread_local! {
    /// Set for a test run over plain links: the exits and `run`s it starts
    /// get `--link plain` (each test runs on a thread of its own).
    static PLAIN_LINKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// From here on, the exits and `run`s this test starts use plain links.
pub fn use_plain_links() {
    PLAIN_LINKS.set(true);
}

/// Runs `test` with the daemons it starts on plain links.
pub fn on_plain_links(test: fn()) {
    use_plain_links();
    test();
}

/// Each named test twice: `tls::NAME` over TLS links (the default) and
/// `plain::NAME` over plain ones (docs/protocol.md §1 and §13).
#[allow(unused_macros)]
macro_rules! over_both_links {
    ($($name:ident),* $(,)?) => {
        mod tls {
            $( #[test] fn $name() { super::$name() } )*
        }
        mod plain {
            $( #[test] fn $name() { crate::util::on_plain_links(super::$name) } )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use over_both_links;

/// What a `halfpipe client` command line without `--link` or
/// `--exit-fingerprint` gets: the test identity's fingerprint pinned if its
/// `--exit` is a TLS exit started here, a plain link otherwise (a raw exit,
/// a plain one, or none).
fn link_args(args: &[&str]) -> Vec<&'static str> {
    let said = args
        .iter()
        .any(|a| *a == "--link" || *a == "--exit-fingerprint" || *a == "--print-fingerprint");
    if said {
        return vec![];
    }
    if args.first() != Some(&"client") {
        let serves = matches!(args.first(), Some(&"exit") | Some(&"run"));
        return if serves && PLAIN_LINKS.get() {
            vec!["--link", "plain"]
        } else {
            vec![]
        };
    }
    use std::net::ToSocketAddrs;
    let tls = args
        .iter()
        .position(|a| *a == "--exit")
        .and_then(|i| args.get(i + 1)?.to_socket_addrs().ok())
        .is_some_and(|mut addrs| addrs.any(is_tls_exit));
    if tls {
        vec!["--exit-fingerprint", test_fingerprint()]
    } else {
        vec!["--link", "plain"]
    }
}

/// A TLS session to the exit at `addr` (docs/protocol.md §13) behind a
/// plain loopback socket: the raw link peer speaks cells on the socket as
/// on a plain link, and two threads carry the bytes through TLS both ways.
/// A TLS failure or a reset from the exit resets the socket.
fn tls_bridge(addr: SocketAddr) -> (TcpStream, Bridge) {
    use halfpipe::link::tls;
    // A receive buffer of a fixed size (no autotuning, which would grow it
    // while the bridge reads ahead of the test): a test that stops reading
    // stalls the exit after as many bytes as on a plain link.
    let tcp = {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        s.set_recv_buffer_size(128 * 1024).unwrap();
        s.connect(&addr.into()).unwrap();
        TcpStream::from(s)
    };
    let fp = test_fingerprint().parse().unwrap();
    let config = tls::client_config(test_identity(), fp);
    let config = halfpipe::link::TlsConfig::Client(config);
    let session = tls::handshake(&tcp, &config, Instant::now() + PATIENCE, PATIENCE)
        .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    tcp.set_read_timeout(None).unwrap();
    tcp.set_write_timeout(None).unwrap();
    let transport = Arc::new(halfpipe::link::Transport::tls(tcp, session));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (theirs, _) = l.accept().unwrap();
    // Small buffers, so that the bridge holds little more than a plain
    // link would: a peer that stops reading stalls the exit as soon.
    for s in [&ours, &theirs] {
        let s = socket2::SockRef::from(s);
        s.set_recv_buffer_size(64 * 1024).unwrap();
        s.set_send_buffer_size(64 * 1024).unwrap();
    }
    let local = theirs.try_clone().unwrap();
    let up = {
        let (t, mut from) = (transport.clone(), theirs.try_clone().unwrap());
        thread::spawn(move || {
            let mut out = t.write_state();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut chunk) {
                    Ok(0) => {
                        let _ = t.close(Shutdown::Write, &mut out);
                        break;
                    }
                    Ok(n) => {
                        if t.write(&[chunk[..n].to_vec()], &mut out).is_err() {
                            // The exit is gone: so is the test's link.
                            let _ = from.shutdown(Shutdown::Both);
                            break;
                        }
                    }
                    Err(_) => {
                        t.shutdown();
                        break;
                    }
                }
            }
        })
    };
    let down = {
        let (t, mut to) = (transport.clone(), theirs);
        thread::spawn(move || {
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut st = t.read_state();
            loop {
                match t.read(&mut buf, &mut st) {
                    Ok(r) if r.end => {
                        let _ = to.shutdown(Shutdown::Write);
                        break;
                    }
                    // Nothing yet, or a key update asked of us: our
                    // exits never ask.
                    Ok(r) if r.n == 0 => {}
                    Ok(_) => {
                        if to.write_all(&buf).is_err() {
                            t.shutdown();
                            break;
                        }
                        buf.clear();
                    }
                    Err(_) => {
                        halfpipe::runtime::sockets::reset(&to);
                        break;
                    }
                }
            }
        })
    };
    (
        ours,
        Bridge {
            transport,
            local,
            threads: vec![up, down],
        },
    )
}

/// The TLS side of a raw link peer: ended and joined with it.
pub struct Bridge {
    transport: Arc<halfpipe::link::Transport>,
    /// The bridge's end of the socket the test holds.
    local: TcpStream,
    threads: Vec<JoinHandle<()>>,
}

// ------------------------------------------------------------- the daemon

/// The halfpipe binary running as a child process.
pub struct Daemon {
    child: Child,
    pub socks: Option<SocketAddr>,
    pub link: Option<SocketAddr>,
    /// The status endpoint, when started with `--status`.
    pub status: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

impl Daemon {
    /// `halfpipe run` on an ephemeral SOCKS port.
    pub fn run(extra: &[&str]) -> Daemon {
        let mut args = vec!["run", "--socks", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Daemon::start(&args, true, false)
    }

    /// `halfpipe exit` on an ephemeral link port (default policy unless
    /// `extra` says otherwise).
    pub fn exit(extra: &[&str]) -> Daemon {
        let mut args = vec!["exit", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Daemon::start(&args, false, true)
    }

    /// `halfpipe client` linked to `exit`.
    pub fn client(exit: SocketAddr, extra: &[&str]) -> Daemon {
        Daemon::client_to(&exit.to_string(), extra)
    }

    /// `halfpipe client` linked to `exit`, given as HOST:PORT. Unless
    /// `extra` says how, the link is TLS with the test identity's
    /// fingerprint pinned if `exit` is a TLS exit started here, plain
    /// otherwise (a raw exit, or a plain one).
    pub fn client_to(exit: &str, extra: &[&str]) -> Daemon {
        let mut args = vec!["client", "--socks", "127.0.0.1:0", "--exit", exit];
        args.extend_from_slice(extra);
        Daemon::start(&args, true, false)
    }

    pub fn start(args: &[&str], want_socks: bool, want_link: bool) -> Daemon {
        Daemon::start_under(&[], args, want_socks, want_link)
    }

    /// `halfpipe ARGS` run by `wrapper` (a command line that ends where
    /// the daemon's program name goes: `unshare -m ...`), or directly if
    /// `wrapper` is empty.
    pub fn start_under(
        wrapper: &[&str],
        args: &[&str],
        want_socks: bool,
        want_link: bool,
    ) -> Daemon {
        let exe = env!("CARGO_BIN_EXE_halfpipe");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        if !args.contains(&"--data-dir") {
            cmd.env("XDG_DATA_HOME", data_home());
        }
        let mut child = cmd
            .args(args)
            .args(link_args(args))
            .env("RUST_LOG", "info,halfpipe=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start halfpipe");
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        pump(child.stderr.take().unwrap(), log.clone());
        pump(child.stdout.take().unwrap(), stdout.clone());
        let mut d = Daemon {
            child,
            socks: None,
            link: None,
            status: None,
            log,
            stdout,
        };
        let want_status = args.contains(&"--status");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let out = d.stdout.lock().unwrap().clone();
            d.socks = find_addr(&out, "SOCKS listening on ");
            d.link = find_addr(&out, "link listening on ");
            d.status = find_addr(&out, "status listening on ");
            if (!want_socks || d.socks.is_some())
                && (!want_link || d.link.is_some())
                && (!want_status || d.status.is_some())
            {
                break;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("halfpipe {args:?} exited early ({status}):\n{}", d.log());
            }
            assert!(Instant::now() < deadline, "halfpipe did not start: {out}");
            thread::sleep(Duration::from_millis(10));
        }
        if let Some(link) = d.link {
            let mut tls = TLS_EXITS.lock().unwrap();
            tls.retain(|a| *a != link);
            if d.stdout().contains("fingerprint: ") {
                tls.push(link);
            }
        }
        if want_socks {
            d.wait_for_log("link to exit ready");
        }
        d
    }

    /// What a client that reaches this exit through a relay says about
    /// the link: the exit's fingerprint, or `--link plain`.
    pub fn link_args(&self) -> [&'static str; 2] {
        if is_tls_exit(self.link()) {
            ["--exit-fingerprint", test_fingerprint()]
        } else {
            ["--link", "plain"]
        }
    }

    pub fn socks(&self) -> SocketAddr {
        self.socks.expect("this daemon serves SOCKS")
    }

    pub fn link(&self) -> SocketAddr {
        self.link.expect("this daemon accepts links")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`; panics with the log if not.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many times the log says `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Thread names of the daemon, from /proc (what `top -H` shows).
    pub fn thread_names(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.pid());
        let mut names = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if let Ok(n) = std::fs::read_to_string(e.path().join("comm")) {
                    names.push(n.trim().to_string());
                }
            }
        }
        names
    }

    /// Threads at work: every thread but the parked ones, which wait for
    /// the next stream's task (docs/design.md, "Thread reuse": at most 256,
    /// each retiring after 10 s idle; `reuse.rs` checks that).
    /// A thread stuck in a task keeps its task's name, so a leak still
    /// shows here.
    pub fn thread_count(&self) -> usize {
        self.working_threads().len()
    }

    pub fn working_threads(&self) -> Vec<String> {
        let mut names = self.thread_names();
        names.retain(|n| n != "parked");
        names
    }

    /// Waits until the count of threads at work is `n` (threads end
    /// asynchronously).
    pub fn wait_for_threads(&self, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let names = self.working_threads();
            if names.len() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} threads, have {}: {names:?}",
                names.len()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "halfpipe did not exit:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its port may serve a raw (plain) exit of a later test.
        if let Some(link) = self.link {
            TLS_EXITS.lock().unwrap().retain(|a| *a != link);
        }
    }
}

fn pump(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

fn find_addr(out: &str, prefix: &str) -> Option<SocketAddr> {
    let rest = &out[out.find(prefix)? + prefix.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------- metrics

/// GET /metrics from a daemon started with `--status`: the body.
pub fn metrics_text(d: &Daemon) -> String {
    let addr = d.status.expect("a daemon started with --status");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of one sample in a metrics text, named as printed
/// (`name{labels}`); 0 when it is absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Asserts one sample of a metrics text (0 when absent), showing the
/// whole text when it differs.
#[track_caller]
pub fn assert_metric(text: &str, sample: &str, want: f64) {
    assert_eq!(metric_value(text, sample), want, "{sample} in:\n{text}");
}

// ------------------------------------------------------------ SOCKS client

/// SOCKS5 CONNECT to `host:port` (a name or an IP literal), with optional
/// username/password. Ok: the stream, ready. Err(code): the SOCKS5 reply.
pub fn socks5(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> Result<TcpStream, u8> {
    let mut s = TcpStream::connect(proxy).expect("connect to SOCKS port");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    match auth {
        None => s.write_all(&[5, 1, 0]).unwrap(),
        Some(_) => s.write_all(&[5, 1, 2]).unwrap(),
    }
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    if let Some((u, p)) = auth {
        assert_eq!(m, [5, 2]);
        let mut a = vec![1, u.len() as u8];
        a.extend_from_slice(u.as_bytes());
        a.push(p.len() as u8);
        a.extend_from_slice(p.as_bytes());
        s.write_all(&a).unwrap();
        let mut r = [0u8; 2];
        s.read_exact(&mut r).unwrap();
        assert_eq!(r, [1, 0]);
    } else {
        assert_eq!(m, [5, 0]);
    }
    s.write_all(&socks5_request(1, host, port)).unwrap();
    let code = read_socks5_reply(&mut s);
    s.set_read_timeout(None).unwrap();
    if code == 0 {
        Ok(s)
    } else {
        Err(code)
    }
}

/// A SOCKS5 request: command, then the address as IPv4, IPv6 or a name.
pub fn socks5_request(command: u8, host: &str, port: u16) -> Vec<u8> {
    let mut r = vec![5, command, 0];
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        r.push(1);
        r.extend_from_slice(&ip.octets());
    } else if let Ok(ip) = host.parse::<std::net::Ipv6Addr>() {
        r.push(4);
        r.extend_from_slice(&ip.octets());
    } else {
        r.push(3);
        r.push(host.len() as u8);
        r.extend_from_slice(host.as_bytes());
    }
    r.extend_from_slice(&port.to_be_bytes());
    r
}

/// Reads a SOCKS5 reply and returns its REP code. A connection closed
/// before a reply reads as 0xFF.
pub fn read_socks5_reply(s: &mut TcpStream) -> u8 {
    let mut head = [0u8; 4];
    if s.read_exact(&mut head).is_err() {
        return 0xFF;
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).unwrap();
            l[0] as usize + 2
        }
        _ => 0,
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip).unwrap();
    head[1]
}

// ---------------------------------------------------------- target servers

/// A target server on an ephemeral loopback port: each connection is handed
/// to `handler` in its own thread.
pub struct Server {
    pub addr: SocketAddr,
    _accept: JoinHandle<()>,
}

impl Server {
    pub fn start<F>(handler: F) -> Server
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(handler);
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let h = handler.clone();
                thread::spawn(move || h(conn));
            }
        });
        Server {
            addr,
            _accept: accept,
        }
    }

    /// Echoes everything, then half-closes when the client does.
    pub fn echo() -> Server {
        Server::start(|mut s| {
            let mut r = s.try_clone().unwrap();
            let _ = io::copy(&mut r, &mut s);
            let _ = s.shutdown(Shutdown::Write);
        })
    }

    /// Reads the request to EOF, then writes `reply(request)` and closes:
    /// the half-closed request/response pattern.
    pub fn request_reply<F>(reply: F) -> Server
    where
        F: Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
    {
        Server::start(move |mut s| {
            let mut req = Vec::new();
            if s.read_to_end(&mut req).is_ok() {
                let _ = s.write_all(&reply(&req));
            }
        })
    }
}

/// A port nothing listens on (bound, read and released: the kernel does
/// not hand an ephemeral port out again at once).
pub fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A SOCKS5 connection to `proxy` past the greeting (no authentication).
pub fn socks5_greeted(proxy: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).expect("connect to SOCKS port");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    s
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed)
        .collect()
}

// ---------------------------------------------------------- raw link peer

/// A hand-driven peer that speaks docs/protocol.md on one link, cell by cell.
pub struct RawLink {
    pub sock: TcpStream,
    buf: Vec<u8>,
    /// To a TLS exit: the TLS session behind `sock`.
    bridge: Option<Bridge>,
}

impl Drop for RawLink {
    fn drop(&mut self) {
        if let Some(b) = self.bridge.take() {
            let _ = self.sock.shutdown(Shutdown::Both);
            // Both ends: a bridge blocked writing to a test that stopped
            // reading wakes with an error.
            let _ = b.local.shutdown(Shutdown::Both);
            b.transport.shutdown();
            b.threads.into_iter().for_each(|t| t.join().unwrap());
        }
    }
}

impl RawLink {
    /// On a TLS link: ends the TCP connection towards the exit without a
    /// close_notify first (R13.10).
    pub fn fin_without_close_notify(&self) {
        let b = self.bridge.as_ref().expect("a TLS link");
        b.transport.tcp.shutdown(Shutdown::Write).unwrap();
    }
}

/// A cell as the raw peer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCell {
    pub circ: u32,
    pub command: u8,
    pub payload: Vec<u8>,
}

impl RawCell {
    /// The relay view of a RELAY cell: (command, stream, body).
    pub fn relay(&self) -> (u8, u16, Vec<u8>) {
        assert_eq!(self.command, cmd::RELAY, "not a relay cell: {self:?}");
        let rc = relay::decode(&self.payload).expect("valid relay cell");
        (rc.command, rc.stream_id, rc.body.to_vec())
    }
}

impl RawLink {
    /// Connects and completes the VERSIONS handshake (docs/protocol.md §1).
    pub fn connect(addr: SocketAddr) -> RawLink {
        let mut l = RawLink::connect_raw(addr);
        let mut v = Vec::new();
        cell::encode_versions(&mut v, &[4]);
        l.sock.write_all(&v).unwrap();
        let mut reply = [0u8; 7];
        l.sock.read_exact(&mut reply).unwrap();
        assert_eq!(reply, [0, 0, 7, 0, 2, 0, 4], "exit's VERSIONS");
        l
    }

    /// Plays the exit: accepts one link on `listener` and answers the
    /// client's VERSIONS (docs/protocol.md §1).
    pub fn accept(listener: &TcpListener) -> RawLink {
        let (sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut l = RawLink {
            sock,
            buf: Vec::new(),
            bridge: None,
        };
        let mut hello = [0u8; 7];
        l.sock.read_exact(&mut hello).unwrap();
        assert_eq!(hello, [0, 0, 7, 0, 2, 0, 4], "client's VERSIONS");
        l.sock.write_all(&hello).unwrap();
        l
    }

    /// Plays the exit's side of CREATE_FAST: waits for it and answers
    /// CREATED_FAST with a correct KH. Returns the CircID.
    pub fn answer_create_fast(&mut self) -> u32 {
        let c = self.recv_cell().expect("CREATE_FAST");
        assert_eq!(c.command, cmd::CREATE_FAST, "{c:?}");
        let x: [u8; 20] = c.payload[..20].try_into().unwrap();
        self.send_cell(
            c.circ,
            cmd::CREATED_FAST,
            &kdf::created_fast_payload(&x, &[0x5a; 20]),
        );
        c.circ
    }

    /// Connects without the VERSIONS handshake (through TLS to a TLS exit).
    pub fn connect_raw(addr: SocketAddr) -> RawLink {
        let (sock, bridge) = if is_tls_exit(addr) {
            let (s, b) = tls_bridge(addr);
            (s, Some(b))
        } else {
            (TcpStream::connect(addr).unwrap(), None)
        };
        sock.set_read_timeout(Some(PATIENCE)).unwrap();
        RawLink {
            sock,
            buf: Vec::new(),
            bridge,
        }
    }

    pub fn send_cell(&mut self, circ: u32, command: u8, payload: &[u8]) {
        let mut out = Vec::new();
        cell::encode_fixed(&mut out, circ, command, payload);
        self.sock.write_all(&out).unwrap();
    }

    pub fn send_relay(&mut self, circ: u32, command: u8, stream: u16, body: &[u8]) {
        let mut out = Vec::new();
        relay::encode(&mut out, circ, command, stream, body);
        self.sock.write_all(&out).unwrap();
    }

    /// CREATE_FAST on `circ`, checking KH in CREATED_FAST (docs/protocol.md §3).
    pub fn create_circuit(&mut self, circ: u32) {
        let x = halfpipe::link::nonce();
        self.send_cell(circ, cmd::CREATE_FAST, &x);
        let c = self.recv_cell().expect("CREATED_FAST");
        assert_eq!((c.circ, c.command), (circ, cmd::CREATED_FAST), "{c:?}");
        assert!(kdf::check_created_fast(&x, &c.payload), "KH checks");
    }

    /// CREATE_FAST on `circ` offering flow control version 2
    /// (docs/protocol.md §14, R14.1); returns whether the exit accepted it.
    pub fn create_circuit_v2(&mut self, circ: u32) -> bool {
        let x = halfpipe::link::nonce();
        let mut payload = x.to_vec();
        halfpipe_proto::congestion::append_mark(&mut payload);
        self.send_cell(circ, cmd::CREATE_FAST, &payload);
        let c = self.recv_cell().expect("CREATED_FAST");
        assert_eq!((c.circ, c.command), (circ, cmd::CREATED_FAST), "{c:?}");
        assert!(kdf::check_created_fast(&x, &c.payload), "KH checks");
        halfpipe_proto::congestion::has_mark(&c.payload, halfpipe_proto::congestion::ACCEPT_AT)
    }

    /// A whole cell already in the buffer, if there is one.
    fn take_cell(&mut self) -> Option<RawCell> {
        let (c, used) = cell::decode(&self.buf)?;
        let rc = RawCell {
            circ: c.circ_id,
            command: c.command,
            payload: c.payload.to_vec(),
        };
        self.buf.drain(..used);
        Some(rc)
    }

    /// The next cell, or None if the exit closed the link.
    pub fn recv_cell(&mut self) -> Option<RawCell> {
        loop {
            if let Some(rc) = self.take_cell() {
                return Some(rc);
            }
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("raw link read: {e}"),
            }
        }
    }

    /// The next cell if one arrives within `wait`, else None (for checks
    /// that something does *not* happen). Panics if the exit closes the link.
    pub fn recv_cell_within(&mut self, wait: Duration) -> Option<RawCell> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(rc) = self.take_cell() {
                return Some(rc);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            let read = self.sock.read(&mut chunk);
            self.sock.set_read_timeout(Some(PATIENCE)).unwrap();
            match read {
                Ok(0) => panic!("the exit closed the link"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("raw link read: {e}"),
            }
        }
    }

    /// The next cell that is not a SENDME or PADDING.
    pub fn recv_non_sendme(&mut self) -> Option<RawCell> {
        loop {
            let c = self.recv_cell()?;
            if c.command == cmd::PADDING {
                continue;
            }
            if c.command == cmd::RELAY && c.relay().0 == relay_cmd::SENDME {
                continue;
            }
            return Some(c);
        }
    }

    /// Is the link closed by the exit within `wait`?
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut chunk = [0u8; 4096];
        let deadline = Instant::now() + wait;
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }
}

/// BEGIN payload for `target` (docs/protocol.md §5).
pub fn begin_body(target: &str) -> Vec<u8> {
    let mut b = target.as_bytes().to_vec();
    b.push(0);
    b
}

/// A CircID with the top bit set that no other test uses.
pub fn fresh_circ() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0x8000_1000);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A RELAY cell's command, stream and body, if it is one that decodes.
pub fn relay_of(c: &RawCell) -> Option<(u8, u16, Vec<u8>)> {
    if c.command != cmd::RELAY {
        return None;
    }
    relay::decode(&c.payload)
        .ok()
        .map(|rc| (rc.command, rc.stream_id, rc.body.to_vec()))
}

/// Polls `f` until it returns Some, for at most PATIENCE.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}
