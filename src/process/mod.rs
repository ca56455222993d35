//! What every thread of one halfpipe process shares: the configuration,
//! the process-wide limits on streams and circuits, the short counters
//! that name links and circuits, the shutdown flag and the counters of
//! `/metrics`. Who is alive is kept by their owners: a link's circuits by
//! the link, the links by the daemon's `link::Links`.

pub mod limits;
pub mod metrics;

use crate::runtime::semaphore::Semaphore;
use halfpipe_proto::policy::Policy;
use limits::MAX_CIRCUITS;
use metrics::Metrics;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Settings of one process (flags, defaults per docs/protocol.md §3 and
/// docs/design.md).
#[derive(Debug, Clone)]
pub struct Config {
    /// Circuits one link may hold (R3.9: configurable, at least 32 by
    /// default).
    pub max_circuits_per_link: usize,
    /// Streams one circuit may hold (R3.9: configurable, at least 1,000 by
    /// default).
    pub max_streams_per_circuit: usize,
    /// Streams in the whole process: capped below what the kernel allows
    /// (threads, memory mappings, descriptors), see `limits`.
    pub max_streams: usize,
    /// How long the exit waits for a target to accept (END TIMEOUT after).
    pub connect_timeout: Duration,
    /// How long a peer has to complete the VERSIONS handshake (R1.6: 10 s),
    /// and the client to get CREATED_FAST.
    pub handshake_timeout: Duration,
    /// How long a SOCKS client has to send its request.
    pub socks_timeout: Duration,
    /// Client: how long a stream waits for the exit's CONNECTED (then
    /// END(TIMEOUT), and the link is dropped if nothing came on it since).
    pub begin_timeout: Duration,
    /// How long a link writer may make no progress while cells wait before
    /// the link is torn down (its peer has stopped reading).
    pub stall_timeout: Duration,
    /// How long streams may finish after Ctrl-C before END(HIBERNATING)
    /// (R8.5: the shutdown deadline).
    pub grace: Duration,
    /// A stream with no byte read or written for this long is ended with
    /// END(TIMEOUT) and reset (`--idle-timeout`; off when `None`).
    pub idle_timeout: Option<Duration>,
    /// A link writer sends PADDING after this long without writing, and
    /// link sockets get TCP keepalive (`--keepalive`; off when `None`).
    pub keepalive: Option<Duration>,
    /// Exit policy applied to the address actually connected to, as the
    /// process started with (`Ctx::exit_policy` is the one in force: a
    /// SIGHUP may replace it).
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
            begin_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
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

pub struct Ctx {
    pub cfg: Config,
    streams: AtomicUsize,
    circuits: AtomicUsize,
    next_link: AtomicU32,
    next_circuit: AtomicU32,
    next_socks: AtomicU32,
    shutting_down: AtomicBool,
    /// The exit policy in force.
    policy: RwLock<Arc<Policy>>,
    /// Name lookups in flight (`limits::MAX_LOOKUPS`).
    pub lookups: Arc<Semaphore>,
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

/// One circuit's share of `limits::MAX_CIRCUITS`, held by its thread for
/// as long as it runs; released on drop.
pub struct CircuitSlot(Arc<Ctx>);

impl Drop for CircuitSlot {
    fn drop(&mut self) {
        self.0.circuits.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one of `max` places counted by `count`, if one is free.
fn take(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Ctx {
    pub fn new(cfg: Config) -> Arc<Ctx> {
        Arc::new(Ctx {
            policy: RwLock::new(cfg.exit_policy.clone()),
            lookups: Semaphore::new(limits::MAX_LOOKUPS),
            cfg,
            streams: AtomicUsize::new(0),
            circuits: AtomicUsize::new(0),
            next_link: AtomicU32::new(1),
            next_circuit: AtomicU32::new(1),
            next_socks: AtomicU32::new(1),
            shutting_down: AtomicBool::new(false),
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// Takes a stream slot, or `None` at the process-wide limit.
    pub fn take_stream_slot(self: &Arc<Self>) -> Option<StreamSlot> {
        take(&self.streams, self.cfg.max_streams).then(|| StreamSlot(self.clone()))
    }

    /// Streams open in this process (both edges in `run` mode).
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    /// Takes a circuit slot before a circuit thread starts, or `None` when
    /// the process holds `limits::MAX_CIRCUITS` circuits (counted over the
    /// whole process so that links cannot exhaust its threads). Check and
    /// count are one step, so links that create circuits at the same
    /// moment cannot overshoot the limit.
    pub fn take_circuit_slot(self: &Arc<Self>) -> Option<CircuitSlot> {
        take(&self.circuits, MAX_CIRCUITS).then(|| CircuitSlot(self.clone()))
    }

    /// Circuit threads running in this process.
    pub fn circuit_count(&self) -> usize {
        self.circuits.load(Ordering::Acquire)
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

    /// The exit policy in force: what each new stream is checked against.
    pub fn exit_policy(&self) -> Arc<Policy> {
        self.policy.read().clone()
    }

    /// Replaces the exit policy (SIGHUP); streams already open keep going.
    pub fn set_exit_policy(&self, policy: Arc<Policy>) {
        *self.policy.write() = policy;
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Sets the shutdown flag. `link::Links::begin_shutdown` calls it under
    /// the registry's lock, so that no link registers after the sweep.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }
}
