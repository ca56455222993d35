//! One stream: the state its packager and deliverer share, and the two
//! threads themselves (design.md: `pk C.S` reads the socket into DATA cells,
//! `dl C.S` writes cells to the socket).
//!
//! Rules applied here: protocol.md §7 (through `halfclose`), §8 (abort),
//! §10 (windows, through `flow`). Under the stream's lock a thread feeds an
//! event to the state machine and queues the cells it decided on (queueing
//! never blocks); after the lock it does the I/O (invariant 5). So the cells
//! of a stream leave in the order they were decided: no DATA after our FIN,
//! nothing after our END. Those lock-held steps are the methods of
//! [`StreamState`] that take an [`Outbound`]: holding `&mut StreamState`
//! means holding the lock, so they queue under it by construction. The
//! concurrency model check (`src/loom_check.rs`) runs them as they are.

use crate::circuit::msg::CircMsg;
use crate::edge::exit::connect::{self, ConnectError, Connecting};
use crate::link::{LinkGone, LinkTx};
use crate::ops::metrics::{Metrics, ViolationKind};
use crate::runtime::batch::DataBatch;
use crate::runtime::fairwindow::FairWindow;
use crate::runtime::inbox::{Inbox, InboxTx};
use crate::runtime::monitor::Monitor;
use crate::runtime::sockets;
use crossbeam_channel::{Receiver, Sender};
use halfpipe_proto::cell::{self, CELL_LEN};
use halfpipe_proto::flow::{FlowViolation, PackageWindow, StreamDeliverWindow};
use halfpipe_proto::halfclose::{Action, Event, HalfClose, State, Step, Violation};
use halfpipe_proto::relay::{self, end_reason, relay_cmd, Target};
use halfpipe_proto::socks;
use halfpipe_proto::Role;
use socket2::MaybeUninitSlice;
use socket2::Socket;
use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Offset of a DATA cell's data: link header [5] + relay header [11].
const DATA_OFFSET: usize = 5 + relay::HEADER_LEN;
/// Most cells one read() may fill (about 250 KiB: reads this large were
/// what mattered for throughput in the prototype, issue 5).
pub const MAX_READ_CELLS: u32 = 512;
/// A packager that stopped at a stream package window of 0 reads again once
/// the window is back to this (half its start, §10). §10 only says a sender
/// stops at 0 until a SENDME arrives; resuming at each SENDME's 50 cells,
/// a bulk sender read 25 KB at a time and the whole pipeline ran in such
/// small pieces (issue 5). A packager still stops only at 0, so what a
/// peer that withholds SENDMEs gets is exactly the window, as before. The
/// mark cannot hold a stream up: at 0, 500 cells are in flight, and once
/// the peer has written them all the window is back above 450 (what the
/// peer has not acknowledged is under one SENDME's 50 cells). An idle
/// stream's window is at its start, so an interactive write is read at once.
pub const READ_LOW_WATER: u32 = halfpipe_proto::flow::STREAM_WINDOW_START / 2;
/// Cells a packager starts reading with; it doubles while reads come back
/// full, so an idle stream holds a small buffer and a bulk one a large one.
const FIRST_READ_CELLS: u32 = 8;

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
    /// with the failure for this END reason (protocol.md §11).
    Refused(u8),
    /// The stream was aborted: stop at once.
    Abort,
}

/// Per-direction counters for the status table and logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Bytes read from our TCP connection and sent as DATA.
    pub bytes_packaged: u64,
    pub cells_packaged: u64,
    /// Bytes received as DATA and written to our TCP connection.
    pub bytes_delivered: u64,
    pub cells_received: u64,
    /// DATA cells whose data was written to our TCP connection.
    pub cells_delivered: u64,
}

/// The state a stream's threads share, under one lock (design.md).
pub struct StreamState {
    pub hc: HalfClose,
    pub package: PackageWindow,
    pub deliver: StreamDeliverWindow,
    /// The TCP connection, once there is one (the exit connects in the
    /// packager): kept here so that an abort can reset it from any thread.
    pub socket: Option<Arc<Socket>>,
    /// Client: CONNECTED arrived. Exit: the target accepted.
    pub connected: bool,
    pub counters: Counters,
    /// When a byte was last read from or written to our TCP connection
    /// (status: idle time); updated with the byte counters.
    pub last_activity: Instant,
    /// TIDs of the packager and deliverer while they run.
    pub packager_tid: Option<i32>,
    pub deliverer_tid: Option<i32>,
    /// The packager stopped at a package window of 0 and waits for
    /// `low_water` (`read_window`).
    pub package_stopped: bool,
    /// The window a packager stopped at 0 waits for: `READ_LOW_WATER`
    /// (the concurrency model check uses 1). One value for the packager's
    /// wait and for the SENDMEs that decide whether to wake it.
    pub low_water: u32,
}

