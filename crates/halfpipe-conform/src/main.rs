//! The `halfpipe-conform` command line.

use clap::Parser;
use halfpipe_conform::cases;
use halfpipe_conform::report::{self, Tally};
use halfpipe_conform::runner::{self, Options};
use halfpipe_conform::spec::{self, Id};
use halfpipe_conform::subject::Impl;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Checks an implementation of halfpipe's protocol (docs/protocol.md)
/// from the outside: each case names the requirements it checks.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The implementation: a command that takes halfpipe's command line
    /// (`CMD exit --listen ADDR --exit-policy POLICY --link plain ...`).
    #[arg(long = "impl", value_name = "CMD", conflicts_with = "exit_addr")]
    imp: Option<String>,
    /// An exit already running (plain link, with the exit policy of
    /// docs/conformance.md): exit cases only.
    #[arg(long, value_name = "HOST:PORT")]
    exit_addr: Option<SocketAddr>,
    /// Print every case with the requirements it checks, quoted.
    #[arg(long)]
    list: bool,
    /// Print the requirements no case checks (exit status 1 if any).
    #[arg(long)]
    coverage: bool,
    /// Only the cases whose name contains PATTERN, or that check the
    /// requirement (R7.4) or section (R7) PATTERN.
    #[arg(long, value_name = "PATTERN")]
    only: Option<String>,
    /// Leave out the cases PATTERN selects (as for --only); may be given
    /// more than once.
    #[arg(long, value_name = "PATTERN")]
    skip: Vec<String>,
    /// Write a JUnit XML report.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Write a JSON report.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where the logs and cell traces of failed cases are kept.
    #[arg(long, value_name = "DIR", default_value_os_t = std::env::temp_dir().join("halfpipe-conform"))]
    keep: PathBuf,
    /// The whole run's bound; cases left when it passes are skipped.
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    total: u64,
}

/// println! that does not panic when stdout is a closed pipe
/// (`halfpipe-conform --list | head`): the rest is dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let reqs = spec::requirements();
    let all = cases::all();
    if cli.list {
        for c in &all {
            say!("{} ({:?})", c.name, c.role);
            for id in c.ids {
                let text = Id::parse(id).and_then(|i| reqs.get(&i)).map(String::as_str);
                say!("    {id}: {}", text.unwrap_or("(not in docs/protocol.md)"));
            }
        }
        return ExitCode::SUCCESS;
    }
    if cli.coverage {
        let named: BTreeSet<Id> = all
            .iter()
            .flat_map(|c| c.ids)
            .filter_map(|id| Id::parse(id))
            .collect();
        let missing: Vec<(&Id, &String)> =
            reqs.iter().filter(|(id, _)| !named.contains(id)).collect();
        let unknown: Vec<&Id> = named.iter().filter(|id| !reqs.contains_key(id)).collect();
        for id in &unknown {
            say!("{id}: named by a case, but not in docs/protocol.md");
        }
        for (id, text) in &missing {
            say!("{id}: {text}");
        }
        say!(
            "{} of {} requirements have a case; {} have none",
            reqs.len() - missing.len(),
            reqs.len(),
            missing.len()
        );
        return if missing.is_empty() && unknown.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let imp = match (cli.imp, cli.exit_addr) {
        (Some(cmd), _) => Impl::Command(cmd),
        (None, Some(addr)) => Impl::RunningExit(addr),
        (None, None) => {
            eprintln!("halfpipe-conform: give --impl CMD or --exit-addr HOST:PORT (or --list, --coverage)");
            return ExitCode::from(2);
        }
    };
    let subject = imp.describe();
    let opts = Options {
        imp,
        only: cli.only,
        skip: cli.skip,
        keep: cli.keep,
        total: Duration::from_secs(cli.total),
    };
    say!("halfpipe-conform: {subject}");
    let results = runner::run(all, &opts, |r| say!("{}", r.line()));
    let tally = Tally::of(&results);
    say!("{}", tally.line());
    if let Some(path) = &cli.junit {
        if let Err(e) = std::fs::write(path, report::junit(&results, &subject)) {
            eprintln!("halfpipe-conform: cannot write {}: {e}", path.display());
        }
    }
    if let Some(path) = &cli.json {
        let text =
            serde_json::to_string_pretty(&report::json(&results, &subject)).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("halfpipe-conform: cannot write {}: {e}", path.display());
        }
    }
    if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
