//! `halfpipe-bench soak`: many half-closed request/response
//! streams at once for a long time, every byte checked at both ends, and
//! the daemons' threads, descriptors and memory compared before and after.
//!
//! Read first: docs/protocol.md §7 (half-close: what each order below
//! exercises), §8 (abortive close: how a failed stream looks to the
//! application), docs/design.md, invariants 6 (threads return to their
//! count) and 7 (memory per stream is bounded by the windows).
//!
//! `--streams N` worker threads each run one stream at a time and start the
//! next as soon as one ends, so N streams are in flight for the whole run.
//! Every stream goes through the SOCKS5 proxy to a target server that this
//! process runs on loopback. A stream's plan (its sizes, its half-close
//! order, its content) follows from the run's `--seed` and the stream's
//! number alone, so a run can be replayed.
//!
//! | order | application | target |
//! |---|---|---|
//! | request-first | sends the request, shutdown(SHUT_WR), reads the reply to EOF | reads the request to EOF, sends the reply, closes |
//! | reply-first | sends part of the request, waits for the reply's EOF, sends the rest, shutdown(SHUT_WR) | sends the reply, shutdown(SHUT_WR), reads the request to EOF, closes |
//! | interleaved | sends and reads at once (two threads), shutdown(SHUT_WR) once sent | the same |
//!
//! Request and reply sizes are log-uniform between 1 byte and `--max-size`,
//! so tiny and large streams both appear. Each sender hashes (SHA-256) what
//! the kernel accepted from it; each receiver hashes what it read and also
//! compares every byte with the content it expects, which counts *how many*
//! bytes were lost or corrupted, not only that some were. The target hands
//! its side to the driver through the [`Registry`] (it runs in this
//! process).
//!
//! Around the run the daemons given with `--pids` are sampled from /proc:
//! once idle after a warm-up (the baseline), every second during the run
//! (the peak) and once the streams are over and the counts have settled
//! (the end). Threads and descriptors must come back to the baseline
//! exactly. RSS need not: the allocator keeps memory it has freed (glibc
//! keeps per-thread arenas), so the end may stay above the start; it is
//! reported, and judged only against the stated `--rss-slack`.

use super::procfs;
use super::report::{Machine, Table};
use super::socks;
use clap::Args;
use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

pub const SCHEMA: &str = "halfpipe-soak/1";

/// The first bytes the application sends: magic and the stream's number,
/// which the target looks up in the [`Registry`].
const MAGIC: [u8; 4] = *b"HPSK";
const HEADER_LEN: usize = 12;
/// Read and write unit of both ends.
const BUF: usize = 16 * 1024;
/// Stack of every thread that carries a stream. The threads only move
/// bytes through heap buffers, so a small stack is enough; debug builds
/// (the test suite runs one) have much larger frames.
const STACK: usize = if cfg!(debug_assertions) {
    256 * 1024
} else {
    64 * 1024
};
/// Streams of the warm-up before the baseline, and their largest size.
const WARM_STREAMS: u64 = 16;
const WARM_MAX: u64 = 64 * 1024;
/// Numbers of warm-up and readiness streams: apart from the run's.
const WARM_INDEX: u64 = 1 << 63;
/// How many failed streams the report describes one by one.
const EXAMPLES: usize = 10;

/// `halfpipe-bench soak`. A flag given twice takes its last value (so a
/// script's defaults can be overridden by arguments after them).
#[derive(Args, Debug, Clone)]
#[command(args_override_self = true)]
pub struct SoakArgs {
    /// The SOCKS5 proxy to soak (a halfpipe client).
    #[arg(long, value_name = "ADDR")]
    pub socks: SocketAddr,
    /// Streams in flight at once.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=5000))]
    pub streams: u64,
    /// How long to keep starting streams (then the ones in flight finish).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Largest request or reply (bytes; KiB, MiB suffixes).
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_size)]
    pub max_size: u64,
    /// Seed of the stream plans (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Daemon processes to sample (threads, descriptors, RSS), comma-separated.
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Where the target server listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub target_listen: SocketAddr,
    /// A stream that moves no byte for this long fails.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// After the run: how long threads and descriptors may take to return.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// How far (MiB) each daemon's RSS may end above its start.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    pub rss_slack: u64,
    /// Start the streams spread over this long (a burst of connections
    /// would hit the client's limit of SOCKS handshakes in progress);
    /// default: a tenth of --duration, at most 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ramp: Option<Duration>,
    /// A progress line on stderr this often (0s: none).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub progress: Duration,
    /// How long to wait for the proxy to carry a first stream.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Print one JSON document on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,
}

/// "4MiB", "256KiB", "64k", "1000": a size in bytes, at least 1.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 4MiB, 256KiB or 1000"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        u => return Err(format!("unknown size unit {u:?} (use B, KiB, MiB or GiB)")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err("the size must be at least 1 byte".into()),
        Some(v) => Ok(v),
        None => Err(format!("{s} is too large")),
    }
}

// -------------------------------------------------------------- the plans

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64: small, fast, and good enough to pick sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    /// Log-uniform in 1..=max: every power of two is as likely as any other.
    fn log_uniform(&mut self, max: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((u * (max as f64 + 1.0).ln()).exp() as u64).clamp(1, max)
    }
}

/// Who half-closes first (docs/protocol.md §7). See the module's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    RequestFirst,
    ReplyFirst,
    Interleaved,
}

impl Order {
    fn name(self) -> &'static str {
        match self {
            Order::RequestFirst => "request-first",
            Order::ReplyFirst => "reply-first",
            Order::Interleaved => "interleaved",
        }
    }
}

/// One stream: everything both ends need to know.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Plan {
    /// The stream's number in the run; with the seed it gives the plan.
    pub index: u64,
    pub order: Order,
    /// Request bytes (application → target), after the header.
    pub request: u64,
    /// Reply bytes (target → application).
    pub reply: u64,
    /// reply-first: request bytes sent before waiting for the reply's EOF.
    pub early: u64,
    #[serde(skip)]
    request_content: Content,
    #[serde(skip)]
    reply_content: Content,
}

impl Plan {
    pub fn new(seed: u64, index: u64, max: u64) -> Plan {
        let mut r = Rng(mix(seed ^ mix(index.wrapping_add(GAMMA))));
        let order = match r.below(3) {
            0 => Order::RequestFirst,
            1 => Order::ReplyFirst,
            _ => Order::Interleaved,
        };
        let request = r.log_uniform(max);
        let reply = r.log_uniform(max);
        let early = r.below(request + 1);
        Plan {
            index,
            order,
            request,
            reply,
            early,
            request_content: Content(r.next()),
            reply_content: Content(r.next()),
        }
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..].copy_from_slice(&self.index.to_be_bytes());
        h
    }
}

/// A stream direction's bytes: word `i` is splitmix64 of `seed + i·γ`, so
/// any offset can be produced without the bytes before it.
#[derive(Clone, Copy, Debug)]
struct Content(u64);

