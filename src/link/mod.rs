//! Links: one TCP connection between a client and an exit
//! (docs/protocol.md §1), carrying the cells of §2 for many circuits (§3).
//!
//! Threads (docs/design.md, "Threads"): the link reader `link-rd N` blocks
//! only on its socket and owns the link: it starts the writer and the
//! circuits, and joins them when the link ends. The link writer `link-wr N`
//! blocks on its queue and on write(), and writes many cells per system
//! call.
//!
//! Everything sent on a link goes through one FIFO queue, so cells leave in
//! the order they were queued: CONNECTED before the stream's first DATA,
//! DATA before FIN, BEGIN before END. Control cells are queued at once
//! (docs/design.md, invariant 4); DATA cells first take room in the queue
//! (`reserve`), which is where a busy link pushes back on packagers
//! (invariant 3).

mod handshake;
mod reader;
mod record;
mod table;
pub mod tls;
mod transport;
pub mod tx;
mod writer;

pub use handshake::{establish, HandshakeFailure, TlsConfig};
pub use table::CreatedFast;
pub use transport::{ReadState, Transport, WriteState};
pub use tx::{LinkGone, LinkTx, QUEUE_CELLS};

use crate::circuit::msg::CircMsg;
use crate::circuit::view::CircuitView;
use crate::process::{Ctx, Source};
use crate::runtime::inbox;
use crate::runtime::monitor::Monitor;
use crate::runtime::threads;
use crossbeam_channel::Receiver;
use halfpipe_proto::cell;
use halfpipe_proto::kdf;
use halfpipe_proto::Role;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use table::{CircSlot, CircTable};
use tx::WriterMsg;
use writer::{set_tcp_keepalive, writer_loop};

pub struct Link {
    /// The process's short counter for this link (thread names, logs).
    pub id: u32,
    pub role: Role,
    pub peer: SocketAddr,
    pub tx: LinkTx,
    pub ctx: Arc<Ctx>,
    /// The registry this link is entered in while it lives.
    pub(super) registry: Arc<Links>,
    transport: Arc<Transport>,
    writer: Mutex<Option<JoinHandle<()>>>,
    table: Mutex<CircTable>,
    /// Exit: the streams of this link's circuits, for their fair share of
    /// the process's stream slots.
    source: Arc<Source>,
    /// What status shows of each circuit thread of the link, by its local
    /// counter, from its start to the end of its teardown.
    views: Mutex<HashMap<u32, Arc<CircuitView>>>,
    closed: AtomicBool,
    /// Set by `cut`: the reader stops serving the peer at its next read.
    cut: AtomicBool,
    opened: Instant,
    /// TIDs of `link-rd` and `link-wr` (0 until they run), for status.
    reader_tid: AtomicI32,
    writer_tid: Arc<AtomicI32>,
}

impl Link {
    /// Starts the writer of a link whose handshake is done (`establish`).
    /// The caller must then run `run` on the thread that is to be the link
    /// reader (or `abandon` if it cannot start one). Refused once shutdown
    /// has begun.
    pub fn start(
        ctx: Arc<Ctx>,
        registry: &Arc<Links>,
        id: u32,
        role: Role,
        transport: Transport,
    ) -> io::Result<Arc<Link>> {
        let peer = transport.tcp.peer_addr()?;
        let transport = Arc::new(transport);
        let socket = &transport.tcp;
        let (tx, rx) = inbox::inbox();
        let room = Arc::new(Monitor::new(QUEUE_CELLS));
        let control_queued = Arc::new(AtomicUsize::new(0));
        let writer_tid = Arc::new(AtomicI32::new(0));
        // A writer that makes no progress for this long fails with
        // EAGAIN and the link is torn down (its peer stopped reading).
        socket.set_write_timeout(Some(ctx.cfg.stall_timeout))?;
        let keepalive = ctx.cfg.keepalive;
        if let Some(k) = keepalive {
            set_tcp_keepalive(socket, k);
        }
        let writer = {
            let (sock, room, queued) = (transport.clone(), room.clone(), control_queued.clone());
            let (tid, metrics) = (writer_tid.clone(), ctx.metrics.clone());
            threads::spawn(format!("link-wr {id}"), move || {
                tid.store(crate::runtime::sockets::gettid(), Ordering::Relaxed);
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
                transport: transport.clone(),
                gate: None,
                heard: Arc::new(tx::Heard::new()),
            },
            ctx: ctx.clone(),
            registry: registry.clone(),
            transport,
            writer: Mutex::new(Some(writer)),
            table: Mutex::new(CircTable::default()),
            views: Mutex::new(HashMap::new()),
            source: Source::new(),
            closed: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            opened: Instant::now(),
            reader_tid: AtomicI32::new(0),
            writer_tid,
        });
        if !registry.register(&ctx, link.clone()) {
            link.abandon();
            return Err(io::Error::other("shutting down"));
        }
        Ok(link)
    }

    /// Ends a link that never got a reader: closes it and joins its writer.
    pub fn abandon(&self) {
        self.close();
        self.tx.room.close();
        let _ = self.tx.tx.send(WriterMsg::Close);
        let writer = self.writer.lock().take();
        if let Some(w) = writer {
            threads::join(w);
        }
        self.registry.unregister(self.id);
    }

    /// Ends the link after every cell queued so far has been written: the
    /// writer flushes, then shuts the write side; the peer answers with its
    /// own close, which ends our reader.
    pub fn finish(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.tx.tx.send(WriterMsg::Close);
    }

