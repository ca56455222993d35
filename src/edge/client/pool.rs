//! The client's links and circuits to its exit, and which circuit a new
//! stream goes on.
//!
//! Streams of one group share circuits and never use another group's
//! (R11.4). A group may hold several circuits, over several links: a
//! circuit that is full (`--max-streams-per-circuit`) makes the client try
//! the group's other circuits and then create one more, and an exit that
//! refuses a circuit with DESTROY(RESOURCELIMIT) (its per-link limit, R3.8)
//! makes it create the circuit on another link, and ask the supervisor
//! for a new link when every link is refused (docs/protocol.md §11).
//!
//! One request at a time creates a group's circuit; the group's other
//! requests wait for it and use it, so that a burst of requests fills
//! circuits one after another instead of each creating its own.

use crate::circuit::{CircMsg, CircuitOpts};
use crate::link::Link;
use crate::process::metrics::ViolationKind;
use crate::process::Ctx;
use crate::runtime::inbox::InboxTx;
use crate::runtime::monitor::Monitor;
use halfpipe_proto::cell::{self, cmd, destroy_reason};
use halfpipe_proto::congestion::{self, Flow};
use halfpipe_proto::kdf;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which streams may share a circuit (R11.4): `None`, those without SOCKS
/// credentials; `Some(c)`, those with credentials `c`.
pub type Group = Option<Vec<u8>>;

/// A circuit as the client uses it.
#[derive(Clone)]
pub struct CircHandle {
    pub tx: InboxTx<CircMsg>,
    pub wire: u32,
    /// The process's counter for the circuit: tells circuits apart across
    /// links.
    pub local: u32,
    /// One of the general circuits of `--circuits`, which live as long as
    /// their link; the others end after a while without streams.
    lasting: bool,
}

/// A SOCKS session's request for another link: answered `Ok` once a link
/// with room for a circuit may exist, or with why none will.
pub type WantLink = crossbeam_channel::Sender<Result<(), CreateError>>;

/// Why no circuit was created.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CreateError {
    /// The exit refused more circuits on every link the client may have.
    #[error(
        "the exit refuses more circuits (DESTROY(RESOURCELIMIT)) on every link the client may open to it"
    )]
    NoRoom,
    /// This process holds `limits::MAX_CIRCUITS` circuits.
    #[error(
        "this process holds {} circuits, its most",
        crate::process::limits::MAX_CIRCUITS
    )]
    ProcessFull,
    /// Anything else: no link, a lost link, no answer in time.
    #[error("{0}")]
    Failed(String),
}

/// The exit refused a circuit (DESTROY(RESOURCELIMIT)) while the link
/// carried `held` circuits, those in their handshake included (the exit
/// may have counted them): no more are asked for while it carries as many,
/// for `REFUSAL_AGE` (a refusal for the exit's process-wide limit passes).
#[derive(Clone, Copy)]
struct Refusal {
    held: usize,
    at: Instant,
}

const REFUSAL_AGE: Duration = Duration::from_secs(30);

/// One link to the exit and the circuits the client holds on it.
pub struct ClientLink {
    pub link: Arc<Link>,
    /// The link the supervisor keeps up; the others it opens on demand and
    /// closes when they have carried no circuit for a while.
    pub primary: bool,
    circuits: Mutex<HashMap<Group, Vec<CircHandle>>>,
    /// The exit's last refusal of a circuit on this link.
    refused: Mutex<Option<Refusal>>,
    /// Since when the link has held no circuit.
    empty_since: Mutex<Option<Instant>>,
}

impl ClientLink {
    pub fn new(link: Arc<Link>, primary: bool, circuits: Vec<CircHandle>) -> Arc<ClientLink> {
        let mut map = HashMap::new();
        if !circuits.is_empty() {
            map.insert(None, circuits);
        }
        Arc::new(ClientLink {
            link,
            primary,
            circuits: Mutex::new(map),
            refused: Mutex::new(None),
            empty_since: Mutex::new(None),
        })
    }

    fn alive(&self, h: &CircHandle) -> bool {
        self.link.circuit_alive(h.wire, h.local)
    }

    /// May the client ask the exit for another circuit on this link?
    pub fn has_room(&self) -> bool {
        if self.link.is_closed() {
            return false;
        }
        match *self.refused.lock() {
            Some(r) if r.at.elapsed() < REFUSAL_AGE => self.link.circuit_slots() < r.held,
            _ => true,
        }
    }

