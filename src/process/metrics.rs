//! Process-wide counters for `GET /metrics` (docs/operations.md, "Live
//! state: status, metrics, SIGUSR1"): plain Relaxed atomics, bumped where
//! the events happen.
//!
//! The hot paths add per batch, never per cell: the link writer tallies one
//! `writev()` worth of cells, the link reader one `read()`, a circuit one
//! inbox message, a packager one queued run of DATA cells, a deliverer one
//! `write()`. Gauges (links, circuits, streams by state, threads) are not
//! kept here: the status snapshot counts them when asked.

use halfpipe_proto::cell::{self, cmd, destroy_reason};
use halfpipe_proto::relay::{end_reason, relay_cmd};
use halfpipe_proto::stream::StreamViolation;
use halfpipe_proto::streammap::CircuitViolation;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Which way a cell went on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Sent = 0,
    Received = 1,
}

const DIRS: [(Dir, &str); 2] = [(Dir::Sent, "sent"), (Dir::Received, "received")];

/// Kinds of protocol violation (docs/protocol.md §3, §4, §5, §7, §10; §1
/// for the handshake). Each destroys a circuit (or closes a link), so the
/// counter counts circuits and links lost to misbehaving peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// §4: Recognized != 0 or Length > 498.
    RelayHeader,
    /// §4: a relay command sent the wrong way.
    WrongDirection,
    /// §4: DATA, FIN, END, BEGIN, ... on stream 0.
    StreamZero,
    /// §10: a window overrun or an unexpected SENDME.
    FlowControl,
    /// §7: DATA or FIN after the peer's FIN.
    HalfClose,
    /// R5.20: DATA or FIN before CONNECTED, or a second CONNECTED.
    Connected,
    /// §5: BEGIN or RESOLVE on a stream ID that is open.
    StreamIdReuse,
    /// §2, §3: CREATE/CREATE2, CREATE_FAST on a CircID in use or without
    /// the top bit, CREATE_FAST to a client, a wrong KH.
    Create,
    /// §1: a VERSIONS handshake that does not follow the rules.
    Handshake,
}

impl ViolationKind {
    /// The kind of a circuit's violation (`/metrics` label).
    pub fn of(v: &CircuitViolation) -> ViolationKind {
        match v {
            CircuitViolation::RelayHeader(_) => ViolationKind::RelayHeader,
            CircuitViolation::WrongDirection(_) => ViolationKind::WrongDirection,
            CircuitViolation::StreamZero(_) => ViolationKind::StreamZero,
            CircuitViolation::CircuitWindow(_)
            | CircuitViolation::Stream(StreamViolation::FlowControl(_)) => {
                ViolationKind::FlowControl
            }
            CircuitViolation::Stream(StreamViolation::HalfClose(_)) => ViolationKind::HalfClose,
            CircuitViolation::BeforeConnected(_) | CircuitViolation::SecondConnected => {
                ViolationKind::Connected
            }
            CircuitViolation::IdInUse(_) => ViolationKind::StreamIdReuse,
        }
    }

    pub const ALL: [ViolationKind; 9] = [
        ViolationKind::RelayHeader,
        ViolationKind::WrongDirection,
        ViolationKind::StreamZero,
        ViolationKind::FlowControl,
        ViolationKind::HalfClose,
        ViolationKind::Connected,
        ViolationKind::StreamIdReuse,
        ViolationKind::Create,
        ViolationKind::Handshake,
    ];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            ViolationKind::RelayHeader => "relay_header",
            ViolationKind::WrongDirection => "wrong_direction",
            ViolationKind::StreamZero => "stream_zero",
            ViolationKind::FlowControl => "flow_control",
            ViolationKind::HalfClose => "half_close",
            ViolationKind::Connected => "connected",
            ViolationKind::StreamIdReuse => "stream_id_reuse",
            ViolationKind::Create => "create",
            ViolationKind::Handshake => "handshake",
        }
    }
}

/// Why a TLS link handshake failed: the `reason` label of
/// `halfpipe_tls_handshake_failures_total` (`link::tls::TlsFailure::reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsReason {
    /// The client's pin is not the exit's key (R13.5).
    WrongExit,
    /// The exit does not list the client (R13.7).
    UnlistedClient,
    /// The client was told so by the exit.
    RefusedByExit,
    /// The exit was told so by the client.
    RefusedByClient,
    /// A plain link's VERSIONS where a ClientHello belongs.
    PlainPeer,
    /// No ALPN `halfpipe/1` (R13.2).
    NoAlpn,
    /// Not done within the handshake timeout.
    Timeout,
    /// The peer closed the connection.
    Closed,
    Other,
}

