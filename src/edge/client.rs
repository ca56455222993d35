//! The client edge: keeps one link to the exit (reconnecting with capped
//! exponential backoff), creates circuits with CREATE_FAST
//! (docs/protocol.md §3), and serves SOCKS (§11): `socks-accept` accepts,
//! a short-lived `socks N` thread per connection runs the handshake and
//! hands the socket to a circuit, which starts the stream's packager and
//! deliverer.

use crate::circuit::{CircMsg, CircuitOpts, OpenRequest, ResolveRequest, RESOLVE_WAIT};
use crate::link::{self, Link, Links};
use crate::process::limits::MAX_HANDSHAKES;
use crate::process::metrics::{Metrics, ViolationKind};
use crate::process::{Ctx, Source};
use crate::runtime::inbox::InboxTx;
use crate::runtime::threads;
use crossbeam_channel::{Receiver, Sender};
use halfpipe_proto::cell::{self, cmd, destroy_reason};
use halfpipe_proto::kdf;
use halfpipe_proto::relay::{self, Answer, Host};
use halfpipe_proto::socks::{self, Command, Handshake, Reply, SocksVersion};
use halfpipe_proto::Role;
use parking_lot::Mutex;
use socket2::Socket;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest wait between reconnection attempts (R11.16: never more than
/// 30 s).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// R11.16: the wait after `backoff` failed too: twice as long, capped.
fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(MAX_BACKOFF)
}
/// How long a circuit of isolated credentials lives without streams.
const ISOLATED_IDLE: Duration = Duration::from_secs(60);
/// How long a link we give up on may take to write what it has queued
/// before it is closed.
const LINGER: Duration = Duration::from_secs(2);

/// A circuit as the client uses it.
#[derive(Clone)]
struct CircHandle {
    tx: InboxTx<CircMsg>,
    wire: u32,
    local: u32,
}

/// Which circuit a stream belongs on: one of the N general circuits, or
/// the circuit of its SOCKS credentials (isolation, R11.4).
#[derive(Clone, PartialEq, Eq, Hash)]
enum CircKey {
    General(usize),
    Isolated(Vec<u8>),
}

struct ClientLink {
    link: Arc<Link>,
    circuits: Mutex<HashMap<CircKey, CircHandle>>,
    next_general: AtomicUsize,
}

pub struct Client {
    ctx: Arc<Ctx>,
    registry: Arc<Links>,
    /// The exit's link address as given (HOST:PORT): a name is resolved
    /// again at every dial, so an exit that moves is found again.
    exit: String,
    general_circuits: usize,
    current: Mutex<Option<Arc<ClientLink>>>,
    /// The sources of streams, by SOCKS credentials (see `source_of`).
    sources: Mutex<HashMap<Option<Vec<u8>>, Arc<Source>>>,
    stop_tx: Sender<()>,
    stop_rx: Receiver<()>,
}

