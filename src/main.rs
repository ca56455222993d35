//! The halfpipe command line (docs/operations.md, "Commands").
//!
//! The flags of each command are one list: clap's definitions below. A
//! config file (`--config FILE`) holds the same names as keys, and each of
//! its entries is checked with the flag's own parser, so nothing can be set
//! in one place that the other does not know.

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use halfpipe::daemon::{Daemon, TlsSetup};
use halfpipe::link::tls::ClientList;
use halfpipe::link::Links;
use halfpipe::ops::config::{self, Entry, Kind};
use halfpipe::ops::status;
use halfpipe::process::authorized::AuthorizedClients;
use halfpipe::process::identity::{default_data_dir, Identity, IdentityError};
use halfpipe::process::limits::{Capacity, KernelLimits};
use halfpipe::process::{Config, Ctx};
use halfpipe_proto::congestion::Flow;
use halfpipe_proto::identity::Fingerprint;
use halfpipe_proto::policy::{self, Policy};
use parking_lot::RwLock;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Start-up errors are one line for a person, with exit status 2.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("halfpipe: {msg}");
    ExitCode::from(2)
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "halfpipe",
    version,
    about = "TCP streams over Tor-style circuits, with real TCP half-close",
    long_about = "TCP streams over Tor-style circuits, with real TCP half-close.\n\n\
        With no subcommand, halfpipe runs both edges in one process: SOCKS on \
        127.0.0.1:1080, joined to an exit by a real loopback link.",
    args_conflicts_with_subcommands = true,
    // A flag given twice takes its last value; that is how flags given on
    // the command line win over the config file's (see `parse_command_line`).
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Both edges in one process (the default).
    Run(RunArgs),
    /// The exit edge: accept links, connect streams to their targets.
    Exit(ExitArgs),
    /// The client edge: SOCKS front end with one link to an exit.
    Client(ClientArgs),
    /// Print the stream table of a daemon running with --status.
    Status(status::StatusArgs),
    /// Exit 0 if this build has FEATURE (resolve, socks4, flow-v2, tls,
    /// stream-limit, circuit-limit, idle-timeout, shutdown-grace), 127 if
    /// not: how the
    /// conformance kit asks (docs/conformance.md).
    Supports {
        /// resolve, socks4, flow-v2, tls, stream-limit, circuit-limit,
        /// idle-timeout or shutdown-grace.
        feature: String,
    },
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// SOCKS listen address.
    #[arg(long, default_value = "127.0.0.1:1080", value_parser = parse_listen)]
    socks: SocketAddr,
    /// Exit policy (Tor ExitPolicy syntax); only local users reach the SOCKS port.
    #[arg(long, default_value = policy::RUN_POLICY, value_parser = parse_policy)]
    exit_policy: Policy,
    /// Circuits to spread streams over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    circuits: u16,
    #[command(flatten)]
    exit: ExitTimeouts,
    #[command(flatten)]
    socks_opts: SocksTimeouts,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug, Clone)]
struct ExitArgs {
    /// Link listen address.
    #[arg(long, default_value = "127.0.0.1:9001", value_parser = parse_listen)]
    listen: SocketAddr,
    /// Exit policy (Tor ExitPolicy syntax), first match wins.
    #[arg(long, default_value = policy::DEFAULT_EXIT_POLICY, value_parser = parse_policy)]
    exit_policy: Policy,
    /// Serve only the clients whose fingerprints this file lists, one per
    /// line (# comments); re-read on SIGHUP. Without it, any client.
    #[arg(long, value_name = "FILE")]
    authorized_clients: Option<PathBuf>,
    /// Print this exit's fingerprint (its identity in --data-dir, made if
    /// there is none) and exit.
    #[arg(long)]
    print_fingerprint: bool,
    #[command(flatten)]
    exit: ExitTimeouts,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug, Clone)]
struct ClientArgs {
    /// SOCKS listen address.
    #[arg(long, default_value = "127.0.0.1:1080", value_parser = parse_listen)]
    socks: SocketAddr,
    /// The exit's link address, HOST:PORT; a name is resolved at every dial.
    #[arg(long, default_value = "127.0.0.1:9001", value_parser = parse_host_port)]
    exit: String,
    /// The exit's fingerprint (64 hex digits, what `halfpipe exit
    /// --print-fingerprint` prints there): needed for a TLS link.
    #[arg(long, value_name = "HEX", value_parser = parse_fingerprint)]
    exit_fingerprint: Option<Fingerprint>,
    /// Print this client's fingerprint (its identity in --data-dir, made if
    /// there is none), for the exit's --authorized-clients, and exit.
    #[arg(long)]
    print_fingerprint: bool,
    /// Circuits to spread streams over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    circuits: u16,
    #[command(flatten)]
    socks_opts: SocksTimeouts,
    #[command(flatten)]
    common: Common,
}

