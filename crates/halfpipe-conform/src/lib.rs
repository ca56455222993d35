//! halfpipe-conform: checks an implementation of docs/protocol.md from the
//! outside, through sockets only, case by case, each case naming the
//! requirements it checks. See docs/conformance.md.

pub mod case;
pub mod cases;
pub mod host;
pub mod link;
pub mod report;
pub mod runner;
pub mod socks;
pub mod spec;
pub mod subject;
pub mod targets;
pub mod tls;
