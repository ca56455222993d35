//! A userspace TCP relay that delays every byte by a fixed time each way
//! (this kernel has no netem): the rtt scenario puts it on the link between
//! a halfpipe client and exit.
//!
//! Each direction of each connection is a reader thread and a writer
//! thread joined by a FIFO channel. The reader stamps each chunk with the
//! time it must leave (read time + delay); the writer sleeps until then and
//! writes it. One FIFO per direction keeps the bytes in order, and the
//! chunks in flight are bounded only by memory, so the relay adds latency
//! but no bandwidth-delay limit of its own (the rtt scenario checks that
//! by also running plain TCP through it). EOF travels as a half-close
//! after the bytes before it; a read error as a reset of the other side.

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What goes through a direction's FIFO, each stamped with its due time.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    Data(Vec<u8>),
    /// The reader saw EOF: half-close the other side.
    Eof,
    /// The reader failed: shut the other side down.
    Reset,
}

/// Chunks queued per direction before the reader waits (at most 64 KiB
/// each: up to 256 MiB in flight, far more than any bandwidth-delay product
/// on loopback).
const QUEUE: usize = 4096;
const READ: usize = 64 * 1024;

pub struct DelayRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

impl DelayRelay {
    /// Listens on an ephemeral loopback port and relays each connection to
    /// `upstream`, delaying both directions by `delay`.
    pub fn start(upstream: SocketAddr, delay: Duration) -> io::Result<DelayRelay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (stop, sockets, threads) = (stop.clone(), sockets.clone(), threads.clone());
            thread::Builder::new()
                .name("delay-accept".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(down) = conn else { continue };
                        let Ok(up) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let _ = down.set_nodelay(true);
                        let _ = up.set_nodelay(true);
                        let mut list = sockets.lock();
                        let mut hs = threads.lock();
                        for s in [&down, &up] {
                            if let Ok(c) = s.try_clone() {
                                list.push(c);
                            }
                        }
                        for (from, to) in [(&down, &up), (&up, &down)] {
                            if let (Ok(f), Ok(t)) = (from.try_clone(), to.try_clone()) {
                                hs.extend(direction(f, t, delay));
                            }
                        }
                    }
                })?
        };
        Ok(DelayRelay {
            addr,
            stop,
            sockets,
            threads,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // Shutting every socket down wakes every reader and writer.
        for s in self.sockets.lock().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for h in threads {
            let _ = h.join();
        }
    }
}

/// Starts the reader and writer of one direction.
fn direction(from: TcpStream, to: TcpStream, delay: Duration) -> Vec<JoinHandle<()>> {
    let (tx, rx) = bounded(QUEUE);
    let Ok(wake) = from.try_clone() else {
        return Vec::new();
    };
    let mut hs = Vec::new();
    let reader = thread::Builder::new()
        .name("delay-rd".into())
        .spawn(move || read_side(from, tx, delay));
    let writer = thread::Builder::new()
        .name("delay-wr".into())
        .spawn(move || {
            write_side(rx, to);
            // The other side is gone: wake our reader so it stops too.
            let _ = wake.shutdown(Shutdown::Read);
        });
    hs.extend(reader.ok());
    hs.extend(writer.ok());
    hs
}

fn read_side(mut from: impl Read, tx: Sender<(Instant, Chunk)>, delay: Duration) {
    loop {
        let mut buf = vec![0u8; READ];
        let chunk = match from.read(&mut buf) {
            Ok(0) => Chunk::Eof,
            Ok(n) => {
                buf.truncate(n);
                Chunk::Data(buf)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => Chunk::Reset,
        };
        let last = !matches!(chunk, Chunk::Data(_));
        if tx.send((Instant::now() + delay, chunk)).is_err() || last {
            return;
        }
    }
}

/// Writes each chunk at its due time, in order. Returns when the stream
/// ends or the other side fails.
fn write_side(rx: Receiver<(Instant, Chunk)>, to: TcpStream) {
    let mut out = &to;
    for (due, chunk) in rx {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        match chunk {
            Chunk::Data(d) => {
                if out.write_all(&d).is_err() {
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            Chunk::Eof => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Chunk::Reset => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FIFO hands chunks on in order, each no earlier than its due time.
    #[test]
    fn chunks_leave_in_order_after_their_delay() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (tx, rx) = bounded(QUEUE);
        let delay = Duration::from_millis(3);
        // Reads of many sizes from an in-memory reader.
        struct Jagged<'a>(&'a [u8], usize);
        impl Read for Jagged<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 = (self.1 * 31 + 7) % 5000 + 1;
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        read_side(Jagged(&data, 1), tx, delay);
        let mut got = Vec::new();
        let mut last_due = None;
        let mut ended = false;
        for (due, chunk) in rx {
            if let Some(d) = last_due {
                assert!(d <= due, "due times go backwards");
            }
            last_due = Some(due);
            match chunk {
                Chunk::Data(d) => got.extend_from_slice(&d),
                Chunk::Eof => ended = true,
                Chunk::Reset => panic!("reset"),
            }
        }
        assert!(ended);
        assert_eq!(got, data);
    }

    /// End to end over loopback: bytes both ways arrive intact and in
    /// order, and a half-close passes after the bytes before it.
    #[test]
    fn relay_keeps_order_and_half_close() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut r = s.try_clone().unwrap();
            io::copy(&mut r, &mut s).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        });
        let relay = DelayRelay::start(echo_addr, Duration::from_millis(1)).unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let writer = {
            let mut w = c.try_clone().unwrap();
            let data = data.clone();
            thread::spawn(move || {
                let mut off = 0;
                let mut step = 1;
                while off < data.len() {
                    step = (step * 17 + 3) % 70_000 + 1;
                    let end = (off + step).min(data.len());
                    w.write_all(&data[off..end]).unwrap();
                    off = end;
                }
                w.shutdown(Shutdown::Write).unwrap();
            })
        };
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        server.join().unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "bytes differ");
        drop(relay);
    }
}
