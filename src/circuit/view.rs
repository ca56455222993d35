//! The circuit's live view, for the status endpoint.

use crate::runtime::fairwindow::FairWindow;
use crate::stream::Stream;
use halfpipe_proto::congestion::Flow;
use halfpipe_proto::Role;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What a circuit shows the status thread: fixed facts, its TID, its
/// windows, and its streams. The circuit thread owns the circuit and
/// updates this view; the status thread only reads it.
pub struct CircuitView {
    pub link: u32,
    pub local: u32,
    pub wire: u32,
    pub role: Role,
    /// The flow control the circuit runs (docs/protocol.md §10 or §14).
    pub flow: Flow,
    opened: Instant,
    tid: AtomicI32,
    package: Arc<FairWindow>,
    /// A copy of the circuit's deliver window, stored once per inbox message.
    deliver: AtomicU32,
    /// Streams by serial (an ID can be taken by a new stream while the old
    /// one's threads end), from the moment their threads start until they
    /// are joined.
    streams: Mutex<BTreeMap<u64, Arc<Stream>>>,
}

impl CircuitView {
    pub fn new(
        link: u32,
        local: u32,
        wire: u32,
        role: Role,
        flow: Flow,
        package: Arc<FairWindow>,
        deliver: u32,
    ) -> Arc<CircuitView> {
        Arc::new(CircuitView {
            link,
            local,
            wire,
            role,
            flow,
            opened: Instant::now(),
            tid: AtomicI32::new(0),
            package,
            deliver: AtomicU32::new(deliver),
            streams: Mutex::new(BTreeMap::new()),
        })
    }

    /// Called on the circuit thread: records its TID.
    pub fn set_tid(&self) {
        self.tid
            .store(crate::runtime::sockets::gettid(), Ordering::Relaxed);
    }

    /// v2: cwnd, inflight and the smoothed round trip (docs/protocol.md §14).
    pub fn congestion(&self) -> Option<(u32, u32, Option<std::time::Duration>)> {
        self.package.congestion()
    }

    pub fn set_deliver_window(&self, value: u32) {
        self.deliver.store(value, Ordering::Relaxed);
    }

    pub fn add_stream(&self, stream: &Arc<Stream>) {
        self.streams.lock().insert(stream.serial, stream.clone());
    }

    pub fn remove_stream(&self, serial: u64) {
        self.streams.lock().remove(&serial);
    }

    pub fn clear_streams(&self) {
        self.streams.lock().clear();
    }

    /// The streams whose threads run, in serial order.
    pub fn streams(&self) -> Vec<Arc<Stream>> {
        self.streams.lock().values().cloned().collect()
    }

    pub fn age(&self) -> std::time::Duration {
        self.opened.elapsed()
    }

    /// The circuit thread's TID (0 until it runs).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Relaxed)
    }

    pub fn package_window(&self) -> u32 {
        self.package.value()
    }

    pub fn deliver_window(&self) -> u32 {
        self.deliver.load(Ordering::Relaxed)
    }
}
