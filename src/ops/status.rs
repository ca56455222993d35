//! Live state for people (docs/operations.md, "Live state: status,
//! metrics, SIGUSR1"): the status endpoint (`--status ADDR`: `GET
//! /streams`, `GET /metrics`), the `halfpipe status` table, and the same
//! table in the log on SIGUSR1.
//!
//! Everything here reads; the threads that own the state keep owning it.
//! A snapshot clones `Arc`s under the registries' locks, then copies each
//! stream's fields under that stream's lock, one at a time; serializing
//! and writing happen after every lock is released (docs/design.md,
//! invariant 5).

use crate::circuit::view::CircuitView;
use crate::link::Links;
use crate::ops::http;
use crate::process::metrics::Gauges;
use crate::process::Ctx;
use crate::stream::Stream;
use halfpipe_proto::halfclose::{CloseCause, State};
use halfpipe_proto::relay::end_reason;
use halfpipe_proto::Role;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The conventional `--status` address, and where `halfpipe status` looks
/// by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9051";

// ------------------------------------------------------------ the document

/// `GET /streams`: the whole document. Field meanings are in
/// docs/operations.md ("Live state: status, metrics, SIGUSR1"); ages and
/// idle times are in seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub process: ProcessInfo,
    pub links: Vec<LinkInfo>,
    pub circuits: Vec<CircuitInfo>,
    pub streams: Vec<StreamInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub version: String,
    /// "client", "exit", or both (`halfpipe run`).
    pub roles: Vec<String>,
    pub uptime_secs: f64,
    /// Streams this process may hold (`--max-streams`, capped by the kernel).
    pub capacity_streams: usize,
    /// Stream slots in use (streams and resolves).
    pub open_streams: usize,
    /// Threads alive (/proc/self/task).
    pub threads: usize,
    /// Of those, parked: waiting for the next stream's task
    /// (docs/design.md, "Thread reuse").
    #[serde(default)]
    pub threads_parked: usize,
    /// Stream and SOCKS tasks so far that started a thread, and that took
    /// a parked one.
    #[serde(default)]
    pub thread_starts: usize,
    #[serde(default)]
    pub thread_reuses: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkInfo {
    /// The process's counter for the link: `link-rd ID`, `link-wr ID`.
    pub id: u32,
    pub role: String,
    pub peer: String,
    pub age_secs: f64,
    pub circuits: usize,
    pub reader_tid: Option<i32>,
    pub writer_tid: Option<i32>,
    /// "tls" or "plain" (docs/protocol.md §13).
    pub transport: String,
    /// The TLS session of a TLS link: "TLSv1.3".
    pub tls_version: Option<String>,
    /// IANA's name: "TLS_AES_128_GCM_SHA256".
    pub cipher_suite: Option<String>,
    /// The fingerprint of the peer's identity key (R13.4), when it showed
    /// one: always the exit's at a client; a client's at an exit.
    pub peer_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CircuitInfo {
    /// "L.C": link and circuit counters, as in the thread name `circ L.C`.
    pub name: String,
    pub link: u32,
    pub local: u32,
    /// The CircID on the wire, in hex.
    pub circ_id: String,
    pub role: String,
    pub age_secs: f64,
    /// Circuit package window (v1), or cells that may be sent now (v2).
    pub package_window: u32,
    /// Circuit deliver window (v1), or cells to the next SENDME (v2).
    pub deliver_window: u32,
    /// docs/protocol.md §14: "v2" when both edges agreed on it, else "v1".
    #[serde(default)]
    pub flow: String,
    /// v2: the congestion window and the cells in flight, in cells, and
    /// the smoothed round trip of its SENDMEs.
    #[serde(default)]
    pub cwnd: Option<u32>,
    #[serde(default)]
    pub inflight: Option<u32>,
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    pub streams: usize,
    pub tid: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamInfo {
    /// "C.S": circuit counter and stream ID, as in `pk C.S` and `dl C.S`.
    pub name: String,
    /// "L.C" of its circuit.
    pub circuit: String,
    pub link: u32,
    pub id: u16,
    pub role: String,
    pub target: String,
    /// docs/protocol.md §7: OPEN, DONE_PACKAGING, DONE_DELIVERING, CLOSED.
    pub state: String,
    /// Why a CLOSED stream closed: "FIN both ways", "END(REASON) sent",
    /// "END(REASON) received".
    pub close_cause: Option<String>,
    /// Read from our TCP connection and sent as DATA.
    pub bytes_packaged: u64,
    pub cells_packaged: u64,
    /// Received as DATA and written to our TCP connection.
    pub bytes_delivered: u64,
    pub cells_delivered: u64,
    /// DATA cells received for the stream (accepted by docs/protocol.md §7
    /// and §10).
    pub cells_received: u64,
    /// Received and not yet written: waiting for the deliverer.
    pub cells_queued: u64,
    pub package_window: u32,
    pub deliver_window: u32,
    /// v2 (docs/protocol.md §14): we sent XOFF and no XON since; the peer
    /// did.
    #[serde(default)]
    pub xoff_sent: bool,
    #[serde(default)]
    pub xoff_received: bool,
    pub age_secs: f64,
    /// Seconds since a byte was last read from or written to the stream's
    /// TCP connection (since it opened, if none was).
    pub idle_secs: f64,
    pub packager_tid: Option<i32>,
    pub deliverer_tid: Option<i32>,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Client => "client",
        Role::Exit => "exit",
    }
}

fn tid(t: i32) -> Option<i32> {
    (t > 0).then_some(t)
}

fn close_cause(state: State) -> Option<String> {
    match state {
        State::Closed(CloseCause::Finished) => Some("FIN both ways".into()),
        State::Closed(CloseCause::EndSent(r)) => Some(format!("END({}) sent", end_reason::name(r))),
        State::Closed(CloseCause::EndReceived(r)) => {
            Some(format!("END({}) received", end_reason::name(r)))
        }
        State::Open | State::DonePackaging | State::DoneDelivering => None,
    }
}

/// Threads of this process, from /proc/self/task.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn stream_info(view: &CircuitView, s: &Stream) -> StreamInfo {
    let (state, package, deliver, xoff, c, last, pk, dl) = {
        let st = s.state.lock();
        (
            st.hc.state(),
            st.package.value(),
            st.deliver.value(),
            st.v2.map(|x| (x.xoff_sent(), x.paused())),
            st.counters,
            st.last_activity,
            st.packager_tid,
            st.deliverer_tid,
        )
    };
    StreamInfo {
        name: s.name.clone(),
        circuit: format!("{}.{}", view.link, view.local),
        link: view.link,
        id: s.id,
        role: role_name(s.role).into(),
        target: s.target.to_string(),
        state: state.to_string(),
        close_cause: close_cause(state),
        bytes_packaged: c.bytes_packaged,
        cells_packaged: c.cells_packaged,
        bytes_delivered: c.bytes_delivered,
        cells_delivered: c.cells_delivered,
        cells_received: c.cells_received,
        cells_queued: c.cells_received.saturating_sub(c.cells_delivered),
        package_window: package,
        deliver_window: deliver,
        xoff_sent: xoff.is_some_and(|x| x.0),
        xoff_received: xoff.is_some_and(|x| x.1),
        age_secs: s.opened.elapsed().as_secs_f64(),
        idle_secs: last.elapsed().as_secs_f64(),
        packager_tid: pk,
        deliverer_tid: dl,
    }
}

