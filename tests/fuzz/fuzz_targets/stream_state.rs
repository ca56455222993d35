//! One stream's state machine (docs/protocol.md §7 half-close, §8 abort,
//! §9 late cells, §10 windows), driven by random sequences of the things
//! that happen to a stream, fed as the daemon's src/stream/ and
//! src/circuit/ feed them. The lock-held steps are the real ones:
//! `StreamState::step`, `read_window`, `queue_data`, `accept_data`,
//! `on_sendme` and `delivered` (on the `HalfClose`, `PackageWindow` and
//! `StreamDeliverWindow` inside it), with an `Outbound` that records what
//! they queue; the circuit's windows are the real `PackageWindow` (take,
//! give_back) and `CircuitDeliverWindow`. What the threads do around those
//! calls (waits, reads, writes, abort I/O, the circuit thread's checks) is
//! mirrored here.
//! The threads are replaced by explicit steps, so any interleaving of
//! packager, deliverer and circuit thread can be chosen, e.g. an END
//! arriving between the packager taking circuit window and queueing its
//! DATA.
//!
//! Input (`arbitrary`): the role (client or exit), whether the peer obeys
//! the rules (then steps that the model says are violations are skipped,
//! to reach deeper states), the client's optimistic data, and the steps.
//!
//! Checks after every step, against an independent model:
//! - No DATA packaged after our FIN; at most one FIN and one END.
//! - Nothing sent on the stream after our END or after the peer's END, and
//!   nothing at all after the circuit's DESTROY; CONNECTED before DATA.
//! - Windows never above their start values, never below 0, and equal to
//!   what the model counts from the cells sent and received (§10).
//! - Every violation (§7: DATA or FIN after the peer's FIN; §10: DATA past
//!   the deliver window, SENDME lifting a package window above its start;
//!   §5/§11: DATA, FIN or a second CONNECTED at a client before or after
//!   CONNECTED) is reported, and nothing else is. (A circuit SENDME is
//!   judged with the cells a packager has taken window for counted as
//!   sent; see `Sim::circ_window`.)
//! - The deliverer writes only DATA accepted, in order, the peer's FIN
//!   after all of it, and the stream is CLOSED when both threads end.
#![no_main]

use arbitrary::Arbitrary;
use halfpipe_proto::flow::{
    CircuitDeliverWindow, PackageWindow, CIRCUIT_SENDME_INCREMENT, CIRCUIT_WINDOW_START,
    STREAM_SENDME_INCREMENT, STREAM_WINDOW_START,
};
use halfpipe_proto::halfclose::{Action, Event, State, Violation};
use halfpipe_proto::relay::{end_reason, relay_cmd};
use halfpipe_proto::stream::{Delivery, Gone, Outbound, Queued, StreamState, Wake};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::Instant;

/// `stream::MAX_READ_CELLS` and the packager's first read size.
const MAX_READ_CELLS: u32 = 512;
const FIRST_READ_CELLS: u32 = 8;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    /// Packager: read() returned data for `cells` cells (0: EOF).
    PkRead {
        cells: u8,
    },
    /// Packager: one loop with nothing in between: read `cells` cells
    /// (0: EOF), take circuit window, queue the DATA (as far as the windows
    /// allow; what is left waits for the steps below).
    PkPackage {
        cells: u8,
    },
    /// Packager, `send_cells`: take circuit package window for what it holds.
    PkTakeCircuit,
    /// Packager, `send_cells`: room in the link queue reserved; under the
    /// stream lock, check the state, take stream window, queue DATA.
    PkCommit,
    /// Packager, `send_cells`: the link is going away while reserving.
    PkLinkGone,
    /// Packager: read() failed.
    PkReadError {
        reason: u8,
    },
    /// Exit packager: the connect to the target finished.
    ExitConnect {
        ok: bool,
        reason: u8,
    },
    /// Deliverer: the kernel accepted up to `cells` cells' data.
    DlWrite {
        cells: u8,
    },
    /// Deliverer: write() failed.
    DlWriteError {
        reason: u8,
    },
    /// Circuit thread: cells from the peer.
    PeerData,
    PeerFin,
    PeerEnd {
        reason: u8,
    },
    PeerSendme,
    PeerCircuitSendme,
    PeerConnected,
    /// Circuit thread: `--idle-timeout` expired for the stream.
    IdleTimeout,
    /// The circuit ends: 0 shutdown deadline, 1 DESTROY received, 2 link lost.
    Teardown {
        how: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    exit: bool,
    honest_peer: bool,
    /// Client: cells of optimistic data sent right after BEGIN (0-10; the
    /// SOCKS session hands over at most about 4 KiB).
    initial: u8,
    ops: Vec<Op>,
}

