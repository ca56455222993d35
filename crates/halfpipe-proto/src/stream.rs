//! One stream's protocol state: its §7 half-close state, its §10 windows,
//! whether it is connected, and its counters (docs/protocol.md §5–§10).
//!
//! No socket and no clock: the shell keeps the socket beside this state,
//! under the same lock, and passes the time in. Every method is one step
//! a thread takes under the stream's lock: it decides, and queues the cells
//! decided on through an [`Outbound`] (queueing never blocks), so the cells
//! of a stream leave in the order they were decided: no DATA after our FIN,
//! nothing after our END (docs/design.md, invariant 8).

use crate::congestion::Flow;
use crate::flow::{FlowViolation, PackageWindow, StreamDeliverWindow};
use crate::halfclose::{Action, Event, HalfClose, Step, Violation};
use crate::relay::relay_cmd;
use crate::xonxoff::{self, Signal, XonXoff};
use std::time::Instant;

/// Where a stream's cells go: the link's outbound queue in the daemon, a
/// record in tests. Queueing never blocks, so it may be done with the
/// stream's lock held (docs/design.md, invariants 4 and 5).
pub trait Outbound {
    /// Queues one control cell of the stream (FIN, END, CONNECTED).
    fn control(&self, command: u8, body: &[u8]);
    /// Queues `n` stream SENDMEs.
    fn sendmes(&self, n: u32);
    /// Queues `count` framed DATA cells for which room was reserved.
    fn data(&self, cells: Vec<u8>, count: u32) -> Result<(), Gone>;
}

/// The queue a stream's cells go to is gone: its circuit or link ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stream's circuit or link is gone")]
pub struct Gone;

/// Per-direction counters, for people (status, logs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Bytes read from our TCP connection and sent as DATA.
    pub bytes_packaged: u64,
    pub cells_packaged: u64,
    /// Bytes received as DATA and written to our TCP connection.
    pub bytes_delivered: u64,
    /// DATA cells received and accepted (§7, §10).
    pub cells_received: u64,
    /// DATA cells whose data was written to our TCP connection.
    pub cells_delivered: u64,
}

/// A rule of §7 or §10 that a cell for this stream broke: the circuit is
/// destroyed (§3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamViolation {
    #[error(transparent)]
    HalfClose(#[from] Violation),
    #[error(transparent)]
    FlowControl(#[from] FlowViolation),
}

/// What to do with a run of DATA cells that arrived for the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Hand them to the deliverer (§6).
    Deliver,
    /// The stream already closed: drop them (§9).
    Drop,
}

/// Whether DATA was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Sent,
    /// We may no longer package (§7): nothing was queued; the caller gives
    /// back what it reserved for the cells.
    MayNotPackage,
}

/// Whether a packager waiting for the stream package window must be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The window was 0 and now is not: the packager may read again (R10.9).
    Packager,
    /// Nothing a waiting packager looks at changed.
    Nobody,
}

/// The state a stream's threads share (docs/design.md).
#[derive(Debug, Clone)]
pub struct StreamState {
    pub hc: HalfClose,
    /// §10's windows (a version 1 circuit).
    pub package: PackageWindow,
    pub deliver: StreamDeliverWindow,
    /// §14's XOFF and XON instead (a version 2 circuit).
    pub v2: Option<XonXoff>,
    /// Client: CONNECTED arrived. Exit: the target accepted.
    pub connected: bool,
    pub counters: Counters,
    /// When a byte was last read from or written to our TCP connection
    /// (status: idle time; `--idle-timeout`), as the shell said.
    pub last_activity: Instant,
}

impl StreamState {
    /// A new stream at `now`: OPEN (§7, also while the exit connects: §5's
    /// optimistic data), windows at their start (§10).
    pub fn new(now: Instant) -> StreamState {
        StreamState::with_flow(now, Flow::V1)
    }

