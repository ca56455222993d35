//! `halfpipe-bench`: the load generator and comparison tools
//! (docs/performance.md).
//!
//! It runs its own target servers on loopback ([`targets`]) and reaches
//! them through any SOCKS5 proxy (`--socks`, [`socks`]) or over plain TCP
//! (`--direct`, optionally through a TCP relay chain with `--via`). The
//! scenarios are in [`scenarios`] and [`rtt`]; every byte they move is
//! counted and hashed at both ends. [`report`] holds the JSON schema and the
//! tables, [`plot`] the SVG chart.
//!
//! | module | concern |
//! |---|---|
//! | `targets` | sink, source, echo and request/response servers; the hold target |
//! | `socks` | a minimal SOCKS5 CONNECT client |
//! | `scenarios` | bulk, parallel, setup, hold, slow |
//! | `rtt` | the rtt scenario: halfpipe client + exit with a delay relay on their link |
//! | `soak` | `halfpipe-bench soak`: many half-closed streams for a long time, every byte and the daemons' counts checked |
//! | `relay` | the delay relay |
//! | `procfs` | RSS and threads of the daemons; the machine |
//! | `stats` | throughput, percentiles, Jain's index |
//! | `report` | JSON schema, tables, the side-by-side Markdown |
//! | `plot` | the comparison chart (SVG) |

mod plot;
mod procfs;
mod relay;
pub mod report;
mod rtt;
mod scenarios;
mod soak;
mod socks;
mod stats;
mod targets;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use report::{Compare, Report, COMPARE_SCHEMA, SCHEMA};
use std::io::{self, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use targets::{Header, Kind, Registry, Targets};

/// `halfpipe-bench`: measure a SOCKS5 proxy (or plain TCP) on loopback.
#[derive(Parser, Debug)]
#[command(
    name = "halfpipe-bench",
    version,
    about = "Benchmark a SOCKS5 proxy or plain TCP on loopback; compare and plot",
    long_about = "Measure a SOCKS5 proxy (--socks ADDR) or plain TCP (--direct) against \
        target servers the bench runs itself on loopback. Scenarios: bulk, parallel, \
        setup, hold, slow, rtt (docs/performance.md). Every byte is counted and \
        hashed at both ends.\n\n\
        Report tools: --combine A.json B.json... (one comparison document on stdout), \
        --markdown IN.json (side-by-side tables), --plot IN.json OUT.svg (chart).",
    args_conflicts_with_subcommands = true
)]
pub struct BenchArgs {
    /// `halfpipe-bench soak ...`: a run of its own (see its --help).
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// Go through this SOCKS5 proxy (halfpipe, ssh -D, ...).
    #[arg(long, value_name = "ADDR", conflicts_with = "direct")]
    pub socks: Option<SocketAddr>,
    /// Plain TCP to the targets: the limit.
    #[arg(long)]
    pub direct: bool,
    /// With --direct: connect to this TCP relay (a socat chain, say) instead
    /// of to the targets; it must forward to --target-listen.
    #[arg(long, value_name = "ADDR", requires = "direct")]
    pub via: Option<SocketAddr>,
    /// Where the bench's target servers listen.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub target_listen: SocketAddr,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub scenario: Vec<Scenario>,
    /// bulk, parallel and slow: MiB per direction (parallel and slow split
    /// it across their streams).
    #[arg(long, value_name = "MiB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub size: u64,
    /// parallel and slow: concurrent bulk streams.
    #[arg(long, value_name = "K", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub streams: u64,
    /// setup: concurrency levels, comma-separated.
    #[arg(long, value_name = "C", value_delimiter = ',', default_value = "1,32")]
    pub concurrency: Vec<usize>,
    /// setup: request/response streams per concurrency level.
    #[arg(long, value_name = "N", default_value_t = 5000)]
    pub count: usize,
    /// setup: run each level for this long instead of --count.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// hold: idle streams to open, comma-separated (1000; 10000 when asked).
    #[arg(long, value_name = "C", value_delimiter = ',', default_value = "1000")]
    pub hold: Vec<usize>,
    /// hold: a daemon process to measure (with its children); repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// rtt: delay the relay adds each way, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub delay_ms: u64,
    /// rtt: MiB per direction.
    #[arg(long, value_name = "MiB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub rtt_size: u64,
    /// rtt: the flow control both daemons use (`--flow` of halfpipe: v2,
    /// its default, or v1, which the window limit in the report is about).
    #[arg(long, value_name = "V", default_value = "v2", value_parser = ["v1", "v2"])]
    pub flow: String,
    /// A name for this run in reports and charts.
    #[arg(long)]
    pub label: Option<String>,
    /// Print one JSON document on stdout (and no progress).
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the proxy to carry a first stream.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub wait: Duration,

