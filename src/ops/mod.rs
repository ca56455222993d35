//! Operations: the settings a process runs with ([`config`]), how much the
//! kernel lets it hold ([`limits`]), what it has done ([`metrics`]), and
//! what it is doing now, for people ([`status`]).

pub mod config;
pub mod limits;
pub mod metrics;
pub mod status;