    /// A new stream of a circuit that runs `flow`.
    pub fn with_flow(now: Instant, flow: Flow) -> StreamState {
        StreamState {
            hc: HalfClose::new(),
            package: PackageWindow::stream(),
            deliver: StreamDeliverWindow::default(),
            v2: (flow == Flow::V2).then(XonXoff::default),
            connected: false,
            counters: Counters::default(),
            last_activity: now,
        }
    }

    /// Feeds one event to the §7 state machine and queues the cell its
    /// action sends: FIN (R7.2, R7.3), or END for an error (R8.2–R8.6).
    /// The rest of the action (a reset, a shutdown) is the caller's, after
    /// the lock.
    pub fn step(
        &mut self,
        event: Event,
        out: &(impl Outbound + ?Sized),
    ) -> Result<Step, Violation> {
        let step = self.hc.handle(event)?;
        // R10.1: FIN and END take no window, in either direction.
        match step.action {
            Action::SendFin => out.control(relay_cmd::FIN, &[]),
            // R8.1: END's data is the one-byte reason; R8.7: the caller
            // resets the connection after the lock.
            Action::SendEndAndReset(reason) => out.control(relay_cmd::END, &[reason]),
            Action::Deliver
            | Action::DeliverThenShutdownWrite
            | Action::Reset
            | Action::Nothing => {}
        }
        Ok(step)
    }

    /// The packager's wait (§10): `Some(window)` while the stream package
    /// window is open, `Some(0)` once we may no longer package (§7), `None`
    /// while the window is 0 (R10.8). One SENDME opens it again (R10.9).
    /// On a version 2 circuit: `None` between the peer's XOFF and its XON
    /// (R14.11), and no stream window otherwise (R14.8).
    pub fn read_window(&self) -> Option<u32> {
        if !self.hc.may_package() {
            return Some(0);
        }
        if let Some(x) = &self.v2 {
            return (!x.paused()).then_some(u32::MAX);
        }
        match self.package.value() {
            0 => None,
            window => Some(window),
        }
    }

    /// A version 2 stream the peer has sent XOFF on, and that may still
    /// package: its packager sends nothing, not even cells it has already
    /// read, until XON (R14.11).
    pub fn held_back(&self) -> bool {
        self.v2.is_some_and(|x| x.paused()) && self.hc.may_package()
    }

    /// Queues `count` DATA cells holding `bytes` bytes read at `now`,
    /// taking them from the stream package window (R10.4), if we may still
    /// package (R7.1).
    pub fn queue_data(
        &mut self,
        cells: Vec<u8>,
        count: u32,
        bytes: u64,
        now: Instant,
        out: &(impl Outbound + ?Sized),
    ) -> Result<Queued, Gone> {
        if !self.hc.may_package() {
            return Ok(Queued::MayNotPackage);
        }
        if self.v2.is_none() {
            let took = self.package.take(count);
            debug_assert_eq!(
                took, count,
                "only the packager takes from the stream window"
            );
        }
        self.counters.cells_packaged += u64::from(count);
        self.counters.bytes_packaged += bytes;
        self.last_activity = now;
        out.data(cells, count)?;
        Ok(Queued::Sent)
    }

    /// `cells` DATA cells for this stream arrived in a row: §7 says whether
    /// they may be delivered (all or none: DATA never changes the state),
    /// §10 counts them against the stream deliver window (R10.6, R10.10).
    /// A violation refuses the whole run: it ends the circuit, which resets
    /// every stream on it anyway.
    ///
    /// On a version 2 circuit they count as held instead (R14.15), and
    /// XOFF is queued through `out` once XOFF_AT are held (R14.9).
    pub fn accept_data(
        &mut self,
        cells: u32,
        out: &(impl Outbound + ?Sized),
    ) -> Result<Delivery, StreamViolation> {
        let step = self.hc.handle(Event::DataReceived)?; // R7.6
        if step.action != Action::Deliver {
            return Ok(Delivery::Drop); // R9.3: late DATA for a closed stream
        }
        match &mut self.v2 {
            Some(x) => {
                if x.on_data(cells)? == Signal::Xoff {
                    out.control(relay_cmd::XOFF, &xonxoff::encode_xoff());
                }
            }
            None => {
                for _ in 0..cells {
                    self.deliver.on_data()?;
                }
            }
        }
        self.counters.cells_received += u64::from(cells);
        Ok(Delivery::Deliver)
    }

