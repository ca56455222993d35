//! A circuit thread (`circ L.C`): owns its streams (a
//! `halfpipe_proto::streammap::StreamMap`, which applies the rules of
//! docs/protocol.md §4, §5, §6, §9 and §10 to every relay cell) and the
//! circuit's windows, and carries out what the map decides: hand DATA and
//! FIN to deliverers, start and join stream threads, answer BEGIN and
//! RESOLVE, and tear the circuit down (§3).
//!
//! It never blocks on a socket or a full queue (docs/design.md, invariant
//! 2): everything it sends goes into unbounded queues whose size the
//! windows bound. Its only blocking calls are `recv` on its own inbox and,
//! when the circuit ends, joining its streams' threads.

pub mod msg;
pub mod view;

use crate::link::{Link, LinkTx};
use crate::process::metrics::{Dir, Limit, Tally, ViolationKind};
use crate::process::{CircuitSlot, Ctx, NoSlot, Source, StreamSlot};
use crate::runtime::batch::DataBatch;
use crate::runtime::fairwindow::FairWindow;
use crate::runtime::inbox::{self, Inbox, InboxTx};
use crate::runtime::monitor::Monitor;
use crate::runtime::pool::Task;
use crate::runtime::threads;
use crate::stream::{self, DeliverMsg, DeliverStart, Shared, Stream, ThreadEnded};
use crossbeam_channel::Sender;
use halfpipe_proto::cell::{destroy_reason, CELL_LEN};
use halfpipe_proto::congestion::{Flow, SendWindow};
use halfpipe_proto::halfclose::{Action, Event, State};
use halfpipe_proto::relay::{self, end_reason, relay_cmd, Answer, RelayCell, Target};
use halfpipe_proto::stream::{Delivery, Outbound, StreamState};
use halfpipe_proto::streammap::{Begin, CircuitViolation, Ended, Resolve, StreamEntry, StreamMap};
use halfpipe_proto::Role;
pub use msg::{CircMsg, OpenRequest, Refused, ResolveRequest, RESOLVE_WAIT};
use socket2::Socket;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use view::CircuitView;

/// How a circuit is to run, from its creator.
pub struct CircuitOpts {
    /// Client circuits beyond the general ones (those of credentials, and
    /// those opened because others were full) end after this long without
    /// streams, so that they do not pile up at the exit's limit.
    pub idle_timeout: Option<Duration>,
    /// Where its streams come from, for their fair share of the process's
    /// stream slots (a link at the exit, SOCKS credentials at the client).
    pub source: Arc<Source>,
    /// The flow control the circuit's edges agreed on in CREATE_FAST
    /// (docs/protocol.md §14: version 2, or §10's).
    pub flow: Flow,
}

/// How a circuit ends.
enum End {
    Destroyed(u8),
    LinkClosed,
    /// A cell broke the circuit's rules (the link's, for `Create`).
    Violation(ViolationKind, String),
    Hibernate,
    /// An isolation circuit without streams for its idle timeout, or a
    /// circuit the client does not need.
    Idle,
}

impl From<CircuitViolation> for End {
    fn from(v: CircuitViolation) -> End {
        End::Violation(ViolationKind::of(&v), v.to_string())
    }
}

/// A stream as the circuit keeps it.
struct Entry {
    stream: Arc<Stream>,
    /// Its packager and deliverer (pooled threads, joined as tasks).
    threads: Vec<Task>,
    /// Stream threads not yet ended.
    alive: usize,
    /// DATA gathered for the deliverer while handling one inbox message:
    /// the buffer the cells arrived in, and where each cell's data lies in
    /// it (`DataBatch`).
    batch: Option<Gathered>,
    _slot: StreamSlot,
}

/// The map reaches a stream's state under the stream's lock.
impl StreamEntry for Entry {
    fn with_state<T>(&self, f: impl FnOnce(&mut StreamState) -> T) -> T {
        f(&mut self.stream.state.lock())
    }

    fn with_state_out<T>(&self, f: impl FnOnce(&mut StreamState, &dyn Outbound) -> T) -> T {
        f(&mut self.stream.state.lock(), &*self.stream)
    }

    fn wake_packager(&self) {
        self.stream.state.kick();
    }
}

/// A RESOLVE as the circuit keeps it.
enum Resolving {
    /// Exit: the resolver thread, with its stream slot.
    Lookup(JoinHandle<()>, StreamSlot),
    /// Client: where the SOCKS handshake waits for the answers, and until
    /// when it waits.
    Waiting(Sender<Vec<Answer>>, Instant),
}

/// DATA gathered for a stream: the arrival buffer, and (start, length) of
/// each cell's data in it.
type Gathered = (Arc<Vec<u8>>, Vec<(u32, u32)>);

