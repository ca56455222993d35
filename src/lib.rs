//! halfpipe: TCP streams over Tor-style circuits with real half-close.
//!
//! The protocol is in `protocol.md` (summarised in the README); the thread
//! design in `design.md`. Sans-IO core: [`cell`], [`relay`], [`halfclose`],
//! [`flow`], [`policy`], [`socks`], [`kdf`]. Threaded shell: [`link`],
//! [`circuit`], [`stream`], [`exit`], [`client`], [`daemon`], and what
//! their threads wait on: [`inbox`], [`monitor`], [`fairwindow`]. Live state
//! for people (`--status`, `halfpipe status`, SIGUSR1): [`status`],
//! [`metrics`]. The benchmark and comparison tools (`halfpipe bench`):
//! [`bench`].

pub mod batch;
pub mod bench;

pub mod circuit;
pub mod client;
pub mod config_file;
pub mod ctx;
pub mod daemon;
pub mod exit;
pub mod fairwindow;


pub mod inbox;

pub mod limits;
pub mod link;
#[cfg(all(test, loom))]
mod loom_check;
pub mod metrics;
pub mod monitor;

pub mod ratelimit;

pub mod sockets;

pub mod status;
pub mod stream;
pub mod sync;
pub mod threads;
