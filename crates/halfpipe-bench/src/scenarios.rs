//! The scenarios that go through the route under test: bulk, parallel,
//! setup, hold and slow (docs/performance.md, "`halfpipe-bench`"; rtt is
//! in `rtt.rs`).
//!
//! Bulk, parallel and slow are built on [`run_flows`]: N streams are opened
//! (connect plus SOCKS handshake, not timed), then started together, and
//! each moves its bytes one way: up to the sink or down from the source.
//! Time runs from the common start to the moment the receiving end has the
//! last byte. Each stream's bytes are counted and CRC-32 hashed at both
//! ends and compared.

use super::report::{
    Bulk, Flows, Hold, Latency, Parallel, ProcessHold, Setup, Slow, ThreadLife, Transfer, Usage,
};
use super::stats::{jain, mib_s, summarize};
use super::targets::{
    check_reply, next_id, receive, request_body, send_pattern, Header, Kind, Registry, ENDLESS,
};
use super::{procfs, Env, Route};
use crossbeam_channel::bounded;
use parking_lot::Mutex;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// setup: the request body and the reply, in bytes.
pub const REQUEST_BYTES: usize = 128;
pub const REPLY_BYTES: usize = 1024;
/// A transfer whose byte count stops moving this long has failed.
const STALL: Duration = Duration::from_secs(60);
/// parallel and slow streams carry at least this much each.
const MIN_FLOW: u64 = 1024 * 1024;
/// bulk: bytes each way before the measured streams.
const WARM_UP: u64 = 64 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to the sink.
    Up,
    /// The source to the client.
    Down,
}

/// How one stream of a flow set ended.
struct FlowEnd {
    bytes: u64,
    crc: u32,
    /// When the receiving end had the last byte.
    end: Instant,
    verified: bool,
    mismatch: Option<String>,
}