/// Options of the exit edge (`exit` and `run`).
#[derive(Args, Debug, Clone)]
struct ExitTimeouts {
    /// How long the exit waits for a target: the name lookup and the connect.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
}

/// Options of the SOCKS front end (`client` and `run`).
#[derive(Args, Debug, Clone)]
struct SocksTimeouts {
    /// How long a SOCKS client has for its whole handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    socks_timeout: Duration,
    /// How long a SOCKS request waits for the exit's CONNECTED (then SOCKS
    /// 0x06, and a link that has said nothing since is dropped).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    begin_timeout: Duration,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Read settings from this TOML file (keys named like the long flags);
    /// flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Time open streams get to finish after Ctrl-C or SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    grace: Duration,
    // R1.6: 10 s unless set. (Doc comments here are the --help text.)
    /// How long a link peer has to complete the link handshake (TLS and
    /// VERSIONS together), and the exit to answer CREATE_FAST.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// End a stream with END(TIMEOUT) and a reset after this long without a
    /// byte read or written (off by default; 0s is off too).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// End a half-closed stream whose open direction has been silent this
    /// long (END(TIMEOUT) and a reset); 0s turns it off.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    half_closed_timeout: Duration,
    /// Tear a link down when its writer has made no progress for this long
    /// while cells wait (the peer has stopped reading).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    stall_timeout: Duration,
    /// Send a PADDING cell on a link after this long without writing
    /// (and TCP keepalive on link sockets); 0 turns both off.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    keepalive: Duration,
    /// Streams in the whole process, at least 1 (capped at what the kernel
    /// allows).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_streams: Option<u64>,
    // R3.9: configurable, at least 1,000 by default.
    /// Streams per circuit.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    max_streams_per_circuit: u64,
    // R3.9: configurable, at least 32 by default.
    /// Circuits per link.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    max_circuits_per_link: u64,
    /// Log filter (tracing syntax: info, debug, halfpipe::circuit=debug, ...);
    /// RUST_LOG works too.
    #[arg(long, default_value = "info")]
    log: String,
    /// Serve GET /streams and GET /metrics on this address (conventionally
    /// 127.0.0.1:9051; off by default; loopback only).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    status: Option<SocketAddr>,
    /// Let --status listen on an address that is not loopback.
    #[arg(long)]
    status_allow_remote: bool,
    /// How links are carried: tls (TLS 1.3, identities pinned by
    /// fingerprint) or plain (bare TCP, protocol v1 as it was).
    #[arg(long, value_enum, default_value_t = LinkKind::Tls)]
    link: LinkKind,
    /// Flow control a client offers and an exit accepts per circuit: v2
    /// (congestion window, XOFF/XON: docs/protocol.md §14) or v1 (fixed
    /// windows, §10). A circuit runs v2 only if both edges use it.
    #[arg(long, value_enum, default_value_t = FlowArg::V2)]
    flow: FlowArg,
    /// Where the identity key is kept (default: $STATE_DIRECTORY, else
    /// $XDG_DATA_HOME/halfpipe, else ~/.local/share/halfpipe).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum FlowArg {
    V1,
    V2,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LinkKind {
    Tls,
    Plain,
}

fn parse_fingerprint(s: &str) -> Result<Fingerprint, String> {
    s.parse()
        .map_err(|e: halfpipe_proto::identity::FingerprintError| e.to_string())
}

/// A listen address: IP:PORT, or a name resolved once, at start.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{s:?} resolves to nothing"))
}

/// HOST:PORT with a port in range; the host is resolved later, when used.
fn parse_host_port(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_owned()),
        _ => Err(format!("{s:?}: the port must be 1 to 65535")),
    }
}

/// A duration with its unit: `500ms`, `10s`, `5m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("not a duration such as \"500ms\", \"10s\" or \"5m\" ({e})"))
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse().map_err(|e: policy::PolicyError| e.to_string())
}

