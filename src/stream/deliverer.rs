//! The deliverer `dl C.S`: writes the DATA the circuit hands it to the
//! stream's socket (docs/protocol.md §6), counts what the kernel took for
//! the stream SENDMEs (§10), shuts the write side after the peer's FIN
//! (§7), and on the client answers the SOCKS request first (§11).

use super::{DeliverMsg, ExitNotice, Side, Stream, Tid};
use crate::fault::{self, Fault};
use crate::runtime::inbox::Inbox;
use crate::runtime::sockets;
use crossbeam_channel::Receiver;
use crossbeam_channel::RecvTimeoutError;
use halfpipe_proto::halfclose::Event;
use halfpipe_proto::relay::end_reason;
use halfpipe_proto::socks;
use socket2::Socket;
use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// How a deliverer gets its socket.
pub enum DeliverStart {
    /// Exit: from the packager, once the target accepted.
    Exit(Receiver<Arc<Socket>>),
    /// Client: the SOCKS socket; the first message answers the SOCKS request,
    /// which waits for CONNECTED at most `begin_timeout` from the BEGIN.
    Client {
        sock: Arc<Socket>,
        socks: socks::SocksVersion,
        begin_timeout: Duration,
    },
}

pub fn deliverer(stream: Arc<Stream>, rx: Inbox<DeliverMsg>, start: DeliverStart) {
    let _notice = ExitNotice(&stream);
    let _tid = Tid::publish(&stream, Side::Deliverer);
    let sock = match start {
        // R5.15: while the exit connects, the DATA and FIN that arrive wait
        // in this thread's inbox, in arrival order, and are delivered once
        // the socket is here. The packager drops the sender if the connect
        // fails or is aborted: R5.16, what was held is discarded with the
        // inbox.
        DeliverStart::Exit(socket_rx) => match socket_rx.recv() {
            Ok(s) => s,
            Err(_) => return,
        },
        DeliverStart::Client {
            sock,
            socks,
            begin_timeout,
        } => {
            if !answer_socks(&stream, &rx, &sock, socks, begin_timeout) {
                return;
            }
            sock
        }
    };
    for msg in rx.iter() {
        match msg {
            DeliverMsg::Data(batch) => {
                // R6.4: written in arrival order; R10.7: cells count as
                // written once the kernel took their data.
                // The conformance kit's fault: counted by the circuit
                // thread as the batch came, not here as it is written.
                let on_receipt = fault::active(Fault::SendmeOnReceipt);
                let written = batch.write_to(&*sock, |cells, bytes| {
                    if !on_receipt {
                        stream.delivered(cells, bytes)
                    }
                });
                if let Err(e) = written {
                    if !stream.is_aborted() {
                        tracing::debug!(stream = %stream.name, "write error: {e}");
                        let _ = stream.handle(Event::Error {
                            reason: sockets::end_reason_for(&e),
                        });
                    }
                    return;
                }
            }
            DeliverMsg::Fin if fault::active(Fault::FinAsEnd) => {
                sockets::reset(&*sock);
                return;
            }
            DeliverMsg::Fin => {
                // R7.4, R7.5: every DATA before the FIN is written; now shut
                // our write side, and only that.
                if let Err(e) = sock.shutdown(Shutdown::Write) {
                    if !stream.is_aborted() {
                        let _ = stream.handle(Event::Error {
                            reason: sockets::end_reason_for(&e),
                        });
                    }
                }
                return;
            }
            DeliverMsg::Abort | DeliverMsg::Refused(_) => return,
            DeliverMsg::Connected(_) => {
                debug_assert!(false, "CONNECTED twice reaches the deliverer");
            }
        }
    }
}

/// Client: waits for CONNECTED or the end of the stream and writes the
/// SOCKS reply (R11.5: only after CONNECTED or END; R8.10: an END before
/// CONNECTED gets the failure its reason maps to). Returns whether the
/// stream goes on.
fn answer_socks(
    stream: &Stream,
    rx: &Inbox<DeliverMsg>,
    sock: &Socket,
    version: socks::SocksVersion,
    begin_timeout: Duration,
) -> bool {
    let deadline = stream.opened + begin_timeout;
    // The conformance kit's fault: success before CONNECTED (R11.5).
    let early = fault::active(Fault::SocksReplyBeforeConnected);
    if early {
        let mut s = sock;
        let _ = s.write_all(&socks::connect_reply(
            version,
            socks::Reply::Succeeded,
            None,
        ));
    }
    // Set when the exit has said nothing since our BEGIN: the link is
    // dropped once the application has its answer.
    let mut silent_exit = false;
    let answer = match rx.recv_deadline(deadline) {
        Err(RecvTimeoutError::Timeout) => {
            // No CONNECTED (nor END) in time: an error on the stream
            // (R8.3: END(TIMEOUT)), whose abort answers the request with
            // the failure for TIMEOUT (R11.11) through this inbox.
            tracing::info!(stream = %stream.name, target = %stream.target, "no CONNECTED within {begin_timeout:?}: END(TIMEOUT)");
            let _ = stream.handle(Event::Error {
                reason: end_reason::TIMEOUT,
            });
            silent_exit = !stream.link.heard_since(stream.opened);
            // The abort's Refused(TIMEOUT) follows; a CONNECTED that came
            // in just before it is for a stream that has ended.
            loop {
                match rx.recv() {
                    Ok(DeliverMsg::Connected(_)) => continue,
                    other => break other.map_err(|_| RecvTimeoutError::Disconnected),
                }
            }
        }
        other => other,
    };
    let (reply, go_on) = match answer {
        Ok(DeliverMsg::Connected(ip)) => {
            let bound = ip.map(|ip| SocketAddr::new(ip, 0));
            (
                socks::connect_reply(version, socks::Reply::Succeeded, bound),
                true,
            )
        }
        Ok(DeliverMsg::Refused(reason)) => (
            socks::connect_reply(version, socks::reply_for_end_reason(reason), None),
            false,
        ),
        // Aborted after a reset, or the circuit is gone: nothing to answer.
        _ => return false,
    };
    stream.metrics.socks_reply(&reply);
    let mut s = sock;
    let written = if early && go_on {
        Ok(())
    } else {
        s.write_all(&reply)
    };
    if silent_exit {
        // Nothing at all from the exit since our BEGIN: it has stopped
        // answering. Drop the link (after the answer: its teardown resets
        // the streams' sockets); the client dials again.
        tracing::warn!("the exit has said nothing for {begin_timeout:?}: closing the link");
        stream.link.cut();
    }
    if let Err(e) = written {
        if go_on && !stream.is_aborted() {
            let _ = stream.handle(Event::Error {
                reason: sockets::end_reason_for(&e),
            });
        }
        return false;
    }
    go_on
}
