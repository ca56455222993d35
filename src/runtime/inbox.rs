//! A thread's inbox: a crossbeam channel whose receiver goes to sleep as
//! soon as it finds the channel empty, and whose senders wake it.
//!
//! Why not crossbeam's own blocking `recv`: it spins, then calls
//! `sched_yield` several times before it sleeps. On a busy machine each of
//! those yields is a context switch to another thread of the pipeline and
//! back. In a bulk transfer through client and exit, such yields by the
//! circuit threads, the link writers and the deliverers were a large part
//! of all the daemons' context switches (`perf record -e context-switches`).
//! Those three kinds of thread have nothing else to do while their inbox is
//! empty, so here they park at once and the sender that fills the inbox
//! unparks them: one futex wake, one context switch.
//!
//! The handshake between a receiver going to sleep and a sender is in
//! [`Bell`]: a sender queues, then rings; the receiver goes to sleep only
//! if nobody rang since it last looked at the queue, and a ring that finds
//! it asleep unparks it. So no message is left in the queue of a sleeping
//! receiver. The concurrency model check (`src/loom_check.rs`) runs `Bell`
//! under loom.

use crate::runtime::sync::{self, AtomicUsize, Mutex, Thread};
use crossbeam_channel::{Receiver, RecvTimeoutError, SendError, Sender, TryRecvError};
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A new inbox and its first sender. Unbounded, like the channel it wraps:
/// what bounds it is the flow-control windows (docs/design.md, invariants 1
/// and 2).
pub fn inbox<T>() -> (InboxTx<T>, Inbox<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let bell = Arc::new(Bell::new());
    (
        InboxTx {
            tx: Some(tx),
            bell: bell.clone(),
        },
        Inbox {
            rx,
            bell,
            _one_thread: PhantomData,
        },
    )
}

/// A sending half; clone it for every thread that sends.
pub struct InboxTx<T> {
    /// `Some` until dropped: dropping the last sender disconnects the
    /// channel, and the receiver must then be woken to see it.
    tx: Option<Sender<T>>,
    bell: Arc<Bell>,
}

impl<T> Clone for InboxTx<T> {
    fn clone(&self) -> Self {
        self.bell.senders.fetch_add(1, Ordering::Relaxed);
        InboxTx {
            tx: self.tx.clone(),
            bell: self.bell.clone(),
        }
    }
}

impl<T> InboxTx<T> {
    /// Queues `msg` (never blocks) and wakes the receiver if it sleeps.
    /// Fails only if the receiver is gone.
    pub fn send(&self, msg: T) -> Result<(), SendError<T>> {
        self.tx.as_ref().expect("present until drop").send(msg)?;
        self.bell.ring();
        Ok(())
    }
}

impl<T> Drop for InboxTx<T> {
    fn drop(&mut self) {
        drop(self.tx.take());
        // The last sender gone disconnects the channel: a sleeping receiver
        // must see that. Other senders come and go (a stream's copy of its
        // link's sender) without waking it.
        if self.bell.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.bell.ring();
        }
    }
}

/// The receiving half. Not `Sync`: one thread at a time waits on it (it
/// may be created on one thread and moved to another).
pub struct Inbox<T> {
    rx: Receiver<T>,
    bell: Arc<Bell>,
    _one_thread: PhantomData<std::cell::Cell<()>>,
}

impl<T> Inbox<T> {
    /// Takes the next message, sleeping while there is none; `Err` once
    /// every sender is gone and the inbox is empty.
    pub fn recv(&self) -> Result<T, crossbeam_channel::RecvError> {
        self.bell
            .wait(None, || self.poll())
            .expect("no deadline")
            .map_err(|_| crossbeam_channel::RecvError)
    }

    /// Like `recv`, but gives up at `deadline`.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvTimeoutError> {
        match self.bell.wait(Some(deadline), || self.poll()) {
            Some(Ok(m)) => Ok(m),
            Some(Err(())) => Err(RecvTimeoutError::Disconnected),
            None => Err(RecvTimeoutError::Timeout),
        }
    }

    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        self.rx.try_recv()
    }

    /// Messages until every sender is gone.
    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(|| self.recv().ok())
    }

    /// `Some(Ok)`: a message; `Some(Err)`: disconnected; `None`: empty.
    fn poll(&self) -> Option<Result<T, ()>> {
        match self.rx.try_recv() {
            Ok(m) => Some(Ok(m)),
            Err(TryRecvError::Disconnected) => Some(Err(())),
            Err(TryRecvError::Empty) => None,
        }
    }
}

/// The wake-up handshake between one sleeping receiver and its senders.
///
/// One atomic state, changed only by read-modify-write operations, so that
/// every change is ordered with every other and no fence is needed:
/// `AWAKE` (the receiver looks at the queue), `SLEEPING` (it found the
/// queue empty and parks, or is about to), `RUNG` (a sender queued since
/// the receiver last looked).
pub struct Bell {
    state: AtomicUsize,
    /// The receiving thread, recorded each time before it may sleep.
    /// Senders take this lock only after they saw `SLEEPING`.
    receiver: Mutex<Option<Thread>>,
    /// `InboxTx`es alive: only the last one's drop rings.
    senders: AtomicUsize,
}

const AWAKE: usize = 0;
const SLEEPING: usize = 1;
const RUNG: usize = 2;

