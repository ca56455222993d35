//! halfpipe: TCP streams over Tor-style circuits with real half-close, one
//! thread per unit of blocking work (docs/design.md).
//!
//! The protocol itself, without I/O, is the `halfpipe_proto` crate; this
//! crate is the threaded shell that feeds it events and carries out what it
//! returns. Its parts, from the bottom up:
//!
//! - [`runtime`]: what threads wait on and hand each other (inbox, monitor,
//!   fair window, data batches, named threads, socket helpers);
//! - [`process`]: what every thread of one process shares: its settings,
//!   its limits (from the kernel's), its counters;
//! - [`link`], [`circuit`], [`stream`]: the threads that carry cells
//!   (`link-rd`/`link-wr`, `circ L.C`, `pk C.S`/`dl C.S`);
//! - [`edge`]: the client (SOCKS) and exit (targets) edges;
//! - [`ops`]: for people: the config file, the status endpoint;
//! - [`daemon`]: both edges put together, and shut down.

pub mod circuit;
pub mod daemon;
pub mod edge;
pub mod fault;
pub mod link;
#[cfg(all(test, loom))]
mod loom_check;
pub mod ops;
pub mod process;
pub mod runtime;
pub mod stream;