impl Content {
    fn word(&self, i: u64) -> [u8; 8] {
        mix(self.0.wrapping_add(i.wrapping_mul(GAMMA))).to_le_bytes()
    }

    /// The bytes at `offset..offset + buf.len()`.
    fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut word = offset / 8;
        let skip = (offset % 8) as usize;
        let mut out = buf;
        if skip != 0 {
            let n = (8 - skip).min(out.len());
            out[..n].copy_from_slice(&self.word(word)[skip..skip + n]);
            out = &mut out[n..];
            word += 1;
        }
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.word(word));
            word += 1;
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let n = rest.len();
            rest.copy_from_slice(&self.word(word)[..n]);
        }
    }
}

// ------------------------------------------------------ the two directions

/// What a sender accounts for: the bytes the kernel accepted, and their
/// SHA-256.
#[derive(Clone, Copy, Debug, Default)]
struct Tx {
    sent: u64,
    digest: [u8; 32],
}

/// What a receiver accounts for.
#[derive(Clone, Copy, Debug, Default)]
struct Rx {
    received: u64,
    digest: [u8; 32],
    /// Received bytes (within the expected length) unequal to the expected.
    mismatched: u64,
    first_mismatch: Option<u64>,
}

struct Sending {
    content: Content,
    sent: u64,
    sha: sha256::Sha256,
    buf: Vec<u8>,
}

impl Sending {
    fn new(content: Content) -> Sending {
        Sending {
            content,
            sent: 0,
            sha: sha256::Sha256::new(),
            buf: vec![0; BUF],
        }
    }