#[derive(Debug)]
enum CliError {
    /// A bad flag, or --help/--version: clap prints it and exits.
    Clap(clap::Error),
    /// A bad config file: one line, exit status 2.
    Config(String),
}

/// The config file's entries as command-line arguments for the command
/// `sub` (whose matches are `m`), leaving out what the command line gives.
/// A key that is a flag of another command only is skipped (one file may
/// serve several commands); a key that is no flag at all, or a value its
/// flag's parser refuses, is an error naming the file and line.
fn config_args(
    sub: &clap::Command,

    m: &ArgMatches,
    entries: &[Entry],
    file: &str,
) -> Result<Vec<OsString>, String> {
    let top = Cli::command();
    let known_elsewhere = |key: &str| {
        top.get_subcommands()
            .flat_map(|c| c.get_arguments())
            .any(|a| a.get_long() == Some(key))
    };
    let mut args = Vec::new();
    for e in entries {
        let at = |why: String| format!("{file} line {}: {} = {}: {why}", e.line, e.key, e.shown);
        if e.key == "config" {
            return Err(at("a config file cannot name another one".into()));
        }
        if e.key == "print-fingerprint" {
            // A daemon started from this file would print and exit 0.
            return Err(at("a command-line action, not a setting".into()));
        }
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(e.key.as_str()));
        let Some(arg) = arg else {
            if known_elsewhere(&e.key) {
                continue;
            }
            return Err(at(format!(
                "unknown key (the keys are the long flags of `halfpipe {} --help`)",
                sub.get_name()
            )));
        };
        let id = arg.get_id().as_str();
        if m.value_source(id) == Some(ValueSource::CommandLine) {
            continue; // the command line wins
        }
        let flag = format!("--{}", e.key);
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match (e.kind, e.value.as_str()) {
                (Kind::Switch, "true") => args.push(flag.into()),
                (Kind::Switch, _) => {}
                _ => return Err(at("expected true or false".into())),
            }
            continue;
        }
        if e.kind == Kind::Switch {
            return Err(at("expected a value, not true or false".into()));
        }
        // The flag's own parser judges the value: parse it alone. One
        // argument, `--key=value`, so a value that starts with '-' is
        // still a value.
        let arg = format!("{flag}={}", e.value);
        Cli::command()
            .try_get_matches_from(["halfpipe", sub.get_name(), &arg])
            .map_err(|err| at(first_line(&err.to_string())))?;
        args.push(arg.into());
    }
    Ok(args)
}

/// The message of a clap error, without its "error: ", its usage lines
/// and, for a bad value, the "invalid value 'V' for '--flag <F>': " that
/// the config file's error line says in its own words.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    let line = line.strip_prefix("error: ").unwrap_or(line);
    if line.starts_with("invalid value") {
        if let Some(at) = line.find(" for '") {
            if let Some(end) = line[at..].find("': ") {
                return line[at + end + 3..].to_owned();
            }
        }
    }
    line.to_owned()
}

/// Parses the command line and applies `--config FILE` under it: the
/// file's entries become flags placed before the command line's, so that
/// a flag given on the command line wins (`args_override_self`).
fn parse_command_line<I, T>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cmd = Cli::command();
    let matches = cmd
        .clone()
        .try_get_matches_from(&args)
        .map_err(CliError::Clap)?;
    let (name, sub_matches) = match matches.subcommand() {
        Some((name, m)) => (Some(name.to_owned()), m),
        None => (None, &matches),
    };
    // Every command but `status` takes --config (the `Common` options).
    let path = match name.as_deref() {
        Some("status" | "supports") => None,
        _ => sub_matches.get_one::<PathBuf>("config").cloned(),
    };
    let Some(path) = path else {
        return command_of(&matches).map_err(CliError::Clap);
    };
    let entries = config::load(&path).map_err(CliError::Config)?;
    let sub = match &name {
        Some(n) => cmd.find_subcommand(n).expect("a parsed subcommand").clone(),
        None => cmd.find_subcommand("run").expect("run").clone(),
    };
    let extra = config_args(&sub, sub_matches, &entries, &path.display().to_string())
        .map_err(CliError::Config)?;
    // program [subcommand] <file's flags> <command line's flags>
    let mut full: Vec<OsString> = vec![args[0].clone()];
    let rest = &args[1..];
    let rest = match &name {
        Some(n) if rest.first().is_some_and(|a| a == n.as_str()) => {
            full.push(n.into());
            &rest[1..]
        }
        _ => rest,
    };
    full.extend(extra);
    full.extend(rest.iter().cloned());
    let matches = Cli::command()
        .try_get_matches_from(&full)
        .map_err(CliError::Clap)?;
    command_of(&matches).map_err(CliError::Clap)
}