/// The edges a daemon runs ("client", "exit"), filled in as they start.
pub type Roles = Arc<Mutex<Vec<&'static str>>>;

/// What a snapshot reads: the process, its links (and through them their
/// circuits and streams), and the edges it runs.
#[derive(Clone)]
pub struct Watched {
    pub ctx: Arc<Ctx>,
    pub links: Arc<Links>,
    pub roles: Roles,
}

/// Takes a snapshot of every link, circuit and stream of the process.
pub fn snapshot(w: &Watched) -> Snapshot {
    let ctx = &w.ctx;
    let pool = ctx.pool.counts();
    let roles = w.roles.lock().clone();
    let live = w.links.all();
    let mut views: Vec<Arc<CircuitView>> = live.iter().flat_map(|l| l.circuit_views()).collect();
    let mut links: Vec<LinkInfo> = live
        .into_iter()
        .map(|l| {
            let (rd, wr) = l.tids();
            let tls = l.tls_info();
            LinkInfo {
                id: l.id,
                role: role_name(l.role).into(),
                peer: l.peer.to_string(),
                age_secs: l.age().as_secs_f64(),
                circuits: l.circuit_count(),
                reader_tid: tid(rd),
                writer_tid: tid(wr),
                transport: if tls.is_some() { "tls" } else { "plain" }.into(),
                tls_version: tls.map(|t| t.version.clone()),
                cipher_suite: tls.map(|t| t.cipher_suite.clone()),
                peer_fingerprint: tls.and_then(|t| t.peer).map(|f| f.to_string()),
            }
        })
        .collect();
    links.sort_by_key(|l| l.id);
    views.sort_by_key(|v| (v.link, v.local));
    let mut circuits = Vec::with_capacity(views.len());
    let mut streams = Vec::new();
    for v in &views {
        let members = v.streams();
        let congestion = v.congestion();
        circuits.push(CircuitInfo {
            name: format!("{}.{}", v.link, v.local),
            link: v.link,
            local: v.local,
            circ_id: format!("{:#010x}", v.wire),
            role: role_name(v.role).into(),
            age_secs: v.age().as_secs_f64(),
            package_window: v.package_window(),
            deliver_window: v.deliver_window(),
            flow: v.flow.name().into(),
            cwnd: congestion.map(|c| c.0),
            inflight: congestion.map(|c| c.1),
            rtt_ms: congestion
                .and_then(|c| c.2)
                .map(|d| d.as_secs_f64() * 1000.0),
            streams: members.len(),
            tid: tid(v.tid()),
        });
        let mut these: Vec<StreamInfo> = members.iter().map(|s| stream_info(v, s)).collect();
        these.sort_by_key(|s| s.id);
        streams.extend(these);
    }
    Snapshot {
        process: ProcessInfo {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            uptime_secs: ctx.metrics.uptime().as_secs_f64(),
            capacity_streams: ctx.cfg.max_streams,
            open_streams: ctx.open_streams(),
            threads: thread_count(),
            threads_parked: pool.parked,
            thread_starts: pool.started,
            thread_reuses: pool.reused,
        },
        links,
        circuits,
        streams,
    }
}

