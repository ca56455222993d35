//! The packager `pk C.S`: reads the stream's socket into DATA cells while
//! the windows allow (docs/protocol.md §6, §10), sends FIN at EOF (§7) and
//! END on an error (§8). It is the only thread that waits for flow control
//! and for room in the link's queue (docs/design.md, invariant 3).

use super::{ExitNotice, Side, Stream, Tid};
use crate::edge::exit::connect::{self, ConnectError, Connecting};
use crate::fault::{self, Fault};
use crate::process::Ctx;
use crate::runtime::sockets;
use crossbeam_channel::Sender;
use halfpipe_proto::cell::{self, CELL_LEN};
use halfpipe_proto::halfclose::Event;
use halfpipe_proto::relay::{self, end_reason, relay_cmd};
use halfpipe_proto::stream::{Gone, Queued, StreamState};
use socket2::{MaybeUninitSlice, Socket};
use std::io;
use std::sync::Arc;
use std::time::Instant;

/// Offset of a DATA cell's data: link header [5] + relay header [11].
const DATA_OFFSET: usize = 5 + relay::HEADER_LEN;
/// Most cells one read() may fill (about 250 KiB: reads this large keep a
/// bulk stream's packager from spending its time in system calls).
pub const MAX_READ_CELLS: u32 = 512;
/// Cells a packager starts reading with; it doubles while reads come back
/// full, so an idle stream holds a small buffer and a bulk one a large one.
const FIRST_READ_CELLS: u32 = 8;

/// Why a packager stopped sending.
enum Stop {
    /// The stream closed or was aborted, or the circuit or link is gone.
    Ended,
}

/// The client's packager: the SOCKS socket is there from the start; the
/// bytes the application sent right after its SOCKS request are optimistic
/// data (§5) and go first.
pub fn client_packager(stream: Arc<Stream>, sock: Arc<Socket>, initial: Vec<u8>) {
    let _notice = ExitNotice(&stream);
    let _tid = Tid::publish(&stream, Side::Packager);
    // R6.2: no bytes, no DATA cell.
    if !initial.is_empty() {
        let (mut buf, cells) = frame_bytes(&stream, &initial);
        if send_cells(&stream, &mut buf, cells).is_err() {
            return stopped(&stream);
        }
    }
    package_loop(&stream, &sock);
}

/// The exit's packager: connect to the target (R5.3), answer CONNECTED or
/// END, hand the socket to the deliverer, then package.
pub fn exit_packager(stream: Arc<Stream>, ctx: Arc<Ctx>, give_socket: Sender<Arc<Socket>>) {
    let _notice = ExitNotice(&stream);
    let _tid = Tid::publish(&stream, Side::Packager);
    // A lookup that outlived the connect timeout: joined once the stream
    // has been answered.
    let mut lookup = None;
    let connected = connect::connect(&stream.target, &ctx, &*stream, &mut lookup);
    let (sock, addr) = match connected {
        Ok(ok) => ok,
        Err(ConnectError::Aborted) => return,
        Err(ConnectError::Refused(reason)) => {
            tracing::debug!(stream = %stream.name, target = %stream.target, "connect failed: END({})", end_reason::name(reason));
            // R5.5 to R5.12: answer END with the failure's reason; R5.16:
            // the optimistic data held for the stream is discarded.
            let _ = stream.handle(Event::Error { reason });
            if let Some(thread) = lookup {
                crate::runtime::threads::join(thread);
            }
            return;
        }
    };
    {
        let mut st = stream.state.lock();
        if st.hc.is_closed() {
            return; // aborted while connecting; the abort reset the socket
        }
        st.connected = true;
        // R5.4: CONNECTED with the address connected to and a TTL of 300.
        // R5.20: queued under the lock, so CONNECTED precedes the first DATA.
        stream.send_control(
            relay_cmd::CONNECTED,
            &relay::encode_connected(addr.ip(), 300),
        );
    }
    tracing::debug!(stream = %stream.name, target = %stream.target, peer = %addr, "connected");
    if give_socket.send(sock.clone()).is_err() {
        return;
    }
    drop(give_socket);
    package_loop(&stream, &sock);
}

/// What the exit's connect needs of the stream.
impl Connecting for Stream {
    fn publish(&self, sock: &Arc<Socket>) -> bool {
        let mut st = self.state.lock();
        if st.hc.is_closed() {
            return false;
        }
        st.socket = Some(sock.clone());
        true
    }

