//! The implementation under test: a command that takes halfpipe's command
//! line, started by the kit for each case, or an exit already running.
//!
//! The convention (the QUIC interop runner's): a command that does not
//! support what a case asks of it exits with status 127 at once, and the
//! case is skipped. `CMD supports FEATURE` answers for parts that no command
//! line names (RESOLVE, say): 0 for yes, 127 for no.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The exit policy the kit's exits run with: the kit's targets listen on
/// 127.0.0.1 (and ::1, for a name that resolves to both), and 127.0.0.2
/// stays outside it for the refusal cases. `224.0.0.1:9` and `[fe80::1]:9`
/// are for the connect failures of R5.10 and R5.12, which this host's
/// kernel gives before any packet leaves.
pub const POLICY: &str = "accept 127.0.0.1:*,accept [::1]:*,accept 224.0.0.1:9,accept [fe80::1]:9";

/// How long an implementation may take to start listening.
const START: Duration = Duration::from_secs(10);

/// Exit status that says "not supported".
pub const UNSUPPORTED: i32 = 127;

/// What the kit tests.
#[derive(Debug, Clone)]
pub enum Impl {
    /// A command line, started per case.
    Command(String),
    /// An exit that is already running (exit cases only).
    RunningExit(SocketAddr),
}

impl Impl {
    pub fn describe(&self) -> String {
        match self {
            Impl::Command(c) => c.clone(),
            Impl::RunningExit(a) => format!("exit at {a}"),
        }
    }

    /// Whether the implementation has an optional part (`resolve`,
    /// `socks4`, `flow-v2`, `tls`). A running exit is asked nothing: it is
    /// taken to have everything, and its failures say otherwise.
    pub fn supports(&self, feature: &str) -> Result<bool, String> {
        let Impl::Command(cmd) = self else {
            return Ok(true);
        };
        let (code, _) = run_briefly(cmd, &["supports".as_ref(), feature.as_ref()], START)?;
        match code {
            Some(0) => Ok(true),
            Some(UNSUPPORTED) => Ok(false),
            other => Err(format!(
                "`{cmd} supports {feature}` exited with {other:?}: 0 means yes, 127 no"
            )),
        }
    }
}

/// A started implementation: killed and reaped when dropped.
pub struct Subject {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

/// Why an implementation is not running.
pub enum NotStarted {
    /// It exited 127: it does not support what was asked.
    Unsupported(String),
    Failed(String),
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl Subject {
    /// `CMD <args>` with its output in `log`, once `addr` accepts
    /// connections.
    pub fn start(
        cmd: &str,
        args: &[String],
        addr: SocketAddr,
        log: &Path,
    ) -> Result<Subject, NotStarted> {
        let out = File::create(log).map_err(|e| NotStarted::Failed(e.to_string()))?;
        let err = out
            .try_clone()
            .map_err(|e| NotStarted::Failed(e.to_string()))?;
        let child = Command::new(cmd)
            .args(args)
            // Its own process group: a wrapper that does not exec is
            // stopped with what it started.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| NotStarted::Failed(format!("cannot start {cmd}: {e}")))?;
        let mut s = Subject {
            child,
            addr,
            log: log.to_owned(),
        };
        let since = Instant::now();
        loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                let line = format!("`{cmd} {}` exited with {status}", args.join(" "));
                return Err(if status.code() == Some(UNSUPPORTED) {
                    NotStarted::Unsupported(line)
                } else {
                    NotStarted::Failed(format!("{line} (log: {})", log.display()))
                });
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(s);
            }
            if since.elapsed() > START {
                return Err(NotStarted::Failed(format!(
                    "`{cmd} {}` did not listen on {addr} within {START:?} (log: {})",
                    args.join(" "),
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the process (and its group).
    pub fn signal(&self, signal: i32) {
        kill_group(self.child.id(), signal);
    }

    /// The process's ID, which is its group's too.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        // SIGTERM first: a daemon that shuts down cleanly leaves its log
        // whole; SIGKILL if it does not within a second.
        kill_group(self.child.id(), libc::SIGTERM);
        let since = Instant::now();
        while since.elapsed() < Duration::from_secs(1) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        kill_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Sends `signal` to the process group `pid` leads (the implementation and
/// anything a wrapper of it started).
pub fn kill_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) on the group of a child we started and have not
    // reaped; a group that is gone gets ESRCH, which is harmless.
    unsafe { libc::kill(-(pid as libc::pid_t), signal) };
}

/// Runs `cmd args` to its end, within `wait` (then kills it): its exit
/// code and standard output.
pub fn run_briefly(
    cmd: &str,
    args: &[&std::ffi::OsStr],
    wait: Duration,
) -> Result<(Option<i32>, Vec<u8>), String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    let since = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = Vec::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = std::io::Read::read_to_end(&mut o, &mut out);
                }
                return Ok((status.code(), out));
            }
            Ok(None) if since.elapsed() > wait => {
                kill_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
                return Err(format!("`{cmd}` did not end within {wait:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    }
}
