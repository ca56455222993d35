//! Links: one TCP connection between a client and an exit (protocol.md §1),
//! carrying the cells of §2 for many circuits (§3).
//!
//! Threads (design.md): the link reader `link-rd N` blocks only on its socket
//! and owns the link: it starts the writer and the circuits, and joins them
//! when the link ends. The link writer `link-wr N` blocks on its queue and on
//! write(), and writes many cells per system call.
//!
//! Everything sent on a link goes through one FIFO queue, so cells leave in
//! the order they were queued: CONNECTED before the stream's first DATA,
//! DATA before FIN, BEGIN before END. Control cells are queued at once
//! (invariant 4); DATA cells first take room in the queue (`reserve`), which
//! is where a busy link pushes back on packagers (invariant 3).

use halfpipe_proto::cell::{self, cmd, destroy_reason};
use crate::circuit::{self, CircMsg};
use halfpipe_proto::Role;
use crate::ctx::Ctx;
use crate::inbox::{self, Inbox, InboxTx};
use halfpipe_proto::kdf;
use crate::metrics::{Dir, Metrics, Tally, ViolationKind};
use crate::monitor::{Monitor, Stopped};
use crate::threads;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes the link reader asks for per read(): large reads were the one
/// change that mattered in the prototype (issue 5).
const READ_BUF: usize = 256 * 1024;
/// DATA cells that may wait in a link's outbound queue (about 1 MiB).
pub const QUEUE_CELLS: u32 = 2048;
/// Queue messages the writer gathers into one writev().
const MAX_GATHER: usize = 64;

enum WriterMsg {
    Cells { bytes: Vec<u8>, data_cells: u32 },
    Close,
}

/// Control bytes that may wait in a link's queue. Legitimate control
/// traffic is bounded by the windows and the stream limits; a peer that
/// sends requests but never reads our answers is cut off past this.
const MAX_CONTROL_QUEUED: usize = 8 << 20;

/// The sending side of a link, cloned by every circuit and stream on it.
#[derive(Clone)]
pub struct LinkTx {
    tx: InboxTx<WriterMsg>,
    room: Arc<Monitor<u32>>,
    /// Control bytes queued and not yet written.
    control_queued: Arc<AtomicUsize>,
    /// To cut the link off when its peer stops reading.
    socket: Arc<TcpStream>,
    /// On a circuit's copy: that circuit's gate (see `Gate`).
    gate: Option<Arc<Gate>>,
}

/// Whether a circuit may still put cells on the link (protocol.md §3).
///
/// A circuit's cells are queued by several threads (its own, and each
/// stream's packager and deliverer) while the CircID can be freed by the
/// link reader (the peer's DESTROY) or by the circuit itself. Once the
/// CircID is free the peer may create a new circuit on it at once; a cell
/// of the old circuit queued after that would be read as the new one's.
/// So every send holds the gate open for its (non-blocking) enqueue, and
/// the CircID is freed only after the gate is closed, under the link's
/// circuit table lock.
#[derive(Default)]
pub struct Gate(RwLock<bool>);

impl Gate {
    fn open() -> Arc<Gate> {
        Arc::new(Gate(RwLock::new(true)))
    }

    /// Waits out sends in progress (each a non-blocking enqueue); after
    /// this no cell of the circuit is queued.
    fn close(&self) {
        *self.0.write() = false;
    }
}

/// The link's writer is gone: the link is closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("link closed")]
pub struct LinkGone;

impl LinkTx {
    /// The sender for one circuit: its cells are dropped once `gate` is
    /// closed.
    fn for_circuit(&self, gate: Arc<Gate>) -> LinkTx {
        LinkTx {
            gate: Some(gate),
            ..self.clone()
        }
    }

