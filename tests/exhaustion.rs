//! A peer that exhausts the exit's threads. In a test binary of
//! its own because cargo runs test binaries one after the other: the
//! thousands of threads it makes the exit start must not share the machine
//! with the other integration tests (in one CI run, a test running beside
//! it could not start a thread for a moment).

// The integration tests' helpers (it allows what this binary leaves unused).
#[path = "it/util.rs"]
mod util;

use halfpipe_proto::cell::{self, cmd, destroy_reason};
use halfpipe_proto::relay::{self, end_reason, relay_cmd};
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Instant;
use util::*;

/// A target that accepts and holds every connection, with no thread per
/// connection (it must hold thousands).
struct Holder {
    addr: std::net::SocketAddr,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

fn holder() -> Holder {
    // A long accept queue: with std's 128, a burst of thousands of
    // connections overflows it, and the kernel then completes the rest
    // only as SYN-ACKs are retried, seconds apart.
    let listener = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        s.listen(8192).unwrap();
        TcpListener::from(s)
    };
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            keep.lock().unwrap().push(conn);
        }
    });
    Holder { addr, held }
}

#[test]
fn thread_exhaustion_is_end_resourcelimit_and_threads_return() {
    // R5.11: peers open streams until the process cannot take more:
    // two links, each 10 circuits × 1,000 BEGINs, to a target that holds
    // every connection. The exit takes as many as its start-up capacity
    // line says (two threads each, below what the kernel allows:
    // src/process/limits.rs), answers the rest END(RESOURCELIMIT), never
    // aborts, and returns to its baseline thread count once the circuits
    // are destroyed. Two links, one after the other: one link alone may
    // not take the last quarter of the slots (the source fair share,
    // docs/robustness.md), so the first gets three quarters and the second
    // the rest.
    let mut d = Daemon::exit(&["--exit-policy", "accept *:*"]);
    let out = d.stdout();
    let capacity: usize = out
        .split("capacity: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no capacity line in {out:?}"));
    let target = holder();
    let baseline = d.thread_count();
    let body = {
        let mut b = target.addr.to_string().into_bytes();
        b.push(0);
        b
    };
    let (tx, rx) = mpsc::channel();
    let mut links = Vec::new();
    for link in 0..2usize {
        let mut l = RawLink::connect(d.link());
        let circs: Vec<u32> = (0..10).map(|_| fresh_circ()).collect();
        for &c in &circs {
            l.create_circuit(c);
        }
        let w = l.sock.try_clone().unwrap();
        // The reader ends when the test shuts the link down, however long
        // the teardown of thousands of threads takes.
        l.sock.set_read_timeout(None).unwrap();
        let tx = tx.clone();
        let reader = thread::spawn(move || {
            while let Some(c) = l.recv_cell() {
                if tx.send((link, c)).is_err() {
                    break;
                }
            }
        });
        links.push((w, circs, reader));
    }
    drop(tx);
    let (mut connected, mut limited) = ([0usize; 2], 0usize);
    for (i, (w, circs, _)) in links.iter().enumerate() {
        let mut out = Vec::new();
        for &c in circs {
            for sid in 1..=1_000u16 {
                relay::encode(&mut out, c, relay_cmd::BEGIN, sid, &body);
            }
        }
        (&*w).write_all(&out).unwrap();
        // Every answer of this link before the next link asks.
        while connected[0] + connected[1] + limited < 10_000 * (i + 1) {
            let (link, c) = rx
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|e| panic!("{e} after {connected:?} + {limited} answers"));
            assert_eq!(link, i, "an answer on a link that has asked nothing yet");
            match relay_of(&c) {
                Some((relay_cmd::CONNECTED, _, _)) => connected[link] += 1,
                Some((relay_cmd::END, _, b)) if b == [end_reason::RESOURCELIMIT] => limited += 1,
                Some((relay_cmd::SENDME, _, _)) => {}
                other => panic!("unexpected answer {other:?} (command {})", c.command),
            }
        }
    }
    let total = connected[0] + connected[1];
    eprintln!(
        "thread exhaustion: capacity {capacity}, {connected:?} CONNECTED per link, {limited} END(RESOURCELIMIT), {} threads at the peak",
        d.thread_count()
    );
    assert!(d.is_running(), "the exit died:\n{}", d.log());
    assert_eq!(total, capacity.min(20_000));
    assert_eq!(limited, 20_000 - total);
    // The first link stops once it holds half the slots and less than a
    // quarter are free: at the first count that leaves less than a quarter
    // free. Its 10 circuits take slots at the same moment, so each may pass
    // the check once more.
    let share = (0..=capacity)
        .find(|n| (capacity - n) * 4 < capacity)
        .unwrap();
    assert!(
        (share..=share + 10).contains(&connected[0]),
        "the first link took {} of {capacity} streams, its share is {share}",
        connected[0]
    );
    // Connections complete in the kernel before the holder accepts them.
    eventually("the target holds every connection", || {
        (target.held.lock().unwrap().len() == total).then_some(())
    });
    for (w, circs, _) in &links {
        let mut out = Vec::new();
        for &c in circs {
            cell::encode_fixed(&mut out, c, cmd::DESTROY, &[destroy_reason::REQUESTED]);
        }
        (&*w).write_all(&out).unwrap();
    }
    let destroyed = Instant::now();
    d.wait_for_threads(baseline + 4); // the raw links' readers and writers
    eprintln!(
        "thread exhaustion: back to baseline {:?} after the DESTROYs",
        destroyed.elapsed()
    );
    for (w, _, reader) in links {
        w.shutdown(Shutdown::Both).unwrap();
        reader.join().unwrap();
    }
    d.wait_for_threads(baseline);
    assert!(d.is_running());
}