    /// `finish`, if the link carries no circuit, not even one in its
    /// handshake; checked under the table lock, so no circuit can begin
    /// between the check and the close. Returns whether it finished.
    pub fn finish_if_idle(&self) -> bool {
        let table = self.table.lock();
        if !table.by_wire_id.is_empty() {
            return false;
        }
        self.finish();
        true
    }

    /// Stops serving the peer and ends the link both ways, after what is
    /// queued is written and, on a TLS link, a close_notify (R13.10): the
    /// reader wakes and serves nothing more, and its teardown gives the
    /// writer a moment (`ANSWER_GRACE`) before it shuts the socket.
    pub fn cut(&self) {
        self.closed.store(true, Ordering::Release);
        self.cut.store(true, Ordering::Release);
        self.tx.cut();
        let _ = self.transport.tcp.shutdown(std::net::Shutdown::Read);
    }

    /// Closes the link at once from another thread: the reader wakes and
    /// tears everything down.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.transport.shutdown();
    }

    /// The link's TLS session (`None` on a plain link), for status.
    pub fn tls_info(&self) -> Option<&tls::TlsInfo> {
        self.transport.tls_info()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Circuits with a thread on this link.
    pub fn circuit_count(&self) -> usize {
        self.table.lock().live_count()
    }

    /// Circuits on this link, those in their handshake included.
    pub fn circuit_slots(&self) -> usize {
        self.table.lock().by_wire_id.len()
    }

    /// The views of the link's circuits whose threads run, also while they
    /// end (for a status snapshot: a circuit stuck joining its streams is
    /// what a person wants to see).
    pub fn circuit_views(&self) -> Vec<Arc<CircuitView>> {
        self.views.lock().values().cloned().collect()
    }

    /// Called by a circuit thread at the very end of its teardown, after
    /// every join: it no longer shows in status.
    pub fn forget_view(&self, local: u32) {
        self.views.lock().remove(&local);
    }

    /// Sends `msg()` to every live circuit of the link.
    pub fn tell_circuits(&self, msg: impl Fn() -> CircMsg) {
        for slot in self.table.lock().by_wire_id.values() {
            if let CircSlot::Live { tx, .. } = slot {
                // A circuit that just ended has dropped its receiver.
                let _ = tx.send(msg());
            }
        }
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

    fn send_destroy(&self, wire: u32, reason: u8) {
        let mut out = Vec::with_capacity(cell::CELL_LEN);
        cell::encode_destroy(&mut out, wire, reason);
        let _ = self.tx.send(out);
    }

    /// Client side of §3, step one: picks a free CircID with the top bit
    /// set (R3.1) and waits for its CREATED_FAST on the returned channel.
    pub fn begin_create(&self) -> Result<(u32, Receiver<CreatedFast>), LinkGone> {
        let mut table = self.table.lock();
        // Under the table lock, as in `finish_if_idle`.
        if self.is_closed() {
            return Err(LinkGone);
        }
        let wire = loop {
            let mut r = [0u8; 4];
            getrandom::getrandom(&mut r).expect("the OS random number generator failed");
            // R3.1: most significant bit set, and not in use on the link.
            let id = u32::from_be_bytes(r) | 0x8000_0000;
            if !table.by_wire_id.contains_key(&id) {
                break id;
            }
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        table.by_wire_id.insert(wire, CircSlot::Pending(tx));
        Ok((wire, rx))
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
    /// its streams sent; R3.12 for a violation), and frees its CircID
    /// (R3.7), all under the table lock, so that a new circuit on the
    /// CircID cannot come in between (docs/design.md, invariant 9). If the
    /// peer destroyed it, the link reader has done all this already.
    pub fn circuit_ended(&self, wire: u32, local: u32, destroy: Option<u8>) {
        let mut table = self.table.lock();
        let ours = matches!(table.by_wire_id.get(&wire), Some(CircSlot::Live { local: l, .. }) if *l == local);
        if ours {
            if let Some(CircSlot::Live { thread, gate, .. }) = table.by_wire_id.remove(&wire) {
                gate.close();
                if let Some(reason) = destroy {
                    self.send_destroy(wire, reason);
                }
                table.finished.push(thread);
            }
            table.reap();
        }
    }
}

/// 20 random bytes: the client's X of CREATE_FAST (R3.2), or the exit's
/// fresh Y of CREATED_FAST (R3.3).
pub fn nonce() -> [u8; kdf::HASH_LEN] {
    let mut x = [0u8; kdf::HASH_LEN];
    // The OS random source failing is not something a daemon can work
    // around; it never happens on Linux once the pool is initialised.
    getrandom::getrandom(&mut x).expect("the OS random number generator failed");
    x
}

/// The links of a process: entered when they start, removed when their
/// reader ends. Shutdown walks them, and the status endpoint reads them
/// (and, through each link, its circuits).
#[derive(Default)]
pub struct Links(Mutex<HashMap<u32, Arc<Link>>>);

impl Links {
    /// Enters a new link, unless shutdown has begun: checked under the
    /// same lock that `begin_shutdown` takes, so no link can slip in after
    /// shutdown's sweep.
    fn register(&self, ctx: &Ctx, link: Arc<Link>) -> bool {
        let mut links = self.0.lock();
        if ctx.shutting_down() {
            return false;
        }
        links.insert(link.id, link);
        true
    }

    pub(super) fn unregister(&self, id: u32) {
        self.0.lock().remove(&id);
    }

    /// Sets the process's shutdown flag: from now on no link registers.
    pub fn begin_shutdown(&self, ctx: &Ctx) {
        let _links = self.0.lock();
        ctx.begin_shutdown();
    }

    pub fn all(&self) -> Vec<Arc<Link>> {
        self.0.lock().values().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }
}
