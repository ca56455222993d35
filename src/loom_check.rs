//! Concurrency model check of a stream's three threads: loom runs
//! every interleaving, up to a preemption bound, of a packager, a deliverer
//! and a circuit thread sharing one stream's state, on the half-close paths
//! (docs/protocol.md §7) and the abort paths (§8), and checks that none
//! deadlocks, no FIN is lost or doubled, no DATA follows our FIN, nothing
//! follows END or CLOSED, the peer's FIN shuts our write side once and
//! after all data, both threads end after an abort, and the windows (§10)
//! add up.
//!
//! Real code under test: `Monitor` (src/runtime/monitor.rs, on loom's Mutex
//! and Condvar through src/runtime/sync.rs), the §7 state machine, the §10
//! windows, and the lock-held steps of `halfpipe_proto::stream::StreamState`
//! (`step`, `read_window`, `queue_data`, `accept_data`, `on_sendme`,
//! `delivered`), and `inbox::Bell`. The threads around them mirror, step by
//! step, the functions of src/stream/, src/circuit/ and src/link/ that each
//! comment names; sockets and the link become records: `Model::sent` is the
//! link's outbound queue, `Model::sock` what was done to the TCP connection.
//!
//! Build and run (docs/robustness.md, "Concurrency model check"):
//!
//! ```text
//! CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test --lib loom -- --nocapture
//! ```

use crate::runtime::batch::DataBatch;
use crate::runtime::monitor::{Monitor, Stopped};
use crate::stream::DeliverMsg;
use halfpipe_proto::flow::{
    PackageWindow, CIRCUIT_SENDME_INCREMENT, CIRCUIT_WINDOW_START, STREAM_SENDME_INCREMENT,
    STREAM_WINDOW_START,
};
use halfpipe_proto::halfclose::{Action, CloseCause, Event, State, Violation};
use halfpipe_proto::relay::{end_reason, relay_cmd};
use halfpipe_proto::stream::{
    self, Counters, Delivery, Discard, Gone, Outbound, Queued, StreamState,
};
use loom::sync::atomic::AtomicBool;
use loom::sync::{mpsc, Arc};
use loom::thread;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// What the link's outbound queue received, in queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Data(u32),
    Fin,
    End(u8),
    Sendme(u32),
    /// Not a cell: the moment the stream reached CLOSED, recorded under the
    /// stream's lock in the step that closed it. Nothing may follow it.
    Closed,
}

/// What was done to the stream's TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sock {
    /// The deliverer wrote this many cells' data.
    Write(u32),
    ShutdownWrite,
    /// An abort reset it (`sockets::reset`).
    Reset,
}

/// What the packager's read() returns, in turn. After the last one the
/// application sends nothing more: the read blocks until a reset.
#[derive(Debug, Clone, Copy)]
enum Read {
    Data(u32),
    Eof,
    /// EOF once our write side was shut down: an application that closes
    /// after it has read the peer's FIN.
    EofAfterShutdown,
    /// The application reset the connection (ECONNRESET).
    Error,
}

/// What reaches the circuit thread from the peer, in turn.
#[derive(Debug, Clone, Copy)]
enum Peer {
    Data(u32),
    Fin,
    End,
    Sendme,
    CircuitSendme,
    /// DESTROY: the circuit's teardown (`Circuit::teardown`).
    Destroy,
    /// The peer answers only once our FIN is on the link.
    AwaitFin,
}

/// One scenario: the scripts of the three threads and the starting windows.
#[derive(Clone, Copy)]
struct Scenario {
    reads: &'static [Read],
    peer: &'static [Peer],
    /// Stream and circuit package windows at the start (§10).
    stream_window: u32,
    circuit_window: u32,
    /// `LinkTx::room`: DATA cells that may still be queued on the link.
    room: u32,
    /// Start with the stream deliver window one cell short of a SENDME, so
    /// that the deliverer's SENDME decision races with FIN and END.
    sendme_due: bool,
    /// The application has reset the connection: writes fail.
    app_reset: bool,
    /// The application's EOF must send FIN, exactly once.
    fin: bool,
    /// Both FINs and no abort: the clean half-close checks apply.
    clean: bool,
}

