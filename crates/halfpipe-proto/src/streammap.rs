//! A circuit's streams, and the rules a circuit applies to the relay cells
//! it receives (docs/protocol.md §4, §5, §6, §9, §10): which cells are
//! violations, which stream a cell belongs to, which IDs are free, and the
//! circuit deliver window. Each `on_*` method takes one received cell (or a
//! run of DATA) and returns a typed answer for the shell to carry out; the
//! rules of one stream are its [`StreamState`]'s, reached through
//! [`StreamEntry`].
//!
//! `S` is the shell's handle to a stream (threads and sockets in the
//! daemon, plain state in tests); `R` its handle to a RESOLVE in progress.

mod recent;

pub use recent::{RecentlyClosed, RECENTLY_CLOSED};

use crate::congestion::{Flow, SendmeCounter};
use crate::flow::{CircuitDeliverWindow, FlowViolation};
use crate::halfclose::{Event, Step};
use crate::relay::{self, relay_cmd, MalformedBegin, RelayCell, RelayError, Target};
use crate::stream::{Delivery, Outbound, StreamState, StreamViolation, Wake};
use crate::xonxoff;
use crate::Role;
use rustc_hash::FxHashMap;

/// How the map reaches one stream's state.
pub trait StreamEntry {
    /// Runs `f` on the stream's state (under the stream's lock, in a
    /// threaded shell).
    fn with_state<T>(&self, f: impl FnOnce(&mut StreamState) -> T) -> T;
    /// Runs `f` on the stream's state and the queue its cells go to, so
    /// that what `f` queues leaves in the order decided (docs/design.md,
    /// invariant 8).
    fn with_state_out<T>(&self, f: impl FnOnce(&mut StreamState, &dyn Outbound) -> T) -> T;
    /// Wakes a packager waiting for the stream package window.
    fn wake_packager(&self);
}

/// A cell that breaks the circuit's rules: the circuit is destroyed with
/// DESTROY(PROTOCOL) (R3.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CircuitViolation {
    /// R4.4: Recognized != 0, or Length > 498.
    #[error(transparent)]
    RelayHeader(#[from] RelayError),
    /// R4.6, R4.7: a relay command sent the wrong way.
    #[error("{} sent the wrong way", relay_cmd::name(*.0))]
    WrongDirection(u8),
    /// R4.8: DATA, FIN or END on stream 0; R4.10: BEGIN or RESOLVE there.
    #[error("{} on stream 0", relay_cmd::name(*.0))]
    StreamZero(u8),
    /// R10.10 on the circuit window.
    #[error(transparent)]
    CircuitWindow(FlowViolation),
    /// §7 or §10 on one stream.
    #[error(transparent)]
    Stream(#[from] StreamViolation),
    /// R5.20: client, DATA or FIN for a stream before its CONNECTED.
    #[error("{} before CONNECTED", relay_cmd::name(*.0))]
    BeforeConnected(u8),
    /// R5.20: client, a second CONNECTED for a stream.
    #[error("second CONNECTED for a stream")]
    SecondConnected,
    /// R5.13: BEGIN or RESOLVE on a stream ID that is open.
    #[error("{} reuses an open stream ID", relay_cmd::name(*.0))]
    IdInUse(u8),
}

/// The circuit's receiving side: §10's deliver window or §14's count.
#[derive(Debug)]
enum CircuitDeliver {
    V1(CircuitDeliverWindow),
    V2(SendmeCounter),
}

/// What a run of DATA cells means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOutcome {
    /// Circuit SENDMEs now due (R10.2): queue them.
    pub circuit_sendmes: u32,
    /// For the stream's deliverer, or dropped (R9.3, R9.5).
    pub delivery: Delivery,
}

/// What an END means.
#[derive(Debug)]
pub enum Ended<R> {
    /// A stream's END: the §7 step taken (R7.8); carry out its reset.
    Stream(Step),
    /// Client: the END answers a RESOLVE (it is answered with a failure).
    Resolve(R),
    /// For no open stream: dropped (R9.3, R9.5).
    Dropped,
}

