//! DATA for a deliverer, handed over without copying it (issue 5).
//!
//! The link reader reads cells into a buffer and hands the whole buffer to
//! the circuit thread. The circuit thread used to copy each DATA cell's data
//! into a per-stream batch; on a bulk transfer that copy, and loading every
//! cell's data into its cache to make it, was most of its work. Now a
//! [`DataBatch`] names where each cell's data lies in the buffer it arrived
//! in, and the deliverer hands those pieces to one `writev()`.
//!
//! Sharing a buffer keeps it alive until every deliverer that holds a part
//! of it has written that part, so a slow reader could pin memory it has
//! little data in. A stream therefore shares an arrival buffer only if its
//! data is at least half of the buffer's capacity; otherwise its data is
//! copied, as before. A buffer is thus shared by at most two streams, and
//! what a stalled stream pins is at most twice the data its window lets it
//! hold (§10).

use std::io::{self, IoSlice, Write};
use std::sync::Arc;

/// Most pieces one `writev()` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// The data of DATA cells of one stream, in arrival order.
#[derive(Debug)]
pub struct DataBatch {
    /// The buffer the cells arrived in, or a copy of their data.
    buf: Arc<Vec<u8>>,
    /// Where each cell's data lies in `buf`: (start, length). A DATA cell
    /// may carry no data; it still counts for the windows (§10).
    cells: Vec<(u32, u32)>,
}

impl DataBatch {
    /// The batch for the cells whose data lies at `cells` in the arrival
    /// buffer `buf`: shares `buf`, or copies the data if this stream's part
    /// is under half of the buffer's capacity (module doc).
    pub fn from_arrival(buf: &Arc<Vec<u8>>, cells: Vec<(u32, u32)>) -> DataBatch {
        let bytes: usize = cells.iter().map(|&(_, len)| len as usize).sum();
        if bytes * 2 >= buf.capacity() {
            return DataBatch {
                buf: buf.clone(),
                cells,
            };
        }
        let mut copy = Vec::with_capacity(bytes);
        let mut owned = Vec::with_capacity(cells.len());
        for (start, len) in cells {
            owned.push((copy.len() as u32, len));
            copy.extend_from_slice(&buf[start as usize..(start + len) as usize]);
        }
        DataBatch {
            buf: Arc::new(copy),
            cells: owned,
        }
    }

    /// Whether this batch keeps the arrival buffer `buf` alive.
    pub fn shares(&self, buf: &Arc<Vec<u8>>) -> bool {
        Arc::ptr_eq(&self.buf, buf)
    }

    /// DATA cells in the batch.
    pub fn cells(&self) -> usize {
        self.cells.len()
    }

    /// Bytes of data in the batch.
    pub fn bytes(&self) -> usize {
        self.cells.iter().map(|&(_, len)| len as usize).sum()
    }

    /// Writes the whole batch to `w`, calling `written(cells, bytes)` each
    /// time the writer has accepted the data of more whole cells (§10: a
    /// cell is delivered once the kernel accepted its data). Adjacent pieces
    /// go as one; a short write is resumed where it stopped.
    pub fn write_to(
        &self,
        mut w: impl Write,
        mut written: impl FnMut(u32, usize),
    ) -> io::Result<()> {
        // The first cell not wholly written, and how much of it was.
        let mut next = 0;
        let mut partial = 0usize;
        let mut fresh = 0usize;
        loop {
            // Credit what the last write took to whole cells.
            let (mut done, mut bytes) = (0u32, 0usize);
            while let Some(&(_, len)) = self.cells.get(next) {
                let rest = len as usize - partial;
                if fresh < rest {
                    break;
                }
                fresh -= rest;
                partial = 0;
                bytes += len as usize;
                done += 1;
                next += 1;
            }
            partial += fresh;
            if done > 0 {
                written(done, bytes);
            }
            if next == self.cells.len() {
                return Ok(());
            }
            let slices = self.slices(next, partial);
            fresh = loop {
                match w.write_vectored(&slices) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            };
        }
    }

