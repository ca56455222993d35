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
    /// Client: a circuit that was created but is not needed (another
    /// request created the same isolation circuit first): DESTROY(FINISHED).
    Unneeded,
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
    pub refused: Sender<Socket>,
}

pub struct ResolveRequest {
    pub name: String,
    pub reply: Sender<Vec<Answer>>,
}