/// What a BEGIN asks the exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Open a stream to this target (R5.3), or refuse it for want of
    /// resources (`refuse`, R5.11).
    Open(Target),
    /// Malformed (R5.5): answer END(TORPROTOCOL); the ID counts as closed
    /// (R9.1), so the client's optimistic DATA for it is dropped.
    Malformed(MalformedBegin),
}

/// What a RESOLVE asks the exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolve {
    /// Look this name up and answer RESOLVED (R5.17).
    Lookup(String),
    /// Malformed: answer RESOLVED with a nontransient error; the ID counts
    /// as closed.
    Malformed,
}

/// What an ID stands for while it is in use.
#[derive(Debug)]
enum Slot<S, R> {
    Stream {
        entry: S,
        /// Client: CONNECTED has arrived (it never goes back), so DATA need
        /// not ask the stream under its lock.
        connected: bool,
    },
    Resolve(R),
}

/// A circuit's streams and RESOLVEs by ID, the streams that closed while
/// their threads still end, the recently-closed IDs (§9), and the circuit
/// deliver window (§10).
#[derive(Debug)]
pub struct StreamMap<S, R> {
    role: Role,
    /// Looked up for every cell: a fast hash (stream IDs are bounded per
    /// circuit, so a peer that floods one bucket slows its own circuit).
    slots: FxHashMap<u16, Slot<S, R>>,
    /// CLOSED streams whose ID a new stream took before their shell let
    /// them go (R5.14: a CLOSED stream no longer owns its ID).
    retired: Vec<S>,
    recent: RecentlyClosed,
    deliver: CircuitDeliver,
    /// Client: where the search for a free ID starts.
    next_id: u16,
}

impl<S: StreamEntry, R> StreamMap<S, R> {
    /// The streams of a circuit that runs §10's flow control.
    pub fn new(role: Role) -> Self {
        StreamMap::with_flow(role, Flow::V1)
    }

