//! The circuit package window as the packagers of a circuit's streams share
//! it (docs/protocol.md §10; on a version 2 circuit the congestion window,
//! §14): cells go to the waiting packagers in turn,
//! first come first served, and each turn wakes one packager only.
//!
//! Why: with hundreds of streams on one circuit, a window that woke every
//! waiting packager for each SENDME's 100 cells let the ones already running
//! win again and again, and some streams got no cell for a long time (found
//! by the soak, docs/robustness.md). Handing out turns under that same
//! wake-everyone scheme cost a wake-up of every waiter per turn and stalled
//! the circuit.
//! Here each waiter parks its own thread, and only the first in line is
//! unparked when it can take cells.

use crate::runtime::monitor::Stopped;
use halfpipe_proto::congestion::SendWindow;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, Thread};

pub struct FairWindow {
    inner: Mutex<Inner>,
}

struct Inner {
    window: SendWindow,
    /// Waiting packagers, first in line first.
    line: VecDeque<(u64, Thread)>,
    next_ticket: u64,
    closed: bool,
}

impl Inner {
    /// Wakes the first in line if it can take cells now.
    fn wake_first(&self) {
        if self.window.value() > 0 {
            if let Some((_, t)) = self.line.front() {
                t.unpark();
            }
        }
    }

    fn leave(&mut self, ticket: u64) {
        self.line.retain(|(t, _)| *t != ticket);
        self.wake_first();
    }
}

impl FairWindow {
    pub fn new(window: SendWindow) -> FairWindow {
        FairWindow {
            inner: Mutex::new(Inner {
                window,
                line: VecDeque::new(),
                next_ticket: 0,
                closed: false,
            }),
        }
    }

    /// Waits for this packager's turn and an open window, then takes up to
    /// `wanted` cells. Ends early when the window is closed (the circuit is
    /// gone) or `cancel` is set (the stream was aborted; `kick` wakes it).
    pub fn take(&self, wanted: u32, cancel: &AtomicBool) -> Result<u32, Stopped> {
        let mut g = self.inner.lock();
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        g.line.push_back((ticket, thread::current()));
        loop {
            if g.closed {
                g.leave(ticket);
                return Err(Stopped::Closed);
            }
            if cancel.load(Ordering::Acquire) {
                g.leave(ticket);
                return Err(Stopped::Cancelled);
            }
            // R10.8: while the circuit package window is 0, no packager of
            // the circuit sends (R10.9: the SENDME's `update` wakes one);
            // R14.5: nor while the congestion window is full.
            let first = g.line.front().map(|(t, _)| *t) == Some(ticket);
            if first && g.window.value() > 0 {
                let took = g.window.take(wanted, std::time::Instant::now());
                g.line.pop_front();
                g.wake_first();
                return Ok(took);
            }
            // An unpark between the unlock and park() is not lost: park
            // returns at once. Spurious returns just loop.
            drop(g);
            thread::park();
            g = self.inner.lock();
        }
    }

    /// Changes the window (a SENDME, cells given back) and wakes the first
    /// in line if it can now take cells.
    pub fn update<R>(&self, f: impl FnOnce(&mut SendWindow) -> R) -> R {
        let mut g = self.inner.lock();
        let r = f(&mut g.window);
        g.wake_first();
        r
    }

    /// Wakes every waiter to look at its cancel flag (an abort).
    pub fn kick(&self) {
        for (_, t) in &self.inner.lock().line {
            t.unpark();
        }
    }

    /// Ends every current and future wait with `Stopped::Closed`.
    pub fn close(&self) {
        let mut g = self.inner.lock();
        g.closed = true;
        for (_, t) in &g.line {
            t.unpark();
        }
    }

    pub fn value(&self) -> u32 {
        self.inner.lock().window.value()
    }

    /// The congestion window's cwnd, inflight and smoothed round trip, on
    /// a version 2 circuit (for status).
    pub fn congestion(&self) -> Option<(u32, u32, Option<std::time::Duration>)> {
        let g = self.inner.lock();
        g.window
            .congestion()
            .map(|c| (c.cwnd(), c.inflight(), c.ewma_rtt()))
    }
}

// docs/protocol.md §10: the circuit package window is shared by the circuit's
// streams; a SENDME's cells go to the waiting packagers in turn.
#[cfg(test)]
mod tests {
    use super::*;
    use halfpipe_proto::congestion::Flow;
    use std::sync::Arc;
    use std::time::Duration;
    use std::time::Instant;

    fn waiter(w: &Arc<FairWindow>, wanted: u32) -> thread::JoinHandle<Result<u32, Stopped>> {
        let w = w.clone();
        thread::spawn(move || w.take(wanted, &AtomicBool::new(false)))
    }

    /// Waits (up to 10 s) until `n` packagers are in line.
    fn line_of(w: &FairWindow, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while w.inner.lock().line.len() != n {
            assert!(std::time::Instant::now() < deadline, "never {n} in line");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn turns_go_in_arrival_order() {
        let w = Arc::new(FairWindow::new(SendWindow::new(Flow::V1)));
        assert_eq!(w.take(1000, &AtomicBool::new(false)), Ok(1000));
        let a = waiter(&w, 100);
        line_of(&w, 1);
        let b = waiter(&w, 100);
        line_of(&w, 2);
        // One SENDME: 100 cells, all to the first in line.
        w.update(|p| p.on_sendme(Instant::now())).unwrap();
        assert_eq!(a.join().unwrap(), Ok(100));
        line_of(&w, 1);
        assert_eq!(w.value(), 0);
        w.update(|p| p.on_sendme(Instant::now())).unwrap();
        assert_eq!(b.join().unwrap(), Ok(100));
    }

    #[test]
    fn what_the_first_leaves_goes_to_the_next() {
        let w = Arc::new(FairWindow::new(SendWindow::new(Flow::V1)));
        assert_eq!(w.take(1000, &AtomicBool::new(false)), Ok(1000));
        let a = waiter(&w, 30);
        line_of(&w, 1);
        let b = waiter(&w, 500);
        line_of(&w, 2);
        w.update(|p| p.on_sendme(Instant::now())).unwrap();
        assert_eq!(a.join().unwrap(), Ok(30));
        assert_eq!(b.join().unwrap(), Ok(70));
    }

    #[test]
    fn cancel_and_close_end_the_wait_and_pass_the_turn_on() {
        let w = Arc::new(FairWindow::new(SendWindow::new(Flow::V1)));
        assert_eq!(w.take(1000, &AtomicBool::new(false)), Ok(1000));
        let cancel = Arc::new(AtomicBool::new(false));
        let a = {
            let (w, cancel) = (w.clone(), cancel.clone());
            thread::spawn(move || w.take(10, &cancel))
        };
        line_of(&w, 1);
        let b = waiter(&w, 10);
        line_of(&w, 2);
        cancel.store(true, Ordering::Release);
        w.kick();
        assert_eq!(a.join().unwrap(), Err(Stopped::Cancelled));
        w.update(|p| p.give_back(5));
        assert_eq!(b.join().unwrap(), Ok(5));
        let c = waiter(&w, 10);
        line_of(&w, 1);
        w.close();
        assert_eq!(c.join().unwrap(), Err(Stopped::Closed));
        assert_eq!(w.take(1, &AtomicBool::new(false)), Err(Stopped::Closed));
    }
}
