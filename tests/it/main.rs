//! Integration tests: the real binary over real loopback sockets. Each test
//! names the protocol.md section it checks.

mod app;
mod faults;
mod hostile;
mod limits;
mod regression;
mod resolve;
mod smoke;
mod status;
mod util;
mod wire;