/// Where a stream's cells go: the link's outbound queue (for a [`Stream`]),
/// or the model check's record of what was sent. Queueing never blocks, so
/// it may be done with the stream's lock held (design.md, invariant 4).
pub trait Outbound {
    /// Queues one control cell of the stream (FIN, END).
    fn control(&self, command: u8, body: &[u8]);
    /// Queues `n` stream SENDMEs.
    fn sendmes(&self, n: u32);
    /// Queues `count` framed DATA cells for which room was reserved.
    fn data(&self, cells: Vec<u8>, count: u32) -> Result<(), LinkGone>;
}

/// The steps a thread takes under the stream's lock: decide with the §7
/// state machine and the §10 windows, and queue the cells decided on.
impl StreamState {
    /// Feeds one event to the §7 state machine and queues the cell its
    /// action sends (FIN, or END for an error). The rest of the action is
    /// the caller's, after the lock.
    pub fn step(&mut self, event: Event, out: &impl Outbound) -> Result<Step, Violation> {
        let step = self.hc.handle(event)?;
        match step.action {
            Action::SendFin => out.control(relay_cmd::FIN, &[]),
            Action::SendEndAndReset(reason) => out.control(relay_cmd::END, &[reason]),
            _ => {}
        }
        Ok(step)
    }

    /// The packager's wait (§10): `Some(window)` while the stream package
    /// window is open, `Some(0)` once we may no longer package (§7), `None`
    /// while it is closed. Closed means 0, and after it was 0, below
    /// `low_water` (see [`READ_LOW_WATER`]).
    pub fn read_window(&mut self) -> Option<u32> {
        if !self.hc.may_package() {
            return Some(0);
        }
        let window = self.package.value();
        if window == 0 {
            self.package_stopped = true;
        }
        if !self.may_read() {
            return None;
        }
        self.package_stopped = false;
        Some(window)
    }

    /// Whether the window lets a packager read (`read_window`): not when it
    /// stopped at 0 and the window is still under `low_water`.
    fn may_read(&self) -> bool {
        !(self.package_stopped && self.package.value() < self.low_water.max(1))
    }

    /// Queues `count` DATA cells holding `bytes` bytes, taking them from the
    /// stream package window, if we may still package (§7). `Ok(false)`:
    /// we may not, nothing was queued, and the caller returns the circuit
    /// window and link room it reserved.
    pub fn queue_data(
        &mut self,
        cells: Vec<u8>,
        count: u32,
        bytes: u64,
        out: &impl Outbound,
    ) -> Result<bool, LinkGone> {
        if !self.hc.may_package() {
            return Ok(false);
        }
        let took = self.package.take(count);
        debug_assert_eq!(
            took, count,
            "only the packager takes from the stream window"
        );
        // Stopped the moment the window reaches 0, not when the packager
        // next looks: SENDMEs that come first must not resume it below the
        // mark (READ_LOW_WATER).
        if self.package.value() == 0 {
            self.package_stopped = true;
        }
        self.counters.cells_packaged += u64::from(count);
        self.counters.bytes_packaged += bytes;
        self.last_activity = Instant::now();
        out.data(cells, count)?;
        Ok(true)
    }

    /// `cells` DATA cells for this stream arrived in a row (circuit thread):
    /// §7 says whether they may be delivered (all or none), §10 counts them
    /// against the deliver window. An overrun refuses the whole run: it ends
    /// the circuit, which resets every stream on it anyway.
    pub fn accept_data(&mut self, cells: u32) -> Result<bool, (ViolationKind, String)> {
        // DATA never changes the §7 state, so one step decides for the run.
        let step = self
            .hc
            .handle(Event::DataReceived)
            .map_err(|v| (ViolationKind::HalfClose, v.to_string()))?;
        if step.action != Action::Deliver {
            return Ok(false); // §9: late DATA for a closed stream
        }
        for _ in 0..cells {
            self.deliver
                .on_data()
                .map_err(|v: FlowViolation| (ViolationKind::FlowControl, v.to_string()))?;
        }
        self.counters.cells_received += u64::from(cells);
        Ok(true)
    }

