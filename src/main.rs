//! The halfpipe command line (see README, "Command line").

use clap::{Args, Parser, Subcommand};
use halfpipe::ctx::{Config, Ctx};
use halfpipe::daemon::Daemon;
use halfpipe::limits::KernelLimits;
use halfpipe::policy::{self, Policy};
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Start-up errors are one line for a person, with exit status 2.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("halfpipe: {msg}");
    ExitCode::from(2)
}

#[derive(Parser, Debug)]
#[command(
    name = "halfpipe",
    version,
    about = "TCP streams over Tor-style circuits, with real TCP half-close",
    long_about = "TCP streams over Tor-style circuits, with real TCP half-close.\n\n\
        With no subcommand, halfpipe runs both edges in one process: SOCKS on \
        127.0.0.1:1080, joined to an exit by a real loopback link.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Both edges in one process (the default).
    Run(RunArgs),
    /// The exit edge: accept links, connect streams to their targets.
    Exit(ExitArgs),
    /// The client edge: SOCKS front end with one link to an exit.
    Client(ClientArgs),
    /// Benchmark a SOCKS5 proxy or plain TCP on loopback; compare and plot.
    Bench(Box<halfpipe::bench::BenchArgs>),
    /// Print the stream table of a daemon running with --status.
    Status(halfpipe::status::StatusArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// SOCKS listen address.
    #[arg(long, default_value = "127.0.0.1:1080", value_parser = parse_addr)]
    socks: SocketAddr,
    /// Exit policy (Tor ExitPolicy syntax); only local users reach the SOCKS port.
    #[arg(long, default_value = policy::RUN_POLICY, value_parser = parse_policy)]
    exit_policy: Policy,
    /// Circuits to spread streams over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    circuits: u16,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct ExitArgs {
    /// Link listen address.
    #[arg(long, default_value = "127.0.0.1:9001", value_parser = parse_addr)]
    listen: SocketAddr,
    /// Exit policy (Tor ExitPolicy syntax), first match wins.
    #[arg(long, default_value = policy::DEFAULT_EXIT_POLICY, value_parser = parse_policy)]
    exit_policy: Policy,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct ClientArgs {
    /// SOCKS listen address.
    #[arg(long, default_value = "127.0.0.1:1080", value_parser = parse_addr)]
    socks: SocketAddr,
    /// The exit's link address.
    #[arg(long, default_value = "127.0.0.1:9001", value_parser = parse_addr)]
    exit: SocketAddr,
    /// Circuits to spread streams over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    circuits: u16,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct Common {
    /// Time open streams get to finish after Ctrl-C or SIGTERM.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// How long the exit waits for a target to accept.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Streams in the whole process (capped at what the kernel allows).
    #[arg(long)]
    max_streams: Option<usize>,
    /// Streams per circuit.
    #[arg(long, default_value_t = 1000)]
    max_streams_per_circuit: usize,
    /// Circuits per link.
    #[arg(long, default_value_t = 32)]
    max_circuits_per_link: usize,
    /// Log filter (tracing syntax: info, debug, halfpipe::circuit=debug, ...);
    /// RUST_LOG works too.
    #[arg(long, default_value = "info")]
    log: String,
    /// Serve GET /streams and GET /metrics on this address (conventionally
    /// 127.0.0.1:9051; off by default; loopback only).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    status: Option<SocketAddr>,
    /// Let --status listen on an address that is not loopback.
    #[arg(long, requires = "status")]
    status_allow_remote: bool,
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{s:?} resolves to nothing"))
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse().map_err(|e: policy::PolicyError| e.to_string())
}

/// The process's settings. `edges` is 2 for `run`, where each stream takes
/// a slot at both edges of the same process.
fn config(common: &Common, policy: Policy, edges: usize) -> Config {
    let kernel = KernelLimits::read();
    let cap = kernel.capacity();
    let max_streams = common.max_streams.unwrap_or(cap.streams).min(cap.streams);
    let per_edge = if edges > 1 {
        format!(
            " (each stream holds one at both edges: {} streams)",
            cap.streams / edges
        )
    } else {
        String::new()
    };
    println!(
        "capacity: {} stream slots in this process{per_edge} (limited by {} = {}; raise it for more)",
        cap.streams, cap.limited_by, cap.limit_value
    );
    Config {
        max_circuits_per_link: common.max_circuits_per_link,
        max_streams_per_circuit: common.max_streams_per_circuit,
        max_streams,
        connect_timeout: common.connect_timeout,
        grace: common.grace,
        exit_policy: Arc::new(policy),
        ..Config::default()
    }
}

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("halfpipe: bad log filter {filter:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command.unwrap_or(Command::Run(cli.run)) {
        // The bench is a client program: no daemon logging or signals.
        Command::Bench(args) => return halfpipe::bench::main(*args),
        // So is `halfpipe status`.
        Command::Status(args) => return halfpipe::status::main(args),
        other => other,
    };
    let common = match &command {
        Command::Run(a) => &a.common,
        Command::Exit(a) => &a.common,
        Command::Client(a) => &a.common,
        Command::Bench(_) | Command::Status(_) => unreachable!("handled above"),
    };
    init_logging(&common.log);
    let (status_addr, status_remote) = (common.status, common.status_allow_remote);
    if let Some(addr) = status_addr {
        if let Err(e) = halfpipe::status::check_addr(addr, status_remote) {
            return fail(e);
        }
    }
    // SIGUSR1 writes the stream table to the log. Registered before
    // anything starts, so that an early one is queued, not fatal.
    let usr1 = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1]) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot install the SIGUSR1 handler: {e}")),
    };

    // First signal: graceful shutdown; a second one exits at once.
    let (sig_tx, sig_rx) = crossbeam_channel::bounded(1);
    let signals = AtomicUsize::new(0);
    let handler = ctrlc::set_handler(move || {
        if signals.fetch_add(1, Ordering::SeqCst) == 0 {
            let _ = sig_tx.try_send(());
        } else {
            eprintln!("halfpipe: second signal, exiting now");
            std::process::exit(130);
        }
    });
    if let Err(e) = handler {
        return fail(format!("cannot install the signal handler: {e}"));
    }

    let daemon = match command {
        Command::Run(a) => {
            let ctx = Ctx::new(config(&a.common, a.exit_policy, 2));
            let mut d = Daemon::new(ctx);
            // Before any listening line: who reads one sees every thread.
            if let Err(e) = d.start_signals(usr1) {
                return fail(format!("cannot start the signals thread: {e}"));
            }
            let started = d
                .start_exit("127.0.0.1:0".parse().expect("literal"))
                .and_then(|link| d.start_client(a.socks, link, a.circuits as usize));
            match started {
                Ok(socks) => {
                    println!("SOCKS listening on {socks} (client and exit in one process)");
                    println!(
                        "try: curl --socks5-hostname {socks} http://example.com/   (Ctrl-C stops)"
                    );
                }
                Err(e) => return fail(e),
            }
            d
        }
        Command::Exit(a) => {
            let policy_text = a.exit_policy.to_string();
            let ctx = Ctx::new(config(&a.common, a.exit_policy, 1));
            let mut d = Daemon::new(ctx);
            // Before any listening line: who reads one sees every thread.
            if let Err(e) = d.start_signals(usr1) {
                return fail(format!("cannot start the signals thread: {e}"));
            }
            match d.start_exit(a.listen) {
                Ok(addr) => println!("link listening on {addr} (exit policy: {policy_text})"),
                Err(e) => return fail(e),
            }
            d
        }
        Command::Client(a) => {
            let ctx = Ctx::new(config(
                &a.common,
                policy::RUN_POLICY.parse().expect("literal"),
                1,
            ));
            let mut d = Daemon::new(ctx);
            // Before any listening line: who reads one sees every thread.
            if let Err(e) = d.start_signals(usr1) {
                return fail(format!("cannot start the signals thread: {e}"));
            }
            match d.start_client(a.socks, a.exit, a.circuits as usize) {
                Ok(socks) => {
                    println!("SOCKS listening on {socks} (exit {})", a.exit);
                    println!("try: curl --socks5-hostname {socks} http://example.com/");
                }
                Err(e) => return fail(e),
            }
            d
        }
        Command::Bench(_) | Command::Status(_) => unreachable!("handled above"),
    };
    let mut daemon = daemon;
    if let Some(addr) = status_addr {
        match daemon.start_status(addr, status_remote) {
            Ok(a) => println!("status listening on {a} (GET /streams, GET /metrics)"),
            Err(e) => return fail(e),
        }
    }
    let _ = sig_rx.recv();
    daemon.shutdown();
    ExitCode::SUCCESS
}
