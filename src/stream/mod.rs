//! One stream: the state its packager and deliverer share, and what the
//! circuit thread and both threads do to it (docs/design.md: `pk C.S`
//! reads the socket into DATA cells ([`packager`]), `dl C.S` writes cells
//! to the socket ([`deliverer`](mod@deliverer))).
//!
//! The rules are `halfpipe_proto::stream::StreamState`'s (docs/protocol.md
//! §7, §8, §10): under the stream's lock a thread feeds it an event and it
//! queues the cells decided on (queueing never blocks); after the lock the
//! thread does the I/O (docs/design.md, invariant 5). So the cells of a
//! stream leave in the order they were decided: no DATA after our FIN,
//! nothing after our END (invariant 8).

pub mod deliverer;
pub mod packager;

pub use deliverer::{deliverer, DeliverStart};
pub use packager::{client_packager, exit_packager, MAX_READ_CELLS};

use crate::link::tx::{LinkGone, LinkTx};
use crate::process::metrics::Metrics;
use crate::runtime::batch::DataBatch;
use crate::runtime::fairwindow::FairWindow;
use crate::runtime::inbox::InboxTx;
use crate::runtime::monitor::Monitor;
use crate::runtime::sockets;
use halfpipe_proto::cell::CELL_LEN;
use halfpipe_proto::congestion::Flow;
use halfpipe_proto::halfclose::{Action, Event, State, Step, Violation};
use halfpipe_proto::relay::{self, end_reason, relay_cmd, Target};
use halfpipe_proto::stream::{Gone, Outbound, StreamState};
use halfpipe_proto::Role;
use socket2::Socket;
use std::net::{IpAddr, Shutdown};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What the circuit thread hands a deliverer.
pub enum DeliverMsg {
    /// DATA cells' data in arrival order, usually still in the buffer the
    /// link reader read them into (`batch`).
    Data(DataBatch),
    /// The peer's FIN: write what came before it, then shutdown(SHUT_WR) (§7).
    Fin,
    /// Client: the exit's CONNECTED arrived; answer the SOCKS request.
    Connected(Option<IpAddr>),
    /// Client: the stream ended before CONNECTED; answer the SOCKS request
    /// with the failure for this END reason (R8.10, R11.7 to R11.12).
    Refused(u8),
    /// The stream was aborted: stop at once.
    Abort,
}

/// How a stream tells its owner that one of its threads ended: called with
/// the stream's ID and serial, from the ending thread (never blocks).
pub type ThreadEnded = Arc<dyn Fn(u16, u64) + Send + Sync>;

/// The stream's protocol state and, beside it under the same lock, what
/// the shell keeps for it: its socket and the TIDs of its threads.
pub struct Shared {
    pub proto: StreamState,
    /// The TCP connection, once there is one (the exit connects in the
    /// packager): kept here so that an abort can reset it from any thread.
    pub socket: Option<Arc<Socket>>,
    /// TIDs of the packager and deliverer while they run (status).
    pub packager_tid: Option<i32>,
    pub deliverer_tid: Option<i32>,
}

impl Shared {
    /// A stream of a circuit that runs `flow` (docs/protocol.md §10, §14).
    pub fn new(socket: Option<Arc<Socket>>, flow: Flow) -> Shared {
        Shared {
            proto: StreamState::with_flow(Instant::now(), flow),
            socket,
            packager_tid: None,
            deliverer_tid: None,
        }
    }
}

/// The lock-held steps are `StreamState`'s: `st.step(..)`, `st.hc`.
impl Deref for Shared {
    type Target = StreamState;
    fn deref(&self) -> &StreamState {
        &self.proto
    }
}

impl DerefMut for Shared {
    fn deref_mut(&mut self) -> &mut StreamState {
        &mut self.proto
    }
}

pub struct Stream {
    pub id: u16,
    /// Unique within the circuit: tells a CLOSED stream whose threads are
    /// still ending from a new stream on the same ID (R5.14).
    pub serial: u64,
    /// "C.S": the circuit's short counter and the stream ID (thread names).
    pub name: String,
    pub role: Role,
    pub target: Target,
    pub wire_circ: u32,
    pub link: LinkTx,
    pub circuit_window: Arc<FairWindow>,
    /// Tells the stream's owner (its circuit) that one of its threads
    /// ended, with the stream's ID and serial, so that it can be joined.
    pub thread_ended: ThreadEnded,
    /// What the packager, the deliverer and the circuit thread share.
    pub state: Monitor<Shared>,
    /// Set once when the stream is aborted; ends every wait of its threads.
    pub aborted: AtomicBool,
    pub to_deliverer: InboxTx<DeliverMsg>,
    pub opened: Instant,
    /// The process's counters (`Ctx::metrics`).
    pub metrics: Arc<Metrics>,
}

impl Stream {
    /// Encodes one relay cell of this stream.
    fn cell(&self, command: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(CELL_LEN);
        relay::encode(&mut out, self.wire_circ, command, self.id, body);
        out
    }

    /// Queues a control cell; a link that is gone takes the stream with it
    /// (the circuit tears it down), so there is nothing to do on error.
    pub fn send_control(&self, command: u8, body: &[u8]) {
        let _ = self.link.send(self.cell(command, body));
    }

