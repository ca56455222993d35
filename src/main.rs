//! The halfpipe command line (see README, "Command line").

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use halfpipe::config_file::{self, Entry};
use halfpipe::ctx::{Config, Ctx};
use halfpipe::daemon::Daemon;
use halfpipe::limits::KernelLimits;
use halfpipe_proto::policy::{self, Policy};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
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
    /// Read settings from this TOML file (keys named like the long flags);
    /// flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Time open streams get to finish after Ctrl-C or SIGTERM.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// How long the exit waits for a target to accept.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// How long a link peer has to complete the VERSIONS handshake (and the
    /// exit to answer CREATE_FAST).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// How long a SOCKS client has to send its request.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    socks_timeout: Duration,
    /// End a stream with END(TIMEOUT) and a reset after this long without a
    /// byte read or written (off by default).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Send a PADDING cell on a link after this long without writing
    /// (and TCP keepalive on link sockets); 0 turns both off.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    keepalive: Duration,
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

/// Applies the config file's entries to the flags of `command` that were
/// not given on the command line (`m`: that command's matches). Keys that
/// do not apply to the command (`listen` for `client`) are ignored.
fn apply_config(
    command: &mut Command,
    m: &ArgMatches,
    entries: &[Entry],
    file: &str,
) -> Result<(), String> {
    let (mut socks, mut listen, mut exit, mut policy, mut circuits, common) = match command {
        Command::Run(a) => (
            Some(&mut a.socks),
            None,
            None,
            Some(&mut a.exit_policy),
            Some(&mut a.circuits),
            &mut a.common,
        ),
        Command::Exit(a) => (
            None,
            Some(&mut a.listen),
            None,
            Some(&mut a.exit_policy),
            None,
            &mut a.common,
        ),
        Command::Client(a) => (
            Some(&mut a.socks),
            None,
            Some(&mut a.exit),
            None,
            Some(&mut a.circuits),
            &mut a.common,
        ),
        Command::Bench(_) | Command::Status(_) => return Ok(()),
    };
    for e in entries {
        let id = e.key.replace('-', "_");
        let on_command_line = m.ids().any(|i| i.as_str() == id)
            && m.value_source(&id) == Some(ValueSource::CommandLine);
        if on_command_line {
            continue;
        }
        let v = e.value.as_str();
        let dur = |v: &str| {
            humantime::parse_duration(v).map_err(|err| {
                format!("not a duration such as \"500ms\", \"10s\" or \"5m\" ({err})")
            })
        };
        let count = |v: &str| v.parse::<usize>().map_err(|err| err.to_string());
        let applied: Result<(), String> = {
            match e.key {
                "socks" => socks
                    .as_deref_mut()
                    .map(|f| parse_addr(v).map(|x| *f = x))
                    .transpose()
                    .map(drop),
                "listen" => listen
                    .as_deref_mut()
                    .map(|f| parse_addr(v).map(|x| *f = x))
                    .transpose()
                    .map(drop),
                "exit" => exit
                    .as_deref_mut()
                    .map(|f| parse_addr(v).map(|x| *f = x))
                    .transpose()
                    .map(drop),
                "exit-policy" => policy
                    .as_deref_mut()
                    .map(|f| parse_policy(v).map(|x| *f = x))
                    .transpose()
                    .map(drop),
                "circuits" => circuits
                    .as_deref_mut()
                    .map(|f| match v.parse::<u16>() {
                        Ok(n @ 1..=32) => {
                            *f = n;
                            Ok(())
                        }
                        _ => Err("must be 1 to 32".to_owned()),
                    })
                    .transpose()
                    .map(drop),
                "grace" => dur(v).map(|x| common.grace = x),
                "connect-timeout" => dur(v).map(|x| common.connect_timeout = x),
                "handshake-timeout" => dur(v).map(|x| common.handshake_timeout = x),
                "socks-timeout" => dur(v).map(|x| common.socks_timeout = x),
                "idle-timeout" => dur(v).map(|x| common.idle_timeout = Some(x)),
                "keepalive" => dur(v).map(|x| common.keepalive = x),
                "max-streams" => count(v).map(|x| common.max_streams = Some(x)),
                "max-streams-per-circuit" => count(v).map(|x| common.max_streams_per_circuit = x),
                "max-circuits-per-link" => count(v).map(|x| common.max_circuits_per_link = x),
                "log" => {
                    common.log = v.to_owned();
                    Ok(())
                }
                "status" => parse_addr(v).map(|x| common.status = Some(x)),
                other => Err(format!("bug: key {other} not handled")),
            }
        };
        applied.map_err(|err| format!("{file} line {}: {} = {}: {err}", e.line, e.key, e.shown))?;
    }
    Ok(())
}