fn command_of(matches: &ArgMatches) -> Result<Command, clap::Error> {
    let cli = Cli::from_arg_matches(matches)?;
    Ok(cli.command.unwrap_or(Command::Run(cli.run)))
}

/// The process's settings and the capacity line to print once everything
/// is up. `edges` is 2 for `run`, where each stream takes a slot at both
/// edges of the same process.
fn config(
    common: &Common,
    exit: Option<&ExitTimeouts>,
    socks: Option<&SocksTimeouts>,
    policy: Policy,
    edges: usize,
) -> (Config, String) {
    let cap: Capacity = KernelLimits::read().capacity();
    let asked = common.max_streams.map(|n| n as usize);
    let max_streams = asked.unwrap_or(cap.streams).min(cap.streams);
    let why = match asked {
        Some(n) if n <= cap.streams => format!(
            "--max-streams {n}; the kernel allows {} (limited by {} = {})",
            cap.streams, cap.limited_by, cap.limit_value
        ),
        _ => format!(
            "limited by {} = {}; raise it for more",
            cap.limited_by, cap.limit_value
        ),
    };
    let per_edge = if edges > 1 {
        format!(
            ", each stream holds one at both edges: {} streams",
            max_streams / edges
        )
    } else {
        String::new()
    };
    let line = format!("capacity: {max_streams} stream slots in this process ({why}{per_edge})");
    let defaults = Config::default();
    let cfg = Config {
        max_circuits_per_link: common.max_circuits_per_link as usize,
        max_streams_per_circuit: common.max_streams_per_circuit as usize,
        max_streams,
        connect_timeout: exit.map_or(defaults.connect_timeout, |e| e.connect_timeout),
        handshake_timeout: common.handshake_timeout,
        socks_timeout: socks.map_or(defaults.socks_timeout, |s| s.socks_timeout),
        begin_timeout: socks.map_or(defaults.begin_timeout, |s| s.begin_timeout),
        stall_timeout: common.stall_timeout,
        idle_timeout: common.idle_timeout.filter(|t| !t.is_zero()),
        half_closed_timeout: Some(common.half_closed_timeout).filter(|t| !t.is_zero()),
        keepalive: Some(common.keepalive).filter(|t| !t.is_zero()),
        grace: common.grace,
        exit_policy: Arc::new(policy),
        flow: match common.flow {
            FlowArg::V1 => Flow::V1,
            FlowArg::V2 => Flow::V2,
        },
    };
    (cfg, line)
}

/// The identity in `--data-dir` (or the default data directory).
fn identity(common: &Common) -> Result<Identity, String> {
    let dir = match &common.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir().ok_or_else(|| IdentityError::NoDefault.to_string())?,
    };
    Identity::load_or_create(&dir).map_err(|e| e.to_string())
}

/// What the daemon's links are made with, and the line that tells a person
/// the daemon's fingerprint; `None` for plain links (with a warning when
/// the link leaves this host).
fn tls_setup(command: &Command) -> Result<(Option<TlsSetup>, Option<String>), String> {
    let (common, leaves_host) = match command {
        Command::Run(a) => (&a.common, false),
        Command::Exit(a) => (&a.common, !a.listen.ip().is_loopback()),
        Command::Client(a) => (&a.common, !exit_is_loopback(&a.exit)),
        Command::Status(_) | Command::Supports { .. } => return Ok((None, None)),
    };
    if common.link == LinkKind::Plain {
        if leaves_host {
            tracing::warn!(
                "--link plain on a link that leaves this host: anyone on the path can read \
                 and change every stream, and anyone who reaches the exit can use it"
            );
        }
        return Ok((None, None));
    }
    let identity = Arc::new(identity(common)?);
    let fp = identity.fingerprint;
    tracing::info!(
        "identity fingerprint {fp} (key {})",
        identity.path.display()
    );
    let setup = match command {
        // One process, one identity: the client pins its own exit, and
        // the exit serves no one else.
        Command::Run(_) => TlsSetup {
            identity,
            exit_fingerprint: Some(fp),
            clients: Some(Arc::new(RwLock::new(Arc::new(AuthorizedClients::only(fp))))),
        },
        Command::Exit(a) => {
            let clients = match &a.authorized_clients {
                Some(path) => {
                    let list = AuthorizedClients::load(path).map_err(|e| e.to_string())?;
                    tracing::info!(
                        "serving the {} clients listed in {}",
                        list.len(),
                        path.display()
                    );
                    Some(Arc::new(RwLock::new(Arc::new(list))))
                }
                None => None,
            };
            TlsSetup {
                identity,
                exit_fingerprint: None,
                clients,
            }
        }
        Command::Client(a) => {
            let pin = a.exit_fingerprint.ok_or_else(|| {
                "a TLS link (the default) needs --exit-fingerprint HEX: run `halfpipe exit \
                 --print-fingerprint` on the exit's host (with its --data-dir) and give \
                 what it prints; or use --link plain on both edges"
                    .to_owned()
            })?;
            TlsSetup {
                identity,
                exit_fingerprint: Some(pin),
                clients: None,
            }
        }
        Command::Status(_) | Command::Supports { .. } => unreachable!("handled above"),
    };
    Ok((Some(setup), Some(format!("fingerprint: {fp}"))))
}