    /// Queues control cells (whole cells, concatenated). Never blocks.
    pub fn send(&self, bytes: Vec<u8>) -> Result<(), LinkGone> {
        let open = self.gate.as_ref().map(|g| g.0.read());
        if open.as_deref() == Some(&false) {
            return Err(LinkGone); // the circuit is gone (§3)
        }
        let queued = self.control_queued.fetch_add(bytes.len(), Ordering::AcqRel) + bytes.len();
        if queued > MAX_CONTROL_QUEUED {
            tracing::warn!(
                "peer is not reading: {queued} bytes of control cells queued; closing the link"
            );
            let _ = self.socket.shutdown(Shutdown::Both);
            return Err(LinkGone);
        }
        self.tx
            .send(WriterMsg::Cells {
                bytes,
                data_cells: 0,
            })
            .map_err(|_| LinkGone)
    }

    /// Waits for room for `cells` DATA cells in the queue. `cells` must not
    /// exceed `QUEUE_CELLS`.
    pub fn reserve(&self, cells: u32, cancel: &AtomicBool) -> Result<(), Stopped> {
        debug_assert!(cells <= QUEUE_CELLS);
        self.room.wait_until(cancel, |room| {
            (*room >= cells).then(|| {
                *room -= cells;
            })
        })
    }

    /// Returns room reserved but not used.
    pub fn unreserve(&self, cells: u32) {
        self.room.update(|room| *room += cells);
    }

    /// Queues `data_cells` DATA cells for which room was reserved.
    pub fn send_data(&self, bytes: Vec<u8>, data_cells: u32) -> Result<(), LinkGone> {
        let open = self.gate.as_ref().map(|g| g.0.read());
        if open.as_deref() == Some(&false) {
            // The circuit is gone but the link lives on: its room is not.
            self.room.update(|room| *room += data_cells);
            return Err(LinkGone);
        }
        self.tx
            .send(WriterMsg::Cells { bytes, data_cells })
            .map_err(|_| LinkGone)
    }

    /// Wakes packagers waiting for room so that they see their stream's
    /// cancel flag.
    pub fn kick(&self) {
        self.room.kick();
    }
}

/// What a client waiting for CREATED_FAST gets: its payload, or the
/// reason of the DESTROY that came instead.
pub type CreatedFast = Result<Vec<u8>, u8>;

/// A circuit as the link sees it: where its cells go.
enum CircSlot {
    /// Client: CREATE_FAST sent, CREATED_FAST (or DESTROY) not yet back.
    Pending(Sender<CreatedFast>),
    Live {
        tx: InboxTx<CircMsg>,
        local: u32,
        gate: Arc<Gate>,
        /// None for the moment between spawn and the handle being stored.
        thread: Option<JoinHandle<()>>,
    },
}

#[derive(Default)]
struct CircTable {
    by_wire_id: HashMap<u32, CircSlot>,
    /// Threads of circuits that have ended, joined as the link goes on.
    finished: Vec<JoinHandle<()>>,
}

impl CircTable {
    fn live_count(&self) -> usize {
        self.by_wire_id.len()
    }

    fn reap(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) =
            self.finished.drain(..).partition(|h| h.is_finished());
        self.finished = running;
        done.into_iter().for_each(threads::join);
    }
}

pub struct Link {
    /// The process's short counter for this link (thread names, logs).
    pub id: u32,
    pub role: Role,
    pub peer: SocketAddr,
    pub tx: LinkTx,
    pub ctx: Arc<Ctx>,
    socket: Arc<TcpStream>,
    writer: Mutex<Option<JoinHandle<()>>>,
    table: Mutex<CircTable>,
    closed: AtomicBool,
    opened: Instant,
    /// TIDs of `link-rd` and `link-wr` (0 until they run), for status.
    reader_tid: AtomicI32,
    writer_tid: Arc<AtomicI32>,
}

