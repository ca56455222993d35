//! The link writer `link-wr N`: blocks on its queue and on write(), and
//! writes many cells per system call (on a TLS link, encrypted first, as
//! few records as fit them).

use super::tx::WriterMsg;
use super::Transport;
use crate::process::metrics::{Dir, Metrics, Tally};
use crate::runtime::inbox::Inbox;
use crate::runtime::monitor::Monitor;
use halfpipe_proto::cell::{self, cmd};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Queue messages the writer gathers into one writev().
const MAX_GATHER: usize = 64;

/// TCP keepalive on a link socket (`--keepalive`): probes after `period`
/// idle, then every `period` (at most a minute), 3 unanswered probes end
/// the connection. Failing to set it costs only the probes.
pub(super) fn set_tcp_keepalive(sock: &TcpStream, period: Duration) {
    let period = period.max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(period)
        .with_interval(period.min(Duration::from_secs(60)))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(sock).set_tcp_keepalive(&ka) {
        tracing::debug!("cannot set TCP keepalive on a link: {e}");
    }
}

/// The link writer: gathers queued cells into one writev() at a time. With
/// a `keepalive` period, a PADDING cell (docs/protocol.md §2) goes out when
/// nothing was written for that long.
pub(super) fn writer_loop(
    transport: &Transport,
    rx: Inbox<WriterMsg>,
    room: &Monitor<u32>,
    control_queued: &AtomicUsize,
    metrics: &Metrics,
    keepalive: Option<Duration>,
) {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(MAX_GATHER);
    // The sealing half of a TLS link.
    let mut records = transport.write_state();
    let mut tally = Tally::default();
    let result = (|| -> io::Result<()> {
        loop {
            let mut data_cells = 0;
            let mut control_bytes = 0;
            let mut close = None;
            let received = match keepalive {
                Some(period) => rx.recv_deadline(Instant::now() + period),
                None => rx
                    .recv()
                    .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
            };
            let mut next = match received {
                Ok(m) => Some(m),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let mut padding = Vec::with_capacity(cell::CELL_LEN);
                    cell::encode_fixed(&mut padding, 0, cmd::PADDING, &[]);
                    tally.link(padding.len(), 1);
                    transport.write(&[padding], &mut records)?;
                    metrics.add(Dir::Sent, &mut tally);
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Cells {
                        bytes,
                        data_cells: n,
                    } => {
                        data_cells += n;
                        if n == 0 {
                            control_bytes += bytes.len();
                            tally.scan_cells(&bytes);
                        } else {
                            // A packager's message holds its DATA cells only.
                            tally.data_cells(n);
                        }
                        tally.link(bytes.len(), bytes.len() / cell::CELL_LEN);
                        batch.push(bytes);
                    }
                    WriterMsg::Close => {
                        close = Some(Shutdown::Write);
                        break;
                    }
                    WriterMsg::Cut => {
                        close = Some(Shutdown::Both);
                        break;
                    }
                    WriterMsg::Flush => transport.flush(&mut records)?,
                }
                if batch.len() < MAX_GATHER {
                    next = rx.try_recv().ok();
                }
            }
            transport.write(&batch, &mut records)?;
            batch.clear();
            metrics.add(Dir::Sent, &mut tally);
            control_queued.fetch_sub(control_bytes, Ordering::AcqRel);
            if data_cells > 0 {
                room.update(|r| *r += data_cells);
            }
            if let Some(how) = close {
                // Everything queued before Close (Cut) is written: say so
                // with close_notify and FIN (and stop reading too).
                transport.close(how, &mut records)?;
                return Ok(());
            }
        }
    })();
    room.close();
    if let Err(e) = result {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            // SO_SNDTIMEO: no byte taken for --stall-timeout.
            tracing::warn!(
                "link peer has taken nothing for {:?} while cells wait: closing the link",
                transport
                    .tcp
                    .write_timeout()
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            );
        } else {
            tracing::debug!("link writer stopped: {e}");
        }
        // Wake the reader so that it tears the link down.
        transport.shutdown();
    }
}