    /// Render the chart of a report or comparison document as SVG.
    #[arg(long, num_args = 2, value_names = ["IN.json", "OUT.svg"], conflicts_with_all = ["socks", "direct", "combine", "markdown"])]
    pub plot: Option<Vec<PathBuf>>,
    /// Print the side-by-side tables of a comparison document as Markdown.
    #[arg(long, value_name = "IN.json", conflicts_with_all = ["socks", "direct", "combine"])]
    pub markdown: Option<PathBuf>,
    /// Combine reports (`--json` outputs) into one comparison document on
    /// stdout.
    #[arg(long, num_args = 1.., value_name = "IN.json", conflicts_with_all = ["socks", "direct"])]
    pub combine: Option<Vec<PathBuf>>,
    /// With --combine: a note for the comparison (repeatable).
    #[arg(long, requires = "combine", allow_hyphen_values = true)]
    pub note: Vec<String>,
    /// rtt: the halfpipe daemon to start as client and exit (default: the
    /// `halfpipe` beside this executable, else the one on PATH).
    #[arg(long, value_name = "PATH")]
    pub halfpipe: Option<PathBuf>,
    /// Internal: the hold scenario's echo server (a child process).
    #[arg(long, hide = true)]
    pub serve_hold_target: bool,
}

/// Bench runs that take their own options.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Keep many half-closed request/response streams in flight for a long
    /// time, check every byte, and check that the daemons' threads and
    /// descriptors return to their baseline.
    ///
    /// Each stream goes through the SOCKS5 proxy (--socks) to a target this
    /// process runs on loopback, with random sizes (log-uniform, 1 byte to
    /// --max-size) and a random half-close order: request first, reply
    /// first, or both at once. Every byte is checked with SHA-256 and
    /// compared with what was sent. The daemons given with --pids are
    /// sampled from /proc before and after. Exit status 0 when every stream
    /// completed intact and the counts came back, 1 if not, 2 when the soak
    /// could not run.
    Soak(soak::SoakArgs),
    /// Run the rtt scenario's delay relay by itself, in front of any TCP
    /// service (an sshd, say), until killed: prints "relay listening on
    /// ADDR" on stdout.
    Relay(RelayArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct RelayArgs {
    /// Where each connection is relayed to.
    #[arg(long, value_name = "ADDR")]
    pub upstream: SocketAddr,
    /// Delay added each way, in milliseconds.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub delay_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    All,
    Bulk,
    Parallel,
    Setup,
    Hold,
    Slow,
    Rtt,
}

impl Scenario {
    /// The order scenarios run in, whatever order they are named in. Hold
    /// comes first so that it sees fresh daemons: after bulk transfers a
    /// daemon's heap has grown, and idle streams would reuse that memory
    /// instead of showing what they cost.
    const ORDER: [Scenario; 6] = [
        Scenario::Hold,
        Scenario::Bulk,
        Scenario::Parallel,
        Scenario::Setup,
        Scenario::Slow,
        Scenario::Rtt,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::All => "all",
            Scenario::Bulk => "bulk",
            Scenario::Parallel => "parallel",
            Scenario::Setup => "setup",
            Scenario::Hold => "hold",
            Scenario::Slow => "slow",
            Scenario::Rtt => "rtt",
        }
    }
}

/// The selected scenarios in their fixed order.
fn selected(list: &[Scenario]) -> Vec<Scenario> {
    Scenario::ORDER
        .into_iter()
        .filter(|s| list.contains(&Scenario::All) || list.contains(s))
        .collect()
}

// ----------------------------------------------------------------- routes

/// How the bench reaches a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Plain TCP to the target.
    Direct,
    /// Plain TCP to a relay that forwards everything to the targets.
    Via(SocketAddr),
    /// SOCKS5 CONNECT through a proxy.
    Socks(SocketAddr),
}

#[derive(Clone, Debug)]
pub struct Dialer {
    pub route: Route,
    pub timeout: Duration,
}

impl Dialer {
    pub fn new(route: Route) -> Dialer {
        Dialer {
            route,
            timeout: Duration::from_secs(30),
        }
    }

