//! A link's circuits as the link sees them, by CircID (docs/protocol.md §3):
//! where each circuit's cells go, and the threads of circuits that ended.

use super::tx::Gate;
use crate::circuit::msg::CircMsg;
use crate::runtime::inbox::InboxTx;
use crate::runtime::threads;
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

/// What a client waiting for CREATED_FAST gets: its payload, or the
/// reason of the DESTROY that came instead.
pub type CreatedFast = Result<Vec<u8>, u8>;

/// A circuit as the link sees it: where its cells go.
pub(super) enum CircSlot {
    /// Client: CREATE_FAST sent, CREATED_FAST (or DESTROY) not yet back.
    Pending(Sender<CreatedFast>),
    Live {
        tx: InboxTx<CircMsg>,
        local: u32,
        gate: Arc<Gate>,
        thread: JoinHandle<()>,
    },
}

#[derive(Default)]
pub(super) struct CircTable {
    pub(super) by_wire_id: HashMap<u32, CircSlot>,
    /// Threads of circuits that have ended, joined as the link goes on.
    pub(super) finished: Vec<JoinHandle<()>>,
}

impl CircTable {
    /// Circuits with a thread (not those still in their handshake).
    pub(super) fn live_count(&self) -> usize {
        self.by_wire_id
            .values()
            .filter(|s| matches!(s, CircSlot::Live { .. }))
            .count()
    }

    pub(super) fn reap(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) =
            self.finished.drain(..).partition(|h| h.is_finished());
        self.finished = running;
        done.into_iter().for_each(threads::join);
    }
}