    /// A stream SENDME arrived (circuit thread, §10). Returns whether a
    /// packager waiting in `read_window` may read now; if not, it need not
    /// be woken (nothing else changed).
    pub fn on_sendme(&mut self) -> Result<bool, FlowViolation> {
        if self.hc.is_closed() {
            return Ok(true); // §9: late SENDME
        }
        self.package.on_sendme()?;
        Ok(self.may_read())
    }

    /// `cells` cells' data (`bytes` bytes) were accepted by the kernel: count
    /// them and queue the stream SENDMEs they earn (§10). Once the peer's
    /// FIN has arrived no more DATA can come, so no SENDME is needed.
    pub fn delivered(&mut self, cells: u32, bytes: usize, out: &impl Outbound) {
        self.counters.bytes_delivered += bytes as u64;
        self.counters.cells_delivered += u64::from(cells);
        self.last_activity = Instant::now();
        if self.hc.may_deliver() {
            let sendmes = self.deliver.on_written(cells);
            if sendmes > 0 {
                out.sendmes(sendmes);
            }
        }
    }
}

pub struct Stream {
    pub id: u16,
    /// Unique within the circuit: tells a CLOSED stream whose threads are
    /// still ending from a new stream on the same ID (protocol.md §5).
    pub serial: u64,
    /// "C.S": the circuit's short counter and the stream ID (thread names).
    pub name: String,
    pub role: Role,
    pub target: Target,
    pub wire_circ: u32,
    pub link: LinkTx,
    pub circuit_window: Arc<FairWindow>,
    pub circuit_tx: InboxTx<CircMsg>,
    pub state: Monitor<StreamState>,
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
        let (step, socket, connected) = {
            let mut st = self.state.lock();
            // Queued under the lock: cell order is decision order.
            let step = st.step(event, self)?;
            (step, st.socket.clone(), st.connected)
        };
        if step.from != step.to {
            tracing::debug!(stream = %self.name, "{} => {} ({event:?})", step.from, step.to);
            self.state.kick();
        }
        match step.action {
            Action::SendEndAndReset(reason) => self.abort_io(socket.as_deref(), connected, reason),
            Action::Reset => {
                let reason = match event {
                    Event::EndReceived { reason } => reason,
                    _ => end_reason::MISC,
                };
                self.abort_io(socket.as_deref(), connected, reason)
            }
            _ => {}
        }
        Ok(step.action)
    }

    /// §8: reset the TCP connection and stop both threads. A client stream
    /// that never got CONNECTED answers the SOCKS request instead (§8, §11):
    /// its deliverer writes the failure and closes normally.
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
                    sockets::reset(s);
                }
                let _ = self.to_deliverer.send(DeliverMsg::Abort);
            }
        }
    }

    /// `cells` DATA cells for this stream arrived in a row (circuit thread,
    /// §7, §10): one lock for the run.
    pub fn accept_data(&self, cells: u32) -> Result<bool, (ViolationKind, String)> {
        self.state.lock().accept_data(cells)
    }

    /// A stream SENDME arrived (circuit thread, §10): it may open the
    /// window the packager waits for. The packager is woken only once it
    /// may read: a bulk packager stopped at 0 used to be woken for each of
    /// the five SENDMEs that bring it back to 250, and went back to sleep
    /// four times (`perf record -e sched:sched_wakeup`, issue 5).
    pub fn on_sendme(&self) -> Result<(), FlowViolation> {
        self.state.update_waking_if(sendme_step)
    }

    /// Client: the stream is open and still waits for CONNECTED. (A closed
    /// stream waits for nothing: late cells for it are dropped, §9.)
    pub fn awaiting_connected(&self) -> bool {
        let st = self.state.lock();
        !st.connected && !st.hc.is_closed()
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
    fn delivered(&self, cells: u32, bytes: usize) {
        self.metrics.delivered(bytes as u64, cells);
        self.state.lock().delivered(cells, bytes, self);
    }
}

/// A stream's cells go to its link.
impl Outbound for Stream {
    fn control(&self, command: u8, body: &[u8]) {
        self.send_control(command, body);
    }

