//! What every thread of one halfpipe process shares: the configuration,
//! the process-wide limits on streams and circuits, the short counters
//! that name links and circuits, the shutdown flag and the counters of
//! `/metrics`. Who is alive is kept by their owners: a link's circuits by
//! the link, the links by the daemon's `link::Links`.

pub mod authorized;
pub mod host;
pub mod identity;
pub mod limits;
pub mod metrics;

use crate::runtime::pool::Pool;
use crate::runtime::semaphore::Semaphore;
use halfpipe_proto::congestion::Flow;
use halfpipe_proto::policy::Policy;
use host::HostAddresses;
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
    /// A half-closed stream whose open direction is silent this long is
    /// ended with END(TIMEOUT) (`--half-closed-timeout`; off when `None`).
    pub half_closed_timeout: Option<Duration>,
    /// A link writer sends PADDING after this long without writing, and
    /// link sockets get TCP keepalive (`--keepalive`; off when `None`).
    pub keepalive: Option<Duration>,
    /// Exit policy applied to the address actually connected to, as the
    /// process started with (`Ctx::exit_policy` is the one in force: a
    /// SIGHUP may replace it).
    pub exit_policy: Arc<Policy>,
    /// The flow control this edge offers (client) or accepts (exit) per
    /// circuit (docs/protocol.md §14).
    pub flow: Flow,
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
            half_closed_timeout: Some(Duration::from_secs(300)),
            flow: Flow::V2,
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
    /// The host's own addresses, which `private` in the policy covers.
    pub host: HostAddresses,
    /// Name lookups in flight (`limits::MAX_LOOKUPS`).
    pub lookups: Arc<Semaphore>,
    /// Process-wide counters for `GET /metrics`.
    pub metrics: Arc<Metrics>,
    /// Parked threads that streams and SOCKS handshakes take instead of
    /// starting their own (`runtime::pool`); shut down with the daemon.
    pub pool: Arc<Pool>,
}

/// One stream's share of `Config::max_streams`, counted for its process
/// and for its source; released on drop.
pub struct StreamSlot(Arc<Ctx>, Arc<Source>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        self.1 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where streams come from, for the fair share of the stream slots: one
/// link at the exit, one set of SOCKS credentials at the client. Counts
/// the streams it holds.
#[derive(Debug, Default)]
pub struct Source(AtomicUsize);

impl Source {
    pub fn new() -> Arc<Source> {
        Arc::new(Source::default())
    }

    /// Streams this source holds.
    pub fn streams(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Why no stream slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// The process holds `max_streams` streams.
    Process,
    /// Few slots are left and this source holds its share already.
    Share,
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
            host: HostAddresses::default(),
            lookups: Semaphore::new(limits::MAX_LOOKUPS),
            cfg,
            streams: AtomicUsize::new(0),
            circuits: AtomicUsize::new(0),
            next_link: AtomicU32::new(1),
            next_circuit: AtomicU32::new(1),
            next_socks: AtomicU32::new(1),
            shutting_down: AtomicBool::new(false),
            metrics: Arc::new(Metrics::default()),
            pool: Pool::new(limits::MAX_PARKED, limits::PARKED_IDLE),
        })
    }

    /// Takes a stream slot for `source`: refused at the process-wide limit,
    /// and, once fewer than a quarter of the slots are free, refused to a
    /// source that holds half of them or more, so that no one source can
    /// take the slots others are waiting for.
    pub fn take_stream_slot(self: &Arc<Self>, source: &Arc<Source>) -> Result<StreamSlot, NoSlot> {
        let max = self.cfg.max_streams;
        let share = max.div_ceil(2);
        let mut refused = None;
        let taken = self
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                if n >= max {
                    refused = Some(NoSlot::Process);
                    None
                } else if (max - n) * 4 < max && source.streams() >= share {
                    refused = Some(NoSlot::Share);
                    None
                } else {
                    refused = None;
                    Some(n + 1)
                }
            });
        match taken {
            Ok(_) => {
                source.0.fetch_add(1, Ordering::AcqRel);
                Ok(StreamSlot(self.clone(), source.clone()))
            }
            Err(_) => Err(refused.unwrap_or(NoSlot::Process)),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(max_streams: usize) -> Arc<Ctx> {
        Ctx::new(Config {
            max_streams,
            ..Config::default()
        })
    }

    // No source takes the last quarter of the slots once it holds half.
    #[test]
    fn a_source_holding_half_gets_none_of_the_last_quarter() {
        let ctx = ctx(20);
        let (a, b) = (Source::new(), Source::new());
        let mut held: Vec<StreamSlot> = Vec::new();
        while let Ok(s) = ctx.take_stream_slot(&a) {
            held.push(s);
        }
        // 16 taken: 4 left, under a quarter, and `a` holds half or more.
        assert_eq!(held.len(), 16);
        assert_eq!(ctx.take_stream_slot(&a).err(), Some(NoSlot::Share));
        let others: Vec<StreamSlot> = (0..4).map(|_| ctx.take_stream_slot(&b).unwrap()).collect();
        assert_eq!(ctx.take_stream_slot(&b).err(), Some(NoSlot::Process));
        assert_eq!((a.streams(), b.streams(), ctx.open_streams()), (16, 4, 20));
        drop(others);
        drop(held);
        assert_eq!((a.streams(), b.streams(), ctx.open_streams()), (0, 0, 0));
    }

    // With a single slot in all, the share rule does not keep it back.
    #[test]
    fn the_share_rule_never_refuses_the_only_slot() {
        let ctx = ctx(1);
        let a = Source::new();
        let s = ctx.take_stream_slot(&a).expect("the one slot");
        assert_eq!(ctx.take_stream_slot(&a).err(), Some(NoSlot::Process));
        drop(s);
    }
}