impl Client {
    pub fn new(ctx: Arc<Ctx>, registry: Arc<Links>, exit: String, circuits: usize) -> Arc<Client> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        Arc::new(Client {
            ctx,
            registry,
            exit,
            general_circuits: circuits.max(1),
            current: Mutex::new(None),
            sources: Mutex::new(HashMap::new()),
            stop_tx,
            stop_rx,
        })
    }

    /// Wakes the supervisor from its backoff sleep at shutdown.
    pub fn stop(&self) {
        let _ = self.stop_tx.try_send(());
    }

    /// Starts the link supervisor (`link-dial`).
    pub fn spawn_supervisor(self: &Arc<Self>) -> io::Result<JoinHandle<()>> {
        let client = self.clone();
        threads::spawn("link-dial".into(), move || client.supervise())
    }

    /// Keeps one link to the exit: connect, create the general circuits,
    /// wait for the link to end, back off, repeat (R11.16: linking again
    /// with a capped exponential backoff; a link that came up resets it).
    fn supervise(&self) {
        let mut backoff = FIRST_BACKOFF;
        while !self.ctx.shutting_down() {
            match self.connect_link() {
                Ok((link, reader)) => {
                    backoff = FIRST_BACKOFF;
                    match self.create_general_circuits(&link) {
                        Ok(circuits) => {
                            tracing::info!(link = link.id, exit = %self.exit, circuits = circuits.len(), "link to exit ready");
                            *self.current.lock() = Some(Arc::new(ClientLink {
                                link: link.clone(),
                                circuits: Mutex::new(circuits),
                                next_general: AtomicUsize::new(0),
                            }));
                        }
                        Err(e) => {
                            tracing::warn!(exit = %self.exit, "cannot create circuits: {e}");
                            // Close after what is queued (a DESTROY for a
                            // wrong KH, R3.4) has been written; a peer that
                            // does not close its side is cut off.
                            link.finish();
                            let deadline = Instant::now() + LINGER;
                            while !reader.is_finished() && Instant::now() < deadline {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            link.close();
                        }
                    }
                    // This thread owns the link reader: wait for the link to end.
                    threads::join(reader);
                    *self.current.lock() = None;
                    if self.ctx.shutting_down() {
                        break;
                    }
                    tracing::warn!(exit = %self.exit, "link to exit lost; SOCKS requests fail until it is back");
                }
                // R1.8: a failed handshake is this one line, and ends this
                // connection only.
                Err(e) => {
                    tracing::warn!(exit = %self.exit, "cannot reach the exit: {e} (retrying in {backoff:?})");
                }
            }
            if self.stop_rx.recv_timeout(backoff).is_ok() {
                break;
            }
            backoff = next_backoff(backoff);
        }
    }

    /// Resolves the exit's address now and connects to the first of its
    /// addresses that answers.
    fn dial(&self, timeout: Duration) -> io::Result<TcpStream> {
        let addrs = self.exit.to_socket_addrs().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot resolve the exit {}: {e}", self.exit),
            )
        })?;
        let mut last = io::Error::other(format!("the exit {} resolves to nothing", self.exit));
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Connects and handshakes (§1); the link reader runs in `link-rd N`. A
    /// failed handshake closes this connection only, and `supervise` logs
    /// why in one line (R1.8).
    fn connect_link(&self) -> io::Result<(Arc<Link>, JoinHandle<()>)> {
        let timeout = self.ctx.cfg.handshake_timeout;
        let sock = self.dial(timeout)?;
        let _ = sock.set_nodelay(true);
        link::connect_handshake(&sock, timeout).map_err(|e| io::Error::other(e.to_string()))?;
        let id = self.ctx.next_link_id();
        let link = Link::start(self.ctx.clone(), &self.registry, id, Role::Client, sock)?;
        let l = link.clone();
        match threads::spawn(format!("link-rd {id}"), move || l.run()) {
            Ok(reader) => Ok((link, reader)),
            Err(e) => {
                link.abandon();
                Err(e)
            }
        }
    }

    fn create_general_circuits(
        &self,
        link: &Arc<Link>,
    ) -> io::Result<HashMap<CircKey, CircHandle>> {
        (0..self.general_circuits)
            .map(|i| {
                let opts = CircuitOpts {
                    idle_timeout: None,
                    source: self.source_of(None),
                };
                Ok((CircKey::General(i), create_circuit(&self.ctx, link, opts)?))
            })
            .collect()
    }

    /// The source of the streams with these SOCKS credentials (`None`: no
    /// credentials), for their fair share of the stream slots. Sources
    /// that hold no stream are forgotten as new ones come.
    fn source_of(&self, credentials: Option<&Vec<u8>>) -> Arc<Source> {
        let mut sources = self.sources.lock();
        if let Some(s) = sources.get(&credentials.cloned()) {
            return s.clone();
        }
        sources.retain(|k, s| k.is_none() || s.streams() > 0 || Arc::strong_count(s) > 1);
        sources.entry(credentials.cloned()).or_default().clone()
    }

    /// The circuit for a new stream: round-robin over the general circuits,
    /// or the circuit of the stream's credentials (R11.4: streams whose
    /// credentials differ never share one), created on demand.
    fn circuit_for(&self, isolation: Option<Vec<u8>>) -> io::Result<CircHandle> {
        let cl = self.current.lock().clone();
        let Some(cl) = cl.filter(|cl| !cl.link.is_closed()) else {
            return Err(io::Error::other("no link to the exit"));
        };
        let key = match isolation {
            Some(k) => CircKey::Isolated(k),
            None => {
                let i = cl.next_general.fetch_add(1, Ordering::Relaxed);
                CircKey::General(i % self.general_circuits)
            }
        };
        if let Some(h) = cl.circuits.lock().get(&key) {
            if cl.link.circuit_alive(h.wire, h.local) {
                return Ok(h.clone());
            }
        }
        // Created without holding the lock: it waits for the exit.
        let opts = match &key {
            CircKey::General(_) => CircuitOpts {
                idle_timeout: None,
                source: self.source_of(None),
            },
            CircKey::Isolated(credentials) => CircuitOpts {
                idle_timeout: Some(ISOLATED_IDLE),
                source: self.source_of(Some(credentials)),
            },
        };
        let fresh = create_circuit(&self.ctx, &cl.link, opts)?;
        let mut circuits = cl.circuits.lock();
        // Forget keys whose circuits have ended (idle, destroyed).
        circuits.retain(|_, h| cl.link.circuit_alive(h.wire, h.local));
        match circuits.get(&key) {
            Some(h) if cl.link.circuit_alive(h.wire, h.local) => {
                // Another request created it first; ours is not needed.
                let _ = fresh.tx.send(CircMsg::Unneeded);
                Ok(h.clone())
            }
            _ => {
                circuits.insert(key, fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// Starts `socks-accept`.
    pub fn spawn_socks_acceptor(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> io::Result<JoinHandle<()>> {
        let client = self.clone();
        threads::spawn("socks-accept".into(), move || {
            let mut sessions: Vec<Session> = Vec::new();
            loop {
                reap(&mut sessions);
                if sessions.len() >= MAX_HANDSHAKES {
                    // All slots taken: the slowest handshake gives way to
                    // the connection waiting, so that clients who dribble
                    // their handshakes cannot keep a prompt one waiting.
                    // If none is in its handshake any more (each is being
                    // given a circuit), new connections wait in the
                    // listen backlog for one to end.
                    let pause = if evict_oldest_handshake(&sessions) {
                        Duration::from_millis(1) // it ends at once
                    } else {
                        Duration::from_millis(5)
                    };
                    while sessions.len() >= MAX_HANDSHAKES && !client.ctx.shutting_down() {
                        std::thread::sleep(pause);
                        reap(&mut sessions);
                    }
                }
                if client.ctx.shutting_down() {
                    break;
                }
                let conn = listener.accept().map(|(s, _)| s);
                if client.ctx.shutting_down() {
                    break;
                }
                let sock = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("accepting a SOCKS connection failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let Ok(watch) = sock.try_clone() else {
                    continue; // no descriptor to spare: the client sees a close
                };
                let handshaking: Handshaking = Arc::new(Mutex::new(Some(watch)));
                let id = client.ctx.next_socks_id();
                let (c, h) = (client.clone(), handshaking.clone());
                match threads::spawn(format!("socks {id}"), move || c.socks_session(sock, &h)) {
                    Ok(thread) => sessions.push(Session {
                        thread,
                        started: Instant::now(),
                        handshaking,
                    }),
                    // The socket went with the closure: the client sees a close.
                    Err(e) => {
                        tracing::warn!("cannot start a SOCKS thread ({e}): connection dropped")
                    }
                }
            }
            for s in &sessions {
                if let Some(sock) = s.handshaking.lock().take() {
                    let _ = sock.shutdown(Shutdown::Both);
                }
            }
            sessions.into_iter().for_each(|s| threads::join(s.thread));
        })
    }

    /// One SOCKS connection up to the moment a circuit takes it over. The
    /// whole handshake must end within --socks-timeout. `handshaking` holds
    /// the acceptor's clone of the socket while the handshake runs; it is
    /// emptied (the clone closed) when the handshake ends, however it ends.
    fn socks_session(&self, sock: TcpStream, handshaking: &Mutex<Option<TcpStream>>) {
        struct Done<'a>(&'a Mutex<Option<TcpStream>>);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.lock().take();
            }
        }
        let done = Done(handshaking);
        let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let deadline = Instant::now() + self.ctx.cfg.socks_timeout;
        let mut hs = Handshake::new();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let request = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
                tracing::debug!(%peer, "SOCKS handshake not complete within --socks-timeout");
                return;
            }
            let n = match (&sock).read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(%peer, "SOCKS client gave up or timed out: {e}");
                    return;
                }
            };
            buf.extend_from_slice(&chunk[..n]);
            match hs.feed(&buf) {
                Ok(step) => {
                    buf.drain(..step.consumed);
                    if !step.reply.is_empty() && (&sock).write_all(&step.reply).is_err() {
                        return;
                    }
                    if let Some(r) = step.request {
                        break r;
                    }
                }
                Err(e) => {
                    tracing::info!(%peer, "SOCKS request refused: {e}");
                    self.ctx.metrics.socks_reply(&e.reply);
                    let _ = (&sock).write_all(&e.reply);
                    return;
                }
            }
        };
        drop(done); // from here on it cannot be evicted
        let _ = sock.set_read_timeout(None);
        let version = request.version;
        let circuit = match self.circuit_for(request.isolation.clone()) {
            Ok(c) => c,
            Err(e) => {
                // R11.15: no link to the exit → 0x01 at once rather than
                // queued (R11.14: 0x5B for SOCKS4).
                tracing::info!(%peer, target = %request.target, "SOCKS request failed: {e}");
                let reply = match request.command {
                    Command::Connect => socks::connect_reply(version, Reply::GeneralFailure, None),
                    Command::Resolve => socks::resolve_reply(version, Err(Reply::GeneralFailure)),
                };
                self.ctx.metrics.socks_reply(&reply);
                let _ = (&sock).write_all(&reply);
                return;
            }
        };
        match request.command {
            Command::Connect => self.connect(circuit, sock, request.target, version, buf),
            Command::Resolve => resolve(circuit, sock, request.target, version, &self.ctx.metrics),
        }
    }

    fn connect(
        &self,
        circuit: CircHandle,
        sock: TcpStream,
        target: socks::Target,
        version: SocksVersion,
        initial: Vec<u8>,
    ) {
        let _ = sock.set_nodelay(true);
        let (refused_tx, refused_rx) = crossbeam_channel::bounded(1);
        let req = OpenRequest {
            socket: Socket::from(sock),
            target: relay_target(target),
            socks: version,
            initial,
            refused: refused_tx,
        };
        let refused = match circuit.tx.send(CircMsg::Open(req)) {
            Err(crossbeam_channel::SendError(CircMsg::Open(req))) => Some(req.socket),
            Err(_) => None,
            // Dropped unanswered: the circuit took the socket.
            Ok(()) => refused_rx.recv().ok(),
        };
        if let Some(socket) = refused {
            let reply = socks::connect_reply(version, Reply::GeneralFailure, None);
            self.ctx.metrics.socks_reply(&reply);
            let _ = (&socket).write_all(&reply);
        }
    }
}