const FULL: Scenario = Scenario {
    reads: &[],
    peer: &[],
    stream_window: STREAM_WINDOW_START,
    circuit_window: CIRCUIT_WINDOW_START,
    room: crate::link::QUEUE_CELLS,
    sendme_due: false,
    app_reset: false,
    fin: false,
    clean: false,
};

/// The `n` of a record `$s` that is `$variant(n)`, else 0.
macro_rules! sum {
    ($s:expr, $variant:path) => {
        if let $variant(n) = $s {
            *n
        } else {
            0
        }
    };
}

/// The state the three threads share: one stream, its circuit's package
/// window and its link, as `Stream` holds them.
struct Model {
    state: Monitor<StreamState>,
    circuit_window: Monitor<PackageWindow>,
    room: Monitor<u32>,
    aborted: AtomicBool,
    /// Set by nobody: for waits that only a condition ends.
    never: AtomicBool,
    sent: Monitor<Vec<Sent>>,
    sock: Monitor<Vec<Sock>>,
    to_deliverer: mpsc::Sender<DeliverMsg>,
    app_reset: bool,
}

/// The model's link queue records the cells.
impl Outbound for Model {
    fn control(&self, command: u8, body: &[u8]) {
        let cell = match command {
            relay_cmd::FIN => Sent::Fin,
            relay_cmd::END => Sent::End(body[0]),
            _ => panic!("unexpected control cell {command}"),
        };
        self.sent.update(|s| s.push(cell));
    }

    fn sendmes(&self, n: u32) {
        self.sent.update(|s| s.push(Sent::Sendme(n)));
    }

    fn data(&self, _cells: Vec<u8>, count: u32) -> Result<(), Gone> {
        self.sent.update(|s| s.push(Sent::Data(count)));
        Ok(())
    }
}

impl Model {
    /// `Stream::handle`: the step under the lock, then the wake-up and the
    /// abort after it.
    fn handle(&self, event: Event) -> Result<Action, Violation> {
        let step = {
            let mut st = self.state.lock();
            let step = st.step(event, self)?;
            if step.from != step.to && st.hc.is_closed() {
                self.sent.update(|s| s.push(Sent::Closed));
            }
            step
        };
        if step.from != step.to {
            self.state.kick();
        }
        if matches!(step.action, Action::SendEndAndReset(_) | Action::Reset) {
            self.abort_io();
        }
        Ok(step.action)
    }