    fn aborted(&self) -> bool {
        self.is_aborted()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// §7 and §10: read the socket into DATA cells while the windows allow;
/// on EOF send FIN, on error END.
fn package_loop(stream: &Stream, sock: &Socket) {
    let mut read_cells = FIRST_READ_CELLS;
    loop {
        // The conformance kit's fault: no stop at a shut window (R10.8).
        if fault::active(Fault::NoWindowStop) && stream.state.lock().read_window().is_none() {
            let mut buf = Vec::with_capacity(read_cells as usize * CELL_LEN);
            if let Ok(1..) = read_into_cells(stream, sock, &mut buf, read_cells) {
                let _ = stream.link.send(buf);
                continue;
            }
        }
        // R10.8: a sender whose stream package window is 0 stops reading;
        // R10.9: a SENDME that opens it again wakes it (`Wake::Packager`).
        // R7.1: once we may no longer package, the wait ends with 0.
        let window = stream
            .state
            .wait_until(&stream.aborted, |st| StreamState::read_window(st));
        let window = match window {
            Ok(0) => return,
            Err(_) => return stopped(stream),
            Ok(w) => w,
        };
        let want = window.min(read_cells);
        let mut buf = Vec::with_capacity(want as usize * CELL_LEN);
        let n = match read_into_cells(stream, sock, &mut buf, want) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // R7.7: an error on the stream: END with the error's reason
                // (R8.2, R8.3, R8.6) and a reset (R8.7).
                if !stream.is_aborted() {
                    tracing::debug!(stream = %stream.name, "read error: {e}");
                    let _ = stream.handle(Event::Error {
                        reason: sockets::end_reason_for(&e),
                    });
                }
                return;
            }
        };
        // R6.2: a read of 0 bytes is the end of file, never an empty DATA.
        if n == 0 {
            // R7.2, R7.3: EOF → FIN after every DATA read before it (one
            // FIFO queue).
            let _ = stream.handle(Event::ReadEof);
            if fault::active(Fault::HalfCloseDroppedAfterEof) {
                let _ = stream.handle(Event::Error {
                    reason: relay::end_reason::MISC,
                });
            }
            return;
        }
        let cells = n.div_ceil(relay::DATA_MAX) as u32;
        read_cells = if cells == want {
            (read_cells * 2).min(MAX_READ_CELLS)
        } else {
            read_cells.min(cells.max(FIRST_READ_CELLS))
        };
        if send_cells(stream, &mut buf, cells).is_err() {
            return stopped(stream);
        }
    }
}

/// The packager cannot go on: its stream was aborted (nothing to do), or
/// its circuit or link is gone, which is an error on the stream (R8.6:
/// END(MISC)).
fn stopped(stream: &Stream) {
    if !stream.is_aborted() {
        let _ = stream.handle(Event::Error {
            reason: end_reason::MISC,
        });
    }
}

/// One readv() straight into the data slots of `want` cells in the spare
/// capacity of the empty `buf`, which must hold them. On success `buf` holds
/// the framed cells of the `n` bytes read (none on EOF), and `n` is returned:
/// R6.1, at most 498 bytes per cell, in the order they were read.
///
/// The buffer is not zeroed first: zeroing a quarter MiB per read is CPU
/// a bulk transfer can do without. Every byte of the
/// cells kept is written before `set_len`: the headers here, the data by
/// the kernel, and the last cell's padding with zeros.
fn read_into_cells(
    stream: &Stream,
    sock: &Socket,
    buf: &mut Vec<u8>,
    want: u32,
) -> io::Result<usize> {
    let len = want as usize * CELL_LEN;
    assert!(buf.is_empty() && buf.capacity() >= len);
    let spare = &mut buf.spare_capacity_mut()[..len];
    let mut slots: Vec<MaybeUninitSlice<'_>> = spare
        .chunks_exact_mut(CELL_LEN)
        .map(|c| MaybeUninitSlice::new(&mut c[DATA_OFFSET..DATA_OFFSET + relay::DATA_MAX]))
        .collect();
    let (n, _) = sock.recv_vectored(&mut slots)?;
    drop(slots);
    let cells = n.div_ceil(relay::DATA_MAX);
    for (i, c) in buf.spare_capacity_mut()[..cells * CELL_LEN]
        .chunks_exact_mut(CELL_LEN)
        .enumerate()
    {
        let data = (n - i * relay::DATA_MAX).min(relay::DATA_MAX);
        let mut head = [0u8; DATA_OFFSET];
        frame_header(stream, &mut head, data);
        for (dst, src) in c[..DATA_OFFSET].iter_mut().zip(head) {
            dst.write(src);
        }
        for b in &mut c[DATA_OFFSET + data..] {
            b.write(0);
        }
    }
    // SAFETY: the first `cells` cells are initialised: their headers and
    // padding were just written, and recv_vectored filled the first `n`
    // bytes of the data slots in order (socket2's contract for reads into
    // MaybeUninitSlice), which are the data of exactly those cells.
    unsafe { buf.set_len(cells * CELL_LEN) };
    Ok(n)
}

