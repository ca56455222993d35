//! A value guarded by a mutex with a condition variable: the one blocking
//! primitive of halfpipe besides channels and sockets.
//!
//! Packagers wait here for flow-control windows and for room in the link's
//! outbound queue (docs/design.md, invariant 3). Waits end when the condition
//! holds, when the monitor is closed (its circuit or link is gone), or when
//! the waiter's own cancel flag is set (its stream was aborted).
//!
//! Its lock and condition variable come from `crate::runtime::sync`: parking_lot's,
//! or loom's in the concurrency model check (`src/loom_check.rs`).

use crate::runtime::sync::{CancelFlag, Condvar, Mutex, MutexGuard};

/// Why a wait ended without its condition holding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    #[error("closed")]
    Closed,
    #[error("cancelled")]
    Cancelled,
}

pub struct Monitor<T> {
    inner: Mutex<Inner<T>>,
    cond: Condvar,
}

struct Inner<T> {
    value: T,
    closed: bool,
}

impl<T: Default> Default for Monitor<T> {
    fn default() -> Self {
        Monitor::new(T::default())
    }
}

impl<T> Monitor<T> {
    pub fn new(value: T) -> Self {
        Monitor {
            inner: Mutex::new(Inner {
                value,
                closed: false,
            }),
            cond: Condvar::new(),
        }
    }

    /// Blocks until `f` returns `Some`. `f` runs under the lock each time the
    /// value changes; it must not block.
    pub fn wait_until<R>(
        &self,
        cancel: &impl CancelFlag,
        mut f: impl FnMut(&mut T) -> Option<R>,
    ) -> Result<R, Stopped> {
        let mut inner = self.inner.lock();
        loop {
            if inner.closed {
                return Err(Stopped::Closed);
            }
            if cancel.is_set() {
                return Err(Stopped::Cancelled);
            }
            if let Some(r) = f(&mut inner.value) {
                return Ok(r);
            }
            self.cond.wait(&mut inner);
        }
    }

    /// Changes the value and wakes every waiter to look again.
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.update_waking_if(|v| (f(v), true))
    }

    /// Changes the value with `f`, which also says whether the change can
    /// end a wait; waiters are woken only then. For frequent changes that
    /// waiters mostly do not act on: waking a thread only to let it sleep
    /// again costs two context switches.
    pub fn update_waking_if<R>(&self, f: impl FnOnce(&mut T) -> (R, bool)) -> R {
        let (r, wake) = f(&mut self.inner.lock().value);
        if wake {
            self.cond.notify_all();
        }
        r
    }

    /// Reads or changes the value without waking anyone: for changes that
    /// no waiter waits for (counters, windows that only shrink).
    pub fn lock(&self) -> MonitorGuard<'_, T> {
        MonitorGuard(self.inner.lock())
    }

    /// Ends every current and future wait with `Stopped::Closed`.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.cond.notify_all();
    }

    /// Wakes every waiter so that it checks its cancel flag again. Taking
    /// the lock first means a waiter cannot miss the flag set before this.
    pub fn kick(&self) {
        let _guard = self.inner.lock();
        self.cond.notify_all();
    }
}

pub struct MonitorGuard<'a, T>(MutexGuard<'a, Inner<T>>);

impl<T> std::ops::Deref for MonitorGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0.value
    }
}

impl<T> std::ops::DerefMut for MonitorGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0.value
    }
}

// Real threads: not under loom, whose primitives work only inside a model.
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn wait_wakes_on_update_close_and_cancel() {
        let m = Arc::new(Monitor::new(0u32));
        let cancel = AtomicBool::new(false);
        let m2 = m.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            m2.update(|v| *v = 3);
        });
        let got = m.wait_until(&cancel, |v| (*v > 0).then_some(*v));
        assert_eq!(got, Ok(3));
        t.join().unwrap();

        let cancel = Arc::new(AtomicBool::new(false));
        let (m2, c2) = (m.clone(), cancel.clone());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c2.store(true, Ordering::Release);
            m2.kick();
        });
        assert_eq!(
            m.wait_until(&*cancel, |v| (*v > 10).then_some(())),
            Err(Stopped::Cancelled)
        );
        t.join().unwrap();

        let m2 = m.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            m2.close();
        });
        let never = AtomicBool::new(false);
        assert_eq!(
            m.wait_until(&never, |v| (*v > 10).then_some(())),
            Err(Stopped::Closed)
        );
        t.join().unwrap();
    }
}