    /// `Stream::abort_io` (a connected stream) and `Stream::force_stop`.
    fn abort_io(&self) {
        self.aborted.store(true, Ordering::Release);
        self.circuit_window.kick();
        self.room.kick(); // LinkTx::kick
        self.state.kick();
        self.sock.update(|s| s.push(Sock::Reset));
        let _ = self.to_deliverer.send(DeliverMsg::Abort);
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// `stream::packager::stopped`.
    fn stopped(&self) {
        if !self.is_aborted() {
            let _ = self.handle(Event::Error {
                reason: end_reason::MISC,
            });
        }
    }

    /// The packager's read() of at most `window` cells: the script, or an
    /// error once the connection was reset; a read with nothing more to
    /// come blocks until then. Data left unread stays for the next read.
    fn read(&self, script: &mut impl Iterator<Item = Read>, unread: &mut u32, window: u32) -> Read {
        let reset = |s: &mut Vec<Sock>| s.contains(&Sock::Reset);
        let next = if *unread > 0 {
            Some(Read::Data(std::mem::take(unread)))
        } else {
            script.next()
        };
        let next = match next {
            Some(Read::Data(n)) if n > window => {
                *unread = n - window;
                Some(Read::Data(window))
            }
            other => other,
        };
        match next {
            Some(Read::EofAfterShutdown) => self
                .sock
                .wait_until(&self.never, |s| {
                    if reset(s) {
                        Some(Read::Error)
                    } else {
                        s.contains(&Sock::ShutdownWrite).then_some(Read::Eof)
                    }
                })
                .expect("never stopped"),
            Some(_) if reset(&mut self.sock.lock()) => Read::Error,
            Some(r) => r,
            None => {
                let wait = self
                    .sock
                    .wait_until(&self.never, |s| reset(s).then_some(()));
                wait.expect("never stopped");
                Read::Error
            }
        }
    }

    /// A write or shutdown on the TCP connection: fails once it was reset
    /// (or if the application reset it).
    fn on_socket(&self, op: Sock) -> Result<(), ()> {
        self.sock.update(|s| {
            if self.app_reset || s.contains(&Sock::Reset) {
                return Err(());
            }
            s.push(op);
            Ok(())
        })
    }
}

/// `stream::packager::package_loop`, reading the script.
fn packager(m: &Model, reads: &[Read]) {
    let mut reads = reads.iter().copied();
    let mut unread = 0;
    loop {
        // Reads while the stream window is open, from one cell up.
        let window = m.state.wait_until(&m.aborted, |st| st.read_window());
        let window = match window {
            Ok(0) => return,
            Err(_) => return m.stopped(),
            Ok(w) => w,
        };
        match m.read(&mut reads, &mut unread, window) {
            Read::Data(n) => {
                if send_cells(m, n).is_err() {
                    return m.stopped();
                }
            }
            Read::Eof | Read::EofAfterShutdown => {
                let _ = m.handle(Event::ReadEof);
                return;
            }
            Read::Error => {
                if !m.is_aborted() {
                    let _ = m.handle(Event::Error {
                        reason: end_reason::CONNRESET,
                    });
                }
                return;
            }
        }
    }
}

/// `stream::packager::send_cells`, with `LinkTx::reserve` and
/// `LinkTx::unreserve`.
fn send_cells(m: &Model, cells: u32) -> Result<(), ()> {
    let mut sent = 0;
    while sent < cells {
        let k = m
            .circuit_window
            .wait_until(&m.aborted, |w| take_some(w, cells - sent))
            .map_err(drop)?;
        let reserved = m
            .room
            .wait_until(&m.aborted, |room| (*room >= k).then(|| *room -= k));
        if reserved.is_err() {
            m.circuit_window.update(|w| w.give_back(k));
            return Err(());
        }
        let mut st = m.state.lock();
        match st.queue_data(Vec::new(), k, u64::from(k), Instant::now(), m) {
            Ok(Queued::Sent) => {}
            Ok(Queued::MayNotPackage) => {
                drop(st);
                m.circuit_window.update(|w| w.give_back(k));
                m.room.update(|room| *room += k);
                return Err(());
            }
            Err(Gone) => return Err(()),
        }
        drop(st);
        sent += k;
    }
    Ok(())
}

/// `stream::deliverer` after it has its socket, with `DataBatch::write_to`
/// writing each batch whole.
fn deliverer(m: &Model, rx: &mpsc::Receiver<DeliverMsg>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            DeliverMsg::Data(batch) => {
                let cells = batch.cells() as u32;
                if m.on_socket(Sock::Write(cells)).is_err() {
                    if !m.is_aborted() {
                        let _ = m.handle(Event::Error {
                            reason: end_reason::CONNRESET,
                        });
                    }
                    return;
                }
                m.state
                    .lock()
                    .delivered(cells, batch.bytes(), Instant::now(), m);
            }
            DeliverMsg::Fin => {
                if m.on_socket(Sock::ShutdownWrite).is_err() && !m.is_aborted() {
                    let _ = m.handle(Event::Error {
                        reason: end_reason::CONNRESET,
                    });
                }
                return;
            }
            DeliverMsg::Abort | DeliverMsg::Refused(_) => return,
            DeliverMsg::Connected(_) => unreachable!("an exit stream"),
        }
    }
}