    /// The streams of a circuit that runs `flow`.
    pub fn with_flow(role: Role, flow: Flow) -> Self {
        StreamMap {
            role,
            slots: FxHashMap::default(),
            retired: Vec::new(),
            recent: RecentlyClosed::default(),
            deliver: match flow {
                Flow::V1 => CircuitDeliver::V1(CircuitDeliverWindow::default()),
                Flow::V2 => CircuitDeliver::V2(SendmeCounter::default()),
            },
            next_id: 1,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn flow(&self) -> Flow {
        match self.deliver {
            CircuitDeliver::V1(_) => Flow::V1,
            CircuitDeliver::V2(_) => Flow::V2,
        }
    }

    // ------------------------------------------------ cells received

    /// The checks every relay cell gets, whatever its stream: its
    /// direction (R4.6, R4.7) and stream 0 (R4.8). (R4.4 is the decoder's.)
    pub fn check(&self, cell: &RelayCell<'_>) -> Result<(), CircuitViolation> {
        let wrong_way = match self.role {
            // R4.6: CONNECTED or RESOLVED to the exit.
            Role::Exit => matches!(cell.command, relay_cmd::CONNECTED | relay_cmd::RESOLVED),
            // R4.7: BEGIN or RESOLVE to the client.
            Role::Client => matches!(cell.command, relay_cmd::BEGIN | relay_cmd::RESOLVE),
        };
        if wrong_way {
            return Err(CircuitViolation::WrongDirection(cell.command));
        }
        // R4.8: DATA, FIN, END on stream 0; R4.10: BEGIN, RESOLVE on
        // stream 0 (at the exit: at the client they went the wrong way).
        // CONNECTED and RESOLVED on stream 0 are for no stream (R9.5).
        let needs_stream = matches!(
            cell.command,
            relay_cmd::DATA
                | relay_cmd::FIN
                | relay_cmd::END
                | relay_cmd::BEGIN
                | relay_cmd::RESOLVE
        );
        if needs_stream && cell.stream_id == 0 {
            return Err(CircuitViolation::StreamZero(cell.command));
        }
        Ok(())
    }

    /// `cells` DATA cells in a row for stream `id`. Each counts against
    /// the circuit deliver window, whatever its stream (R10.5); they are
    /// for the stream if it is open and may deliver (R6.4), else dropped
    /// (R9.3, R9.5).
    pub fn on_data(&mut self, id: u16, cells: u32) -> Result<DataOutcome, CircuitViolation> {
        let mut circuit_sendmes = 0;
        // R10.5: every DATA cell counts for the circuit, before anything is
        // known of its stream; R10.2: a SENDME each time 900 is reached.
        // R14.4: on a version 2 circuit, one per SENDME_INC cells, now.
        for _ in 0..cells {
            let due = match &mut self.deliver {
                CircuitDeliver::V1(w) => w.on_data().map_err(CircuitViolation::CircuitWindow)?,
                CircuitDeliver::V2(c) => c.on_data(),
            };
            circuit_sendmes += u32::from(due);
        }
        let delivery = match self.slots.get_mut(&id) {
            Some(Slot::Stream { entry, connected }) => {
                if self.role == Role::Client && !*connected {
                    *connected = awaiting_connected(entry, relay_cmd::DATA)?;
                }
                entry.with_state_out(|st, out| st.accept_data(cells, out))?
            }
            // R9.3, R9.5: no open stream: dropped.
            Some(Slot::Resolve(_)) | None => Delivery::Drop,
        };
        Ok(DataOutcome {
            circuit_sendmes,
            delivery,
        })
    }

    /// FIN for stream `id` (R7.4, R7.5, R7.6): the §7 step taken, whose
    /// action the shell carries out (deliver what came before it, then
    /// shutdown(SHUT_WR)); `None` if dropped (R9.3, R9.5).
    pub fn on_fin(&mut self, id: u16) -> Result<Option<Step>, CircuitViolation> {
        let Some(Slot::Stream { entry, connected }) = self.slots.get_mut(&id) else {
            return Ok(None);
        };
        if self.role == Role::Client && !*connected {
            *connected = awaiting_connected(entry, relay_cmd::FIN)?;
        }
        let step = entry
            .with_state(|st| st.hc.handle(Event::FinReceived))
            .map_err(|v| CircuitViolation::Stream(v.into()))?;
        Ok(Some(step))
    }

    /// END for `id` with `reason` (R7.8, R8.8).
    pub fn on_end(&mut self, id: u16, reason: u8) -> Ended<R> {
        match self.slots.get(&id) {
            Some(Slot::Stream { entry, .. }) => {
                let step = entry.with_state(|st| st.hc.handle(Event::EndReceived { reason }));
                // END is never a violation, in any state (R7.8, R9.3).
                Ended::Stream(step.expect("END is never a violation"))
            }
            Some(Slot::Resolve(_)) if self.role == Role::Client => {
                let Some(Slot::Resolve(r)) = self.slots.remove(&id) else {
                    unreachable!("just matched")
                };
                self.recent.insert(id);
                Ended::Resolve(r)
            }
            // Exit: END for a RESOLVE in progress changes nothing; its
            // RESOLVED goes out anyway.
            Some(Slot::Resolve(_)) | None => Ended::Dropped,
        }
    }

    /// A stream SENDME (R10.4, R10.11): wakes the stream's packager if it
    /// was stopped (R10.9); dropped for no open stream (R9.3, R9.5).
    pub fn on_stream_sendme(&mut self, id: u16) -> Result<(), CircuitViolation> {
        // R14.8: no stream SENDMEs on a version 2 circuit, for any stream.
        if self.flow() == Flow::V2 {
            return Err(CircuitViolation::Stream(
                FlowViolation::StreamSendmeOnV2.into(),
            ));
        }
        if let Some(Slot::Stream { entry, .. }) = self.slots.get(&id) {
            let wake = entry
                .with_state(|st| st.on_sendme())
                .map_err(|v| CircuitViolation::Stream(v.into()))?;
            if wake == Wake::Packager {
                entry.wake_packager();
            }
        }
        Ok(())
    }

    /// XOFF or XON (`command`) for `id` with `body` (§14).
    pub fn on_xon_xoff(
        &mut self,
        id: u16,
        command: u8,
        body: &[u8],
    ) -> Result<(), CircuitViolation> {
        // R14.16: a version 1 circuit drops them.
        if self.flow() == Flow::V1 {
            return Ok(());
        }
        // R14.14: stream 0, a short body or another version.
        let malformed = |_| CircuitViolation::Stream(FlowViolation::MalformedXonXoff.into());
        if id == 0 {
            return Err(CircuitViolation::StreamZero(command));
        }
        let xon = command == relay_cmd::XON;
        if xon {
            xonxoff::parse_xon(body).map_err(malformed)?;
        } else {
            xonxoff::parse_xoff(body).map_err(malformed)?;
        }
        // R14.13: for no open stream: dropped.
        if let Some(Slot::Stream { entry, .. }) = self.slots.get(&id) {
            let wake = entry.with_state(|st| {
                if xon {
                    st.on_xon()
                } else {
                    st.on_xoff();
                    Wake::Nobody
                }
            });
            if wake == Wake::Packager {
                entry.wake_packager();
            }
        }
        Ok(())
    }

    /// Client: CONNECTED for `id` (R5.4): for the stream's deliverer (it
    /// answers the SOCKS request, R11.5), or dropped for a stream that
    /// already ended (R9.5).
    pub fn on_connected(&mut self, id: u16) -> Result<Delivery, CircuitViolation> {
        let Some(Slot::Stream { entry, connected }) = self.slots.get_mut(&id) else {
            return Ok(Delivery::Drop);
        };
        let first = entry.with_state(|st| {
            if st.hc.is_closed() {
                None
            } else {
                Some(!std::mem::replace(&mut st.connected, true))
            }
        });
        match first {
            None => Ok(Delivery::Drop),
            Some(false) => Err(CircuitViolation::SecondConnected),
            Some(true) => {
                *connected = true;
                Ok(Delivery::Deliver)
            }
        }
    }

    /// Exit: BEGIN on `id` (R5.13, R5.14, R5.5). A stream whose ID it is
    /// but that has CLOSED is retired first: it no longer owns the ID.
    pub fn on_begin(&mut self, id: u16, body: &[u8]) -> Result<Begin, CircuitViolation> {
        self.take_id(id, relay_cmd::BEGIN)?;
        match relay::parse_begin(body) {
            Ok(target) => Ok(Begin::Open(target)),
            Err(why) => {
                // R5.5: answered with END, so the ID is recently closed (R9.1).
                self.recent.insert(id);
                Ok(Begin::Malformed(why))
            }
        }
    }

    /// Exit: RESOLVE on `id` (R5.17), with the ID rules of BEGIN.
    pub fn on_resolve(&mut self, id: u16, body: &[u8]) -> Result<Resolve, CircuitViolation> {
        self.take_id(id, relay_cmd::RESOLVE)?;
        match relay::parse_resolve(body) {
            Ok(name) => Ok(Resolve::Lookup(name.to_owned())),
            Err(_) => {
                self.recent.insert(id);
                Ok(Resolve::Malformed)
            }
        }
    }

    /// Client: RESOLVED for `id`: the RESOLVE it answers, which is over
    /// (its ID is recently closed); `None` if there is none (dropped).
    pub fn on_resolved(&mut self, id: u16) -> Option<R> {
        self.finish_resolve(id)
    }

    /// An ID for a new stream or RESOLVE from the peer: free unless open
    /// (R5.13); leaves the recently-closed set (R5.14).
    fn take_id(&mut self, id: u16, command: u8) -> Result<(), CircuitViolation> {
        let closed = matches!(
            self.slots.get(&id),
            Some(Slot::Stream { entry, .. }) if entry.with_state(|st| st.hc.is_closed())
        );
        if closed {
            if let Some(Slot::Stream { entry, .. }) = self.slots.remove(&id) {
                self.retired.push(entry);
            }
        }
        // R5.13: an open ID is a violation.
        if self.slots.contains_key(&id) {
            return Err(CircuitViolation::IdInUse(command));
        }
        // R5.14: a recently closed ID opens a new stream and leaves the set.
        self.recent.remove(id);
        Ok(())
    }

    // ------------------------------------------------ local decisions

    /// Client: a free ID for a new stream or RESOLVE: not zero, not open,
    /// not recently closed (R5.1, R9.4). `None` when every ID is taken.
    pub fn allocate_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            // R5.1: not 0, not open; R9.4: not recently closed.
            if id != 0 && !self.slots.contains_key(&id) && !self.recent.contains(id) {
                return Some(id);
            }
        }
        None
    }

