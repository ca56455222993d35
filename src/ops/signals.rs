//! The signals a daemon answers (docs/operations.md, "Signals and
//! shutdown"), on the thread `signals` (SIGINT, Ctrl-C, comes through the
//! `ctrlc` crate's handler to the same place):
//!
//! | signal | what halfpipe does |
//! |---|---|
//! | SIGINT, SIGTERM | graceful shutdown; a second one exits at once |
//! | SIGHUP | re-read the config file, apply what can change live |
//! | SIGUSR1 | write the stream table to the log |
//! | SIGUSR2 | nothing (logged): reserved, and never fatal |
//!
//! Every other signal keeps its default on purpose: SIGQUIT dumps core,
//! SIGKILL and SIGSTOP cannot be caught, SIGPIPE is ignored by Rust's
//! runtime (a write to a reset socket is an error, not a death).

use crate::runtime::threads;
use signal_hook::consts::{SIGHUP, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::{Handle, Signals};
use std::io;
use std::thread::JoinHandle;

/// The signals `signals` handles; register them before anything starts,
/// so that an early one is queued, not fatal.
pub fn register() -> io::Result<Signals> {
    Signals::new([SIGTERM, SIGHUP, SIGUSR1, SIGUSR2])
}

/// What each signal does.
pub struct Actions {
    /// SIGTERM (and SIGINT through `ctrlc`): stop.
    pub terminate: Box<dyn Fn() + Send>,
    /// SIGHUP: reload.
    pub reload: Box<dyn Fn() + Send>,
    /// SIGUSR1: the stream table, for the log.
    pub table: Box<dyn Fn() -> String + Send>,
}

/// Starts `signals`; closing the returned handle ends it.
pub fn spawn(mut signals: Signals, actions: Actions) -> io::Result<(Handle, JoinHandle<()>)> {
    let handle = signals.handle();
    // SIGHUP parses the command line again (clap): a large stack.
    let thread = threads::spawn_with_stack("signals".into(), threads::LARGE_STACK, move || {
        for sig in signals.forever() {
            match sig {
                SIGTERM => (actions.terminate)(),
                SIGHUP => (actions.reload)(),
                SIGUSR1 => {
                    let t = (actions.table)();
                    tracing::info!("stream table (SIGUSR1):\n{}", t.trim_end());
                }
                SIGUSR2 => tracing::info!("SIGUSR2 ignored (SIGUSR1 writes the stream table)"),
                other => tracing::debug!("signal {other} ignored"),
            }
        }
    })?;
    Ok((handle, thread))
}