/// The circuit thread's part, `Circuit::on_data`, `on_fin`, `on_end`,
/// `on_stream_sendme`, the circuit SENDME and `teardown`, for the script.
fn circuit(m: &Model, peer: &[Peer]) {
    for p in peer {
        match *p {
            Peer::Data(n) => {
                // One run of `n` cells, as `Circuit::on_data` takes it.
                if n > 0
                    && m.state.lock().accept_data(n, m).expect("no violation") == Delivery::Deliver
                {
                    let arrival = std::sync::Arc::new(vec![0u8; n as usize]);
                    let cells = (0..n).map(|i| (i, 1)).collect();
                    let batch = DataBatch::from_arrival(&arrival, cells);
                    let _ = m.to_deliverer.send(DeliverMsg::Data(batch));
                }
            }
            Peer::Fin => {
                if m.handle(Event::FinReceived).expect("no violation")
                    == Action::DeliverThenShutdownWrite
                {
                    let _ = m.to_deliverer.send(DeliverMsg::Fin);
                }
            }
            Peer::End => {
                let _ = m.handle(Event::EndReceived {
                    reason: end_reason::DONE,
                });
            }
            // `StreamMap::on_stream_sendme` through the circuit's
            // `StreamEntry`: the step under the lock, then the wake-up.
            Peer::Sendme => {
                let wake = m.state.update(|st| st.on_sendme()).expect("in window");
                if wake == stream::Wake::Packager {
                    m.state.kick();
                }
            }
            Peer::CircuitSendme => m
                .circuit_window
                .update(|w| w.on_sendme())
                .expect("in window"),
            Peer::Destroy => {
                let end = Event::EndReceived {
                    reason: end_reason::DESTROY,
                };
                if let Ok(Action::Nothing) = m.handle(end) {
                    m.abort_io(); // force_stop
                }
                m.circuit_window.close();
            }
            Peer::AwaitFin => m
                .sent
                .wait_until(&m.never, |s| s.contains(&Sent::Fin).then_some(()))
                .expect("never stopped"),
        }
    }
}

/// Takes up to `wanted` cells of a package window that is open: how the
/// model's packager takes its circuit window from a `Monitor` (the
/// daemon's packagers wait in `FairWindow::take`, which has unit tests).
fn take_some(window: &mut PackageWindow, wanted: u32) -> Option<u32> {
    let took = window.take(wanted);
    (took > 0).then_some(took)
}

/// Runs one scenario under loom and checks every execution's outcome.
fn check(name: &str, sc: Scenario) {
    explore(name, move || run(sc));
}

/// Runs `model` in every interleaving loom explores, and says how many.
fn explore(name: &str, model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    let bound = builder.preemption_bound;
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let start = Instant::now();
    builder.check(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        model();
    });
    eprintln!(
        "loom_check::{name}: {} interleavings in {:.1} s (preemption bound {})",
        runs.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        bound.map_or("none".to_string(), |b| b.to_string()),
    );
}

/// One execution: start the three threads, join them, check the records.
fn run(sc: Scenario) {
    let mut st = StreamState::new(Instant::now());
    st.connected = true;
    st.package.take(STREAM_WINDOW_START - sc.stream_window);
    if sc.sendme_due {
        // 49 cells received and written: the next one written earns a
        // SENDME (§10: 50 written, deliver window at most 450).
        assert_eq!(st.accept_data(49, &Discard), Ok(Delivery::Deliver));
        st.delivered(49, 49, Instant::now(), &Discard);
    }
    let before = st.counters;
    let mut circuit_window = PackageWindow::circuit();
    circuit_window.take(CIRCUIT_WINDOW_START - sc.circuit_window);

    let (to_deliverer, rx) = mpsc::channel();
    let m = Arc::new(Model {
        state: Monitor::new(st),
        circuit_window: Monitor::new(circuit_window),
        room: Monitor::new(sc.room),
        aborted: AtomicBool::new(false),
        never: AtomicBool::new(false),
        sent: Monitor::new(Vec::new()),
        sock: Monitor::new(Vec::new()),
        to_deliverer,
        app_reset: sc.app_reset,
    });
    let pk = thread::spawn({
        let m = m.clone();
        move || packager(&m, sc.reads)
    });
    let dl = thread::spawn({
        let m = m.clone();
        move || {
            deliverer(&m, &rx);
            rx
        }
    });
    let circ = thread::spawn({
        let m = m.clone();
        move || circuit(&m, sc.peer)
    });
    // Every thread ends: loom reports a deadlock if any waits forever.
    pk.join().expect("packager panicked");
    let rx = dl.join().expect("deliverer panicked");
    circ.join().expect("circuit thread panicked");
    // Messages a deliverer that stopped left behind (crossbeam drops them
    // with the channel; loom wants them taken).
    while rx.try_recv().is_ok() {}

    verify(&sc, &m, before);
}