/// What we sent: stream cells, and the circuit cells that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Data,
    Fin,
    End(u8),
    Sendme,
    Connected,
    CircuitSendme,
    Destroy(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pk {
    Connecting,
    Idle,
    /// Read `rest` cells not yet queued.
    Holding {
        rest: u32,
    },
    Taken {
        rest: u32,
        m: u32,
    },
    Ended,
}

/// `Outbound` for the model: records what `StreamState` queues.
#[derive(Default)]
struct Recorder(RefCell<Vec<Sent>>);

impl Outbound for Recorder {
    fn control(&self, command: u8, body: &[u8]) {
        let cell = match command {
            relay_cmd::FIN => Sent::Fin,
            relay_cmd::END => Sent::End(body[0]),
            other => panic!("unexpected control cell {other}"),
        };
        self.0.borrow_mut().push(cell);
    }

    fn sendmes(&self, n: u32) {
        for _ in 0..n {
            self.0.borrow_mut().push(Sent::Sendme);
        }
    }

    fn data(&self, _cells: Vec<u8>, count: u32) -> Result<(), Gone> {
        for _ in 0..count {
            self.0.borrow_mut().push(Sent::Data);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dl {
    /// Exit: waiting for the packager's socket.
    WaitSocket,
    /// Client: waiting for CONNECTED or a refusal to answer SOCKS.
    WaitAnswer,
    Running,
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DlMsg {
    Data,
    Fin,
}

struct Sim {
    exit: bool,
    // The real pieces: the stream's locked state (its lock-held steps are
    // `StreamState` methods), the circuit's windows.
    st: StreamState,
    out: Recorder,
    circ_package: PackageWindow,
    circ_deliver: CircuitDeliverWindow,
    aborted: bool,
    in_table: bool,
    pk: Pk,
    read_cells: u32,
    dl: Dl,
    dl_queue: VecDeque<DlMsg>,
    // What went out, and the model's counters.
    wire: Vec<Sent>,
    data_sent: u32,
    reserved: u32,
    /// Circuit credit dropped by `give_back` (see `circ_window`).
    forfeited: u32,
    sendmes_got: u32,
    circ_sendmes_got: u32,
    data_got: u32,
    circ_data_got: u32,
    sendmes_sent: u32,
    circ_sendmes_sent: u32,
    delivered: u32,
    fin_sent: bool,
    end_sent: bool,
    end_got: bool,
    peer_fin: bool,
    over: bool,
}

impl Sim {
    fn new(exit: bool, initial: u8) -> Sim {
        let initial = u32::from(initial % 11);
        Sim {
            exit,
            st: StreamState::new(Instant::now()),
            out: Recorder::default(),
            circ_package: PackageWindow::circuit(),
            circ_deliver: CircuitDeliverWindow::default(),
            aborted: false,
            in_table: true,
            pk: match (exit, initial) {
                (true, _) => Pk::Connecting,
                (false, 0) => Pk::Idle,
                // client_packager: optimistic data goes to send_cells first.
                (false, n) => Pk::Holding { rest: n },
            },
            read_cells: FIRST_READ_CELLS,
            dl: if exit { Dl::WaitSocket } else { Dl::WaitAnswer },
            dl_queue: VecDeque::new(),
            wire: Vec::new(),
            data_sent: 0,
            reserved: 0,
            forfeited: 0,
            sendmes_got: 0,
            circ_sendmes_got: 0,
            data_got: 0,
            circ_data_got: 0,
            sendmes_sent: 0,
            circ_sendmes_sent: 0,
            delivered: 0,
            fin_sent: false,
            end_sent: false,
            end_got: false,
            peer_fin: false,
            over: false,
        }
    }

    fn closed(&self) -> bool {
        self.st.hc.is_closed()
    }

    /// Runs one lock-held `StreamState` step and checks what it queued.
    fn locked<R>(&mut self, f: impl FnOnce(&mut StreamState, &Recorder) -> R) -> R {
        let r = f(&mut self.st, &self.out);
        let queued = std::mem::take(&mut *self.out.0.borrow_mut());
        for c in queued {
            self.send(c);
        }
        r
    }

    /// Queues a cell on the link, checking the sending rules.
    fn send(&mut self, c: Sent) {
        assert!(!self.over, "{c:?} sent after the circuit's DESTROY");
        match c {
            Sent::CircuitSendme | Sent::Destroy(_) => {}
            _ => {
                assert!(!self.end_sent, "{c:?} sent after our END (§8)");
                assert!(!self.end_got, "{c:?} sent after the peer's END (§8)");
            }
        }
        match c {
            Sent::Data => {
                assert!(!self.fin_sent, "DATA after our FIN (§7)");
                assert!(
                    !self.exit || self.st.connected,
                    "exit DATA before CONNECTED"
                );
                self.data_sent += 1;
            }
            Sent::Fin => {
                assert!(!self.fin_sent, "second FIN");
                self.fin_sent = true;
            }
            Sent::End(_) => self.end_sent = true,
            Sent::Sendme => self.sendmes_sent += 1,
            Sent::Connected => assert!(self.exit && self.data_sent == 0),
            Sent::CircuitSendme => self.circ_sendmes_sent += 1,
            Sent::Destroy(_) => {}
        }
        self.wire.push(c);
    }

    /// `Stream::handle`: `StreamState::step` under the lock (it queues FIN
    /// or END), then the abort I/O (`abort_io`).
    fn handle(&mut self, event: Event) -> Result<Action, Violation> {
        let step = self.locked(|st, out| st.step(event, out))?;
        if let (Action::SendEndAndReset(r), Some(Sent::End(sent))) = (step.action, self.wire.last())
        {
            assert_eq!(r, *sent, "END with another reason than decided");
        }
        match step.action {
            Action::SendEndAndReset(_) | Action::Reset => {
                if step.action == Action::Reset {
                    self.end_got = true;
                }
                self.abort_io();
            }
            _ => {}
        }
        Ok(step.action)
    }

    fn abort_io(&mut self) {
        self.aborted = true;
        // Client before CONNECTED: the deliverer answers SOCKS (Refused)
        // and ends; otherwise the socket is reset and it ends (Abort).
        self.dl = Dl::Ended;
        self.dl_queue.clear();
    }

    fn force_stop(&mut self) {
        self.aborted = true;
        self.dl = Dl::Ended;
        self.dl_queue.clear();
    }

    /// `stopped()`: the packager cannot go on.
    fn pk_stopped(&mut self) {
        self.pk = Pk::Ended;
        if !self.aborted {
            let _ = self.handle(Event::Error {
                reason: end_reason::MISC,
            });
        }
    }

    /// The circuit ends (`Circuit::teardown`).
    fn teardown(&mut self, event: Event, destroy: Option<u8>) {
        if self.in_table {
            if let Ok(Action::Nothing) = self.handle(event) {
                self.force_stop();
            }
        }
        if let Some(reason) = destroy {
            self.send(Sent::Destroy(reason));
        }
        self.over = true;
    }

    fn violation(&mut self) {
        self.teardown(
            Event::EndReceived {
                reason: end_reason::DESTROY,
            },
            Some(1), // DESTROY(PROTOCOL)
        );
    }

    // Independent model of §10's windows.
    fn model_package(&self) -> i64 {
        i64::from(STREAM_WINDOW_START) - i64::from(self.data_sent)
            + i64::from(STREAM_SENDME_INCREMENT) * i64::from(self.sendmes_got)
    }

    /// Cells taken from the circuit window and not yet sent or given back
    /// count as sent when a SENDME is judged (`send_cells` takes window
    /// before it can queue); what a SENDME credits beyond the start while
    /// cells are taken is dropped when they are given back
    /// (`PackageWindow::give_back`). So the window a circuit SENDME is
    /// judged against is this, not `model_circ_package` alone.
    fn circ_window(&self) -> i64 {
        self.model_circ_package() - i64::from(self.reserved) - i64::from(self.forfeited)
    }

    /// `circuit_window.update(|w| w.give_back(m))`, with the model's count
    /// of credit dropped at the start value.
    fn give_back(&mut self, m: u32) {
        let after = self.circ_window() + i64::from(m);
        self.forfeited += u32::try_from(after - i64::from(CIRCUIT_WINDOW_START)).unwrap_or(0);
        self.circ_package.give_back(m);
        self.reserved -= m;
    }

    fn model_circ_package(&self) -> i64 {
        i64::from(CIRCUIT_WINDOW_START) - i64::from(self.data_sent)
            + i64::from(CIRCUIT_SENDME_INCREMENT) * i64::from(self.circ_sendmes_got)
    }

    fn model_deliver(&self) -> i64 {
        i64::from(STREAM_WINDOW_START) - i64::from(self.data_got)
            + i64::from(STREAM_SENDME_INCREMENT) * i64::from(self.sendmes_sent)
    }

    fn model_circ_deliver(&self) -> i64 {
        i64::from(CIRCUIT_WINDOW_START) - i64::from(self.circ_data_got)
            + i64::from(CIRCUIT_SENDME_INCREMENT) * i64::from(self.circ_sendmes_sent)
    }

    /// Client: DATA or FIN while the stream waits for CONNECTED.
    fn before_connected(&self) -> bool {
        !self.exit && !self.st.connected && !self.closed()
    }

    /// Would this peer cell be a protocol violation? (The model's view.)
    fn is_violation(&self, op: Op) -> bool {
        let state = self.st.hc.state();
        match op {
            Op::PeerData => {
                self.model_circ_deliver() == 0
                    || (self.in_table
                        && (self.before_connected()
                            || state == State::DoneDelivering
                            || (!self.closed() && self.model_deliver() == 0)))
            }
            Op::PeerFin => {
                self.in_table && (self.before_connected() || state == State::DoneDelivering)
            }
            Op::PeerSendme => {
                self.in_table
                    && !self.closed()
                    && self.model_package() + i64::from(STREAM_SENDME_INCREMENT)
                        > i64::from(STREAM_WINDOW_START)
            }
            Op::PeerCircuitSendme => {
                self.circ_window() + i64::from(CIRCUIT_SENDME_INCREMENT)
                    > i64::from(CIRCUIT_WINDOW_START)
            }
            Op::PeerConnected => {
                // CONNECTED to an exit is sent the wrong way (§4).
                self.exit || (self.in_table && !self.closed() && self.st.connected)
            }
            _ => false,
        }
    }

    fn step(&mut self, op: Op, honest_peer: bool) {
        let expect_violation = self.is_violation(op);
        if honest_peer && expect_violation {
            return;
        }
        let violated = match op {
            Op::PkRead { cells } => {
                self.pk_read(u32::from(cells));
                false
            }
            Op::PkPackage { cells } => {
                self.pk_read(u32::from(cells));
                self.pk_take_circuit();
                self.pk_commit();
                false
            }
            Op::PkTakeCircuit => {
                self.pk_take_circuit();
                false
            }
            Op::PkCommit => {
                self.pk_commit();
                false
            }
            Op::PkLinkGone => {
                if let Pk::Taken { m, .. } = self.pk {
                    self.give_back(m);
                    self.pk_stopped();
                }
                false
            }
            Op::PkReadError { reason } => {
                if self.pk == Pk::Idle {
                    self.pk = Pk::Ended;
                    if !self.aborted {
                        let _ = self.handle(Event::Error { reason });
                    }
                }
                false
            }
            Op::ExitConnect { ok, reason } => {
                if self.pk == Pk::Connecting {
                    self.exit_connect(ok, reason);
                }
                false
            }
            Op::DlWrite { cells } => {
                self.dl_write(u32::from(cells));
                false
            }
            Op::DlWriteError { reason } => {
                if self.dl == Dl::Running && self.dl_queue.front() == Some(&DlMsg::Data) {
                    self.dl = Dl::Ended;
                    self.dl_queue.clear();
                    if !self.aborted {
                        let _ = self.handle(Event::Error { reason });
                    }
                }
                false
            }
            Op::PeerData => self.peer_data(),
            Op::PeerFin => self.peer_fin(),
            Op::PeerEnd { reason } => {
                if self.in_table {
                    let _ = self.handle(Event::EndReceived { reason });
                }
                false
            }
            Op::PeerSendme => {
                // Circuit::on_stream_sendme → Stream::on_sendme.
                if !self.in_table || self.closed() {
                    false
                } else {
                    // A packager waiting for the stream window (R10.8).
                    let blocked = self.st.read_window().is_none();
                    match self.st.on_sendme() {
                        Ok(wake) => {
                            // `StreamMap::on_stream_sendme` wakes the
                            // packager only on `Wake::Packager`: a blocked
                            // one must be woken, and may then read (R10.9).
                            if blocked {
                                assert_eq!(wake, Wake::Packager, "a lost wake-up");
                                assert!(self.st.read_window().is_some());
                            }
                            self.sendmes_got += 1;
                            false
                        }
                        Err(_) => true,
                    }
                }
            }
            Op::PeerCircuitSendme => match self.circ_package.on_sendme() {
                Ok(()) => {
                    self.circ_sendmes_got += 1;
                    false
                }
                Err(_) => true,
            },
            Op::PeerConnected => self.peer_connected(),
            Op::IdleTimeout => {
                if self.in_table && self.st.connected && !self.closed() {
                    let _ = self.handle(Event::Error {
                        reason: end_reason::TIMEOUT,
                    });
                }
                false
            }
            Op::Teardown { how } => {
                match how % 3 {
                    0 => self.teardown(
                        Event::Error {
                            reason: end_reason::HIBERNATING,
                        },
                        Some(4), // DESTROY(HIBERNATING)
                    ),
                    _ => self.teardown(
                        Event::EndReceived {
                            reason: end_reason::DESTROY,
                        },
                        None,
                    ),
                }
                false
            }
        };
        assert_eq!(
            violated, expect_violation,
            "{op:?}: violation reported {violated}, model says {expect_violation}"
        );
        if violated {
            self.violation();
        }
        self.check();
    }

    /// `send_cells`: wait on the circuit window, then take up to what is
    /// held.
    fn pk_take_circuit(&mut self) {
        if let Pk::Holding { rest } = self.pk {
            if self.aborted {
                // wait_until sees the cancel flag.
                self.pk = Pk::Ended;
            } else {
                let m = self.circ_package.take(rest);
                if m > 0 {
                    assert!(m <= rest);
                    self.reserved += m;
                    self.pk = Pk::Taken { rest, m };
                }
                // Circuit window 0: wait.
            }
        }
    }

    /// `send_cells`: link room reserved (or not, if aborted); under the
    /// stream lock `StreamState::queue_data` checks the state, takes stream
    /// window and queues the DATA.
    fn pk_commit(&mut self) {
        if let Pk::Taken { rest, m } = self.pk {
            if self.aborted {
                // link.reserve sees the cancel flag.
                self.give_back(m);
                self.pk_stopped();
                return;
            }
            let queued = self
                .locked(|st, out| {
                    st.queue_data(Vec::new(), m, u64::from(m) * 498, Instant::now(), out)
                })
                .expect("the recorder never loses the link");
            if queued == Queued::Sent {
                self.reserved -= m;
                self.pk = if rest == m {
                    Pk::Idle
                } else {
                    Pk::Holding { rest: rest - m }
                };
            } else {
                // We may no longer package: return the circuit window.
                self.give_back(m);
                self.pk_stopped();
            }
        }
    }

    /// `package_loop`: wait for window (`StreamState::read_window`), read,
    /// or see EOF.
    fn pk_read(&mut self, cells: u32) {
        if self.pk != Pk::Idle {
            return;
        }
        if self.aborted {
            self.pk = Pk::Ended; // the wait sees the cancel flag
            return;
        }
        let window = match self.st.read_window() {
            None => return, // §10: blocked until a SENDME
            Some(0) => {
                self.pk = Pk::Ended;
                return;
            }
            Some(w) => w,
        };
        let want = window.min(self.read_cells);
        if cells == 0 {
            // §7: EOF → FIN after every DATA read before it.
            self.pk = Pk::Ended;
            let _ = self.handle(Event::ReadEof);
            return;
        }
        let n = cells.min(want);
        self.read_cells = if n == want {
            (self.read_cells * 2).min(MAX_READ_CELLS)
        } else {
            self.read_cells.min(n.max(FIRST_READ_CELLS))
        };
        self.pk = Pk::Holding { rest: n };
    }

    /// `exit_packager` after `exit::connect`.
    fn exit_connect(&mut self, ok: bool, reason: u8) {
        if self.aborted {
            // ConnectError::Aborted; the socket sender drops.
            self.pk = Pk::Ended;
            self.dl = Dl::Ended;
            return;
        }
        if !ok {
            self.pk = Pk::Ended;
            self.dl = Dl::Ended;
            let _ = self.handle(Event::Error { reason });
            return;
        }
        if self.closed() {
            self.pk = Pk::Ended;
            self.dl = Dl::Ended;
            return;
        }
        self.st.connected = true;
        self.send(Sent::Connected);
        self.dl = Dl::Running;
        self.pk = Pk::Idle;
    }

    /// `deliverer` / `write_cells` / `Stream::delivered`.
    fn dl_write(&mut self, cells: u32) {
        if self.dl != Dl::Running {
            return;
        }
        let mut k = 0;
        while k < cells && self.dl_queue.front() == Some(&DlMsg::Data) {
            self.dl_queue.pop_front();
            k += 1;
        }
        if k > 0 {
            self.delivered += k;
            let bytes = k as usize * 498;
            self.locked(|st, out| st.delivered(k, bytes, Instant::now(), out));
        }
        if self.dl_queue.front() == Some(&DlMsg::Fin) {
            // §7: everything before the FIN is written; shutdown(SHUT_WR).
            self.dl_queue.pop_front();
            assert!(self.dl_queue.is_empty(), "a message after the peer's FIN");
            assert_eq!(self.delivered, self.data_got, "FIN before all its DATA");
            self.dl = Dl::Ended;
        }
    }

    /// `Circuit::on_data` → `Stream::accept_data`. Returns "violation".
    fn peer_data(&mut self) -> bool {
        self.circ_data_got += 1;
        match self.circ_deliver.on_data() {
            Err(_) => return true,
            Ok(true) => self.send(Sent::CircuitSendme),
            Ok(false) => {}
        }
        if !self.in_table {
            return false; // §9
        }
        if self.before_connected() {
            return true;
        }
        // The circuit's DATA step, under the stream's lock (a version 1
        // stream queues nothing here).
        match self.locked(|st, out| st.accept_data(1, out)) {
            Err(_) => return true,
            Ok(Delivery::Drop) => return false, // §9: late DATA for a closed stream
            Ok(Delivery::Deliver) => {}
        }
        self.data_got += 1;
        assert!(
            matches!(self.dl, Dl::Running | Dl::WaitSocket | Dl::WaitAnswer),
            "DATA accepted with no deliverer"
        );
        self.dl_queue.push_back(DlMsg::Data);
        false
    }

    /// `Circuit::on_fin`. Returns "violation".
    fn peer_fin(&mut self) -> bool {
        if !self.in_table {
            return false; // §9
        }
        if self.before_connected() {
            return true;
        }
        match self.handle(Event::FinReceived) {
            Err(_) => true,
            Ok(Action::DeliverThenShutdownWrite) => {
                assert!(!self.peer_fin);
                self.peer_fin = true;
                self.dl_queue.push_back(DlMsg::Fin);
                false
            }
            Ok(_) => false,
        }
    }

    /// `Circuit::on_connected` (client). Returns "violation".
    fn peer_connected(&mut self) -> bool {
        if self.exit {
            return true; // §4: sent the wrong way
        }
        if !self.in_table || self.closed() {
            return false; // §9
        }
        if self.st.connected {
            return true;
        }
        self.st.connected = true;
        if self.dl == Dl::WaitAnswer {
            self.dl = Dl::Running;
        }
        false
    }

    fn check(&mut self) {
        // §10: windows within bounds, and as the model counts them.
        assert!(self.st.package.value() <= STREAM_WINDOW_START);
        assert!(
            self.circ_package.value() <= CIRCUIT_WINDOW_START,
            "circuit package window {} above its start",
            self.circ_package.value()
        );
        assert!(self.st.deliver.value() <= STREAM_WINDOW_START);
        assert!((901..=CIRCUIT_WINDOW_START).contains(&self.circ_deliver.value()));
        assert_eq!(i64::from(self.st.package.value()), self.model_package());
        assert_eq!(i64::from(self.circ_package.value()), self.circ_window());
        assert_eq!(i64::from(self.st.deliver.value()), self.model_deliver());
        assert_eq!(
            i64::from(self.circ_deliver.value()),
            self.model_circ_deliver()
        );
        assert!(self.delivered <= self.data_got);
        // §7, first table: the state is what the two FINs and aborts say.
        let closed = self.closed();
        assert_eq!(self.st.hc.may_package(), !closed && !self.fin_sent);
        assert_eq!(self.st.hc.may_deliver(), !closed && !self.peer_fin);
        assert_eq!(closed, self.aborted || (self.fin_sent && self.peer_fin));
        // `Circuit::on_thread_done`: both threads gone means CLOSED (else
        // it logs "bug: stream threads ended in state ...").
        if self.in_table && self.pk == Pk::Ended && self.dl == Dl::Ended {
            assert!(
                closed,
                "both stream threads ended in state {}",
                self.st.hc.state()
            );
            self.in_table = false;
        }
        // DESTROY is the last thing on the circuit.
        if let Some(pos) = self.wire.iter().position(|c| matches!(c, Sent::Destroy(_))) {
            assert_eq!(pos, self.wire.len() - 1);
        }
    }
}

fuzz_target!(|input: Input| {
    let mut sim = Sim::new(input.exit, input.initial);
    for op in input.ops {
        if sim.over {
            break;
        }
        sim.step(op, input.honest_peer);
    }
});