    /// How long the link has held no circuit (`None` while it holds one).
    pub fn empty_for(&self) -> Option<Duration> {
        let mut since = self.empty_since.lock();
        if self.link.circuit_slots() > 0 {
            *since = None;
            return None;
        }
        Some(since.get_or_insert_with(Instant::now).elapsed())
    }

    /// The group's live circuits on this link that are not in `tried`; the
    /// ended ones are forgotten on the way.
    fn live(&self, group: &Group, tried: &[u32]) -> Vec<CircHandle> {
        let mut circuits = self.circuits.lock();
        let Some(list) = circuits.get_mut(group) else {
            return Vec::new();
        };
        list.retain(|h| self.alive(h));
        let live = list
            .iter()
            .filter(|h| !tried.contains(&h.local))
            .cloned()
            .collect();
        if list.is_empty() {
            circuits.remove(group);
        }
        live
    }

    fn lasting_count(&self) -> usize {
        let circuits = self.circuits.lock();
        circuits.get(&None).map_or(0, |l| {
            l.iter().filter(|h| h.lasting && self.alive(h)).count()
        })
    }
}

/// The client's links to its exit, the primary first.
#[derive(Default)]
pub struct Pool {
    links: Mutex<Vec<Arc<ClientLink>>>,
    /// Round-robin over the group without credentials.
    next_general: AtomicUsize,
    /// The groups a request is creating a circuit for.
    creating: Monitor<HashSet<Group>>,
}

/// Ends a request's turn at creating its group's circuit, however the
/// creation ends, and wakes the group's other requests.
struct Creating<'a>(&'a Pool, &'a Group);

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.0.creating.update(|set| set.remove(self.1));
    }
}

/// Never set: waiting for another request's circuit ends only when its
/// creation does (within the handshake timeout).
static NEVER: AtomicBool = AtomicBool::new(false);

impl Pool {
    pub fn add(&self, link: Arc<ClientLink>) {
        let mut links = self.links.lock();
        if link.primary {
            links.insert(0, link);
        } else {
            links.push(link);
        }
    }

    pub fn remove(&self, id: u32) {
        self.links.lock().retain(|l| l.link.id != id);
    }

    /// The links that are still open.
    pub fn links(&self) -> Vec<Arc<ClientLink>> {
        self.links
            .lock()
            .iter()
            .filter(|l| !l.link.is_closed())
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.links.lock().len()
    }

    pub fn has_primary(&self) -> bool {
        self.links.lock().iter().any(|l| l.primary)
    }

    /// A live circuit of the group that is not in `tried`: round-robin for
    /// the streams without credentials, the oldest circuit for the others
    /// (so that a group's streams gather and its spare circuits can end).
    pub fn existing(&self, group: &Group, tried: &[u32]) -> Option<CircHandle> {
        let live: Vec<CircHandle> = self
            .links()
            .iter()
            .flat_map(|l| l.live(group, tried))
            .collect();
        if live.is_empty() {
            return None;
        }
        let i = match group {
            None => self.next_general.fetch_add(1, Ordering::Relaxed) % live.len(),
            Some(_) => 0,
        };
        Some(live[i].clone())
    }

    /// A circuit for a new stream of `group`, other than the `tried` ones
    /// (they were full): an existing one, else a new one on the first link
    /// with room. Only one request of a group creates at a time; the others
    /// wait for its circuit and look again. Creating blocks while the exit
    /// answers, holding no lock.
    pub fn circuit(
        &self,
        ctx: &Ctx,
        group: &Group,
        tried: &[u32],
        opts: impl Fn(bool) -> CircuitOpts,
        general_circuits: usize,
    ) -> Result<CircHandle, CreateError> {
        loop {
            if let Some(h) = self.existing(group, tried) {
                return Ok(h);
            }
            if self.creating.update(|set| set.insert(group.clone())) {
                let _turn = Creating(self, group);
                // A creation that ended since we looked.
                if let Some(h) = self.existing(group, tried) {
                    return Ok(h);
                }
                return self.create(ctx, group, &opts, general_circuits);
            }
            // Another request is creating the group's circuit: wait for it.
            let _ = self
                .creating
                .wait_until(&NEVER, |set| (!set.contains(group)).then_some(()));
        }
    }

