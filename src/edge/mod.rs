//! The two edges of a link: the [`client`] serves applications through
//! SOCKS and creates circuits; the [`exit`] accepts links and connects
//! streams to their targets.

pub mod client;
pub mod exit;
