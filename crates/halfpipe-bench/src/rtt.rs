//! The rtt scenario: one stream through a halfpipe client and exit whose
//! link passes through a delay relay, against the stream window's limit.
//!
//! A sender may have at most 500 DATA cells of a stream unacknowledged
//! (docs/protocol.md §10), each with 498 bytes, so one stream cannot go faster
//! than 500 x 498 bytes per round trip. The bench starts `halfpipe exit`
//! and `halfpipe client` itself (this executable, ephemeral ports), puts a
//! [`DelayRelay`] between them, and measures one stream each way. Measured
//! well below the limit means flow control stalls (a SENDME sent late);
//! above it means a window is overshot. Plain TCP through a second relay
//! of the same delay shows what the relay itself allows, and an echo
//! through it measures the real round trip.

use super::relay::DelayRelay;
use super::report::{Rtt, CELL_DATA_BYTES, WINDOW_CELLS};
use super::scenarios::{run_flows, Dir};
use super::stats::{median, MIB};
use super::targets::{next_id, Header, Kind};
use super::{die_with_parent, wait_ready, Dialer, Env, Route};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A halfpipe daemon started by the bench, killed and reaped on drop.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Daemon {
    /// Starts `halfpipe ARGS` and waits for the stdout line that starts
    /// with `prefix` followed by an address. Call it on the main thread:
    /// the child's parent-death signal fires when the spawning thread ends.
    fn start(exe: &Path, args: &[&str], prefix: &'static str) -> Result<Daemon, String> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {} {}: {e}", exe.display(), args[0]))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        // Both pipes are drained until the child exits (detached: they end
        // with it); the stderr tail goes into error messages.
        let _ = thread::Builder::new()
            .name("daemon-out".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(a) = line.strip_prefix(prefix) {
                        if let Some(addr) = a.split_whitespace().next().and_then(|a| a.parse().ok())
                        {
                            let _ = tx.try_send(addr);
                        }
                    }
                }
            });
        let tail = log.clone();
        let _ = thread::Builder::new()
            .name("daemon-err".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if t.len() == 20 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        let mut d = Daemon {
            child,
            addr: "0.0.0.0:0".parse().expect("literal"),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => {
                d.addr = addr;
                Ok(d)
            }
            Err(_) => Err(format!(
                "halfpipe {} did not say {prefix:?}: {}",
                args[0],
                d.tail()
            )),
        }
    }

    fn tail(&self) -> String {
        let t = self.log.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join(" / ")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Median round trip of one byte through `dialer` to the echo target.
fn echo_rtt(dialer: &Dialer, target: SocketAddr) -> Result<Duration, String> {
    let mut s = dialer.open(target).map_err(|e| format!("rtt probe: {e}"))?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let head = Header {
        kind: Kind::Echo,
        id: next_id(),
        len: 0,
    };
    s.write_all(&head.encode()).map_err(|e| e.to_string())?;
    let mut samples = Vec::new();
    for i in 0..23 {
        let t0 = Instant::now();
        let mut b = [i as u8];
        s.write_all(&b).map_err(|e| e.to_string())?;
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        if i >= 3 {
            samples.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(Duration::from_secs_f64(median(&mut samples)))
}

/// The window limit in MiB/s for a round trip.
pub fn window_limit(rtt: Duration) -> f64 {
    (WINDOW_CELLS * CELL_DATA_BYTES) as f64 / MIB / rtt.as_secs_f64()
}

pub fn run(
    halfpipe: &Path,
    env: &Env,
    delay: Duration,
    len: u64,
    flow: &str,
) -> Result<Rtt, String> {
    let exit = Daemon::start(
        halfpipe,
        &[
            "exit",
            "--listen",
            "127.0.0.1:0",
            "--exit-policy",
            "accept *:*",
            // The window limit is the same over TLS; a plain link keeps
            // the scenario free of identities and of the cipher's cost.
            "--link",
            "plain",
            "--flow",
            flow,
            "--log",
            "warn",
        ],
        "link listening on ",
    )?;
    let link_relay =
        DelayRelay::start(exit.addr, delay).map_err(|e| format!("delay relay: {e}"))?;
    let relay_addr = link_relay.addr().to_string();
    let client = Daemon::start(
        halfpipe,
        &[
            "client",
            "--socks",
            "127.0.0.1:0",
            "--exit",
            &relay_addr,
            "--link",
            "plain",
            "--flow",
            flow,
            "--log",
            "warn",
        ],
        "SOCKS listening on ",
    )?;
    let through = Env {
        dialer: Dialer::new(Route::Socks(client.addr)),
        target: env.target,
        registry: env.registry.clone(),
        ui: env.ui,
    };
    wait_ready(&through.dialer, through.target, Duration::from_secs(20))
        .map_err(|e| format!("{e}; client: {}; exit: {}", client.tail(), exit.tail()))?;

    // The reference: plain TCP through a relay of the same delay.
    let ref_relay =
        DelayRelay::start(env.target, delay).map_err(|e| format!("delay relay: {e}"))?;
    let plain = Env {
        dialer: Dialer::new(Route::Via(ref_relay.addr())),
        target: env.target,
        registry: env.registry.clone(),
        ui: env.ui,
    };
    let rtt = echo_rtt(&plain.dialer, plain.target)?;
    let (_, mut relay_only) = run_flows(&plain, Dir::Down, 1, len, "rtt: relay only (TCP)")?;
    let (_, mut up) = run_flows(&through, Dir::Up, 1, len, "rtt: upload")?;
    let (_, mut down) = run_flows(&through, Dir::Down, 1, len, "rtt: download")?;
    let (up, down, relay_only) = (up.remove(0), down.remove(0), relay_only.remove(0));

    let limit = window_limit(delay * 2);
    drop(client);
    drop(link_relay);
    drop(exit);
    drop(ref_relay);
    Ok(Rtt {
        delay_ms: delay.as_millis() as u64,
        flow: flow.to_owned(),
        rtt_ms: rtt.as_secs_f64() * 1000.0,
        window_cells: WINDOW_CELLS,
        cell_data_bytes: CELL_DATA_BYTES,
        limit_mib_s: limit,
        limit_measured_rtt_mib_s: window_limit(rtt),
        upload_vs_limit: up.mib_s / limit,
        download_vs_limit: down.mib_s / limit,
        upload: up,
        download: down,
        relay_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_limit_is_cells_times_payload_per_rtt() {
        // 500 x 498 B per 10 ms = 24.9 MB/s = 23.75 MiB/s.
        let l = window_limit(Duration::from_millis(10));
        assert!((l - 249_000.0 * 100.0 / MIB).abs() < 1e-9);
    }
}