/// Whether the exit's HOST:PORT is on this host (a name is resolved now,
/// for the warning only).
fn exit_is_loopback(exit: &str) -> bool {
    exit.to_socket_addrs()
        .map(|mut a| a.all(|a| a.ip().is_loopback()))
        .unwrap_or(false)
}

/// `--print-fingerprint`: the fingerprint alone on stdout.
fn print_fingerprint(command: &Command) -> Option<ExitCode> {
    let common = match command {
        Command::Exit(a) if a.print_fingerprint => &a.common,
        Command::Client(a) if a.print_fingerprint => &a.common,
        _ => return None,
    };
    Some(match identity(common) {
        Ok(id) => {
            println!("{}", id.fingerprint);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    })
}

/// What lets SIGHUP change the log filter of a running daemon.
type LogFilter = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Logs go to stderr, with colour only on a terminal (never into a file or
/// the journal) and never with NO_COLOR set. RUST_LOG, if set, wins over
/// `--log`.
fn init_logging(filter: &str) -> LogFilter {
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("halfpipe: bad log filter {filter:?} ({e}); using info");
        EnvFilter::new("info")
    });
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_thread_names(true)
                .with_ansi(colour)
                .with_writer(std::io::stderr),
        )
        .init();
    handle
}

/// What SIGHUP can change in a running daemon: the exit policy and the
/// log filter.
fn live_settings(command: &Command) -> (Option<Policy>, &str) {
    match command {
        Command::Run(a) => (Some(a.exit_policy.clone()), &a.common.log),
        Command::Exit(a) => (Some(a.exit_policy.clone()), &a.common.log),
        Command::Client(a) => (None, &a.common.log),
        Command::Status(_) | Command::Supports { .. } => (None, ""),
    }
}

/// Everything else, to tell a person that a change waits for a restart.
fn fixed_settings(mut command: Command) -> String {
    let blank: Policy = policy::RUN_POLICY.parse().expect("literal");
    match &mut command {
        Command::Run(a) => (a.exit_policy, a.common.log) = (blank, String::new()),
        Command::Exit(a) => (a.exit_policy, a.common.log) = (blank, String::new()),
        Command::Client(a) => a.common.log = String::new(),
        Command::Status(_) | Command::Supports { .. } => {}
    }
    format!("{command:?}")
}

/// SIGHUP: reads the command line and the config file again and applies
/// what can change live; a bad file changes nothing.
fn reload(args: &[OsString], running: &Command, ctx: &Ctx, log: &LogFilter) {
    let new = match parse_command_line(args.iter().cloned()) {
        Ok(c) => c,
        Err(CliError::Config(msg)) => {
            tracing::warn!("SIGHUP: {msg}; the settings in force stay");
            return;
        }
        Err(CliError::Clap(e)) => {
            tracing::warn!(
                "SIGHUP: {}; the settings in force stay",
                first_line(&e.to_string())
            );
            return;
        }
    };
    let (policy, filter) = live_settings(&new);
    if let Some(p) = policy {
        tracing::info!("SIGHUP: exit policy now {p}");
        ctx.set_exit_policy(Arc::new(p));
    }
    // The host's addresses are read again at the next BEGIN.
    ctx.host.expire();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing::info!("SIGHUP: RUST_LOG is set, so the log filter stays");
    } else {
        match EnvFilter::try_new(filter) {
            Ok(f) => {
                if log.reload(f).is_ok() {
                    tracing::info!("SIGHUP: log filter now {filter}");
                }
            }
            Err(e) => tracing::warn!("SIGHUP: bad log filter {filter:?} ({e}); it stays"),
        }
    }
    if fixed_settings(new) != fixed_settings(running.clone()) {
        tracing::warn!(
            "SIGHUP: other settings changed too; they take effect when halfpipe restarts"
        );
    }
}