/// The checks on one execution's records.
fn verify(sc: &Scenario, m: &Model, before: Counters) {
    let sent = m.sent.lock().clone();
    let sock = m.sock.lock().clone();
    let st = m.state.lock();
    let trace = || format!("sent {sent:?}, socket {sock:?}, state {}", st.hc.state());
    let count = |f: fn(&Sent) -> bool| sent.iter().filter(|s| f(s)).count();
    let first = |f: fn(&Sent) -> bool| sent.iter().position(f);
    let data_sent: u32 = sent.iter().map(|s| sum!(s, Sent::Data)).sum();
    let sendmes: u32 = sent.iter().map(|s| sum!(s, Sent::Sendme)).sum();
    let written: u32 = sock.iter().map(|s| sum!(s, Sock::Write)).sum();
    let app_data: u32 = sc.reads.iter().map(|r| sum!(r, Read::Data)).sum();
    let peer_data: u32 = sc.peer.iter().map(|p| sum!(p, Peer::Data)).sum();
    let peer = |p: fn(&Peer) -> bool| sc.peer.iter().filter(|x| p(x)).count() as u32;

    // Cell order (§7, §8): FIN at most once and no DATA after it; END at
    // most once; nothing after END, nor after the stream reached CLOSED.
    let fins = count(|s| *s == Sent::Fin);
    assert!(fins <= 1, "FIN twice: {}", trace());
    if let Some(fin) = first(|s| *s == Sent::Fin) {
        let data_after = sent[fin..].iter().any(|s| matches!(s, Sent::Data(_)));
        assert!(!data_after, "DATA after FIN: {}", trace());
    }
    let ends = count(|s| matches!(s, Sent::End(_)));
    assert!(ends <= 1, "END twice: {}", trace());
    if let Some(end) = first(|s| matches!(s, Sent::End(_))) {
        assert_eq!(sent[end + 1..], [Sent::Closed], "after END: {}", trace());
    }
    assert!(count(|s| *s == Sent::Closed) <= 1, "{}", trace());
    if let Some(closed) = first(|s| *s == Sent::Closed) {
        assert_eq!(closed, sent.len() - 1, "after CLOSED: {}", trace());
    }
    if sc.fin {
        assert_eq!(fins, 1, "FIN lost: {}", trace());
    }

    // The TCP connection: shutdown(SHUT_WR) at most once, nothing written
    // after it or after a reset.
    let shutdowns = sock.iter().filter(|&&s| s == Sock::ShutdownWrite).count();
    assert!(shutdowns <= 1, "shutdown twice: {}", trace());
    if let Some(last_write) = sock.iter().rposition(|s| matches!(s, Sock::Write(_))) {
        let stop = sock.iter().position(|s| !matches!(s, Sock::Write(_)));
        assert!(
            stop.map_or(true, |stop| last_write < stop),
            "write after: {}",
            trace()
        );
    }

    // Windows (§10): what the packager took is on the link or was given
    // back; SENDMEs add what they should; counters match the records.
    assert_eq!(
        m.circuit_window.lock().value() + data_sent,
        sc.circuit_window + peer(|p| matches!(p, Peer::CircuitSendme)) * CIRCUIT_SENDME_INCREMENT,
        "circuit package window: {}",
        trace()
    );
    assert_eq!(
        *m.room.lock() + data_sent,
        sc.room,
        "link room: {}",
        trace()
    );
    let package = st.package.value();
    let gained = package + data_sent - sc.stream_window;
    assert!(
        package <= STREAM_WINDOW_START
            && gained % STREAM_SENDME_INCREMENT == 0
            && gained <= peer(|p| matches!(p, Peer::Sendme)) * STREAM_SENDME_INCREMENT,
        "stream package window {package}: {}",
        trace()
    );
    assert_eq!(
        u64::from(st.deliver.value()) + st.counters.cells_received,
        u64::from(STREAM_WINDOW_START + sendmes * STREAM_SENDME_INCREMENT),
        "stream deliver window: {}",
        trace()
    );
    let packaged = st.counters.cells_packaged - before.cells_packaged;
    assert_eq!(packaged, u64::from(data_sent), "{}", trace());
    let delivered = st.counters.cells_delivered - before.cells_delivered;
    assert_eq!(delivered, u64::from(written), "{}", trace());

    if sc.clean {
        // §7 with no abort: all our DATA, then our FIN; all the peer's
        // data written, then our write side shut; CLOSED, finished.
        assert_eq!(ends, 0, "{}", trace());
        assert_eq!(data_sent, app_data, "DATA lost: {}", trace());
        assert_eq!(written, peer_data, "delivery lost: {}", trace());
        assert_eq!(sock.last(), Some(&Sock::ShutdownWrite), "{}", trace());
        let finished = State::Closed(CloseCause::Finished);
        assert_eq!(st.hc.state(), finished, "{}", trace());
        assert!(!m.is_aborted());
    } else {
        // An abort (§8): CLOSED, the connection reset, both threads gone.
        assert!(st.hc.is_closed(), "{}", trace());
        assert!(sock.contains(&Sock::Reset), "no reset: {}", trace());
        assert!(m.is_aborted());
    }
}

