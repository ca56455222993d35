//! Operations, for the people who run halfpipe: the config file that
//! mirrors the command line ([`config`]), and what the process is doing
//! now ([`status`]: the status endpoint, `halfpipe status`, SIGUSR1).

pub mod config;
pub mod http;
pub mod signals;
pub mod status;
