//! The link reader `link-rd N`: blocks only on its socket and owns the link
//! (docs/design.md, invariant 1). It hands RELAY cells to their circuits,
//! answers the link-level cells of docs/protocol.md §2 and §3, starts the
//! circuits, and joins them when the link ends.

use super::table::{CircSlot, CircTable};
use super::tx::{Gate, WriterMsg};
use super::{nonce, Link};
use crate::circuit::msg::CircMsg;
use crate::circuit::{Circuit, CircuitOpts};
use crate::process::metrics::{Dir, ViolationKind};
use crate::runtime::inbox::{self, InboxTx};
use crate::runtime::threads;
use halfpipe_proto::cell::{self, cmd, destroy_reason};
use halfpipe_proto::congestion::{self, Flow};
use halfpipe_proto::kdf;
use halfpipe_proto::Role;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes the link reader asks for per read(): large reads are what keeps
/// a busy link's reader from spending its time in system calls.
const READ_BUF: usize = 256 * 1024;

/// How long a link that ends cleanly waits for its writer to write what is
/// queued and its close_notify before the socket is shut regardless.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

impl Link {
    /// The link reader: reads cells until the link ends, then tears down
    /// its circuits and joins every thread it owns.
    pub fn run(self: &Arc<Self>) {
        self.reader_tid
            .store(crate::runtime::sockets::gettid(), Ordering::Relaxed);
        let result = self.read_loop();
        let cut = self.cut.load(Ordering::Acquire);
        let why = match &result {
            _ if cut => "cut: the peer is no longer served".to_string(),
            Ok(()) if self.closed.load(Ordering::Acquire) => "closed".to_string(),
            Ok(()) => "closed by peer".to_string(),
            Err(e) if self.closed.load(Ordering::Acquire) => format!("closed ({e})"),
            Err(e) => format!("read error: {e}"),
        };
        if result.is_ok() || cut {
            // The peer's clean close (or its answer to ours), or our cut:
            // close_notify and FIN after what is queued (R13.10).
            self.close_writer_within(ANSWER_GRACE);
        }
        self.teardown(&why);
    }