impl Link {
    /// Starts the writer of a link whose handshake is done. The caller
    /// must then run `run` on the thread that is to be the link reader (or
    /// `abandon` if it cannot start one). Refused once shutdown has begun.
    pub fn start(ctx: Arc<Ctx>, id: u32, role: Role, socket: TcpStream) -> io::Result<Arc<Link>> {
        let peer = socket.peer_addr()?;
        let socket = Arc::new(socket);
        let (tx, rx) = inbox::inbox();
        let room = Arc::new(Monitor::new(QUEUE_CELLS));
        let control_queued = Arc::new(AtomicUsize::new(0));
        let writer_tid = Arc::new(AtomicI32::new(0));
        let keepalive = ctx.cfg.keepalive;
        if let Some(k) = keepalive {
            set_tcp_keepalive(&socket, k);
        }
        let writer = {
            let (sock, room, queued) = (socket.clone(), room.clone(), control_queued.clone());
            let (tid, metrics) = (writer_tid.clone(), ctx.metrics.clone());
            threads::spawn(format!("link-wr {id}"), move || {
                tid.store(crate::sockets::gettid(), Ordering::Relaxed);
                writer_loop(&sock, rx, &room, &queued, &metrics, keepalive)
            })?
        };
        let link = Arc::new(Link {
            id,
            role,
            peer,
            tx: LinkTx {
                tx,
                room,
                control_queued,
                socket: socket.clone(),
                gate: None,
            },
            ctx: ctx.clone(),
            socket,
            writer: Mutex::new(Some(writer)),
            table: Mutex::new(CircTable::default()),
            closed: AtomicBool::new(false),
            opened: Instant::now(),
            reader_tid: AtomicI32::new(0),
            writer_tid,
        });
        if !ctx.register_link(link.clone()) {
            link.abandon();
            return Err(io::Error::other("shutting down"));
        }
        Ok(link)
    }

    /// The link reader: reads cells until the link ends, then tears down
    /// its circuits and joins every thread it owns.
    pub fn run(self: &Arc<Self>) {
        self.reader_tid
            .store(crate::sockets::gettid(), Ordering::Relaxed);
        let why = match self.read_loop() {
            Ok(()) if self.closed.load(Ordering::Acquire) => "closed".to_string(),
            Ok(()) => "closed by peer".to_string(),
            Err(e) if self.closed.load(Ordering::Acquire) => format!("closed ({e})"),
            Err(e) => format!("read error: {e}"),
        };
        self.teardown(&why);
    }

    /// Ends a link that never got a reader: closes it and joins its writer.
    pub fn abandon(&self) {
        self.close();
        self.tx.room.close();
        let _ = self.tx.tx.send(WriterMsg::Close);
        if let Some(w) = self.writer.lock().take() {
            threads::join(w);
        }
        self.ctx.unregister_link(self.id);
    }

    /// Ends the link after every cell queued so far has been written: the
    /// writer flushes, then shuts the write side; the peer answers with its
    /// own close, which ends our reader.
    pub fn finish(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.tx.tx.send(WriterMsg::Close);
    }

