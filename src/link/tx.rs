//! The sending side of a link: one FIFO queue to the link writer, shared by
//! every circuit and stream on the link (docs/design.md, invariants 3 and 4).
//!
//! Cells leave in the order they were queued: CONNECTED before the stream's
//! first DATA, DATA before FIN, BEGIN before END. Control cells are queued at
//! once; DATA cells first take room in the queue (`reserve`), which is where
//! a busy link pushes back on packagers.

use crate::runtime::inbox::InboxTx;
use crate::runtime::monitor::{Monitor, Stopped};
use parking_lot::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// DATA cells that may wait in a link's outbound queue (about 1 MiB).
pub const QUEUE_CELLS: u32 = 2048;

pub(super) enum WriterMsg {
    Cells {
        bytes: Vec<u8>,
        data_cells: u32,
    },
    /// Write what came before, then shut the write side (FIN).
    Close,
    /// Write what came before, then close the link both ways.
    Cut,
    /// Send what the TLS session has queued by itself (the reader found
    /// something it must answer).
    Flush,
}

/// Control bytes that may wait in a link's queue. Legitimate control
/// traffic is bounded by the windows and the stream limits; a peer that
/// sends requests but never reads our answers is cut off past this.
const MAX_CONTROL_QUEUED: usize = 8 << 20;

/// The sending side of a link, cloned by every circuit and stream on it.
#[derive(Clone)]
pub struct LinkTx {
    pub(super) tx: InboxTx<WriterMsg>,
    pub(super) room: Arc<Monitor<u32>>,
    /// Control bytes queued and not yet written.
    pub(super) control_queued: Arc<AtomicUsize>,
    /// To cut the link off when its peer stops reading.
    pub(super) transport: Arc<super::Transport>,
    /// On a circuit's copy: that circuit's gate (see `Gate`).
    pub(super) gate: Option<Arc<Gate>>,
    /// When the link's reader last read something (see `heard_since`).
    pub(super) heard: Arc<Heard>,
}

/// When a link last heard from its peer, for streams that wonder whether
/// the peer is still there: milliseconds since the link opened.
pub struct Heard {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Heard {
    pub(super) fn new() -> Heard {
        Heard {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// The reader read something now.
    pub(super) fn now(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

/// Whether a circuit may still put cells on the link (docs/protocol.md §3;
/// docs/design.md, invariant 9).
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
    pub(super) fn open() -> Arc<Gate> {
        Arc::new(Gate(RwLock::new(true)))
    }

    /// Waits out sends in progress (each a non-blocking enqueue); after
    /// this no cell of the circuit is queued.
    pub(super) fn close(&self) {
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
    pub(super) fn for_circuit(&self, gate: Arc<Gate>) -> LinkTx {
        LinkTx {
            gate: Some(gate),
            ..self.clone()
        }
    }

    /// Queues control cells (whole cells, concatenated). Never blocks.
    pub fn send(&self, bytes: Vec<u8>) -> Result<(), LinkGone> {
        let open = self.gate.as_ref().map(|g| g.0.read());
        if open.as_deref() == Some(&false) {
            return Err(LinkGone); // the circuit is gone (R3.7, R3.11)
        }
        let queued = self.control_queued.fetch_add(bytes.len(), Ordering::AcqRel) + bytes.len();
        if queued > MAX_CONTROL_QUEUED {
            tracing::warn!(
                "peer is not reading: {queued} bytes of control cells queued; closing the link"
            );
            self.transport.shutdown();
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

    /// Has the link read anything from its peer since `t`?
    pub fn heard_since(&self, t: Instant) -> bool {
        let ms = t.saturating_duration_since(self.heard.opened).as_millis() as u64;
        self.heard.last_ms.load(Ordering::Relaxed) >= ms
    }

    /// Closes the link both ways once the cells queued so far are written:
    /// its reader wakes and tears it down.
    pub fn cut(&self) {
        if self.tx.send(WriterMsg::Cut).is_err() {
            self.transport.shutdown();
        }
    }

    /// Wakes packagers waiting for room so that they see their stream's
    /// cancel flag.
    pub fn kick(&self) {
        self.room.kick();
    }
}
