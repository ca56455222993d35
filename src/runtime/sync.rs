//! The lock and condition variable `Monitor` is built on, behind one
//! parking_lot-like API: parking_lot's in the daemon, loom's in the
//! concurrency model check (`src/loom_check.rs`, built with
//! `RUSTFLAGS="--cfg loom"`), so that loom explores every interleaving of
//! the real `Monitor` code. The same goes for the atomics and the thread
//! parking of `inbox::Bell`.

#[cfg(not(all(test, loom)))]
pub use parking_lot::{Condvar, Mutex, MutexGuard};
#[cfg(not(all(test, loom)))]
pub use std::sync::atomic::AtomicUsize;
#[cfg(not(all(test, loom)))]
pub use std::thread::{current as current_thread, park, park_timeout, Thread};

#[cfg(all(test, loom))]
pub use self::model::{Condvar, Mutex, MutexGuard};
#[cfg(all(test, loom))]
pub use loom::sync::atomic::AtomicUsize;
#[cfg(all(test, loom))]
pub use loom::thread::{current as current_thread, park, Thread};

/// loom has no timed park; a timed park may return early anyway, so here
/// it returns at once. (The model checks use untimed waits only.)
#[cfg(all(test, loom))]
pub fn park_timeout(_: std::time::Duration) {
    loom::thread::yield_now();
}

/// A flag that ends a wait once set (a stream's `aborted`): std's
/// `AtomicBool` in the daemon, loom's as well in the model check.
pub trait CancelFlag {
    fn is_set(&self) -> bool;
}

impl CancelFlag for std::sync::atomic::AtomicBool {
    fn is_set(&self) -> bool {
        self.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(all(test, loom))]
impl CancelFlag for loom::sync::atomic::AtomicBool {
    fn is_set(&self) -> bool {
        self.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(all(test, loom))]
mod model {
    use std::ops::{Deref, DerefMut};

    pub struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().expect("poisoned")))
        }
    }

    /// Always `Some` except inside `Condvar::wait`, which hands loom's guard
    /// to loom's wait and takes it back (parking_lot waits on `&mut guard`).
    pub struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0.as_deref().expect("guard held")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_deref_mut().expect("guard held")
        }
    }

    #[derive(Default)]
    pub struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub fn new() -> Self {
            Condvar(loom::sync::Condvar::new())
        }

        pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let g = guard.0.take().expect("guard held");
            guard.0 = Some(self.0.wait(g).expect("poisoned"));
        }

        pub fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}