    /// A stream SENDME arrived (§10): it adds to the package window
    /// (R10.4); one that lifts it above its start is a violation (R10.11).
    /// The packager need be woken only if the window was 0 (R10.8, R10.9):
    /// otherwise it is not waiting for this window.
    pub fn on_sendme(&mut self) -> Result<Wake, FlowViolation> {
        if self.v2.is_some() {
            return Err(FlowViolation::StreamSendmeOnV2); // R14.8
        }
        if self.hc.is_closed() {
            return Ok(Wake::Nobody); // R9.3: late SENDME
        }
        let was_closed = self.package.value() == 0;
        self.package.on_sendme()?;
        Ok(if was_closed && self.hc.may_package() {
            Wake::Packager
        } else {
            Wake::Nobody
        })
    }

    /// The peer's XOFF on a version 2 circuit: stop packaging (R14.11).
    /// Dropped for a closed stream (R14.13).
    pub fn on_xoff(&mut self) {
        if let (Some(x), false) = (&mut self.v2, self.hc.is_closed()) {
            x.on_xoff();
        }
    }

    /// The peer's XON: packaging may go on (R14.11); the packager is woken
    /// if it was held back and may still package.
    pub fn on_xon(&mut self) -> Wake {
        let (may_package, closed) = (self.hc.may_package(), self.hc.is_closed());
        let was_paused = match &mut self.v2 {
            Some(x) if !closed => x.on_xon(),
            _ => false,
        };
        if was_paused && may_package {
            Wake::Packager
        } else {
            Wake::Nobody
        }
    }

    /// `cells` cells' data (`bytes` bytes) were accepted by the kernel at
    /// `now` (R10.7): count them and queue the stream SENDMEs they earn
    /// (R10.3). Once the peer's FIN has arrived no more DATA can come, so
    /// no SENDME is needed; once the stream is CLOSED none may be sent
    /// (R8.9 after the peer's END).
    ///
    /// On a version 2 circuit the cells are no longer held, and XON is
    /// queued once few enough are (R14.10).
    pub fn delivered(
        &mut self,
        cells: u32,
        bytes: usize,
        now: Instant,
        out: &(impl Outbound + ?Sized),
    ) {
        self.counters.bytes_delivered += bytes as u64;
        self.counters.cells_delivered += u64::from(cells);
        self.last_activity = now;
        if let Some(x) = &mut self.v2 {
            // R14.10: no XON once no more DATA can come.
            if x.on_written(cells, self.hc.may_deliver()) == Signal::Xon {
                out.control(relay_cmd::XON, &xonxoff::encode_xon(0));
            }
            return;
        }
        if self.hc.may_deliver() {
            let sendmes = self.deliver.on_written(cells);
            if sendmes > 0 {
                out.sendmes(sendmes);
            }
        }
    }
}

/// An `Outbound` that drops what it is given, for tests that drive a
/// `StreamState` by itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Discard;

impl Outbound for Discard {
    fn control(&self, _: u8, _: &[u8]) {}
    fn sendmes(&self, _: u32) {}
    fn data(&self, _: Vec<u8>, _: u32) -> Result<(), Gone> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{STREAM_SENDME_INCREMENT, STREAM_WINDOW_START};

    fn fresh() -> StreamState {
        StreamState::new(Instant::now())
    }

    fn take(st: &mut StreamState, n: u32) {
        st.queue_data(Vec::new(), n, 0, Instant::now(), &Discard)
            .unwrap();
    }

    // R10.8: a packager reads while the window is open, down to one cell.
    #[test]
    fn a_packager_reads_while_the_window_is_open() {
        let mut st = fresh();
        assert_eq!(st.read_window(), Some(STREAM_WINDOW_START));
        take(&mut st, STREAM_WINDOW_START - 1);
        assert_eq!(st.read_window(), Some(1));
        take(&mut st, 1);
        assert_eq!(st.read_window(), None, "stopped at 0");
    }