// ------------------------------------------------------------- half-close

/// A request, EOF, then the answer and the peer's FIN: the exchange Tor
/// loses. The stream window opens only with a SENDME, so the packager
/// also waits on its window.
#[test]
fn loom_half_close_app_eof_first() {
    check(
        "half_close_app_eof_first",
        Scenario {
            reads: &[Read::Data(2), Read::Eof],
            peer: &[Peer::Sendme, Peer::AwaitFin, Peer::Data(2), Peer::Fin],
            stream_window: 1,
            sendme_due: true,
            fin: true,
            clean: true,
            ..FULL
        },
    );
}

/// The peer's FIN first; the application closes once it has read it.
#[test]
fn loom_half_close_peer_fin_first() {
    check(
        "half_close_peer_fin_first",
        Scenario {
            reads: &[Read::Data(1), Read::EofAfterShutdown],
            peer: &[Peer::Data(2), Peer::Fin],
            sendme_due: true,
            fin: true,
            clean: true,
            ..FULL
        },
    );
}

/// Both FINs at once, each direction with data before it.
#[test]
fn loom_half_close_both_at_once() {
    check(
        "half_close_both_at_once",
        Scenario {
            reads: &[Read::Data(1), Read::Eof],
            peer: &[Peer::Data(1), Peer::Fin],
            sendme_due: true,
            fin: true,
            clean: true,
            ..FULL
        },
    );
}

// ------------------------------------------------------------------ abort

/// END while the packager waits for the stream window: only the abort
/// can end that wait.
#[test]
fn loom_end_while_packager_waits_for_stream_window() {
    check(
        "end_while_packager_waits_for_stream_window",
        Scenario {
            reads: &[Read::Data(2)],
            peer: &[Peer::End],
            stream_window: 0,
            ..FULL
        },
    );
}

/// END while the packager waits for the circuit window: only the abort
/// (its cancel flag and kick) can end that wait.
#[test]
fn loom_end_while_packager_waits_for_circuit_window() {
    check(
        "end_while_packager_waits_for_circuit_window",
        Scenario {
            reads: &[Read::Data(2)],
            peer: &[Peer::End],
            circuit_window: 0,
            ..FULL
        },
    );
}

/// The SENDMEs that open both windows race the END: the packager may wake
/// for either and must not send after the END.
#[test]
fn loom_sendmes_race_end() {
    check(
        "sendmes_race_end",
        Scenario {
            reads: &[Read::Data(2)],
            peer: &[Peer::Sendme, Peer::CircuitSendme, Peer::End],
            stream_window: 0,
            circuit_window: 0,
            ..FULL
        },
    );
}

/// END while the packager waits for room in the link's queue: it gives the
/// circuit window back.
#[test]
fn loom_end_while_packager_waits_for_link_room() {
    check(
        "end_while_packager_waits_for_link_room",
        Scenario {
            reads: &[Read::Data(2)],
            peer: &[Peer::End],
            room: 1,
            ..FULL
        },
    );
}

/// END while the deliverer writes, its SENDME decision racing the END.
#[test]
fn loom_end_while_deliverer_writes() {
    check(
        "end_while_deliverer_writes",
        Scenario {
            reads: &[Read::Data(1)],
            peer: &[Peer::Data(2), Peer::End],
            sendme_due: true,
            ..FULL
        },
    );
}

/// The application resets its connection: the packager's read and the
/// deliverer's write both fail, and each may decide END.
#[test]
fn loom_local_reset() {
    check(
        "local_reset",
        Scenario {
            reads: &[Read::Data(1), Read::Error],
            peer: &[Peer::Data(1), Peer::Sendme],
            stream_window: 1,
            app_reset: true,
            ..FULL
        },
    );
}