    /// Sends until `upto` bytes have gone out in all. Counts and hashes
    /// only what write(2) accepted, so a failed stream's account is exact.
    fn send_upto(&mut self, s: &mut TcpStream, upto: u64) -> io::Result<()> {
        while self.sent < upto {
            let n = (upto - self.sent).min(BUF as u64) as usize;
            self.content.fill(self.sent, &mut self.buf[..n]);
            let mut off = 0;
            while off < n {
                match s.write(&self.buf[off..n]) {
                    Ok(0) => return Err(ErrorKind::WriteZero.into()),
                    Ok(k) => {
                        self.sha.update(&self.buf[off..off + k]);
                        off += k;
                        self.sent += k as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn account(&self) -> Tx {
        Tx {
            sent: self.sent,
            digest: self.sha.clone().finish(),
        }
    }
}

struct Receiving {
    content: Content,
    expected: u64,
    received: u64,
    sha: sha256::Sha256,
    mismatched: u64,
    first_mismatch: Option<u64>,
    buf: Vec<u8>,
    want: Vec<u8>,
}

impl Receiving {
    fn new(content: Content, expected: u64) -> Receiving {
        Receiving {
            content,
            expected,
            received: 0,
            sha: sha256::Sha256::new(),
            mismatched: 0,
            first_mismatch: None,
            buf: vec![0; BUF],
            want: vec![0; BUF],
        }
    }

    /// Reads to EOF, hashing and checking every byte.
    fn read_to_eof(&mut self, s: &mut TcpStream) -> io::Result<()> {
        loop {
            match s.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.take(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn take(&mut self, n: usize) {
        let got = &self.buf[..n];
        self.sha.update(got);
        let within = (self.expected.saturating_sub(self.received)).min(n as u64) as usize;
        if within > 0 {
            let want = &mut self.want[..within];
            self.content.fill(self.received, want);
            if got[..within] != *want {
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    if a != b {
                        self.mismatched += 1;
                        self.first_mismatch.get_or_insert(self.received + i as u64);
                    }
                }
            }
        }
        self.received += n as u64;
    }

    fn account(&self) -> Rx {
        Rx {
            received: self.received,
            digest: self.sha.clone().finish(),
            mismatched: self.mismatched,
            first_mismatch: self.first_mismatch,
        }
    }
}

/// Why a stream failed: which end, doing what, and the error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub side: &'static str,
    pub phase: &'static str,
    pub error: String,
}

impl Failure {
    fn io(side: &'static str, phase: &'static str, e: &io::Error, stall: Duration) -> Failure {
        let error = match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                format!("no progress for {}", humantime::format_duration(stall))
            }
            _ => e.to_string(),
        };
        Failure { side, phase, error }
    }

    /// The key failures are counted under: stable across streams (no
    /// offsets or sizes in it).
    fn key(&self) -> String {
        format!("{} {}: {}", self.side, self.phase, self.error)
    }
}

// ------------------------------------------------------------ the registry

/// What the target end reports about one stream.
#[derive(Clone, Debug, Default)]
struct TargetReport {
    request: Rx,
    reply: Tx,
    failure: Option<Failure>,
}

/// Plans of the streams in flight, for the target to look up by number,
/// and the channel each target answers on. The bench runs the targets, so
/// both ends of every stream meet here.
#[derive(Default)]
pub struct Registry {
    expected: Mutex<HashMap<u64, (Plan, Sender<TargetReport>)>>,
    /// Connections the target could not match to a stream, by reason.
    orphans: Mutex<BTreeMap<String, u64>>,
}

impl Registry {
    fn expect(&self, plan: &Plan) -> Receiver<TargetReport> {
        let (tx, rx) = bounded(1);
        self.expected.lock().insert(plan.index, (*plan, tx));
        rx
    }

    /// The target's claim: each stream number is served once.
    fn claim(&self, index: u64) -> Option<(Plan, Sender<TargetReport>)> {
        self.expected.lock().remove(&index)
    }

    /// The application's clean-up, for a stream the target never saw.
    fn forget(&self, index: u64) {
        self.expected.lock().remove(&index);
    }

    fn orphan(&self, why: String) {
        *self.orphans.lock().entry(why).or_default() += 1;
    }
}

// ---------------------------------------------------------- the target end

/// The target server: one thread per connection, like the daemons.
struct TargetServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<Vec<String>>>,
}

impl TargetServer {
    fn start(listen: SocketAddr, registry: Arc<Registry>, stall: Duration) -> io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let accept = thread::Builder::new()
            .name("soak-accept".into())
            .spawn(move || accept_loop(listener, registry, stall, flag))?;
        Ok(TargetServer {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// Stops accepting and joins every connection thread (each ends with
    /// its stream, or after the stall timeout). Returns what went wrong
    /// with the threads themselves.
    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor blocked in accept(2).
        if let Err(e) = TcpStream::connect(self.addr) {
            eprintln!("soak: cannot wake the target's accept thread ({e}); waiting for it");
        }
        match self.accept.take().map(JoinHandle::join) {
            Some(Ok(problems)) => problems,
            Some(Err(_)) => vec!["the target's accept thread panicked".into()],
            None => Vec::new(),
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    registry: Arc<Registry>,
    stall: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut live: Vec<JoinHandle<()>> = Vec::new();
    let mut problems = Vec::new();
    let reap = |live: &mut Vec<JoinHandle<()>>, problems: &mut Vec<String>, all: bool| {
        let mut keep = Vec::with_capacity(live.len());
        for h in live.drain(..) {
            if all || h.is_finished() {
                if h.join().is_err() {
                    problems.push("a target thread panicked".into());
                }
            } else {
                keep.push(h);
            }
        }
        *live = keep;
    };
    let mut accepted = 0u64;
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: the application side will see its
                // stream fail; do not spin.
                registry.orphan(format!("target accept: {e}"));
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        accepted += 1;
        let reg = registry.clone();
        let spawned = thread::Builder::new()
            .name(format!("target {accepted}"))
            .stack_size(STACK)
            .spawn(move || serve(conn, &reg, stall));
        match spawned {
            Ok(h) => live.push(h),
            Err(e) => registry.orphan(format!("target: cannot start a thread: {e}")),
        }
        if live.len() >= 64 && accepted % 64 == 0 {
            reap(&mut live, &mut problems, false);
        }
    }
    reap(&mut live, &mut problems, true);
    problems
}

/// One target connection: read the header, claim the plan, play the
/// target's part of its order, report.
fn serve(mut s: TcpStream, registry: &Registry, stall: Duration) {
    // Every read and write below relies on the stall timeout.
    if let Err(e) = s
        .set_read_timeout(Some(stall))
        .and_then(|()| s.set_write_timeout(Some(stall)))
    {
        registry.orphan(format!("target set timeouts: {e}"));
        return;
    }
    let mut h = [0u8; HEADER_LEN];
    if let Err(e) = s.read_exact(&mut h) {
        // The bench's own wake-up connection at the end says nothing.
        if e.kind() != ErrorKind::UnexpectedEof {
            registry.orphan(format!("target read header: {e}"));
        }
        return;
    }
    if h[..4] != MAGIC {
        registry.orphan("target: bad header magic".into());
        return;
    }
    let index = u64::from_be_bytes(h[4..].try_into().expect("8 bytes"));
    let Some((plan, answer)) = registry.claim(index) else {
        registry.orphan("target: header names no stream in flight".into());
        return;
    };
    let mut tx = Sending::new(plan.reply_content);
    let mut rx = Receiving::new(plan.request_content, plan.request);
    let failure = target_side(&mut s, &plan, &mut tx, &mut rx, stall).err();
    drop(s);
    // The application may have given up waiting: nothing to do then.
    let _ = answer.send(TargetReport {
        request: rx.account(),
        reply: tx.account(),
        failure,
    });
}

fn target_side(
    s: &mut TcpStream,
    plan: &Plan,
    tx: &mut Sending,
    rx: &mut Receiving,
    stall: Duration,
) -> Result<(), Failure> {
    let f = |phase| move |e: io::Error| Failure::io("target", phase, &e, stall);
    match plan.order {
        Order::RequestFirst => {
            rx.read_to_eof(s).map_err(f("read request"))?;
            tx.send_upto(s, plan.reply).map_err(f("send reply"))?;
            // Then close (the caller drops the socket).
            Ok(())
        }
        Order::ReplyFirst => {
            tx.send_upto(s, plan.reply).map_err(f("send reply"))?;
            s.shutdown(Shutdown::Write)
                .map_err(f("shutdown(SHUT_WR)"))?;
            rx.read_to_eof(s).map_err(f("read request"))
        }
        Order::Interleaved => both_ways(
            s,
            "target",
            tx,
            plan.reply,
            rx,
            "send reply",
            "read request",
            stall,
        ),
    }
}

/// Sends `total` bytes and reads to EOF at the same time (a second thread
/// reads), half-closing once sent. When one half fails it shuts the socket
/// down so the other does not wait out the stall timeout; the other half's
/// resulting error is then a consequence, not reported.
#[allow(clippy::too_many_arguments)]
fn both_ways(
    s: &mut TcpStream,
    side: &'static str,
    tx: &mut Sending,
    total: u64,
    rx: &mut Receiving,
    send_phase: &'static str,
    read_phase: &'static str,
    stall: Duration,
) -> Result<(), Failure> {
    let mut rd = s
        .try_clone()
        .map_err(|e| Failure::io(side, "dup the socket", &e, stall))?;
    let aborted = AtomicBool::new(false);
    thread::scope(|scope| {
        let aborted = &aborted;
        let reader = thread::Builder::new()
            .name(format!("{side}-rd"))
            .stack_size(STACK)
            .spawn_scoped(scope, move || {
                rx.read_to_eof(&mut rd)
                    .map_err(|e| first_failure(aborted, &rd, side, read_phase, &e, stall))
            })
            .map_err(|e| Failure::io(side, "start a thread", &e, stall))?;
        let sent = tx
            .send_upto(s, total)
            .and_then(|()| s.shutdown(Shutdown::Write));
        let send_failure = sent
            .err()
            .and_then(|e| first_failure(aborted, s, side, send_phase, &e, stall));
        let read_failure = reader_failure(reader.join(), side, read_phase);
        match (send_failure, read_failure) {
            (Some(f), _) | (None, Some(f)) => Err(f),
            (None, None) if aborted.load(Ordering::SeqCst) => Err(Failure {
                side,
                phase: send_phase,
                error: "aborted".into(),
            }),
            (None, None) => Ok(()),
        }
    })
}

/// A half (sending or reading) of a stream failed with `e`. Only the half
/// that fails first reports: it shuts the socket down so that the other
/// half does not wait out the stall timeout, and that half's resulting
/// error is a consequence (None).
fn first_failure(
    aborted: &AtomicBool,
    s: &TcpStream,
    side: &'static str,
    phase: &'static str,
    e: &io::Error,
    stall: Duration,
) -> Option<Failure> {
    if aborted.swap(true, Ordering::SeqCst) {
        return None;
    }
    let _ = s.shutdown(Shutdown::Both);
    Some(Failure::io(side, phase, e, stall))
}

/// What the reading thread came to once joined.
fn reader_failure(
    joined: thread::Result<Result<(), Option<Failure>>>,
    side: &'static str,
    phase: &'static str,
) -> Option<Failure> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(f)) => f,
        Err(_) => Some(Failure {
            side,
            phase,
            error: "the reading thread panicked".into(),
        }),
    }
}

// ----------------------------------------------------- the application end

/// What one stream came to, from both ends.
struct Outcome {
    request: Tx,
    reply: Rx,
    app_failure: Option<Failure>,
    /// None: the target never answered (or never got the stream).
    target: Option<TargetReport>,
    seconds: f64,
}

/// Everything the workers share.
struct Cx {
    proxy: SocketAddr,
    target: SocketAddr,
    registry: Arc<Registry>,
    stall: Duration,
}

fn run_stream(cx: &Cx, plan: &Plan) -> Outcome {
    let t0 = Instant::now();
    let verdict = cx.registry.expect(plan);
    let mut tx = Sending::new(plan.request_content);
    let mut rx = Receiving::new(plan.reply_content, plan.reply);
    let mut reached = false;
    let app_failure = app_side(cx, plan, &mut tx, &mut rx, &mut reached).err();
    // The target reports once it is done with its socket; a stream that
    // never got through has no target to wait for.
    let target = if reached {
        wait_for_target(cx, plan, &verdict)
    } else {
        None
    };
    cx.registry.forget(plan.index);
    Outcome {
        request: tx.account(),
        reply: rx.account(),
        app_failure,
        target,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

/// The target's report. A target that has claimed the stream always
/// reports, or drops the channel: every one of its reads and writes has the
/// stall timeout, however long the whole stream takes. A stream the target
/// has not claimed within a stall timeout never reached it.
fn wait_for_target(cx: &Cx, plan: &Plan, verdict: &Receiver<TargetReport>) -> Option<TargetReport> {
    loop {
        match verdict.recv_timeout(cx.stall) {
            Ok(r) => return Some(r),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if cx.registry.expected.lock().contains_key(&plan.index) {
                    return None;
                }
            }
        }
    }
}

fn app_side(
    cx: &Cx,
    plan: &Plan,
    tx: &mut Sending,
    rx: &mut Receiving,
    reached: &mut bool,
) -> Result<(), Failure> {
    let stall = cx.stall;
    let f = |phase| move |e: io::Error| Failure::io("application", phase, &e, stall);
    let mut s = socks::connect(cx.proxy, cx.target, stall).map_err(f("SOCKS connect"))?;
    s.set_read_timeout(Some(stall)).map_err(f("set timeouts"))?;
    s.set_write_timeout(Some(stall))
        .map_err(f("set timeouts"))?;
    s.write_all(&plan.header()).map_err(f("send header"))?;
    *reached = true;
    match plan.order {
        Order::RequestFirst => {
            tx.send_upto(&mut s, plan.request)
                .map_err(f("send request"))?;
            s.shutdown(Shutdown::Write)
                .map_err(f("shutdown(SHUT_WR)"))?;
            rx.read_to_eof(&mut s).map_err(f("read reply"))
        }
        Order::ReplyFirst => reply_first(&mut s, plan, tx, rx, stall),
        Order::Interleaved => both_ways(
            &mut s,
            "application",
            tx,
            plan.request,
            rx,
            "send request",
            "read reply",
            stall,
        ),
    }
    // Dropping the socket closes it: both directions are done.
}

/// The application's side of reply-first: part of the request, then wait
/// until the target's FIN has arrived (the client edge is then in
/// DONE_DELIVERING, docs/protocol.md §7), then the rest of the request and our
/// own FIN.
fn reply_first(
    s: &mut TcpStream,
    plan: &Plan,
    tx: &mut Sending,
    rx: &mut Receiving,
    stall: Duration,
) -> Result<(), Failure> {
    let side = "application";
    let mut rd = s
        .try_clone()
        .map_err(|e| Failure::io(side, "dup the socket", &e, stall))?;
    let (eof_tx, eof_rx) = bounded::<()>(1);
    let aborted = AtomicBool::new(false);
    thread::scope(|scope| {
        let aborted = &aborted;
        let reader = thread::Builder::new()
            .name("application-rd".into())
            .stack_size(STACK)
            .spawn_scoped(scope, move || {
                rx.read_to_eof(&mut rd)
                    .map(|()| {
                        let _ = eof_tx.send(());
                    })
                    .map_err(|e| first_failure(aborted, &rd, side, "read reply", &e, stall))
            })
            .map_err(|e| Failure::io(side, "start a thread", &e, stall))?;
        let mut write = || -> Result<(), (&'static str, io::Error)> {
            tx.send_upto(s, plan.early)
                .map_err(|e| ("send request", e))?;
            // No timeout of its own: the reader's reads have the stall
            // timeout, and a reader that fails drops `eof_tx`. A long reply
            // may take minutes when many streams share a circuit.
            if eof_rx.recv().is_err() {
                // The reader failed: its error is the one reported.
                return Err(("wait for the reply's EOF", ErrorKind::Other.into()));
            }
            tx.send_upto(s, plan.request)
                .map_err(|e| ("send request", e))?;
            s.shutdown(Shutdown::Write)
                .map_err(|e| ("shutdown(SHUT_WR)", e))
        };
        let send_failure = write()
            .err()
            .and_then(|(phase, e)| first_failure(aborted, s, side, phase, &e, stall));
        let read_failure = reader_failure(reader.join(), side, "read reply");
        match (send_failure, read_failure) {
            (Some(f), _) | (None, Some(f)) => Err(f),
            (None, None) => Ok(()),
        }
    })
}

// ---------------------------------------------------------------- verdicts

/// One direction of one stream, judged.
struct Judged {
    verified: bool,
    lost: u64,
    corrupted: u64,
    problems: Vec<String>,
}

/// Compares a direction's two accounts. Lost: bytes the sender's kernel
/// accepted that never reached the receiver (all of them when the receiver
/// never reported). Corrupted: received bytes unequal to the expected ones,
/// and bytes beyond the expected length.
fn judge(dir: &str, expected: u64, tx: &Tx, rx: Option<&Rx>) -> Judged {
    let Some(rx) = rx else {
        return Judged {
            verified: false,
            lost: tx.sent,
            corrupted: 0,
            problems: vec![format!("{dir}: the receiver never reported")],
        };
    };
    let lost = tx.sent.saturating_sub(rx.received);
    let extra = rx.received.saturating_sub(expected);
    let corrupted = rx.mismatched + extra;
    let mut problems = Vec::new();
    if lost > 0 {
        problems.push(format!("{dir}: bytes sent but not received"));
    }
    if rx.mismatched > 0 {
        problems.push(format!("{dir}: bytes corrupted"));
    }
    if extra > 0 {
        problems.push(format!("{dir}: more bytes than sent"));
    }
    if tx.sent == rx.received && rx.mismatched == 0 && tx.digest != rx.digest {
        problems.push(format!("{dir}: SHA-256 differs"));
    }
    let verified = tx.sent == expected
        && rx.received == expected
        && rx.mismatched == 0
        && tx.digest == rx.digest;
    Judged {
        verified,
        lost,
        corrupted,
        problems,
    }
}

// ------------------------------------------------------------------ report

#[derive(Serialize, Debug, Clone, Default)]
pub struct Streams {
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    /// Completed streams by half-close order.
    pub request_first: u64,
    pub reply_first: u64,
    pub interleaved: u64,
    pub slowest_s: f64,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct Bytes {
    /// Request bytes (application → target) in streams whose request
    /// verified.
    pub request_verified: u64,
    /// Reply bytes (target → application) in streams whose reply verified.
    pub reply_verified: u64,
    pub verified: u64,
    /// Bytes the sender's kernel accepted that never reached the receiver,
    /// in streams where neither end saw an error: lost silently, the
    /// failure half-close bugs cause (the application sees EOF early).
    pub lost: u64,
    /// Received bytes unequal to the ones sent, and bytes beyond the end.
    pub corrupted: u64,
    /// Bytes sent and not received in streams that failed with an error at
    /// one end (a reset, a stall timeout): the ends knew. Counted apart
    /// from `lost`; such streams are failures all the same.
    pub undelivered: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct FailedStream {
    pub plan: Plan,
    pub reasons: Vec<String>,
    pub request_sent: u64,
    pub request_received: Option<u64>,
    pub reply_sent: Option<u64>,
    pub reply_received: u64,
    pub first_mismatch_request: Option<u64>,
    pub first_mismatch_reply: Option<u64>,
}

/// What is counted as the streams end.
#[derive(Default)]
struct Totals {
    streams: Streams,
    bytes: Bytes,
    failures: BTreeMap<String, u64>,
    examples: Vec<FailedStream>,
}

impl Totals {
    fn record(&mut self, plan: &Plan, o: &Outcome) {
        let s = &mut self.streams;
        s.started += 1;
        s.slowest_s = s.slowest_s.max(o.seconds);
        let req = judge(
            "request",
            plan.request,
            &o.request,
            o.target.as_ref().map(|t| &t.request),
        );
        let rep = match &o.target {
            Some(t) => judge("reply", plan.reply, &t.reply, Some(&o.reply)),
            // The target's send account is unknown: what arrived is all
            // that can be said.
            None => Judged {
                verified: false,
                lost: 0,
                corrupted: o.reply.mismatched + o.reply.received.saturating_sub(plan.reply),
                problems: Vec::new(),
            },
        };
        let b = &mut self.bytes;
        if req.verified {
            b.request_verified += plan.request;
        }
        if rep.verified {
            b.reply_verified += plan.reply;
        }
        b.verified = b.request_verified + b.reply_verified;
        b.corrupted += req.corrupted + rep.corrupted;
        let target_failure = o.target.as_ref().and_then(|t| t.failure.clone());
        let an_end_saw_an_error =
            o.app_failure.is_some() || target_failure.is_some() || o.target.is_none();
        if an_end_saw_an_error {
            b.undelivered += req.lost + rep.lost;
        } else {
            b.lost += req.lost + rep.lost;
        }
        let ok =
            req.verified && rep.verified && o.app_failure.is_none() && target_failure.is_none();
        if ok {
            s.completed += 1;
            match plan.order {
                Order::RequestFirst => s.request_first += 1,
                Order::ReplyFirst => s.reply_first += 1,
                Order::Interleaved => s.interleaved += 1,
            }
            return;
        }
        s.failed += 1;
        let mut reasons: Vec<String> = Vec::new();
        reasons.extend(o.app_failure.iter().map(Failure::key));
        reasons.extend(target_failure.iter().map(Failure::key));
        if o.target.is_none() && o.app_failure.is_none() {
            reasons.push("target: no report within the stall timeout".into());
        }
        reasons.extend(req.problems);
        reasons.extend(rep.problems);
        if reasons.is_empty() {
            reasons.push("did not verify (no other reason known)".into());
        }
        for r in &reasons {
            *self.failures.entry(r.clone()).or_default() += 1;
        }
        if self.examples.len() < EXAMPLES {
            self.examples.push(FailedStream {
                plan: *plan,
                reasons,
                request_sent: o.request.sent,
                request_received: o.target.as_ref().map(|t| t.request.received),
                reply_sent: o.target.as_ref().map(|t| t.reply.sent),
                reply_received: o.reply.received,
                first_mismatch_request: o.target.as_ref().and_then(|t| t.request.first_mismatch),
                first_mismatch_reply: o.reply.first_mismatch,
            });
        }
    }
}

/// A daemon's counts from /proc.
#[derive(Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Threads at work: parked ones (named "parked", waiting for the next
    /// stream's task, bounded and retiring when idle: halfpipe's
    /// docs/design.md, "Thread reuse") are not counted.
    pub threads: u64,
    pub fds: u64,
    pub rss_kib: u64,
}

impl Counts {
    fn max(self, o: Counts) -> Counts {
        Counts {
            threads: self.threads.max(o.threads),
            fds: self.fds.max(o.fds),
            rss_kib: self.rss_kib.max(o.rss_kib),
        }
    }
}

/// None once the process is gone.
fn counts(pid: u32) -> Option<Counts> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| procfs::status_kib(&status, key);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Counts {
        threads: procfs::working_threads(pid)?,
        fds,
        rss_kib: field("VmRSS:"),
    })
}

fn sample(pids: &[u32]) -> Vec<Option<Counts>> {
    pids.iter().map(|&p| counts(p)).collect()
}

/// "halfpipe client" from the command line, else the comm.
fn describe(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let comm = procfs::name(pid);
    match (args.next(), args.next()) {
        (Some(_), Some(sub)) if !sub.starts_with('-') => format!("{comm} {sub}"),
        _ => comm,
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct ProcessReport {
    pub pid: u32,
    pub name: String,
    /// Idle after the warm-up.
    pub start: Counts,
    /// The largest of the once-a-second samples during the run.
    pub peak: Counts,
    /// After the streams ended and the counts settled.
    pub end: Counts,
    pub alive: bool,
    pub threads_back: bool,
    pub fds_back: bool,
    pub rss_growth_kib: i64,
    pub rss_within_slack: bool,
}

#[derive(Serialize, Debug, Clone)]
pub struct Params {
    pub socks: String,
    pub target: String,
    pub streams: u64,
    pub duration_s: f64,
    pub max_size: u64,
    pub sizes: &'static str,
    pub seed: u64,
    pub ramp_s: f64,
    pub stall_timeout_s: f64,
    pub settle_s: f64,
    pub rss_slack_mib: u64,
    pub pids: Vec<u32>,
}

#[derive(Serialize, Debug, Clone)]
pub struct SoakReport {
    pub schema: &'static str,
    pub date: String,
    pub machine: Machine,
    pub params: Params,
    /// From the first stream started to the last one ended.
    pub seconds: f64,
    pub streams: Streams,
    pub bytes: Bytes,
    pub verified_mib_per_s: f64,
    /// Failed streams by reason (a stream can have more than one).
    pub failures: BTreeMap<String, u64>,
    pub failed_examples: Vec<FailedStream>,
    /// Target connections that matched no stream, by reason.
    pub orphans: BTreeMap<String, u64>,
    pub processes: Vec<ProcessReport>,
    /// How long after the last stream the counts took to return.
    pub settle_s: f64,
    pub returned_to_baseline: bool,
    pub ok: bool,
    /// Why `ok` is false, one sentence each.
    pub errors: Vec<String>,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// The tables for people.
pub fn text(r: &SoakReport) -> String {
    let mut out = String::new();
    let mut t = Table::new(&[
        "streams",
        "started",
        "completed",
        "failed",
        "request-first",
        "reply-first",
        "interleaved",
        "slowest s",
    ]);
    let s = &r.streams;
    t.row(vec![
        format!("{} at once", r.params.streams),
        s.started.to_string(),
        s.completed.to_string(),
        s.failed.to_string(),
        s.request_first.to_string(),
        s.reply_first.to_string(),
        s.interleaved.to_string(),
        format!("{:.2}", s.slowest_s),
    ]);
    out += &t.text();
    out += "\n";
    let b = &r.bytes;
    let mut t = Table::new(&[
        "bytes",
        "request verified",
        "reply verified",
        "verified",
        "MiB/s",
        "lost",
        "corrupted",
        "undelivered (failed streams)",
    ]);
    t.row(vec![
        "SHA-256 + byte by byte".into(),
        mib(b.request_verified),
        mib(b.reply_verified),
        format!("{} ({})", b.verified, mib(b.verified)),
        format!("{:.1}", r.verified_mib_per_s),
        b.lost.to_string(),
        b.corrupted.to_string(),
        b.undelivered.to_string(),
    ]);
    out += &t.text();
    out += "(lost: missing from streams that ended without an error at either end)\n";
    if !r.processes.is_empty() {
        out += "\n";
        let mut t = Table::new(&[
            "process",
            "pid",
            "threads start→end",
            "peak",
            "fds start→end",
            "peak",
            "RSS MiB start→end",
            "peak",
            "verdict",
        ]);
        let m = |k: u64| format!("{:.1}", k as f64 / 1024.0);
        for p in &r.processes {
            let verdict = if !p.alive {
                "GONE".to_string()
            } else if p.threads_back && p.fds_back && p.rss_within_slack {
                "back to baseline".to_string()
            } else {
                let mut v = Vec::new();
                if !p.threads_back {
                    v.push("threads");
                }
                if !p.fds_back {
                    v.push("fds");
                }
                if !p.rss_within_slack {
                    v.push("RSS");
                }
                format!("NOT back: {}", v.join(", "))
            };
            t.row(vec![
                p.name.clone(),
                p.pid.to_string(),
                format!("{} → {}", p.start.threads, p.end.threads),
                p.peak.threads.to_string(),
                format!("{} → {}", p.start.fds, p.end.fds),
                p.peak.fds.to_string(),
                format!("{} → {}", m(p.start.rss_kib), m(p.end.rss_kib)),
                m(p.peak.rss_kib),
                verdict,
            ]);
        }
        out += &t.text();
        out += &format!(
            "(threads and fds must return exactly; RSS may end up to {} MiB above its start, \
             since the allocator keeps freed memory; counts settled {:.1} s after the last stream)\n",
            r.params.rss_slack_mib, r.settle_s
        );
    }
    if !r.failures.is_empty() {
        out += "\nfailed streams by reason:\n";
        for (k, v) in &r.failures {
            out += &format!("  {v:>8}  {k}\n");
        }
        for e in &r.failed_examples {
            out += &format!(
                "  e.g. stream {} ({}, request {} B, reply {} B, early {}): {}\n",
                e.plan.index,
                e.plan.order.name(),
                e.plan.request,
                e.plan.reply,
                e.plan.early,
                e.reasons.join("; ")
            );
        }
    }
    if !r.orphans.is_empty() {
        out += "\ntarget connections that matched no stream:\n";
        for (k, v) in &r.orphans {
            out += &format!("  {v:>8}  {k}\n");
        }
    }
    out += "\n";
    if r.ok {
        out += "verdict: PASS: every stream completed, every byte verified, none lost or corrupted";
        if !r.processes.is_empty() {
            out += ", threads and descriptors back to baseline";
        }
        out += "\n";
    } else {
        out += "verdict: FAIL\n";
        for e in &r.errors {
            out += &format!("  {e}\n");
        }
    }
    out
}

// -------------------------------------------------------------- the driver

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("halfpipe-bench soak: {msg}");
    ExitCode::from(2)
}

/// Runs `n` streams from `plan(i)` at once; the first failure, if any.
fn run_batch(cx: &Cx, n: u64, plan: impl Fn(u64) -> Plan + Sync) -> Result<(), String> {
    let totals = Mutex::new(Totals::default());
    thread::scope(|scope| {
        for i in 0..n {
            let (totals, plan) = (&totals, &plan);
            let spawned = thread::Builder::new()
                .name("soak-warm".into())
                .stack_size(STACK)
                .spawn_scoped(scope, move || {
                    let p = plan(i);
                    let o = run_stream(cx, &p);
                    totals.lock().record(&p, &o);
                });
            if let Err(e) = spawned {
                return Err(format!("cannot start a thread: {e}"));
            }
        }
        Ok(())
    })?;
    let t = totals.into_inner();
    match t.failures.keys().next() {
        Some(first) => Err(format!(
            "{} of {n} streams failed: {first}",
            t.streams.failed
        )),
        None => Ok(()),
    }
}

/// Waits until the proxy carries a 1-byte stream each way.
fn wait_ready(cx: &Cx, seed: u64, patience: Duration) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    let mut i = 0;
    loop {
        let mut p = Plan::new(seed, WARM_INDEX | (1 << 62) | i, 1);
        p.order = Order::RequestFirst;
        i += 1;
        match run_batch(cx, 1, |_| p) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "no stream got through within {} ({e})",
                    humantime::format_duration(patience)
                ))
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Samples until threads and descriptors of every pid have stayed the same
/// for `quiet`, or `patience` is over. None if a process is gone.
fn wait_steady(pids: &[u32], quiet: Duration, patience: Duration) -> Option<Vec<Counts>> {
    let deadline = Instant::now() + patience;
    let key = |v: &[Option<Counts>]| -> Option<Vec<(u64, u64)>> {
        v.iter().map(|c| c.map(|c| (c.threads, c.fds))).collect()
    };
    let mut last = sample(pids);
    let mut since = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = sample(pids);
        key(&now)?;
        if key(&now) != key(&last) {
            since = Instant::now();
        }
        last = now;
        if since.elapsed() >= quiet || Instant::now() >= deadline {
            return last.into_iter().collect();
        }
    }
}

/// The soak's entry point (from `halfpipe-bench soak`).
pub fn main(args: &SoakArgs) -> ExitCode {
    let seed = args.seed.unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        mix(t ^ u64::from(std::process::id()))
    });
    // Every stream holds two descriptors here (its two ends), plus a dup
    // for the reading thread of most orders.
    let nofile = halfpipe::process::limits::KernelLimits::read().nofile;
    let need = args.streams * 4 + 64;
    if nofile < need {
        return fail(format!(
            "{} streams need about {need} descriptors, the limit is {nofile} (raise `ulimit -n`)",
            args.streams
        ));
    }
    for &p in &args.pids {
        if counts(p).is_none() {
            return fail(format!("no process {p} to sample (--pids)"));
        }
    }
    let registry = Arc::new(Registry::default());
    let targets =
        match TargetServer::start(args.target_listen, registry.clone(), args.stall_timeout) {
            Ok(t) => t,
            Err(e) => {
                return fail(format!(
                    "cannot start the target on {}: {e}",
                    args.target_listen
                ))
            }
        };
    let cx = Cx {
        proxy: args.socks,
        target: targets.addr,
        registry: registry.clone(),
        stall: args.stall_timeout,
    };
    let say = |s: &str| {
        if !args.json {
            print!("{s}");
            let _ = io::stdout().flush();
        }
    };
    let machine = procfs::machine();
    say(&format!(
        "halfpipe soak: {} streams at once through SOCKS5 {} for {}, sizes 1 B..{} \
         (log-uniform), seed {seed}\ntarget on {}; {} ({}, {} cores)\n",
        args.streams,
        args.socks,
        humantime::format_duration(args.duration),
        size(args.max_size),
        targets.addr,
        machine.hostname,
        machine.cpu,
        machine.cores
    ));