fn upload(mut s: TcpStream, id: u64, len: u64, registry: &Registry) -> Result<FlowEnd, String> {
    let _ = s.set_write_timeout(Some(STALL));
    let head = Header {
        kind: Kind::Sink,
        id,
        len,
    };
    s.write_all(&head.encode())
        .map_err(|e| format!("upload header: {e}"))?;
    let written = AtomicU64::new(0);
    let (sent, crc) =
        send_pattern(&mut s, id, len, &written).map_err(|e| format!("upload write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("upload shutdown: {e}"))?;
    let done = registry.wait_done(id, STALL)?;
    // The sink closes once it has recorded EOF; wait for that so both ends
    // close cleanly.
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.read(&mut [0u8; 64]);
    let verified = !done.failed && sent == len && done.bytes == len && done.crc == crc;
    Ok(FlowEnd {
        bytes: done.bytes,
        crc: done.crc,
        end: done.at,
        verified,
        mismatch: (!verified).then(|| {
            format!(
                "sent {sent} bytes (crc {crc:08x}), the sink got {} (crc {:08x}{})",
                done.bytes,
                done.crc,
                if done.failed { ", then an error" } else { "" }
            )
        }),
    })
}

fn download(
    mut s: TcpStream,
    id: u64,
    len: u64,
    registry: &Registry,
    progress: &AtomicU64,
) -> Result<FlowEnd, String> {
    let _ = s.set_read_timeout(Some(STALL));
    let head = Header {
        kind: Kind::Source,
        id,
        len,
    };
    s.write_all(&head.encode())
        .map_err(|e| format!("download header: {e}"))?;
    let r = receive(&mut s, len, progress).map_err(|e| format!("download read: {e}"))?;
    let end = r.full_at.unwrap_or_else(Instant::now);
    drop(s);
    let done = registry.wait_done(id, STALL)?;
    let verified = !done.failed && r.bytes == len && done.bytes == len && done.crc == r.crc;
    Ok(FlowEnd {
        bytes: r.bytes,
        crc: r.crc,
        end,
        verified,
        mismatch: (!verified).then(|| {
            format!(
                "source sent {} bytes (crc {:08x}), got {} (crc {:08x})",
                done.bytes, done.crc, r.bytes, r.crc
            )
        }),
    })
}

/// Runs `n` streams of `len` bytes each in direction `dir`, all started at
/// once. Returns the set's summary and each stream's transfer.
pub fn run_flows(
    env: &Env,
    dir: Dir,
    n: usize,
    len: u64,
    msg: &str,
) -> Result<(Flows, Vec<Transfer>), String> {
    // Each stream opens, says it is ready, and waits at the gate; dropping
    // the gate's sender starts them all.
    let (ready_tx, ready_rx) = bounded::<()>(n);
    let (gate_tx, gate_rx) = bounded::<()>(0);
    let mut counters = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let id = next_id();
        let counter = match dir {
            Dir::Up => env.registry.progress(id),
            Dir::Down => Arc::new(AtomicU64::new(0)),
        };
        counters.push(counter.clone());
        let (dialer, target, registry) = (env.dialer.clone(), env.target, env.registry.clone());
        let (ready_tx, gate_rx) = (ready_tx.clone(), gate_rx.clone());
        let spawned = thread::Builder::new()
            .name(format!("flow {i}"))
            .spawn(move || {
                let sock = dialer.open(target);
                let _ = ready_tx.send(());
                let _ = gate_rx.recv();
                let sock = sock.map_err(|e| format!("open: {e}"))?;
                match dir {
                    Dir::Up => upload(sock, id, len, &registry),
                    Dir::Down => download(sock, id, len, &registry, &counter),
                }
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                drop(gate_tx);
                for h in handles {
                    let _ = h.join();
                }
                return Err(format!("cannot start a stream thread: {e}"));
            }
        }
    }
    for _ in 0..n {
        let _ = ready_rx.recv();
    }
    let start = Instant::now();
    drop(gate_tx);

    // Watch the byte counters: the first stream to finish ends the interval
    // over which the per-stream shares are compared.
    let bar = env.ui.bytes_bar(len.saturating_mul(n as u64), msg);
    let mut snapshot: Option<(Vec<u64>, Instant)> = None;
    loop {
        let values: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        bar.set_position(values.iter().sum());
        let all_done = handles.iter().all(|h| h.is_finished());
        if snapshot.is_none()
            && (all_done
                || handles.iter().any(|h| h.is_finished())
                || values.iter().any(|&v| v >= len))
        {
            snapshot = Some((values, Instant::now()));
        }
        if all_done {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    bar.finish_and_clear();

    let mut ends = Vec::with_capacity(n);
    for h in handles {
        match h.join() {
            Ok(Ok(end)) => ends.push(end),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a stream thread panicked".into()),
        }
    }
    if let Some(e) = ends.iter().find_map(|e| e.mismatch.clone()) {
        // Reported through `verified`; keep the detail on stderr.
        eprintln!("halfpipe-bench: {msg}: {e}");
    }
    let (snap, snap_at) = snapshot.expect("taken before the loop ends");
    let window = snap_at.saturating_duration_since(start);
    let per_stream: Vec<f64> = snap.iter().map(|&b| mib_s(b, window)).collect();
    let last = ends.iter().map(|e| e.end).max().unwrap_or(start);
    let bytes = ends.iter().map(|e| e.bytes).sum();
    let seconds = last.saturating_duration_since(start);
    let transfers = ends
        .iter()
        .map(|e| {
            let d = e.end.saturating_duration_since(start);
            Transfer {
                bytes: e.bytes,
                seconds: d.as_secs_f64(),
                mib_s: mib_s(e.bytes, d),
                crc32: format!("{:08x}", e.crc),
                verified: e.verified,
            }
        })
        .collect();
    Ok((
        Flows {
            streams: n,
            bytes,
            seconds: seconds.as_secs_f64(),
            aggregate_mib_s: mib_s(bytes, seconds),
            fairness: jain(&per_stream),
            per_stream_mib_s: per_stream,
            verified: ends.iter().all(|e| e.verified),
        },
        transfers,
    ))
}

fn one(env: &Env, dir: Dir, len: u64, msg: &str) -> Result<Transfer, String> {
    let (_, mut t) = run_flows(env, dir, 1, len, msg)?;
    Ok(t.remove(0))
}

/// bulk: one stream, `len` bytes up, then `len` bytes down, after a
/// warm-up stream each way (not counted).
pub fn bulk(env: &Env, len: u64) -> Result<Bulk, String> {
    let warm = len.min(WARM_UP);
    one(env, Dir::Up, warm, "bulk warm-up")?;
    one(env, Dir::Down, warm, "bulk warm-up")?;
    Ok(Bulk {
        size_mib: len >> 20,
        upload: one(env, Dir::Up, len, "bulk upload")?,
        download: one(env, Dir::Down, len, "bulk download")?,
    })
}

/// parallel: `k` streams at once, `total / k` bytes each, up then down.
pub fn parallel(env: &Env, k: usize, total: u64) -> Result<Parallel, String> {
    let each = (total / k as u64).max(MIN_FLOW);
    Ok(Parallel {
        streams: k,
        upload: run_flows(env, Dir::Up, k, each, "parallel upload")?.0,
        download: run_flows(env, Dir::Down, k, each, "parallel download")?.0,
    })
}

// ------------------------------------------------------------------ setup

/// One half-closed request/response: connect (with the SOCKS handshake),
/// send the header and a request, shutdown(SHUT_WR), read the reply to EOF
/// and check it.
fn request_reply(env: &Env) -> Result<(), String> {
    let mut s = env
        .dialer
        .open(env.target)
        .map_err(|e| format!("open: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let id = next_id();
    let body = request_body(id, REQUEST_BYTES);
    let mut req = Header {
        kind: Kind::RequestReply,
        id,
        len: REPLY_BYTES as u64,
    }
    .encode()
    .to_vec();
    req.extend_from_slice(&body);
    s.write_all(&req).map_err(|e| format!("request: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut reply = Vec::with_capacity(REPLY_BYTES);
    s.read_to_end(&mut reply)
        .map_err(|e| format!("reply: {e} after {} bytes", reply.len()))?;
    check_reply(&body, &reply, REPLY_BYTES)
}

/// setup: request/response streams from `c` threads at once, `count` in
/// all (or for `duration`). Latency runs from connect to the reply's EOF.
pub fn setup(env: &Env, c: usize, count: usize, duration: Option<Duration>) -> Setup {
    // Warm up (not counted): first connections pay for lazy setup.
    for _ in 0..warmup(c) {
        let _ = request_reply(env);
    }
    let remaining = AtomicUsize::new(count);
    let take = || {
        remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
            .is_ok()
    };
    let bar = env.ui.count_bar(
        duration.is_none().then_some(count as u64),
        &format!("setup, concurrency {c}"),
    );
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let results: Vec<(Vec<u64>, usize, Option<String>)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..c)
            .map(|i| {
                let (bar, take) = (&bar, &take);
                thread::Builder::new()
                    .name(format!("setup {i}"))
                    .spawn_scoped(scope, move || {
                        let mut lat = Vec::new();
                        let mut errors = 0;
                        let mut first = None;
                        loop {
                            match deadline {
                                Some(d) if Instant::now() >= d => break,
                                None if !take() => break,
                                _ => {}
                            }
                            let t0 = Instant::now();
                            match request_reply(env) {
                                Ok(()) => {
                                    lat.push(t0.elapsed().as_nanos() as u64);
                                    bar.inc(1);
                                }
                                Err(e) => {
                                    errors += 1;
                                    first.get_or_insert(e);
                                }
                            }
                        }
                        (lat, errors, first)
                    })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| match w.map(|h| h.join()) {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => (Vec::new(), 1, Some("a setup thread panicked".into())),
                Err(e) => (Vec::new(), 1, Some(format!("cannot start a thread: {e}"))),
            })
            .collect()
    });
    let seconds = start.elapsed();
    bar.finish_and_clear();
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for (l, e, f) in results {
        lat.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let completed = lat.len();
    let s = summarize(&mut lat);
    Setup {
        concurrency: c,
        completed,
        errors,
        first_error,
        seconds: seconds.as_secs_f64(),
        streams_per_s: completed as f64 / seconds.as_secs_f64().max(1e-9),
        latency_us: Latency {
            p50: s.p50,
            p90: s.p90,
            p99: s.p99,
            max: s.max,
            mean: s.mean,
        },
        proxy_cpu_us_per_stream: None,
        bench_cpu_us_per_stream: None,
    }
}

/// Streams the setup scenario opens before it measures, at concurrency `c`.
pub fn warmup(c: usize) -> usize {
    c.min(20)
}

/// Starts and joins empty named threads (with halfpipe's stack size) one
/// after the other, and measures what each costs this process.
pub fn thread_life() -> ThreadLife {
    const THREADS: usize = 2000;
    let cpu = procfs::self_cpu_us;
    let (cpu0, t0) = (cpu(), Instant::now());
    // Only the threads that ran count (a spawn can fail near the limits).
    let lived = (0..THREADS)
        .filter(|i| {
            thread::Builder::new()
                .name(format!("life {i}"))
                .stack_size(halfpipe::runtime::threads::SMALL_STACK)
                .spawn(|| ())
                .is_ok_and(|h| h.join().is_ok())
        })
        .count()
        .max(1);
    let cpu_us = (cpu() - cpu0) / lived as f64;
    let wall_us = t0.elapsed().as_secs_f64() * 1e6 / lived as f64;
    ThreadLife {
        threads: lived,
        cpu_us,
        wall_us,
        handoff_us: handoff_us(),
    }
}

/// Half the round trip of a message between two threads through halfpipe's
/// inbox, each asleep when the other sends: the median of 20 rounds of 500.
/// 0 (not measured) if the echo thread cannot start or stops answering.
fn handoff_us() -> f64 {
    let (ping_tx, ping_rx) = halfpipe::runtime::inbox::inbox::<u32>();
    let (pong_tx, pong_rx) = halfpipe::runtime::inbox::inbox::<u32>();
    let echo = thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            for m in ping_rx.iter() {
                if pong_tx.send(m).is_err() {
                    break;
                }
            }
        });
    let Ok(echo) = echo else {
        return 0.0;
    };
    let rounds: Option<Vec<f64>> = (0..20)
        .map(|_| {
            let t0 = Instant::now();
            for i in 0..500 {
                ping_tx.send(i).ok()?;
                (pong_rx.recv().ok()? == i).then_some(())?;
            }
            Some(t0.elapsed().as_secs_f64() * 1e6 / 1000.0)
        })
        .collect();
    drop(ping_tx);
    let (Ok(()), Some(mut rounds)) = (echo.join(), rounds) else {
        return 0.0; // the echo thread panicked or stopped answering
    };
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

// ------------------------------------------------------------------- hold

/// Samples the daemons until their thread and process counts hold still
/// for half a second (threads start and end asynchronously), at most 15 s.
fn settled(pids: &[u32]) -> Vec<Usage> {
    let mut last = procfs::sample(pids);
    if pids.is_empty() {
        return last;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut still = 0;
    while still < 5 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        let now = procfs::sample(pids);
        let key = |u: &[Usage]| {
            u.iter()
                .map(|x| (x.threads, x.processes))
                .collect::<Vec<_>>()
        };
        if key(&now) == key(&last) {
            still += 1;
        } else {
            still = 0;
        }
        last = now;
    }
    last
}

fn total(us: &[Usage]) -> Usage {
    us.iter().fold(Usage::default(), |a, u| procfs::add(&a, u))
}

fn per_stream(after: u64, before: u64, streams: usize) -> f64 {
    if streams == 0 {
        0.0
    } else {
        (after as f64 - before as f64) / streams as f64
    }
}

/// hold: opens `c` idle streams, checks each echoes a byte end to end, and
/// reports what the daemons in `pids` use before, while holding them, and
/// after closing them. In socks and plain direct mode the streams go to
/// `hold_target` (a poll echo server in a child process); through a relay
/// chain they go to the main targets' echo.
pub fn hold(
    env: &Env,
    c: usize,
    pids: &[u32],
    hold_target: Option<SocketAddr>,
    nofile: u64,
) -> Result<Hold, String> {
    let dest = match (env.dialer.route, hold_target) {
        (Route::Via(_), _) => None,
        (_, Some(t)) => Some(t),
        (_, None) => return Err("no hold target".into()),
    };
    // Our client ends, plus (through a relay chain) the targets' ends.
    let need = c as u64 * if dest.is_none() { 2 } else { 1 } + 128;
    if need > nofile {
        return Err(format!(
            "{c} streams need about {need} descriptors here; the limit is {nofile} (ulimit -n)"
        ));
    }
    let before = settled(pids);
    let streams = Mutex::new(Vec::with_capacity(c));
    let failed = AtomicUsize::new(0);
    let first_error = Mutex::new(None);
    let next = AtomicUsize::new(0);
    let bar = env
        .ui
        .count_bar(Some(c as u64), &format!("hold: opening {c}"));
    let start = Instant::now();
    thread::scope(|scope| {
        for i in 0..16.min(c) {
            let (streams, failed, first_error, next, bar) =
                (&streams, &failed, &first_error, &next, &bar);
            let _ = thread::Builder::new()
                .name(format!("hold {i}"))
                .spawn_scoped(scope, move || {
                    while next.fetch_add(1, Ordering::Relaxed) < c {
                        let opened = match dest {
                            Some(t) => env.dialer.open(t),
                            None => env.dialer.open(env.target).and_then(|mut s| {
                                let h = Header {
                                    kind: Kind::Echo,
                                    id: next_id(),
                                    len: 0,
                                };
                                s.write_all(&h.encode()).map(|()| s)
                            }),
                        };
                        match opened {
                            Ok(s) => streams.lock().push(s),
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                first_error.lock().get_or_insert(e.to_string());
                            }
                        }
                        bar.inc(1);
                    }
                });
        }
    });
    let open_seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut streams = streams.into_inner();
    let held = settled(pids);

    // Every held stream must still carry bytes: one byte there and back.
    for s in streams.iter_mut() {
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let _ = s.write_all(&[0x5a]);
    }
    let mut echo_checked = 0;
    for s in streams.iter_mut() {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_ok() && b[0] == 0x5a {
            echo_checked += 1;
        }
    }
    let opened = streams.len();
    drop(streams);
    let after_close = settled(pids);

    let processes = pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            let (b, h, a) = (before[i], held[i], after_close[i]);
            ProcessHold {
                pid,
                name: procfs::name(pid),
                before: b,
                held: h,
                after_close: a,
                rss_kib_per_stream: per_stream(h.rss_kib, b.rss_kib, opened),
                pss_kib_per_stream: per_stream(h.pss_kib, b.pss_kib, opened),
                threads_per_stream: per_stream(h.threads, b.threads, opened),
            }
        })
        .collect();
    let (b, h, a) = (total(&before), total(&held), total(&after_close));
    Ok(Hold {
        streams: c,
        opened,
        failed: failed.into_inner(),
        first_error: first_error.into_inner(),
        echo_checked,
        open_seconds,
        before: b,
        held: h,
        after_close: a,
        rss_kib_per_stream: per_stream(h.rss_kib, b.rss_kib, opened),
        pss_kib_per_stream: per_stream(h.pss_kib, b.pss_kib, opened),
        threads_per_stream: per_stream(h.threads, b.threads, opened),
        processes,
    })
}

// ------------------------------------------------------------------- slow

/// slow: `k` bulk download streams (`total / k` bytes each) without, then
/// with, one more stream whose reader has stopped while its source keeps
/// sending.
pub fn slow(env: &Env, k: usize, total: u64) -> Result<Slow, String> {
    let each = (total / k as u64).max(MIN_FLOW);
    let (without, _) = run_flows(env, Dir::Down, k, each, "slow: without stalled")?;

    let id = next_id();
    let mut stalled = env
        .dialer
        .open(env.target)
        .map_err(|e| format!("open the stalled stream: {e}"))?;
    let head = Header {
        kind: Kind::Source,
        id,
        len: ENDLESS,
    };
    stalled
        .write_all(&head.encode())
        .map_err(|e| format!("stalled stream header: {e}"))?;
    // Wait until the stalled stream's source is blocked: everything on the
    // way (socket buffers, the proxy's queues) is full.
    let sent = env.registry.progress(id);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = u64::MAX;
    let mut still = 0;
    while still < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        let now = sent.load(Ordering::Relaxed);
        if now == last {
            still += 1;
        } else {
            still = 0;
        }
        last = now;
    }
    let stalled_bytes = sent.load(Ordering::Relaxed);

    let with = run_flows(env, Dir::Down, k, each, "slow: with stalled");
    drop(stalled);
    let (with, _) = with?;
    // The source learns of the close later; forget its record whenever.
    env.registry.remove(id);
    let kept = if without.aggregate_mib_s > 0.0 {
        with.aggregate_mib_s / without.aggregate_mib_s
    } else {
        0.0
    };
    Ok(Slow {
        streams: k,
        without_stalled: without,
        with_stalled: with,
        kept,
        stalled_bytes,
    })
}
