//! Parked threads that new streams take instead of spawning their own
//! (docs/design.md, "Thread reuse").
//!
//! A stream still has one packager and one deliverer thread while it lives;
//! what changes is where they come from. Starting an OS thread and joining
//! it costs tens of microseconds of CPU, several times per stream, on the
//! path from a SOCKS request to its first byte. A thread whose task is done
//! parks here instead; the next task wakes one, which renames itself (the
//! name `top -H`, `ps -L` and gdb show) and runs it. A parked thread that
//! waits longer than the idle time retires, and at most `max_parked` wait
//! at once.
//!
//! Ownership (design.md invariant 6) is split the same way: the owner of a
//! task joins the *task* ([`Task::join`], which returns once it has run),
//! and the pool owns the threads, joining each one that retires and all of
//! them at [`Pool::shutdown`].

use parking_lot::{Condvar, Mutex};
use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// What a parked thread is given: a task to run under a name.
struct Assignment {
    name: String,
    job: Job,
    done: Arc<Done>,
}

/// A task's end, for whoever joins it.
#[derive(Default)]
struct Done {
    /// `Some` once the task has run: `Err` with the panic message if it
    /// panicked.
    result: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
}

/// One pooled thread's mailbox.
struct Worker {
    next: Mutex<Mailbox>,
    cv: Condvar,
}

#[derive(Default)]
struct Mailbox {
    assignment: Option<Assignment>,
    /// Shutdown: leave once no assignment is waiting.
    retire: bool,
}

struct Inner {
    parked: Vec<Arc<Worker>>,
    /// Every thread the pool started and has not joined yet.
    threads: Vec<JoinHandle<()>>,
    stopping: bool,
}

pub struct Pool {
    inner: Mutex<Inner>,
    max_parked: usize,
    idle: Duration,
    /// Threads alive, parked or running a task.
    alive: AtomicUsize,
    /// Tasks that found a parked thread, and that needed a new one.
    reused: AtomicUsize,
    started: AtomicUsize,
}

/// What the pool has done, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    /// Threads alive, parked or running a task.
    pub alive: usize,
    /// Threads parked now.
    pub parked: usize,
    /// Tasks that started a thread, and tasks that took a parked one.
    pub started: usize,
    pub reused: usize,
}

/// A task given to the pool: its owner joins it.
pub struct Task {
    name: String,
    done: Arc<Done>,
}

impl Task {
    pub fn is_finished(&self) -> bool {
        self.done.result.lock().is_some()
    }

    /// Waits until the task has run. A panic in it is a bug: it is logged
    /// with the task's name and not re-raised (as `threads::join` does).
    pub fn join(self) {
        let mut r = self.done.result.lock();
        while r.is_none() {
            self.done.cv.wait(&mut r);
        }
        if let Some(Err(msg)) = r.take() {
            tracing::error!(thread = %self.name, "bug: thread panicked: {msg}");
        }
    }
}