pub struct Circuit {
    ctx: Arc<Ctx>,
    link: Arc<Link>,
    /// This circuit's sender on the link: its cells (and its streams')
    /// are dropped once its CircID is freed (`link::Gate`).
    link_tx: LinkTx,
    role: Role,
    wire: u32,
    local: u32,
    /// "L.C" for logs; streams are "C.S".
    name: String,
    tx: InboxTx<CircMsg>,
    rx: Inbox<CircMsg>,
    map: StreamMap<Entry, Resolving>,
    package: Arc<FairWindow>,
    /// Serial number of the next stream (see `Stream::serial`).
    next_serial: u64,
    /// What every stream calls as one of its threads ends: a
    /// `ThreadDone` in this circuit's inbox.
    thread_ended: ThreadEnded,
    /// Streams with DATA gathered in their entry's batch.
    dirty: Vec<u16>,
    /// Control cells gathered while handling one inbox message.
    out: Vec<u8>,
    opened: Instant,
    /// Client circuits for isolated credentials end after this long
    /// without streams, so that they do not pile up at the exit's limit.
    idle_timeout: Option<Duration>,
    /// Where its streams come from (their fair share of the slots).
    source: Arc<Source>,
    /// What the status endpoint sees of this circuit.
    view: Arc<CircuitView>,
    /// Relay cells received during one inbox message (metrics).
    tally: Tally,
    /// This circuit's share of the process's circuits, held while it runs.
    _slot: CircuitSlot,
}

type Result<T> = std::result::Result<T, End>;

/// Where the data of the DATA cell at `cell` in the arrival buffer lies:
/// after the link header (5 bytes) and the relay header.
fn data_at(cell: usize, len: usize) -> (u32, u32) {
    ((cell + 5 + relay::HEADER_LEN) as u32, len as u32)
}

/// Whether `next` is DATA for the stream of the DATA cell `first`.
fn same_stream_data(next: &RelayCell<'_>, first: &RelayCell<'_>) -> bool {
    next.command == relay_cmd::DATA && next.stream_id == first.stream_id
}

/// Hands the DATA gathered for a stream to its deliverer (§6).
fn send_batch(entry: &mut Entry) {
    if let Some((arrival, cells)) = entry.batch.take() {
        let batch = DataBatch::from_arrival(&arrival, cells);
        // The conformance kit's fault: SENDMEs for DATA as it arrives.
        if crate::fault::active(crate::fault::Fault::SendmeOnReceipt) {
            entry.stream.delivered(batch.cells() as u32, batch.bytes());
        }
        let _ = entry.stream.to_deliverer.send(DeliverMsg::Data(batch));
    }
}

impl Circuit {
    pub fn new(
        link: Arc<Link>,
        link_tx: LinkTx,
        wire: u32,
        local: u32,
        (tx, rx): (InboxTx<CircMsg>, Inbox<CircMsg>),
        opts: CircuitOpts,
        slot: CircuitSlot,
    ) -> Circuit {
        let package = Arc::new(FairWindow::new(SendWindow::new(opts.flow)));
        let map = StreamMap::with_flow(link.role, opts.flow);
        let thread_ended: ThreadEnded = {
            let tx = tx.clone();
            Arc::new(move |stream_id, serial| {
                let _ = tx.send(CircMsg::ThreadDone { stream_id, serial });
            })
        };
        let view = CircuitView::new(
            link.id,
            local,
            wire,
            link.role,
            opts.flow,
            package.clone(),
            map.deliver_window(),
        );
        Circuit {
            ctx: link.ctx.clone(),
            role: link.role,
            name: format!("{}.{}", link.id, local),
            link,
            link_tx,
            wire,
            local,
            tx,
            rx,
            map,
            package,
            next_serial: 0,
            thread_ended,
            dirty: Vec::new(),
            out: Vec::new(),
            opened: Instant::now(),
            idle_timeout: opts.idle_timeout,
            source: opts.source,
            view,
            tally: Tally::default(),
            _slot: slot,
        }
    }

    /// What the status endpoint sees of this circuit.
    pub fn view(&self) -> Arc<CircuitView> {
        self.view.clone()
    }