    /// Up to `IOV_MAX` pieces from cell `next` on (less the `partial` bytes
    /// of it already written), with adjacent cells' data merged.
    fn slices(&self, next: usize, partial: usize) -> Vec<IoSlice<'_>> {
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for (i, &(start, len)) in self.cells[next..].iter().enumerate() {
            let (start, end) = (start as usize, (start + len) as usize);
            let start = if i == 0 { start + partial } else { start };
            if start == end {
                continue;
            }
            let full = ranges.len() == IOV_MAX;
            match ranges.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ if full => break,
                _ => ranges.push((start, end)),
            }
        }
        ranges
            .into_iter()
            .map(|(s, e)| IoSlice::new(&self.buf[s..e]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, and keeps them.
    struct Trickle {
        step: usize,
        got: Vec<u8>,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            assert!(bufs.len() <= IOV_MAX);
            assert!(bufs.iter().all(|b| !b.is_empty()), "no empty pieces");
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.step - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// An arrival buffer of `n` cells of 514 bytes whose data (`len(i)`
    /// bytes at offset 16) is byte `i`, and where each cell's data lies.
    fn arrival(n: usize, len: impl Fn(usize) -> u32) -> (Arc<Vec<u8>>, Vec<(u32, u32)>) {
        let mut buf = Vec::with_capacity(n * 514);
        let mut cells = Vec::new();
        for i in 0..n {
            let start = buf.len() + 16;
            buf.resize(buf.len() + 514, 0xee);
            let l = len(i);
            buf[start..start + l as usize].fill(i as u8);
            cells.push((start as u32, l));
        }
        (Arc::new(buf), cells)
    }

    fn expected(cells: &[(u32, u32)]) -> Vec<u8> {
        cells
            .iter()
            .enumerate()
            .flat_map(|(i, &(_, l))| std::iter::repeat_n(i as u8, l as usize))
            .collect()
    }

    fn write_all(batch: &DataBatch, step: usize) -> (Trickle, Vec<(u32, usize)>) {
        let mut w = Trickle {
            step,
            got: Vec::new(),
            calls: 0,
        };
        let mut credits = Vec::new();
        batch.write_to(&mut w, |c, b| credits.push((c, b))).unwrap();
        (w, credits)
    }

    #[test]
    fn a_stream_with_most_of_the_buffer_shares_it() {
        let (buf, cells) = arrival(10, |_| 498);
        let batch = DataBatch::from_arrival(&buf, cells[..6].to_vec());
        assert!(batch.shares(&buf));
        assert_eq!((batch.cells(), batch.bytes()), (6, 6 * 498));
    }

    #[test]
    fn a_stream_with_little_of_the_buffer_gets_a_copy() {
        let (buf, cells) = arrival(10, |_| 498);
        let batch = DataBatch::from_arrival(&buf, cells[..4].to_vec());
        assert!(!batch.shares(&buf));
        assert_eq!(batch.buf.len(), 4 * 498, "only the data is copied");
        let (w, credits) = write_all(&batch, usize::MAX);
        assert_eq!(w.got, expected(&cells[..4]));
        assert_eq!(w.calls, 1, "a copy is one piece");
        assert_eq!(credits, vec![(4, 4 * 498)]);
    }

    #[test]
    fn every_byte_is_written_once_in_order_whatever_the_write_sizes() {
        // Cells of mixed lengths, some empty, split by writes of every
        // size from 1 byte to more than the whole.
        let (buf, cells) = arrival(40, |i| [498, 0, 1, 250, 497][i % 5]);
        let batch = DataBatch {
            buf: buf.clone(),
            cells: cells.clone(),
        };
        let total: usize = cells.iter().map(|c| c.1 as usize).sum();
        for step in [1, 2, 3, 249, 497, 498, 499, 1000, 4096, total, total + 1] {
            let (w, credits) = write_all(&batch, step);
            assert_eq!(w.got, expected(&cells), "write size {step}");
            let credited: u32 = credits.iter().map(|c| c.0).sum();
            let bytes: usize = credits.iter().map(|c| c.1).sum();
            assert_eq!((credited, bytes), (40, total), "write size {step}");
        }
    }

    #[test]
    fn a_cell_is_credited_only_once_its_last_byte_is_written() {
        let (buf, cells) = arrival(3, |_| 498);
        let batch = DataBatch::from_arrival(&buf, cells);
        // 500 bytes: cell 0 and 2 bytes of cell 1; then 500: cell 1 and 4
        // bytes of cell 2; then the rest of cell 2.
        let (_, credits) = write_all(&batch, 500);
        assert_eq!(credits, vec![(1, 498), (1, 498), (1, 498)]);
    }

    #[test]
    fn empty_cells_are_credited_without_a_write() {
        let (buf, cells) = arrival(3, |_| 0);
        let batch = DataBatch {
            buf: buf.clone(),
            cells,
        };
        let (w, credits) = write_all(&batch, 1);
        assert_eq!((w.calls, credits), (0, vec![(3, 0)]));
    }

    #[test]
    fn a_write_takes_at_most_iov_max_pieces() {
        // Cells are not adjacent (their headers lie between), so each is
        // its own piece: 1,500 cells need two writes at least.
        let (buf, cells) = arrival(1500, |_| 100);
        let batch = DataBatch::from_arrival(&buf, cells.clone());
        assert!(!batch.shares(&buf));
        let shared = DataBatch {
            buf: buf.clone(),
            cells: cells.clone(),
        };
        let (w, credits) = write_all(&shared, usize::MAX);
        assert_eq!(w.got, expected(&cells));
        assert_eq!(credits, vec![(1024, 102_400), (476, 47_600)]);
    }
}
