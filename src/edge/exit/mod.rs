//! The exit edge: accepts links (`link-accept`), and connects streams to
//! their targets ([`connect`]: docs/protocol.md §5).

pub mod connect;

use crate::link::{self, HandshakeFailure, Link, Links, TlsConfig};
use crate::process::limits::MAX_LINKS;
use crate::process::Ctx;
use crate::runtime::threads::{self, Reaper};
use halfpipe_proto::Role;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Accepts links until the listener is shut down, then joins every link.
/// `tls`: the exit's TLS configuration, or `None` for plain links.
pub fn spawn_acceptor(
    ctx: Arc<Ctx>,
    registry: Arc<Links>,
    listener: TcpListener,
    tls: Option<TlsConfig>,
) -> io::Result<JoinHandle<()>> {
    threads::spawn("link-accept".into(), move || {
        let mut links = Reaper::default();
        for conn in listener.incoming() {
            links.reap();
            if ctx.shutting_down() {
                break;
            }
            let sock = match conn {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accepting a link failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if links.len() >= MAX_LINKS {
                tracing::warn!("{MAX_LINKS} links open: closing a new connection");
                continue;
            }
            let id = ctx.next_link_id();
            let (ctx, registry, tls) = (ctx.clone(), registry.clone(), tls.clone());
            match threads::spawn(format!("link-rd {id}"), move || {
                serve_link(ctx, &registry, id, sock, tls.as_ref())
            }) {
                Ok(h) => links.push(h),
                Err(e) => tracing::warn!("cannot start a link thread ({e}): link refused"),
            }
        }
        links.join_all();
    })
}

/// One accepted link: handshake, then this thread is its reader.
fn serve_link(
    ctx: Arc<Ctx>,
    registry: &Arc<Links>,
    id: u32,
    sock: TcpStream,
    tls: Option<&TlsConfig>,
) {
    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    // R1.6: the handshake clock starts now, right after the accept.
    let timeout = if crate::fault::active(crate::fault::Fault::NoHandshakeTimeout) {
        std::time::Duration::from_secs(3600)
    } else {
        ctx.cfg.handshake_timeout
    };
    let transport = match link::establish(sock, Role::Exit, tls, timeout) {
        Ok(t) => t,
        Err(e) => {
            // R1.7: close without sending VERSIONS; R1.8: one log line that
            // says why, and only this connection is affected. (The line is
            // rate-limited: under a flood, a count of the suppressed ones
            // stands in for them.)
            if crate::runtime::ratelimit::violation_warning() {
                tracing::warn!(link = id, %peer, "link handshake failed, closing: {e}");
            }
            match &e {
                HandshakeFailure::Protocol(_) | HandshakeFailure::TlsPeer => ctx
                    .metrics
                    .violation(crate::process::metrics::ViolationKind::Handshake),
                HandshakeFailure::Tls(f) => ctx.metrics.tls_failure(f.reason()),
                _ => {}
            }
            return;
        }
    };
    let _ = transport.tcp.set_nodelay(true);
    match Link::start(ctx, registry, id, Role::Exit, transport) {
        Ok(link) => {
            match link.tls_info() {
                Some(t) => tracing::info!(
                    link = id,
                    %peer,
                    tls = %t.cipher_suite,
                    client = %t.peer.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
                    "link opened"
                ),
                None => tracing::info!(link = id, %peer, "link opened"),
            }
            // R13.7: a SIGHUP that de-listed this client while its link was
            // being made found no link to close; the new list is in force
            // before that scan, so this check sees it.
            if let Some(TlsConfig::Exit {
                clients: Some(list),
                ..
            }) = tls
            {
                let fp = link.tls_info().and_then(|t| t.peer);
                if fp.is_none_or(|fp| !list.read().contains(&fp)) {
                    tracing::info!(link = id, %peer, "client no longer listed: closing its new link");
                    // Its reader serves nothing: `cut` is in force first.
                    link.cut();
                }
            }
            link.run();
        }
        Err(e) => tracing::warn!(link = id, %peer, "cannot start the link: {e}"),
    }
}