/// The gauges of `/metrics`, counted from a snapshot.
fn gauges(s: &Snapshot) -> Gauges {
    fn count<K: Ord>(keys: impl Iterator<Item = K>) -> Vec<(K, usize)> {
        let mut m = BTreeMap::new();
        for k in keys {
            *m.entry(k).or_insert(0) += 1;
        }
        m.into_iter().collect()
    }
    let role = |r: &str| -> &'static str {
        if r == "client" {
            "client"
        } else {
            "exit"
        }
    };
    let mut streams = count(s.streams.iter().map(|x| (role(&x.role), x.state.clone())));
    // Every state appears, so that a scrape sees zeros rather than gaps.
    for r in ["client", "exit"] {
        if s.process.roles.iter().any(|x| x == r) {
            for st in ["OPEN", "DONE_PACKAGING", "DONE_DELIVERING", "CLOSED"] {
                let key = (r, st.to_string());
                if !streams.iter().any(|(k, _)| *k == key) {
                    streams.push((key, 0));
                }
            }
        }
    }
    streams.sort();
    Gauges {
        capacity: s.process.capacity_streams,
        threads: s.process.threads,
        threads_parked: s.process.threads_parked,
        thread_starts: s.process.thread_starts as u64,
        thread_reuses: s.process.thread_reuses as u64,
        links: count(s.links.iter().map(|l| role(&l.role))),
        circuits: count(s.circuits.iter().map(|c| role(&c.role))),
        streams,
    }
}

