//! Hostile peers: each test attacks a running daemon over raw loopback
//! sockets while a *bystander* (a healthy link, circuit and stream of
//! another user) carries data. Every case checks four things:
//!
//! 1. the offending link, circuit or stream gets the answer
//!    docs/protocol.md prescribes (the requirement is cited at each case);
//! 2. the bystander's bytes arrive intact, both ways, before and after;
//! 3. once the attacker is gone the daemon's threads return to baseline;
//! 4. memory stays bounded: RSS after the attack is within `RSS_SLACK_KIB`
//!    of RSS before, while the attacks that could make a daemon buffer push
//!    several times that many bytes at it.

use crate::util::*;
use crate::wire::*;
use halfpipe_proto::cell::{self, cmd, destroy_reason};
use halfpipe_proto::relay::{self, end_reason, relay_cmd};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How much an attack may grow the daemon's RSS for good. Not a timing
/// figure: a bound on memory, which must not follow the attacker's bytes.
const RSS_SLACK_KIB: u64 = 32 * 1024;

// ------------------------------------------------------------------ helpers

/// The daemon's resident set, from /proc.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Deterministic pseudo-random numbers (splitmix64): a failing case can be
/// replayed from its seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Thread count and RSS before an attack, taken with the bystander up.
pub(crate) struct Baseline {
    threads: usize,
    rss: u64,
}

impl Baseline {
    pub(crate) fn take(d: &Daemon) -> Baseline {
        Baseline {
            threads: d.thread_count(),
            rss: rss_kib(d.pid()),
        }
    }

    /// Checks 3 and 4 of the module doc, once the attacker is gone.
    pub(crate) fn assert_recovered(&self, d: &mut Daemon, what: &str) {
        assert!(d.is_running(), "{what}: the daemon died:\n{}", d.log());
        d.wait_for_threads(self.threads);
        let rss = rss_kib(d.pid());
        assert!(
            rss <= self.rss + RSS_SLACK_KIB,
            "{what}: RSS grew from {} KiB to {rss} KiB",
            self.rss
        );
        eprintln!("{what}: RSS {} KiB -> {rss} KiB", self.rss);
    }
}

/// Another user's link, circuit and stream to a target of its own.
pub(crate) struct Bystander {
    l: RawLink,
    circ: u32,
    target: TcpStream,
    round: u8,
    _targets: Targets,
}

impl Bystander {
    pub(crate) fn new(d: &Daemon) -> Bystander {
        let targets = Targets::new();
        let circ = fresh_circ();
        let mut l = linked(d, circ);
        let target = open_stream(&mut l, circ, 1, &targets);
        let mut b = Bystander {
            l,
            circ,
            target,
            round: 0,
            _targets: targets,
        };
        b.check("the bystander before the attack");
        b
    }

    /// 2,000 bytes each way, compared byte for byte.
    pub(crate) fn check(&mut self, when: &str) {
        self.round += 1;
        let up = pattern(2_000, self.round);
        send_data(&mut self.l, self.circ, 1, &up);
        assert_eq!(read_n(&mut self.target, up.len()), up, "{when}: upstream");
        let down = pattern(2_000, self.round.wrapping_add(100));
        self.target.write_all(&down).unwrap();
        let got = recv_data(&mut self.l, self.circ, 1, down.len());
        assert_eq!(got, down, "{when}: downstream");
    }
}

/// A link whose cells are read by a thread of their own, so that an
/// attacker that writes a lot never stops reading (a peer that stops reading
/// is cut off, which is a different case: `regression::peer_that_never_reads_is_cut_off`).
struct Drained {
    w: TcpStream,
    rx: mpsc::Receiver<RawCell>,
    reader: JoinHandle<()>,
}

impl Drained {
    fn new(l: RawLink) -> Drained {
        let w = l.sock.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        let mut l = l;
        let reader = thread::spawn(move || {
            while let Some(c) = l.recv_cell() {
                if tx.send(c).is_err() {
                    break;
                }
            }
        });
        Drained { w, rx, reader }
    }

    /// Every cell up to and including the first that `done` accepts.
    fn until(&self, what: &str, done: impl Fn(&RawCell) -> bool) -> Vec<RawCell> {
        let mut seen = Vec::new();
        loop {
            let c = self
                .rx
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|e| panic!("waiting for {what}: {e} after {} cells", seen.len()));
            let last = done(&c);
            seen.push(c);
            if last {
                return seen;
            }
        }
    }

    /// Proves the link still works after everything sent before: a new
    /// circuit is created. Returns the cells that came first.
    fn alive(&mut self) -> Vec<RawCell> {
        let circ = fresh_circ();
        let mut out = Vec::new();
        cell::encode_fixed(&mut out, circ, cmd::CREATE_FAST, &[7; 20]);
        self.w.write_all(&out).unwrap();
        self.until("CREATED_FAST on a new circuit", |c| {
            c.circ == circ && c.command == cmd::CREATED_FAST
        })
    }

    fn close(self) -> Vec<RawCell> {
        let _ = self.w.shutdown(std::net::Shutdown::Both);
        self.reader.join().unwrap();
        self.rx.try_iter().collect()
    }
}