    /// Closes the link at once from another thread: the reader wakes and
    /// tears everything down.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn circuit_count(&self) -> usize {
        self.table.lock().live_count()
    }

    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// TIDs of the link reader and writer (0 until each has started).
    pub fn tids(&self) -> (i32, i32) {
        (
            self.reader_tid.load(Ordering::Relaxed),
            self.writer_tid.load(Ordering::Relaxed),
        )
    }

    fn read_loop(self: &Arc<Self>) -> io::Result<()> {
        let sock = socket2::SockRef::from(&*self.socket);
        let mut buf: Vec<u8> = Vec::with_capacity(READ_BUF);
        loop {
            let spare = buf.spare_capacity_mut();
            let n = match sock.recv(spare) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // SAFETY: recv() initialised the first `n` bytes of the spare
            // capacity (socket2's contract for `recv` into MaybeUninit).
            unsafe { buf.set_len(buf.len() + n) };
            self.ctx.metrics.add_link_bytes(Dir::Received, n);
            // Only a well-filled buffer is worth handing over: a small one
            // would pin READ_BUF bytes for a few cells in the circuit's inbox.
            let run = single_circuit_run(&buf).filter(|&(_, whole)| whole >= READ_BUF / 2);
            if let Some((wire, whole)) = run {
                // The common case under load: the buffer holds RELAY cells of
                // one circuit only. Hand the buffer itself over, no copy.
                let mut next = Vec::with_capacity(READ_BUF);
                next.extend_from_slice(&buf[whole..]);
                buf.truncate(whole);
                self.ctx
                    .metrics
                    .add_link_cells(Dir::Received, whole / cell::CELL_LEN);
                self.to_circuit(wire, std::mem::replace(&mut buf, next));
                continue;
            }
            let used = self.dispatch(&buf);
            buf.drain(..used);
            // The largest cell (a 65,535-byte variable cell) fits in the
            // buffer, so a full buffer always holds a whole cell.
        }
    }

    /// Hands every whole cell in `bytes` on; returns the bytes used.
    /// Consecutive RELAY cells of one circuit travel as one message.
    fn dispatch(self: &Arc<Self>, bytes: &[u8]) -> usize {
        let mut pos = 0;
        let mut cells = 0;
        // The run of RELAY cells not yet handed on: its circuit and start.
        let mut run: Option<(u32, usize)> = None;
        while let Some((c, len)) = cell::decode(&bytes[pos..]) {
            cells += 1;
            if matches!(c.command, cmd::RELAY | cmd::RELAY_EARLY) {
                match run {
                    Some((id, _)) if id == c.circ_id => {}
                    _ => {
                        if let Some((id, start)) = run {
                            self.to_circuit(id, bytes[start..pos].to_vec());
                        }
                        run = Some((c.circ_id, pos));
                    }
                }
                pos += len;
                continue;
            }
            if let Some((id, start)) = run.take() {
                self.to_circuit(id, bytes[start..pos].to_vec());
            }
            pos += len;
            self.handle_link_cell(c);
        }
        if let Some((id, start)) = run {
            self.to_circuit(id, bytes[start..pos].to_vec());
        }
        self.ctx.metrics.add_link_cells(Dir::Received, cells);
        pos
    }

    /// RELAY cells for a circuit; dropped silently if it is unknown or
    /// destroyed (protocol.md §3).
    fn to_circuit(&self, wire: u32, cells: Vec<u8>) {
        let table = self.table.lock();
        if let Some(CircSlot::Live { tx, .. }) = table.by_wire_id.get(&wire) {
            // An unbounded send never blocks (invariant 1); a circuit that is
            // ending has dropped its receiver and the cells go with it.
            let _ = tx.send(CircMsg::Cells(cells));
        }
    }

    /// Cells that are not RELAY: protocol.md §2 and §3.
    fn handle_link_cell(self: &Arc<Self>, c: cell::CellRef<'_>) {
        match c.command {
            // §1: variable-length cells after the handshake are ignored;
            // §2: PADDING is a keepalive.
            _ if cell::is_var_cmd(c.command) => {}
            cmd::PADDING => {}
            cmd::CREATE_FAST if self.role == Role::Exit => self.on_create_fast(c),
            cmd::CREATED_FAST if self.role == Role::Client => {
                let table = self.table.lock();
                if let Some(CircSlot::Pending(tx)) = table.by_wire_id.get(&c.circ_id) {
                    // try_send: the reader never blocks (invariant 1); a
                    // second answer for the same CircID carries nothing new.
                    let _ = tx.try_send(Ok(c.payload.to_vec()));
                }
            }
            // §2: CREATE and CREATE2 are answered with DESTROY(PROTOCOL); so is
            // a CREATE_FAST sent to a client.
            cmd::CREATE | cmd::CREATE2 | cmd::CREATE_FAST => {
                if crate::ratelimit::violation_warning() {
                    tracing::warn!(
                        link = self.id,
                        circ = c.circ_id,
                        "peer sent {} (command {}): answering DESTROY(PROTOCOL)",
                        if c.command == cmd::CREATE_FAST {
                            "CREATE_FAST to a client"
                        } else {
                            "CREATE/CREATE2"
                        },
                        c.command
                    );
                }
                // A live circuit on that CircID goes too: the peer will
                // forget it when it sees our DESTROY.
                let table = self.table.lock();
                match table.by_wire_id.get(&c.circ_id) {
                    Some(CircSlot::Live { tx, .. }) => {
                        let _ = tx.send(CircMsg::Violation(format!(
                            "command {} on a CircID in use",
                            c.command
                        )));
                    }
                    _ => {
                        drop(table);
                        self.ctx.metrics.violation(ViolationKind::Create);
                        self.send_destroy(c.circ_id, destroy_reason::PROTOCOL);
                    }
                }
            }
            cmd::DESTROY => self.on_destroy(c.circ_id, c.payload[0]),
            // §2: any other fixed-length command is dropped.
            _ => {}
        }
    }

    fn send_destroy(&self, wire: u32, reason: u8) {
        let mut out = Vec::with_capacity(cell::CELL_LEN);
        cell::encode_destroy(&mut out, wire, reason);
        let _ = self.tx.send(out);
    }

    /// §3: DESTROY tears the circuit down at once; its CircID is free again.
    fn on_destroy(&self, wire: u32, reason: u8) {
        self.ctx.metrics.destroy_received(reason);
        let mut table = self.table.lock();
        match table.by_wire_id.remove(&wire) {
            Some(CircSlot::Live {
                tx, thread, gate, ..
            }) => {
                // Before the CircID is free again: nothing of the old
                // circuit may follow a new circuit's CREATED_FAST.
                gate.close();
                let _ = tx.send(CircMsg::Destroyed { reason });
                table.finished.extend(thread);
                table.reap();
            }
            Some(CircSlot::Pending(tx)) => {
                let _ = tx.try_send(Err(reason));
            }
            // §3: DESTROY for a circuit never created or already gone.
            None => {}
        }
    }

    /// §3: the exit answers CREATE_FAST with CREATED_FAST, or refuses.
    fn on_create_fast(self: &Arc<Self>, c: cell::CellRef<'_>) {
        let wire = c.circ_id;
        let mut table = self.table.lock();
        table.reap();
        if wire & 0x8000_0000 == 0 {
            drop(table);
            if crate::ratelimit::violation_warning() {
                tracing::warn!(
                    link = self.id,
                    circ = wire,
                    "protocol violation: CREATE_FAST with the CircID top bit clear (protocol.md §3)"
                );
            }
            self.ctx.metrics.violation(ViolationKind::Create);
            self.send_destroy(wire, destroy_reason::PROTOCOL);
            return;
        }
        if let Some(slot) = table.by_wire_id.get(&wire) {
            // §3: CREATE_FAST on a CircID in use is a violation on that circuit.
            if let CircSlot::Live { tx, .. } = slot {
                let _ = tx.send(CircMsg::Violation(
                    "CREATE_FAST on a CircID already in use".into(),
                ));
            }
            return;
        }
        let refuse = if self.ctx.shutting_down() {
            Some(destroy_reason::HIBERNATING)
        } else if table.live_count() >= self.ctx.cfg.max_circuits_per_link
            || !self.ctx.circuit_room()
        {
            Some(destroy_reason::RESOURCELIMIT)
        } else {
            None
        };
        if let Some(reason) = refuse {
            drop(table);
            tracing::info!(
                link = self.id,
                circ = wire,
                "refusing circuit: DESTROY({})",
                destroy_reason::name(reason)
            );
            self.send_destroy(wire, reason);
            return;
        }
        let mut x = [0u8; kdf::HASH_LEN];
        x.copy_from_slice(&c.payload[..kdf::HASH_LEN]);
        match self.spawn_circuit(&mut table, wire, None) {
            Ok(()) => {
                drop(table);
                let mut out = Vec::with_capacity(cell::CELL_LEN);
                cell::encode_fixed(
                    &mut out,
                    wire,
                    cmd::CREATED_FAST,
                    &kdf::created_fast_payload(&x, &nonce()),
                );
                let _ = self.tx.send(out);
            }
            Err(e) => {
                drop(table);
                tracing::warn!(
                    link = self.id,
                    circ = wire,
                    "cannot start a circuit thread ({e}): DESTROY(RESOURCELIMIT)"
                );
                self.send_destroy(wire, destroy_reason::RESOURCELIMIT);
            }
        }
    }

    /// Starts the thread of circuit `wire` and enters it in the table.
    fn spawn_circuit(
        self: &Arc<Self>,
        table: &mut CircTable,
        wire: u32,
        idle_timeout: Option<Duration>,
    ) -> io::Result<()> {
        let local = self.ctx.next_circuit_id();
        let (tx, rx) = inbox::inbox();
        let gate = Gate::open();
        let link_tx = self.tx.for_circuit(gate.clone());
        let circuit = circuit::Circuit::new(
            self.clone(),
            link_tx,
            wire,
            local,
            tx.clone(),
            rx,
            idle_timeout,
        );
        if !circuit.register() {
            return Err(io::Error::other(format!(
                "the process holds {} circuits already",
                crate::limits::MAX_CIRCUITS
            )));
        }
        let handle = threads::spawn(format!("circ {}.{}", self.id, local), move || circuit.run())
            .inspect_err(|_| self.ctx.unregister_circuit(local))?;
        table.by_wire_id.insert(
            wire,
            CircSlot::Live {
                tx,
                local,
                gate,
                thread: Some(handle),
            },
        );
        Ok(())
    }

    /// Client side of §3, step one: picks a free CircID with the top bit
    /// set and waits for its CREATED_FAST on the returned channel.
    pub fn begin_create(&self) -> Result<(u32, Receiver<CreatedFast>), LinkGone> {
        if self.is_closed() {
            return Err(LinkGone);
        }
        let mut table = self.table.lock();
        let wire = loop {
            let mut r = [0u8; 4];
            getrandom::getrandom(&mut r).expect("the OS random number generator failed");
            let id = u32::from_be_bytes(r) | 0x8000_0000;
            if !table.by_wire_id.contains_key(&id) {
                break id;
            }
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        table.by_wire_id.insert(wire, CircSlot::Pending(tx));
        Ok((wire, rx))
    }

    /// Client side of §3, step two: KH checked, start the circuit thread.
    /// Returns the circuit's inbox and its local id.
    /// A circuit with an `idle_timeout` destroys itself once it has had no
    /// stream for that long.
    pub fn finish_create(
        self: &Arc<Self>,
        wire: u32,
        idle_timeout: Option<Duration>,
    ) -> io::Result<(InboxTx<CircMsg>, u32)> {
        let mut table = self.table.lock();
        if !matches!(table.by_wire_id.remove(&wire), Some(CircSlot::Pending(_))) {
            return Err(io::Error::other(
                "circuit was destroyed during its handshake",
            ));
        }
        self.spawn_circuit(&mut table, wire, idle_timeout)?;
        match table.by_wire_id.get(&wire) {
            Some(CircSlot::Live { tx, local, .. }) => Ok((tx.clone(), *local)),
            _ => unreachable!("just inserted"),
        }
    }

    /// Is circuit `local` still live on this link under CircID `wire`?
    pub fn circuit_alive(&self, wire: u32, local: u32) -> bool {
        matches!(self.table.lock().by_wire_id.get(&wire), Some(CircSlot::Live { local: l, .. }) if *l == local)
    }

    /// Forgets a CircID whose handshake failed.
    pub fn abandon_create(&self, wire: u32) {
        let mut table = self.table.lock();
        if matches!(table.by_wire_id.get(&wire), Some(CircSlot::Pending(_))) {
            table.by_wire_id.remove(&wire);
        }
    }

    /// Called by a circuit thread as it ends, once its streams are aborted:
    /// closes its gate, queues its DESTROY if it sends one (after every END
    /// its streams sent), and frees its CircID (§3), all under the table
    /// lock, so that a new circuit on the CircID cannot come in between.
    /// If the peer destroyed it, the link reader has done all this already.
    pub fn circuit_ended(&self, wire: u32, local: u32, destroy: Option<u8>) {
        let mut table = self.table.lock();
        let ours = matches!(table.by_wire_id.get(&wire), Some(CircSlot::Live { local: l, .. }) if *l == local);
        if ours {
            if let Some(CircSlot::Live { thread, gate, .. }) = table.by_wire_id.remove(&wire) {
                gate.close();
                if let Some(reason) = destroy {
                    self.send_destroy(wire, reason);
                }
                table.finished.extend(thread);
            }
            table.reap();
        }
    }

    fn teardown(&self, why: &str) {
        self.closed.store(true, Ordering::Release);
        let _ = self.socket.shutdown(Shutdown::Both);
        // Packagers waiting for room must not wait for a writer that is gone.
        self.tx.room.close();
        let (circuits, mut handles) = {
            let mut table = self.table.lock();
            let finished: Vec<_> = table.finished.drain(..).collect();
            (table.by_wire_id.drain().collect::<Vec<_>>(), finished)
        };
        let count = circuits.len();
        for (_, slot) in circuits {
            match slot {
                CircSlot::Live { tx, thread, .. } => {
                    let _ = tx.send(CircMsg::LinkClosed);
                    handles.extend(thread);
                }
                // Dropping the sender tells the waiting creator.
                CircSlot::Pending(_) => {}
            }
        }
        handles.into_iter().for_each(threads::join);
        let _ = self.tx.tx.send(WriterMsg::Close);
        if let Some(w) = self.writer.lock().take() {
            threads::join(w);
        }
        self.ctx.unregister_link(self.id);
        tracing::info!(link = self.id, peer = %self.peer, circuits = count, "link closed: {why}");
    }
}