    /// Enters a stream on `id` (after `allocate_id`, or a BEGIN's `Open`).
    pub fn insert_stream(&mut self, id: u16, entry: S) {
        self.slots.insert(
            id,
            Slot::Stream {
                entry,
                connected: false,
            },
        );
    }

    /// Enters a RESOLVE on `id`.
    pub fn insert_resolve(&mut self, id: u16, resolve: R) {
        self.slots.insert(id, Slot::Resolve(resolve));
    }

    /// Our END answers a stream that never opened (a refused BEGIN, or a
    /// BEGIN we sent and gave up): its ID is recently closed (R9.1).
    pub fn refuse(&mut self, id: u16) {
        self.recent.insert(id);
    }

    /// A RESOLVE is over: its ID is recently closed.
    pub fn finish_resolve(&mut self, id: u16) -> Option<R> {
        match self.slots.remove(&id) {
            Some(Slot::Resolve(r)) => {
                self.recent.insert(id);
                Some(r)
            }
            Some(stream) => {
                self.slots.insert(id, stream);
                None
            }
            None => None,
        }
    }

    /// The shell is done with stream `id` (CLOSED, its threads ended): its
    /// ID enters the recently-closed set (R9.1).
    pub fn remove_stream(&mut self, id: u16) -> Option<S> {
        match self.slots.remove(&id) {
            Some(Slot::Stream { entry, .. }) => {
                self.recent.insert(id);
                Some(entry)
            }
            Some(resolve) => {
                self.slots.insert(id, resolve);
                None
            }
            None => None,
        }
    }