    /// Opens a stream to `dest` (with `Via`, the relay decides where).
    /// Plain connect(2): everything is on loopback, where a connect
    /// succeeds or fails at once.
    pub fn open(&self, dest: SocketAddr) -> io::Result<TcpStream> {
        match self.route {
            Route::Direct => TcpStream::connect(dest),
            Route::Via(relay) => TcpStream::connect(relay),
            Route::Socks(proxy) => socks::connect(proxy, dest, self.timeout),
        }
    }
}

/// What the scenarios share.
pub struct Env {
    pub dialer: Dialer,
    pub target: SocketAddr,
    pub registry: Arc<Registry>,
    pub ui: Ui,
}

// --------------------------------------------------------------------- ui

/// Progress bars on a terminal, tables for people, or nothing but JSON.
#[derive(Clone, Copy, Debug)]
pub struct Ui {
    pub progress: bool,
    pub tables: bool,
}

impl Ui {
    fn bar(&self, total: Option<u64>, template: &str, msg: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::new_spinner(),
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(msg.to_string());
        bar
    }

    pub fn bytes_bar(&self, total: u64, msg: &str) -> ProgressBar {
        self.bar(
            Some(total),
            "{msg:22} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec}",
            msg,
        )
    }

    pub fn count_bar(&self, total: Option<u64>, msg: &str) -> ProgressBar {
        match total {
            Some(_) => self.bar(total, "{msg:22} [{wide_bar}] {pos}/{len} {elapsed}", msg),
            None => self.bar(None, "{msg:22} {spinner} {pos} {elapsed}", msg),
        }
    }

    /// Prints a table or a line for people (not with --json).
    pub fn say(&self, text: &str) {
        if self.tables {
            print!("{text}");
            let _ = io::stdout().flush();
        }
    }
}

/// Makes a child process get SIGTERM when the thread that spawned it ends
/// (the bench dying included), so no daemon outlives the bench.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// Waits until a stream through the route echoes a few bytes (a proxy that
/// is still starting, or halfpipe's client still linking to its exit,
/// refuses streams for a moment).
pub fn wait_ready(dialer: &Dialer, target: SocketAddr, patience: Duration) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    let try_once = || -> io::Result<()> {
        let mut s = dialer.open(target)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut msg = Header {
            kind: Kind::Echo,
            id: targets::next_id(),
            len: 0,
        }
        .encode()
        .to_vec();
        msg.extend_from_slice(b"ping");
        s.write_all(&msg)?;
        let mut back = [0u8; 4];
        s.read_exact(&mut back)?;
        if &back != b"ping" {
            return Err(io::Error::other("echo answered wrong bytes"));
        }
        Ok(())
    };
    loop {
        match try_once() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "no stream got through within {patience:?} (last error: {e})"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("halfpipe-bench: {msg}");
    ExitCode::from(2)
}