    // R10.9: one SENDME resumes a packager stopped at 0, for 50 cells.
    #[test]
    fn one_sendme_resumes_a_stopped_packager() {
        let mut st = fresh();
        take(&mut st, STREAM_WINDOW_START);
        assert_eq!(st.read_window(), None);
        assert_eq!(st.on_sendme(), Ok(Wake::Packager));
        assert_eq!(st.read_window(), Some(STREAM_SENDME_INCREMENT));
        take(&mut st, STREAM_SENDME_INCREMENT);
        assert_eq!(st.read_window(), None, "stopped again after 50");
    }

    // R10.9: a SENDME wakes the packager exactly when the window was 0;
    // otherwise it was not waiting for this window. No wake-up is lost:
    // whenever it says Nobody, the packager's wait would not change.
    #[test]
    fn a_sendme_wakes_the_packager_exactly_when_it_was_stopped() {
        // A SENDME on fewer than 50 cells in flight is a violation (R10.11).
        for taken in STREAM_SENDME_INCREMENT..=STREAM_WINDOW_START {
            let mut st = fresh();
            take(&mut st, taken);
            let before = st.read_window();
            let wake = st.on_sendme().unwrap();
            assert_eq!(wake == Wake::Packager, before.is_none(), "{taken} taken");
            assert!(st.read_window().is_some(), "{taken} taken: reads after");
        }
    }

    // R10.11: a SENDME that lifts the package window above its start.
    #[test]
    fn a_sendme_beyond_the_start_is_a_violation() {
        let mut st = fresh();
        assert!(st.on_sendme().is_err());
    }

    // R7.1: once we may no longer package, the wait ends with 0 whatever
    // the window, and DATA is not queued.
    #[test]
    fn a_stream_that_may_not_package_ends_the_wait_and_queues_nothing() {
        let mut st = fresh();
        take(&mut st, STREAM_WINDOW_START);
        st.step(Event::ReadEof, &Discard).unwrap();
        assert_eq!(st.read_window(), Some(0));
        assert_eq!(st.on_sendme(), Ok(Wake::Nobody), "no packager to wake");
        let queued = st.queue_data(Vec::new(), 1, 1, Instant::now(), &Discard);
        assert_eq!(queued, Ok(Queued::MayNotPackage));
    }

    // R7.6 and R9.3: DATA after the peer's FIN is a violation; DATA for a
    // closed stream is dropped.
    #[test]
    fn data_after_fin_is_a_violation_and_after_close_is_dropped() {
        let mut st = fresh();
        st.step(Event::FinReceived, &Discard).unwrap();
        assert_eq!(
            st.accept_data(1, &Discard),
            Err(StreamViolation::HalfClose(Violation::DataAfterFin))
        );
        let mut st = fresh();
        st.step(Event::EndReceived { reason: 1 }, &Discard).unwrap();
        assert_eq!(st.accept_data(3, &Discard), Ok(Delivery::Drop));
        assert_eq!(st.counters.cells_received, 0);
    }

    // R10.6, R10.10: the stream deliver window counts DATA; one cell past
    // it refuses the whole run.
    #[test]
    fn the_deliver_window_bounds_a_run() {
        let mut st = fresh();
        assert_eq!(
            st.accept_data(STREAM_WINDOW_START, &Discard),
            Ok(Delivery::Deliver)
        );
        assert!(matches!(
            st.accept_data(1, &Discard),
            Err(StreamViolation::FlowControl(_))
        ));
    }

    /// What a stream queued, in order: (command, body); DATA as (DATA, []).
    #[derive(Default)]
    struct Record(std::cell::RefCell<Vec<(u8, Vec<u8>)>>);

