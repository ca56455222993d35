//! What every thread of one halfpipe process shares: the configuration,
//! process-wide limits, the short counters that name links and circuits,
//! and the registry of live links and circuits that shutdown walks.

use crate::circuit::CircMsg;
use crate::inbox::InboxTx;
use crate::link::Link;
use crate::metrics::Metrics;
use halfpipe_proto::policy::Policy;
use crate::status::CircuitView;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Settings of one process (flags, defaults per protocol.md §3 and design.md).
#[derive(Debug, Clone)]
pub struct Config {
    /// Circuits one link may hold (protocol.md §3: at least 32 by default).
    pub max_circuits_per_link: usize,
    /// Streams one circuit may hold (protocol.md §3: at least 1,000).
    pub max_streams_per_circuit: usize,
    /// Streams in the whole process: capped below what the kernel allows
    /// (threads, memory mappings, descriptors), see `limits`.
    pub max_streams: usize,
    /// How long the exit waits for a target to accept (END TIMEOUT after).
    pub connect_timeout: Duration,
    /// How long a peer has to complete the VERSIONS handshake (§1: 10 s),
    /// and the client to get CREATED_FAST.
    pub handshake_timeout: Duration,
    /// How long a SOCKS client has to send its request.
    pub socks_timeout: Duration,
    /// How long streams may finish after Ctrl-C before END(HIBERNATING).
    pub grace: Duration,
    /// A stream with no byte read or written for this long is ended with
    /// END(TIMEOUT) and reset (`--idle-timeout`; off when `None`).
    pub idle_timeout: Option<Duration>,
    /// A link writer sends PADDING after this long without writing, and
    /// link sockets get TCP keepalive (`--keepalive`; off when `None`).
    pub keepalive: Option<Duration>,
    /// Exit policy applied to the address actually connected to.
    pub exit_policy: Arc<Policy>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_circuits_per_link: 32,
            max_streams_per_circuit: 1000,
            max_streams: 1000,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            socks_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            idle_timeout: None,
            keepalive: Some(Duration::from_secs(300)),
            exit_policy: Arc::new(
                halfpipe_proto::policy::DEFAULT_EXIT_POLICY
                    .parse()
                    .expect("the default exit policy parses"),
            ),
        }
    }
}

/// A live circuit in the registry: its inbox, and its view for status.
type CircuitEntry = (InboxTx<CircMsg>, Arc<CircuitView>);

pub struct Ctx {
    pub cfg: Config,
    streams: AtomicUsize,
    next_link: AtomicU32,
    next_circuit: AtomicU32,
    next_socks: AtomicU32,
    shutting_down: AtomicBool,
    /// Live circuits: their inbox, and the view the status endpoint reads.
    circuits: Mutex<HashMap<u32, CircuitEntry>>,
    links: Mutex<HashMap<u32, Arc<Link>>>,
    /// Process-wide counters for `GET /metrics`.
    pub metrics: Arc<Metrics>,
}

/// One stream's share of `Config::max_streams`; released on drop.
pub struct StreamSlot(Arc<Ctx>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ctx {
    pub fn new(cfg: Config) -> Arc<Ctx> {
        Arc::new(Ctx {
            cfg,
            streams: AtomicUsize::new(0),
            next_link: AtomicU32::new(1),
            next_circuit: AtomicU32::new(1),
            next_socks: AtomicU32::new(1),
            shutting_down: AtomicBool::new(false),
            circuits: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// Takes a stream slot, or `None` at the process-wide limit.
    pub fn take_stream_slot(self: &Arc<Self>) -> Option<StreamSlot> {
        let max = self.cfg.max_streams;
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.clone()))
    }

    /// Streams open in this process (both edges in `run` mode).
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    pub fn next_link_id(&self) -> u32 {
        self.next_link.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_circuit_id(&self) -> u32 {
        self.next_circuit.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_socks_id(&self) -> u32 {
        self.next_socks.fetch_add(1, Ordering::Relaxed)
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn begin_shutdown(&self) {
        let _links = self.links.lock();
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Enters a circuit before its thread starts, if there is room under
    /// `limits::MAX_CIRCUITS`. Check and entry are one step, so links that
    /// create circuits at the same moment cannot overshoot the limit.
    pub fn register_circuit(
        &self,
        local: u32,
        tx: InboxTx<CircMsg>,
        view: Arc<CircuitView>,
    ) -> bool {
        let mut circuits = self.circuits.lock();
        if circuits.len() >= crate::limits::MAX_CIRCUITS {
            return false;
        }
        circuits.insert(local, (tx, view));
        true
    }

    /// The views of every live circuit (for a status snapshot).
    pub fn circuit_views(&self) -> Vec<Arc<CircuitView>> {
        self.circuits
            .lock()
            .values()
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// May one more circuit thread start? (`limits::MAX_CIRCUITS`, counted
    /// over the whole process so that links cannot exhaust its threads.)
    pub fn circuit_room(&self) -> bool {
        self.circuits.lock().len() < crate::limits::MAX_CIRCUITS
    }

    pub fn unregister_circuit(&self, local: u32) {
        self.circuits.lock().remove(&local);
    }

    pub fn circuit_count(&self) -> usize {
        self.circuits.lock().len()
    }

    /// Sends `msg()` to every live circuit.
    pub fn tell_circuits(&self, msg: impl Fn() -> CircMsg) {
        for (tx, _) in self.circuits.lock().values() {
            // A circuit that just ended has dropped its receiver: nothing to tell.
            let _ = tx.send(msg());
        }
    }

    /// Enters a new link, unless shutdown has begun: checked under the
    /// same lock that shutdown's sweep of the links takes, so no link can
    /// slip in after the sweep.
    pub fn register_link(&self, link: Arc<Link>) -> bool {
        let mut links = self.links.lock();
        if self.shutting_down() {
            return false;
        }
        links.insert(link.id, link);
        true
    }

    pub fn unregister_link(&self, id: u32) {
        self.links.lock().remove(&id);
    }

    pub fn links(&self) -> Vec<Arc<Link>> {
        self.links.lock().values().cloned().collect()
    }
}