impl TlsReason {
    pub const ALL: [TlsReason; 9] = [
        TlsReason::WrongExit,
        TlsReason::UnlistedClient,
        TlsReason::RefusedByExit,
        TlsReason::RefusedByClient,
        TlsReason::PlainPeer,
        TlsReason::NoAlpn,
        TlsReason::Timeout,
        TlsReason::Closed,
        TlsReason::Other,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            TlsReason::WrongExit => "wrong_exit",
            TlsReason::UnlistedClient => "unlisted_client",
            TlsReason::RefusedByExit => "refused_by_exit",
            TlsReason::RefusedByClient => "refused_by_client",
            TlsReason::PlainPeer => "plain_peer",
            TlsReason::NoAlpn => "no_alpn",
            TlsReason::Timeout => "timeout",
            TlsReason::Closed => "closed",
            TlsReason::Other => "other",
        }
    }
}

/// Which limit refused a stream (END(RESOURCELIMIT) or SOCKS 0x01/0x5B).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-streams-per-circuit`.
    Circuit = 0,
    /// `--max-streams` (capped by the kernel's limits).
    Process = 1,
    /// A packager, deliverer or resolver thread could not be spawned.
    Threads = 2,
    /// Few slots were left and the stream's source (a link at the exit,
    /// SOCKS credentials at the client) held its share already.
    Share = 3,
    /// Client: no circuit could be had for the stream (the exit refused
    /// circuits on every link, and the client has `limits::MAX_EXIT_LINKS`
    /// links to it, or the process holds `limits::MAX_CIRCUITS`).
    Circuits = 4,
}

const LIMITS: [(Limit, &str); 5] = [
    (Limit::Circuit, "circuit"),
    (Limit::Process, "process"),
    (Limit::Threads, "threads"),
    (Limit::Share, "share"),
    (Limit::Circuits, "circuits"),
];

/// Relay commands have one counter each below this; others share counter
/// 0 (`relay_cmd::name(0)` is "unknown"). XON (44) is the largest known.
const RELAY_CMDS: usize = 45;
/// END and DESTROY reasons below this have one counter each.
const REASONS: usize = 16;

const fn zeros<const N: usize>() -> [AtomicU64; N] {
    [const { AtomicU64::new(0) }; N]
}

pub struct Metrics {
    started: Instant,
    /// Stream bytes and DATA cells: [packaged, delivered].
    stream_bytes: [AtomicU64; 2],
    stream_cells: [AtomicU64; 2],
    /// Link bytes and cells, by `Dir`.
    link_bytes: [AtomicU64; 2],
    link_cells: [AtomicU64; 2],
    relay_cells: [[AtomicU64; RELAY_CMDS]; 2],
    end: [[AtomicU64; REASONS]; 2],
    destroy: [[AtomicU64; REASONS]; 2],
    violations: [AtomicU64; ViolationKind::ALL.len()],
    /// SOCKS replies: index 0..256 SOCKS4 codes, 256..512 SOCKS5 codes.
    socks: [AtomicU64; 512],
    refused: [AtomicU64; LIMITS.len()],
    /// TLS handshakes that failed, by reason.
    tls_failures: [AtomicU64; TlsReason::ALL.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            stream_bytes: zeros(),
            stream_cells: zeros(),
            link_bytes: zeros(),
            link_cells: zeros(),
            relay_cells: [zeros(), zeros()],
            end: [zeros(), zeros()],
            destroy: [zeros(), zeros()],
            violations: zeros(),
            socks: zeros(),
            refused: zeros(),
            tls_failures: zeros(),
        }
    }
}

/// Counts gathered by one thread over one batch (a `writev()`, a `read()`,
/// an inbox message), added to the atomics in one go by `Metrics::add`.
pub struct Tally {
    link_bytes: u64,
    link_cells: u64,
    relay: [u32; RELAY_CMDS],
    end: [u32; REASONS],
    destroy: [u32; REASONS],
    any: bool,
}