    /// Creates a circuit for the group on the first link with room, and
    /// enters it.
    fn create(
        &self,
        ctx: &Ctx,
        group: &Group,
        opts: &impl Fn(bool) -> CircuitOpts,
        general_circuits: usize,
    ) -> Result<CircHandle, CreateError> {
        let links = self.links();
        if links.is_empty() {
            return Err(CreateError::Failed("no link to the exit".into()));
        }
        if ctx.circuit_count() >= crate::process::limits::MAX_CIRCUITS {
            return Err(CreateError::ProcessFull);
        }
        let mut last = CreateError::NoRoom;
        for cl in links.iter().filter(|l| l.has_room()) {
            // The streams without credentials keep `--circuits` circuits on
            // the primary link that last as long as it; past those, on
            // other links, and for credentials, circuits end after a while
            // without streams.
            let lasting = group.is_none()
                && cl.primary
                && links.iter().map(|l| l.lasting_count()).sum::<usize>() < general_circuits;
            match create_circuit(ctx, &cl.link, opts(lasting), lasting) {
                Ok(fresh) => {
                    cl.circuits
                        .lock()
                        .entry(group.clone())
                        .or_default()
                        .push(fresh.clone());
                    return Ok(fresh);
                }
                Err(CreateError::NoRoom) => {
                    // Circuits in their handshake count: the exit may have
                    // counted them before ours.
                    let held = cl.link.circuit_slots();
                    tracing::info!(
                        link = cl.link.id,
                        circuits = held,
                        "the exit refuses more circuits on this link"
                    );
                    *cl.refused.lock() = Some(Refusal {
                        held: held.max(1),
                        at: Instant::now(),
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// §3, client side: CREATE_FAST with X, check KH in CREATED_FAST, start the
/// circuit thread.
pub fn create_circuit(
    ctx: &Ctx,
    link: &Arc<Link>,
    mut opts: CircuitOpts,
    lasting: bool,
) -> Result<CircHandle, CreateError> {
    let failed = |why: String| CreateError::Failed(why);
    let (wire, rx) = link.begin_create().map_err(|e| failed(e.to_string()))?;
    // R3.2: 20 random bytes X at the start of CREATE_FAST's payload.
    let x = crate::link::nonce();
    let mut payload = x.to_vec();
    // R14.1: the offer of flow control version 2 right after X.
    let offered = opts.flow == Flow::V2;
    if offered {
        congestion::append_mark(&mut payload);
    }
    let mut out = Vec::with_capacity(cell::CELL_LEN);
    cell::encode_fixed(&mut out, wire, cmd::CREATE_FAST, &payload);
    if link.tx.send(out).is_err() {
        link.abandon_create(wire);
        return Err(failed("link closed".into()));
    }
    let fail = |e: CreateError| {
        link.abandon_create(wire);
        Err(e)
    };
    match rx.recv_timeout(ctx.cfg.handshake_timeout) {
        Ok(Ok(payload)) if kdf::check_created_fast(&x, &payload) => {
            // R14.3: version 2 only if offered and accepted.
            opts.flow = congestion::client_flow(offered, &payload);
            let (tx, local) = link
                .finish_create(wire, opts)
                .map_err(|e| failed(e.to_string()))?;
            Ok(CircHandle {
                tx,
                wire,
                local,
                lasting,
            })
        }
        Ok(Ok(_)) => {
            // R3.4: a wrong KH is answered with DESTROY(PROTOCOL).
            ctx.metrics.violation(ViolationKind::Create);
            let mut out = Vec::with_capacity(cell::CELL_LEN);
            cell::encode_destroy(&mut out, wire, destroy_reason::PROTOCOL);
            let _ = link.tx.send(out);
            fail(failed(
                "CREATED_FAST with a wrong KH: sent DESTROY(PROTOCOL)".into(),
            ))
        }
        Ok(Err(destroy_reason::RESOURCELIMIT)) => fail(CreateError::NoRoom),
        Ok(Err(reason)) => fail(failed(format!(
            "the exit refused the circuit: DESTROY({})",
            destroy_reason::name(reason)
        ))),
        Err(_) => {
            // The exit may still create it: tell it we gave up (§3).
            let mut out = Vec::with_capacity(cell::CELL_LEN);
            cell::encode_destroy(&mut out, wire, destroy_reason::FINISHED);
            let _ = link.tx.send(out);
            fail(failed("no CREATED_FAST from the exit in time".into()))
        }
    }
}
