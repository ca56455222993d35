//! Named threads and their owners (docs/design.md, "Threads" and
//! invariant 6).
//!
//! Every thread halfpipe starts has a name that `top -H` shows (Linux keeps
//! 15 bytes) and an owner that joins it. A spawn that fails is an ordinary
//! error the caller answers with the protocol's refusal, never a panic.

use std::io;
use std::thread::{self, JoinHandle};

/// Stack for stream and circuit threads. They keep their buffers on the
/// heap; the largest stack user is glibc's getaddrinfo in the exit's
/// packager, which needs well under this.
pub const SMALL_STACK: usize = 256 * 1024;

/// Stack for the one thread that parses the command line again (SIGHUP):
/// clap's parser, unoptimised in a debug build, needs more than a stream
/// thread's stack.
pub const LARGE_STACK: usize = 4 * 1024 * 1024;

/// Spawns a named thread with a small stack.
pub fn spawn<F, T>(name: String, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_with_stack(name, SMALL_STACK, f)
}

/// Spawns a named thread with a stack of `size` bytes.
pub fn spawn_with_stack<F, T>(name: String, size: usize, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // Linux shows the first 15 bytes; std passes the rest to logs only.
    thread::Builder::new().name(name).stack_size(size).spawn(f)
}

/// Joins a thread. A panic in it is a bug: it is logged with the thread's
/// name and not re-raised, so that a bug in one stream's thread takes down
/// that stream only.
pub fn join(handle: JoinHandle<()>) {
    let name = handle.thread().name().unwrap_or("unnamed").to_owned();
    if let Err(panic) = handle.join() {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".into());
        tracing::error!(thread = %name, "bug: thread panicked: {msg}");
    }
}

/// Threads whose owner is a long-lived loop (an acceptor): finished ones are
/// joined as the loop goes round, the rest when the owner ends.
#[derive(Default)]
pub struct Reaper {
    handles: Vec<JoinHandle<()>>,
}

impl Reaper {
    pub fn push(&mut self, handle: JoinHandle<()>) {
        self.handles.push(handle);
    }

    /// Joins the threads that have already finished.
    pub fn reap(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) =
            self.handles.drain(..).partition(|h| h.is_finished());
        self.handles = running;
        done.into_iter().for_each(join);
    }

    /// Joins every thread, blocking until all have ended.
    pub fn join_all(&mut self) {
        self.handles.drain(..).for_each(join);
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}
