//! The halfpipe protocol without I/O: what `docs/protocol.md` says, as data
//! types and state machines. Nothing here starts a thread, opens a socket,
//! reads the clock or draws random numbers; the daemon (the `halfpipe`
//! crate) feeds these types events and carries out what they return.
//!
//! Codecs, which know bytes: [`cell`] (§1, §2), [`relay`] (§4, §5), [`kdf`]
//! (§3), [`socks`] (§11), [`identity`] (§13's fingerprints). Rules, which know states: [`halfclose`] (§7, §8),
//! [`flow`] (§10), [`congestion`] and [`xonxoff`] (§14's flow control
//! version 2), [`stream`] (one stream's §7 state and its flow control),
//! [`streammap`] (a circuit's streams: §4, §5, §9), [`policy`] (the exit
//! policy of §5).

pub mod cell;
pub mod congestion;
pub mod flow;
pub mod halfclose;
pub mod identity;
pub mod kdf;
pub mod policy;
pub mod relay;
pub mod socks;
pub mod stream;
pub mod streammap;
pub mod xonxoff;

/// Which edge of a link this side is (docs/protocol.md, "Conventions"): the
/// client opened the link and creates circuits, the exit accepted it and
/// connects streams to their targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Exit,
}
