//! The status endpoint (`--status`: GET /streams, GET /metrics), the
//! `halfpipe status` table, the SIGUSR1 table (docs/operations.md, "Live
//! state: status, metrics, SIGUSR1") and the thread names of
//! docs/design.md ("Threads"), checked against a live `halfpipe run` with
//! half-closed streams (docs/protocol.md §7 state names).

use crate::util::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

/// A plain HTTP/1.0 GET: (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the status endpoint");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_owned())
}

pub(crate) fn streams_doc(d: &Daemon) -> Value {
    let (code, body) = http_get(d.status.unwrap(), "/streams");
    assert_eq!(code, 200, "GET /streams: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /streams is not JSON ({e}): {body}"))
}

/// Parses the Prometheus text format strictly enough to catch mistakes:
/// every sample's family has HELP and TYPE lines, counters end in
/// `_total`, values are numbers. Returns "name{labels}" → value.
fn metrics(d: &Daemon) -> BTreeMap<String, f64> {
    let (code, text) = http_get(d.status.unwrap(), "/metrics");
    assert_eq!(code, 200, "GET /metrics: {text}");
    let (mut help, mut typed) = (HashSet::new(), HashSet::new());
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').expect("HELP name text");
            assert!(!text.is_empty(), "{line}");
            help.insert(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(matches!(kind, "counter" | "gauge"), "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            typed.insert(name.to_owned());
        } else {
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (key, value) = line.rsplit_once(' ').expect("sample value");
            let name = key.split('{').next().unwrap();
            assert!(
                name.starts_with("halfpipe_") && help.contains(name) && typed.contains(name),
                "sample without HELP/TYPE: {line}"
            );
            if key.contains('{') {
                assert!(key.ends_with('}'), "{line}");
            }
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            assert!(samples.insert(key.to_owned(), v).is_none(), "twice: {line}");
        }
    }
    samples
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// Polls /metrics until each counter in `want` has grown by at least its
/// amount since `before`. (Counters are added after the write they count,
/// so a peer can see a cell a moment before /metrics does.)
fn wait_grown(
    d: &Daemon,
    before: &BTreeMap<String, f64>,
    want: &[(&str, f64)],
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = metrics(d);
        let short: Vec<String> = want
            .iter()
            .filter(|(k, by)| metric(&m, k) < metric(before, k) + by)
            .map(|(k, by)| {
                format!(
                    "{k}: {} -> {}, expected +{by}",
                    metric(before, k),
                    metric(&m, k)
                )
            })
            .collect();
        if short.is_empty() {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "counters did not move:\n{}",
            short.join("\n")
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The name `top -H` shows for thread `tid` of process `pid`.
fn comm(pid: u32, tid: &Value) -> String {
    let tid = tid.as_i64().expect("a TID");
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .unwrap_or_else(|e| panic!("no thread {tid} in process {pid}: {e}"))
        .trim()
        .to_owned()
}

/// docs/design.md's thread table (`link-dial`, `socks N`, `rslv C.S`,
/// `status-http` and `signals` included) and the two threads halfpipe does
/// not name itself: the main thread and ctrlc's.
fn known_thread_name(name: &str) -> bool {
    let num = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    let dotted = |s: &str| matches!(s.split_once('.'), Some((a, b)) if num(a) && num(b));
    match name.split_once(' ') {
        Some(("link-rd" | "link-wr" | "socks", n)) => num(n),
        Some(("circ" | "pk" | "dl" | "rslv", lc)) => dotted(lc),
        Some(_) => false,
        None => matches!(
            name,
            "halfpipe"
                | "ctrl-c"
                | "link-accept"
                | "socks-accept"
                | "link-dial"
                | "status-http"
                | "signals"
                | "parked"
        ),
    }
}

fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("no field {key:?} in {v}"))
}

fn socks_stream(d: &Daemon, port: u16) -> TcpStream {
    let s = socks5(d.socks(), "127.0.0.1", port, None)
        .unwrap_or_else(|code| panic!("SOCKS5 CONNECT failed with {code:#04x}:\n{}", d.log()));
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

/// The stream entry of role `role` whose target is 127.0.0.1:`port`.
fn entry<'a>(doc: &'a Value, role: &str, port: u16) -> Option<&'a Value> {
    let target = format!("127.0.0.1:{port}");
    field(doc, "streams")
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["role"] == role && s["target"] == target.as_str())
}

// ------------------------------------------------------------------ tests

