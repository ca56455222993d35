//! Two edges of one circuit wired together in memory, after quinn-proto's
//! `Pair`: a client and an exit, each a real `StreamMap` of real
//! `StreamState`s, exchanging encoded relay cells, with the sockets and
//! threads of the daemon replaced by explicit steps. `drive` runs both
//! until nothing moves. The applications at both ends are byte buffers a
//! test writes to, reads from, half-closes or resets.
//!
//! What the daemon's threads do is mirrored here step for step: a packager
//! reads what its window allows (docs/protocol.md §10), a deliverer writes
//! what its application accepts and counts it as written, the circuit
//! thread hands every received cell to the map and carries out what it
//! answers.
#![allow(dead_code)]

use halfpipe_proto::cell::{self, cmd, CELL_LEN};
use halfpipe_proto::flow::{PackageWindow, CIRCUIT_WINDOW_START};
use halfpipe_proto::halfclose::{Action, Event, State, Step};
use halfpipe_proto::relay::{self, end_reason, relay_cmd, Host, Target, DATA_MAX};
use halfpipe_proto::stream::{Delivery, Gone, Outbound, Queued, StreamState};
use halfpipe_proto::streammap::{Begin, CircuitViolation, Ended, Resolve, StreamEntry, StreamMap};
use halfpipe_proto::Role;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

pub const CIRC: u32 = 0x8000_0001;

/// One end of a stream as its application sees it.
#[derive(Debug, Default)]
pub struct App {
    /// Written by the application, not yet read by the packager.
    pub to_send: Vec<u8>,
    /// The application shut its write side: the packager reads EOF once
    /// `to_send` is empty.
    pub eof: bool,
    /// Everything the deliverer wrote to the application.
    pub received: Vec<u8>,
    /// The deliverer shut our write side: the application reads EOF.
    pub got_eof: bool,
    /// The connection was reset (an abort: §8).
    pub reset: bool,
    /// Bytes the application's socket still takes (`None`: no limit).
    /// A stopped reader is `Some(0)`.
    pub room: Option<usize>,
    /// The application itself reset the connection (the packager's read
    /// fails).
    pub fails: bool,
}

/// What the deliverer still has to do, in order.
#[derive(Debug)]
enum Pending {
    Data(Vec<u8>),
    Fin,
}

/// A stream at one edge: its shared state and what its threads hold.
pub struct TestStream {
    pub id: u16,
    pub state: RefCell<StreamState>,
    pub app: RefCell<App>,
    pending: RefCell<VecDeque<Pending>>,
    /// Times the map woke this stream's packager.
    pub woken: Cell<u32>,
    /// The deliverer has ended (FIN written, or aborted).
    deliverer_done: Cell<bool>,
    /// The packager has ended (FIN or END sent, or aborted).
    packager_done: Cell<bool>,
}

/// The map's handle to a test stream.
#[derive(Clone)]
pub struct Entry(pub Rc<TestStream>);

impl std::ops::Deref for Entry {
    type Target = TestStream;
    fn deref(&self) -> &TestStream {
        &self.0
    }
}

impl StreamEntry for Entry {
    fn with_state<T>(&self, f: impl FnOnce(&mut StreamState) -> T) -> T {
        f(&mut self.state.borrow_mut())
    }

    /// The pair runs version 1 circuits, on which the map queues no
    /// stream cell of its own.
    fn with_state_out<T>(&self, f: impl FnOnce(&mut StreamState, &dyn Outbound) -> T) -> T {
        f(
            &mut self.state.borrow_mut(),
            &halfpipe_proto::stream::Discard,
        )
    }

    fn wake_packager(&self) {
        self.woken.set(self.woken.get() + 1);
    }
}

/// Cells an edge sends, in the order they were queued.
#[derive(Default)]
pub struct Wire(RefCell<Vec<u8>>);

impl Wire {
    fn relay(&self, command: u8, stream: u16, body: &[u8]) {
        relay::encode(&mut self.0.borrow_mut(), CIRC, command, stream, body);
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.0.borrow_mut())
    }
}

/// A stream's cells go to its edge's wire.
struct StreamOut<'a> {
    wire: &'a Wire,
    id: u16,
}

impl Outbound for StreamOut<'_> {
    fn control(&self, command: u8, body: &[u8]) {
        self.wire.relay(command, self.id, body);
    }

    fn sendmes(&self, n: u32) {
        for _ in 0..n {
            self.wire.relay(relay_cmd::SENDME, self.id, &[]);
        }
    }

    fn data(&self, cells: Vec<u8>, _count: u32) -> Result<(), Gone> {
        self.wire.0.borrow_mut().extend_from_slice(&cells);
        Ok(())
    }
}

