//! §14's R14.7, how an exit sizes its congestion window. The kit is a
//! receiver at a distance it sets: it acknowledges each SENDME_INC DATA
//! cells a fixed round trip after the last of them arrived, as a path of
//! that delay and no bandwidth limit would, and reads the exit's window off
//! the wire: the cells in flight when a quiet spell ends, the exit having
//! had the whole spell to fill its window. Then it changes the delay.

use super::common::CIRC;
use super::flow2::{v2_circuit, v2_exit, CWND_MIN, SENDME_INC};
use crate::case::{check, fail, Ctx, Verdict};
use crate::link::{Got, RawLink};
use crate::targets::Target;
use halfpipe_proto::relay::relay_cmd;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// CWND_INIT of §14's table.
const CWND_INIT: usize = 4000;

/// The round trip the kit gives the exit's SENDMEs, and the longer one it
/// changes to. Long beside the jitter of a loaded machine: in slow start a
/// queue of GAMMA cells in a window of 8,000 is an ewma 2.3% over the
/// minimum, 11 ms of this round trip.
const RTT: Duration = Duration::from_millis(500);
const LONG_RTT: Duration = Duration::from_millis(1500);

/// The kit's side of the path.
struct DelayLine {
    /// DATA cells received, and SENDMEs sent.
    received: usize,
    acked: usize,
    /// When each SENDME owed is due.
    due: VecDeque<Instant>,
    rtt: Duration,
    /// The exit's window at the end of each quiet spell (each round trip),
    /// with the SENDMEs sent before it.
    rounds: Vec<(usize, usize)>,
    last_sendme: Option<Instant>,
}

impl DelayLine {
    fn new() -> DelayLine {
        DelayLine {
            received: 0,
            acked: 0,
            due: VecDeque::new(),
            rtt: RTT,
            rounds: Vec::new(),
            last_sendme: None,
        }
    }

    /// Receives and acknowledges until `rounds` more round trips are
    /// recorded.
    fn run(&mut self, l: &mut RawLink, rounds: usize) -> Verdict {
        let want = self.rounds.len() + rounds;
        let bound = Instant::now() + (self.rtt * 3) * (rounds as u32 + 2);
        while self.rounds.len() < want {
            let now = Instant::now();
            if now > bound {
                return Err(fail(
                    format!("{rounds} round trips of DATA and SENDMEs"),
                    format!(
                        "{} cells received, {} SENDMEs sent",
                        self.received, self.acked
                    ),
                ));
            }
            if let Some(&at) = self.due.front() {
                if at <= now {
                    self.sendme(l, now)?;
                    continue;
                }
            }
            let wait = self
                .due
                .front()
                .map_or(self.rtt, |&at| at.saturating_duration_since(now));
            match l.recv(wait.min(self.rtt)) {
                Got::Cell(c) if c.is_relay(CIRC, relay_cmd::DATA, 1) => {
                    self.received += 1;
                    if self.received % SENDME_INC == 0 {
                        self.due.push_back(Instant::now() + self.rtt);
                    }
                }
                Got::Cell(c) if c.is_destroy(CIRC) => {
                    return Err(fail("DATA within the window", "DESTROY"))
                }
                Got::Cell(_) | Got::Nothing => {}
                Got::Closed(why) => return Err(fail("DATA", format!("the link closed ({why})"))),
            }
        }
        Ok(())
    }

    fn sendme(&mut self, l: &mut RawLink, now: Instant) -> Verdict {
        // A quiet spell of half a round trip or more ends here: the exit
        // has had it to fill its window.
        if self
            .last_sendme
            .is_none_or(|t| now.duration_since(t) >= self.rtt / 2)
        {
            let inflight = self.received - self.acked * SENDME_INC;
            self.rounds.push((inflight, self.acked));
        }
        self.due.pop_front();
        l.send_relay_quiet(CIRC, relay_cmd::SENDME, 0, &[])?;
        self.acked += 1;
        self.last_sendme = Some(now);
        Ok(())
    }

    fn window(&self) -> usize {
        self.rounds.last().map_or(0, |r| r.0)
    }

