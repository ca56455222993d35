//! The report: its JSON schema, the human tables, and the comparison
//! document and tables that `scripts/compare.sh` writes.
//!
//! `halfpipe-bench --json` prints one [`Report`]; `--combine` wraps several
//! into a [`Compare`] document, which `--markdown` and `--plot` read (they
//! also take a single report). Field names carry their units. Every
//! transfer has `verified`: its byte count and CRC-32 matched at both ends.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

pub const SCHEMA: &str = "halfpipe-bench/1";
pub const COMPARE_SCHEMA: &str = "halfpipe-compare/1";

/// The stream window (docs/protocol.md §10) and a DATA cell's payload (§4).
pub const WINDOW_CELLS: u64 = 500;
pub const CELL_DATA_BYTES: u64 = 498;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Report {
    pub schema: String,
    /// What was measured ("direct", "ssh -D", "halfpipe run", ...).
    pub label: String,
    /// "socks" or "direct".
    pub mode: String,
    /// The SOCKS5 proxy (socks mode).
    pub proxy: Option<String>,
    /// The TCP relay connected to instead of the targets (direct mode).
    pub via: Option<String>,
    /// When the run started, RFC 3339 UTC.
    pub date: String,
    pub machine: Machine,
    pub params: Params,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<Bulk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<Parallel>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup: Vec<Setup>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hold: Vec<Hold>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow: Option<Slow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt: Option<Rtt>,
    /// Measured with the setup scenario.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_life: Option<ThreadLife>,
    /// Scenarios that failed or did not verify, one line each.
    #[serde(default)]
    pub errors: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Machine {
    pub hostname: String,
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Params {
    pub scenarios: Vec<String>,
    pub size_mib: u64,
    pub streams: usize,
    pub concurrency: Vec<usize>,
    pub count: usize,
    pub duration_s: Option<f64>,
    pub request_bytes: usize,
    pub reply_bytes: usize,
    pub hold: Vec<usize>,
    pub pids: Vec<u32>,
    pub delay_ms: u64,
    pub rtt_size_mib: u64,
}

/// One stream's transfer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Transfer {
    pub bytes: u64,
    pub seconds: f64,
    pub mib_s: f64,
    /// CRC-32 of the bytes, as both ends computed it (hex).
    pub crc32: String,
    pub verified: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Bulk {
    pub size_mib: u64,
    /// Client to target (the sink).
    pub upload: Transfer,
    /// Target (the source) to client.
    pub download: Transfer,
}

/// Several streams at once, started together.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Flows {
    pub streams: usize,
    /// All streams' bytes.
    pub bytes: u64,
    /// From the common start to the last stream's last byte.
    pub seconds: f64,
    pub aggregate_mib_s: f64,
    /// Jain's index over `per_stream_mib_s`.
    pub fairness: f64,
    /// Each stream's rate while all of them were running (from the common
    /// start until the first stream finished).
    pub per_stream_mib_s: Vec<f64>,
    pub verified: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Parallel {
    pub streams: usize,
    pub upload: Flows,
    pub download: Flows,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Half-closed request/response streams at one concurrency.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Setup {
    pub concurrency: usize,
    /// Streams that completed and verified.
    pub completed: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub streams_per_s: f64,
    /// Connect (including the SOCKS handshake) to the reply's EOF.
    pub latency_us: Latency,
    /// CPU time (user + system) the `--pid` processes and their children
    /// spent per stream during the level, warm-up streams included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_cpu_us_per_stream: Option<f64>,
    /// CPU time the bench itself (clients and target servers) spent per
    /// stream during the level, on the same cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bench_cpu_us_per_stream: Option<f64>,
}

/// What starting, running and joining one empty named thread costs on this
/// machine (measured by the bench itself, one thread after the other):
/// the floor under a design that starts threads for every stream.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct ThreadLife {
    pub threads: usize,
    /// CPU time (user + system) of the bench process per thread.
    pub cpu_us: f64,
    /// Wall time per thread.
    pub wall_us: f64,
    /// One hand-off between two threads through halfpipe's inbox
    /// (`inbox::Inbox`): a message to a sleeping thread, until it runs.
    /// Half a ping-pong round trip, median of rounds.
    #[serde(default)]
    pub handoff_us: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub threads: u64,
    pub processes: u64,
}

/// One `--pid` (with its descendants) in the hold scenario.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProcessHold {
    pub pid: u32,
    pub name: String,
    pub before: Usage,
    pub held: Usage,
    pub after_close: Usage,
    pub rss_kib_per_stream: f64,
    pub pss_kib_per_stream: f64,
    pub threads_per_stream: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Hold {
    /// Streams asked for.
    pub streams: usize,
    pub opened: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    /// Held streams that echoed a byte end to end before closing.
    pub echo_checked: usize,
    pub open_seconds: f64,
    /// Sums over all `--pid`s.
    pub before: Usage,
    pub held: Usage,
    pub after_close: Usage,
    pub rss_kib_per_stream: f64,
    pub pss_kib_per_stream: f64,
    pub threads_per_stream: f64,
    pub processes: Vec<ProcessHold>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Slow {
    /// Bulk streams besides the stalled one.
    pub streams: usize,
    pub without_stalled: Flows,
    pub with_stalled: Flows,
    /// with / without aggregate throughput (1.0: the stall costs nothing).
    pub kept: f64,
    /// What the stalled stream's target managed to send before it blocked:
    /// what the path buffers for a reader that stopped.
    pub stalled_bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Rtt {
    pub delay_ms: u64,
    /// The daemons' `--flow`: "v1" is held to the window limit below, "v2"
    /// is not (docs/protocol.md §14).
    #[serde(default)]
    pub flow: String,
    /// Round trip through the delay relay, measured (echo, median).
    pub rtt_ms: f64,
    pub window_cells: u64,
    pub cell_data_bytes: u64,
    /// 500 cells x 498 bytes per 2 x delay.
    pub limit_mib_s: f64,
    /// The same per measured round trip.
    pub limit_measured_rtt_mib_s: f64,
    /// Through halfpipe client + exit with the relay on their link.
    pub upload: Transfer,
    pub download: Transfer,
    pub upload_vs_limit: f64,
    pub download_vs_limit: f64,
    /// Plain TCP through the same relay: what the relay itself allows.
    pub relay_only: Transfer,
}

/// Several runs side by side (`--combine`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Compare {
    pub schema: String,
    pub date: String,
    pub machine: Machine,
    #[serde(default)]
    pub notes: Vec<String>,
    pub runs: Vec<Report>,
}

impl Compare {
    /// Reads a compare document, or a single report as a one-run document.
    pub fn from_json(text: &str) -> Result<Compare, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        match v.get("schema").and_then(|s| s.as_str()) {
            Some(COMPARE_SCHEMA) => serde_json::from_value(v).map_err(|e| e.to_string()),
            Some(SCHEMA) => {
                let r: Report = serde_json::from_value(v).map_err(|e| e.to_string())?;
                Ok(Compare {
                    schema: COMPARE_SCHEMA.into(),
                    date: r.date.clone(),
                    machine: r.machine.clone(),
                    notes: Vec::new(),
                    runs: vec![r],
                })
            }
            other => Err(format!("not a halfpipe bench document (schema {other:?})")),
        }
    }
}

// ---------------------------------------------------------------- tables

/// A plain table: aligned text for people, or Markdown.
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn text(&self) -> String {
        let mut width: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < width.len() {
                    width[i] = width[i].max(c.chars().count());
                }
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let w = width.get(i).copied().unwrap_or(0);
                if i == 0 {
                    let _ = write!(s, "{c:<w$}");
                } else {
                    let _ = write!(s, "  {c:>w$}");
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(&self.head);
        for r in &self.rows {
            out += &line(r);
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("| {} |\n", self.head.join(" | "));
        out += &format!(
            "|{}\n",
            self.head
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for r in &self.rows {
            out += &format!("| {} |\n", r.join(" | "));
        }
        out
    }
}

fn f1(v: f64) -> String {
    format!("{v:.1}")
}

fn f3(v: f64) -> String {
    format!("{v:.3}")
}

fn ok(verified: bool) -> String {
    if verified { "yes" } else { "NO" }.into()
}

// ----------------------------------------------------- one run, for people

pub fn bulk_text(b: &Bulk) -> String {
    let mut t = Table::new(&["bulk", "MiB", "seconds", "MiB/s", "crc32", "verified"]);
    for (name, x) in [("upload", &b.upload), ("download", &b.download)] {
        t.row(vec![
            name.into(),
            format!("{:.0}", x.bytes as f64 / super::stats::MIB),
            f3(x.seconds),
            f1(x.mib_s),
            x.crc32.clone(),
            ok(x.verified),
        ]);
    }
    t.text()
}

fn flows_row(name: &str, f: &Flows) -> Vec<String> {
    let per = &f.per_stream_mib_s;
    let min = per.iter().copied().fold(f64::INFINITY, f64::min);
    let max = per.iter().copied().fold(0.0, f64::max);
    vec![
        name.into(),
        f.streams.to_string(),
        f1(f.aggregate_mib_s),
        f3(f.fairness),
        if per.is_empty() {
            "-".into()
        } else {
            format!("{min:.1}..{max:.1}")
        },
        ok(f.verified),
    ]
}

pub fn parallel_text(p: &Parallel) -> String {
    let mut t = Table::new(&[
        "parallel",
        "streams",
        "aggregate MiB/s",
        "fairness",
        "per stream MiB/s",
        "verified",
    ]);
    t.row(flows_row("upload", &p.upload));
    t.row(flows_row("download", &p.download));
    t.text()
}

pub fn setup_text(s: &[Setup]) -> String {
    let mut t = Table::new(&[
        "setup",
        "streams",
        "errors",
        "streams/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "max us",
        "proxy CPU us/stream",
        "bench CPU us/stream",
    ]);
    for x in s {
        t.row(vec![
            format!("concurrency {}", x.concurrency),
            x.completed.to_string(),
            x.errors.to_string(),
            format!("{:.0}", x.streams_per_s),
            f1(x.latency_us.p50),
            f1(x.latency_us.p90),
            f1(x.latency_us.p99),
            f1(x.latency_us.max),
            x.proxy_cpu_us_per_stream
                .map_or("-".into(), |v| format!("{v:.0}")),
            x.bench_cpu_us_per_stream
                .map_or("-".into(), |v| format!("{v:.0}")),
        ]);
    }
    let mut out = t.text();
    for x in s {
        if let Some(e) = &x.first_error {
            let _ = writeln!(out, "  concurrency {}: first error: {e}", x.concurrency);
        }
    }
    out
}

pub fn hold_text(h: &[Hold]) -> String {
    let mut t = Table::new(&[
        "hold",
        "opened",
        "failed",
        "echoed",
        "RSS KiB before",
        "held",
        "after close",
        "RSS KiB/stream",
        "threads before",
        "held",
        "after close",
        "threads/stream",
    ]);
    for x in h {
        t.row(vec![
            format!("{} streams, all pids", x.streams),
            x.opened.to_string(),
            x.failed.to_string(),
            x.echo_checked.to_string(),
            x.before.rss_kib.to_string(),
            x.held.rss_kib.to_string(),
            x.after_close.rss_kib.to_string(),
            f1(x.rss_kib_per_stream),
            x.before.threads.to_string(),
            x.held.threads.to_string(),
            x.after_close.threads.to_string(),
            format!("{:.2}", x.threads_per_stream),
        ]);
        for p in &x.processes {
            t.row(vec![
                format!("  pid {} ({})", p.pid, p.name),
                String::new(),
                String::new(),
                String::new(),
                p.before.rss_kib.to_string(),
                p.held.rss_kib.to_string(),
                p.after_close.rss_kib.to_string(),
                f1(p.rss_kib_per_stream),
                p.before.threads.to_string(),
                p.held.threads.to_string(),
                p.after_close.threads.to_string(),
                format!("{:.2}", p.threads_per_stream),
            ]);
        }
    }
    let mut out = t.text();
    for x in h {
        if let Some(e) = &x.first_error {
            let _ = writeln!(out, "  {} streams: first error: {e}", x.streams);
        }
    }
    out
}

pub fn slow_text(s: &Slow) -> String {
    let mut t = Table::new(&[
        "slow reader",
        "streams",
        "aggregate MiB/s",
        "fairness",
        "per stream MiB/s",
        "verified",
    ]);
    t.row(flows_row("without stalled", &s.without_stalled));
    t.row(flows_row("with stalled", &s.with_stalled));
    let mut out = t.text();
    let _ = writeln!(
        out,
        "  kept {:.1}% of the throughput with one stalled reader ({} bytes buffered for it)",
        s.kept * 100.0,
        s.stalled_bytes
    );
    out
}

pub fn rtt_text(r: &Rtt) -> String {
    let mut t = Table::new(&["rtt", "MiB", "seconds", "MiB/s", "of v1 limit", "verified"]);
    for (name, x, vs) in [
        ("upload", &r.upload, Some(r.upload_vs_limit)),
        ("download", &r.download, Some(r.download_vs_limit)),
        ("relay only (TCP)", &r.relay_only, None),
    ] {
        t.row(vec![
            name.into(),
            format!("{:.0}", x.bytes as f64 / super::stats::MIB),
            f3(x.seconds),
            f1(x.mib_s),
            vs.map_or("-".into(), |v| format!("{:.1}%", v * 100.0)),
            ok(x.verified),
        ]);
    }
    let mut out = format!(
        "rtt: flow {}, delay {} ms each way, measured round trip {:.2} ms; v1's window limit {} cells x {} B / RTT = {:.1} MiB/s ({:.1} MiB/s at the measured RTT)\n",
        r.flow,
        r.delay_ms,
        r.rtt_ms,
        r.window_cells,
        r.cell_data_bytes,
        r.limit_mib_s,
        r.limit_measured_rtt_mib_s
    );
    out += &t.text();
    out
}

// ----------------------------------------------------- side by side (md)

/// The run that is plain TCP straight to the targets.
fn direct_run(c: &Compare) -> Option<&Report> {
    c.runs
        .iter()
        .find(|r| r.mode == "direct" && r.via.is_none())
}

/// The socat chain run (by its label).
fn socat_run(c: &Compare) -> Option<&Report> {
    c.runs
        .iter()
        .find(|r| r.label.to_lowercase().contains("socat"))
}

/// Threads halfpipe starts per stream: the client's SOCKS handshake
/// thread, packager and deliverer, and the exit's packager and deliverer.
pub const HALFPIPE_THREADS_PER_STREAM: usize = 5;

/// Thread hand-offs a half-closed request/response stream through halfpipe
/// client + exit waits for, beyond what direct TCP waits for: SOCKS greeting
/// (2), CONNECT to the SOCKS reply (socks thread, circuit, link writer,
/// exit link reader, exit circuit, exit packager, exit link writer, link
/// reader, circuit, deliverer, application: 11), request to reply (client
/// packager, link writer, exit link reader, exit circuit, exit deliverer;
/// then exit packager, exit link writer, link reader, circuit, deliverer:
/// 10), less the 1 direct TCP also has. Two of them start a task (the
/// SOCKS handshake, the exit's packager): a thread start when no parked
/// thread is free, else one more hand-off.
pub const HALFPIPE_EXTRA_HANDOFFS: usize = 22;

/// What the cost of a thread's life and of a hand-off mean for halfpipe's
/// setup rate and latency.
pub fn thread_floor(l: &ThreadLife, cores: usize) -> String {
    let per_stream = l.cpu_us * HALFPIPE_THREADS_PER_STREAM as f64;
    let mut s = format!(
        "A thread's life (start, run nothing, join; {} threads one after the other) costs {:.1} us of CPU here ({:.1} us wall). \
         halfpipe runs {HALFPIPE_THREADS_PER_STREAM} tasks per stream (client: SOCKS handshake, packager, deliverer; exit: packager, deliverer), each on a parked thread when one is free: \
         started afresh they would cost {per_stream:.0} us of CPU per stream before any other work",
        l.threads, l.cpu_us, l.wall_us
    );
    if cores > 0 && per_stream > 0.0 {
        let _ = write!(
            s,
            ", which would cap {cores} cores at {:.0} streams/s however little else it did.",
            cores as f64 * 1e6 / per_stream
        );
    } else {
        s.push('.');
    }
    if l.handoff_us > 0.0 {
        let floor = (HALFPIPE_EXTRA_HANDOFFS - 2) as f64 * l.handoff_us + 2.0 * l.wall_us;
        let _ = write!(
            s,
            " A hand-off to a sleeping thread takes {:.1} us (median); a request/response stream waits for about {HALFPIPE_EXTRA_HANDOFFS} more hand-offs \
             than direct TCP, two of them task starts: about {floor:.0} us added at concurrency 1 when nothing else runs and those two start threads \
             (less when they take parked ones).",
            l.handoff_us
        );
    }
    s
}

fn ratio(v: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".into(),
    }
}

/// The comparison as Markdown: one table per scenario, each throughput
/// with its ratio to direct TCP and to the socat chain.
pub fn markdown(c: &Compare) -> String {
    let direct = direct_run(c);
    let socat = socat_run(c);
    let mut out = String::new();
    let m = &c.machine;
    let _ = writeln!(out, "# halfpipe comparison\n");
    let _ = writeln!(
        out,
        "{} on {} ({}, {} cores, Linux {}). Generated by `scripts/compare.sh` with `halfpipe-bench`; see docs/performance.md.\n",
        c.date, m.hostname, m.cpu, m.cores, m.kernel
    );
    for n in &c.notes {
        let _ = writeln!(out, "- {n}");
    }
    if !c.notes.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "Ratios: \"x direct\" divides by plain TCP to the same targets, \"x socat\" by the chain of two socat relays.\n"
    );

    // bulk
    let mut t = Table::new(&[
        "implementation",
        "upload MiB/s",
        "x direct",
        "x socat",
        "download MiB/s",
        "x direct",
        "x socat",
        "verified",
    ]);
    let (du, dd) = direct
        .and_then(|r| r.bulk.as_ref())
        .map_or((None, None), |b| {
            (Some(b.upload.mib_s), Some(b.download.mib_s))
        });
    let (su, sd) = socat
        .and_then(|r| r.bulk.as_ref())
        .map_or((None, None), |b| {
            (Some(b.upload.mib_s), Some(b.download.mib_s))
        });
    let mut size = 0;
    for r in &c.runs {
        if let Some(b) = &r.bulk {
            size = b.size_mib;
            t.row(vec![
                r.label.clone(),
                f1(b.upload.mib_s),
                ratio(b.upload.mib_s, du),
                ratio(b.upload.mib_s, su),
                f1(b.download.mib_s),
                ratio(b.download.mib_s, dd),
                ratio(b.download.mib_s, sd),
                ok(b.upload.verified && b.download.verified),
            ]);
        }
    }
    if !t.is_empty() {
        let _ = writeln!(
            out,
            "## bulk: one stream, {size} MiB each way\n\n{}",
            t.markdown()
        );
    }

    // parallel
    let mut t = Table::new(&[
        "implementation",
        "upload MiB/s",
        "x direct",
        "x socat",
        "fairness",
        "download MiB/s",
        "x direct",
        "x socat",
        "fairness",
        "verified",
    ]);
    let base = |r: Option<&Report>| {
        r.and_then(|r| r.parallel.as_ref())
            .map_or((None, None), |p| {
                (
                    Some(p.upload.aggregate_mib_s),
                    Some(p.download.aggregate_mib_s),
                )
            })
    };
    let ((du, dd), (su, sd)) = (base(direct), base(socat));
    let mut streams = 0;
    for r in &c.runs {
        if let Some(p) = &r.parallel {
            streams = p.streams;
            t.row(vec![
                r.label.clone(),
                f1(p.upload.aggregate_mib_s),
                ratio(p.upload.aggregate_mib_s, du),
                ratio(p.upload.aggregate_mib_s, su),
                f3(p.upload.fairness),
                f1(p.download.aggregate_mib_s),
                ratio(p.download.aggregate_mib_s, dd),
                ratio(p.download.aggregate_mib_s, sd),
                f3(p.download.fairness),
                ok(p.upload.verified && p.download.verified),
            ]);
        }
    }
    if !t.is_empty() {
        let _ = writeln!(
            out,
            "## parallel: {streams} streams at once (aggregate; Jain's fairness index)\n\n{}",
            t.markdown()
        );
    }

    // setup
    let mut t = Table::new(&[
        "implementation",
        "concurrency",
        "streams/s",
        "x direct",
        "x socat",
        "p50 us",
        "p50 over direct us",
        "p90 us",
        "p99 us",
        "max us",
        "proxy CPU us/stream",
        "bench CPU us/stream",
        "errors",
    ]);
    let find = |r: Option<&Report>, conc: usize| {
        r.and_then(|r| r.setup.iter().find(|s| s.concurrency == conc))
            .cloned()
    };
    for r in &c.runs {
        for s in &r.setup {
            let d = find(direct, s.concurrency);
            let so = find(socat, s.concurrency);
            t.row(vec![
                r.label.clone(),
                s.concurrency.to_string(),
                format!("{:.0}", s.streams_per_s),
                ratio(s.streams_per_s, d.as_ref().map(|d| d.streams_per_s)),
                ratio(s.streams_per_s, so.as_ref().map(|d| d.streams_per_s)),
                f1(s.latency_us.p50),
                d.map_or("-".into(), |d| f1(s.latency_us.p50 - d.latency_us.p50)),
                f1(s.latency_us.p90),
                f1(s.latency_us.p99),
                f1(s.latency_us.max),
                s.proxy_cpu_us_per_stream
                    .map_or("-".into(), |v| format!("{v:.0}")),
                s.bench_cpu_us_per_stream
                    .map_or("-".into(), |v| format!("{v:.0}")),
                s.errors.to_string(),
            ]);
        }
    }
    if !t.is_empty() {
        let _ = writeln!(
            out,
            "## setup: half-closed request/response streams (connect, request, shutdown(SHUT_WR), reply to EOF)\n\n{}",
            t.markdown()
        );
        if let Some(l) = c.runs.iter().find_map(|r| r.thread_life) {
            let _ = writeln!(
                out,
                "{}\n",
                thread_floor(&l, c.runs.first().map_or(0, |r| r.machine.cores))
            );
        }
    }

    // hold
    let mut t = Table::new(&[
        "implementation",
        "streams",
        "opened",
        "RSS KiB/stream",
        "PSS KiB/stream",
        "threads/stream",
        "per process: RSS KiB/stream",
        "threads after close",
    ]);
    for r in &c.runs {
        for h in &r.hold {
            let per: Vec<String> = h
                .processes
                .iter()
                .map(|p| format!("{} {:.1}", p.name, p.rss_kib_per_stream))
                .collect();
            t.row(vec![
                r.label.clone(),
                h.streams.to_string(),
                h.opened.to_string(),
                f1(h.rss_kib_per_stream),
                f1(h.pss_kib_per_stream),
                format!("{:.2}", h.threads_per_stream),
                if per.is_empty() {
                    "-".into()
                } else {
                    per.join(", ")
                },
                format!("{} (before {})", h.after_close.threads, h.before.threads),
            ]);
        }
    }
    if !t.is_empty() {
        let _ = writeln!(
            out,
            "## hold: idle streams, cost in the proxy processes (with their children)\n\n{}",
            t.markdown()
        );
    }

    // slow
    let mut t = Table::new(&[
        "implementation",
        "streams",
        "without stalled MiB/s",
        "with stalled MiB/s",
        "kept",
        "buffered for the stalled reader",
        "verified",
    ]);
    for r in &c.runs {
        if let Some(s) = &r.slow {
            t.row(vec![
                r.label.clone(),
                s.streams.to_string(),
                f1(s.without_stalled.aggregate_mib_s),
                f1(s.with_stalled.aggregate_mib_s),
                format!("{:.1}%", s.kept * 100.0),
                format!("{:.0} KiB", s.stalled_bytes as f64 / 1024.0),
                ok(s.without_stalled.verified && s.with_stalled.verified),
            ]);
        }
    }
    if !t.is_empty() {
        let _ = writeln!(
            out,
            "## slow reader: bulk streams with and without one stalled stream beside them\n\n{}",
            t.markdown()
        );
    }

    // rtt
    let mut t = Table::new(&[
        "implementation",
        "delay each way",
        "measured RTT",
        "v1 window limit MiB/s",
        "upload MiB/s",
        "of v1 limit",
        "download MiB/s",
        "of v1 limit",
        "relay only (TCP) MiB/s",
    ]);
    for r in &c.runs {
        if let Some(x) = &r.rtt {
            t.row(vec![
                r.label.clone(),
                format!("{} ms", x.delay_ms),
                format!("{:.2} ms", x.rtt_ms),
                f1(x.limit_mib_s),
                f1(x.upload.mib_s),
                format!("{:.1}%", x.upload_vs_limit * 100.0),
                f1(x.download.mib_s),
                format!("{:.1}%", x.download_vs_limit * 100.0),
                f1(x.relay_only.mib_s),
            ]);
        }
    }
    if !t.is_empty() {
        let _ = writeln!(
            out,
            "## rtt: one stream through halfpipe client + exit with a delay relay on their link\n\nThe window limit is {WINDOW_CELLS} cells x {CELL_DATA_BYTES} bytes per round trip (2 x delay), protocol.md §10.\n\n{}",
            t.markdown()
        );
    }

    let errors: Vec<String> = c
        .runs
        .iter()
        .flat_map(|r| r.errors.iter().map(move |e| format!("{}: {e}", r.label)))
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "## errors\n");
        for e in errors {
            let _ = writeln!(out, "- {e}");
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report with every scenario filled in.
    pub(crate) fn sample() -> Report {
        let t = Transfer {
            bytes: 4 << 20,
            seconds: 0.5,
            mib_s: 8.0,
            crc32: "0badf00d".into(),
            verified: true,
        };
        let f = Flows {
            streams: 2,
            bytes: 8 << 20,
            seconds: 0.25,
            aggregate_mib_s: 32.0,
            fairness: 0.75,
            per_stream_mib_s: vec![16.0, 8.0],
            verified: true,
        };
        let u = Usage {
            rss_kib: 1024,
            pss_kib: 512,
            threads: 8,
            processes: 1,
        };
        Report {
            schema: SCHEMA.into(),
            label: "test".into(),
            mode: "socks".into(),
            proxy: Some("127.0.0.1:1080".into()),
            via: None,
            date: "2025-01-01T00:00:00Z".into(),
            machine: Machine {
                hostname: "h".into(),
                cpu: "c".into(),
                cores: 2,
                kernel: "6.1".into(),
            },
            params: Params {
                scenarios: vec!["bulk".into()],
                size_mib: 4,
                streams: 2,
                concurrency: vec![1, 32],
                count: 10,
                duration_s: Some(1.5),
                request_bytes: 128,
                reply_bytes: 1024,
                hold: vec![10],
                pids: vec![1],
                delay_ms: 5,
                rtt_size_mib: 8,
            },
            bulk: Some(Bulk {
                size_mib: 4,
                upload: t.clone(),
                download: t.clone(),
            }),
            parallel: Some(Parallel {
                streams: 2,
                upload: f.clone(),
                download: f.clone(),
            }),
            setup: vec![Setup {
                concurrency: 1,
                completed: 10,
                errors: 0,
                first_error: None,
                seconds: 0.5,
                streams_per_s: 20.0,
                latency_us: Latency {
                    p50: 1.5,
                    p90: 2.5,
                    p99: 3.5,
                    max: 4.5,
                    mean: 2.0,
                },
                proxy_cpu_us_per_stream: Some(250.0),
                bench_cpu_us_per_stream: Some(100.0),
            }],
            hold: vec![Hold {
                streams: 10,
                opened: 10,
                failed: 0,
                first_error: Some("x".into()),
                echo_checked: 10,
                open_seconds: 0.125,
                before: u,
                held: u,
                after_close: u,
                rss_kib_per_stream: 0.5,
                pss_kib_per_stream: 0.25,
                threads_per_stream: 2.0,
                processes: vec![ProcessHold {
                    pid: 1,
                    name: "halfpipe".into(),
                    before: u,
                    held: u,
                    after_close: u,
                    rss_kib_per_stream: 0.5,
                    pss_kib_per_stream: 0.25,
                    threads_per_stream: 2.0,
                }],
            }],
            slow: Some(Slow {
                streams: 2,
                without_stalled: f.clone(),
                with_stalled: f,
                kept: 1.0,
                stalled_bytes: 123,
            }),
            rtt: Some(Rtt {
                delay_ms: 5,
                flow: "v1".into(),
                rtt_ms: 10.5,
                window_cells: WINDOW_CELLS,
                cell_data_bytes: CELL_DATA_BYTES,
                limit_mib_s: 23.75,
                limit_measured_rtt_mib_s: 22.5,
                upload: t.clone(),
                download: t.clone(),
                upload_vs_limit: 0.875,
                download_vs_limit: 0.875,
                relay_only: t,
            }),
            thread_life: Some(ThreadLife {
                threads: 100,
                cpu_us: 40.0,
                wall_us: 50.0,
                handoff_us: 10.0,
            }),
            errors: vec![],
        }
    }

    #[test]
    fn report_json_round_trips() {
        let r = sample();
        let text = serde_json::to_string_pretty(&r).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        // Field names are the documented ones.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in [
            "schema",
            "label",
            "mode",
            "date",
            "machine",
            "params",
            "bulk",
            "parallel",
            "setup",
            "hold",
            "slow",
            "rtt",
            "thread_life",
            "errors",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["bulk"]["upload"]["verified"], true);
        assert_eq!(v["setup"][0]["latency_us"]["p99"], 3.5);
    }

    #[test]
    fn the_thread_floor_follows_from_the_measurements() {
        let l = ThreadLife {
            threads: 100,
            cpu_us: 40.0,
            wall_us: 50.0,
            handoff_us: 10.0,
        };
        let text = thread_floor(&l, 4);
        // 5 threads x 40 us; 4 cores / 200 us; 20 hand-offs x 10 + 2 starts x 50.
        for want in [
            "200 us of CPU per stream",
            "at 20000 streams/s",
            "about 300 us added",
        ] {
            assert!(text.contains(want), "{want:?} not in {text:?}");
        }
        let unmeasured = thread_floor(
            &ThreadLife {
                handoff_us: 0.0,
                ..l
            },
            0,
        );
        assert!(!unmeasured.contains("hand-off") && !unmeasured.contains("streams/s"));
    }

    #[test]
    fn absent_scenarios_are_left_out() {
        let mut r = sample();
        r.bulk = None;
        r.setup.clear();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert!(v.get("bulk").is_none() && v.get("setup").is_none());
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn compare_reads_both_documents() {
        let r = sample();
        let one = Compare::from_json(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(one.runs, vec![r.clone()]);
        let mut direct = r.clone();
        direct.label = "direct".into();
        direct.mode = "direct".into();
        let c = Compare {
            schema: COMPARE_SCHEMA.into(),
            date: r.date.clone(),
            machine: r.machine.clone(),
            notes: vec!["a note".into()],
            runs: vec![direct, r],
        };
        let text = serde_json::to_string(&c).unwrap();
        let back = Compare::from_json(&text).unwrap();
        assert_eq!(back, c);
        let md = markdown(&back);
        assert!(md.contains("| test | 8.0 | 1.00 | - |"), "{md}");
        assert!(md.contains("a note"));
        assert!(Compare::from_json("{\"schema\":\"x\"}").is_err());
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["a", "bb"]);
        t.row(vec!["long name".into(), "1".into()]);
        assert_eq!(t.text(), "a          bb\nlong name   1\n");
        assert_eq!(t.markdown(), "| a | bb |\n|---|---:|\n| long name | 1 |\n");
    }
}