    // Ready, warm, idle: then the baseline.
    if let Err(e) = wait_ready(&cx, seed, args.wait) {
        targets.stop();
        return fail(e);
    }
    let warm = run_batch(&cx, WARM_STREAMS, |i| {
        let mut p = Plan::new(
            seed ^ 0x5741_524D,
            WARM_INDEX | i,
            args.max_size.min(WARM_MAX),
        );
        p.order = [Order::RequestFirst, Order::ReplyFirst, Order::Interleaved][i as usize % 3];
        p
    });
    if let Err(e) = warm {
        targets.stop();
        return fail(format!("the warm-up failed: {e}"));
    }
    let Some(start) = wait_steady(&args.pids, Duration::from_secs(1), Duration::from_secs(20))
    else {
        targets.stop();
        return fail("a daemon exited during the warm-up");
    };
    if !args.pids.is_empty() {
        let names: Vec<String> = args
            .pids
            .iter()
            .zip(&start)
            .map(|(p, c)| {
                format!(
                    "{} {p}: {} threads, {} fds, {} KiB",
                    describe(*p),
                    c.threads,
                    c.fds,
                    c.rss_kib
                )
            })
            .collect();
        say(&format!("baseline: {}\n", names.join("; ")));
    }
    say("\n");

    // The run.
    let totals = Mutex::new(Totals::default());
    let peak = Mutex::new(start.clone());
    let gone = AtomicBool::new(false);
    let next = AtomicU64::new(0);
    let active = AtomicU64::new(0);
    let ramp = args
        .ramp
        .unwrap_or_else(|| (args.duration / 10).min(Duration::from_secs(10)));
    let t0 = Instant::now();
    let deadline = t0 + args.duration;
    let (stop_tx, stop_rx) = bounded::<()>(0);
    let mut spawn_errors = Vec::new();
    thread::scope(|scope| {
        let sampler = {
            let (peak, gone, totals, active) = (&peak, &gone, &totals, &active);
            let pids = &args.pids;
            let progress = args.progress;
            let duration = args.duration;
            thread::Builder::new()
                .name("soak-sample".into())
                .spawn_scoped(scope, move || {
                    let mut next_line = t0 + progress;
                    loop {
                        match stop_rx.recv_timeout(Duration::from_secs(1)) {
                            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                            _ => return,
                        }
                        let now = sample(pids);
                        {
                            let mut pk = peak.lock();
                            for (p, c) in pk.iter_mut().zip(&now) {
                                match c {
                                    Some(c) => *p = p.max(*c),
                                    None => gone.store(true, Ordering::SeqCst),
                                }
                            }
                        }
                        if !progress.is_zero() && Instant::now() >= next_line {
                            next_line += progress;
                            let (done, failed, verified) = {
                                let t = totals.lock();
                                (t.streams.completed, t.streams.failed, t.bytes.verified)
                            };
                            let elapsed = t0.elapsed();
                            let mut line = format!(
                                "soak: {:>5.0} s of {}{}: {} in flight, {done} completed, {failed} failed, {} verified",
                                elapsed.as_secs_f64(),
                                humantime::format_duration(duration),
                                if elapsed > duration { " (finishing)" } else { "" },
                                active.load(Ordering::Relaxed),
                                mib(verified),
                            );
                            for (p, c) in pids.iter().zip(&now) {
                                if let Some(c) = c {
                                    line += &format!(
                                        "; pid {p}: {} threads, {} fds, {:.0} MiB",
                                        c.threads,
                                        c.fds,
                                        c.rss_kib as f64 / 1024.0
                                    );
                                }
                            }
                            eprintln!("{line}");
                        }
                    }
                })
        };
        let mut workers = Vec::new();
        for w in 0..args.streams {
            let (cx, totals, gone, next, active) = (&cx, &totals, &gone, &next, &active);
            let max = args.max_size;
            let first = t0 + ramp.mul_f64(w as f64 / args.streams as f64);
            let spawned = thread::Builder::new()
                .name(format!("soak {w}"))
                .stack_size(STACK)
                .spawn_scoped(scope, move || {
                    thread::sleep(first.saturating_duration_since(Instant::now()));
                    while Instant::now() < deadline && !gone.load(Ordering::SeqCst) {
                        let plan = Plan::new(seed, next.fetch_add(1, Ordering::Relaxed), max);
                        active.fetch_add(1, Ordering::Relaxed);
                        let o = run_stream(cx, &plan);
                        let failed = {
                            let mut t = totals.lock();
                            let before = t.streams.failed;
                            t.record(&plan, &o);
                            t.streams.failed > before
                        };
                        active.fetch_sub(1, Ordering::Relaxed);
                        if failed {
                            // A dead proxy fails every stream at once: do
                            // not spin.
                            thread::sleep(Duration::from_millis(100));
                        }
                    }
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    spawn_errors.push(format!(
                        "could start only {w} of {} streams: {e}",
                        args.streams
                    ));
                    break;
                }
            }
        }
        for h in workers {
            if h.join().is_err() {
                spawn_errors.push("a soak thread panicked".into());
            }
        }
        drop(stop_tx);
        if let Ok(Err(_)) | Err(_) = sampler.map(|s| s.join()) {
            spawn_errors.push("the sampling thread failed".into());
        }
    });
    let seconds = t0.elapsed().as_secs_f64();
    spawn_errors.extend(targets.stop());