// ---------------------------------------------------------------- the table

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if n < 1024 {
        return n.to_string();
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

fn human_secs(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let s = s as u64;
    match s {
        0..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn opt_tid(t: Option<i32>) -> String {
    t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
}

/// The stream table for people: a summary line, then one line per stream
/// like `ss`, sorted by link, circuit and stream, columns aligned.
pub fn table(s: &Snapshot) -> String {
    let p = &s.process;
    let mut out = format!(
        "halfpipe {} pid {} ({}) up {}: {} links, {} circuits, {} streams (capacity {}), {} threads\n",
        p.version,
        p.pid,
        p.roles.join("+"),
        human_secs(p.uptime_secs),
        s.links.len(),
        s.circuits.len(),
        s.streams.len(),
        p.capacity_streams,
        p.threads,
    );
    let header = [
        "STREAM", "CIRC", "ROLE", "STATE", "TARGET", "UP", "DOWN", "PKW", "DLW", "QUEUED", "AGE",
        "IDLE", "PK_TID", "DL_TID",
    ];
    // Numbers are right-aligned, text left-aligned.
    let right = [
        false, false, false, false, false, true, true, true, true, true, true, true, true, true,
    ];
    let mut sorted: Vec<&StreamInfo> = s.streams.iter().collect();
    let circ_local = |name: &str| -> u32 {
        name.split('.')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    sorted.sort_by_key(|x| (x.link, circ_local(&x.circuit), x.id));
    // On a v2 circuit (docs/protocol.md §14) there are no stream windows:
    // the columns say whether XOFF holds the stream back instead (PKW: the
    // peer's, our packager waits; DLW: ours, our reader is not reading).
    let v2 = |circuit: &str| {
        s.circuits
            .iter()
            .any(|c| c.name == circuit && c.flow == "v2")
    };
    let xoff = |on: bool| if on { "xoff" } else { "-" }.to_string();
    let rows: Vec<Vec<String>> = sorted
        .iter()
        .map(|x| {
            let (pkw, dlw) = if v2(&x.circuit) {
                (xoff(x.xoff_received), xoff(x.xoff_sent))
            } else {
                (x.package_window.to_string(), x.deliver_window.to_string())
            };
            vec![
                x.name.clone(),
                x.circuit.clone(),
                x.role.clone(),
                x.state.clone(),
                x.target.clone(),
                human_bytes(x.bytes_packaged),
                human_bytes(x.bytes_delivered),
                pkw,
                dlw,
                x.cells_queued.to_string(),
                human_secs(x.age_secs),
                human_secs(x.idle_secs),
                opt_tid(x.packager_tid),
                opt_tid(x.deliverer_tid),
            ]
        })
        .collect();
    out.push_str(&aligned(&header, &right, &rows));
    if !s.circuits.is_empty() {
        out.push('\n');
        out.push_str(&circuit_table(&s.circuits));
    }
    if !s.links.is_empty() {
        // The links after the streams, so that a script reading the
        // stream table stops at the blank line.
        out.push('\n');
        out.push_str(&link_table(&s.links));
    }
    out
}

/// One line per circuit: its flow control (docs/protocol.md §10 or §14).
fn circuit_table(circuits: &[CircuitInfo]) -> String {
    let header = [
        "CIRC", "ROLE", "FLOW", "CWND", "INFLIGHT", "RTT", "STREAMS", "TID",
    ];
    let right = [false, false, false, true, true, true, true, true];
    let dash = |v: Option<u32>| v.map_or("-".into(), |n| n.to_string());
    let rows: Vec<Vec<String>> = circuits
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.role.clone(),
                c.flow.clone(),
                dash(c.cwnd),
                dash(c.inflight),
                c.rtt_ms.map_or("-".into(), |ms| format!("{ms:.2}ms")),
                c.streams.to_string(),
                opt_tid(c.tid),
            ]
        })
        .collect();
    aligned(&header, &right, &rows)
}

/// One line per link: where it goes and what protects it.
fn link_table(links: &[LinkInfo]) -> String {
    let header = [
        "LINK",
        "ROLE",
        "PEER",
        "CIRCS",
        "AGE",
        "TRANSPORT",
        "SUITE",
        "PEER_FINGERPRINT",
    ];
    let right = [false, false, false, true, true, false, false, false];
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = links
        .iter()
        .map(|l| {
            vec![
                l.id.to_string(),
                l.role.clone(),
                l.peer.clone(),
                l.circuits.to_string(),
                human_secs(l.age_secs),
                match &l.tls_version {
                    Some(v) => v.clone(),
                    None => l.transport.clone(),
                },
                dash(&l.cipher_suite),
                dash(&l.peer_fingerprint),
            ]
        })
        .collect();
    aligned(&header, &right, &rows)
}

/// A header and rows, columns two spaces apart: text left-aligned, the
/// columns marked in `right` right-aligned.
fn aligned(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            if right[i] {
                l.push_str(&format!("{c:>w$}", w = widths[i]));
            } else {
                l.push_str(&format!("{c:<w$}", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

// --------------------------------------------------------- the HTTP server

/// `--status ADDR`: the HTTP server on `status-http` (`ops::http`), joined
/// at shutdown.
pub struct StatusServer(http::Server);

/// Why the status server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--status {0}: not a loopback address; the status endpoint shows every stream's target, so it listens on loopback only unless --status-allow-remote is given")]
    NotLoopback(SocketAddr),
    #[error("cannot listen for status on {0}: {1}")]
    Bind(SocketAddr, io::Error),
    #[error("cannot start the status thread: {0}")]
    Thread(io::Error),
}

/// Checked before anything starts: a remote status address needs the
/// explicit flag.
pub fn check_addr(addr: SocketAddr, allow_remote: bool) -> Result<(), StartError> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(StartError::NotLoopback(addr))
    }
}

impl StatusServer {
    /// Listens on `addr` and starts `status-http`. Returns the server and
    /// the address it listens on.
    pub fn start(
        watched: Watched,
        addr: SocketAddr,
        allow_remote: bool,
    ) -> Result<(StatusServer, SocketAddr), StartError> {
        check_addr(addr, allow_remote)?;
        let listener = TcpListener::bind(addr).map_err(|e| StartError::Bind(addr, e))?;
        let local = listener
            .local_addr()
            .map_err(|e| StartError::Bind(addr, e))?;
        let handler: http::Handler = Arc::new(move |path: &str| answer(&watched, path));
        let server = http::Server::start(listener, handler).map_err(StartError::Thread)?;
        Ok((StatusServer(server), local))
    }

    /// Stops serving and joins every `status-http` thread.
    pub fn stop(self) {
        self.0.stop();
    }
}

/// The answer to a `GET` of `path`. The snapshot is taken under the
/// registries' locks; the body is built after they are released.
fn answer(watched: &Watched, path: &str) -> http::Response {
    match path {
        "/streams" => {
            let snap = snapshot(watched);
            let mut body = serde_json::to_string(&snap).unwrap_or_else(|e| {
                tracing::error!("bug: status document does not serialize: {e}");
                "{}".into()
            });
            body.push('\n');
            http::Response {
                status: 200,
                content_type: "application/json",
                body,
            }
        }
        "/metrics" => {
            let snap = snapshot(watched);
            http::Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: watched.ctx.metrics.render(&gauges(&snap)),
            }
        }
        _ => http::Response {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: "not found: try GET /streams or GET /metrics\n".to_owned(),
        },
    }
}

// ---------------------------------------------------------- halfpipe status

/// `halfpipe status`: the stream table of a running daemon.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// The daemon's status address (its --status).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADDR)]
    pub status: String,
    /// Print the raw JSON document of GET /streams instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// A blocking HTTP/1.0 GET of `path`: the body of a 200 answer.
pub fn fetch(addr: &str, path: &str) -> io::Result<String> {
    let sa = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("{addr} resolves to nothing")))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).map_err(|_| io::Error::other("answer is not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("not an HTTP answer"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(io::Error::other(format!("{path}: {status}")));
    }
    Ok(body.to_owned())
}

