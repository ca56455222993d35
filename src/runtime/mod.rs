//! Runtime primitives the threads are built from: what they wait on
//! ([`inbox`], [`monitor`], [`fairwindow`]), what they hand each other
//! ([`batch`]), how they are started and joined ([`threads`], and reused:
//! [`pool`]), how many of
//! a bounded resource are in use ([`semaphore`]), and the socket calls std
//! lacks ([`sockets`]). Nothing here knows a link, a
//! circuit or a stream.

pub mod batch;
pub mod fairwindow;
pub mod inbox;
pub mod monitor;
pub mod pool;
pub mod ratelimit;
pub mod semaphore;
pub mod sockets;
pub mod sync;
pub mod threads;