/// One edge of the circuit.
pub struct Edge {
    pub role: Role,
    pub map: StreamMap<Entry, ()>,
    /// The circuit package window (a `FairWindow` in the daemon).
    pub circuit_package: PackageWindow,
    pub wire: Wire,
    /// Streams that left the map (CLOSED, both threads ended).
    pub closed: Vec<Entry>,
    /// Set when a received cell broke the rules: the edge sent DESTROY.
    pub violation: Option<CircuitViolation>,
    /// The peer destroyed the circuit.
    pub destroyed: bool,
    /// Exit: targets refuse with this END reason instead of accepting.
    pub refuse_with: Option<u8>,
    /// DATA cells this edge sent, over the whole circuit.
    pub data_sent: u32,
}

impl Edge {
    fn new(role: Role) -> Edge {
        Edge {
            role,
            map: StreamMap::new(role),
            circuit_package: PackageWindow::circuit(),
            wire: Wire::default(),
            closed: Vec::new(),
            violation: None,
            destroyed: false,
            refuse_with: None,
            data_sent: 0,
        }
    }

    fn inject(&mut self, command: u8, stream: u16, body: &[u8]) {
        if command == relay_cmd::DATA {
            assert_eq!(self.circuit_package.take(1), 1, "circuit window open");
            self.data_sent += 1;
        }
        self.wire.relay(command, stream, body);
    }

    fn dead(&self) -> bool {
        self.violation.is_some() || self.destroyed
    }

    /// A stream of this edge on `id`, not yet in its map.
    pub fn new_stream(&self, id: u16) -> Entry {
        Entry(Rc::new(TestStream {
            id,
            state: RefCell::new(StreamState::new(Instant::now())),
            app: RefCell::new(App::default()),
            pending: RefCell::new(VecDeque::new()),
            woken: Cell::new(0),
            deliverer_done: Cell::new(false),
            packager_done: Cell::new(false),
        }))
    }

    /// `Stream::handle`: one §7 event under the lock, then its I/O.
    fn handle(&self, s: &TestStream, event: Event) -> Step {
        let out = StreamOut {
            wire: &self.wire,
            id: s.id,
        };
        let step = s
            .state
            .borrow_mut()
            .step(event, &out)
            .expect("a local event is never a violation");
        self.carry_out(s, step);
        step
    }

    /// `Stream::carry_out`: an abort resets the application's connection
    /// and stops both threads (§8).
    fn carry_out(&self, s: &TestStream, step: Step) {
        if matches!(step.action, Action::SendEndAndReset(_) | Action::Reset) {
            s.app.borrow_mut().reset = true;
            s.pending.borrow_mut().clear();
            s.packager_done.set(true);
            s.deliverer_done.set(true);
        }
    }

    /// Everything the packagers and deliverers can do now. True if
    /// anything happened.
    fn run_threads(&mut self) -> bool {
        let streams: Vec<Entry> = self.map.streams().cloned().collect();
        let mut moved = false;
        for s in &streams {
            moved |= self.package(s);
            moved |= self.deliver(s);
        }
        for s in streams {
            if s.packager_done.get() && s.deliverer_done.get() {
                assert!(
                    s.state.borrow().hc.is_closed(),
                    "threads ended before CLOSED"
                );
                self.closed.extend(self.map.remove_stream(s.id));
                moved = true;
            }
        }
        moved
    }

    /// `package_loop`: read what the windows allow; FIN at EOF, END on a
    /// read error.
    fn package(&mut self, s: &Entry) -> bool {
        if s.packager_done.get() || !s.state.borrow().connected {
            return false;
        }
        let window = s.state.borrow().read_window();
        let Some(window) = window else {
            return false; // R10.8: stopped until a SENDME
        };
        if window == 0 {
            s.packager_done.set(true);
            return true;
        }
        let fails = s.app.borrow().fails;
        if fails {
            self.handle(
                s,
                Event::Error {
                    reason: end_reason::CONNRESET,
                },
            );
            return true;
        }
        let (bytes, eof) = {
            let app = s.app.borrow();
            (app.to_send.len(), app.eof)
        };
        if bytes == 0 {
            if eof {
                self.handle(s, Event::ReadEof);
                s.packager_done.set(true);
                return true;
            }
            return false;
        }
        // The circuit window too (R10.8); what it does not allow waits.
        let cells = bytes.div_ceil(DATA_MAX).min(window as usize) as u32;
        let cells = self.circuit_package.take(cells);
        if cells == 0 {
            return false;
        }
        let data: Vec<u8> = {
            let mut app = s.app.borrow_mut();
            let n = (cells as usize * DATA_MAX).min(app.to_send.len());
            app.to_send.drain(..n).collect()
        };
        let mut framed = Vec::with_capacity(cells as usize * CELL_LEN);
        for chunk in data.chunks(DATA_MAX) {
            relay::encode(&mut framed, CIRC, relay_cmd::DATA, s.id, chunk);
        }
        let out = StreamOut {
            wire: &self.wire,
            id: s.id,
        };
        let queued = s
            .state
            .borrow_mut()
            .queue_data(framed, cells, data.len() as u64, Instant::now(), &out)
            .expect("the wire is never gone");
        match queued {
            Queued::Sent => self.data_sent += cells,
            Queued::MayNotPackage => self.circuit_package.give_back(cells),
        }
        true
    }