    pub fn run(mut self) {
        self.view.set_tid();
        tracing::info!(circuit = %self.name, "circuit opened (CircID {:#010x})", self.wire);
        // `--idle-timeout` and `--half-closed-timeout`: streams are checked
        // on a tick, so the loop never blocks longer than that (and never
        // blocks on a stream).
        let cfg = &self.ctx.cfg;
        let shortest = match (cfg.idle_timeout, cfg.half_closed_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let tick =
            shortest.map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
        let mut next_check = tick.map(|t| Instant::now() + t);
        // When the last inbox message was handled: the isolation idle
        // timeout counts from there (a tick does not restart it).
        let mut quiet_since = Instant::now();
        let end = loop {
            let idle = self.map.is_idle();
            // The isolation idle timeout restarts with every message.
            let circuit_deadline = self.idle_timeout.filter(|_| idle).map(|t| quiet_since + t);
            let deadline = match (circuit_deadline, next_check) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let msg = match deadline {
                Some(d) => match self.rx.recv_deadline(d) {
                    Ok(m) => Some(m),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        if circuit_deadline.is_some_and(|c| Instant::now() >= c) {
                            break End::Idle;
                        }
                        None
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        break End::LinkClosed
                    }
                },
                // We hold a sender ourselves, so the inbox never disconnects.
                None => match self.rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break End::LinkClosed,
                },
            };
            if let Some(msg) = msg {
                if let Err(end) = self.handle(msg) {
                    break end;
                }
                if self.idle_timeout.is_some() {
                    quiet_since = Instant::now();
                }
            }
            if let (Some(t), Some(check)) = (tick, next_check) {
                let now = Instant::now();
                if now >= check {
                    self.end_idle_streams();
                    next_check = Some(now + t);
                }
            }
        };
        self.teardown(end);
    }

    /// `--idle-timeout`: a stream with no byte read from or written to its
    /// TCP connection for that long is an error on the stream, R8.3:
    /// END(TIMEOUT) and a reset. `--half-closed-timeout`: the same for a
    /// half-closed stream whose open direction has been silent that long
    /// (an application that closed its socket after a request nobody
    /// answers would otherwise pin the stream for good). Being half-closed
    /// alone is never a reason to end a stream (R7.10). Streams still
    /// connecting are left to the connect timeout.
    fn end_idle_streams(&mut self) {
        let cfg = &self.ctx.cfg;
        for entry in self.map.streams() {
            let (limit, what) = entry.with_state(|st| {
                if !st.connected || st.hc.is_closed() {
                    return (None, "");
                }
                let half = matches!(st.hc.state(), State::DonePackaging | State::DoneDelivering);
                let limit = match (
                    cfg.idle_timeout,
                    half.then_some(cfg.half_closed_timeout).flatten(),
                ) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let silent = limit.filter(|l| st.last_activity.elapsed() >= *l);
                (
                    silent,
                    if half {
                        "half-closed and silent"
                    } else {
                        "idle"
                    },
                )
            });
            if let Some(limit) = limit {
                tracing::info!(stream = %entry.stream.name, "{what} for {}: END(TIMEOUT)", humantime::format_duration(limit));
                let _ = entry.stream.handle(Event::Error {
                    reason: end_reason::TIMEOUT,
                });
            }
        }
    }

    fn handle(&mut self, msg: CircMsg) -> Result<()> {
        match msg {
            CircMsg::Cells(bytes) => {
                let result = self.on_cells(&Arc::new(bytes));
                self.flush();
                result
            }
            CircMsg::ThreadDone { stream_id, serial } => {
                self.on_thread_done(stream_id, serial);
                Ok(())
            }
            CircMsg::Open(req) => {
                self.open_stream(req);
                self.flush();
                Ok(())
            }
            CircMsg::Resolve(req) => {
                self.start_resolve(req);
                Ok(())
            }
            CircMsg::ResolverDone { stream_id, answers } => {
                // Sent from here, not from the resolver thread, so that the
                // ID is free the moment RESOLVED leaves (§5: no stream).
                if let Some(Resolving::Lookup(handle, _slot)) = self.map.finish_resolve(stream_id) {
                    let body = relay::encode_resolved(&answers, 60);
                    self.queue_relay(relay_cmd::RESOLVED, stream_id, &body);
                    self.flush();
                    threads::join(handle);
                }
                Ok(())
            }
            CircMsg::Destroyed { reason } => Err(End::Destroyed(reason)),
            CircMsg::Violation(why) => Err(End::Violation(ViolationKind::Create, why)),
            CircMsg::LinkClosed => Err(End::LinkClosed),
            CircMsg::Hibernate => Err(End::Hibernate),
        }
    }

    /// Sends the control cells and deliverer batches gathered so far. The
    /// cells first: the circuit SENDMEs among them leave before the data
    /// they acknowledge is handed on (R14.4).
    fn flush(&mut self) {
        self.send_out();
        for id in self.dirty.drain(..) {
            if let Some(entry) = self.map.stream_mut(id) {
                send_batch(entry);
            }
        }
        self.ctx.metrics.add(Dir::Received, &mut self.tally);
        self.view.set_deliver_window(self.map.deliver_window());
    }

    /// Queues the control cells gathered so far on the link.
    fn send_out(&mut self) {
        if !self.out.is_empty() {
            let _ = self.link_tx.send(std::mem::take(&mut self.out));
        }
    }

    fn queue_relay(&mut self, command: u8, stream_id: u16, body: &[u8]) {
        relay::encode(&mut self.out, self.wire, command, stream_id, body);
    }

    /// The relay cells of one inbox message, in order. A run of DATA cells
    /// of one stream is taken at once: one stream lookup and one lock for
    /// it, and its data stays where it arrived (`DataBatch`).
    fn on_cells(&mut self, arrival: &Arc<Vec<u8>>) -> Result<()> {
        let cells = &arrival[..];
        let mut pos = 0;
        // The link hands on whole cells only.
        while pos + CELL_LEN <= cells.len() {
            let rc = self.relay_cell(&cells[pos + 5..pos + CELL_LEN])?;
            pos += CELL_LEN;
            if rc.command != relay_cmd::DATA {
                self.on_cell(rc)?;
                continue;
            }
            // DATA cells that follow for the same stream join the run; a
            // cell that does not decode ends it and fails next round.
            let mut run = vec![data_at(pos - CELL_LEN, rc.body.len())];
            while let Some(Ok(next)) = cells
                .get(pos + 5..pos + CELL_LEN)
                .map(relay::decode)
                .filter(|r| r.as_ref().is_ok_and(|n| same_stream_data(n, &rc)))
            {
                self.tally.relay(next.command);
                run.push(data_at(pos, next.body.len()));
                pos += CELL_LEN;
            }
            self.on_data(rc.stream_id, arrival, run)?;
        }
        Ok(())
    }

    /// Decodes a relay cell (R4.4) and applies the checks every relay cell
    /// gets (R4.6, R4.7, R4.8).
    fn relay_cell<'a>(&mut self, payload: &'a [u8]) -> Result<RelayCell<'a>> {
        let rc = relay::decode(payload).map_err(CircuitViolation::from)?;
        self.tally.relay(rc.command);
        self.map.check(&rc)?;
        Ok(rc)
    }

    /// One relay cell other than DATA (docs/protocol.md §4).
    fn on_cell(&mut self, rc: RelayCell<'_>) -> Result<()> {
        let id = rc.stream_id;
        match rc.command {
            relay_cmd::FIN => self.on_fin(id),
            relay_cmd::END => {
                self.on_end(id, relay::parse_end(rc.body));
                Ok(())
            }
            // R10.4, R10.11 on the circuit window (R10.12: payload ignored);
            // R14.6, R14.7 on the congestion window.
            relay_cmd::SENDME if id == 0 => self
                .package
                .update(|w| w.on_sendme(Instant::now()))
                .map_err(|v| End::from(CircuitViolation::CircuitWindow(v))),
            relay_cmd::SENDME => Ok(self.map.on_stream_sendme(id)?),
            // §14: R14.11, R14.13, R14.14; R14.16 on a version 1 circuit.
            relay_cmd::XOFF | relay_cmd::XON => {
                Ok(self.map.on_xon_xoff(id, rc.command, rc.body)?)
            }
            relay_cmd::CONNECTED => self.on_connected(id, rc.body),
            relay_cmd::BEGIN => self.on_begin(id, rc.body),
            relay_cmd::RESOLVE => self.on_resolve(id, rc.body),
            relay_cmd::RESOLVED => {
                if let Some(Resolving::Waiting(reply, _)) = self.map.on_resolved(id) {
                    let _ = reply.send(relay::parse_resolved(rc.body));
                }
                Ok(())
            }
            // R4.9: DROP is ignored and unknown relay commands are dropped.
            _ => Ok(()),
        }
    }

    /// §6, §10: a run of DATA cells of stream `id`; `run` is where their
    /// data lies in `arrival`, the buffer they arrived in.
    fn on_data(&mut self, id: u16, arrival: &Arc<Vec<u8>>, run: Vec<(u32, u32)>) -> Result<()> {
        let outcome = self.map.on_data(id, run.len() as u32)?;
        for _ in 0..outcome.circuit_sendmes {
            self.queue_relay(relay_cmd::SENDME, 0, &[]); // R10.2
        }
        if outcome.delivery == Delivery::Drop {
            return Ok(());
        }
        let Some(entry) = self.map.stream_mut(id) else {
            return Ok(());
        };
        // The conformance kit's fault: DATA for a stream still connecting
        // (R5.15) is discarded.
        if crate::fault::active(crate::fault::Fault::OptimisticDataDropped)
            && entry.stream.state.lock().socket.is_none()
        {
            return Ok(());
        }
        match &mut entry.batch {
            Some((gathered, cells)) => {
                // `flush` sends every batch after each inbox message, so
                // ranges into two buffers never meet in one batch.
                debug_assert!(Arc::ptr_eq(gathered, arrival));
                cells.extend(run);
            }
            None => {
                self.dirty.push(id);
                entry.batch = Some((arrival.clone(), run));
            }
        }
        Ok(())
    }

    /// R7.4, R7.5: FIN → deliver what came before it, then shutdown(SHUT_WR).
    fn on_fin(&mut self, id: u16) -> Result<()> {
        let step = self.map.on_fin(id)?;
        // The conformance kit's fault: a late FIN taken for a violation.
        if crate::fault::active(crate::fault::Fault::LateCellsAreViolations)
            && (self.map.is_recently_closed(id)
                || step
                    .is_some_and(|s| matches!(s.from, halfpipe_proto::halfclose::State::Closed(_))))
        {
            return Err(CircuitViolation::WrongDirection(relay_cmd::FIN).into());
        }
        let Some(step) = step else {
            return Ok(()); // R9.3, R9.5
        };
        // R14.4: SENDMEs for the data before the FIN leave before it is
        // handed on.
        self.send_out();
        let entry = self.map.stream_mut(id).expect("on_fin found it");
        if step.action == Action::DeliverThenShutdownWrite {
            send_batch(entry);
            let _ = entry.stream.to_deliverer.send(DeliverMsg::Fin);
        }
        entry.stream.carry_out(step, Event::FinReceived);
        Ok(())
    }

    /// R7.8, R8.8: END aborts without sending; a client stream still
    /// waiting for CONNECTED answers the SOCKS request with the failure
    /// (R8.10).
    fn on_end(&mut self, id: u16, reason: u8) {
        self.ctx.metrics.end_received(reason);
        match self.map.on_end(id, reason) {
            Ended::Stream(step) => {
                let entry = self.map.stream_mut(id).expect("on_end found it");
                entry.batch = None; // R8.8: queued data is discarded
                tracing::debug!(stream = %entry.stream.name, "END({}) received", end_reason::name(reason));
                entry.stream.carry_out(step, Event::EndReceived { reason });
            }
            Ended::Resolve(Resolving::Waiting(reply, _)) => {
                let _ = reply.send(vec![Answer::TransientError]);
            }
            Ended::Resolve(Resolving::Lookup(..)) => unreachable!("exits wait for no RESOLVED"),
            Ended::Dropped => {}
        }
    }

    /// Client, R5.4: CONNECTED answers our BEGIN.
    fn on_connected(&mut self, id: u16, body: &[u8]) -> Result<()> {
        if self.map.on_connected(id)? == Delivery::Deliver {
            let entry = self.map.stream(id).expect("on_connected found it");
            let _ = entry
                .stream
                .to_deliverer
                .send(DeliverMsg::Connected(relay::parse_connected(body)));
        }
        Ok(())
    }

    /// Refuses a BEGIN with END(reason) (§5); the ID counts as closed (R9.1),
    /// so the client's optimistic DATA for it is dropped silently.
    fn refuse_begin(&mut self, id: u16, reason: u8) {
        self.queue_relay(relay_cmd::END, id, &[reason]);
        self.map.refuse(id);
    }

    /// Exit, R5.3: BEGIN opens a stream: a deliverer waiting for the socket
    /// and a packager that resolves, checks the exit policy and connects.
    fn on_begin(&mut self, id: u16, body: &[u8]) -> Result<()> {
        let target = match self.map.on_begin(id, body)? {
            Begin::Open(target) => target,
            Begin::Malformed(e) => {
                // R5.5 (the map has put the ID in the recently-closed set).
                tracing::info!(circuit = %self.name, stream = id, "{e}: END(TORPROTOCOL)");
                self.queue_relay(relay_cmd::END, id, &[end_reason::TORPROTOCOL]);
                return Ok(());
            }
        };
        // R5.12: while shutting down, no new stream: "any other failure".
        if self.ctx.shutting_down() {
            tracing::info!(circuit = %self.name, stream = id, "shutting down: END(MISC)");
            self.refuse_begin(id, end_reason::MISC);
            return Ok(());
        }
        let Some(slot) = self.take_counted_slot() else {
            tracing::info!(circuit = %self.name, stream = id, "stream limit reached: END(RESOURCELIMIT)");
            self.refuse_begin(id, end_reason::RESOURCELIMIT); // R5.11
            return Ok(());
        };
        let (stream, dl_rx) = self.new_stream(id, target, None);
        let (sock_tx, sock_rx) = crossbeam_channel::bounded(1);
        // The packager first: it connects to the target, the slow part of
        // opening a stream, while this thread starts the deliverer.
        let pk = {
            let (s, ctx) = (stream.clone(), self.ctx.clone());
            self.ctx.pool.spawn(format!("pk {}", stream.name), move || {
                stream::exit_packager(s, ctx, sock_tx)
            })
        };
        let pk = match pk {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(stream = %stream.name, "cannot start a packager thread ({e}): END(RESOURCELIMIT)");
                self.ctx.metrics.refused(Limit::Threads);
                self.refuse_begin(id, end_reason::RESOURCELIMIT); // R5.11
                return Ok(());
            }
        };
        let entry = Entry {
            stream: stream.clone(),
            threads: vec![pk],
            alive: 1,
            batch: None,
            _slot: slot,
        };
        let dl = {
            let s = stream.clone();
            self.ctx.pool.spawn(format!("dl {}", stream.name), move || {
                stream::deliverer(s, dl_rx, DeliverStart::Exit(sock_rx))
            })
        };
        self.enter_stream(entry, dl);
        Ok(())
    }

    /// Enters a stream whose first thread runs; `second` is how starting
    /// its other thread went. A thread that could not start is a local
    /// resource failure, an error on the stream (R8.4: END(RESOURCELIMIT)
    /// and a reset, R8.7), and the thread that runs ends by itself: an exit
    /// packager sees the abort (and its socket has no taker), a client
    /// deliverer answers the SOCKS request with 0x01.
    fn enter_stream(&mut self, mut entry: Entry, second: std::io::Result<Task>) {
        let stream = entry.stream.clone();
        match second {
            Ok(h) => {
                entry.threads.push(h);
                entry.alive += 1;
            }
            Err(e) => {
                tracing::warn!(stream = %stream.name, "cannot start a stream thread ({e}): END(RESOURCELIMIT)");
                self.ctx.metrics.refused(Limit::Threads);
                let _ = stream.handle(Event::Error {
                    reason: end_reason::RESOURCELIMIT,
                });
            }
        }
        self.view.add_stream(&stream);
        self.map.insert_stream(stream.id, entry);
    }

    /// Exit, R5.17: RESOLVE is answered by RESOLVED from a resolver thread.
    fn on_resolve(&mut self, id: u16, body: &[u8]) -> Result<()> {
        let name = match self.map.on_resolve(id, body)? {
            Resolve::Lookup(name) => name,
            // Not a valid hostname: no such name can exist (0xF1, R5.19).
            Resolve::Malformed => {
                let body = relay::encode_resolved(&[Answer::NontransientError], 0);
                self.queue_relay(relay_cmd::RESOLVED, id, &body);
                return Ok(());
            }
        };
        // No slot or no thread for the lookup: a failure other than a
        // missing name, so 0xF0 (R5.19).
        let refuse = |c: &mut Circuit| {
            let body = relay::encode_resolved(&[Answer::TransientError], 0);
            c.queue_relay(relay_cmd::RESOLVED, id, &body);
            c.map.refuse(id);
        };
        let Some(slot) = self.take_counted_slot() else {
            refuse(self);
            return Ok(());
        };
        // One of the process's bounded lookups (`limits::MAX_LOOKUPS`).
        let Some(permit) = self.ctx.lookups.try_acquire() else {
            refuse(self);
            return Ok(());
        };
        let done = self.tx.clone();
        let spawned = threads::spawn(format!("rslv {}.{}", self.local, id), move || {
            let _permit = permit;
            let answers = crate::edge::exit::connect::resolve_answers(&name);
            let _ = done.send(CircMsg::ResolverDone {
                stream_id: id,
                answers,
            });
        });
        match spawned {
            Ok(h) => self.map.insert_resolve(id, Resolving::Lookup(h, slot)),
            Err(_) => refuse(self),
        }
        Ok(())
    }

    /// Client: RESOLVEs whose SOCKS request has given up waiting and that
    /// the exit never answered: their IDs are over (recently closed), so
    /// they do not pile up on a circuit whose exit ignores RESOLVE.
    fn forget_stale_resolves(&mut self) {
        let now = Instant::now();
        let stale: Vec<u16> = self
            .map
            .resolves()
            .filter(|(_, r)| matches!(r, Resolving::Waiting(_, until) if *until <= now))
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            self.map.finish_resolve(id);
        }
    }

    /// A stream slot, within the circuit's and the process's limits (R3.9),
    /// or the limit that refused it. An exit's RESOLVE holds one (it holds
    /// a resolver thread); a client's RESOLVE waiting for its answer does
    /// not.
    ///
    /// The process's limits first: a client whose process is full must not
    /// go looking for another circuit as though only this one were.
    fn take_slot(&self) -> std::result::Result<StreamSlot, Limit> {
        let slot = self
            .ctx
            .take_stream_slot(&self.source)
            .map_err(|e| match e {
                NoSlot::Process => Limit::Process,
                NoSlot::Share => Limit::Share,
            })?;
        let waiting = self
            .map
            .resolves()
            .filter(|(_, r)| matches!(r, Resolving::Waiting(..)))
            .count();
        if self.map.in_use() - waiting >= self.ctx.cfg.max_streams_per_circuit {
            return Err(Limit::Circuit); // the slot goes back as it drops
        }
        Ok(slot)
    }

    /// `take_slot` for a stream the peer asked for: a refusal is counted.
    fn take_counted_slot(&self) -> Option<StreamSlot> {
        self.take_slot()
            .inspect_err(|limit| self.ctx.metrics.refused(*limit))
            .ok()
    }

    fn new_stream(
        &mut self,
        id: u16,
        target: Target,
        socket: Option<Arc<Socket>>,
    ) -> (Arc<Stream>, Inbox<DeliverMsg>) {
        let (dl_tx, dl_rx) = inbox::inbox();
        self.next_serial += 1;
        let stream = Arc::new(Stream {
            id,
            serial: self.next_serial,
            name: format!("{}.{}", self.local, id),
            role: self.role,
            target,
            wire_circ: self.wire,
            link: self.link_tx.clone(),
            circuit_window: self.package.clone(),
            thread_ended: self.thread_ended.clone(),
            state: Monitor::new(Shared::new(socket, self.map.flow())),
            aborted: AtomicBool::new(false),
            to_deliverer: dl_tx,
            opened: Instant::now(),
            metrics: self.ctx.metrics.clone(),
        });
        (stream, dl_rx)
    }

    /// Client, §5 and §11: a SOCKS CONNECT becomes BEGIN and two threads.
    /// A circuit that is full gives the request back for the client to
    /// try another circuit; a process limit refuses it (SOCKS 0x01).
    fn open_stream(&mut self, req: OpenRequest) {
        // R5.1, R9.4: no stream ID left is this circuit being full too.
        let taken = self
            .take_slot()
            .and_then(|slot| Ok((slot, self.map.allocate_id().ok_or(Limit::Circuit)?)));
        let (slot, id) = match taken {
            Ok(t) => t,
            Err(Limit::Circuit) => {
                tracing::debug!(circuit = %self.name, "circuit full: the client looks for another");
                let _ = req.refused.send((req.socket, Refused::Full));
                return;
            }
            Err(limit) => {
                tracing::info!(circuit = %self.name, "stream limit reached: refusing SOCKS request");
                self.ctx.metrics.refused(limit);
                let _ = req.refused.send((req.socket, Refused::Limit));
                return;
            }
        };
        let sock = Arc::new(req.socket);
        let (stream, dl_rx) = self.new_stream(id, req.target, Some(sock.clone()));
        // BEGIN first, so that the exit opens its side while this thread
        // starts ours; it precedes any DATA, since the packager does not
        // exist yet. R5.2: its payload follows the grammar of §5.
        let begin = relay::encode_begin(&stream.target);
        stream.send_control(relay_cmd::BEGIN, &begin);
        tracing::debug!(stream = %stream.name, target = %stream.target, "BEGIN sent");
        let dl = {
            let (s, sock, socks) = (stream.clone(), sock.clone(), req.socks);
            let begin_timeout = self.ctx.cfg.begin_timeout;
            self.ctx.pool.spawn(format!("dl {}", stream.name), move || {
                let start = DeliverStart::Client {
                    sock,
                    socks,
                    begin_timeout,
                };
                stream::deliverer(s, dl_rx, start)
            })
        };
        let dl = match dl {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(stream = %stream.name, "cannot start a deliverer thread ({e}): END(RESOURCELIMIT), refusing SOCKS request");
                self.ctx.metrics.refused(Limit::Threads);
                // R8.4: the BEGIN is answered by our END(RESOURCELIMIT); the
                // ID is closed (R9.1).
                stream.send_control(relay_cmd::END, &[end_reason::RESOURCELIMIT]);
                self.map.refuse(id);
                drop(stream);
                if let Ok(socket) = Arc::try_unwrap(sock) {
                    let _ = req.refused.send((socket, Refused::Limit));
                }
                return;
            }
        };
        let entry = Entry {
            stream: stream.clone(),
            threads: vec![dl],
            alive: 1,
            batch: None,
            _slot: slot,
        };
        let pk = {
            let (s, initial) = (stream.clone(), req.initial);
            self.ctx.pool.spawn(format!("pk {}", stream.name), move || {
                stream::client_packager(s, sock, initial)
            })
        };
        self.enter_stream(entry, pk);
    }

    /// Client: a SOCKS RESOLVE becomes RELAY_RESOLVE (§5).
    fn start_resolve(&mut self, req: ResolveRequest) {
        self.forget_stale_resolves();
        let Some(id) = self.map.allocate_id() else {
            let _ = req.reply.send(vec![Answer::TransientError]);
            return;
        };
        let mut body = req.name.into_bytes();
        body.push(0);
        self.queue_relay(relay_cmd::RESOLVE, id, &body);
        self.map.insert_resolve(
            id,
            Resolving::Waiting(req.reply, Instant::now() + RESOLVE_WAIT),
        );
        self.flush();
    }

    /// A stream thread ended; when both have, the stream is CLOSED and its
    /// ID enters the recently-closed set (R9.1). R7.10: a half-closed stream
    /// stays here, with no timer, until its other direction ends too; R7.9:
    /// after a FIN each way it is released, and its socket, shut for
    /// writing and never reset, is closed normally as the last `Arc` goes.
    fn on_thread_done(&mut self, id: u16, serial: u64) {
        let is_it = |e: &Entry| e.stream.serial == serial;
        let retired = self.map.retired_mut();
        if let Some(pos) = retired.iter().position(is_it) {
            retired[pos].alive -= 1;
            if retired[pos].alive == 0 {
                let entry = retired.swap_remove(pos);
                entry.threads.into_iter().for_each(Task::join);
                self.view.remove_stream(serial);
            }
            return;
        }
        let Some(entry) = self.map.stream_mut(id).filter(|e| is_it(e)) else {
            return;
        };
        entry.alive -= 1;
        if entry.alive > 0 {
            return;
        }
        let Some(entry) = self.map.remove_stream(id) else {
            return;
        };
        let state = entry.stream.state_name();
        if !entry.with_state(|st| st.hc.is_closed()) {
            // Both threads end only after their direction finished or the
            // stream aborted, which together mean CLOSED.
            tracing::error!(stream = %entry.stream.name, "bug: stream threads ended in state {state}");
            let _ = entry.stream.handle(Event::Error {
                reason: end_reason::INTERNAL,
            });
        }
        let c = entry.with_state(|st| st.counters);
        entry.threads.into_iter().for_each(Task::join);
        self.view.remove_stream(serial);
        tracing::debug!(
            stream = %entry.stream.name,
            target = %entry.stream.target,
            up = c.bytes_packaged,
            down = c.bytes_delivered,
            secs = entry.stream.opened.elapsed().as_secs_f64(),
            "stream closed"
        );
    }

    fn teardown(mut self, end: End) {
        let cause = match &end {
            End::Violation(..) => "protocol violation, DESTROY(PROTOCOL) sent".to_string(),
            End::Destroyed(reason) => {
                format!("DESTROY({}) received", destroy_reason::name(*reason))
            }
            End::LinkClosed => "link closed".to_string(),
            End::Hibernate => "shutdown, DESTROY(HIBERNATING) sent".to_string(),
            End::Idle => "not needed (no streams), DESTROY(FINISHED) sent".to_string(),
        };
        // R3.10: whatever ends the circuit, every stream on it is aborted
        // as though it had received END(DESTROY), except at shutdown (R8.5).
        // R11.6: a client stream still waiting for CONNECTED answers its
        // SOCKS request with 0x01, what END(DESTROY) maps to.
        let event = match &end {
            // R3.12: a violation; the DESTROY(PROTOCOL) follows below.
            End::Violation(kind, why) => {
                self.ctx.metrics.violation(*kind);
                if crate::runtime::ratelimit::violation_warning() {
                    tracing::warn!(circuit = %self.name, "protocol violation: {why}: sending DESTROY(PROTOCOL)");
                }
                Event::EndReceived {
                    reason: end_reason::DESTROY,
                }
            }
            End::Destroyed(reason) => {
                tracing::info!(circuit = %self.name, "DESTROY({}) received", destroy_reason::name(*reason));
                Event::EndReceived {
                    reason: end_reason::DESTROY,
                }
            }
            // R3.13: the link is lost.
            End::LinkClosed => Event::EndReceived {
                reason: end_reason::DESTROY,
            },
            // R8.5: the shutdown deadline passed: END(HIBERNATING) for every
            // stream.
            End::Hibernate => Event::Error {
                reason: end_reason::HIBERNATING,
            },
            // No streams to end.
            End::Idle => Event::Error {
                reason: end_reason::MISC,
            },
        };
        let (streams, resolves) = self.map.drain();
        for entry in &streams {
            // A stream that had already reached CLOSED may still have a
            // deliverer writing its last data (after both FINs): stop it
            // too, or joining it could wait forever (R3.10: every stream
            // on the circuit is aborted).
            if let Ok(Action::Nothing) = entry.stream.handle(event) {
                entry.stream.force_stop();
            }
        }
        let destroy = match end {
            End::Violation(..) => Some(destroy_reason::PROTOCOL),
            End::Hibernate => Some(destroy_reason::HIBERNATING),
            End::Idle => Some(destroy_reason::FINISHED),
            End::Destroyed(_) | End::LinkClosed => None,
        };
        // After the ENDs (the peer sees every stream's END first), the
        // DESTROY; then the CircID is free (R3.7) and later cells on it are
        // dropped (R3.11).
        self.link.circuit_ended(self.wire, self.local, destroy);
        self.package.close();
        // Waiting SOCKS resolves get their failure at once, when their
        // senders drop here; exit resolvers are joined with the streams.
        let lookups: Vec<(JoinHandle<()>, StreamSlot)> = resolves
            .into_iter()
            .filter_map(|r| match r {
                Resolving::Lookup(handle, slot) => Some((handle, slot)),
                Resolving::Waiting(..) => None,
            })
            .collect();
        let count = streams.len();
        for entry in streams {
            entry.threads.into_iter().for_each(Task::join);
        }
        for (handle, _slot) in lookups {
            threads::join(handle);
        }
        // Requests that reached the inbox after the loop ended: answer
        // them (R11.6: SOCKS 0x01) rather than drop their sockets.
        while let Ok(msg) = self.rx.try_recv() {
            if let CircMsg::Open(req) = msg {
                let _ = req.refused.send((req.socket, Refused::Ended));
            }
        }
        self.view.clear_streams();
        self.link.forget_view(self.local);
        tracing::info!(
            circuit = %self.name,
            streams = count,
            secs = self.opened.elapsed().as_secs_f64(),
            "circuit closed: {cause}"
        );
    }
}