/// A target that accepts every connection and holds it, reading and
/// discarding, until the connection ends.
fn holding_target() -> Server {
    Server::start(|mut s| {
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    })
}

/// Counts the cells an attacker got back, by kind (for messages).
fn tally(cells: &[RawCell]) -> HashMap<String, usize> {
    let mut t = HashMap::new();
    for c in cells {
        let kind = match c.command {
            cmd::RELAY => match relay::decode(&c.payload) {
                Ok(rc) => relay_cmd::name(rc.command).to_string(),
                Err(e) => format!("bad relay: {e}"),
            },
            cmd::DESTROY => format!("DESTROY({})", destroy_reason::name(c.payload[0])),
            other => format!("cell {other}"),
        };
        *t.entry(kind).or_default() += 1;
    }
    t
}

/// docs/protocol.md §3: once the exit has sent DESTROY for a circuit it sends
/// nothing more on that CircID until it answers a new CREATE_FAST there
/// (docs/design.md, invariant 9); and every RELAY cell it sends decodes (R4.1).
/// A stale packager queueing DATA after the DESTROY would hand a reused CircID
/// another user's bytes.
fn assert_nothing_after_destroy(cells: &[RawCell]) {
    let mut destroyed = HashSet::new();
    for (i, c) in cells.iter().enumerate() {
        match c.command {
            cmd::DESTROY => {
                destroyed.insert(c.circ);
            }
            cmd::CREATED_FAST => {
                destroyed.remove(&c.circ);
            }
            _ => assert!(
                !destroyed.contains(&c.circ),
                "cell {i} ({}) on circ {:#x} after the exit destroyed it; that circuit's cells: {:?}",
                describe(c),
                c.circ,
                cells[..=i].iter().filter(|x| x.circ == c.circ).map(describe).collect::<Vec<_>>()
            ),
        }
        if c.command == cmd::RELAY {
            relay::decode(&c.payload).unwrap_or_else(|e| panic!("cell {i}: {e}"));
        }
    }
}

// ------------------------------------------------------------ random bytes