    // ------------------------------------------------ reading the map

    pub fn stream(&self, id: u16) -> Option<&S> {
        match self.slots.get(&id) {
            Some(Slot::Stream { entry, .. }) => Some(entry),
            _ => None,
        }
    }

    pub fn stream_mut(&mut self, id: u16) -> Option<&mut S> {
        match self.slots.get_mut(&id) {
            Some(Slot::Stream { entry, .. }) => Some(entry),
            _ => None,
        }
    }

    /// The streams that own their ID.
    pub fn streams(&self) -> impl Iterator<Item = &S> {
        self.slots.values().filter_map(|s| match s {
            Slot::Stream { entry, .. } => Some(entry),
            Slot::Resolve(_) => None,
        })
    }

    /// CLOSED streams that gave their ID to a new stream.
    pub fn retired_mut(&mut self) -> &mut Vec<S> {
        &mut self.retired
    }

    /// Streams and RESOLVEs holding an ID.
    pub fn in_use(&self) -> usize {
        self.slots.len()
    }

    /// The RESOLVEs holding an ID, for `retain_resolves`.
    pub fn resolves(&self) -> impl Iterator<Item = (u16, &R)> {
        self.slots.iter().filter_map(|(&id, s)| match s {
            Slot::Resolve(r) => Some((id, r)),
            Slot::Stream { .. } => None,
        })
    }

    /// Nothing in use and nothing retired.
    pub fn is_idle(&self) -> bool {
        self.slots.is_empty() && self.retired.is_empty()
    }

    pub fn is_recently_closed(&self, id: u16) -> bool {
        self.recent.contains(id)
    }

    /// The circuit deliver window (for status); on a version 2 circuit,
    /// which has none, the cells still to arrive before the next SENDME.
    pub fn deliver_window(&self) -> u32 {
        match &self.deliver {
            CircuitDeliver::V1(w) => w.value(),
            CircuitDeliver::V2(c) => c.until_sendme(),
        }
    }