/// If the whole cells at the front of `buf` are all RELAY cells of one
/// circuit, returns that circuit and how many bytes they take.
/// 20 random bytes: the client's X of CREATE_FAST, or the exit's Y of
/// CREATED_FAST (protocol.md §3).
pub fn nonce() -> [u8; kdf::HASH_LEN] {
    let mut x = [0u8; kdf::HASH_LEN];
    // The OS random source failing is not something a daemon can work
    // around; it never happens on Linux once the pool is initialised.
    getrandom::getrandom(&mut x).expect("the OS random number generator failed");
    x
}

fn single_circuit_run(buf: &[u8]) -> Option<(u32, usize)> {
    let whole = buf.len() / cell::CELL_LEN * cell::CELL_LEN;
    let first = buf.get(..cell::CELL_LEN)?;
    let wire = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
    let all = buf[..whole]
        .chunks_exact(cell::CELL_LEN)
        .all(|c| matches!(c[4], cmd::RELAY | cmd::RELAY_EARLY) && c[..4] == first[..4]);
    all.then_some((wire, whole))
}

/// TCP keepalive on a link socket (`--keepalive`): probes after `period`
/// idle, then every `period` (at most a minute), 3 unanswered probes end
/// the connection. Failing to set it costs only the probes.
fn set_tcp_keepalive(sock: &TcpStream, period: Duration) {
    let period = period.max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(period)
        .with_interval(period.min(Duration::from_secs(60)))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(sock).set_tcp_keepalive(&ka) {
        tracing::debug!("cannot set TCP keepalive on a link: {e}");
    }
}

