//! The short soak: `halfpipe-bench soak` through a real `halfpipe client`
//! and `halfpipe exit`, with many half-closed streams at once in all three
//! half-close orders (docs/protocol.md §7). Every byte must verify, every
//! stream complete, and both daemons' threads and descriptors return to
//! their baseline (docs/design.md, invariant 6). No timing thresholds: the
//! machine is shared.

mod daemon;

use daemon::Daemon;
use serde_json::Value;
use std::process::Command;

#[test]
fn soak_short_over_tls_links_loses_nothing_and_returns_to_baseline() {
    soak("tls");
}

#[test]
fn soak_short_over_plain_links_loses_nothing_and_returns_to_baseline() {
    soak("plain");
}

fn soak(link: &str) {
    let exit = Daemon::exit(link, &["--exit-policy", "accept *:*"]);
    let client = Daemon::client(&exit, &[]);
    let socks = client.socks().to_string();
    let pids = format!("{},{}", client.pid(), exit.pid());
    let out = Command::new(env!("CARGO_BIN_EXE_halfpipe-bench"))
        .args([
            "soak",
            "--socks",
            &socks,
            "--streams",
            "150",
            "--duration",
            "4s",
            "--max-size",
            "256KiB",
            "--seed",
            "4",
            "--pids",
            &pids,
            "--settle",
            "20s",
            "--ramp",
            "1s",
            "--progress",
            "0s",
            "--json",
        ])
        .output()
        .expect("run halfpipe-bench soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}); status {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        )
    });
    let context = || {
        format!(
            "errors: {}\nfailures: {}\nexamples: {}\norphans: {}\nprocesses: {}\n\
             client log:\n{}\nexit log:\n{}",
            v["errors"],
            v["failures"],
            v["failed_examples"],
            v["orphans"],
            v["processes"],
            tail(&client.log()),
            tail(&exit.log())
        )
    };
    assert_eq!(v["schema"], "halfpipe-soak/1");
    assert!(out.status.success(), "soak failed: {}", context());
    assert_eq!(v["ok"], true, "{}", context());

    // Every stream started completed, in each half-close order.
    let s = &v["streams"];
    assert_eq!(s["failed"], 0, "{}", context());
    assert_eq!(s["completed"], s["started"], "{}", context());
    assert!(s["completed"].as_u64().unwrap() >= 150, "{s}");
    for order in ["request_first", "reply_first", "interleaved"] {
        assert!(s[order].as_u64().unwrap() > 0, "no {order} stream: {s}");
    }

    // Not a byte lost or corrupted, and bytes did flow both ways.
    let b = &v["bytes"];
    assert_eq!(b["lost"], 0, "{}", context());
    assert_eq!(b["corrupted"], 0, "{}", context());
    assert!(b["request_verified"].as_u64().unwrap() > 0, "{b}");
    assert!(b["reply_verified"].as_u64().unwrap() > 0, "{b}");

    // Threads and descriptors back to the idle baseline in both daemons.
    assert_eq!(v["returned_to_baseline"], true, "{}", context());
    let procs = v["processes"].as_array().expect("processes");
    assert_eq!(procs.len(), 2);
    for p in procs {
        assert_eq!(p["alive"], true, "{p}");
        assert_eq!(p["end"]["threads"], p["start"]["threads"], "{p}");
        assert_eq!(p["end"]["fds"], p["start"]["fds"], "{p}");
        // The streams were really in the daemon: two threads each.
        assert!(
            p["peak"]["threads"].as_u64().unwrap() > p["start"]["threads"].as_u64().unwrap() + 50,
            "{p}"
        );
    }
}

/// The last lines of a daemon's log, for a failure message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