/// DESTROY while the packager waits for the circuit window: the END the
/// teardown feeds and the closed circuit window both end the wait.
#[test]
fn loom_destroy_while_packager_waits() {
    check(
        "destroy_while_packager_waits",
        Scenario {
            reads: &[Read::Data(1)],
            peer: &[Peer::Data(1), Peer::Destroy],
            circuit_window: 0,
            ..FULL
        },
    );
}

/// DESTROY after both FINs, the deliverer maybe still writing: the stream
/// is CLOSED already, so the teardown stops it (`force_stop`).
#[test]
fn loom_destroy_after_both_fins() {
    check(
        "destroy_after_both_fins",
        Scenario {
            reads: &[Read::Eof],
            peer: &[Peer::AwaitFin, Peer::Data(1), Peer::Fin, Peer::Destroy],
            fin: true,
            ..FULL
        },
    );
}

// ---------------------------------------------------------------- Monitor

/// How the waker ends the wait in `loom_monitor_wait_ends`.
#[derive(Clone, Copy, Debug)]
enum Wake {
    Update,
    Close,
    Cancel,
}

/// `Monitor` alone: a wait ends on an update that makes its condition
/// true, on `close`, and on its cancel flag with `kick`, whichever thread
/// runs first (each of the three is what some stream wait relies on).
#[test]
fn loom_monitor_wait_ends() {
    for how in [Wake::Update, Wake::Close, Wake::Cancel] {
        explore(&format!("monitor_wait_ends_on_{how:?}"), move || {
            let m = Arc::new(Monitor::new(0u32));
            let cancel = Arc::new(AtomicBool::new(false));
            let waker = thread::spawn({
                let (m, cancel) = (m.clone(), cancel.clone());
                move || match how {
                    Wake::Update => m.update(|v| *v = 1),
                    Wake::Close => m.close(),
                    Wake::Cancel => {
                        cancel.store(true, Ordering::Release);
                        m.kick();
                    }
                }
            });
            let got = m.wait_until(&*cancel, |v| (*v > 0).then_some(*v));
            let want = match how {
                Wake::Update => Ok(1),
                Wake::Close => Err(Stopped::Closed),
                Wake::Cancel => Err(Stopped::Cancelled),
            };
            assert_eq!(got, want);
            waker.join().expect("waker panicked");
        });
    }
}

/// `inbox::Bell`, the wake-up handshake of the threads' inboxes: a
/// receiver that goes to sleep while senders queue never misses a message
/// or the last sender's goodbye (loom reports a receiver parked for good as
/// a deadlock). The queue is an atomic counter with release on send and
/// acquire on receive, no stronger than crossbeam's channel. Mutation
/// check: a receiver that sleeps without the compare-exchange (a plain
/// store of SLEEPING) is caught as a deadlock.
#[test]
fn loom_bell_never_loses_a_wake_up() {
    use crate::runtime::inbox::Bell;
    use loom::sync::atomic::AtomicUsize as LoomUsize;
    for senders in [1usize, 2] {
        explore(&format!("bell_{senders}_senders"), move || {
            let bell = Arc::new(Bell::new());
            let queued = Arc::new(LoomUsize::new(0));
            let connected = Arc::new(LoomUsize::new(senders));
            let handles: Vec<_> = (0..senders)
                .map(|_| {
                    let (bell, queued, connected) =
                        (bell.clone(), queued.clone(), connected.clone());
                    thread::spawn(move || {
                        // `InboxTx::send`, then `InboxTx::drop`.
                        queued.fetch_add(1, Ordering::Release);
                        bell.ring();
                        connected.fetch_sub(1, Ordering::Release);
                        bell.ring();
                    })
                })
                .collect();
            // `Inbox::iter`: receive until disconnected and empty.
            let mut taken = 0;
            loop {
                let got = bell.wait(None, || {
                    if queued.load(Ordering::Acquire) > taken {
                        Some(true)
                    } else if connected.load(Ordering::Acquire) == 0 {
                        // Disconnected: look once more, as crossbeam does.
                        (queued.load(Ordering::Acquire) > taken)
                            .then_some(true)
                            .or(Some(false))
                    } else {
                        None
                    }
                });
                match got {
                    Some(true) => taken += 1,
                    Some(false) => break,
                    None => unreachable!("no deadline"),
                }
            }
            assert_eq!(taken, senders);
            handles
                .into_iter()
                .for_each(|h| h.join().expect("sender panicked"));
        });
    }
}