/// The link writer: gathers queued cells into one writev() at a time. With
/// a `keepalive` period, a PADDING cell (protocol.md §2) goes out when
/// nothing was written for that long.
fn writer_loop(
    sock: &TcpStream,
    rx: Inbox<WriterMsg>,
    room: &Monitor<u32>,
    control_queued: &AtomicUsize,
    metrics: &Metrics,
    keepalive: Option<Duration>,
) {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(MAX_GATHER);
    let mut tally = Tally::default();
    let result = (|| -> io::Result<()> {
        loop {
            let mut data_cells = 0;
            let mut control_bytes = 0;
            let mut close = false;
            let received = match keepalive {
                Some(period) => rx.recv_deadline(Instant::now() + period),
                None => rx
                    .recv()
                    .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
            };
            let mut next = match received {
                Ok(m) => Some(m),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let mut padding = Vec::with_capacity(cell::CELL_LEN);
                    cell::encode_fixed(&mut padding, 0, cmd::PADDING, &[]);
                    tally.link(padding.len(), 1);
                    write_all_vectored(sock, &[padding])?;
                    metrics.add(Dir::Sent, &mut tally);
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Cells {
                        bytes,
                        data_cells: n,
                    } => {
                        data_cells += n;
                        if n == 0 {
                            control_bytes += bytes.len();
                            tally.scan_cells(&bytes);
                        } else {
                            // A packager's message holds its DATA cells only.
                            tally.data_cells(n);
                        }
                        tally.link(bytes.len(), bytes.len() / cell::CELL_LEN);
                        batch.push(bytes);
                    }
                    WriterMsg::Close => {
                        close = true;
                        break;
                    }
                }
                if batch.len() < MAX_GATHER {
                    next = rx.try_recv().ok();
                }
            }
            write_all_vectored(sock, &batch)?;
            batch.clear();
            metrics.add(Dir::Sent, &mut tally);
            control_queued.fetch_sub(control_bytes, Ordering::AcqRel);
            if data_cells > 0 {
                room.update(|r| *r += data_cells);
            }
            if close {
                // Everything queued before Close is written: say so with FIN.
                sock.shutdown(Shutdown::Write)?;
                return Ok(());
            }
        }
    })();
    room.close();
    if let Err(e) = result {
        tracing::debug!("link writer stopped: {e}");
        // Wake the reader so that it tears the link down.
        let _ = sock.shutdown(Shutdown::Both);
    }
}