#[derive(Debug)]
enum CliError {
    /// A bad flag, or --help/--version: clap prints it and exits.
    Clap(clap::Error),
    /// A bad config file: one line, exit status 2.
    Config(String),
}

/// Parses the command line and applies `--config FILE` under it.
fn parse_command_line<I, T>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command()
        .try_get_matches_from(args)
        .map_err(CliError::Clap)?;
    let cli = Cli::from_arg_matches(&matches).map_err(CliError::Clap)?;
    let sub = matches.subcommand().map(|(_, m)| m).unwrap_or(&matches);
    let mut command = cli.command.unwrap_or(Command::Run(cli.run));
    let path = match &command {
        Command::Run(a) => a.common.config.clone(),
        Command::Exit(a) => a.common.config.clone(),
        Command::Client(a) => a.common.config.clone(),
        Command::Bench(_) | Command::Status(_) => None,
    };
    if let Some(path) = path {
        let entries = config_file::load(&path).map_err(CliError::Config)?;
        apply_config(&mut command, sub, &entries, &path.display().to_string())
            .map_err(CliError::Config)?;
    }
    Ok(command)
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
        handshake_timeout: common.handshake_timeout,
        socks_timeout: common.socks_timeout,
        idle_timeout: common.idle_timeout.filter(|t| !t.is_zero()),
        keepalive: Some(common.keepalive).filter(|t| !t.is_zero()),
        grace: common.grace,
        exit_policy: Arc::new(policy),
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
    let command = match parse_command_line(std::env::args_os()) {
        Ok(c) => c,
        // --help and --version print and exit 0.
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Config(msg)) => return fail(msg),
    };
    let command = match command {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> std::path::PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "halfpipe-unit-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn parse(args: &[&str]) -> Result<Command, CliError> {
        parse_command_line(std::iter::once("halfpipe").chain(args.iter().copied()))
    }

    #[test]
    fn file_fills_what_the_command_line_leaves_and_flags_win() {
        let path = file(
            "listen = \"127.0.0.1:9101\"\ngrace = \"3s\"\nidle-timeout = \"1m\"\n\
             max-streams = 7\ncircuits = 4\nkeepalive = \"0s\"\n",
        );
        let p = path.to_str().unwrap();
        let Ok(Command::Exit(a)) = parse(&["exit", "--config", p, "--grace", "5s"]) else {
            panic!("exit")
        };
        assert_eq!(a.listen, "127.0.0.1:9101".parse().unwrap());
        assert_eq!(a.common.grace, Duration::from_secs(5), "the flag wins");
        assert_eq!(a.common.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(a.common.max_streams, Some(7));
        assert_eq!(a.common.keepalive, Duration::ZERO);
        // Defaults the file does not mention stay.
        assert_eq!(a.common.connect_timeout, Duration::from_secs(10));
        // `circuits` does not apply to exit, `listen` not to run.
        let Ok(Command::Run(r)) = parse(&["--config", p]) else {
            panic!("run")
        };
        assert_eq!(r.circuits, 4);
        assert_eq!(r.common.grace, Duration::from_secs(3));
        let Ok(Command::Client(c)) = parse(&["client", "--config", p, "--circuits", "2"]) else {
            panic!("client")
        };
        assert_eq!(c.circuits, 2);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_values_name_the_key_and_line() {
        let path = file("# x\n\nexit-policy = \"allow everything\"\n");
        let Err(CliError::Config(msg)) = parse(&["exit", "--config", path.to_str().unwrap()])
        else {
            panic!("a bad policy is an error")
        };
        std::fs::remove_file(&path).unwrap();
        assert!(
            msg.contains("line 3: exit-policy = \"allow everything\""),
            "{msg}"
        );
        // A bad value for a key given on the command line is not checked:
        // the flag replaces it.
        let path = file("grace = \"later\"\n");
        let p = path.to_str().unwrap();
        assert!(parse(&["exit", "--config", p, "--grace", "1s"]).is_ok());
        let Err(CliError::Config(msg)) = parse(&["exit", "--config", p]) else {
            panic!("a bad duration is an error")
        };
        std::fs::remove_file(&path).unwrap();
        assert!(msg.contains("line 1: grace = \"later\""), "{msg}");
    }
}