/// The link header and relay header of a DATA cell holding `len` bytes.
fn frame_header(stream: &Stream, head: &mut [u8], len: usize) {
    head[..4].copy_from_slice(&stream.wire_circ.to_be_bytes());
    head[4] = cell::cmd::RELAY;
    relay::write_header(&mut head[5..DATA_OFFSET], relay_cmd::DATA, stream.id, len);
}

/// Writes the link and relay headers of the cells holding `n` bytes of data,
/// and trims `buf` to those cells.
fn frame_cells(stream: &Stream, buf: &mut Vec<u8>, n: usize) {
    let cells = n.div_ceil(relay::DATA_MAX);
    buf.truncate(cells * CELL_LEN);
    for (i, c) in buf.chunks_exact_mut(CELL_LEN).enumerate() {
        let len = (n - i * relay::DATA_MAX).min(relay::DATA_MAX);
        frame_header(stream, &mut c[..DATA_OFFSET], len);
    }
}

/// DATA cells for bytes already in memory (the client's optimistic data).
fn frame_bytes(stream: &Stream, data: &[u8]) -> (Vec<u8>, u32) {
    let cells = data.len().div_ceil(relay::DATA_MAX);
    let mut buf = vec![0u8; cells * CELL_LEN];
    for (i, chunk) in data.chunks(relay::DATA_MAX).enumerate() {
        buf[i * CELL_LEN + DATA_OFFSET..i * CELL_LEN + DATA_OFFSET + chunk.len()]
            .copy_from_slice(chunk);
    }
    frame_cells(stream, &mut buf, data.len());
    (buf, cells as u32)
}

/// Queues `cells` framed DATA cells, as the circuit package window and the
/// link's queue allow (R10.8: no circuit window, no sending; docs/design.md,
/// invariant 3). The stream window was checked before reading, and only
/// this thread takes from it (R10.4).
fn send_cells(stream: &Stream, buf: &mut Vec<u8>, cells: u32) -> Result<(), Stop> {
    let mut sent = 0;
    while sent < cells {
        // R14.11: after the peer's XOFF not even what was read before it
        // goes out; XON wakes us (as a stream SENDME would).
        stream
            .state
            .wait_until(&stream.aborted, |st| (!st.held_back()).then_some(()))
            .map_err(|_| Stop::Ended)?;
        // §10: this packager's turn at the circuit window (`FairWindow`).
        let m = stream
            .circuit_window
            .take(cells - sent, &stream.aborted)
            .map_err(|_| Stop::Ended)?;
        if stream.link.reserve(m, &stream.aborted).is_err() {
            stream.circuit_window.update(|w| w.give_back(m));
            return Err(Stop::Ended);
        }
        let piece = if sent == 0 && m == cells {
            std::mem::take(buf)
        } else {
            buf[(sent * CELL_LEN as u32) as usize..((sent + m) * CELL_LEN as u32) as usize].to_vec()
        };
        let bytes: u64 = piece
            .chunks_exact(CELL_LEN)
            .map(|c| u64::from(u16::from_be_bytes([c[14], c[15]])))
            .sum();
        // Under the lock: an END decided by another thread cannot be
        // overtaken by this DATA (nothing is sent after END).
        let mut st = stream.state.lock();
        match st.queue_data(piece, m, bytes, Instant::now(), stream) {
            Ok(Queued::Sent) => {}
            Ok(Queued::MayNotPackage) => {
                drop(st);
                stream.circuit_window.update(|w| w.give_back(m));
                stream.link.unreserve(m);
                return Err(Stop::Ended);
            }
            Err(Gone) => return Err(Stop::Ended),
        }
        drop(st);
        stream.metrics.packaged(bytes, m);
        sent += m;
    }
    Ok(())
}