    /// The deliverer: write what the application takes, count it as
    /// written (R10.7), shut the write side after the peer's FIN.
    fn deliver(&mut self, s: &Entry) -> bool {
        if s.deliverer_done.get() {
            return false;
        }
        let mut moved = false;
        loop {
            let next = s.pending.borrow_mut().pop_front();
            match next {
                None => return moved,
                Some(Pending::Data(mut bytes)) => {
                    let mut app = s.app.borrow_mut();
                    let take = app.room.map_or(bytes.len(), |r| r.min(bytes.len()));
                    if take == 0 {
                        drop(app);
                        s.pending.borrow_mut().push_front(Pending::Data(bytes));
                        return moved;
                    }
                    app.received.extend_from_slice(&bytes[..take]);
                    if let Some(r) = &mut app.room {
                        *r -= take;
                    }
                    drop(app);
                    bytes.drain(..take);
                    // Whole cells only count once all their bytes are taken.
                    let out = StreamOut {
                        wire: &self.wire,
                        id: s.id,
                    };
                    if bytes.is_empty() {
                        let cells = take.div_ceil(DATA_MAX).max(1) as u32;
                        s.state
                            .borrow_mut()
                            .delivered(cells, take, Instant::now(), &out);
                    } else {
                        s.pending.borrow_mut().push_front(Pending::Data(bytes));
                    }
                    moved = true;
                }
                Some(Pending::Fin) => {
                    s.app.borrow_mut().got_eof = true;
                    s.deliverer_done.set(true);
                    return true;
                }
            }
        }
    }

    /// The circuit thread: every cell of `bytes`, in order, until one
    /// breaks the rules (then the circuit is destroyed).
    fn receive(&mut self, bytes: &[u8]) {
        for raw in bytes.chunks_exact(CELL_LEN) {
            if self.dead() {
                return;
            }
            let (c, _) = cell::decode(raw).expect("whole cells");
            if c.command == cmd::DESTROY {
                self.destroy(Event::EndReceived {
                    reason: end_reason::DESTROY,
                });
                self.destroyed = true;
                return;
            }
            if let Err(v) = self.relay_cell(c.payload) {
                self.violation = Some(v);
                self.destroy(Event::EndReceived {
                    reason: end_reason::DESTROY,
                });
                let mut out = self.wire.0.borrow_mut();
                cell::encode_destroy(&mut out, CIRC, cell::destroy_reason::PROTOCOL);
                return;
            }
        }
    }

    /// R3.10, R3.12: every stream is aborted.
    fn destroy(&mut self, event: Event) {
        let (streams, _) = self.map.drain();
        for s in streams {
            let step = s.state.borrow_mut().hc.handle(event).expect("abort");
            self.carry_out(&s, step);
            s.packager_done.set(true);
            s.deliverer_done.set(true);
            self.closed.push(s);
        }
    }