fn read_doc(path: &PathBuf) -> Result<Compare, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Compare::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `--combine`: reports in, one comparison document out.
fn combine(files: &[PathBuf], notes: &[String]) -> ExitCode {
    let mut runs = Vec::new();
    for f in files {
        match read_doc(f) {
            Ok(c) => runs.extend(c.runs),
            Err(e) => return fail(e),
        }
    }
    let first = runs.first();
    let doc = Compare {
        schema: COMPARE_SCHEMA.into(),
        date: first.map_or_else(now_rfc3339, |r| r.date.clone()),
        machine: first.map_or_else(procfs::machine, |r| r.machine.clone()),
        notes: notes.to_vec(),
        runs,
    };
    match serde_json::to_string_pretty(&doc) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The `halfpipe` daemon binary for the rtt scenario: `--halfpipe`, else
/// the one beside this executable (cargo builds both into one directory),
/// else whatever `halfpipe` is on PATH.
fn daemon_binary(given: Option<&PathBuf>) -> PathBuf {
    if let Some(p) = given {
        return p.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("halfpipe")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("halfpipe"))
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    if let Some(BenchCommand::Soak(soak_args)) = &args.command {
        return soak::main(soak_args);
    }
    if let Some(BenchCommand::Relay(r)) = &args.command {
        let relay = match relay::DelayRelay::start(r.upstream, Duration::from_millis(r.delay_ms)) {
            Ok(relay) => relay,
            Err(e) => {
                eprintln!("halfpipe-bench relay: {e}");
                return ExitCode::from(1);
            }
        };
        println!("relay listening on {}", relay.addr());
        let _ = std::io::Write::flush(&mut std::io::stdout());
        // Until killed: the relay's threads do the work.
        loop {
            std::thread::park();
        }
    }
    if args.serve_hold_target {
        return targets::serve_hold_target();
    }
    if let Some(files) = &args.combine {
        return combine(files, &args.note);
    }
    if let Some(path) = &args.markdown {
        return match read_doc(path) {
            Ok(c) => {
                print!("{}", report::markdown(&c));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    if let Some(paths) = &args.plot {
        return match read_doc(&paths[0]).and_then(|c| plot::render(&c, &paths[1])) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    let route = match (args.socks, args.direct, args.via) {
        (Some(p), false, _) => Route::Socks(p),
        (None, true, None) => Route::Direct,
        (None, true, Some(v)) => Route::Via(v),
        _ => {
            return fail(
                "say what to measure: --socks ADDR, --direct, or --direct --via ADDR \
                 (or use --plot, --markdown, --combine)",
            )
        }
    };
    if args.concurrency.contains(&0) || args.hold.contains(&0) {
        return fail("--concurrency and --hold take positive numbers");
    }
    // Raise the soft descriptor limit to the hard one (hold needs many).
    let nofile = halfpipe::process::limits::KernelLimits::read().nofile;

    let scenarios = selected(&args.scenario);
    let ui = Ui {
        progress: !args.json && io::stdout().is_terminal(),
        tables: !args.json,
    };
    let targets = match Targets::start(args.target_listen) {
        Ok(t) => t,
        Err(e) => {
            return fail(format!(
                "cannot start the targets on {}: {e}",
                args.target_listen
            ))
        }
    };
    let env = Env {
        dialer: Dialer::new(route),
        target: targets.addr(),
        registry: targets.registry().clone(),
        ui,
    };
    let label = args.label.clone().unwrap_or_else(|| match route {
        Route::Direct => "direct".into(),
        Route::Via(a) => format!("direct via {a}"),
        Route::Socks(a) => format!("socks {a}"),
    });
    let mut rep = Report {
        schema: SCHEMA.into(),
        label,
        mode: if matches!(route, Route::Socks(_)) {
            "socks"
        } else {
            "direct"
        }
        .into(),
        proxy: args.socks.map(|a| a.to_string()),
        via: args.via.map(|a| a.to_string()),
        date: now_rfc3339(),
        machine: procfs::machine(),
        params: report::Params {
            scenarios: scenarios.iter().map(|s| s.name().to_string()).collect(),
            size_mib: args.size,
            streams: args.streams as usize,
            concurrency: args.concurrency.clone(),
            count: args.count,
            duration_s: args.duration.map(|d| d.as_secs_f64()),
            request_bytes: scenarios::REQUEST_BYTES,
            reply_bytes: scenarios::REPLY_BYTES,
            hold: args.hold.clone(),
            pids: args.pids.clone(),
            delay_ms: args.delay_ms,
            rtt_size_mib: args.rtt_size,
        },
        bulk: None,
        parallel: None,
        setup: Vec::new(),
        hold: Vec::new(),
        slow: None,
        rtt: None,
        thread_life: None,
        errors: Vec::new(),
    };
    let m = &rep.machine;
    ui.say(&format!(
        "halfpipe-bench: {} ({}), targets on {}; {} on {} ({}, {} cores)\n\n",
        rep.label,
        match route {
            Route::Direct => "plain TCP".to_string(),
            Route::Via(a) => format!("plain TCP via {a}"),
            Route::Socks(a) => format!("SOCKS5 {a}"),
        },
        env.target,
        rep.date,
        m.hostname,
        m.cpu,
        m.cores
    ));

    let through_route = scenarios.iter().any(|s| *s != Scenario::Rtt);
    if through_route {
        if let Err(e) = wait_ready(&env.dialer, env.target, args.wait) {
            rep.errors.push(format!("start: {e}"));
            return finish(&args, &rep);
        }
    }
    let mib = 1024 * 1024;
    for sc in &scenarios {
        match sc {
            Scenario::All => {}
            Scenario::Bulk => match scenarios::bulk(&env, args.size * mib) {
                Ok(b) => {
                    ui.say(&report::bulk_text(&b));
                    if !(b.upload.verified && b.download.verified) {
                        rep.errors.push("bulk: bytes did not verify".into());
                    }
                    rep.bulk = Some(b);
                }
                Err(e) => rep.errors.push(format!("bulk: {e}")),
            },
            Scenario::Parallel => {
                match scenarios::parallel(&env, args.streams as usize, args.size * mib) {
                    Ok(p) => {
                        ui.say(&report::parallel_text(&p));
                        if !(p.upload.verified && p.download.verified) {
                            rep.errors.push("parallel: bytes did not verify".into());
                        }
                        rep.parallel = Some(p);
                    }
                    Err(e) => rep.errors.push(format!("parallel: {e}")),
                }
            }
            Scenario::Setup => {
                rep.thread_life = Some(scenarios::thread_life());
                for &c in &args.concurrency {
                    let (proxy_before, self_before) =
                        (procfs::cpu_us(&args.pids), procfs::self_cpu_us());
                    let mut s = scenarios::setup(&env, c, args.count, args.duration);
                    let streams = (s.completed + s.errors + scenarios::warmup(c)).max(1) as f64;
                    s.bench_cpu_us_per_stream =
                        Some((procfs::self_cpu_us() - self_before) / streams);
                    if let (Some(a), Some(b)) = (proxy_before, procfs::cpu_us(&args.pids)) {
                        s.proxy_cpu_us_per_stream = Some((b - a) / streams);
                    }
                    if s.errors > 0 {
                        rep.errors.push(format!(
                            "setup at concurrency {c}: {} of {} streams failed (first: {})",
                            s.errors,
                            s.errors + s.completed,
                            s.first_error.as_deref().unwrap_or("?")
                        ));
                    }
                    rep.setup.push(s);
                }
                ui.say(&report::setup_text(&rep.setup));
                if let Some(l) = &rep.thread_life {
                    ui.say(&format!(
                        "{}\n\n",
                        report::thread_floor(l, rep.machine.cores)
                    ));
                }
            }
            Scenario::Hold => {
                // Spawned here, on the main thread: see HoldTarget::start.
                let hold_target = match route {
                    Route::Via(_) => None,
                    _ => match targets::HoldTarget::start() {
                        Ok(t) => Some(t),
                        Err(e) => {
                            rep.errors.push(format!("hold: {e}"));
                            continue;
                        }
                    },
                };
                for &c in &args.hold {
                    match scenarios::hold(
                        &env,
                        c,
                        &args.pids,
                        hold_target.as_ref().map(|t| t.addr),
                        nofile,
                    ) {
                        Ok(h) => {
                            if h.failed > 0 || h.echo_checked != h.opened {
                                rep.errors.push(format!(
                                    "hold {c}: {} failed to open, {} of {} echoed",
                                    h.failed, h.echo_checked, h.opened
                                ));
                            }
                            rep.hold.push(h);
                        }
                        Err(e) => rep.errors.push(format!("hold {c}: {e}")),
                    }
                }
                if !rep.hold.is_empty() {
                    ui.say(&report::hold_text(&rep.hold));
                }
            }
            Scenario::Slow => match scenarios::slow(&env, args.streams as usize, args.size * mib) {
                Ok(s) => {
                    ui.say(&report::slow_text(&s));
                    if !(s.with_stalled.verified && s.without_stalled.verified) {
                        rep.errors.push("slow: bytes did not verify".into());
                    }
                    rep.slow = Some(s);
                }
                Err(e) => rep.errors.push(format!("slow: {e}")),
            },
            Scenario::Rtt => {
                // Runs on the main thread: it spawns the daemons.
                match rtt::run(
                    &daemon_binary(args.halfpipe.as_ref()),
                    &env,
                    Duration::from_millis(args.delay_ms),
                    args.rtt_size * mib,
                    &args.flow,
                ) {
                    Ok(r) => {
                        ui.say(&report::rtt_text(&r));
                        if !(r.upload.verified && r.download.verified && r.relay_only.verified) {
                            rep.errors.push("rtt: bytes did not verify".into());
                        }
                        rep.rtt = Some(r);
                    }
                    Err(e) => rep.errors.push(format!("rtt: {e}")),
                }
            }
        }
        ui.say("\n");
    }
    drop(targets);
    finish(&args, &rep)
}

/// Prints the JSON (with --json) or the errors, and picks the exit status:
/// 0 when every scenario ran and verified, 1 otherwise.
fn finish(args: &BenchArgs, rep: &Report) -> ExitCode {
    if args.json {
        match serde_json::to_string_pretty(rep) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(e),
        }
    } else {
        for e in &rep.errors {
            println!("error: {e}");
        }
    }
    if rep.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_keep_their_order() {
        assert_eq!(selected(&[Scenario::All]), Scenario::ORDER.to_vec());
        assert_eq!(
            selected(&[Scenario::Setup, Scenario::Bulk, Scenario::Hold]),
            vec![Scenario::Hold, Scenario::Bulk, Scenario::Setup]
        );
    }
}