    fn history(&self) -> String {
        let w: Vec<String> = self.rounds.iter().map(|r| r.0.to_string()).collect();
        format!("windows by round trip: {}", w.join(", "))
    }
}

pub fn the_exits_window_follows_vegas(cx: &mut Ctx) -> Verdict {
    // R14.7 (a SHOULD): the window starts at CWND_INIT in slow start, grows
    // by SENDME_INC per SENDME while the round trip holds, falls to what
    // the path holds (here CWND_MIN) once the round trip triples (queue
    // far over GAMMA and DELTA), and after slow start grows by SENDME_INC
    // once per window's worth of SENDMEs while the round trip is back at
    // its minimum (queue under ALPHA, the window full).
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    let t = Target::new();
    let mut conn = super::common::open_stream(&mut l, CIRC, 1, &t)?;
    // An endless source: the exit always has DATA to send.
    let stop = Arc::new(AtomicBool::new(false));
    // Writes time out, so that the source sees `stop` even if the exit
    // stops reading.
    conn.set_write_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| fail("a write timeout on the target", e.to_string()))?;
    let source = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'v'; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match conn.write(&chunk) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    // The exit reset or closed the stream: `follow` says
                    // what went wrong on the link.
                    Err(_) => return,
                }
            }
        })
    };
    let verdict = follow(&mut l, &cx.trace);
    stop.store(true, Ordering::Relaxed);
    let joined = source.join();
    verdict?;
    check(joined.is_ok(), "the source to end", "it panicked")
}

fn follow(l: &mut RawLink, trace: &crate::link::Trace) -> Verdict {
    let mut line = DelayLine::new();
    // Slow start: the first window, then one round trip of SENDMEs.
    line.run(l, 2)?;
    let (w0, _) = line.rounds[0];
    check(
        w0 == CWND_INIT,
        format!("a first window of CWND_INIT, {CWND_INIT} cells (R14.7)"),
        format!("{w0} cells before the first SENDME"),
    )?;
    // Slow start adds SENDME_INC per SENDME while the queue Vegas sees
    // stays under GAMMA: w0 + acked1 * SENDME_INC after the first round
    // trip's SENDMEs. The kit's own delay in reading a burst adds to the
    // round trips the exit measures, a little more for each cell of the
    // burst, and may end slow start a little early on a loaded machine; so
    // the check asks for at least half that growth (after slow start the
    // window grows by SENDME_INC once per round trip), and never more.
    let (w1, acked1) = line.rounds[1];
    let slow_start = w0 + acked1 * SENDME_INC;
    check(
        w1 <= slow_start && w1.saturating_sub(w0) >= acked1 * SENDME_INC / 2,
        format!(
            "slow start, the round trip steady: SENDME_INC more per SENDME, {slow_start} after {acked1} SENDMEs, at least half that growth on a loaded machine (R14.7)"
        ),
        format!("{w1}"),
    )?;
    // The round trip triples: the queue Vegas sees is two thirds of the
    // window, and within three round trips the window is down to its floor.
    line.rtt = LONG_RTT;
    line.run(l, 3)?;
    check(
        line.window() <= CWND_MIN + SENDME_INC,
        "the window down to CWND_MIN once the round trip tripled (R14.7: bdp + GAMMA, then bdp + DELTA - SENDME_INC, held at CWND_MIN)",
        line.history(),
    )?;
    let floor = line.window();
    // Back at the minimum: once the average has come down, SENDME_INC
    // more once per window's worth of SENDMEs (a round trip's worth here),
    // not per SENDME. A round trip's SENDMEs can straddle two updates.
    line.rtt = RTT;
    let start = line.rounds.len() - 1;
    line.run(l, 8)?;
    let grew: Vec<usize> = line.rounds[start..]
        .windows(2)
        .map(|p| p[1].0.saturating_sub(p[0].0))
        .collect();
    let total = line.window().saturating_sub(floor);
    trace.note(line.history());
    check(
        total > 0
            && total <= SENDME_INC * (grew.len() + 1)
            && grew.iter().all(|&g| g <= 2 * SENDME_INC),
        "after slow start, growth by SENDME_INC once per window's worth of SENDMEs, and some growth (R14.7)",
        format!("{}; grew by {grew:?}", line.history()),
    )
}