    fn read_loop(self: &Arc<Self>) -> io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(READ_BUF);
        let mut tls = self.transport.read_state();
        loop {
            let read = self.transport.read(&mut buf, &mut tls)?;
            if read.wants_write {
                // The TLS session has an answer to send (a key update).
                let _ = self.tx.tx.send(WriterMsg::Flush);
            }
            if read.end || self.cut.load(Ordering::Acquire) {
                return Ok(());
            }
            let n = read.n;
            if n == 0 {
                continue;
            }
            self.ctx.metrics.add_link_bytes(Dir::Received, n);
            self.tx.heard.now();
            // Only a well-filled buffer is worth handing over: a small one
            // would pin READ_BUF bytes for a few cells in the circuit's inbox.
            let run = single_circuit_run(&buf).filter(|&(_, whole)| whole >= READ_BUF / 2);
            if let Some((wire, whole)) = run {
                // The common case under load: the buffer holds RELAY cells of
                // one circuit only. Hand the buffer itself over, no copy.
                let mut next = Vec::with_capacity(READ_BUF);
                next.extend_from_slice(&buf[whole..]);
                buf.truncate(whole);
                self.ctx
                    .metrics
                    .add_link_cells(Dir::Received, whole / cell::CELL_LEN);
                self.to_circuit(wire, std::mem::replace(&mut buf, next));
                continue;
            }
            let used = self.dispatch(&buf);
            buf.drain(..used);
            // The largest cell (a 65,535-byte variable cell) fits in the
            // buffer, so a full buffer always holds a whole cell.
        }
    }

    /// Hands every whole cell in `bytes` on; returns the bytes used.
    /// Consecutive RELAY cells of one circuit travel as one message.
    fn dispatch(self: &Arc<Self>, bytes: &[u8]) -> usize {
        let mut pos = 0;
        let mut cells = 0;
        // The run of RELAY cells not yet handed on: its circuit and start.
        let mut run: Option<(u32, usize)> = None;
        while let Some((c, len)) = cell::decode(&bytes[pos..]) {
            cells += 1;
            // R2.3: RELAY_EARLY goes where RELAY goes, and is read the same.
            if matches!(c.command, cmd::RELAY | cmd::RELAY_EARLY) {
                match run {
                    Some((id, _)) if id == c.circ_id => {}
                    _ => {
                        if let Some((id, start)) = run {
                            self.to_circuit(id, bytes[start..pos].to_vec());
                        }
                        run = Some((c.circ_id, pos));
                    }
                }
                pos += len;
                continue;
            }
            if let Some((id, start)) = run.take() {
                self.to_circuit(id, bytes[start..pos].to_vec());
            }
            pos += len;
            self.handle_link_cell(c);
        }
        if let Some((id, start)) = run {
            self.to_circuit(id, bytes[start..pos].to_vec());
        }
        self.ctx.metrics.add_link_cells(Dir::Received, cells);
        pos
    }

    /// RELAY cells for a circuit; dropped silently if it was never created
    /// (R3.14) or has been destroyed (R3.11).
    fn to_circuit(&self, wire: u32, cells: Vec<u8>) {
        let table = self.table.lock();
        if let Some(CircSlot::Live { tx, .. }) = table.by_wire_id.get(&wire) {
            // An unbounded send never blocks (docs/design.md, invariant 1);
            // a circuit that is ending has dropped its receiver and the
            // cells go with it.
            let _ = tx.send(CircMsg::Cells(cells));
        }
    }

    /// Cells that are not RELAY: docs/protocol.md §2 and §3.
    fn handle_link_cell(self: &Arc<Self>, c: cell::CellRef<'_>) {
        match c.command {
            // R1.10: variable-length cells after the handshake were read in
            // full (`cell::decode`) and are ignored.
            _ if cell::is_var_cmd(c.command) => {}
            // R2.2: PADDING is a keepalive, ignored.
            cmd::PADDING => {}
            cmd::CREATE_FAST if self.role == Role::Exit => self.on_create_fast(c),
            cmd::CREATED_FAST if self.role == Role::Client => {
                let table = self.table.lock();
                if let Some(CircSlot::Pending(tx)) = table.by_wire_id.get(&c.circ_id) {
                    // try_send: the reader never blocks (docs/design.md,
                    // invariant 1); a second answer for the same CircID
                    // carries nothing new.
                    let _ = tx.try_send(Ok(c.payload.to_vec()));
                }
            }
            // R2.5: CREATE and CREATE2 are answered with DESTROY(PROTOCOL) on
            // their CircID; so is a CREATE_FAST sent to a client.
            cmd::CREATE | cmd::CREATE2 | cmd::CREATE_FAST => {
                if crate::runtime::ratelimit::violation_warning() {
                    tracing::warn!(
                        link = self.id,
                        circ = c.circ_id,
                        "peer sent {} (command {}): answering DESTROY(PROTOCOL)",
                        if c.command == cmd::CREATE_FAST {
                            "CREATE_FAST to a client"
                        } else {
                            "CREATE/CREATE2"
                        },
                        c.command
                    );
                }
                // A live circuit on that CircID goes too: the peer will
                // forget it when it sees our DESTROY.
                let table = self.table.lock();
                match table.by_wire_id.get(&c.circ_id) {
                    Some(CircSlot::Live { tx, .. }) => {
                        let _ = tx.send(CircMsg::Violation(format!(
                            "command {} on a CircID in use",
                            c.command
                        )));
                    }
                    _ => {
                        drop(table);
                        self.ctx.metrics.violation(ViolationKind::Create);
                        self.send_destroy(c.circ_id, destroy_reason::PROTOCOL);
                    }
                }
            }
            // R2.4: the reason is the first payload byte.
            cmd::DESTROY => self.on_destroy(c.circ_id, c.payload[0]),
            // R2.6: any other fixed-length command is dropped.
            _ => {}
        }
    }

    /// R3.10: DESTROY, whatever its reason, tears the circuit down at once;
    /// R3.7: its CircID is free again.
    fn on_destroy(&self, wire: u32, reason: u8) {
        self.ctx.metrics.destroy_received(reason);
        let mut table = self.table.lock();
        match table.by_wire_id.remove(&wire) {
            Some(CircSlot::Live {
                tx, thread, gate, ..
            }) => {
                // Before the CircID is free again: nothing of the old
                // circuit may follow a new circuit's CREATED_FAST.
                gate.close();
                let _ = tx.send(CircMsg::Destroyed { reason });
                table.finished.push(thread);
                table.reap();
            }
            Some(CircSlot::Pending(tx)) => {
                let _ = tx.try_send(Err(reason));
            }
            // R3.14, R3.11: DESTROY for a circuit never created or already
            // gone is dropped silently.
            None => {}
        }
    }

    /// §3: the exit answers CREATE_FAST with CREATED_FAST, or refuses.
    fn on_create_fast(self: &Arc<Self>, c: cell::CellRef<'_>) {
        let wire = c.circ_id;
        let mut table = self.table.lock();
        table.reap();
        // R3.6: a CircID whose most significant bit is clear is a violation
        // (no circuit exists, so only the DESTROY(PROTOCOL) of R3.12 is left).
        if wire & 0x8000_0000 == 0 {
            drop(table);
            if crate::runtime::ratelimit::violation_warning() {
                tracing::warn!(
                    link = self.id,
                    circ = wire,
                    "protocol violation: CREATE_FAST with the CircID top bit clear (protocol.md §3)"
                );
            }
            self.ctx.metrics.violation(ViolationKind::Create);
            self.send_destroy(wire, destroy_reason::PROTOCOL);
            return;
        }
        if let Some(slot) = table.by_wire_id.get(&wire) {
            // R3.6: CREATE_FAST on a CircID in use is a violation on that
            // circuit (R3.12: its thread sends DESTROY(PROTOCOL)).
            if let CircSlot::Live { tx, .. } = slot {
                let _ = tx.send(CircMsg::Violation(
                    "CREATE_FAST on a CircID already in use".into(),
                ));
            }
            return;
        }
        // R3.8: at the per-link circuit limit (and at the process's),
        // DESTROY(RESOURCELIMIT).
        let refuse = if self.ctx.shutting_down() {
            Some(destroy_reason::HIBERNATING)
        } else if table.live_count() >= self.ctx.cfg.max_circuits_per_link
            || self.ctx.circuit_count() >= crate::process::limits::MAX_CIRCUITS
        {
            Some(destroy_reason::RESOURCELIMIT)
        } else {
            None
        };
        if let Some(reason) = refuse {
            drop(table);
            tracing::info!(
                link = self.id,
                circ = wire,
                "refusing circuit: DESTROY({})",
                destroy_reason::name(reason)
            );
            self.send_destroy(wire, reason);
            return;
        }
        let mut x = [0u8; kdf::HASH_LEN];
        x.copy_from_slice(&c.payload[..kdf::HASH_LEN]);
        // R14.2: version 2 if the client offered it and this exit uses it.
        let flow = congestion::exit_flow(self.ctx.cfg.flow, c.payload);
        // At the exit a link is one source of streams (their fair share).
        let opts = CircuitOpts {
            idle_timeout: None,
            source: self.source.clone(),
            flow,
        };
        match self.spawn_circuit(&mut table, wire, opts) {
            Ok(()) => {
                drop(table);
                // R3.3: CREATED_FAST on the same CircID: fresh random Y, then
                // KH = KDF-TOR(X | Y) cut to 20 bytes.
                let mut payload = kdf::created_fast_payload(&x, &nonce());
                if flow == Flow::V2 {
                    // R14.2: the acceptance right after Y | KH.
                    congestion::append_mark(&mut payload);
                }
                let mut out = Vec::with_capacity(cell::CELL_LEN);
                cell::encode_fixed(&mut out, wire, cmd::CREATED_FAST, &payload);
                let _ = self.tx.send(out);
            }
            Err(e) => {
                drop(table);
                tracing::warn!(
                    link = self.id,
                    circ = wire,
                    "cannot start a circuit thread ({e}): DESTROY(RESOURCELIMIT)"
                );
                self.send_destroy(wire, destroy_reason::RESOURCELIMIT);
            }
        }
    }

    /// Starts the thread of circuit `wire` and enters it in the table.
    fn spawn_circuit(
        self: &Arc<Self>,
        table: &mut CircTable,
        wire: u32,
        opts: CircuitOpts,
    ) -> io::Result<()> {
        let Some(slot) = self.ctx.take_circuit_slot() else {
            return Err(io::Error::other(format!(
                "the process holds {} circuits already",
                crate::process::limits::MAX_CIRCUITS
            )));
        };
        let local = self.ctx.next_circuit_id();
        let (tx, rx) = inbox::inbox();
        let gate = Gate::open();
        let link_tx = self.tx.for_circuit(gate.clone());
        let circuit = Circuit::new(
            self.clone(),
            link_tx,
            wire,
            local,
            (tx.clone(), rx),
            opts,
            slot,
        );
        // Shown from before the thread starts: it removes its view as it ends.
        self.views.lock().insert(local, circuit.view());
        let handle = threads::spawn(format!("circ {}.{}", self.id, local), move || circuit.run())
            .inspect_err(|_| self.forget_view(local))?;
        table.by_wire_id.insert(
            wire,
            CircSlot::Live {
                tx,
                local,
                gate,
                thread: handle,
            },
        );
        Ok(())
    }

    /// Client side of §3, step two: KH checked, start the circuit thread.
    /// Returns the circuit's inbox and its local id.
    pub fn finish_create(
        self: &Arc<Self>,
        wire: u32,
        opts: CircuitOpts,
    ) -> io::Result<(InboxTx<CircMsg>, u32)> {
        let mut table = self.table.lock();
        if !matches!(table.by_wire_id.remove(&wire), Some(CircSlot::Pending(_))) {
            return Err(io::Error::other(
                "circuit was destroyed during its handshake",
            ));
        }
        self.spawn_circuit(&mut table, wire, opts)?;
        match table.by_wire_id.get(&wire) {
            Some(CircSlot::Live { tx, local, .. }) => Ok((tx.clone(), *local)),
            _ => unreachable!("just inserted"),
        }
    }

    /// R3.13: the link is lost: every circuit on it is torn down, and their
    /// streams aborted (the circuits do it on `LinkClosed`).
    /// Asks the writer to end the link cleanly after what is queued, and
    /// waits for it at most `grace` (a peer that reads nothing more holds
    /// it until the teardown's shutdown).
    fn close_writer_within(&self, grace: Duration) {
        // No new circuit meanwhile: its CREATED_FAST could not be sent.
        self.closed.store(true, Ordering::Release);
        if self.tx.tx.send(WriterMsg::Close).is_err() {
            return;
        }
        let since = Instant::now();
        while since.elapsed() < grace {
            match &*self.writer.lock() {
                Some(w) if !w.is_finished() => {}
                _ => return,
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn teardown(&self, why: &str) {
        self.closed.store(true, Ordering::Release);
        self.transport.shutdown();
        // Packagers waiting for room must not wait for a writer that is gone.
        self.tx.room.close();
        let (circuits, mut handles) = {
            let mut table = self.table.lock();
            let finished: Vec<_> = table.finished.drain(..).collect();
            (table.by_wire_id.drain().collect::<Vec<_>>(), finished)
        };
        let count = circuits.len();
        for (_, slot) in circuits {
            match slot {
                CircSlot::Live { tx, thread, .. } => {
                    let _ = tx.send(CircMsg::LinkClosed);
                    handles.push(thread);
                }
                // Dropping the sender tells the waiting creator.
                CircSlot::Pending(_) => {}
            }
        }
        handles.into_iter().for_each(threads::join);
        let _ = self.tx.tx.send(WriterMsg::Close);
        let writer = self.writer.lock().take();
        if let Some(w) = writer {
            threads::join(w);
        }
        self.registry.unregister(self.id);
        tracing::info!(link = self.id, peer = %self.peer, circuits = count, "link closed: {why}");
    }
}

/// If the whole cells at the front of `buf` are all RELAY (or RELAY_EARLY,
/// R2.3) cells of one circuit, returns that circuit and how many bytes they
/// take.
fn single_circuit_run(buf: &[u8]) -> Option<(u32, usize)> {
    let whole = buf.len() / cell::CELL_LEN * cell::CELL_LEN;
    let first = buf.get(..cell::CELL_LEN)?;
    let wire = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
    let all = buf[..whole]
        .chunks_exact(cell::CELL_LEN)
        .all(|c| matches!(c[4], cmd::RELAY | cmd::RELAY_EARLY) && c[..4] == first[..4]);
    all.then_some((wire, whole))
}