    fn relay_cell(&mut self, payload: &[u8]) -> Result<(), CircuitViolation> {
        let rc = relay::decode(payload)?;
        self.map.check(&rc)?;
        let id = rc.stream_id;
        match rc.command {
            relay_cmd::DATA => {
                let outcome = self.map.on_data(id, 1)?;
                for _ in 0..outcome.circuit_sendmes {
                    self.wire.relay(relay_cmd::SENDME, 0, &[]);
                }
                if outcome.delivery == Delivery::Deliver {
                    let s = self.map.stream(id).expect("delivered to a stream");
                    s.pending
                        .borrow_mut()
                        .push_back(Pending::Data(rc.body.to_vec()));
                }
            }
            relay_cmd::FIN => {
                if let Some(step) = self.map.on_fin(id)? {
                    let s = self.map.stream(id).expect("a FIN's stream").clone();
                    if step.action == Action::DeliverThenShutdownWrite {
                        s.pending.borrow_mut().push_back(Pending::Fin);
                    }
                    self.carry_out(&s, step);
                }
            }
            relay_cmd::END => match self.map.on_end(id, relay::parse_end(rc.body)) {
                Ended::Stream(step) => {
                    let s = self.map.stream(id).expect("an END's stream").clone();
                    self.carry_out(&s, step);
                }
                Ended::Resolve(()) | Ended::Dropped => {}
            },
            relay_cmd::SENDME if id == 0 => self
                .circuit_package
                .on_sendme()
                .map_err(CircuitViolation::CircuitWindow)?,
            relay_cmd::SENDME => self.map.on_stream_sendme(id)?,
            relay_cmd::CONNECTED => {
                self.map.on_connected(id)?;
            }
            relay_cmd::BEGIN => match self.map.on_begin(id, rc.body)? {
                Begin::Malformed(_) => {
                    self.wire
                        .relay(relay_cmd::END, id, &[end_reason::TORPROTOCOL])
                }
                Begin::Open(_) if self.refuse_with.is_some() => {
                    let reason = self.refuse_with.expect("checked");
                    self.wire.relay(relay_cmd::END, id, &[reason]);
                    self.map.refuse(id);
                }
                Begin::Open(_) => {
                    // The target accepts at once: CONNECTED, then package.
                    let s = self.new_stream(id);
                    s.state.borrow_mut().connected = true;
                    let ip = "192.0.2.7".parse().expect("literal");
                    self.wire
                        .relay(relay_cmd::CONNECTED, id, &relay::encode_connected(ip, 300));
                    self.map.insert_stream(id, s);
                }
            },
            relay_cmd::RESOLVE => match self.map.on_resolve(id, rc.body)? {
                Resolve::Lookup(_) | Resolve::Malformed => {
                    let body = relay::encode_resolved(&[relay::Answer::NontransientError], 0);
                    self.wire.relay(relay_cmd::RESOLVED, id, &body);
                    self.map.refuse(id);
                }
            },
            _ => {}
        }
        Ok(())
    }
}

/// A client and an exit joined by one circuit.
pub struct Pair {
    pub client: Edge,
    pub exit: Edge,
    /// The client does not read its link: cells to it wait on the wire
    /// (a congested link, or a client that is busy).
    pub client_link_stalled: bool,
    /// Cells on their way to the client while its link is stalled.
    to_client: Vec<u8>,
}

impl Default for Pair {
    fn default() -> Self {
        Pair {
            client: Edge::new(Role::Client),
            exit: Edge::new(Role::Exit),
            client_link_stalled: false,
            to_client: Vec::new(),
        }
    }
}

impl Pair {
    /// Client: a SOCKS CONNECT: BEGIN, and the client's stream, which
    /// packages once CONNECTED arrived. Returns its ID.
    pub fn open(&mut self) -> u16 {
        let id = self.client.map.allocate_id().expect("a free ID");
        let target = Target {
            host: Host::Name("target.example".into()),
            port: 80,
        };
        self.client
            .wire
            .relay(relay_cmd::BEGIN, id, &relay::encode_begin(&target));
        let s = self.client.new_stream(id);
        self.client.map.insert_stream(id, s);
        id
    }

    /// Runs both edges until nothing moves (or `limit` rounds pass).
    pub fn drive(&mut self) {
        for _ in 0..100_000 {
            let mut moved = false;
            moved |= self.client.run_threads();
            moved |= self.exit.run_threads();
            let to_exit = self.client.wire.take();
            let sent = self.exit.wire.take();
            moved |= !to_exit.is_empty() || !sent.is_empty();
            self.to_client.extend_from_slice(&sent);
            self.exit.receive(&to_exit);
            if !self.client_link_stalled {
                let to_client = std::mem::take(&mut self.to_client);
                moved |= !to_client.is_empty();
                self.client.receive(&to_client);
            }
            if !moved {
                return;
            }
        }
        panic!("the pair never settled");
    }

    /// The client's stream `id` (open, or closed and gone from the map).
    pub fn client_stream(&self, id: u16) -> Entry {
        find(&self.client, id)
    }

    /// The exit's stream `id`.
    pub fn exit_stream(&self, id: u16) -> Entry {
        find(&self.exit, id)
    }

    /// Sends a cell of the test's own as if the client had queued it. A
    /// DATA cell takes the client's circuit window, as any sender's does
    /// (but no stream window: the test plays a peer that may ignore it).
    pub fn client_sends(&mut self, command: u8, stream: u16, body: &[u8]) {
        self.client.inject(command, stream, body);
    }

    /// Sends a cell of the test's own as if the exit had queued it.
    pub fn exit_sends(&mut self, command: u8, stream: u16, body: &[u8]) {
        self.exit.inject(command, stream, body);
    }
}

fn find(edge: &Edge, id: u16) -> Entry {
    edge.map
        .stream(id)
        .cloned()
        .or_else(|| edge.closed.iter().rev().find(|s| s.id == id).cloned())
        .unwrap_or_else(|| panic!("no stream {id}"))
}

/// The §7 state of a stream.
pub fn state(s: &Entry) -> State {
    s.state.borrow().hc.state()
}

/// `len` bytes of a pattern that shows reordering and loss.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

pub const CIRCUIT_START: u32 = CIRCUIT_WINDOW_START;