impl Pool {
    /// A pool that keeps at most `max_parked` threads waiting, each for
    /// at most `idle`.
    pub fn new(max_parked: usize, idle: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            inner: Mutex::new(Inner {
                parked: Vec::new(),
                threads: Vec::new(),
                stopping: false,
            }),
            max_parked,
            idle,
            alive: AtomicUsize::new(0),
            reused: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on a parked thread renamed `name`, or on a new thread of
    /// that name if none is parked. Fails as `thread::spawn` does when no
    /// thread is parked and none can be started.
    pub fn spawn<F>(self: &Arc<Self>, name: String, f: F) -> io::Result<Task>
    where
        F: FnOnce() + Send + 'static,
    {
        let done = Arc::new(Done::default());
        let task = Task {
            name: name.clone(),
            done: done.clone(),
        };
        let assignment = Assignment {
            name,
            job: Box::new(f),
            done,
        };
        let mut g = self.inner.lock();
        if g.stopping {
            return Err(io::Error::other("shutting down"));
        }
        // Threads that retired since are joined below (they have ended or
        // are about to).
        let (ended, running): (Vec<_>, Vec<_>) = g.threads.drain(..).partition(|h| h.is_finished());
        g.threads = running;
        let result = match g.parked.pop() {
            Some(w) => {
                drop(g);
                self.reused.fetch_add(1, Ordering::Relaxed);
                w.next.lock().assignment = Some(assignment);
                w.cv.notify_one();
                Ok(task)
            }
            None => {
                let pool = self.clone();
                let worker = Arc::new(Worker {
                    next: Mutex::new(Mailbox::default()),
                    cv: Condvar::new(),
                });
                // std's name of the thread stays "pool" (it cannot change);
                // what the kernel shows is set per task. (No tracing span
                // per task: tracing-subscriber's registry allows at most
                // 4,096 threads with spans at once, and a stream thread
                // must not panic on the 4,097th.) Started under the lock,
                // so that `shutdown` cannot miss its handle.
                // Counted alive first: the thread may run its task and
                // retire before this one carries on.
                self.alive.fetch_add(1, Ordering::Relaxed);
                match super::threads::spawn("pool".into(), move || pool.work(worker, assignment)) {
                    Ok(handle) => {
                        g.threads.push(handle);
                        drop(g);
                        self.started.fetch_add(1, Ordering::Relaxed);
                        Ok(task)
                    }
                    Err(e) => {
                        self.alive.fetch_sub(1, Ordering::Relaxed);
                        Err(e)
                    }
                }
            }
        };
        ended.into_iter().for_each(super::threads::join);
        result
    }

    /// A pooled thread's life: run the assignment, park, run the next...
    fn work(self: Arc<Self>, me: Arc<Worker>, first: Assignment) {
        let mut next = Some(first);
        while let Some(a) = next.take() {
            set_os_name(&a.name);
            let result = panic::catch_unwind(AssertUnwindSafe(a.job)).map_err(panic_message);
            *a.done.result.lock() = Some(result);
            a.done.cv.notify_all();
            set_os_name("parked");
            next = self.park(&me);
        }
        self.alive.fetch_sub(1, Ordering::Relaxed);
    }

    /// Waits for the next assignment; `None` to retire (idle too long, the
    /// pool is full of parked threads, or shutting down).
    fn park(&self, me: &Arc<Worker>) -> Option<Assignment> {
        {
            let mut g = self.inner.lock();
            if g.stopping || g.parked.len() >= self.max_parked {
                return None;
            }
            g.parked.push(me.clone());
        }
        let mut next = me.next.lock();
        loop {
            if let Some(a) = next.assignment.take() {
                return Some(a);
            }
            if next.retire {
                return None;
            }
            if me.cv.wait_for(&mut next, self.idle).timed_out() && next.assignment.is_none() {
                // Still parked: nobody can give us work once we leave the
                // list. Not parked: `spawn` took us and is about to hand
                // the task over, so wait for it.
                let mut g = self.inner.lock();
                if let Some(i) = g.parked.iter().position(|w| Arc::ptr_eq(w, me)) {
                    g.parked.swap_remove(i);
                    return None;
                }
            }
        }
    }

    pub fn counts(&self) -> PoolCounts {
        PoolCounts {
            alive: self.alive.load(Ordering::Relaxed),
            parked: self.inner.lock().parked.len(),
            started: self.started.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
        }
    }

    /// Retires every parked thread and joins every thread: once the owners
    /// of all tasks have joined them, this returns at once.
    pub fn shutdown(&self) {
        let (parked, threads) = {
            let mut g = self.inner.lock();
            g.stopping = true;
            (
                std::mem::take(&mut g.parked),
                std::mem::take(&mut g.threads),
            )
        };
        for w in parked {
            w.next.lock().retire = true;
            w.cv.notify_one();
        }
        threads.into_iter().for_each(super::threads::join);
    }
}

/// Sets the calling thread's name as the kernel shows it (`top -H`,
/// `ps -L`, gdb, /proc/self/task/TID/comm): at most 15 bytes.
fn set_os_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes from the pointer, and `buf` is 16 bytes ending in NUL.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    fn os_name() -> String {
        std::fs::read_to_string("/proc/thread-self/comm")
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn a_parked_thread_runs_the_next_task_under_its_name() {
        let pool = Pool::new(4, Duration::from_secs(10));
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        pool.spawn("pk 1.1".into(), move || {
            t.send((os_name(), thread::current().id())).unwrap()
        })
        .unwrap()
        .join();
        let (first, id1) = rx.recv().unwrap();
        assert_eq!(first, "pk 1.1");
        // The thread parks after its task; wait until it has.
        while pool.counts().parked == 0 {
            thread::sleep(Duration::from_millis(1));
        }
        pool.spawn("dl 2.7".into(), move || {
            tx.send((os_name(), thread::current().id())).unwrap()
        })
        .unwrap()
        .join();
        let (second, id2) = rx.recv().unwrap();
        assert_eq!(second, "dl 2.7", "renamed for its new task");
        assert_eq!(id1, id2, "the same thread");
        assert_eq!(pool.counts().started, 1, "one thread started");
        pool.shutdown();
        assert_eq!(pool.counts().alive, 0);
    }

    #[test]
    fn idle_threads_retire_and_at_most_max_parked_wait() {
        let pool = Pool::new(2, Duration::from_millis(50));
        let tasks: Vec<Task> = (0..5)
            .map(|i| {
                pool.spawn(format!("t {i}"), || {
                    thread::sleep(Duration::from_millis(20))
                })
                .unwrap()
            })
            .collect();
        tasks.into_iter().for_each(Task::join);
        // Five threads ran at once; two may park, the rest retire.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.counts().alive > 2 {
            assert!(std::time::Instant::now() < deadline, "{:?}", pool.counts());
            thread::sleep(Duration::from_millis(5));
        }
        // The idle time passes: the parked ones retire too.
        while pool.counts().alive > 0 {
            assert!(std::time::Instant::now() < deadline, "{:?}", pool.counts());
            thread::sleep(Duration::from_millis(5));
        }
        pool.shutdown();
    }

    #[test]
    fn a_panicking_task_is_reported_and_its_thread_carries_on() {
        let pool = Pool::new(1, Duration::from_secs(10));
        let t = pool.spawn("bad".into(), || panic!("on purpose")).unwrap();
        while !t.is_finished() {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(matches!(*t.done.result.lock(), Some(Err(ref m)) if m == "on purpose"));
        t.join();
        while pool.counts().parked == 0 {
            thread::sleep(Duration::from_millis(1));
        }
        pool.spawn("good".into(), || {}).unwrap().join();
        assert_eq!(pool.counts().started, 1, "the same thread ran both");
        pool.shutdown();
    }

    #[test]
    fn shutdown_joins_parked_threads() {
        let pool = Pool::new(8, Duration::from_secs(60));
        let tasks: Vec<Task> = (0..4)
            .map(|i| pool.spawn(format!("t {i}"), || {}).unwrap())
            .collect();
        tasks.into_iter().for_each(Task::join);
        pool.shutdown();
        assert_eq!(pool.counts().alive, 0, "every thread ended");
        assert!(pool.inner.lock().threads.is_empty());
    }
}