// By hand: std derives `Default` for arrays of at most 32 elements.
impl Default for Tally {
    fn default() -> Self {
        Tally {
            link_bytes: 0,
            link_cells: 0,
            relay: [0; RELAY_CMDS],
            end: [0; REASONS],
            destroy: [0; REASONS],
            any: false,
        }
    }
}

impl Tally {
    /// One relay cell with this command.
    #[inline]
    pub fn relay(&mut self, command: u8) {
        self.relay[relay_index(command)] += 1;
        self.any = true;
    }

    /// `n` DATA cells.
    #[inline]
    pub fn data_cells(&mut self, n: u32) {
        self.relay[relay_cmd::DATA as usize] += n;
        self.any = true;
    }

    /// Bytes and cells that crossed the link.
    #[inline]
    pub fn link(&mut self, bytes: usize, cells: usize) {
        self.link_bytes += bytes as u64;
        self.link_cells += cells as u64;
        self.any = true;
    }

    /// Looks at whole fixed-length cells as the link writer sends them:
    /// relay commands, END and DESTROY reasons.
    pub fn scan_cells(&mut self, bytes: &[u8]) {
        for c in bytes.chunks_exact(cell::CELL_LEN) {
            match c[4] {
                cmd::RELAY | cmd::RELAY_EARLY => {
                    let command = c[5];
                    self.relay(command);
                    if command == relay_cmd::END {
                        // Link header [5] + relay header [11]: the reason.
                        let len = u16::from_be_bytes([c[14], c[15]]);
                        let reason = if len == 0 { end_reason::MISC } else { c[16] };
                        self.end[reason_index(reason)] += 1;
                    }
                }
                cmd::DESTROY => {
                    self.destroy[reason_index(c[5])] += 1;
                    self.any = true;
                }
                _ => {}
            }
        }
    }
}

fn relay_index(command: u8) -> usize {
    // Unknown commands share counter 0, so that "unknown" is one sample.
    match command as usize {
        i if i < RELAY_CMDS && relay_cmd::name(command) != "unknown" => i,
        _ => 0,
    }
}

/// Reasons past the known ones share the last counter, which both
/// `end_reason::name` and `destroy_reason::name` call "unknown".
fn reason_index(reason: u8) -> usize {
    (reason as usize).min(REASONS - 1)
}

