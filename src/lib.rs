//! halfpipe: TCP streams over Tor-style circuits with real half-close, one
//! thread per unit of blocking work (docs/design.md).
//!
//! The protocol itself, without I/O, is the `halfpipe_proto` crate; this
//! crate is the threaded shell that feeds it events and carries out what it
//! returns. Its parts, from the bottom up:
//!
//! - [`runtime`]: what threads wait on and hand each other (inbox, monitor,
//!   fair window, data batches, named threads, socket helpers);
//! - [`ops`]: settings, limits, counters and the live view for people
//!   (config file, kernel limits, metrics, status);
//! - [`ctx`]: what every thread of one process shares;
//! - [`link`], [`circuit`], [`stream`]: the threads that carry cells
//!   (`link-rd`/`link-wr`, `circ L.C`, `pk C.S`/`dl C.S`);
//! - [`edge`]: the client (SOCKS) and exit (targets) edges;
//! - [`daemon`]: both edges put together, and shut down.

pub mod circuit;
pub mod ctx;
pub mod daemon;
pub mod edge;
pub mod link;
#[cfg(all(test, loom))]
mod loom_check;
pub mod ops;
pub mod runtime;
pub mod stream;
