//! Deliberate faults, compiled only into a build with `--features faults`
//! and chosen at start by `HALFPIPE_FAULT=<name>`: the conformance kit's
//! own tests (crates/halfpipe-conform/tests/faults.rs) prove with them that
//! its cases can fail. A normal build has none: `active` is then a
//! constant `false` and every fault's branch is compiled away.

/// One fault per family of mistakes an implementation of the protocol is
/// likely to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A received FIN resets the stream's connection instead of shutting
    /// down its write side (§7 read as §8).
    FinAsEnd,
    /// After sending FIN for the end of file it read, the edge ends the
    /// whole stream (half-close dropped after the first EOF).
    HalfCloseDroppedAfterEof,
    /// END closes the stream's connection normally instead of resetting it.
    EndAsCleanClose,
    /// A FIN for a recently closed stream destroys the circuit.
    LateCellsAreViolations,
    /// DATA that arrives while the exit connects is discarded.
    OptimisticDataDropped,
    /// The exit policy is checked on the name, before it is resolved.
    PolicyBeforeResolution,
    /// A link that never completes its handshake is kept open.
    NoHandshakeTimeout,
    /// The client answers a SOCKS CONNECT with success before CONNECTED.
    SocksReplyBeforeConnected,
    /// Stream SENDMEs count DATA as it arrives, not as it is written.
    SendmeOnReceipt,
    /// A packager whose stream window is 0 goes on reading and sending.
    NoWindowStop,
}

impl Fault {
    pub const ALL: [Fault; 10] = [
        Fault::FinAsEnd,
        Fault::HalfCloseDroppedAfterEof,
        Fault::EndAsCleanClose,
        Fault::LateCellsAreViolations,
        Fault::OptimisticDataDropped,
        Fault::PolicyBeforeResolution,
        Fault::NoHandshakeTimeout,
        Fault::SocksReplyBeforeConnected,
        Fault::SendmeOnReceipt,
        Fault::NoWindowStop,
    ];

    /// The name `HALFPIPE_FAULT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Fault::FinAsEnd => "fin-as-end",
            Fault::HalfCloseDroppedAfterEof => "half-close-dropped-after-eof",
            Fault::EndAsCleanClose => "end-as-clean-close",
            Fault::LateCellsAreViolations => "late-cells-are-violations",
            Fault::OptimisticDataDropped => "optimistic-data-dropped",
            Fault::PolicyBeforeResolution => "policy-before-resolution",
            Fault::NoHandshakeTimeout => "no-handshake-timeout",
            Fault::SocksReplyBeforeConnected => "socks-reply-before-connected",
            Fault::SendmeOnReceipt => "sendme-on-receipt",
            Fault::NoWindowStop => "no-window-stop",
        }
    }
}

/// Whether `fault` was chosen for this process.
#[cfg(feature = "faults")]
pub fn active(fault: Fault) -> bool {
    use std::sync::OnceLock;
    static CHOSEN: OnceLock<Option<Fault>> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| {
        let name = std::env::var("HALFPIPE_FAULT").ok()?;
        let f = Fault::ALL.into_iter().find(|f| f.name() == name);
        match f {
            Some(f) => tracing::warn!("fault injected: {}", f.name()),
            None => tracing::error!("HALFPIPE_FAULT={name} names no fault"),
        }
        f
    });
    *chosen == Some(fault)
}

/// Whether `fault` was chosen for this process: never, in this build.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub fn active(_fault: Fault) -> bool {
    false
}