/// While a SOCKS connection is in its handshake: a clone of its socket,
/// with which `socks-accept` can end it; `None` once the handshake is over.
type Handshaking = Arc<Mutex<Option<TcpStream>>>;

/// A SOCKS connection's thread, as `socks-accept` keeps it.
struct Session {
    thread: JoinHandle<()>,
    started: Instant,
    handshaking: Handshaking,
}

/// Joins the sessions that have ended.
fn reap(sessions: &mut Vec<Session>) {
    let (done, running): (Vec<_>, Vec<_>) =
        sessions.drain(..).partition(|s| s.thread.is_finished());
    *sessions = running;
    done.into_iter().for_each(|s| threads::join(s.thread));
}

/// Ends the handshake that has been going on longest, if any is: its
/// thread sees the socket shut and ends. Returns whether one was ended.
fn evict_oldest_handshake(sessions: &[Session]) -> bool {
    let mut by_age: Vec<&Session> = sessions.iter().collect();
    by_age.sort_by_key(|s| s.started);
    for s in by_age {
        if let Some(sock) = s.handshaking.lock().take() {
            tracing::debug!(
                "{MAX_HANDSHAKES} SOCKS handshakes in progress: closing the oldest ({:?} old)",
                s.started.elapsed()
            );
            let _ = sock.shutdown(Shutdown::Both);
            return true;
        }
    }
    false
}

