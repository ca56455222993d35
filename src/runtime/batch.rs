//! DATA for a deliverer, handed over without copying it.
//!
//! The link reader reads cells into a buffer and hands the whole buffer to
//! the circuit thread. The circuit thread used to copy each DATA cell's data
//! into a per-stream batch; on a bulk transfer that copy, and loading every
//! cell's data into its cache to make it, was most of its work, and one
//! circuit thread serves all the streams of its circuit. Now a
//! [`DataBatch`] names where each cell's data lies in the buffer it arrived
//! in; the deliverer copies them together and writes them (`contiguous`).
//!
//! Sharing a buffer keeps it alive until every deliverer that holds a part
//! of it has written that part, so a slow reader could pin memory it has
//! little data in. A stream therefore shares an arrival buffer only if its
//! data is at least half of the buffer's capacity; otherwise its data is
//! copied, as before. A buffer is thus shared by at most two streams, and
//! what a stalled stream pins is at most twice the data its window lets it
//! hold (docs/protocol.md §10; docs/design.md, invariant 7), plus the one
//! buffer its deliverer is writing from (whose written cells have already
//! earned their SENDMEs).

use std::io::{self, Write};
use std::sync::Arc;

/// The data of DATA cells of one stream, in arrival order.
#[cfg_attr(test, derive(Clone))]
pub struct DataBatch {
    /// The buffer the cells arrived in, or a copy of their data.
    buf: Arc<Vec<u8>>,
    /// Where each cell's data lies in `buf`: (start, length). R6.3: a DATA
    /// cell may carry no data; nothing is written for it, and it still
    /// counts for the windows (it is reported written with the cells
    /// around it).
    cells: Vec<(u32, u32)>,
}

/// Sizes only: the data is the application's.
impl std::fmt::Debug for DataBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataBatch")
            .field("cells", &self.cells())
            .field("bytes", &self.bytes())
            .field("buffer_capacity", &self.buf.capacity())
            .finish()
    }
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
        gather(buf, &cells)
    }

    /// Whether this batch keeps the arrival buffer `buf` alive.
    #[cfg(test)]
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
    /// cell is delivered once the kernel accepted its data). A short write
    /// is resumed where it stopped.
    pub fn write_to(
        self,
        mut w: impl Write,
        mut written: impl FnMut(u32, usize),
    ) -> io::Result<()> {
        let batch = self.contiguous();
        let (Some(&(start, _)), Some(&(last, last_len))) =
            (batch.cells.first(), batch.cells.last())
        else {
            return Ok(());
        };
        let data = &batch.buf[start as usize..(last + last_len) as usize];
        // Bytes written, and the first cell not wholly written.
        let mut off = 0usize;
        let mut next = 0;
        loop {
            let (mut done, mut bytes) = (0u32, 0usize);
            while let Some(&(at, len)) = batch.cells.get(next) {
                if (at + len - start) as usize > off {
                    break;
                }
                bytes += len as usize;
                done += 1;
                next += 1;
            }
            if done > 0 {
                written(done, bytes);
            }
            if next == batch.cells.len() {
                return Ok(());
            }
            match w.write(&data[off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The batch with its data in one piece, copied together if it is not,
    /// for one write(). A writev() of 500 pieces of 498 bytes costs the
    /// kernel about what the copy costs (profiled on a bulk run); one piece
    /// keeps the write loop simple. The deliverer makes the copy, not the
    /// circuit thread, which serves every stream of its circuit.
    fn contiguous(self) -> DataBatch {
        let joined = self.cells.windows(2).all(|p| p[0].0 + p[0].1 == p[1].0);
        if joined {
            self
        } else {
            gather(&self.buf, &self.cells)
        }
    }
}

/// A batch of its own holding a copy of the data of `cells` in `buf`, in
/// one piece.
fn gather(buf: &[u8], cells: &[(u32, u32)]) -> DataBatch {
    let bytes = cells.iter().map(|&(_, len)| len as usize).sum();
    let mut copy = Vec::with_capacity(bytes);
    let cells = cells
        .iter()
        .map(|&(at, len)| {
            let to = copy.len() as u32;
            copy.extend_from_slice(&buf[at as usize..(at + len) as usize]);
            (to, len)
        })
        .collect();
    DataBatch {
        buf: Arc::new(copy),
        cells,
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
            assert!(!buf.is_empty(), "no empty writes");
            self.calls += 1;
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
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

    fn write_all(batch: DataBatch, step: usize) -> (Trickle, Vec<(u32, usize)>) {
        let mut w = Trickle {
            step,
            got: Vec::new(),
            calls: 0,
        };
        let mut credits = Vec::new();
        batch.write_to(&mut w, |c, b| credits.push((c, b))).unwrap();
        (w, credits)
    }

    // The link reader hands on buffers of 256 KiB capacity that may be only
    // half full: what a stream's data is measured against is the capacity,
    // which is what a shared buffer keeps allocated.
    #[test]
    fn sharing_is_measured_against_the_buffer_capacity_from_half_of_it() {
        let (filled, cells) = arrival(10, |_| 498);
        let mut roomy = Vec::with_capacity(20 * 514);
        roomy.extend_from_slice(&filled);
        let roomy = Arc::new(roomy);
        assert!(roomy.capacity() >= 20 * 514);
        // All 10 cells' data (4,980 bytes) is under half of the capacity.
        assert!(!DataBatch::from_arrival(&roomy, cells.clone()).shares(&roomy));
        // Exactly half of the capacity shares; one byte less copies.
        let half = roomy.capacity() / 2;
        let at = cells[0].0;
        let exact = Arc::new(vec![0u8; roomy.capacity()]);
        assert_eq!(exact.capacity(), roomy.capacity());
        let whole = |len: usize| vec![(at, len as u32)];
        assert!(DataBatch::from_arrival(&exact, whole(half)).shares(&exact));
        assert!(!DataBatch::from_arrival(&exact, whole(half - 1)).shares(&exact));
    }

    #[test]
    fn a_writer_that_takes_nothing_is_an_error() {
        let (buf, cells) = arrival(2, |_| 498);
        let batch = DataBatch::from_arrival(&buf, cells);
        let mut w = Trickle {
            step: 0,
            got: Vec::new(),
            calls: 0,
        };
        let err = batch.write_to(&mut w, |_, _| {}).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
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
        let (w, credits) = write_all(batch.clone(), usize::MAX);
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
            let (w, credits) = write_all(batch.clone(), step);
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
        let (_, credits) = write_all(batch.clone(), 500);
        assert_eq!(credits, vec![(1, 498), (1, 498), (1, 498)]);
    }

    #[test]
    fn empty_cells_are_credited_without_a_write() {
        let (buf, cells) = arrival(3, |_| 0);
        let batch = DataBatch {
            buf: buf.clone(),
            cells,
        };
        let (w, credits) = write_all(batch.clone(), 1);
        assert_eq!((w.calls, credits), (0, vec![(3, 0)]));
    }

    #[test]
    fn shared_cells_are_written_in_one_piece() {
        let (buf, cells) = arrival(500, |_| 498);
        let batch = DataBatch::from_arrival(&buf, cells.clone());
        assert!(batch.shares(&buf));
        let (w, credits) = write_all(batch, usize::MAX);
        assert_eq!(w.got, expected(&cells));
        assert_eq!(w.calls, 1);
        assert_eq!(credits, vec![(500, 500 * 498)]);
    }
}