/// Three streams through `halfpipe run --status`: one half-closed by the
/// application, one by the target, one open. /streams shows each edge in
/// its §7 state with TIDs that /proc names "pk C.S" and "dl C.S"; /metrics
/// parses and moves; `halfpipe status` and SIGUSR1 print the table; every
/// thread has a name from docs/design.md's table.
#[test]
fn status_shows_half_closed_streams_with_their_threads() {
    const REQUEST: usize = 3000;
    // A: reads the request to EOF, answers when released.
    let (got_tx, got_rx) = mpsc::channel::<usize>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let a_srv = Server::start(move |mut s| {
        let mut req = Vec::new();
        s.read_to_end(&mut req).unwrap();
        got_tx.send(req.len()).unwrap();
        let _ = go_rx.lock().unwrap().recv_timeout(PATIENCE);
        let _ = s.write_all(b"ANSWER");
    });
    // B: greets, half-closes, then reads until the application is done.
    let b_srv = Server::start(|mut s| {
        s.write_all(b"READY\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    // C: echo, open both ways.
    let c_srv = Server::echo();
    let (pa, pb, pc) = (a_srv.addr.port(), b_srv.addr.port(), c_srv.addr.port());

    let mut d = Daemon::run(&["--status", "127.0.0.1:0"]);
    let status = d.status.expect("status listening on ADDR");
    assert!(status.ip().is_loopback());
    let before = metrics(&d);

    let mut a = socks_stream(&d, pa);
    a.write_all(&pattern(REQUEST, 1)).unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    assert_eq!(got_rx.recv_timeout(PATIENCE).unwrap(), REQUEST);
    let mut b = socks_stream(&d, pb);
    let mut greeting = Vec::new();
    b.read_to_end(&mut greeting).unwrap();
    assert_eq!(greeting, b"READY\n");
    let mut c = socks_stream(&d, pc);
    c.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    c.read_exact(&mut pong).unwrap();

    // §7 at each edge; a finished direction's thread has ended (no TID).
    let expect = [
        (pa, "client", "DONE_PACKAGING", false, true),
        (pa, "exit", "DONE_DELIVERING", true, false),
        (pb, "client", "DONE_DELIVERING", true, false),
        (pb, "exit", "DONE_PACKAGING", false, true),
        (pc, "client", "OPEN", true, true),
        (pc, "exit", "OPEN", true, true),
    ];
    let doc = eventually("the six streams in their §7 states", || {
        let doc = streams_doc(&d);
        let ok = expect.iter().all(|&(port, role, state, pk, dl)| {
            entry(&doc, role, port).is_some_and(|s| {
                s["state"] == state
                    && s["packager_tid"].is_null() != pk
                    && s["deliverer_tid"].is_null() != dl
            })
        });
        ok.then_some(doc)
    });

    // The documented schema.
    let pid = d.pid();
    let process = field(&doc, "process");
    assert_eq!(field(process, "pid").as_u64(), Some(u64::from(pid)));
    assert_eq!(
        field(process, "roles"),
        &serde_json::json!(["client", "exit"])
    );
    for k in ["uptime_secs", "capacity_streams", "open_streams", "threads"] {
        assert!(field(process, k).is_number(), "process.{k}");
    }
    assert!(field(process, "version").is_string());
    let links = field(&doc, "links").as_array().unwrap();
    assert_eq!(links.len(), 2, "{links:?}");
    for l in links {
        for k in ["id", "age_secs", "circuits"] {
            assert!(field(l, k).is_number(), "link.{k}: {l}");
        }
        assert!(field(l, "peer").is_string());
        let id = field(l, "id");
        assert_eq!(comm(pid, field(l, "reader_tid")), format!("link-rd {id}"));
        assert_eq!(comm(pid, field(l, "writer_tid")), format!("link-wr {id}"));
    }
    let circuits = field(&doc, "circuits").as_array().unwrap();
    assert_eq!(circuits.len(), 2, "{circuits:?}");
    for c in circuits {
        let name = field(c, "name").as_str().unwrap();
        assert_eq!(comm(pid, field(c, "tid")), format!("circ {name}"));
        assert!(field(c, "circ_id").as_str().unwrap().starts_with("0x"));
        assert_eq!(field(c, "streams").as_u64(), Some(3));
        for k in ["package_window", "deliver_window", "age_secs"] {
            assert!(field(c, k).is_number(), "circuit.{k}: {c}");
        }
    }
    for s in field(&doc, "streams").as_array().unwrap() {
        let name = field(s, "name").as_str().unwrap();
        for k in [
            "id",
            "link",
            "bytes_packaged",
            "cells_packaged",
            "bytes_delivered",
            "cells_delivered",
            "cells_received",
            "cells_queued",
            "package_window",
            "deliver_window",
            "age_secs",
            "idle_secs",
        ] {
            assert!(field(s, k).is_number(), "stream.{k}: {s}");
        }
        assert!(field(s, "close_cause").is_null(), "{s}");
        assert!(field(s, "circuit").is_string());
        // TIDs of running threads are the threads `top -H` names.
        for (key, prefix) in [("packager_tid", "pk"), ("deliverer_tid", "dl")] {
            let tid = field(s, key);
            if !tid.is_null() {
                assert_eq!(comm(pid, tid), format!("{prefix} {name}"), "{s}");
            }
        }
    }
    let a_client = entry(&doc, "client", pa).unwrap();
    let a_exit = entry(&doc, "exit", pa).unwrap();
    assert_eq!(a_client["bytes_packaged"], REQUEST as u64);
    assert_eq!(a_exit["bytes_delivered"], REQUEST as u64);
    assert_eq!(entry(&doc, "client", pb).unwrap()["bytes_delivered"], 6);

    // Every thread of the process has a name from the design table.
    let names = d.thread_names();
    for n in &names {
        assert!(
            known_thread_name(n),
            "thread {n:?} is not in docs/design.md's table: {names:?}"
        );
    }
    for want in ["link-accept", "socks-accept", "status-http", "signals"] {
        assert!(names.iter().any(|n| n == want), "no {want}: {names:?}");
    }
    for prefix in ["link-rd ", "link-wr ", "circ ", "pk ", "dl "] {
        assert!(
            names.iter().any(|n| n.starts_with(prefix)),
            "no {prefix}*: {names:?}"
        );
    }

    // /metrics: gauges from the same state, counters that moved.
    let m = metrics(&d);
    for (role, state, n) in [
        ("client", "OPEN", 1.0),
        ("client", "DONE_PACKAGING", 1.0),
        ("client", "DONE_DELIVERING", 1.0),
        ("exit", "OPEN", 1.0),
        ("exit", "DONE_PACKAGING", 1.0),
        ("exit", "DONE_DELIVERING", 1.0),
        ("client", "CLOSED", 0.0),
    ] {
        let key = format!("halfpipe_streams{{role=\"{role}\",state=\"{state}\"}}");
        assert_eq!(metric(&m, &key), n, "{key}");
    }
    assert_eq!(metric(&m, "halfpipe_links{role=\"client\"}"), 1.0);
    assert_eq!(metric(&m, "halfpipe_circuits{role=\"exit\"}"), 1.0);
    assert!(metric(&m, "halfpipe_threads") > 0.0);
    // Both edges are in this process: what one packages, the other
    // delivers. A's request, B's greeting, C's ping and its echo.
    let moved = (REQUEST + 6 + 4 + 4) as f64;
    let m = wait_grown(
        &d,
        &before,
        &[
            ("halfpipe_stream_bytes_total{direction=\"packaged\"}", moved),
            (
                "halfpipe_stream_bytes_total{direction=\"delivered\"}",
                moved,
            ),
            ("halfpipe_link_cells_total{direction=\"sent\"}", 1.0),
            ("halfpipe_link_cells_total{direction=\"received\"}", 1.0),
            (
                "halfpipe_relay_cells_total{direction=\"sent\",command=\"BEGIN\"}",
                3.0,
            ),
            (
                "halfpipe_relay_cells_total{direction=\"received\",command=\"BEGIN\"}",
                3.0,
            ),
            (
                "halfpipe_relay_cells_total{direction=\"sent\",command=\"FIN\"}",
                2.0,
            ),
            (
                "halfpipe_relay_cells_total{direction=\"received\",command=\"FIN\"}",
                2.0,
            ),
            (
                "halfpipe_socks_replies_total{version=\"5\",code=\"0x00\"}",
                3.0,
            ),
        ],
    );
    for kind in ["relay_header", "half_close", "flow_control", "create"] {
        let key = format!("halfpipe_protocol_violations_total{{kind=\"{kind}\"}}");
        assert_eq!(metric(&m, &key), 0.0, "{key}");
    }
    assert_eq!(
        metric(&m, "halfpipe_streams_refused_total{limit=\"process\"}"),
        0.0
    );

    // Anything else is 404.
    assert_eq!(http_get(status, "/").0, 404);
    assert_eq!(http_get(status, "/streams/1").0, 404);

    // `halfpipe status`: one line per stream, sorted, aligned.
    let out = Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args(["status", "--status", &status.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains(&format!("pid {pid}")), "{table}");
    assert!(
        lines[1].starts_with("STREAM") && lines[1].contains("STATE"),
        "{table}"
    );
    // The stream table ends at the blank line before the link table.
    let end = lines
        .iter()
        .position(|l| l.is_empty())
        .unwrap_or(lines.len());
    let rows = &lines[2..end];
    assert_eq!(rows.len(), 6, "{table}");
    let state_col = lines[1].find("STATE").unwrap();
    let mut order = Vec::new();
    for &(port, role, state, _, _) in &expect {
        let s = entry(&doc, role, port).unwrap();
        let name = s["name"].as_str().unwrap();
        let row = rows
            .iter()
            .find(|r| r.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"));
        assert_eq!(&row[state_col..state_col + state.len()], state, "{table}");
        assert!(row.contains(&format!("127.0.0.1:{port}")), "{row}");
        order.push((s["link"].as_u64().unwrap(), name.to_owned()));
    }
    order.sort_by_key(|(link, name)| {
        let (c, s) = name.split_once('.').unwrap();
        (*link, c.parse::<u32>().unwrap(), s.parse::<u32>().unwrap())
    });
    let listed: Vec<&str> = rows
        .iter()
        .map(|r| r.split_whitespace().next().unwrap())
        .collect();
    let sorted: Vec<&str> = order.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(listed, sorted, "{table}");
    let out = Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args(["status", "--status", &status.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let raw: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(raw["streams"].as_array().unwrap().len(), 6);

    // SIGUSR1: the same table in the log.
    d.signal(libc::SIGUSR1);
    d.wait_for_log("stream table (SIGUSR1)");
    eventually("the SIGUSR1 table's rows", || {
        let log = d.log();
        let at = log.find("stream table (SIGUSR1)")?;
        let dump = &log[at..];
        let all = expect
            .iter()
            .map(|&(port, role, _, _, _)| {
                entry(&doc, role, port).unwrap()["name"].as_str().unwrap()
            })
            .all(|name| {
                dump.lines()
                    .any(|l| l.split_whitespace().next() == Some(name))
            });
        all.then_some(())
    });
    assert!(d.is_running(), "SIGUSR1 is not fatal");

    // Finish all three; the streams leave the table.
    go_tx.send(()).unwrap();
    let mut answer = Vec::new();
    a.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"ANSWER");
    b.shutdown(Shutdown::Write).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    eventually("no streams left", || {
        field(&streams_doc(&d), "streams")
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    let fins = [
        (
            "halfpipe_relay_cells_total{direction=\"sent\",command=\"FIN\"}",
            6.0,
        ),
        (
            "halfpipe_relay_cells_total{direction=\"received\",command=\"FIN\"}",
            6.0,
        ),
    ];
    let m = wait_grown(&d, &before, &fins);
    for state in ["OPEN", "DONE_PACKAGING", "DONE_DELIVERING", "CLOSED"] {
        let key = format!("halfpipe_streams{{role=\"exit\",state=\"{state}\"}}");
        assert_eq!(metric(&m, &key), 0.0, "{key}");
    }
}

/// A protocol violation (R4.8: DATA on stream 0) is counted by
/// kind, and so is the DESTROY(PROTOCOL) it earns.
#[test]
fn metrics_count_violations_and_destroys_by_kind_and_reason() {
    let d = Daemon::exit(&["--status", "127.0.0.1:0"]);
    let mut l = RawLink::connect(d.link());
    let circ = 0x8000_0042;
    l.create_circuit(circ);
    l.send_relay(circ, halfpipe_proto::relay::relay_cmd::DATA, 0, b"x");
    let c = l.recv_non_sendme().expect("DESTROY");
    assert_eq!(c.command, halfpipe_proto::cell::cmd::DESTROY, "{c:?}");
    // The writer counts a cell after writing it: the peer may see the
    // DESTROY a moment before /metrics does.
    let violation = "halfpipe_protocol_violations_total{kind=\"stream_zero\"}";
    let destroy = "halfpipe_destroy_total{direction=\"sent\",reason=\"PROTOCOL\"}";
    let m = eventually("the violation and the DESTROY in /metrics", || {
        let m = metrics(&d);
        (metric(&m, violation) == 1.0 && metric(&m, destroy) == 1.0).then_some(m)
    });
    let data = "halfpipe_relay_cells_total{direction=\"received\",command=\"DATA\"}";
    assert_eq!(metric(&m, data), 1.0);
    for kind in ["relay_header", "wrong_direction", "flow_control", "create"] {
        let key = format!("halfpipe_protocol_violations_total{{kind=\"{kind}\"}}");
        assert_eq!(metric(&m, &key), 0.0, "{key}");
    }
    assert_eq!(metric(&m, "halfpipe_links{role=\"exit\"}"), 1.0);
}

/// The status endpoint listens on loopback only unless the user insists;
/// `halfpipe status` with no daemon says so in one line.
#[test]
fn status_refuses_a_remote_address_and_reports_a_missing_daemon() {
    let out = Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args(["run", "--socks", "127.0.0.1:0", "--status", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--status-allow-remote"), "{err}");

    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args(["status", "--status", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
}

// ------------------------------------------- the endpoint under attack

/// RSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_huge_request_is_answered_431_without_being_read() {
    // A request whose header line never ends: the endpoint reads at most
    // 8 KiB of it, answers 431 and closes; the daemon's memory does not
    // follow what the client sends (it once grew by the gigabyte).
    let d = Daemon::run(&["--status", "127.0.0.1:0"]);
    let status = d.status.unwrap();
    let before = rss_kib(d.pid());
    let mut s = TcpStream::connect(status).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        thread::spawn(move || {
            let line = vec![b'a'; 1 << 20];
            let _ = w.write_all(b"GET /streams HTTP/1.1\r\nX-Long: ");
            // 64 MiB, or until the endpoint closes the connection.
            for _ in 0..64 {
                if w.write_all(&line).is_err() {
                    break;
                }
            }
        })
    };
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    writer.join().unwrap();
    let after = rss_kib(d.pid());
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // The endpoint still serves.
    assert_eq!(http_get(status, "/streams").0, 200);
}

#[test]
fn idle_connections_cannot_hold_the_endpoint_or_the_daemons_threads() {
    // 50 connections that send nothing: at most 8 are served at once (the
    // rest are closed at once), each is answered 408 at its deadline, and
    // meanwhile the daemon's threads stay within the reserve and streams
    // are served.
    let d = Daemon::run(&["--status", "127.0.0.1:0"]);
    let status = d.status.unwrap();
    let baseline = d.thread_count();
    let idle: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(status).unwrap())
        .collect();
    let peak = eventually("the idle connections to be taken", || {
        let n = d.thread_count();
        (n > baseline).then_some(n)
    });
    thread::sleep(Duration::from_millis(300));
    let threads = d.thread_count().max(peak);
    assert!(
        threads <= baseline + 8,
        "{threads} threads with 50 idle status connections (baseline {baseline})"
    );
    // A stream is served meanwhile.
    let echo = Server::echo();
    let mut s = socks5(d.socks(), "127.0.0.1", echo.addr.port(), None).expect("CONNECT");
    s.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    drop(s);
    // Every idle connection ends: closed at once, or 408 at its deadline.
    let mut answered = 0;
    for mut c in idle {
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        if out.starts_with("HTTP/1.1 408 ") {
            answered += 1;
        } else {
            assert!(out.is_empty(), "{out}");
        }
    }
    assert!((1..=8).contains(&answered), "{answered} answered 408");
    assert_eq!(http_get(status, "/streams").0, 200);
    d.wait_for_threads(baseline);
}

#[test]
fn the_endpoint_survives_running_out_of_descriptors() {
    // With few descriptors, connections to the status port exhaust them
    // (accept() fails with EMFILE); once they are gone, the endpoint
    // serves again: its listener does not die at the first EMFILE.
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halfpipe"));
    cmd.args(["exit", "--listen", "127.0.0.1:0", "--status", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 20,
                rlim_max: 20,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let log = {
        let mut stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        })
    };
    let stdout = child.stdout.take().unwrap();
    let mut status = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("status listening on ") {
            status = a.split_whitespace().next().and_then(|a| a.parse().ok());
        }
        if line.starts_with("link listening on ") {
            break;
        }
    }
    let status: SocketAddr = status.expect("status address");
    // More connections than the daemon has descriptors for.
    let flood: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(status).ok())
        .collect();
    thread::sleep(Duration::from_millis(500));
    drop(flood);
    eventually("the endpoint to serve again", || {
        let mut s = TcpStream::connect(status).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.starts_with("HTTP/1.1 200 ").then_some(())
    });
    assert!(child.try_wait().unwrap().is_none(), "the daemon died");
    let _ = child.kill();
    let _ = child.wait();
    let log = log.join().unwrap();
    assert!(
        log.contains("status endpoint: accept failed"),
        "the flood never ran the daemon out of descriptors: {log}"
    );
}