/// Runs `halfpipe status`; exit status 1 if the daemon cannot be asked.
pub fn main(args: &StatusArgs) -> ExitCode {
    let body = match fetch(&args.status, "/streams") {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "halfpipe: cannot read the status of a daemon at {}: {e} (is it running with --status {}?)",
                args.status, args.status
            );
            return ExitCode::from(1);
        }
    };
    if args.json {
        print!("{body}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<Snapshot>(&body) {
        Ok(snap) => {
            print!("{}", table(&snap));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "halfpipe: {} answered a document this version cannot read: {e}",
                args.status
            );
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(1000), "1000");
        assert_eq!(human_bytes(1536), "1.5K");
        assert_eq!(human_bytes(5 << 20), "5.0M");
        assert_eq!(human_secs(1.25), "1.2s");
        assert_eq!(human_secs(125.0), "2m05s");
        assert_eq!(human_secs(7500.0), "2h05m");
    }

    fn stream(name: &str, link: u32, circuit: &str, state: &str, tid: Option<i32>) -> StreamInfo {
        StreamInfo {
            name: name.into(),
            circuit: circuit.into(),
            link,
            id: name.split('.').nth(1).unwrap().parse().unwrap(),
            role: "client".into(),
            target: "example.com:80".into(),
            state: state.into(),
            close_cause: None,
            bytes_packaged: 2048,
            cells_packaged: 5,
            bytes_delivered: 10,
            cells_delivered: 1,
            cells_received: 1,
            cells_queued: 0,
            package_window: 495,
            deliver_window: 499,
            xoff_sent: false,
            xoff_received: false,
            age_secs: 75.0,
            idle_secs: 0.5,
            packager_tid: tid,
            deliverer_tid: Some(4321),
        }
    }

    #[test]
    fn table_is_sorted_by_link_circuit_stream_and_aligned() {
        let snap = Snapshot {
            process: ProcessInfo {
                pid: 42,
                version: "0".into(),
                roles: vec!["client".into()],
                uptime_secs: 3.0,
                capacity_streams: 10,
                open_streams: 3,
                threads: 9,
                threads_parked: 0,
                thread_starts: 0,
                thread_reuses: 0,
            },
            links: vec![],
            circuits: vec![],
            streams: vec![
                stream("10.2", 2, "2.10", "OPEN", Some(7)),
                stream("3.12", 1, "1.3", "DONE_PACKAGING", None),
                stream("3.9", 1, "1.3", "DONE_DELIVERING", Some(123456)),
            ],
        };
        let t = table(&snap);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("pid 42"), "{t}");
        let names: Vec<&str> = lines[2..]
            .iter()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(names, ["3.9", "3.12", "10.2"], "{t}");
        // Every column starts where its header starts (left-aligned text)
        // or ends where it ends (right-aligned numbers).
        let state = lines[1].find("STATE").unwrap();
        let dl_end = lines[1].len();
        for row in &lines[2..] {
            assert!(
                row[state..].starts_with("DONE_") || row[state..].starts_with("OPEN"),
                "{t}"
            );
            assert_eq!(row.len(), dl_end, "{t}");
        }
        assert!(lines[3].contains(" - "), "an ended thread is '-': {t}");
        assert!(
            lines[2].contains("2.0K") && lines[2].contains("1m15s"),
            "{t}"
        );
    }

    #[test]
    fn links_follow_the_streams_with_their_tls_session() {
        let link = |id: u32, tls: bool| LinkInfo {
            id,
            role: "client".into(),
            peer: "10.0.0.1:9050".into(),
            age_secs: 5.0,
            circuits: 1,
            reader_tid: Some(1),
            writer_tid: Some(2),
            transport: if tls { "tls" } else { "plain" }.into(),
            tls_version: tls.then(|| "TLSv1.3".into()),
            cipher_suite: tls.then(|| "TLS_AES_128_GCM_SHA256".into()),
            peer_fingerprint: tls.then(|| "ab".repeat(32)),
        };
        let snap = Snapshot {
            process: ProcessInfo {
                pid: 42,
                version: "0".into(),
                roles: vec!["client".into()],
                uptime_secs: 3.0,
                capacity_streams: 10,
                open_streams: 1,
                threads: 9,
                threads_parked: 0,
                thread_starts: 0,
                thread_reuses: 0,
            },
            links: vec![link(1, true), link(2, false)],
            circuits: vec![],
            streams: vec![stream("3.9", 1, "1.3", "OPEN", Some(7))],
        };
        let t = table(&snap);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[1].starts_with("STREAM") && lines[2].starts_with("3.9"),
            "{t}"
        );
        assert_eq!(lines[3], "", "{t}");
        assert!(
            lines[4].starts_with("LINK") && lines[4].ends_with("PEER_FINGERPRINT"),
            "{t}"
        );
        let tls: Vec<&str> = lines[5].split_whitespace().collect();
        assert_eq!(
            tls[5..],
            ["TLSv1.3", "TLS_AES_128_GCM_SHA256", &"ab".repeat(32)],
            "{t}"
        );
        let plain: Vec<&str> = lines[6].split_whitespace().collect();
        assert_eq!(plain[5..], ["plain", "-", "-"], "{t}");
    }

    #[test]
    fn v2_streams_show_xoff_and_circuits_their_window() {
        let circuit = |name: &str, flow: &str| CircuitInfo {
            name: name.into(),
            link: 1,
            local: 1,
            circ_id: "0x80000001".into(),
            role: "client".into(),
            age_secs: 1.0,
            package_window: 3000,
            deliver_window: 12,
            flow: flow.into(),
            cwnd: (flow == "v2").then_some(4000),
            inflight: (flow == "v2").then_some(1000),
            rtt_ms: (flow == "v2").then_some(0.5),
            streams: 1,
            tid: Some(5),
        };
        let mut held = stream("1.4", 1, "1.1", "OPEN", Some(7));
        held.xoff_sent = true;
        let snap = Snapshot {
            process: ProcessInfo {
                pid: 42,
                version: "0".into(),
                roles: vec!["client".into()],
                uptime_secs: 3.0,
                capacity_streams: 10,
                open_streams: 2,
                threads: 9,
                threads_parked: 0,
                thread_starts: 0,
                thread_reuses: 0,
            },
            links: vec![],
            circuits: vec![circuit("1.1", "v2"), circuit("1.2", "v1")],
            streams: vec![held, stream("2.9", 1, "1.2", "OPEN", Some(8))],
        };
        let t = table(&snap);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        // STREAM CIRC ROLE STATE TARGET UP DOWN PKW DLW ...
        assert_eq!(lines[2][..2], ["1.4", "1.1"], "{t}");
        assert_eq!(lines[2][7..9], ["-", "xoff"], "v2: XOFF, not windows: {t}");
        assert_eq!(lines[3][7..9], ["495", "499"], "v1: the windows: {t}");
        assert_eq!(lines[5][..3], ["CIRC", "ROLE", "FLOW"], "{t}");
        assert_eq!(
            lines[6],
            ["1.1", "client", "v2", "4000", "1000", "0.50ms", "1", "5"],
            "{t}"
        );
        assert_eq!(
            lines[7],
            ["1.2", "client", "v1", "-", "-", "-", "1", "5"],
            "{t}"
        );
    }

    #[test]
    fn remote_status_needs_the_flag() {
        let lo: SocketAddr = "127.0.0.1:9051".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9051".parse().unwrap();
        assert!(check_addr(lo, false).is_ok());
        assert!(check_addr("[::1]:9051".parse().unwrap(), false).is_ok());
        assert!(check_addr(any, false).is_err());
        assert!(check_addr(any, true).is_ok());
    }
}