#[test]
fn random_bytes_before_the_handshake_close_only_that_link() {
    // The handshake of a plain link; §13's has tests of its own (tls.rs).
    use_plain_links();
    // R1.5: a first cell that is not VERSIONS closes the link, R1.7:
    // without an answer; R1.8: nothing else is affected. 40 links of 64 KiB
    // of random bytes each.
    let mut d = open_exit(&[]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let mut rng = Rng(1);
    for _ in 0..40 {
        let mut junk = rng.bytes(64 * 1024);
        junk[2] = 3; // command RELAY: never a VERSIONS cell
        let mut s = TcpStream::connect(d.link()).unwrap();
        let _ = s.write_all(&junk); // the exit may close before reading it all
        assert!(
            read_until_closed(&mut s).is_empty(),
            "the exit answered random bytes"
        );
    }
    by.check("after 40 links of random bytes");
    before.assert_recovered(&mut d, "random bytes before the handshake");
}

fn random_bytes_after_the_handshake_are_contained() {
    // After the handshake, random bytes are cells with random commands and
    // lengths (§1 variable cells, §2 fixed cells): whatever they ask for,
    // the daemon answers cell by cell and survives. 2 links × 8 MiB.
    let mut d = open_exit(&[]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    for seed in [2, 3] {
        let l = Drained::new(RawLink::connect(d.link()));
        let mut rng = Rng(seed);
        let mut w = l.w.try_clone().unwrap();
        for _ in 0..128 {
            if w.write_all(&rng.bytes(64 * 1024)).is_err() {
                break; // the exit may close a link it cannot frame
            }
        }
        let cells = l.close();
        assert_nothing_after_destroy(&cells);
        eprintln!("random link {seed}: {:?}", tally(&cells));
    }
    by.check("after random bytes on two links");
    before.assert_recovered(&mut d, "random bytes after the handshake");
}

/// One random but well-framed cell: circuits from a small set so that
/// relay cells meet live circuits and streams; BEGINs sometimes reach a
/// real target so streams open, carry DATA and end.
fn random_cell(rng: &mut Rng, circs: &[u32], target: &str, out: &mut Vec<u8>) {
    let circ = circs[rng.below(circs.len() as u64) as usize];
    match rng.below(100) {
        0..=9 => cell::encode_fixed(out, circ, cmd::CREATE_FAST, &rng.bytes(20)),
        10..=12 => cell::encode_fixed(out, circ, cmd::DESTROY, &[rng.below(12) as u8]),
        13..=17 => {
            // A fixed-size cell: VERSIONS (7) would be read as variable-size.
            let command = match rng.below(16) as u8 {
                cmd::VERSIONS => cmd::PADDING,
                c => c,
            };
            let len = rng.below(510) as usize;
            cell::encode_fixed(out, circ, command, &rng.bytes(len));
        }
        18..=19 => {
            let len = rng.below(2000) as usize;
            cell::encode_var(out, circ, 128 + rng.below(128) as u8, &rng.bytes(len));
        }
        _ => {
            let stream = rng.below(5) as u16;
            let command = match rng.below(20) {
                0..=11 => rng.below(16) as u8,
                12..=15 => relay_cmd::BEGIN,
                _ => rng.next() as u8,
            };
            let body = if command == relay_cmd::BEGIN && rng.below(2) == 0 {
                begin_body(target)
            } else {
                let len = rng.below(relay::DATA_MAX as u64 + 1) as usize;
                let mut b = rng.bytes(len);
                if let Some(first) = b.first_mut() {
                    // Never a name a resolver would look up: tests send
                    // nothing beyond loopback.
                    *first = 0xFF;
                }
                b
            };
            relay::encode(out, circ, command, stream, &body);
            if rng.below(20) == 0 {
                // Break the relay header: Recognized, Length or both.
                let at = out.len() - cell::CELL_LEN + 5 + [1, 2, 9, 10][rng.below(4) as usize];
                out[at] = rng.next() as u8;
            }
        }
    }
}

fn random_well_framed_cells_get_answers_cell_by_cell() {
    // Three links at once, 20,000 random cells each: CREATE_FAST on
    // CircIDs in and out of use (§3), relay cells with random commands,
    // streams and bodies (§4, §5), BEGINs to a real target, broken relay
    // headers, DESTROYs. Each link must live through all of it (nothing
    // here is a link-level error), every answer must decode, and nothing
    // may follow a DESTROY on its CircID (§3).
    let mut d = open_exit(&[]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let target = Arc::new(holding_target());
    let links: Vec<_> = (4..7u64)
        .map(|seed| {
            let mut l = Drained::new(RawLink::connect(d.link()));
            let target = target.clone();
            thread::spawn(move || {
                let circs: Vec<u32> = (0..6).map(|_| fresh_circ()).collect();
                let mut rng = Rng(seed);
                for _ in 0..200 {
                    let mut out = Vec::new();
                    for _ in 0..100 {
                        random_cell(&mut rng, &circs, &target.addr.to_string(), &mut out);
                    }
                    l.w.write_all(&out).unwrap();
                }
                let mut cells = l.alive();
                cells.extend(l.close());
                (seed, cells)
            })
        })
        .collect();
    by.check("during the random cells");
    let mut connected = 0;
    for link in links {
        let (seed, cells) = link.join().expect("a random link failed");
        assert_nothing_after_destroy(&cells);
        let t = tally(&cells);
        eprintln!("random cells, seed {seed}: {t:?}");
        assert!(
            t.get("DESTROY(PROTOCOL)").copied().unwrap_or(0) > 0,
            "seed {seed}: the random cells should break circuits: {t:?}"
        );
        connected += t.get("CONNECTED").copied().unwrap_or(0);
    }
    // A stream opens only if its circuit lives until the connect is done,
    // which random DESTROYs and violations make rare (a handful a link on
    // a quiet machine, fewer under load): asked of the three links together.
    assert!(connected > 0, "the random cells should open streams");
    before.assert_recovered(&mut d, "random well-framed cells");
}

// ------------------------------------------------- truncation and dribbling

fn a_peer_that_stops_mid_cell_holds_only_its_own_link() {
    // A truncated cell is not an error until the link ends (TCP may deliver
    // the rest later); meanwhile the stream's earlier DATA was delivered,
    // and other links are served. When the peer goes, its circuit and
    // stream go with it (R3.13: the target sees a reset).
    let mut d = open_exit(&[]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let t = Targets::new();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    let mut out = Vec::new();
    relay::encode(&mut out, circ, relay_cmd::DATA, 1, b"whole cell");
    relay::encode(&mut out, circ, relay_cmd::DATA, 1, b"half a cell");
    out.truncate(cell::CELL_LEN + 300);
    l.sock.write_all(&out).unwrap();
    assert_eq!(read_n(&mut target, 10), b"whole cell");
    by.check("while a link is stopped mid-cell");
    drop(l);
    expect_reset(&mut target);

    // Mid-way through a variable-length cell that announced 65,535 bytes.
    let mut l = RawLink::connect(d.link());
    let mut out = Vec::new();
    cell::encode_var(&mut out, 0, cmd::VPADDING, &vec![0; 65_535]);
    out.truncate(1_000);
    l.sock.write_all(&out).unwrap();
    by.check("while a link is stopped mid-variable-cell");
    drop(l);
    before.assert_recovered(&mut d, "peers that stop mid-cell");
}

#[test]
fn a_handshake_dribbled_one_byte_per_second_is_closed_at_the_timeout() {
    // The handshake of a plain link; §13's has tests of its own (tls.rs).
    use_plain_links();
    // R1.6: the handshake must be *complete* within the timeout; bytes
    // trickling in do not extend it. The dribbler would take 40 s to
    // finish its VERSIONS cell; the link is closed at 2 s, unanswered.
    let mut d = open_exit(&["--handshake-timeout", "2s"]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let mut versions = vec![0, 0, cmd::VERSIONS, 0, 34];
    versions.extend((1..=17u16).flat_map(|v| v.to_be_bytes()));
    let mut s = TcpStream::connect(d.link()).unwrap();
    let sent = Arc::new(Mutex::new(0usize));
    let dribbler = {
        let mut s = s.try_clone().unwrap();
        let sent = sent.clone();
        thread::spawn(move || {
            for b in versions {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                *sent.lock().unwrap() += 1;
                thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let since = Instant::now();
    assert!(
        read_until_closed(&mut s).is_empty(),
        "a dribbler got VERSIONS"
    );
    let at = since.elapsed();
    let dribbled = *sent.lock().unwrap();
    assert!(
        dribbled < 39,
        "the link stayed open while all {dribbled} bytes dribbled in"
    );
    // A lower bound only: closing earlier would break R1.6.
    assert!(at >= Duration::from_millis(1_900), "closed after {at:?}");
    eprintln!("dribbled handshake closed after {at:?} and {dribbled} bytes");
    d.wait_for_log("no complete VERSIONS within 2s");
    by.check("after the dribbler");
    dribbler.join().unwrap();
    before.assert_recovered(&mut d, "a dribbled handshake");
}

fn silent_connections_past_the_link_limit_are_closed_and_others_served() {
    // The exit holds at most 128 links (two threads each,
    // src/process/limits.rs); a flood of connections that never handshake takes
    // the free slots until the handshake timeout (§1) and nothing more:
    // connections past the limit are closed at once, links already up are
    // untouched, and once the flood times out new links are accepted again.
    let mut d = open_exit(&["--handshake-timeout", "2s"]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let flood: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(d.link()).unwrap())
        .collect();
    d.wait_for_log("links open: closing a new connection");
    by.check("during a flood of silent connections");
    for mut s in flood {
        assert!(read_until_closed(&mut s).is_empty());
    }
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    ping(&mut l, circ);
    drop(l);
    before.assert_recovered(&mut d, "a flood of silent connections");
}

// ---------------------------------------------------- oversized and floods

fn variable_cells_announcing_65535_bytes_are_read_and_dropped() {
    // R1.10: variable-length cells after the handshake are read in full and
    // ignored. 1,000 of the largest (64 MiB) must not be kept.
    let mut d = open_exit(&[]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let mut l = Drained::new(RawLink::connect(d.link()));
    let mut big = Vec::new();
    cell::encode_var(&mut big, 0, cmd::VPADDING, &vec![0xEE; 65_535]);
    cell::encode_var(&mut big, 1, cmd::VERSIONS, &vec![0x04; 65_535]);
    cell::encode_var(&mut big, 2, 250, &vec![0x11; 65_535]);
    for _ in 0..333 {
        l.w.write_all(&big).unwrap();
    }
    let first = l.alive();
    assert_eq!(
        first.len(),
        1,
        "answers to ignored cells: {:?}",
        tally(&first)
    );
    by.check("after 64 MiB of variable-length cells");
    l.close();
    before.assert_recovered(&mut d, "65,535-byte variable cells");
}

fn create_fast_beyond_the_circuit_limits_is_destroy_resourcelimit() {
    // R3.8: past the circuit limit, DESTROY(RESOURCELIMIT). Per
    // link (--max-circuits-per-link 20: 1,000 CREATE_FASTs on one link),
    // and per process (512 circuits: 30 links of 20 asking for 600).
    let mut d = open_exit(&["--max-circuits-per-link", "20"]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let l = Drained::new(RawLink::connect(d.link()));
    let mut out = Vec::new();
    let circs: Vec<u32> = (0..1_000).map(|_| fresh_circ()).collect();
    for &c in &circs {
        cell::encode_fixed(&mut out, c, cmd::CREATE_FAST, &[1; 20]);
    }
    (&l.w).write_all(&out).unwrap();
    let last = *circs.last().unwrap();
    let cells = l.until("the answer to the last CREATE_FAST", |c| c.circ == last);
    let t = tally(&cells);
    assert_eq!(cells.len(), 1_000, "{t:?}");
    assert_eq!(t.get("cell 6").copied(), Some(20), "CREATED_FAST: {t:?}");
    assert_eq!(t.get("DESTROY(RESOURCELIMIT)").copied(), Some(980), "{t:?}");
    by.check("after 1,000 CREATE_FASTs on one link");
    l.close();

    let mut links = Vec::new();
    let (mut created, mut refused) = (0, 0);
    for _ in 0..30 {
        let l = Drained::new(RawLink::connect(d.link()));
        let circs: Vec<u32> = (0..20).map(|_| fresh_circ()).collect();
        let mut out = Vec::new();
        for &c in &circs {
            cell::encode_fixed(&mut out, c, cmd::CREATE_FAST, &[1; 20]);
        }
        (&l.w).write_all(&out).unwrap();
        let last = *circs.last().unwrap();
        for c in l.until("20 answers", |c| c.circ == last) {
            match c.command {
                cmd::CREATED_FAST => created += 1,
                cmd::DESTROY if c.payload[0] == destroy_reason::RESOURCELIMIT => refused += 1,
                _ => panic!("unexpected {}", describe(&c)),
            }
        }
        links.push(l);
    }
    // The bystander holds one of the 512.
    assert_eq!((created, refused), (511, 89));
    by.check("with the process at its circuit limit");
    for l in links {
        l.close();
    }
    before.assert_recovered(&mut d, "CREATE_FAST floods");
}

fn thousands_of_begins_beyond_the_stream_limit_are_end_resourcelimit() {
    // R5.11: the stream limit is reached → END(RESOURCELIMIT):
    // 3,000 BEGINs on one circuit with --max-streams-per-circuit 10.
    let mut d = open_exit(&["--max-streams-per-circuit", "10"]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let target = holding_target();
    let circ = fresh_circ();
    let mut l = RawLink::connect(d.link());
    l.create_circuit(circ);
    let l = Drained::new(l);
    let mut out = Vec::new();
    let body = begin_body(&target.addr.to_string());
    for sid in 1..=3_000u16 {
        relay::encode(&mut out, circ, relay_cmd::BEGIN, sid, &body);
    }
    (&l.w).write_all(&out).unwrap();
    let mut connected = 0;
    let mut limited = 0;
    while connected + limited < 3_000 {
        let c =
            l.rx.recv_timeout(PATIENCE)
                .expect("an answer to every BEGIN");
        match relay_of(&c) {
            Some((relay_cmd::CONNECTED, _, _)) => connected += 1,
            Some((relay_cmd::END, _, b)) if b == [end_reason::RESOURCELIMIT] => limited += 1,
            _ => panic!("unexpected {}", describe(&c)),
        }
    }
    assert_eq!((connected, limited), (10, 2_990));
    by.check("with a circuit at its stream limit");
    l.close();
    before.assert_recovered(&mut d, "a BEGIN flood");
}

fn window_overruns_and_sendme_floods_destroy_only_their_circuit() {
    // R10.10: DATA beyond the deliver window, and R10.11: SENDMEs that
    // would raise a window above its start, are violations: DESTROY
    // (PROTOCOL) for that circuit (R3.12), the stream's target sees a reset
    // (R3.10), the rest of the flood is dropped as cells for a destroyed
    // circuit (R3.11), and the link lives on.
    let mut d = open_exit(&[]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let t = Targets::new();
    let mut l = RawLink::connect(d.link());

    // 20,000 DATA cells (10 MB) at a target that does not read.
    let circ = fresh_circ();
    l.create_circuit(circ);
    let mut target = open_stream(&mut l, circ, 1, &t);
    let mut w = l.sock.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut out = Vec::new();
        for _ in 0..20_000 {
            relay::encode(&mut out, circ, relay_cmd::DATA, 1, &[0xAB; relay::DATA_MAX]);
        }
        w.write_all(&out).unwrap();
    });
    expect_destroy(&mut l, circ, destroy_reason::PROTOCOL);
    writer.join().unwrap();
    expect_reset(&mut target);
    link_alive(&mut l);

    // 10,000 circuit-level SENDMEs on a fresh circuit, and 10,000 stream
    // SENDMEs on an open stream.
    for stream_level in [false, true] {
        let circ = fresh_circ();
        l.create_circuit(circ);
        let sid = u16::from(stream_level);
        let _target = stream_level.then(|| open_stream(&mut l, circ, sid, &t));
        let mut out = Vec::new();
        for _ in 0..10_000 {
            relay::encode(&mut out, circ, relay_cmd::SENDME, sid, &[]);
        }
        l.sock.write_all(&out).unwrap();
        expect_destroy(&mut l, circ, destroy_reason::PROTOCOL);
        link_alive(&mut l);
    }
    by.check("after window overruns and SENDME floods");
    drop(l);
    before.assert_recovered(&mut d, "window overruns and SENDME floods");
}

fn floods_for_unknown_circuits_and_streams_are_dropped_silently() {
    // R3.14: RELAY and DESTROY for unknown circuits are dropped silently;
    // R9.5: cells for streams never opened are dropped. 10,000 of
    // each, then the link and the circuit answer as before.
    let mut d = open_exit(&[]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut out = Vec::new();
    for i in 0..10_000u32 {
        let never = 0x8100_0000 | i;
        cell::encode_fixed(&mut out, never, cmd::DESTROY, &[destroy_reason::REQUESTED]);
        relay::encode(&mut out, never, relay_cmd::DATA, 1, b"to nobody");
        let command = [
            relay_cmd::DATA,
            relay_cmd::SENDME,
            relay_cmd::FIN,
            relay_cmd::END,
        ][i as usize % 4];
        relay::encode(&mut out, circ, command, 1_000 + (i % 30_000) as u16, b"x");
    }
    l.sock.write_all(&out).unwrap();
    ping(&mut l, circ);
    link_alive(&mut l);
    by.check("after 30,000 cells for unknown circuits and streams");
    drop(l);
    before.assert_recovered(&mut d, "cells for unknown circuits and streams");
}

fn begin_with_hostile_addresses_is_end_torprotocol() {
    // R5.5: a malformed BEGIN payload → END(TORPROTOCOL):
    // a body of 498 bytes with no NUL, a 497-byte name, bytes that are not
    // UTF-8, NULs only, a NUL inside the name. The circuit carries on, and
    // nothing is connected. RESOLVE with the same names gets END too.
    let mut d = open_exit(&[]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let circ = fresh_circ();
    let mut l = linked(&d, circ);
    let mut long = vec![b'a'; relay::DATA_MAX - 7];
    long.extend_from_slice(format!(":{port}\0").as_bytes());
    let mut non_utf8 = vec![0xFF, 0xFE, 0xC0, 0x80];
    non_utf8.extend_from_slice(format!(":{port}\0").as_bytes());
    let cases: Vec<Vec<u8>> = vec![
        vec![b'a'; relay::DATA_MAX],
        long,
        non_utf8,
        vec![0; relay::DATA_MAX],
        format!("127.0\0.0.1:{port}\0").into_bytes(),
    ];
    for (i, body) in cases.iter().enumerate() {
        let sid = 10 + i as u16;
        l.send_relay(circ, relay_cmd::BEGIN, sid, body);
        let c = next(&mut l);
        assert!(
            is_relay(&c, circ, relay_cmd::END, sid),
            "BEGIN {:?}: expected END, got {}",
            String::from_utf8_lossy(&body[..body.len().min(40)]),
            describe(&c)
        );
        assert_eq!(
            relay_of(&c).unwrap().2,
            [end_reason::TORPROTOCOL],
            "case {i}"
        );
        l.send_relay(circ, relay_cmd::RESOLVE, 100 + sid, body);
        let c = next(&mut l);
        assert!(
            is_relay(&c, circ, relay_cmd::END, 100 + sid)
                || is_relay(&c, circ, relay_cmd::RESOLVED, 100 + sid),
            "RESOLVE case {i}: got {}",
            describe(&c)
        );
    }
    ping(&mut l, circ);
    assert_no_connection(&listener);
    by.check("after hostile BEGIN addresses");
    drop(l);
    before.assert_recovered(&mut d, "hostile BEGIN addresses");
}

// -------------------------------------------------------------- SOCKS side

/// A SOCKS bystander: one stream through `halfpipe run` to an echo server.
/// Opened before any attack, so a refusal here is the machine's, not the
/// test's: on a machine busy with other tests, a thread start can fail for
/// a moment (END(RESOURCELIMIT), SOCKS 0x01; it happened in CI beside the
/// thread-exhaustion test, which now runs in a binary of its own). Retried
/// for up to `PATIENCE`; the last failure fails the test.
fn socks_echo(d: &Daemon, echo: SocketAddr) -> TcpStream {
    let deadline = std::time::Instant::now() + PATIENCE;
    let s = loop {
        match socks5(d.socks(), "127.0.0.1", echo.port(), None) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("bystander SOCKS connect failed ({e}), retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("SOCKS connect: {e}\n{}", d.log()),
        }
    };
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

fn echo_check(s: &mut TcpStream, round: u8) {
    let data = pattern(5_000, round);
    s.write_all(&data).unwrap();
    assert_eq!(read_n(s, data.len()), data, "the SOCKS bystander's echo");
}

fn hostile_socks_clients_are_contained() {
    // §11: garbage gets the connection closed (a SOCKS5 failure reply at
    // most); a client that stalls mid-handshake is closed at the SOCKS
    // timeout; R11.13: BIND and UDP ASSOCIATE get 0x07; past 256 stalled
    // handshakes the oldest gives way to a new connection. The SOCKS
    // bystander's stream carries on throughout.
    let echo = Server::echo();
    let mut d = Daemon::run(&["--exit-policy", "accept *:*", "--socks-timeout", "2s"]);
    let mut by = socks_echo(&d, echo.addr);
    echo_check(&mut by, 1);
    let before = Baseline::take(&d);
    // Garbage that can never form a valid request (so nothing is
    // connected or resolved): four kinds, each with its expected answer.
    let mut rng = Rng(5);
    for i in 0..40 {
        let mut s = TcpStream::connect(d.socks()).unwrap();
        let len = 8 + rng.below(4096) as usize;
        let mut junk = rng.bytes(len);
        let expect: &[u8] = match i % 4 {
            // Not SOCKS at all: closed without a word.
            0 => {
                junk[0] = [0u8, 1, 0x16, b'G'][rng.below(4) as usize];
                &[]
            }
            // SOCKS5 offering only methods we lack: "no acceptable method".
            1 => {
                junk[0] = 5;
                junk[1] = 3;
                junk[2..5].copy_from_slice(&[0x01, 0x03, 0x80]);
                &[5, 0xFF]
            }
            // SOCKS5 request with a bad version byte: closed after the
            // method reply.
            2 => {
                junk[..4].copy_from_slice(&[5, 1, 0, 9]);
                &[5, 0]
            }
            // SOCKS4 with a user ID that never ends (no NUL in 4 KiB).
            _ => {
                junk[..2].copy_from_slice(&[4, 1]);
                for b in &mut junk[8..] {
                    *b |= 1;
                }
                &[]
            }
        };
        let _ = s.write_all(&junk);
        let answer = read_until_closed(&mut s);
        assert!(
            answer.starts_with(expect)
                && !answer[expect.len()..].starts_with(&[5, 0])
                && !answer.starts_with(&[0, 0x5A]),
            "garbage {i}: expected {expect:?} then a close, got {answer:?}"
        );
    }
    echo_check(&mut by, 2);
    for command in [2u8, 3] {
        let mut s = TcpStream::connect(d.socks()).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(&[5, 1, 0]).unwrap();
        assert_eq!(read_n(&mut s, 2), [5, 0]);
        s.write_all(&socks5_request(command, "127.0.0.1", echo.addr.port()))
            .unwrap();
        assert_eq!(read_socks5_reply(&mut s), 0x07, "command {command}");
    }
    // 300 clients stalled half-way through SOCKS5.
    let stalled: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(d.socks()).unwrap();
            s.write_all(&[5, 1]).unwrap();
            s
        })
        .collect();
    d.wait_for_log("SOCKS handshakes in progress: closing the oldest");
    echo_check(&mut by, 3);
    // A good client arriving now is served.
    let latecomer = {
        let (socks, port) = (d.socks(), echo.addr.port());
        thread::spawn(move || {
            let mut s =
                socks5(socks, "127.0.0.1", port, None).expect("the latecomer's SOCKS connect");
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            echo_check(&mut s, 4);
        })
    };
    for mut s in stalled {
        read_until_closed(&mut s);
    }
    latecomer.join().expect("the latecomer was served");
    echo_check(&mut by, 5);
    before.assert_recovered(&mut d, "hostile SOCKS clients");
}

// ------------------------------------------------------- SOCKS slowloris

fn socks_clients_that_dribble_their_handshakes_cannot_keep_a_prompt_one_waiting() {
    // 300 SOCKS connections that send the first byte of a greeting and
    // then nothing, more than the 256 handshakes served at once, with a
    // --socks-timeout far longer than the test waits: a prompt client is
    // still served (the oldest dribbling handshake gives way to it), the
    // daemon's threads stay bounded, and they come back when the
    // dribblers go.
    let d = Daemon::run(&["--socks-timeout", "120s"]);
    let baseline = d.thread_count();
    let echo = Server::echo();
    let dribblers: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(d.socks()).unwrap();
            s.write_all(&[5]).unwrap();
            s
        })
        .collect();
    // Let the acceptor take them all in.
    thread::sleep(Duration::from_millis(500));
    let mut s = socks5(d.socks(), "127.0.0.1", echo.addr.port(), None)
        .expect("a prompt client is served while 300 others dribble");
    s.write_all(b"prompt").unwrap();
    let mut got = [0u8; 6];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"prompt");
    let threads = d.thread_count();
    assert!(
        threads <= baseline + 256 + 8,
        "{threads} threads (baseline {baseline})"
    );
    drop(s);
    drop(dribblers);
    d.wait_for_threads(baseline);
}

// ------------------------------------------------ a peer that stops reading

fn a_link_peer_that_stops_reading_is_cut_off_at_the_stall_timeout() {
    // 20 circuits with a stream each to targets that send, while the link
    // peer reads nothing: the exit's link writer fills the kernel's buffers
    // and then makes no progress; at --stall-timeout the exit tears the
    // link down, the targets see their streams reset, and every thread the
    // link held is freed.
    let d = open_exit(&["--stall-timeout", "1s"]);
    let baseline = d.thread_count();
    let t = Targets::new();
    let mut l = RawLink::connect(d.link());
    // Every stream opens before any target sends.
    let targets: Vec<TcpStream> = (0..20)
        .map(|_| {
            let circ = fresh_circ();
            l.create_circuit(circ);
            open_stream(&mut l, circ, 1, &t)
        })
        .collect();
    let senders: Vec<_> = targets
        .into_iter()
        .map(|mut target| {
            thread::spawn(move || {
                let chunk = vec![7u8; 64 * 1024];
                // Until the exit resets the stream.
                while target.write_all(&chunk).is_ok() {}
            })
        })
        .collect();
    // From here on the peer reads nothing.
    d.wait_for_log("link peer has taken nothing");
    for s in senders {
        s.join().unwrap();
    }
    d.wait_for_threads(baseline);
    drop(l);
}

// ----------------------------------------------- one source, many slots

fn one_link_cannot_take_the_stream_slots_another_link_needs() {
    // --max-streams 20: a link that asks for 20 streams gets 16 (once a
    // quarter of the slots is left, a source holding half gets no more:
    // END(RESOURCELIMIT), counted as limit "share"), and a second link is
    // still served the remaining 4.
    let d = open_exit(&["--max-streams", "20", "--status", "127.0.0.1:0"]);
    let t = Targets::new();
    let hold = |l: &mut RawLink, circ: u32, sid: u16| -> Option<TcpStream> {
        l.send_relay(circ, relay_cmd::BEGIN, sid, &begin_body(&t.target()));
        let c = next(l);
        match relay_of(&c) {
            Some((relay_cmd::CONNECTED, s, _)) if s == sid => Some(t.accept()),
            Some((relay_cmd::END, s, body)) if s == sid => {
                assert_eq!(body.first(), Some(&end_reason::RESOURCELIMIT));
                None
            }
            _ => panic!("expected CONNECTED or END, got {}", describe(&c)),
        }
    };
    let a_circ = fresh_circ();
    let mut a = linked(&d, a_circ);
    let a_held: Vec<TcpStream> = (1..=20)
        .filter_map(|sid| hold(&mut a, a_circ, sid))
        .collect();
    assert_eq!(a_held.len(), 16);
    let b_circ = fresh_circ();
    let mut b = linked(&d, b_circ);
    let b_held: Vec<TcpStream> = (1..=4)
        .filter_map(|sid| hold(&mut b, b_circ, sid))
        .collect();
    assert_eq!(b_held.len(), 4, "the second link gets the last quarter");
    let metrics = metrics_text(&d);
    assert!(
        metrics.contains("halfpipe_streams_refused_total{limit=\"share\"} 4"),
        "{metrics}"
    );
}

over_both_links!(
    random_bytes_after_the_handshake_are_contained,
    random_well_framed_cells_get_answers_cell_by_cell,
    a_peer_that_stops_mid_cell_holds_only_its_own_link,
    silent_connections_past_the_link_limit_are_closed_and_others_served,
    variable_cells_announcing_65535_bytes_are_read_and_dropped,
    create_fast_beyond_the_circuit_limits_is_destroy_resourcelimit,
    thousands_of_begins_beyond_the_stream_limit_are_end_resourcelimit,
    window_overruns_and_sendme_floods_destroy_only_their_circuit,
    floods_for_unknown_circuits_and_streams_are_dropped_silently,
    begin_with_hostile_addresses_is_end_torprotocol,
    hostile_socks_clients_are_contained,
    socks_clients_that_dribble_their_handshakes_cannot_keep_a_prompt_one_waiting,
    a_link_peer_that_stops_reading_is_cut_off_at_the_stall_timeout,
    one_link_cannot_take_the_stream_slots_another_link_needs,
);
