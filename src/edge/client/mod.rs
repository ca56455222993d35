//! The client edge: keeps links to the exit (`supervisor`), puts streams
//! on circuits (`pool`; CREATE_FAST, docs/protocol.md §3), and serves
//! SOCKS (§11): `socks-accept` accepts, a short-lived `socks N` thread per
//! connection runs the handshake and hands the socket to a circuit, which
//! starts the stream's packager and deliverer.

mod pool;
mod supervisor;

use crate::circuit::{CircMsg, CircuitOpts, OpenRequest, Refused, ResolveRequest, RESOLVE_WAIT};
use crate::link::{Links, TlsConfig};
use crate::process::limits::MAX_HANDSHAKES;
use crate::process::metrics::{Limit, Metrics};
use crate::process::{Ctx, Source};
use crate::runtime::pool::Task;
use crate::runtime::threads;
use crossbeam_channel::{Receiver, Sender};
use halfpipe_proto::relay::{self, Answer, Host};
use halfpipe_proto::socks::{self, Command, Handshake, Reply, Request, SocksVersion};
use parking_lot::Mutex;
use pool::{CircHandle, CreateError, Group, Pool, WantLink};
use socket2::Socket;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a circuit beyond the general ones (`--circuits`) lives without
/// streams: those of credentials, and those opened because the others
/// were full.
const SPARE_IDLE: Duration = Duration::from_secs(60);
/// Circuits a SOCKS request may try: each full circuit it meets sends it
/// to another, or to a new one, and there are never more than this.
const MAX_TRIES: usize = crate::process::limits::MAX_CIRCUITS;
/// Times a SOCKS request may ask for another link. Each answer is a new
/// link, or room that has come free on one, which a burst of other
/// requests may take first; past `MAX_EXIT_LINKS` the supervisor answers
/// that there is none.
const MAX_LINK_ASKS: usize = 2 * crate::process::limits::MAX_EXIT_LINKS;

pub struct Client {
    ctx: Arc<Ctx>,
    registry: Arc<Links>,
    /// The exit's link address as given (HOST:PORT): a name is resolved
    /// again at every dial, so an exit that moves is found again.
    exit: String,
    general_circuits: usize,
    pool: Pool,
    /// The sources of streams, by SOCKS credentials (see `source_of`).
    sources: Mutex<HashMap<Group, Arc<Source>>>,
    stop_tx: Sender<()>,
    stop_rx: Receiver<()>,
    /// Sessions asking the supervisor for another link.
    want_tx: Sender<WantLink>,
    want_rx: Receiver<WantLink>,
    /// The client's TLS configuration (the exit's pinned fingerprint in
    /// it), or `None` for plain links.
    tls: Option<TlsConfig>,
}

