//! The `halfpipe` daemon for the bench's tests: started as a child process
//! on ephemeral loopback ports, its log kept for failure messages, killed
//! on drop.
//!
//! The daemon is the binary cargo builds beside `halfpipe-bench` (the
//! workspace's `cargo test` builds both).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    /// An exit on TLS links: its fingerprint, for its clients to pin.
    fingerprint: Option<String>,
}

/// The data directory of every daemon this test process starts (one
/// identity for all of them).
fn data_dir() -> &'static str {
    static DIR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("halfpipe-bench-test-{}", std::process::id()));
        d.display().to_string()
    })
}

/// `target/<profile>/halfpipe`, beside this package's own binary.
fn binary() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_halfpipe-bench"));
    let daemon = bench.with_file_name("halfpipe");
    assert!(
        daemon.is_file(),
        "{} is missing: run the tests from the workspace root (`cargo test`), \
         or build it first (`cargo build -p halfpipe`)",
        daemon.display()
    );
    daemon
}

fn pump(from: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

impl Daemon {
    /// `halfpipe exit` on `--link LINK` ("tls" or "plain").
    pub fn exit(link: &str, extra: &[&str]) -> Daemon {
        let mut args = vec!["exit", "--listen", "127.0.0.1:0", "--link", link];
        args.extend_from_slice(extra);
        Daemon::start(&args, "link listening on ", None)
    }

    /// `halfpipe client` linked to `exit` (pinning its fingerprint on a
    /// TLS link), once its link is ready.
    pub fn client(exit: &Daemon, extra: &[&str]) -> Daemon {
        let addr = exit.link().to_string();
        let mut args = vec!["client", "--socks", "127.0.0.1:0", "--exit", &addr];
        match &exit.fingerprint {
            Some(fp) => args.extend(["--exit-fingerprint", fp]),
            None => args.extend(["--link", "plain"]),
        }
        args.extend_from_slice(extra);
        Daemon::start(&args, "SOCKS listening on ", Some("link to exit ready"))
    }

    fn start(args: &[&str], prefix: &str, ready: Option<&str>) -> Daemon {
        let mut child = Command::new(binary())
            .args(args)
            .args(["--data-dir", data_dir()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start halfpipe");
        let log = Arc::new(Mutex::new(String::new()));
        let out = Arc::new(Mutex::new(String::new()));
        pump(child.stderr.take().unwrap(), log.clone());
        pump(child.stdout.take().unwrap(), out.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let found = out.lock().unwrap().lines().find_map(|l| {
                l.strip_prefix(prefix)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
            if let Some(a) = found {
                break a;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "halfpipe {args:?} exited ({status}):\n{}",
                    log.lock().unwrap()
                );
            }
            assert!(Instant::now() < deadline, "halfpipe {args:?} did not start");
            thread::sleep(Duration::from_millis(10));
        };
        let fingerprint = out
            .lock()
            .unwrap()
            .lines()
            .find_map(|l| Some(l.strip_prefix("fingerprint: ")?.trim().to_owned()));
        let d = Daemon {
            child,
            addr,
            log,
            fingerprint,
        };
        if let Some(needle) = ready {
            while !d.log().contains(needle) {
                assert!(Instant::now() < deadline, "never {needle:?}:\n{}", d.log());
                thread::sleep(Duration::from_millis(10));
            }
        }
        d
    }

    pub fn link(&self) -> SocketAddr {
        self.addr
    }

    pub fn socks(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