    impl Outbound for Record {
        fn control(&self, command: u8, body: &[u8]) {
            self.0.borrow_mut().push((command, body.to_vec()));
        }
        fn sendmes(&self, n: u32) {
            for _ in 0..n {
                self.0.borrow_mut().push((relay_cmd::SENDME, Vec::new()));
            }
        }
        fn data(&self, _: Vec<u8>, count: u32) -> Result<(), Gone> {
            for _ in 0..count {
                self.0.borrow_mut().push((relay_cmd::DATA, Vec::new()));
            }
            Ok(())
        }
    }

    // R7.7, R8.1: an error on the stream sends END whose data is the
    // one-byte reason, and nothing after it.
    #[test]
    fn an_error_sends_end_with_its_reason_as_its_only_byte() {
        let out = Record::default();
        let mut st = fresh();
        let step = st
            .step(
                Event::Error {
                    reason: crate::relay::end_reason::CONNRESET,
                },
                &out,
            )
            .unwrap();
        assert_eq!(step.action, Action::SendEndAndReset(12));
        st.step(Event::ReadEof, &out).unwrap();
        assert_eq!(*out.0.borrow(), [(relay_cmd::END, vec![12])]);
    }

    // R10.1: FIN and END neither lower nor raise a window, sent or
    // received; only DATA does.
    #[test]
    fn only_data_uses_the_windows() {
        let out = Record::default();
        let mut st = fresh();
        st.accept_data(3, &Discard).unwrap();
        take(&mut st, 7);
        let windows = |st: &StreamState| (st.package.value(), st.deliver.value());
        assert_eq!(
            windows(&st),
            (STREAM_WINDOW_START - 7, STREAM_WINDOW_START - 3)
        );
        st.step(Event::ReadEof, &out).unwrap(); // our FIN
        st.step(Event::FinReceived, &out).unwrap(); // the peer's FIN
        assert_eq!(
            windows(&st),
            (STREAM_WINDOW_START - 7, STREAM_WINDOW_START - 3)
        );
        let mut st = fresh();
        st.step(Event::EndReceived { reason: 1 }, &out).unwrap();
        assert_eq!(windows(&st), (STREAM_WINDOW_START, STREAM_WINDOW_START));
        let mut st = fresh();
        st.step(Event::Error { reason: 1 }, &out).unwrap(); // our END
        assert_eq!(windows(&st), (STREAM_WINDOW_START, STREAM_WINDOW_START));
    }

    // R8.9: after the peer's END nothing more is sent on the stream: no
    // DATA, no SENDME for data written meanwhile, no END for a later error.
    #[test]
    fn nothing_is_sent_after_the_peers_end() {
        let out = Record::default();
        let mut st = fresh();
        st.accept_data(100, &Discard).unwrap();
        st.step(Event::EndReceived { reason: 3 }, &out).unwrap();
        st.delivered(100, 100 * 498, Instant::now(), &out);
        let queued = st.queue_data(Vec::new(), 1, 1, Instant::now(), &out);
        assert_eq!(queued, Ok(Queued::MayNotPackage));
        st.step(Event::Error { reason: 12 }, &out).unwrap();
        st.step(Event::ReadEof, &out).unwrap();
        assert!(out.0.borrow().is_empty(), "{:?}", out.0.borrow());
    }

    // R10.3, R10.7: SENDMEs follow what the kernel accepted, 50 cells each.
    #[test]
    fn sendmes_follow_what_was_written() {
        use std::cell::Cell;
        struct Count(Cell<u32>);
        impl Outbound for Count {
            fn control(&self, _: u8, _: &[u8]) {}
            fn sendmes(&self, n: u32) {
                self.0.set(self.0.get() + n);
            }
            fn data(&self, _: Vec<u8>, _: u32) -> Result<(), Gone> {
                Ok(())
            }
        }
        let out = Count(Cell::new(0));
        let mut st = fresh();
        st.accept_data(120, &Discard).unwrap();
        st.delivered(49, 49 * 498, Instant::now(), &out);
        assert_eq!(out.0.get(), 0, "not 50 yet");
        st.delivered(71, 71 * 498, Instant::now(), &out);
        assert_eq!(out.0.get(), 2, "120 written: two SENDMEs");
        assert_eq!(st.counters.bytes_delivered, 120 * 498);
    }
}