/// §11 with Tor's RESOLVE extension: answer with the first address.
fn resolve(
    circuit: CircHandle,
    sock: TcpStream,
    target: socks::Target,
    version: SocksVersion,
    metrics: &Metrics,
) {
    let answer = match target {
        socks::Target::Addr(a) => Ok(a.ip()),
        socks::Target::Name { host, .. } => {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let sent = circuit.tx.send(CircMsg::Resolve(ResolveRequest {
                name: host,
                reply: tx,
            }));
            match sent.ok().and_then(|_| rx.recv_timeout(RESOLVE_WAIT).ok()) {
                Some(answers) => answers
                    .iter()
                    .find_map(|a| match a {
                        Answer::Ip(ip) => Some(*ip),
                        _ => None,
                    })
                    .ok_or(Reply::HostUnreachable),
                None => Err(Reply::GeneralFailure),
            }
        }
    };
    let reply = socks::resolve_reply(version, answer);
    metrics.socks_reply(&reply);
    let _ = (&sock).write_all(&reply);
}

fn relay_target(t: socks::Target) -> relay::Target {
    match t {
        socks::Target::Addr(a) => relay::Target {
            host: Host::Ip(a.ip()),
            port: a.port(),
        },
        socks::Target::Name { host, port } => relay::Target {
            host: Host::Name(host),
            port,
        },
    }
}