impl Metrics {
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Adds one batch's tally.
    pub fn add(&self, dir: Dir, t: &mut Tally) {
        if !t.any {
            return;
        }
        let d = dir as usize;
        if t.link_bytes > 0 {
            self.link_bytes[d].fetch_add(t.link_bytes, Relaxed);
        }
        if t.link_cells > 0 {
            self.link_cells[d].fetch_add(t.link_cells, Relaxed);
        }
        for (i, n) in t.relay.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.relay_cells[d][i].fetch_add(u64::from(*n), Relaxed);
        }
        for (i, n) in t.end.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.end[d][i].fetch_add(u64::from(*n), Relaxed);
        }
        for (i, n) in t.destroy.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.destroy[d][i].fetch_add(u64::from(*n), Relaxed);
        }
        *t = Tally::default();
    }

    /// Bytes one `read()` took from a link (the reader adds per read).
    #[inline]
    pub fn add_link_bytes(&self, dir: Dir, n: usize) {
        self.link_bytes[dir as usize].fetch_add(n as u64, Relaxed);
    }

    /// Whole cells the link reader handed on from one read.
    #[inline]
    pub fn add_link_cells(&self, dir: Dir, n: usize) {
        if n > 0 {
            self.link_cells[dir as usize].fetch_add(n as u64, Relaxed);
        }
    }

    /// A packager queued `cells` DATA cells holding `bytes` bytes.
    #[inline]
    pub fn packaged(&self, bytes: u64, cells: u32) {
        self.stream_bytes[0].fetch_add(bytes, Relaxed);
        self.stream_cells[0].fetch_add(u64::from(cells), Relaxed);
    }

    /// A deliverer wrote `cells` DATA cells holding `bytes` bytes.
    #[inline]
    pub fn delivered(&self, bytes: u64, cells: u32) {
        self.stream_bytes[1].fetch_add(bytes, Relaxed);
        self.stream_cells[1].fetch_add(u64::from(cells), Relaxed);
    }

    pub fn end_received(&self, reason: u8) {
        self.end[Dir::Received as usize][reason_index(reason)].fetch_add(1, Relaxed);
    }

    pub fn destroy_received(&self, reason: u8) {
        self.destroy[Dir::Received as usize][reason_index(reason)].fetch_add(1, Relaxed);
    }

    pub fn violation(&self, kind: ViolationKind) {
        self.violations[kind as usize].fetch_add(1, Relaxed);
    }

    /// A TLS handshake failed (docs/operations.md, "TLS links and
    /// identities").
    pub fn tls_failure(&self, reason: TlsReason) {
        self.tls_failures[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn refused(&self, limit: Limit) {
        self.refused[limit as usize].fetch_add(1, Relaxed);
    }

    /// A SOCKS reply was written: `bytes` as sent (possibly after earlier
    /// answers of the same handshake). Counts the reply at its end; a
    /// method-selection or authentication answer alone is not a reply.
    pub fn socks_reply(&self, bytes: &[u8]) {
        if let Some((version, code)) = socks_reply_code(bytes) {
            let base = if version == 5 { 256 } else { 0 };
            self.socks[base + code as usize].fetch_add(1, Relaxed);
        }
    }

    /// Streams refused by each limit so far (for tests and logs).
    pub fn refused_count(&self, limit: Limit) -> u64 {
        self.refused[limit as usize].load(Relaxed)
    }

    /// The Prometheus text exposition (format 0.0.4), counters first, then
    /// the gauges the caller counted from a status snapshot.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(8192);
        let o = &mut out;
        let uptime = format!("{:.3}", self.uptime().as_secs_f64());
        let single: [(&str, &str, &str, &dyn std::fmt::Display); 6] = [
            (
                "halfpipe_uptime_seconds",
                "gauge",
                "Seconds since the process started.",
                &uptime,
            ),
            (
                "halfpipe_capacity_streams",
                "gauge",
                "Streams this process may hold (--max-streams capped by the kernel's limits).",
                &gauges.capacity,
            ),
            (
                "halfpipe_threads",
                "gauge",
                "Threads alive in the process (/proc/self/task).",
                &gauges.threads,
            ),
            (
                "halfpipe_threads_parked",
                "gauge",
                "Threads parked for the next stream or SOCKS task to take (of halfpipe_threads).",
                &gauges.threads_parked,
            ),
            (
                "halfpipe_thread_starts_total",
                "counter",
                "Stream and SOCKS tasks that started a new thread.",
                &gauges.thread_starts,
            ),
            (
                "halfpipe_thread_reuses_total",
                "counter",
                "Stream and SOCKS tasks that took a parked thread instead.",
                &gauges.thread_reuses,
            ),
        ];
        for (name, kind, help, value) in single {
            family(o, name, kind, help);
            let _ = writeln!(o, "{name} {value}");
        }

        family(o, "halfpipe_links", "gauge", "Links open, by role.");
        for (role, n) in &gauges.links {
            let _ = writeln!(o, "halfpipe_links{{role=\"{role}\"}} {n}");
        }
        family(o, "halfpipe_circuits", "gauge", "Circuits open, by role.");
        for (role, n) in &gauges.circuits {
            let _ = writeln!(o, "halfpipe_circuits{{role=\"{role}\"}} {n}");
        }
        family(
            o,
            "halfpipe_streams",
            "gauge",
            "Streams, by role and protocol.md section 7 state (CLOSED: threads still ending).",
        );
        for ((role, state), n) in &gauges.streams {
            let _ = writeln!(
                o,
                "halfpipe_streams{{role=\"{role}\",state=\"{state}\"}} {n}"
            );
        }

        family(
            o,
            "halfpipe_stream_bytes_total",
            "counter",
            "Stream bytes: packaged = read from a stream's socket and sent as DATA; delivered = received as DATA and written to a stream's socket.",
        );
        family_rows(o, "halfpipe_stream_bytes_total", &self.stream_bytes);
        family(
            o,
            "halfpipe_stream_cells_total",
            "counter",
            "DATA cells: packaged = sent, delivered = written to a stream's socket.",
        );
        family_rows(o, "halfpipe_stream_cells_total", &self.stream_cells);
        family(
            o,
            "halfpipe_link_bytes_total",
            "counter",
            "Bytes written to and read from links (after the VERSIONS handshake).",
        );
        for (dir, name) in DIRS {
            let v = self.link_bytes[dir as usize].load(Relaxed);
            let _ = writeln!(o, "halfpipe_link_bytes_total{{direction=\"{name}\"}} {v}");
        }
        family(
            o,
            "halfpipe_link_cells_total",
            "counter",
            "Cells written to and read from links.",
        );
        for (dir, name) in DIRS {
            let v = self.link_cells[dir as usize].load(Relaxed);
            let _ = writeln!(o, "halfpipe_link_cells_total{{direction=\"{name}\"}} {v}");
        }
        family(
            o,
            "halfpipe_relay_cells_total",
            "counter",
            "Relay cells by direction and relay command (received: handled by a live circuit).",
        );
        for (dir, name) in DIRS {
            for (i, c) in self.relay_cells[dir as usize].iter().enumerate() {
                let v = c.load(Relaxed);
                if v > 0 {
                    let command = relay_cmd::name(i as u8);
                    let _ = writeln!(
                        o,
                        "halfpipe_relay_cells_total{{direction=\"{name}\",command=\"{command}\"}} {v}"
                    );
                }
            }
        }
        family(
            o,
            "halfpipe_end_total",
            "counter",
            "RELAY_END cells by direction and reason (tor-spec 6.3 names).",
        );
        reasons(o, "halfpipe_end_total", &self.end, end_reason::name);
        family(
            o,
            "halfpipe_destroy_total",
            "counter",
            "DESTROY cells by direction and reason (tor-spec 5.4 names).",
        );
        reasons(
            o,
            "halfpipe_destroy_total",
            &self.destroy,
            destroy_reason::name,
        );
        family(
            o,
            "halfpipe_protocol_violations_total",
            "counter",
            "Protocol violations by peers, by kind (each destroys a circuit or closes a link).",
        );
        for kind in ViolationKind::ALL {
            let v = self.violations[kind as usize].load(Relaxed);
            let _ = writeln!(
                o,
                "halfpipe_protocol_violations_total{{kind=\"{}\"}} {v}",
                kind.label()
            );
        }
        family(
            o,
            "halfpipe_socks_replies_total",
            "counter",
            "SOCKS replies sent, by SOCKS version and reply code.",
        );
        for (i, c) in self.socks.iter().enumerate() {
            let v = c.load(Relaxed);
            if v > 0 {
                let version = if i >= 256 { 5 } else { 4 };
                let code = i % 256;
                let _ = writeln!(
                    o,
                    "halfpipe_socks_replies_total{{version=\"{version}\",code=\"{code:#04x}\"}} {v}"
                );
            }
        }
        family(
            o,
            "halfpipe_streams_refused_total",
            "counter",
            "Streams refused (END(RESOURCELIMIT) or a SOCKS failure), by the limit that refused them.",
        );
        for (limit, name) in LIMITS {
            let v = self.refused[limit as usize].load(Relaxed);
            let _ = writeln!(o, "halfpipe_streams_refused_total{{limit=\"{name}\"}} {v}");
        }
        family(
            o,
            "halfpipe_tls_handshake_failures_total",
            "counter",
            "TLS link handshakes that failed, by reason (docs/protocol.md §13).",
        );
        for reason in TlsReason::ALL {
            let v = self.tls_failures[reason as usize].load(Relaxed);
            let _ = writeln!(
                o,
                "halfpipe_tls_handshake_failures_total{{reason=\"{}\"}} {v}",
                reason.label()
            );
        }
        out
    }
}

