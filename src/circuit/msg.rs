//! What a circuit thread is told (its inbox): cells from its link, requests
//! from the client edge, and notices from its own streams' threads.

use crossbeam_channel::Sender;
use halfpipe_proto::relay::{Answer, Target};
use halfpipe_proto::socks::SocksVersion;
use socket2::Socket;
use std::time::Duration;

/// How long a client's RESOLVE waits for its RESOLVED: the SOCKS request
/// that asked gives up then, and the circuit forgets the RESOLVE.
pub const RESOLVE_WAIT: Duration = Duration::from_secs(30);

/// The circuit thread's inbox.
pub enum CircMsg {
    /// Whole RELAY cells from the link reader.
    Cells(Vec<u8>),
    /// The peer sent DESTROY (the link already forgot the CircID).
    Destroyed { reason: u8 },
    /// The link saw a violation that belongs to this circuit.
    Violation(String),
    /// The link is gone.
    LinkClosed,
    /// Shutdown deadline: END(HIBERNATING) every stream, then DESTROY.
    Hibernate,
    /// A stream thread has ended and can be joined.
    ThreadDone { stream_id: u16, serial: u64 },
    /// Client: open a stream for a SOCKS CONNECT.
    Open(OpenRequest),
    /// Client: resolve a name for a SOCKS RESOLVE.
    Resolve(ResolveRequest),
    /// Exit: a resolver thread has its answers (and is ending).
    ResolverDone {
        stream_id: u16,
        answers: Vec<Answer>,
    },
}

pub struct OpenRequest {
    pub socket: Socket,
    pub target: Target,
    pub socks: SocksVersion,
    /// Bytes the application sent after its SOCKS request (optimistic data).
    pub initial: Vec<u8>,
    /// Answered only on refusal, with the socket back; dropped on success.
    pub refused: Sender<(Socket, Refused)>,
}

/// Why a circuit gave a SOCKS request's socket back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The circuit holds all the streams it may (`--max-streams-per-circuit`,
    /// or no stream ID left): another circuit may take the request.
    Full,
    /// The circuit ended before it took the request: another may take it.
    Ended,
    /// A limit of the process (its stream slots, the source's fair share,
    /// threads): the request fails (SOCKS 0x01).
    Limit,
}

pub struct ResolveRequest {
    pub name: String,
    pub reply: Sender<Vec<Answer>>,
}
