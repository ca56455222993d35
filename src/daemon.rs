//! Putting the edges together, and shutting them down (docs/operations.md,
//! "Signals and shutdown"): Ctrl-C or SIGTERM stops accepting, lets streams
//! finish for the grace period, then ends the rest with END(HIBERNATING)
//! and DESTROY (docs/protocol.md, R8.5).
//! The status endpoint and the SIGUSR1 table (`status`) stay up until the
//! edges are down, so that a stream stuck at shutdown can be looked at.

use crate::circuit::CircMsg;
use crate::edge::client::Client;
use crate::edge::exit;
use crate::link::tls::{self, ClientList};
use crate::link::{Links, TlsConfig};
use crate::ops::signals;
use crate::ops::status::{self, StatusServer, Watched};
use crate::process::identity::Identity;
use crate::process::Ctx;
use crate::runtime::threads;
use halfpipe_proto::identity::Fingerprint;
use parking_lot::Mutex;
use socket2::SockRef;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a daemon's links are made with (docs/protocol.md §13): `None` on
/// `Daemon` for plain links.
#[derive(Clone)]
pub struct TlsSetup {
    pub identity: Arc<Identity>,
    /// The client's pin (R13.5); `halfpipe run` pins its own exit.
    pub exit_fingerprint: Option<Fingerprint>,
    /// The clients the exit serves (R13.7); `None`: any.
    pub clients: Option<ClientList>,
}

/// A running daemon: its listeners (to stop accepting) and its top-level
/// threads (which own every other thread).
pub struct Daemon {
    pub ctx: Arc<Ctx>,
    /// Every link of the process, whichever edge started it.
    links: Arc<Links>,
    listeners: Vec<TcpListener>,
    client: Option<Arc<Client>>,
    threads: Vec<JoinHandle<()>>,
    /// Where each listener listens, for the start-up lines.
    pub socks_addr: Option<SocketAddr>,
    pub link_addr: Option<SocketAddr>,
    /// The edges started: "client", "exit" (shown by status and SIGUSR1).
    roles: Arc<Mutex<Vec<&'static str>>>,
    /// `--status`: the HTTP server on `status-http`.
    status: Option<StatusServer>,
    /// SIGUSR1: the `signals` thread and the handle that ends it.
    signals: Option<(signal_hook::iterator::Handle, JoinHandle<()>)>,
    /// TLS links; `None`: plain links.
    pub tls: Option<TlsSetup>,
}

impl Daemon {
    pub fn new(ctx: Arc<Ctx>) -> Daemon {
        Daemon {
            ctx,
            links: Arc::new(Links::default()),
            listeners: Vec::new(),
            client: None,
            threads: Vec::new(),
            socks_addr: None,
            link_addr: None,
            roles: Arc::new(Mutex::new(Vec::new())),
            status: None,
            signals: None,
            tls: None,
        }
    }

    /// Every link of the process (SIGHUP looks at their clients).
    pub fn links(&self) -> Arc<Links> {
        self.links.clone()
    }

    /// What the status endpoint and SIGUSR1 read.
    fn watched(&self) -> Watched {
        Watched {
            ctx: self.ctx.clone(),
            links: self.links.clone(),
            roles: self.roles.clone(),
        }
    }

    fn add_role(&self, role: &'static str) {
        let mut roles = self.roles.lock();
        roles.push(role);
        roles.sort_unstable();
    }

    /// Starts the status endpoint (`--status`) on `addr`, loopback only
    /// unless `allow_remote`. Call after the edges are started.
    pub fn start_status(
        &mut self,
        addr: SocketAddr,
        allow_remote: bool,
    ) -> Result<SocketAddr, status::StartError> {
        let (server, local) = StatusServer::start(self.watched(), addr, allow_remote)?;
        self.status = Some(server);
        Ok(local)
    }