impl Default for Bell {
    fn default() -> Bell {
        Bell::new()
    }
}

impl Bell {
    pub fn new() -> Bell {
        Bell {
            state: AtomicUsize::new(AWAKE),
            receiver: Mutex::new(None),
            senders: AtomicUsize::new(1),
        }
    }

    /// Sender side: call after the message (or the disconnection) is in
    /// the queue. Wakes the receiver if it sleeps.
    pub fn ring(&self) {
        // Release: the receiver that takes RUNG (or wakes on it) sees what
        // we queued before.
        if self.state.swap(RUNG, Ordering::AcqRel) == SLEEPING {
            if let Some(t) = self.receiver.lock().as_ref() {
                t.unpark();
            }
        }
    }

    /// Receiver side: returns the first `Some` that `poll` gives, sleeping
    /// between looks; `None` if `deadline` passes first.
    pub fn wait<R>(
        &self,
        deadline: Option<Instant>,
        mut poll: impl FnMut() -> Option<R>,
    ) -> Option<R> {
        // The thread to unpark is whichever waits now: an inbox may be
        // created on one thread and waited on by another, or moved.
        {
            let me = sync::current_thread();
            let mut receiver = self.receiver.lock();
            if receiver.as_ref().map(|t| t.id()) != Some(me.id()) {
                *receiver = Some(me);
            }
        }
        loop {
            // Take the rings so far (and see what they queued), then look.
            self.state.swap(AWAKE, Ordering::AcqRel);
            if let Some(r) = poll() {
                return Some(r);
            }
            // Sleep only if no sender rang since the swap above; if one
            // did, look again.
            if self
                .state
                .compare_exchange(AWAKE, SLEEPING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            while self.state.load(Ordering::Acquire) == SLEEPING {
                match deadline {
                    None => sync::park(),
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            // Leave SLEEPING, unless a ring came just now.
                            let _ = self.state.compare_exchange(
                                SLEEPING,
                                AWAKE,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                            return poll();
                        }
                        sync::park_timeout(d - now);
                    }
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn messages_arrive_in_order_across_threads() {
        let (tx, rx) = inbox();
        let sender = std::thread::spawn(move || {
            for i in 0..100_000u32 {
                tx.send(i).unwrap();
                if i % 1000 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let got: Vec<u32> = rx.iter().collect();
        sender.join().unwrap();
        assert_eq!(got, (0..100_000).collect::<Vec<_>>());
    }

    #[test]
    fn many_senders_lose_nothing() {
        let (tx, rx) = inbox();
        let senders: Vec<_> = (0..4u64)
            .map(|s| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        tx.send(s * 1_000_000 + i).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let mut got: Vec<u64> = rx.iter().collect();
        senders.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(got.len(), 80_000);
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 80_000, "a message arrived twice");
    }

    /// Waits (up to 10 s) until the receiver of `tx` is asleep.
    fn until_asleep<T>(tx: &InboxTx<T>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tx.bell.state.load(Ordering::Acquire) != SLEEPING {
            assert!(Instant::now() < deadline, "the receiver never slept");
            std::thread::yield_now();
        }
    }

    /// A receive that fails the test instead of hanging it.
    fn recv_10s<T: Send + 'static>(
        rx: Inbox<T>,
    ) -> std::thread::JoinHandle<Result<T, RecvTimeoutError>> {
        std::thread::spawn(move || rx.recv_deadline(Instant::now() + Duration::from_secs(10)))
    }

    #[test]
    fn a_sleeping_receiver_sees_the_last_sender_go() {
        let (tx, rx) = inbox::<u8>();
        let receiver = recv_10s(rx);
        until_asleep(&tx);
        drop(tx);
        assert_eq!(
            receiver.join().unwrap(),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn a_sleeping_receiver_is_woken_by_a_send() {
        let (tx, rx) = inbox::<u8>();
        let receiver = recv_10s(rx);
        until_asleep(&tx);
        tx.send(9).unwrap();
        assert_eq!(receiver.join().unwrap(), Ok(9));
    }

    #[test]
    fn only_the_last_sender_disconnects() {
        let (tx, rx) = inbox::<u8>();
        let other = tx.clone();
        drop(tx);
        assert_eq!(
            rx.recv_deadline(Instant::now() + Duration::from_millis(20)),
            Err(RecvTimeoutError::Timeout)
        );
        other.send(3).unwrap();
        assert_eq!(rx.recv(), Ok(3));
        // Moved to another thread after its first wait: still woken.
        let receiver = recv_10s(rx);
        until_asleep(&other);
        drop(other);
        assert_eq!(
            receiver.join().unwrap(),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn recv_deadline_times_out_then_still_receives() {
        let (tx, rx) = inbox();
        let start = Instant::now();
        assert_eq!(
            rx.recv_deadline(start + Duration::from_millis(30)),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
        tx.send(7).unwrap();
        assert_eq!(
            rx.recv_deadline(Instant::now() + Duration::from_secs(5)),
            Ok(7)
        );
        drop(tx);
        assert_eq!(
            rx.recv_deadline(Instant::now() + Duration::from_secs(5)),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn send_fails_once_the_receiver_is_gone() {
        let (tx, rx) = inbox();
        drop(rx);
        assert!(tx.send(1).is_err());
    }
}