/// The gauges `render` prints, counted from a status snapshot.
#[derive(Debug, Default)]
pub struct Gauges {
    pub capacity: usize,
    pub threads: usize,
    pub threads_parked: usize,
    /// The thread pool's counters (kept by the pool, shown with the rest).
    pub thread_starts: u64,
    pub thread_reuses: u64,
    /// (role, count)
    pub links: Vec<(&'static str, usize)>,
    pub circuits: Vec<(&'static str, usize)>,
    /// ((role, state), count)
    pub streams: Vec<((&'static str, String), usize)>,
}

fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

fn family_rows(o: &mut String, name: &str, v: &[AtomicU64; 2]) {
    for (i, dir) in ["packaged", "delivered"].iter().enumerate() {
        let _ = writeln!(o, "{name}{{direction=\"{dir}\"}} {}", v[i].load(Relaxed));
    }
}

fn reasons(
    o: &mut String,
    name: &str,
    counts: &[[AtomicU64; REASONS]; 2],
    reason_name: fn(u8) -> &'static str,
) {
    for (dir, dname) in DIRS {
        for (i, c) in counts[dir as usize].iter().enumerate() {
            let v = c.load(Relaxed);
            if v > 0 {
                let reason = reason_name(i as u8);
                let _ = writeln!(o, "{name}{{direction=\"{dname}\",reason=\"{reason}\"}} {v}");
            }
        }
    }
}

/// The (version, code) of the SOCKS reply that ends `bytes`, as
/// `socks::connect_reply` and `socks::resolve_reply` build them: SOCKS5
/// `05 REP 00 ATYP ADDR PORT` (IPv4 or IPv6), SOCKS4 `00 CD DSTPORT DSTIP`.
fn socks_reply_code(b: &[u8]) -> Option<(u8, u8)> {
    let n = b.len();
    let v5 = |len: usize, atyp: u8| {
        (n >= len && b[n - len] == 5 && b[n - len + 2] == 0 && b[n - len + 3] == atyp)
            .then(|| (5, b[n - len + 1]))
    };
    v5(10, 1).or_else(|| v5(22, 4)).or_else(|| {
        (n >= 8 && b[n - 8] == 0 && (0x5a..=0x5d).contains(&b[n - 7])).then(|| (4, b[n - 7]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use halfpipe_proto::socks::{self, Reply, SocksVersion};

    #[test]
    fn socks_reply_codes_are_read_from_the_replies_halfpipe_builds() {
        let v5 = socks::connect_reply(SocksVersion::V5, Reply::HostUnreachable, None);
        assert_eq!(socks_reply_code(&v5), Some((5, 0x04)));
        let six = socks::resolve_reply(SocksVersion::V5, Ok("::1".parse().unwrap()));
        assert_eq!(socks_reply_code(&six), Some((5, 0x00)));
        let v4 = socks::connect_reply(SocksVersion::V4, Reply::GeneralFailure, None);
        assert_eq!(socks_reply_code(&v4), Some((4, 0x5b)));
        // A method-selection answer followed by a failure reply.
        let mut both = vec![5, 0];
        both.extend_from_slice(&socks::connect_reply(
            SocksVersion::V5,
            Reply::CommandNotSupported,
            None,
        ));
        assert_eq!(socks_reply_code(&both), Some((5, 0x07)));
        // "No acceptable method" alone is no reply to a request.
        assert_eq!(socks_reply_code(&[5, 0xff]), None);
    }

    #[test]
    fn unknown_relay_commands_are_one_sample_and_xon_xoff_their_own() {
        let m = Metrics::default();
        let mut t = Tally::default();
        for command in [20, 35, 200, relay_cmd::XOFF, relay_cmd::XON, relay_cmd::XON] {
            t.relay(command);
        }
        m.add(Dir::Received, &mut t);
        let text = m.render(&Gauges::default());
        let rows = |cmd: &str| {
            text.lines()
                .filter(|l| l.contains(&format!("command=\"{cmd}\"")))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            rows("unknown"),
            ["halfpipe_relay_cells_total{direction=\"received\",command=\"unknown\"} 3"]
        );
        assert_eq!(rows("XOFF").len(), 1);
        assert!(rows("XON")[0].ends_with(" 2"));
    }

    #[test]
    fn writer_tally_reads_relay_commands_and_reasons() {
        let mut out = Vec::new();
        halfpipe_proto::relay::encode(&mut out, 0x8000_0001, relay_cmd::END, 3, &[12]);
        halfpipe_proto::relay::encode(&mut out, 0x8000_0001, relay_cmd::SENDME, 0, &[]);
        cell::encode_destroy(&mut out, 0x8000_0001, destroy_reason::PROTOCOL);
        let m = Metrics::default();
        let mut t = Tally::default();
        t.scan_cells(&out);
        t.link(out.len(), 3);
        m.add(Dir::Sent, &mut t);
        let text = m.render(&Gauges::default());
        assert!(text.contains("halfpipe_end_total{direction=\"sent\",reason=\"CONNRESET\"} 1"));
        assert!(
            text.contains("halfpipe_relay_cells_total{direction=\"sent\",command=\"SENDME\"} 1")
        );
        assert!(text.contains("halfpipe_destroy_total{direction=\"sent\",reason=\"PROTOCOL\"} 1"));
        assert!(text.contains("halfpipe_link_cells_total{direction=\"sent\"} 3"));
    }
}
