//! A counting semaphore whose waits end at a deadline: how many of a
//! bounded resource (name lookups in flight) may be in use at once.

use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::time::Instant;

pub struct Semaphore {
    free: Mutex<usize>,
    freed: Condvar,
}

/// One unit taken; given back on drop.
pub struct Permit(Arc<Semaphore>);

impl Drop for Permit {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.freed.notify_one();
    }
}

impl Semaphore {
    pub fn new(units: usize) -> Arc<Semaphore> {
        Arc::new(Semaphore {
            free: Mutex::new(units),
            freed: Condvar::new(),
        })
    }

    /// Takes a unit, waiting for one until `deadline`; `None` if none came.
    pub fn acquire_until(self: &Arc<Self>, deadline: Instant) -> Option<Permit> {
        let mut free = self.free.lock();
        while *free == 0 {
            if self.freed.wait_until(&mut free, deadline).timed_out() && *free == 0 {
                return None;
            }
        }
        *free -= 1;
        Some(Permit(self.clone()))
    }

    /// Takes a unit if one is free now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.acquire_until(Instant::now())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn units_are_bounded_and_given_back() {
        let s = Semaphore::new(2);
        let a = s.try_acquire().expect("first");
        let _b = s.try_acquire().expect("second");
        assert!(s.try_acquire().is_none(), "no third");
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(s.acquire_until(soon).is_none(), "none by the deadline");
        drop(a);
        assert!(s.try_acquire().is_some(), "given back");
    }

    #[test]
    fn a_waiter_gets_the_unit_given_back() {
        let s = Semaphore::new(1);
        let held = s.try_acquire().unwrap();
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || {
                s.acquire_until(Instant::now() + Duration::from_secs(20))
                    .is_some()
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        assert!(waiter.join().unwrap());
    }
}