fn write_all_vectored(mut sock: &TcpStream, bufs: &[Vec<u8>]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| IoSlice::new(b))
        .collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match sock.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The exit's side of the handshake (protocol.md §1): read the client's
/// VERSIONS within the timeout, answer with ours.
pub fn accept_handshake(sock: &TcpStream, timeout: Duration) -> Result<(), HandshakeFailure> {
    let offered = read_versions(sock, timeout)?;
    cell::negotiate(&offered)?;
    let mut out = Vec::new();
    cell::encode_versions(&mut out, &[cell::LINK_VERSION]);
    (&*sock).write_all(&out)?;
    sock.set_read_timeout(None)?;
    Ok(())
}

/// The client's side of the handshake: send VERSIONS, read the answer.
pub fn connect_handshake(sock: &TcpStream, timeout: Duration) -> Result<(), HandshakeFailure> {
    let mut out = Vec::new();
    cell::encode_versions(&mut out, &[cell::LINK_VERSION]);
    (&*sock).write_all(&out)?;
    let offered = read_versions(sock, timeout)?;
    cell::negotiate(&offered)?;
    sock.set_read_timeout(None)?;
    Ok(())
}

/// Why a link handshake failed; closes only that link.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("{0}")]
    Protocol(#[from] cell::HandshakeError),
    #[error("no complete VERSIONS within {0:?}")]
    Timeout(Duration),
    #[error("connection closed during the handshake")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads exactly the peer's VERSIONS cell (byte-exact, so that no cell after
/// it is consumed) before `timeout` runs out, counted from now.
fn read_versions(mut sock: &TcpStream, timeout: Duration) -> Result<Vec<u16>, HandshakeFailure> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(16);
    loop {
        if let Some((versions, used)) = cell::decode_versions(&buf)? {
            debug_assert_eq!(used, buf.len());
            return Ok(versions);
        }
        // Ask only for what the VERSIONS cell still needs.
        let need = if buf.len() < cell::VERSIONS_HEADER_LEN {
            cell::VERSIONS_HEADER_LEN - buf.len()
        } else {
            cell::VERSIONS_HEADER_LEN + u16::from_be_bytes([buf[3], buf[4]]) as usize - buf.len()
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeFailure::Timeout(timeout));
        }
        sock.set_read_timeout(Some(left))?;
        let mut chunk = vec![0u8; need];
        match sock.read(&mut chunk) {
            Ok(0) => return Err(HandshakeFailure::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HandshakeFailure::Timeout(timeout))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}