// Real threads and sockets: not under loom, whose primitives work only
// inside a model.
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::link::Links;
    use crate::process::Config;
    use halfpipe_proto::cell;
    use halfpipe_proto::relay::Host;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_stream_whose_thread_cannot_start_is_ended_with_resourcelimit() {
        // R8.4: a local resource failure on a stream (here: its second
        // thread cannot be had) is an error on the stream: END
        // (RESOURCELIMIT), and the stream is CLOSED. The failed start is
        // handed in, as `threads::spawn` would return it; the END is read
        // off the link at the other end of a loopback connection.
        let ctx = Ctx::new(Config::default());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let registry = Arc::new(Links::default());
        let link = Link::start(
            ctx.clone(),
            &registry,
            1,
            Role::Exit,
            crate::link::Transport::plain(ours),
        )
        .unwrap();
        let slot = ctx.take_circuit_slot().unwrap();
        let wire = 0x8000_0001;
        let mut circuit = Circuit::new(
            link.clone(),
            link.tx.clone(),
            wire,
            1,
            inbox::inbox(),
            CircuitOpts {
                idle_timeout: None,
                source: Source::new(),
                flow: Flow::V1,
            },
            slot,
        );
        let target = Target {
            host: Host::Name("target.example".into()),
            port: 80,
        };
        let (stream, _dl_rx) = circuit.new_stream(7, target, None);
        let first = ctx.pool.spawn("test-first".into(), || {}).unwrap();
        let entry = Entry {
            stream: stream.clone(),
            threads: vec![first],
            alive: 1,
            batch: None,
            _slot: ctx.take_stream_slot(&Source::new()).unwrap(),
        };
        circuit.enter_stream(entry, Err(std::io::Error::other("no thread")));
        let mut cell = [0u8; CELL_LEN];
        peer.read_exact(&mut cell).unwrap();
        let (c, _) = cell::decode(&cell).unwrap();
        assert_eq!((c.circ_id, c.command), (wire, cell::cmd::RELAY));
        let rc = relay::decode(c.payload).unwrap();
        assert_eq!(
            (rc.command, rc.stream_id, rc.body),
            (relay_cmd::END, 7, &[end_reason::RESOURCELIMIT][..])
        );
        assert!(stream.state.lock().hc.is_closed());
        drop(circuit);
        link.abandon();
    }
}