    /// Feeds one event to the §7 state machine and carries out its action,
    /// except `Deliver` and `DeliverThenShutdownWrite`, which the caller
    /// (the circuit thread) does by handing cells to the deliverer.
    pub fn handle(&self, event: Event) -> Result<Action, Violation> {
        // Queued under the lock: cell order is decision order.
        let step = self.state.lock().step(event, self)?;
        self.carry_out(step, event);
        Ok(step.action)
    }

    /// After the lock: what a §7 step (taken by `handle`, or by the
    /// circuit's stream map for a received FIN or END) leaves to do: wake
    /// the threads if the state changed, and abort if it says so (§8).
    pub fn carry_out(&self, step: Step, event: Event) {
        if step.from != step.to {
            tracing::debug!(stream = %self.name, "{} => {} ({event:?})", step.from, step.to);
            self.state.kick();
        }
        let reason = match (step.action, event) {
            (Action::SendEndAndReset(reason), _) => reason,
            (Action::Reset, Event::EndReceived { reason }) => reason,
            (Action::Reset, _) => end_reason::MISC,
            _ => return,
        };
        let (socket, connected) = {
            let st = self.state.lock();
            (st.socket.clone(), st.connected)
        };
        self.abort_io(socket.as_deref(), connected, reason);
    }

    /// R8.7 (after our END) and R8.8 (after the peer's): reset the TCP
    /// connection at once and stop both threads, which discards what they
    /// hold queued for the stream. R8.10: a client stream that never got
    /// CONNECTED answers the SOCKS request instead (§11): its deliverer
    /// writes the failure and closes normally.
    fn abort_io(&self, socket: Option<&Socket>, connected: bool, reason: u8) {
        self.aborted.store(true, Ordering::Release);
        self.circuit_window.kick();
        self.link.kick();
        self.state.kick();
        match (self.role, connected, socket) {
            (Role::Client, false, Some(s)) => {
                // Wake the packager without sending anything to the app.
                let _ = s.shutdown(Shutdown::Read);
                let _ = self.to_deliverer.send(DeliverMsg::Refused(reason));
            }
            (_, _, s) => {
                if let Some(s) = s {
                    if crate::fault::active(crate::fault::Fault::EndAsCleanClose) {
                        let _ = s.shutdown(Shutdown::Both);
                    } else {
                        sockets::reset(s);
                    }
                }
                let _ = self.to_deliverer.send(DeliverMsg::Abort);
            }
        }
    }

    /// Stops both threads now, whatever the §7 state: for a stream that is
    /// CLOSED but whose deliverer is still writing when its circuit goes.
    pub fn force_stop(&self) {
        let socket = self.state.lock().socket.clone();
        self.aborted.store(true, Ordering::Release);
        self.circuit_window.kick();
        self.link.kick();
        self.state.kick();
        if let Some(s) = socket {
            sockets::reset(&*s);
        }
        let _ = self.to_deliverer.send(DeliverMsg::Abort);
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// The §7 state name, for logs and status.
    pub fn state_name(&self) -> State {
        self.state.lock().hc.state()
    }

    /// `cells` cells' data were accepted by the kernel (§10).
    pub(crate) fn delivered(&self, cells: u32, bytes: usize) {
        self.metrics.delivered(bytes as u64, cells);
        self.state
            .lock()
            .delivered(cells, bytes, Instant::now(), self);
    }
}

/// A stream's cells go to its link.
impl Outbound for Stream {
    fn control(&self, command: u8, body: &[u8]) {
        self.send_control(command, body);
    }

    fn sendmes(&self, n: u32) {
        // R10.12: empty payloads. One queue message for all of them: one
        // wake-up of the writer.
        let mut out = Vec::with_capacity(n as usize * CELL_LEN);
        for _ in 0..n {
            relay::encode(&mut out, self.wire_circ, relay_cmd::SENDME, self.id, &[]);
        }
        let _ = self.link.send(out);
    }

    fn data(&self, cells: Vec<u8>, count: u32) -> Result<(), Gone> {
        self.link
            .send_data(cells, count)
            .map_err(|_: LinkGone| Gone)
    }
}

/// Tells the circuit a stream thread has ended, also if it panicked, so the
/// circuit can join it (docs/design.md, invariant 6).
pub(super) struct ExitNotice<'a>(&'a Stream);

impl Drop for ExitNotice<'_> {
    fn drop(&mut self) {
        (self.0.thread_ended)(self.0.id, self.0.serial);
    }
}

/// Which of a stream's two threads.
#[derive(Clone, Copy)]
pub(super) enum Side {
    Packager,
    Deliverer,
}

/// Shows the calling thread's TID in the stream's state for as long as the
/// thread runs (status: `packager_tid`, `deliverer_tid`; none once ended).
pub(super) struct Tid<'a>(&'a Stream, Side);

impl<'a> Tid<'a> {
    pub(super) fn publish(stream: &'a Stream, side: Side) -> Tid<'a> {
        Tid::set(stream, side, Some(sockets::gettid()));
        Tid(stream, side)
    }

    fn set(stream: &Stream, side: Side, tid: Option<i32>) {
        let mut st = stream.state.lock();
        match side {
            Side::Packager => st.packager_tid = tid,
            Side::Deliverer => st.deliverer_tid = tid,
        }
    }
}

impl Drop for Tid<'_> {
    fn drop(&mut self) {
        Tid::set(self.0, self.1, None);
    }
}
