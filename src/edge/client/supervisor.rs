//! `link-dial`: the thread that owns the client's links to its exit. It
//! dials the primary link and creates the general circuits on it, dials it
//! again with a capped exponential backoff when it is lost (R11.16), opens
//! another link when a SOCKS session finds the exit refusing circuits on
//! every link it has, closes such a link once it has carried no circuit
//! for a while, and joins every link reader.

use super::pool::{ClientLink, CreateError, WantLink};
use super::Client;
use crate::link::{self, HandshakeFailure, Link};
use crate::process::limits::MAX_EXIT_LINKS;
use crate::runtime::threads;
use halfpipe_proto::Role;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest wait between reconnection attempts (R11.16: never more than
/// 30 s).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// How long a link beyond the primary may hold no circuit before it is
/// closed (the exit's isolation circuits end after as long without
/// streams, so the link outlives its last circuit by about as much).
const EXTRA_IDLE: Duration = Duration::from_secs(60);
/// How long a link we close may take to write what it has queued, and
/// its peer to close its side, before it is cut off.
const LINGER: Duration = Duration::from_secs(2);
/// How often the supervisor looks at its links when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);

/// R11.16: the wait after `backoff` failed too: twice as long, capped.
fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(MAX_BACKOFF)
}

/// A link the supervisor owns: its reader, which it joins, and since when
/// the link has been closing.
struct Owned {
    cl: Arc<ClientLink>,
    reader: JoinHandle<()>,
    closing: Option<Instant>,
}

/// When the primary link is dialed next, and the wait after that.
struct Redial {
    at: Instant,
    backoff: Duration,
}

impl Redial {
    fn failed(&mut self) {
        self.at = Instant::now() + self.backoff;
        self.backoff = next_backoff(self.backoff);
    }
}

impl Client {
    pub(super) fn supervise(&self) {
        let mut owned: Vec<Owned> = Vec::new();
        let mut redial = Redial {
            at: Instant::now(),
            backoff: FIRST_BACKOFF,
        };
        while !self.ctx.shutting_down() {
            self.tend(&mut owned, &mut redial);
            if !self.pool.has_primary() && Instant::now() >= redial.at {
                self.open_primary(&mut owned, &mut redial);
                continue;
            }
            let wait = if self.pool.has_primary() {
                TICK
            } else {
                redial
                    .at
                    .saturating_duration_since(Instant::now())
                    .min(TICK)
            };
            crossbeam_channel::select! {
                recv(self.stop_rx) -> _ => break,
                recv(self.want_rx) -> want => {
                    if let Ok(want) = want {
                        self.more_links(want, &mut owned);
                    }
                }
                default(wait) => {}
            }
        }
        while let Ok(want) = self.want_rx.try_recv() {
            let _ = want.send(Err(CreateError::Failed("shutting down".into())));
        }
        // The daemon closes every link at shutdown: their readers end then.
        owned.into_iter().for_each(|o| threads::join(o.reader));
    }

    /// Joins the readers of links that have ended, and closes the links
    /// beyond the primary that have been without circuits for too long.
    fn tend(&self, owned: &mut Vec<Owned>, redial: &mut Redial) {
        let (ended, running): (Vec<_>, Vec<_>) =
            owned.drain(..).partition(|o| o.reader.is_finished());
        *owned = running;
        for o in ended {
            self.pool.remove(o.cl.link.id);
            threads::join(o.reader);
            if o.cl.primary && !self.ctx.shutting_down() {
                tracing::warn!(exit = %self.exit, "link to exit lost; SOCKS requests fail until it is back");
                redial.failed();
            }
        }
        for o in owned.iter_mut() {
            match o.closing {
                // A request that took the link from the pool just before
                // it leaves finds it closed when it begins a circuit, and
                // goes on to another link.
                None if !o.cl.primary
                    && o.cl.empty_for().is_some_and(|d| d >= EXTRA_IDLE)
                    && o.cl.link.finish_if_idle() =>
                {
                    tracing::info!(
                        link = o.cl.link.id,
                        "closed a link to the exit that carried no circuit"
                    );
                    self.pool.remove(o.cl.link.id);
                    o.closing = Some(Instant::now());
                }
                Some(since) if since.elapsed() >= LINGER => o.cl.link.close(),
                _ => {}
            }
        }
    }