    fn sendmes(&self, n: u32) {
        // One queue message for all of them: one wake-up of the writer.
        let mut out = Vec::with_capacity(n as usize * CELL_LEN);
        for _ in 0..n {
            relay::encode(&mut out, self.wire_circ, relay_cmd::SENDME, self.id, &[]);
        }
        let _ = self.link.send(out);
    }

    fn data(&self, cells: Vec<u8>, count: u32) -> Result<(), LinkGone> {
        self.link.send_data(cells, count)
    }
}

/// Tells the circuit a stream thread has ended, also if it panicked, so the
/// circuit can join it (invariant 6).
struct ExitNotice<'a>(&'a Stream);

impl Drop for ExitNotice<'_> {
    fn drop(&mut self) {
        let _ = self.0.circuit_tx.send(CircMsg::ThreadDone {
            stream_id: self.0.id,
            serial: self.0.serial,
        });
    }
}

/// Which of a stream's two threads.
#[derive(Clone, Copy)]
enum Side {
    Packager,
    Deliverer,
}

/// Shows the calling thread's TID in the stream's state for as long as the
/// thread runs (status: `packager_tid`, `deliverer_tid`; none once ended).
struct Tid<'a>(&'a Stream, Side);

impl<'a> Tid<'a> {
    fn publish(stream: &'a Stream, side: Side) -> Tid<'a> {
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

/// Why a packager stopped sending.
enum Stop {
    /// The stream closed or was aborted, or the circuit or link is gone.
    Ended,
}

// ---------------------------------------------------------------- packager

/// The client's packager: the SOCKS socket is there from the start; the
/// bytes the application sent right after its SOCKS request are optimistic
/// data (§5) and go first.
pub fn client_packager(stream: Arc<Stream>, sock: Arc<Socket>, initial: Vec<u8>) {
    let _notice = ExitNotice(&stream);
    let _tid = Tid::publish(&stream, Side::Packager);
    if !initial.is_empty() {
        let (mut buf, cells) = frame_bytes(&stream, &initial);
        if send_cells(&stream, &mut buf, cells).is_err() {
            return stopped(&stream);
        }
    }
    package_loop(&stream, &sock);
}

/// The exit's packager: connect to the target (protocol.md §5), answer
/// CONNECTED or END, hand the socket to the deliverer, then package.
pub fn exit_packager(
    stream: Arc<Stream>,
    ctx: Arc<crate::ctx::Ctx>,
    give_socket: Sender<Arc<Socket>>,
) {
    let _notice = ExitNotice(&stream);
    let _tid = Tid::publish(&stream, Side::Packager);
    let (sock, addr) = match connect::connect(&stream.target, &ctx.cfg, &*stream) {
        Ok(ok) => ok,
        Err(ConnectError::Aborted) => return,
        Err(ConnectError::Refused(reason)) => {
            tracing::debug!(stream = %stream.name, target = %stream.target, "connect failed: END({})", end_reason::name(reason));
            // §5: answer END with the reason; optimistic data is discarded.
            let _ = stream.handle(Event::Error { reason });
            return;
        }
    };
    {
        let mut st = stream.state.lock();
        if st.hc.is_closed() {
            return; // aborted while connecting; the abort reset the socket
        }
        st.connected = true;
        // Queued under the lock, so CONNECTED precedes the first DATA.
        stream.send_control(
            relay_cmd::CONNECTED,
            &relay::encode_connected(addr.ip(), 300),
        );
    }
    tracing::debug!(stream = %stream.name, target = %stream.target, peer = %addr, "connected");
    if give_socket.send(sock.clone()).is_err() {
        return;
    }
    drop(give_socket);
    package_loop(&stream, &sock);
}

/// What the exit's connect needs of the stream.
impl Connecting for Stream {
    fn publish(&self, sock: &Arc<Socket>) -> bool {
        let mut st = self.state.lock();
        if st.hc.is_closed() {
            return false;
        }
        st.socket = Some(sock.clone());
        true
    }

    fn aborted(&self) -> bool {
        self.is_aborted()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// §7 and §10: read the socket into DATA cells while the windows allow;
/// on EOF send FIN, on error END.
fn package_loop(stream: &Stream, sock: &Socket) {
    let mut read_cells = FIRST_READ_CELLS;
    loop {
        // §10: a sender whose stream package window is 0 stops reading.
        let window = stream
            .state
            .wait_until(&stream.aborted, StreamState::read_window);
        let window = match window {
            Ok(0) => return,
            Err(_) => return stopped(stream),
            Ok(w) => w,
        };
        let want = window.min(read_cells);
        let mut buf = Vec::with_capacity(want as usize * CELL_LEN);
        let n = match read_into_cells(stream, sock, &mut buf, want) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !stream.is_aborted() {
                    tracing::debug!(stream = %stream.name, "read error: {e}");
                    let _ = stream.handle(Event::Error {
                        reason: sockets::end_reason_for(&e),
                    });
                }
                return;
            }
        };
        if n == 0 {
            // §7: EOF → FIN after every DATA read before it (same queue).
            let _ = stream.handle(Event::ReadEof);
            return;
        }
        let cells = n.div_ceil(relay::DATA_MAX) as u32;
        read_cells = if cells == want {
            (read_cells * 2).min(MAX_READ_CELLS)
        } else {
            read_cells.min(cells.max(FIRST_READ_CELLS))
        };
        if send_cells(stream, &mut buf, cells).is_err() {
            return stopped(stream);
        }
    }
}

/// The packager cannot go on: its stream was aborted (nothing to do), or
/// its circuit or link is gone, which is an error on the stream (§8).
fn stopped(stream: &Stream) {
    if !stream.is_aborted() {
        let _ = stream.handle(Event::Error {
            reason: end_reason::MISC,
        });
    }
}

/// One readv() straight into the data slots of `want` cells in the spare
/// capacity of the empty `buf`, which must hold them. On success `buf` holds
/// the framed cells of the `n` bytes read (none on EOF), and `n` is returned.
///
/// The buffer is not zeroed first: zeroing ~250 KiB per read cost about 3%
/// of a bulk transfer's CPU (issue 5). Every byte of the cells kept is
/// written before `set_len`: the headers here, the data by the kernel, and
/// the last cell's padding with zeros.
fn read_into_cells(
    stream: &Stream,
    sock: &Socket,
    buf: &mut Vec<u8>,
    want: u32,
) -> io::Result<usize> {
    let len = want as usize * CELL_LEN;
    assert!(buf.is_empty() && buf.capacity() >= len);
    let spare = &mut buf.spare_capacity_mut()[..len];
    let mut slots: Vec<MaybeUninitSlice<'_>> = spare
        .chunks_exact_mut(CELL_LEN)
        .map(|c| MaybeUninitSlice::new(&mut c[DATA_OFFSET..DATA_OFFSET + relay::DATA_MAX]))
        .collect();
    let (n, _) = sock.recv_vectored(&mut slots)?;
    drop(slots);
    let cells = n.div_ceil(relay::DATA_MAX);
    for (i, c) in buf.spare_capacity_mut()[..cells * CELL_LEN]
        .chunks_exact_mut(CELL_LEN)
        .enumerate()
    {
        let data = (n - i * relay::DATA_MAX).min(relay::DATA_MAX);
        let mut head = [0u8; DATA_OFFSET];
        frame_header(stream, &mut head, data);
        for (dst, src) in c[..DATA_OFFSET].iter_mut().zip(head) {
            dst.write(src);
        }
        for b in &mut c[DATA_OFFSET + data..] {
            b.write(0);
        }
    }
    // SAFETY: the first `cells` cells are initialised: their headers and
    // padding were just written, and recv_vectored filled the first `n`
    // bytes of the data slots in order (socket2's contract for reads into
    // MaybeUninitSlice), which are the data of exactly those cells.
    unsafe { buf.set_len(cells * CELL_LEN) };
    Ok(n)
}

/// The link header and relay header of a DATA cell holding `len` bytes.
fn frame_header(stream: &Stream, head: &mut [u8], len: usize) {
    head[..4].copy_from_slice(&stream.wire_circ.to_be_bytes());
    head[4] = cell::cmd::RELAY;
    relay::write_header(&mut head[5..DATA_OFFSET], relay_cmd::DATA, stream.id, len);
}

/// Writes the link and relay headers of the cells holding `n` bytes of data,
/// and trims `buf` to those cells.
fn frame_cells(stream: &Stream, buf: &mut Vec<u8>, n: usize) {
    let cells = n.div_ceil(relay::DATA_MAX);
    buf.truncate(cells * CELL_LEN);
    for (i, c) in buf.chunks_exact_mut(CELL_LEN).enumerate() {
        let len = (n - i * relay::DATA_MAX).min(relay::DATA_MAX);
        frame_header(stream, &mut c[..DATA_OFFSET], len);
    }
}

/// DATA cells for bytes already in memory (the client's optimistic data).
fn frame_bytes(stream: &Stream, data: &[u8]) -> (Vec<u8>, u32) {
    let cells = data.len().div_ceil(relay::DATA_MAX);
    let mut buf = vec![0u8; cells * CELL_LEN];
    for (i, chunk) in data.chunks(relay::DATA_MAX).enumerate() {
        buf[i * CELL_LEN + DATA_OFFSET..i * CELL_LEN + DATA_OFFSET + chunk.len()]
            .copy_from_slice(chunk);
    }
    frame_cells(stream, &mut buf, data.len());
    (buf, cells as u32)
}

/// Queues `cells` framed DATA cells, as the circuit package window and the
/// link's queue allow (§10; invariant 3). The stream window was checked
/// before reading, and only this thread takes from it.
fn send_cells(stream: &Stream, buf: &mut Vec<u8>, cells: u32) -> Result<(), Stop> {
    let mut sent = 0;
    while sent < cells {
        // §10: this packager's turn at the circuit window (`FairWindow`).
        let m = stream
            .circuit_window
            .take(cells - sent, &stream.aborted)
            .map_err(|_| Stop::Ended)?;
        if stream.link.reserve(m, &stream.aborted).is_err() {
            stream.circuit_window.update(|w| w.give_back(m));
            return Err(Stop::Ended);
        }
        let piece = if sent == 0 && m == cells {
            std::mem::take(buf)
        } else {
            buf[(sent * CELL_LEN as u32) as usize..((sent + m) * CELL_LEN as u32) as usize].to_vec()
        };
        let bytes: u64 = piece
            .chunks_exact(CELL_LEN)
            .map(|c| u64::from(u16::from_be_bytes([c[14], c[15]])))
            .sum();
        // Under the lock: an END decided by another thread cannot be
        // overtaken by this DATA (nothing is sent after END).
        let mut st = stream.state.lock();
        match st.queue_data(piece, m, bytes, stream) {
            Ok(true) => {}
            Ok(false) => {
                drop(st);
                stream.circuit_window.update(|w| w.give_back(m));
                stream.link.unreserve(m);
                return Err(Stop::Ended);
            }
            Err(LinkGone) => return Err(Stop::Ended),
        }
        drop(st);
        stream.metrics.packaged(bytes, m);
        sent += m;
    }
    Ok(())
}

// --------------------------------------------------------------- deliverer

/// How a deliverer gets its socket.
pub enum DeliverStart {
    /// Exit: from the packager, once the target accepted.
    Exit(Receiver<Arc<Socket>>),
    /// Client: the SOCKS socket; the first message answers the SOCKS request.
    Client {
        sock: Arc<Socket>,
        socks: socks::SocksVersion,
    },
}

pub fn deliverer(stream: Arc<Stream>, rx: Inbox<DeliverMsg>, start: DeliverStart) {
    let _notice = ExitNotice(&stream);
    let _tid = Tid::publish(&stream, Side::Deliverer);
    let sock = match start {
        // The packager drops the sender if the connect fails or is aborted.
        DeliverStart::Exit(socket_rx) => match socket_rx.recv() {
            Ok(s) => s,
            Err(_) => return,
        },
        DeliverStart::Client { sock, socks } => {
            if !answer_socks(&stream, &rx, &sock, socks) {
                return;
            }
            sock
        }
    };
    for msg in rx.iter() {
        match msg {
            DeliverMsg::Data(batch) => {
                // §10: cells count as written once the kernel took their data.
                let written = batch.write_to(&*sock, |cells, bytes| stream.delivered(cells, bytes));
                if let Err(e) = written {
                    if !stream.is_aborted() {
                        tracing::debug!(stream = %stream.name, "write error: {e}");
                        let _ = stream.handle(Event::Error {
                            reason: sockets::end_reason_for(&e),
                        });
                    }
                    return;
                }
            }
            DeliverMsg::Fin => {
                // §7: every DATA before the FIN is written; now shut our
                // write side, and only that.
                if let Err(e) = sock.shutdown(Shutdown::Write) {
                    if !stream.is_aborted() {
                        let _ = stream.handle(Event::Error {
                            reason: sockets::end_reason_for(&e),
                        });
                    }
                }
                return;
            }
            DeliverMsg::Abort | DeliverMsg::Refused(_) => return,
            DeliverMsg::Connected(_) => {
                debug_assert!(false, "CONNECTED twice reaches the deliverer");
            }
        }
    }
}

/// Client: waits for CONNECTED or the end of the stream and writes the
/// SOCKS reply (protocol.md §11: only after CONNECTED or END). Returns
/// whether the stream goes on.
fn answer_socks(
    stream: &Stream,
    rx: &Inbox<DeliverMsg>,
    sock: &Socket,
    version: socks::SocksVersion,
) -> bool {
    let (reply, go_on) = match rx.recv() {
        Ok(DeliverMsg::Connected(ip)) => {
            let bound = ip.map(|ip| SocketAddr::new(ip, 0));
            (
                socks::connect_reply(version, socks::Reply::Succeeded, bound),
                true,
            )
        }
        Ok(DeliverMsg::Refused(reason)) => (
            socks::connect_reply(version, socks::reply_for_end_reason(reason), None),
            false,
        ),
        // Aborted after a reset, or the circuit is gone: nothing to answer.
        _ => return false,
    };
    stream.metrics.socks_reply(&reply);
    let mut s = sock;
    if let Err(e) = s.write_all(&reply) {
        if go_on && !stream.is_aborted() {
            let _ = stream.handle(Event::Error {
                reason: sockets::end_reason_for(&e),
            });
        }
        return false;
    }
    go_on
}

/// A stream SENDME under the stream's lock, for `Monitor::update_waking_if`:
/// the packager is woken only if it may read now. (A violation ends the
/// circuit, which stops the packager anyway: it is woken too.)
pub(crate) fn sendme_step(st: &mut StreamState) -> (Result<(), FlowViolation>, bool) {
    match st.on_sendme() {
        Ok(may_read) => (Ok(()), may_read),
        Err(v) => (Err(v), true),
    }
}

/// An `Outbound` that drops what it is given: for tests that drive a
/// `StreamState` by itself.
#[cfg(test)]
pub(crate) struct Discard;

#[cfg(test)]
impl Outbound for Discard {
    fn control(&self, _: u8, _: &[u8]) {}
    fn sendmes(&self, _: u32) {}
    fn data(&self, _: Vec<u8>, _: u32) -> Result<(), LinkGone> {
        Ok(())
    }
}

/// Builds a fresh stream state (both edges).
pub fn new_state(socket: Option<Arc<Socket>>) -> StreamState {
    StreamState {
        hc: HalfClose::new(),
        package: PackageWindow::stream(),
        deliver: StreamDeliverWindow::default(),
        socket,
        connected: false,
        counters: Counters::default(),
        last_activity: Instant::now(),
        packager_tid: None,
        deliverer_tid: None,
        package_stopped: false,
        low_water: READ_LOW_WATER,
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use halfpipe_proto::flow::{STREAM_SENDME_INCREMENT, STREAM_WINDOW_START};

    // §10 and READ_LOW_WATER: when the packager may read again.
    #[test]
    fn a_packager_reads_at_once_on_an_idle_stream() {
        let mut st = new_state(None);
        assert_eq!(st.read_window(), Some(STREAM_WINDOW_START));
    }

    #[test]
    fn a_packager_reads_on_down_to_a_window_of_one() {
        let mut st = new_state(None);
        st.package.take(STREAM_WINDOW_START - 1);
        assert_eq!(st.read_window(), Some(1));
    }

    #[test]
    fn a_packager_stopped_at_zero_waits_for_half_the_window() {
        let mut st = new_state(None);
        st.package.take(STREAM_WINDOW_START);
        assert_eq!(st.read_window(), None);
        let sendmes_to_mark = READ_LOW_WATER / STREAM_SENDME_INCREMENT;
        for _ in 1..sendmes_to_mark {
            assert!(!st.on_sendme().unwrap(), "no wake-up");
            assert_eq!(st.read_window(), None, "below the mark");
        }
        assert!(st.on_sendme().unwrap(), "wake up");
        assert_eq!(st.read_window(), Some(READ_LOW_WATER));
        // Resumed: it reads on below the mark, down to 0 again.
        st.package.take(READ_LOW_WATER - 1);
        assert_eq!(st.read_window(), Some(1));
        st.package.take(1);
        assert_eq!(st.read_window(), None);
        assert!(!st.on_sendme().unwrap());
        assert_eq!(st.read_window(), None, "stopped again");
    }

    // §10 as written: with no mark, a SENDME at 0 resumes the packager.
    #[test]
    fn with_a_mark_of_one_a_packager_resumes_at_each_sendme() {
        let mut st = new_state(None);
        st.low_water = 1;
        st.package.take(STREAM_WINDOW_START);
        assert_eq!(st.read_window(), None);
        assert!(st.on_sendme().unwrap());
        assert_eq!(st.read_window(), Some(STREAM_SENDME_INCREMENT));
    }

    // §7: once we may no longer package, the wait ends with 0 whatever the
    // window, so the packager stops.
    #[test]
    fn a_stream_that_may_not_package_ends_the_wait() {
        let mut st = new_state(None);
        st.package.take(STREAM_WINDOW_START);
        st.hc.handle(Event::ReadEof).unwrap();
        assert_eq!(st.read_window(), Some(0));
    }

    // Once the peer has written every cell in flight, the window is above
    // the mark again: the mark cannot hold a stream up (READ_LOW_WATER).
    #[test]
    fn the_window_comes_back_above_the_mark_once_everything_is_written() {
        for in_flight in 0..=STREAM_WINDOW_START {
            let mut st = new_state(None);
            st.queue_data(Vec::new(), in_flight, 0, &Discard).unwrap();
            let before =
                (in_flight < STREAM_WINDOW_START).then_some(STREAM_WINDOW_START - in_flight);
            assert_eq!(st.read_window(), before, "{in_flight} cells in flight");
            // The peer acknowledges every full 50 cells it wrote (§10).
            for _ in 0..in_flight / STREAM_SENDME_INCREMENT {
                st.on_sendme().unwrap();
            }
            assert_eq!(
                st.read_window(),
                Some(STREAM_WINDOW_START - in_flight % STREAM_SENDME_INCREMENT),
                "{in_flight} cells in flight, all written"
            );
        }
    }

    // §10 and READ_LOW_WATER: the packager is stopped the moment it queues
    // the window's last cell, so a SENDME that comes before it looks again
    // does not resume it at 50 cells.
    #[test]
    fn a_sendme_before_the_packager_looks_again_does_not_resume_it() {
        let mut st = new_state(None);
        st.queue_data(Vec::new(), STREAM_WINDOW_START, 0, &Discard)
            .unwrap();
        assert!(!st.on_sendme().unwrap());
        assert_eq!(st.read_window(), None);
    }

    // `Stream::on_sendme` wakes the packager only when `on_sendme` says it
    // may read. No wake-up is lost: whenever it says no, a packager waiting
    // in `read_window` would find nothing to do. Every window a SENDME can
    // meet, with the packager stopped (at 0, since) or not, for every mark.
    #[test]
    fn a_sendme_that_wakes_no_one_leaves_the_packager_nothing_to_do() {
        let mut quiet = 0;
        for mark in [1, 50, READ_LOW_WATER, 450] {
            // A SENDME on fewer than 50 cells in flight is a violation (§10).
            for taken in STREAM_SENDME_INCREMENT..=STREAM_WINDOW_START {
                for stopped in [false, true] {
                    let mut st = new_state(None);
                    st.low_water = mark;
                    st.package.take(taken);
                    st.package_stopped = stopped;
                    let wake = st.on_sendme().unwrap();
                    let reads = st.read_window().is_some();
                    assert!(
                        wake || !reads,
                        "mark {mark}, {taken} taken, stopped {stopped}: a reader was not woken"
                    );
                    quiet += u32::from(!wake);
                }
            }
        }
        // Only a stopped packager whose window is still under the mark after
        // the SENDME is left asleep: windows 50 up to the mark, per mark.
        let expected: u32 = [1, 50, READ_LOW_WATER, 450]
            .iter()
            .map(|m| m.saturating_sub(STREAM_SENDME_INCREMENT))
            .sum();
        assert_eq!(quiet, expected, "SENDMEs that woke no one");
    }
}