/// §3, client side: CREATE_FAST with X, check KH in CREATED_FAST, start the
/// circuit thread.
fn create_circuit(ctx: &Ctx, link: &Arc<Link>, opts: CircuitOpts) -> io::Result<CircHandle> {
    let (wire, rx) = link
        .begin_create()
        .map_err(|e| io::Error::other(e.to_string()))?;
    // R3.2: 20 random bytes X at the start of CREATE_FAST's payload.
    let x = crate::link::nonce();
    let mut out = Vec::with_capacity(cell::CELL_LEN);
    cell::encode_fixed(&mut out, wire, cmd::CREATE_FAST, &x);
    if link.tx.send(out).is_err() {
        link.abandon_create(wire);
        return Err(io::Error::other("link closed"));
    }
    let fail = |why: String| {
        link.abandon_create(wire);
        Err(io::Error::other(why))
    };
    match rx.recv_timeout(ctx.cfg.handshake_timeout) {
        Ok(Ok(payload)) if kdf::check_created_fast(&x, &payload) => {
            let (tx, local) = link.finish_create(wire, opts)?;
            Ok(CircHandle { tx, wire, local })
        }
        Ok(Ok(_)) => {
            // R3.4: a wrong KH is answered with DESTROY(PROTOCOL).
            ctx.metrics.violation(ViolationKind::Create);
            let mut out = Vec::with_capacity(cell::CELL_LEN);
            cell::encode_destroy(&mut out, wire, destroy_reason::PROTOCOL);
            let _ = link.tx.send(out);
            fail("CREATED_FAST with a wrong KH: sent DESTROY(PROTOCOL)".into())
        }
        Ok(Err(reason)) => fail(format!(
            "the exit refused the circuit: DESTROY({})",
            destroy_reason::name(reason)
        )),
        Err(_) => {
            // The exit may still create it: tell it we gave up (§3).
            let mut out = Vec::with_capacity(cell::CELL_LEN);
            cell::encode_destroy(&mut out, wire, destroy_reason::FINISHED);
            let _ = link.tx.send(out);
            fail("no CREATED_FAST from the exit in time".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_backoff_doubles_from_250_ms_and_never_exceeds_30_s() {
        // R11.16: capped exponential backoff, never more than 30 s between
        // attempts.
        let mut waits = vec![FIRST_BACKOFF];
        for _ in 0..20 {
            waits.push(next_backoff(*waits.last().unwrap()));
        }
        let ms: Vec<u128> = waits.iter().take(9).map(Duration::as_millis).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(30)));
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
    }
}