    /// Dials the exit and creates the general circuits (`--circuits`).
    fn open_primary(&self, owned: &mut Vec<Owned>, redial: &mut Redial) {
        let (link, reader) = match self.connect_link() {
            Ok(l) => l,
            // R1.8: a failed handshake is this one line, and ends this
            // connection only.
            Err(e) => {
                tracing::warn!(exit = %self.exit, "cannot reach the exit: {e} (retrying in {:?})", redial.backoff);
                redial.failed();
                return;
            }
        };
        redial.backoff = FIRST_BACKOFF;
        match self.create_general_circuits(&link) {
            Ok(circuits) => {
                tracing::info!(link = link.id, exit = %self.exit, circuits = circuits.len(), "link to exit ready");
                let cl = ClientLink::new(link, true, circuits);
                self.pool.add(cl.clone());
                owned.push(Owned {
                    cl,
                    reader,
                    closing: None,
                });
            }
            Err(e) => {
                tracing::warn!(exit = %self.exit, "cannot create circuits: {e}");
                // Closed after what is queued (a DESTROY for a wrong KH,
                // R3.4) has been written; a peer that does not close its
                // side is cut off.
                link.finish();
                owned.push(Owned {
                    cl: ClientLink::new(link, false, Vec::new()),
                    reader,
                    closing: Some(Instant::now()),
                });
                redial.failed();
            }
        }
    }

    /// Answers a session that found no room for a circuit on any link (and
    /// every session that asked meanwhile): with a new link if the client
    /// has fewer than `MAX_EXIT_LINKS`.
    fn more_links(&self, want: WantLink, owned: &mut Vec<Owned>) {
        let answer = if self.pool.links().iter().any(|l| l.has_room()) {
            Ok(()) // a link has freed room, or another request opened one
        } else if self.pool.len() >= MAX_EXIT_LINKS {
            Err(CreateError::NoRoom)
        } else {
            match self.connect_link() {
                Ok((link, reader)) => {
                    tracing::info!(
                        link = link.id,
                        links = self.pool.len() + 1,
                        "another link to the exit: it refuses more circuits on the others"
                    );
                    let cl = ClientLink::new(link, false, Vec::new());
                    self.pool.add(cl.clone());
                    owned.push(Owned {
                        cl,
                        reader,
                        closing: None,
                    });
                    Ok(())
                }
                Err(e) => Err(CreateError::Failed(format!(
                    "cannot open another link to the exit: {e}"
                ))),
            }
        };
        let _ = want.send(answer.clone());
        while let Ok(want) = self.want_rx.try_recv() {
            let _ = want.send(answer.clone());
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
    /// failed handshake closes this connection only, and the caller logs
    /// why in one line (R1.8).
    fn connect_link(&self) -> io::Result<(Arc<Link>, JoinHandle<()>)> {
        let timeout = self.ctx.cfg.handshake_timeout;
        let sock = self.dial(timeout)?;
        let _ = sock.set_nodelay(true);
        // R13.5: on a TLS link, no cell leaves before the exit's key is the
        // pinned one.
        let transport =
            link::establish(sock, Role::Client, self.tls.as_ref(), timeout).map_err(|e| {
                if let HandshakeFailure::Tls(f) = &e {
                    self.ctx.metrics.tls_failure(f.reason());
                }
                io::Error::other(e.to_string())
            })?;
        let id = self.ctx.next_link_id();
        let link = Link::start(
            self.ctx.clone(),
            &self.registry,
            id,
            Role::Client,
            transport,
        )?;
        let l = link.clone();
        match threads::spawn(format!("link-rd {id}"), move || l.run()) {
            Ok(reader) => Ok((link, reader)),
            Err(e) => {
                link.abandon();
                Err(e)
            }
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