/// SIGHUP at an exit with --authorized-clients: the file again (a bad one
/// changes nothing), and the links of clients it no longer lists closed.
fn reload_clients(args: &ExitArgs, list: &ClientList, links: &Links) {
    let Some(path) = &args.authorized_clients else {
        return;
    };
    let new = match AuthorizedClients::load(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("SIGHUP: {e}; the clients in force stay");
            return;
        }
    };
    tracing::info!(
        "SIGHUP: serving the {} clients listed in {}",
        new.len(),
        path.display()
    );
    *list.write() = Arc::new(new);
    let list = list.read().clone();
    for link in links.all() {
        let peer = link.tls_info().and_then(|t| t.peer);
        if let Some(fp) = peer.filter(|fp| !list.contains(fp)) {
            tracing::info!(link = link.id, client = %fp, "SIGHUP: client no longer listed: closing its link");
            link.cut();
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let command = match parse_command_line(args.iter().cloned()) {
        Ok(c) => c,
        // --help and --version print and exit 0.
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Config(msg)) => return fail(msg),
    };
    let (common, exit_opts, socks_opts, policy, edges) = match &command {
        // `halfpipe status` is a client program: no daemon logging or signals.
        Command::Status(args) => return status::main(args),
        Command::Supports { feature } => {
            return match feature.as_str() {
                "resolve" | "socks4" | "flow-v2" | "tls" | "stream-limit" | "idle-timeout"
                | "shutdown-grace" | "circuit-limit" => ExitCode::SUCCESS,
                _ => ExitCode::from(127),
            }
        }
        Command::Run(a) => (
            &a.common,
            Some(&a.exit),
            Some(&a.socks_opts),
            a.exit_policy.clone(),
            2,
        ),
        Command::Exit(a) => (&a.common, Some(&a.exit), None, a.exit_policy.clone(), 1),
        // The client connects nothing: its policy is never consulted.
        Command::Client(a) => (
            &a.common,
            None,
            Some(&a.socks_opts),
            policy::RUN_POLICY.parse().expect("literal"),
            1,
        ),
    };
    if let Some(code) = print_fingerprint(&command) {
        return code;
    }
    let log_filter = init_logging(&common.log);
    let (status_addr, status_remote) = (common.status, common.status_allow_remote);
    if let Some(addr) = status_addr {
        if let Err(e) = status::check_addr(addr, status_remote) {
            return fail(e);
        }
    }
    let (cfg, capacity_line) = config(common, exit_opts, socks_opts, policy, edges);
    // Registered before anything starts, so that an early signal is
    // queued, not fatal (docs/operations.md, "Signals and shutdown").
    let signals = match halfpipe::ops::signals::register() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot install the signal handlers: {e}")),
    };
    // SIGINT (Ctrl-C) or SIGTERM: graceful shutdown; a second one exits at
    // once.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    let terminate = {
        let count = Arc::new(AtomicUsize::new(0));
        move || {
            if count.fetch_add(1, Ordering::SeqCst) == 0 {
                let _ = stop_tx.try_send(());
            } else {
                eprintln!("halfpipe: second signal, exiting now");
                std::process::exit(130);
            }
        }
    };
    if let Err(e) = ctrlc::set_handler(terminate.clone()) {
        return fail(format!("cannot install the Ctrl-C handler: {e}"));
    }

    let (tls, fingerprint_line) = match tls_setup(&command) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let ctx = Ctx::new(cfg);
    let mut d = Daemon::new(ctx.clone());
    d.tls = tls;
    let reload = {
        let running = command.clone();
        let clients = d.tls.as_ref().and_then(|t| t.clients.clone());
        let links = d.links();
        move || {
            reload(&args, &running, &ctx, &log_filter);
            if let (Command::Exit(a), Some(list)) = (&running, &clients) {
                reload_clients(a, list, &links);
            }
        }
    };
    // Before any listening line: who reads one sees every thread.
    if let Err(e) = d.start_signals(signals, Box::new(terminate), Box::new(reload)) {
        return fail(format!("cannot start the signals thread: {e}"));
    }
    // Every listener is bound before anything is announced: a port in use
    // is one error line, not a half-started daemon.
    let mut lines = vec![capacity_line];
    lines.extend(fingerprint_line);
    if let Some(addr) = status_addr {
        match d.start_status(addr, status_remote) {
            Ok(a) => lines.push(format!(
                "status listening on {a} (GET /streams, GET /metrics)"
            )),
            Err(e) => return fail(e),
        }
    }
    let started = match &command {
        Command::Run(a) => d
            .start_exit("127.0.0.1:0".parse().expect("literal"))
            .and_then(|link| d.start_client(a.socks, link.to_string(), a.circuits as usize))
            .map(|socks| {
                vec![
                    format!("SOCKS listening on {socks} (client and exit in one process)"),
                    format!(
                        "try: curl --socks5-hostname {socks} http://example.com/   (Ctrl-C stops)"
                    ),
                ]
            }),
        Command::Exit(a) => d.start_exit(a.listen).map(|addr| {
            vec![format!(
                "link listening on {addr} (exit policy: {})",
                a.exit_policy
            )]
        }),
        Command::Client(a) => d
            .start_client(a.socks, a.exit.clone(), a.circuits as usize)
            .map(|socks| {
                vec![
                    format!("SOCKS listening on {socks} (exit {})", a.exit),
                    format!("try: curl --socks5-hostname {socks} http://example.com/"),
                ]
            }),
        Command::Status(_) | Command::Supports { .. } => unreachable!("handled above"),
    };
    match started {
        Ok(more) => lines.extend(more),
        Err(e) => return fail(e),
    }
    for line in lines {
        println!("{line}");
    }
    let _ = stop_rx.recv();
    d.shutdown();
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

    fn config_error(args: &[&str]) -> String {
        match parse(args) {
            Err(CliError::Config(msg)) => msg,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn file_fills_what_the_command_line_leaves_and_flags_win() {
        let path = file(
            "listen = \"127.0.0.1:9101\"\ngrace = \"3s\"\nidle-timeout = \"1m\"\n\
             max-streams = 7\ncircuits = 4\nkeepalive = \"0s\"\nsocks-timeout = \"4s\"\n\
             connect-timeout = \"6s\"\nstatus = \"127.0.0.1:9999\"\nstatus-allow-remote = true\n",
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
        assert_eq!(a.exit.connect_timeout, Duration::from_secs(6));
        assert!(a.common.status_allow_remote, "a switch from the file");
        // Defaults the file does not mention stay.
        assert_eq!(a.common.handshake_timeout, Duration::from_secs(10));
        // `circuits` and `socks-timeout` do not apply to exit, `listen`
        // not to run or client.
        let Ok(Command::Run(r)) = parse(&["--config", p]) else {
            panic!("run")
        };
        assert_eq!(r.circuits, 4);
        assert_eq!(r.common.grace, Duration::from_secs(3));
        assert_eq!(r.socks_opts.socks_timeout, Duration::from_secs(4));
        let Ok(Command::Client(c)) = parse(&["client", "--config", p, "--circuits", "2"]) else {
            panic!("client")
        };
        assert_eq!(c.circuits, 2);
        assert_eq!(c.socks_opts.socks_timeout, Duration::from_secs(4));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_values_name_the_key_and_line() {
        let path = file("# x\n\nexit-policy = \"allow everything\"\n");
        let msg = config_error(&["exit", "--config", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        assert!(
            msg.contains("line 3: exit-policy = \"allow everything\": exit policy entry 1"),
            "the policy parser's whole message: {msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
        // A bad value for a key given on the command line is not checked:
        // the flag replaces it.
        let path = file("grace = \"later\"\n");
        let p = path.to_str().unwrap();
        assert!(parse(&["exit", "--config", p, "--grace", "1s"]).is_ok());
        let msg = config_error(&["exit", "--config", p]);
        std::fs::remove_file(&path).unwrap();
        assert!(msg.contains("line 1: grace = \"later\""), "{msg}");
    }

    #[test]
    fn unknown_keys_and_wrong_kinds_are_errors() {
        let path = file("grace = \"1s\"\n\nlisten-on = \"x\"\n");
        let msg = config_error(&["exit", "--config", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        assert!(
            msg.contains("line 3: listen-on = \"x\": unknown key"),
            "{msg}"
        );
        let path = file("status-allow-remote = \"yes\"\n");
        let msg = config_error(&["exit", "--config", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        assert!(msg.ends_with("expected true or false"), "{msg}");
        let path = file("max-streams = 0\n");
        let msg = config_error(&["exit", "--config", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        assert!(msg.contains("line 1: max-streams = 0"), "{msg}");
        // An action, not a setting: a daemon started from the file would
        // print a fingerprint and exit.
        let path = file("print-fingerprint = true\n");
        let msg = config_error(&["exit", "--config", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        assert!(
            msg.contains("line 1: print-fingerprint = true: a command-line action"),
            "{msg}"
        );
    }

    #[test]
    fn the_example_file_is_valid_for_every_command() {
        let text = include_str!("../scripts/halfpipe.toml.example");
        // Every key uncommented, as a user trying them all would.
        let all: String = text
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|r| r.starts_with(|c: char| c.is_ascii_lowercase()))
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        for text in [text.to_owned(), all] {
            let path = file(&text);
            let p = path.to_str().unwrap();
            for cmd in [
                &["exit", "--config", p][..],
                &["client", "--config", p],
                &["--config", p],
            ] {
                if let Err(e) = parse(cmd) {
                    panic!("{cmd:?}: {e:?}");
                }
            }
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn flags_that_do_not_apply_are_refused() {
        assert!(matches!(
            parse(&["exit", "--socks-timeout", "1s"]),
            Err(CliError::Clap(_))
        ));
        assert!(matches!(
            parse(&["client", "--connect-timeout", "1s"]),
            Err(CliError::Clap(_))
        ));
        assert!(parse(&["run", "--socks-timeout", "1s", "--connect-timeout", "1s"]).is_ok());
    }

    #[test]
    fn zero_limits_are_refused() {
        for flag in [
            "--max-streams",
            "--max-streams-per-circuit",
            "--max-circuits-per-link",
        ] {
            assert!(
                matches!(parse(&["exit", flag, "0"]), Err(CliError::Clap(_))),
                "{flag}"
            );
        }
    }

    #[test]
    fn circuit_and_stream_limits_are_configurable_and_default_to_32_and_1000() {
        // R3.9: the per-link circuit limit and the per-circuit stream limit
        // can be set, and default to at least 32 and 1,000, for every
        // command that runs an edge.
        let policy = || policy::RUN_POLICY.parse::<Policy>().unwrap();
        for cmd in [&["exit"][..], &["client"], &["run"]] {
            let common = match parse(cmd) {
                Ok(Command::Exit(a)) => a.common,
                Ok(Command::Client(c)) => c.common,
                Ok(Command::Run(r)) => r.common,
                other => panic!("{cmd:?}: {other:?}"),
            };
            let (cfg, _) = config(&common, None, None, policy(), 1);
            assert_eq!(cfg.max_circuits_per_link, 32, "{cmd:?}");
            assert_eq!(cfg.max_streams_per_circuit, 1000, "{cmd:?}");
        }
        let defaults = Config::default();
        assert!(defaults.max_circuits_per_link >= 32);
        assert!(defaults.max_streams_per_circuit >= 1000);
        let Ok(Command::Exit(a)) = parse(&[
            "exit",
            "--max-circuits-per-link",
            "3",
            "--max-streams-per-circuit",
            "7",
        ]) else {
            panic!("exit with limits")
        };
        let (cfg, _) = config(&a.common, Some(&a.exit), None, policy(), 1);
        assert_eq!(
            (cfg.max_circuits_per_link, cfg.max_streams_per_circuit),
            (3, 7)
        );
    }

    #[test]
    fn the_exit_address_is_resolved_later() {
        let Ok(Command::Client(c)) = parse(&["client", "--exit", "exit.example:9001"]) else {
            panic!("a name that does not resolve now is accepted")
        };
        assert_eq!(c.exit, "exit.example:9001");
        for bad in ["exit.example", "exit.example:0", ":9001", "x:99999"] {
            assert!(
                matches!(parse(&["client", "--exit", bad]), Err(CliError::Clap(_))),
                "{bad}"
            );
        }
    }
}