impl Client {
    pub fn new(
        ctx: Arc<Ctx>,
        registry: Arc<Links>,
        exit: String,
        circuits: usize,
        tls: Option<TlsConfig>,
    ) -> Arc<Client> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let (want_tx, want_rx) = crossbeam_channel::unbounded();
        Arc::new(Client {
            ctx,
            registry,
            exit,
            general_circuits: circuits.max(1),
            pool: Pool::default(),
            sources: Mutex::new(HashMap::new()),
            stop_tx,
            stop_rx,
            want_tx,
            want_rx,
            tls,
        })
    }

    /// Wakes the supervisor: shutdown has begun.
    pub fn stop(&self) {
        let _ = self.stop_tx.try_send(());
    }

    /// Starts the link supervisor (`link-dial`).
    pub fn spawn_supervisor(self: &Arc<Self>) -> io::Result<JoinHandle<()>> {
        let client = self.clone();
        threads::spawn("link-dial".into(), move || client.supervise())
    }

    fn create_general_circuits(
        &self,
        link: &Arc<crate::link::Link>,
    ) -> Result<Vec<CircHandle>, String> {
        (0..self.general_circuits)
            .map(|_| {
                pool::create_circuit(&self.ctx, link, self.circuit_opts(&None, true), true).map_err(
                    |e| match e {
                        CreateError::NoRoom => {
                            "the exit refused the circuit: DESTROY(RESOURCELIMIT)".into()
                        }
                        other => other.to_string(),
                    },
                )
            })
            .collect()
    }

    fn circuit_opts(&self, group: &Group, lasting: bool) -> CircuitOpts {
        CircuitOpts {
            idle_timeout: (!lasting).then_some(SPARE_IDLE),
            source: self.source_of(group),
            // What the client offers; CREATED_FAST decides (R14.3).
            flow: self.ctx.cfg.flow,
        }
    }

    /// The source of the streams with these SOCKS credentials (`None`: no
    /// credentials), for their fair share of the stream slots. Sources
    /// that hold no stream are forgotten as new ones come.
    fn source_of(&self, group: &Group) -> Arc<Source> {
        let mut sources = self.sources.lock();
        if let Some(s) = sources.get(group) {
            return s.clone();
        }
        sources.retain(|k, s| k.is_none() || s.streams() > 0 || Arc::strong_count(s) > 1);
        sources.entry(group.clone()).or_default().clone()
    }

    /// The circuit for a new stream of `group` (R11.4: streams whose
    /// credentials differ never share one), other than the `tried` ones
    /// (they were full): an existing one, else a new one, on another link
    /// if the exit refuses circuits on those the client has.
    fn circuit_for(&self, group: &Group, tried: &[u32]) -> Result<CircHandle, CreateError> {
        let opts = |lasting| self.circuit_opts(group, lasting);
        let circuit = || {
            self.pool
                .circuit(&self.ctx, group, tried, opts, self.general_circuits)
        };
        // A new link may fill up with other requests' circuits before
        // ours is created on it: then another is asked for, until the
        // supervisor has opened as many as it may.
        for _ in 0..MAX_LINK_ASKS {
            match circuit() {
                Err(CreateError::NoRoom) => self.another_link()?,
                done => return done,
            }
        }
        circuit()
    }

    /// Asks the supervisor for another link to the exit, and waits for it
    /// (at most the time a dial and a handshake may take, and not past the
    /// start of shutdown).
    fn another_link(&self) -> Result<(), CreateError> {
        let stopping = || CreateError::Failed("shutting down".into());
        if self.ctx.shutting_down() {
            return Err(stopping());
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.want_tx.send(tx);
        let deadline = Instant::now() + self.ctx.cfg.handshake_timeout * 2 + Duration::from_secs(1);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(answer) => return answer,
                Err(_) if self.ctx.shutting_down() => return Err(stopping()),
                Err(_) if Instant::now() >= deadline => {
                    return Err(CreateError::Failed(
                        "no new link to the exit in time".into(),
                    ))
                }
                Err(_) => {}
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
                let pool = &client.ctx.pool;
                match pool.spawn(format!("socks {id}"), move || c.socks_session(sock, &h)) {
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
            sessions.into_iter().for_each(|s| s.thread.join());
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
        let group = request.isolation.clone();
        match request.command {
            Command::Connect => self.connect(&group, sock, request, buf, &peer),
            Command::Resolve => match self.circuit_for(&group, &[]) {
                Ok(circuit) => resolve(
                    circuit,
                    sock,
                    request.target,
                    request.version,
                    &self.ctx.metrics,
                ),
                Err(e) => self.no_circuit(&sock, &request, &peer, e),
            },
        }
    }

    /// Hands a SOCKS CONNECT to a circuit of its group; each circuit that
    /// is full (or has just ended) sends it on to another.
    fn connect(
        &self,
        group: &Group,
        sock: TcpStream,
        request: Request,
        initial: Vec<u8>,
        peer: &str,
    ) {
        let _ = sock.set_nodelay(true);
        let target = relay_target(request.target.clone());
        let mut socket = Socket::from(sock);
        let mut tried = Vec::new();
        for _ in 0..MAX_TRIES {
            let circuit = match self.circuit_for(group, &tried) {
                Ok(c) => c,
                Err(e) => return self.no_circuit(&socket, &request, peer, e),
            };
            let (refused_tx, refused_rx) = crossbeam_channel::bounded(1);
            let req = OpenRequest {
                socket,
                target: target.clone(),
                socks: request.version,
                initial: initial.clone(),
                refused: refused_tx,
            };
            let refused = match circuit.tx.send(CircMsg::Open(req)) {
                Err(crossbeam_channel::SendError(CircMsg::Open(req))) => {
                    (req.socket, Refused::Ended)
                }
                Err(_) => return,
                Ok(()) => match refused_rx.recv() {
                    Ok(r) => r,
                    Err(_) => return, // dropped unanswered: the circuit took the socket
                },
            };
            match refused {
                (s, Refused::Limit) => {
                    let reply = socks::connect_reply(request.version, Reply::GeneralFailure, None);
                    self.ctx.metrics.socks_reply(&reply);
                    let _ = (&s).write_all(&reply);
                    return;
                }
                (s, Refused::Full | Refused::Ended) => {
                    socket = s;
                    tried.push(circuit.local);
                }
            }
        }
        let why = format!("the {} circuits tried were full", tried.len());
        self.no_circuit(&socket, &request, peer, CreateError::Failed(why));
    }

    /// R11.15: no circuit (no link to the exit, say) → 0x01 at once rather
    /// than queued (R11.14: 0x5B for SOCKS4).
    fn no_circuit(&self, mut to: impl Write, request: &Request, peer: &str, e: CreateError) {
        if let CreateError::NoRoom | CreateError::ProcessFull = e {
            self.ctx.metrics.refused(Limit::Circuits);
        }
        tracing::info!(%peer, target = %request.target, "SOCKS request failed: {e}");
        let reply = match request.command {
            Command::Connect => socks::connect_reply(request.version, Reply::GeneralFailure, None),
            Command::Resolve => socks::resolve_reply(request.version, Err(Reply::GeneralFailure)),
        };
        self.ctx.metrics.socks_reply(&reply);
        let _ = to.write_all(&reply);
    }
}

/// While a SOCKS connection is in its handshake: a clone of its socket,
/// with which `socks-accept` can end it; `None` once the handshake is over.
type Handshaking = Arc<Mutex<Option<TcpStream>>>;

/// A SOCKS connection's thread, as `socks-accept` keeps it.
struct Session {
    thread: Task,
    started: Instant,
    handshaking: Handshaking,
}

/// Joins the sessions that have ended.
fn reap(sessions: &mut Vec<Session>) {
    let (done, running): (Vec<_>, Vec<_>) =
        sessions.drain(..).partition(|s| s.thread.is_finished());
    *sessions = running;
    done.into_iter().for_each(|s| s.thread.join());
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
