//! Integration tests: the real binary over real loopback sockets. Each test
//! names the requirements of docs/protocol.md it checks.

mod app;
mod client;
mod faults;
mod flow2;
mod growth;
mod hostile;
mod limits;
mod netns;
mod regression;
mod resolve;
mod reuse;
mod smoke;
mod startup;
mod status;
mod tls;
mod util;
mod wire;