    // Settle: the daemons end a stream's threads after both directions are
    // done; give them until --settle to come back to the baseline.
    let settle_t0 = Instant::now();
    let mut end = sample(&args.pids);
    loop {
        let back = end
            .iter()
            .zip(&start)
            .all(|(e, s)| e.is_some_and(|e| e.threads == s.threads && e.fds == s.fds));
        if back || end.iter().any(Option::is_none) || settle_t0.elapsed() >= args.settle {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        end = sample(&args.pids);
    }
    let settle_s = settle_t0.elapsed().as_secs_f64();

    let totals = totals.into_inner();
    let peak = peak.into_inner();
    let slack_kib = args.rss_slack * 1024;
    let processes: Vec<ProcessReport> = args
        .pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            let s = start[i];
            let e = end[i];
            let ec = e.unwrap_or_default();
            ProcessReport {
                pid,
                name: describe(pid),
                start: s,
                peak: peak[i].max(ec),
                end: ec,
                alive: e.is_some(),
                threads_back: e.is_some() && ec.threads == s.threads,
                fds_back: e.is_some() && ec.fds == s.fds,
                rss_growth_kib: ec.rss_kib as i64 - s.rss_kib as i64,
                rss_within_slack: e.is_some() && ec.rss_kib <= s.rss_kib + slack_kib,
            }
        })
        .collect();

    let mut errors = spawn_errors;
    let s = &totals.streams;
    let b = &totals.bytes;
    if s.completed == 0 {
        errors.push("no stream completed".into());
    }
    if s.failed > 0 {
        errors.push(format!("{} of {} streams failed", s.failed, s.started));
    }
    if b.lost > 0 || b.corrupted > 0 {
        errors.push(format!(
            "{} bytes lost silently and {} corrupted (must be 0)",
            b.lost, b.corrupted
        ));
    }
    if b.undelivered > 0 {
        errors.push(format!(
            "{} bytes undelivered in the failed streams",
            b.undelivered
        ));
    }
    let orphans = registry.orphans.lock().clone();
    if !orphans.is_empty() {
        errors.push(format!(
            "{} target connections matched no stream",
            orphans.values().sum::<u64>()
        ));
    }
    for p in &processes {
        if !p.alive {
            errors.push(format!("{} (pid {}) is gone", p.name, p.pid));
            continue;
        }
        if !p.threads_back {
            errors.push(format!(
                "{} (pid {}): {} threads at the end, {} at the start",
                p.name, p.pid, p.end.threads, p.start.threads
            ));
        }
        if !p.fds_back {
            errors.push(format!(
                "{} (pid {}): {} open descriptors at the end, {} at the start",
                p.name, p.pid, p.end.fds, p.start.fds
            ));
        }
        if !p.rss_within_slack {
            errors.push(format!(
                "{} (pid {}): RSS ended {} KiB above its start (more than the {} MiB allowed)",
                p.name, p.pid, p.rss_growth_kib, args.rss_slack
            ));
        }
    }
    let returned = processes
        .iter()
        .all(|p| p.alive && p.threads_back && p.fds_back && p.rss_within_slack);
    let report = SoakReport {
        schema: SCHEMA,
        date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        machine,
        params: Params {
            socks: args.socks.to_string(),
            target: cx.target.to_string(),
            streams: args.streams,
            duration_s: args.duration.as_secs_f64(),
            max_size: args.max_size,
            sizes: "log-uniform from 1 byte to max_size, request and reply drawn apart",
            seed,
            ramp_s: ramp.as_secs_f64(),
            stall_timeout_s: args.stall_timeout.as_secs_f64(),
            settle_s: args.settle.as_secs_f64(),
            rss_slack_mib: args.rss_slack,
            pids: args.pids.clone(),
        },
        seconds,
        verified_mib_per_s: b.verified as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        streams: s.clone(),
        bytes: b.clone(),
        failures: totals.failures.clone(),
        failed_examples: totals.examples.clone(),
        orphans,
        processes,
        settle_s,
        returned_to_baseline: returned,
        ok: errors.is_empty(),
        errors,
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => return fail(e),
        }
    } else {
        print!("{}", text(&report));
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

// ----------------------------------------------------------------- SHA-256

/// SHA-256 through the `sha2` crate (which uses the x86 SHA extensions when
/// the CPU has them: the soak hashes every byte twice).
mod sha256 {
    use sha2::Digest;

    #[derive(Clone)]
    pub struct Sha256(sha2::Sha256);

    impl Sha256 {
        pub fn new() -> Sha256 {
            Sha256(sha2::Sha256::new())
        }

        pub fn update(&mut self, data: &[u8]) {
            self.0.update(data);
        }

        pub fn finish(self) -> [u8; 32] {
            self.0.finalize().into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_the_same_at_any_offset() {
        let c = Content(42);
        let mut whole = vec![0u8; 100];
        c.fill(0, &mut whole);
        for off in 0..40 {
            for len in [0, 1, 5, 8, 13, 60] {
                let mut part = vec![0u8; len];
                c.fill(off as u64, &mut part);
                assert_eq!(part, whole[off..off + len], "offset {off}, len {len}");
            }
        }
        let mut other = vec![0u8; 100];
        Content(43).fill(0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn plans_are_reproducible_and_varied() {
        let max = 4 << 20;
        let a: Vec<_> = (0..3000).map(|i| Plan::new(9, i, max)).collect();
        let b: Vec<_> = (0..3000).map(|i| Plan::new(9, i, max)).collect();
        assert!(a.iter().zip(&b).all(|(x, y)| x.request == y.request
            && x.reply == y.reply
            && x.order == y.order
            && x.early == y.early));
        for o in [Order::RequestFirst, Order::ReplyFirst, Order::Interleaved] {
            let n = a.iter().filter(|p| p.order == o).count();
            assert!((800..1200).contains(&n), "{o:?}: {n}");
        }
        assert!(a.iter().all(|p| (1..=max).contains(&p.request)
            && (1..=max).contains(&p.reply)
            && p.early <= p.request));
        // Log-uniform: small and large both common.
        let small = a.iter().filter(|p| p.request < 1024).count();
        let large = a.iter().filter(|p| p.request >= 1 << 20).count();
        assert!(small > 300 && large > 200, "small {small}, large {large}");
        assert_eq!(Plan::new(1, 0, 1).request, 1);
    }

    #[test]
    fn receivers_count_what_differs() {
        let c = Content(5);
        let mut data = vec![0u8; 50];
        c.fill(0, &mut data);
        data[10] ^= 1;
        data[20] ^= 0xff;
        let mut r = Receiving::new(c, 40);
        r.buf[..50].copy_from_slice(&data);
        r.take(50);
        let rx = r.account();
        assert_eq!(
            (rx.received, rx.mismatched, rx.first_mismatch),
            (50, 2, Some(10))
        );
        let tx = Tx {
            sent: 40,
            digest: [0; 32],
        };
        let j = judge("request", 40, &tx, Some(&rx));
        assert!(!j.verified);
        assert_eq!((j.lost, j.corrupted), (0, 2 + 10));

        let mut good = Receiving::new(c, 50);
        c.fill(0, &mut good.buf[..50]);
        good.take(50);
        let mut s = sha256::Sha256::new();
        let mut d = vec![0u8; 50];
        c.fill(0, &mut d);
        s.update(&d);
        let tx = Tx {
            sent: 50,
            digest: s.finish(),
        };
        let j = judge("reply", 50, &tx, Some(&good.account()));
        assert!(j.verified && j.problems.is_empty());
        let short = judge("reply", 60, &Tx { sent: 60, ..tx }, Some(&good.account()));
        assert!(!short.verified);
        assert_eq!(short.lost, 10);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("256KiB"), Ok(256 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("4 parsecs").is_err());
        assert_eq!(size(4 << 20), "4 MiB");
        assert_eq!(size(1000), "1000 B");
    }
}