    /// Empties the map when the circuit ends: every stream (owning its ID
    /// or retired) and every RESOLVE.
    pub fn drain(&mut self) -> (Vec<S>, Vec<R>) {
        let mut streams = std::mem::take(&mut self.retired);
        let mut resolves = Vec::new();
        for (_, slot) in self.slots.drain() {
            match slot {
                Slot::Stream { entry, .. } => streams.push(entry),
                Slot::Resolve(r) => resolves.push(r),
            }
        }
        (streams, resolves)
    }
}

/// Client: DATA or FIN for a stream whose CONNECTED has not come: a
/// violation while the stream is open and waiting for it; `Ok(true)` once
/// CONNECTED arrived, `Ok(false)` for a stream that closed (the cell is
/// then dropped by its state).
fn awaiting_connected(entry: &impl StreamEntry, command: u8) -> Result<bool, CircuitViolation> {
    let (connected, closed) = entry.with_state(|st| (st.connected, st.hc.is_closed()));
    if !connected && !closed {
        return Err(CircuitViolation::BeforeConnected(command));
    }
    Ok(connected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Discard;
    use std::cell::{Cell, RefCell};
    use std::time::Instant;

    /// A stream as a test holds it: its state, how often it was woken, and
    /// the control cells it queued.
    #[derive(Default)]
    struct Entry {
        state: RefCell<Option<StreamState>>,
        woken: Cell<u32>,
        sent: Sent,
    }

    #[derive(Default)]
    struct Sent(RefCell<Vec<(u8, Vec<u8>)>>);

    impl Outbound for Sent {
        fn control(&self, command: u8, body: &[u8]) {
            self.0.borrow_mut().push((command, body.to_vec()));
        }
        fn sendmes(&self, n: u32) {
            for _ in 0..n {
                self.control(relay_cmd::SENDME, &[]);
            }
        }
        fn data(&self, _: Vec<u8>, _: u32) -> Result<(), crate::stream::Gone> {
            Ok(())
        }
    }

    impl Entry {
        fn v2() -> Entry {
            let e = Entry::default();
            *e.state.borrow_mut() = Some(StreamState::with_flow(Instant::now(), Flow::V2));
            e
        }
    }

    impl StreamEntry for Entry {
        fn with_state<T>(&self, f: impl FnOnce(&mut StreamState) -> T) -> T {
            let mut st = self.state.borrow_mut();
            f(st.get_or_insert_with(|| StreamState::new(Instant::now())))
        }

        fn with_state_out<T>(&self, f: impl FnOnce(&mut StreamState, &dyn Outbound) -> T) -> T {
            self.with_state(|st| f(st, &self.sent))
        }

        fn wake_packager(&self) {
            self.woken.set(self.woken.get() + 1);
        }
    }

    fn begin(target: &str) -> Vec<u8> {
        let mut b = target.as_bytes().to_vec();
        b.push(0);
        b
    }

    fn open_exit_stream(map: &mut StreamMap<Entry, ()>, id: u16) {
        assert!(matches!(
            map.on_begin(id, &begin("a.example:80")),
            Ok(Begin::Open(_))
        ));
        map.insert_stream(id, Entry::default());
    }

    // R5.13, R5.14: a BEGIN on an open ID is a violation; once the stream
    // is CLOSED (its threads may still run), the ID is free again and the
    // old stream is retired, not forgotten.
    #[test]
    fn a_closed_stream_is_retired_when_a_begin_takes_its_id() {
        let mut map = StreamMap::new(Role::Exit);
        open_exit_stream(&mut map, 7);
        assert_eq!(
            map.on_begin(7, &begin("b.example:80")),
            Err(CircuitViolation::IdInUse(relay_cmd::BEGIN))
        );
        let ended = map.on_end(7, 1);
        assert!(
            matches!(ended, Ended::Stream(step) if matches!(step.to, crate::halfclose::State::Closed(_)))
        );
        assert!(matches!(
            map.on_begin(7, &begin("b.example:80")),
            Ok(Begin::Open(_))
        ));
        assert_eq!(map.retired_mut().len(), 1, "the CLOSED stream is retired");
        assert!(map.stream(7).is_none(), "the new stream is not entered yet");
    }

    // R5.17, R9.1: a RESOLVE holds its ID until it is answered; then the ID
    // is recently closed. At the client an END answers it too.
    #[test]
    fn a_resolve_holds_its_id_until_answered() {
        let mut exit: StreamMap<Entry, &str> = StreamMap::new(Role::Exit);
        assert_eq!(
            exit.on_resolve(3, b"name.example\0"),
            Ok(Resolve::Lookup("name.example".into()))
        );
        exit.insert_resolve(3, "lookup");
        assert_eq!(
            exit.on_resolve(3, b"again.example\0"),
            Err(CircuitViolation::IdInUse(relay_cmd::RESOLVE))
        );
        assert!(
            matches!(exit.on_end(3, 1), Ended::Dropped),
            "the exit's RESOLVE goes on"
        );
        assert_eq!(exit.resolves().count(), 1);
        assert_eq!(exit.finish_resolve(3), Some("lookup"));
        assert!(exit.is_recently_closed(3) && exit.is_idle());

        let mut client: StreamMap<Entry, &str> = StreamMap::new(Role::Client);
        let id = client.allocate_id().unwrap();
        client.insert_resolve(id, "waiting");
        assert!(matches!(client.on_end(id, 1), Ended::Resolve("waiting")));
        assert!(client.is_recently_closed(id));
        let id = client.allocate_id().unwrap();
        client.insert_resolve(id, "waiting");
        assert_eq!(client.on_resolved(id), Some("waiting"));
        assert_eq!(client.on_resolved(id), None, "a second RESOLVED is dropped");
    }

    // R5.1, R9.4: the client's IDs are never 0, never open and never
    // recently closed; a refused BEGIN's ID counts as closed (R9.1).
    #[test]
    fn allocated_ids_skip_open_and_recently_closed_ones() {
        let mut map: StreamMap<Entry, ()> = StreamMap::new(Role::Client);
        let a = map.allocate_id().unwrap();
        map.insert_stream(a, Entry::default());
        let b = map.allocate_id().unwrap();
        map.refuse(b);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..u16::MAX - 2 {
            let id = map.allocate_id().unwrap();
            assert!(id != 0 && id != a && id != b, "{id}");
            assert!(seen.insert(id), "{id} twice");
            map.insert_stream(id, Entry::default());
        }
        assert_eq!(map.allocate_id(), None, "every ID taken");
        assert!(map.remove_stream(a).is_some());
        assert!(map.is_recently_closed(a));
    }

    // R10.9 through the map: a SENDME wakes the packager exactly when the
    // stream's window was 0.
    #[test]
    fn a_stream_sendme_wakes_a_stopped_packager_only() {
        let mut map = StreamMap::new(Role::Exit);
        open_exit_stream(&mut map, 1);
        let e = map.stream(1).unwrap();
        e.with_state(|st| st.queue_data(Vec::new(), 450, 0, Instant::now(), &Discard))
            .unwrap();
        map.on_stream_sendme(1).unwrap();
        assert_eq!(map.stream(1).unwrap().woken.get(), 0, "window was 50");
        let e = map.stream(1).unwrap();
        e.with_state(|st| st.queue_data(Vec::new(), 100, 0, Instant::now(), &Discard))
            .unwrap();
        map.on_stream_sendme(1).unwrap();
        assert_eq!(map.stream(1).unwrap().woken.get(), 1, "window was 0");
        // Dropped for no open stream (R9.5).
        assert_eq!(map.on_stream_sendme(9), Ok(()));
    }

    // ------------------------------------------------ flow control v2 (§14)

    fn v2_map() -> StreamMap<Entry, ()> {
        let mut map = StreamMap::with_flow(Role::Exit, Flow::V2);
        assert!(matches!(
            map.on_begin(1, &begin("a.example:80")),
            Ok(Begin::Open(_))
        ));
        map.insert_stream(1, Entry::v2());
        map
    }

    #[test]
    fn v2_circuit_sendme_every_31_data_cells_of_any_stream() {
        // R14.4: counted for unknown streams too, due at the 31st cell.
        let mut map = v2_map();
        assert_eq!(map.on_data(1, 30).unwrap().circuit_sendmes, 0);
        assert_eq!(map.on_data(9, 1).unwrap().circuit_sendmes, 1);
        assert_eq!(map.on_data(1, 62).unwrap().circuit_sendmes, 2);
    }

    #[test]
    fn v2_xoff_from_the_map_in_order() {
        // R14.9: the map's DATA step queues XOFF through the stream's queue.
        let mut map = v2_map();
        map.on_data(1, 499).unwrap();
        assert!(map.stream(1).unwrap().sent.0.borrow().is_empty());
        map.on_data(1, 1).unwrap();
        assert_eq!(
            map.stream(1).unwrap().sent.0.borrow().as_slice(),
            &[(relay_cmd::XOFF, vec![0])]
        );
        // R14.15: a sender that ignores it is caught.
        map.on_data(1, xonxoff::AFTER_XOFF_MAX).unwrap();
        assert_eq!(
            map.on_data(1, 1),
            Err(CircuitViolation::Stream(FlowViolation::XoffIgnored.into()))
        );
    }

    #[test]
    fn v2_stream_sendme_is_a_violation() {
        // R14.8: for an open stream or not.
        let mut map = v2_map();
        for id in [1, 7] {
            assert_eq!(
                map.on_stream_sendme(id),
                Err(CircuitViolation::Stream(
                    FlowViolation::StreamSendmeOnV2.into()
                ))
            );
        }
    }

    #[test]
    fn v2_xoff_holds_the_packager_until_xon() {
        // R14.11: XOFF closes the read window; XON opens it and wakes.
        let mut map = v2_map();
        let window =
            |map: &StreamMap<Entry, ()>| map.stream(1).unwrap().with_state(|st| st.read_window());
        assert!(window(&map).is_some());
        map.on_xon_xoff(1, relay_cmd::XOFF, &[0]).unwrap();
        assert_eq!(window(&map), None);
        map.on_xon_xoff(1, relay_cmd::XON, &[0, 0, 0, 0, 0])
            .unwrap();
        assert!(window(&map).is_some());
        assert_eq!(map.stream(1).unwrap().woken.get(), 1);
    }

    #[test]
    fn v2_malformed_or_stream_zero_xon_xoff_is_a_violation() {
        // R14.14.
        let mut map = v2_map();
        assert_eq!(
            map.on_xon_xoff(0, relay_cmd::XOFF, &[0]),
            Err(CircuitViolation::StreamZero(relay_cmd::XOFF))
        );
        let bad = Err(CircuitViolation::Stream(
            FlowViolation::MalformedXonXoff.into(),
        ));
        assert_eq!(map.on_xon_xoff(1, relay_cmd::XOFF, &[]), bad);
        assert_eq!(map.on_xon_xoff(1, relay_cmd::XOFF, &[1]), bad);
        assert_eq!(map.on_xon_xoff(1, relay_cmd::XON, &[0, 0, 0]), bad);
    }

    #[test]
    fn late_or_v1_xon_xoff_are_dropped() {
        // R14.13: for a stream not open, or recently closed: dropped.
        let mut map = v2_map();
        assert_eq!(map.on_xon_xoff(5, relay_cmd::XOFF, &[0]), Ok(()));
        map.remove_stream(1);
        assert_eq!(map.on_xon_xoff(1, relay_cmd::XON, &[0, 0, 0, 0, 0]), Ok(()));
        // R14.16: a version 1 circuit drops even malformed ones.
        let mut v1: StreamMap<Entry, ()> = StreamMap::new(Role::Exit);
        open_exit_stream(&mut v1, 1);
        assert_eq!(v1.on_xon_xoff(0, relay_cmd::XOFF, &[]), Ok(()));
        assert_eq!(v1.on_xon_xoff(1, relay_cmd::XOFF, &[0]), Ok(()));
        assert!(v1
            .stream(1)
            .unwrap()
            .with_state(|st| st.read_window())
            .is_some());
    }
}