    /// Starts `signals` (`ops::signals`): SIGTERM calls `terminate`,
    /// SIGHUP `reload`, SIGUSR1 writes the stream table to the log.
    /// `signals` should be registered before anything starts, and this
    /// called before the edges, so that the thread exists by the time
    /// anyone sees the listening lines.
    pub fn start_signals(
        &mut self,
        signals: signal_hook::iterator::Signals,
        terminate: Box<dyn Fn() + Send>,
        reload: Box<dyn Fn() + Send>,
    ) -> io::Result<()> {
        let watched = self.watched();
        let actions = signals::Actions {
            terminate,
            reload,
            table: Box::new(move || status::table(&status::snapshot(&watched))),
        };
        self.signals = Some(signals::spawn(signals, actions)?);
        Ok(())
    }

    /// Starts the exit edge on `listen`.
    pub fn start_exit(&mut self, listen: SocketAddr) -> io::Result<SocketAddr> {
        let listener = bind(listen)?;
        let addr = listener.local_addr()?;
        self.listeners.push(listener.try_clone()?);
        let tls = self.tls.as_ref().map(|t| TlsConfig::Exit {
            config: tls::server_config(&t.identity, t.clients.clone()),
            clients: t.clients.clone(),
        });
        self.threads.push(exit::spawn_acceptor(
            self.ctx.clone(),
            self.links.clone(),
            listener,
            tls,
        )?);
        self.link_addr = Some(addr);
        if self.ctx.exit_policy().mentions_private() {
            let host = self.ctx.host.current();
            tracing::info!(
                "`private` in the exit policy covers this host's {} addresses too",
                host.len()
            );
        }
        self.add_role("exit");
        Ok(addr)
    }

    /// Starts the client edge: SOCKS on `socks`, one link to `exit`.
    pub fn start_client(
        &mut self,
        socks: SocketAddr,
        exit: String,
        circuits: usize,
    ) -> io::Result<SocketAddr> {
        let listener = bind(socks)?;
        let addr = listener.local_addr()?;
        let tls = match &self.tls {
            None => None,
            Some(t) => {
                let pin = t
                    .exit_fingerprint
                    .ok_or_else(|| io::Error::other("a TLS client needs the exit's fingerprint"))?;
                Some(TlsConfig::Client(tls::client_config(&t.identity, pin)))
            }
        };
        let client = Client::new(self.ctx.clone(), self.links.clone(), exit, circuits, tls);
        self.threads.push(client.spawn_supervisor()?);
        self.listeners.push(listener.try_clone()?);
        self.threads.push(client.spawn_socks_acceptor(listener)?);
        self.client = Some(client);
        self.socks_addr = Some(addr);
        self.add_role("client");
        Ok(addr)
    }

    /// Graceful shutdown. Returns once every thread has been joined.
    pub fn shutdown(self) {
        let ctx = &self.ctx;
        self.links.begin_shutdown(ctx);
        // Stop accepting: shutdown() on a listening socket wakes accept().
        for l in &self.listeners {
            let _ = SockRef::from(l).shutdown(Shutdown::Read);
        }
        if let Some(c) = &self.client {
            c.stop();
        }
        let grace = ctx.cfg.grace;
        let open = ctx.open_streams();
        if open > 0 {
            tracing::info!("shutting down: {open} streams may finish within {grace:?}");
        }
        let deadline = Instant::now() + grace;
        while ctx.open_streams() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = ctx.open_streams();
        if left > 0 {
            tracing::info!("grace period over: ending {left} streams with END(HIBERNATING)");
        }
        // R8.5: the shutdown deadline has passed: END(HIBERNATING) for what
        // is left, then DESTROY.
        for link in self.links.all() {
            link.tell_circuits(|| CircMsg::Hibernate);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while ctx.circuit_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Links end after their queued ENDs and DESTROYs are written; a peer
        // that does not close its side in time is cut off.
        for link in self.links.all() {
            link.finish();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.links.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for link in self.links.all() {
            link.close();
        }
        self.threads.into_iter().for_each(threads::join);
        // Every task's owner has joined it: the parked threads retire.
        ctx.pool.shutdown();
        if let Some(status) = self.status {
            status.stop();
        }
        if let Some((handle, thread)) = self.signals {
            handle.close();
            threads::join(thread);
        }
        tracing::info!("halfpipe stopped");
    }
}

/// Binds a listener with SO_REUSEADDR, so that a restarted daemon can take
/// its port back while old connections linger in TIME_WAIT.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    sock.listen(1024)?;
    Ok(sock.into())
}
