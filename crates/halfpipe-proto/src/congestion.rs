//! Flow control version 2 on a circuit (docs/protocol.md §14): how the two
//! edges agree to it in CREATE_FAST, the sender's congestion window (Vegas,
//! after tor-spec's congestion control) and the receiver's SENDME count.
//!
//! No clock: the shell passes the time of each send and each SENDME in.

use crate::flow::FlowViolation;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// DATA cells acknowledged by one circuit SENDME.
pub const SENDME_INC: u32 = 31;
/// The congestion window of a new circuit.
pub const CWND_INIT: u32 = 4000;
/// The window never goes below this (R14.5).
pub const CWND_MIN: u32 = 4000;
/// The window never goes above this (R14.5).
pub const CWND_MAX: u32 = 10_000;
/// Vegas's queue thresholds, in cells: tor's values for exit circuits.
pub const ALPHA: u32 = 186;
pub const BETA: u32 = 248;
pub const GAMMA: u32 = 186;
pub const DELTA: u32 = 310;

/// Which flow control a circuit runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// §10: fixed windows, stream SENDMEs.
    V1,
    /// §14: a congestion window, XOFF and XON.
    V2,
}

impl Flow {
    pub fn name(self) -> &'static str {
        match self {
            Flow::V1 => "v1",
            Flow::V2 => "v2",
        }
    }
}

/// The ten bytes of the offer (in CREATE_FAST) and of the acceptance (in
/// CREATED_FAST): "halfpipe", flow version 2, SENDME_INC.
pub const FLOW2_MARK: [u8; 10] = *b"halfpipe\x02\x1f";
/// Where the offer stands in CREATE_FAST's payload (R14.1).
pub const OFFER_AT: usize = 20;
/// Where the acceptance stands in CREATED_FAST's payload (R14.2).
pub const ACCEPT_AT: usize = 40;

/// R14.1, R14.2: appends the mark to a payload that holds exactly the
/// bytes before it (X, or Y | KH).
pub fn append_mark(payload: &mut Vec<u8>) {
    payload.extend_from_slice(&FLOW2_MARK);
}

/// R14.2, R14.3: does `payload` carry the mark at `at`, exactly?
pub fn has_mark(payload: &[u8], at: usize) -> bool {
    payload.get(at..at + FLOW2_MARK.len()) == Some(&FLOW2_MARK[..])
}

/// R14.2: the exit's decision. It runs version 2 only if it uses it and
/// the client offered it.
pub fn exit_flow(ours: Flow, create_fast: &[u8]) -> Flow {
    if ours == Flow::V2 && has_mark(create_fast, OFFER_AT) {
        Flow::V2
    } else {
        Flow::V1
    }
}

/// R14.3: the client's decision once CREATED_FAST is in.
pub fn client_flow(offered: bool, created_fast: &[u8]) -> Flow {
    if offered && has_mark(created_fast, ACCEPT_AT) {
        Flow::V2
    } else {
        Flow::V1
    }
}

/// The sender's side of a version 2 circuit: how many DATA cells may be in
/// flight (R14.5), sized by Vegas from the SENDMEs' round trips (R14.7).
#[derive(Debug, Clone)]
pub struct Congestion {
    cwnd: u32,
    /// DATA cells sent and not yet acknowledged.
    inflight: u32,
    /// DATA cells sent on the circuit, ever.
    sent: u64,
    /// Send times of the cells whose arrival will draw a SENDME (every
    /// SENDME_INC-th cell sent), oldest first, with their number.
    marks: VecDeque<(u64, Instant)>,
    slow_start: bool,
    min_rtt: Option<Duration>,
    ewma_rtt: Option<Duration>,
    /// SENDMEs left until the next once-per-window update after slow start.
    until_update: u32,
    /// The window was full (inflight reached cwnd) since the last update.
    full: bool,
}

impl Default for Congestion {
    fn default() -> Self {
        Congestion::new()
    }
}

impl Congestion {
    pub fn new() -> Congestion {
        Congestion {
            cwnd: CWND_INIT,
            inflight: 0,
            sent: 0,
            marks: VecDeque::new(),
            slow_start: true,
            min_rtt: None,
            ewma_rtt: None,
            until_update: 0,
            full: false,
        }
    }

    pub fn cwnd(&self) -> u32 {
        self.cwnd
    }

    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    pub fn ewma_rtt(&self) -> Option<Duration> {
        self.ewma_rtt
    }

    /// Cells that may be sent now (R14.5: never beyond the window).
    pub fn available(&self) -> u32 {
        self.cwnd.saturating_sub(self.inflight)
    }

    /// Takes up to `wanted` cells of the window for cells sent at `now`;
    /// returns how many were taken.
    pub fn take(&mut self, wanted: u32, now: Instant) -> u32 {
        let n = wanted.min(self.available());
        for _ in 0..n {
            self.sent += 1;
            // R14.7: the cell that completes a SENDME_INC count is the one
            // whose SENDME times the round trip.
            if self.sent % u64::from(SENDME_INC) == 0 {
                self.marks.push_back((self.sent, now));
            }
        }
        self.inflight += n;
        if self.inflight >= self.cwnd {
            self.full = true;
        }
        n
    }

    /// Returns cells taken but not sent.
    pub fn give_back(&mut self, n: u32) {
        let n = n.min(self.inflight);
        self.inflight -= n;
        self.sent -= u64::from(n);
        while self.marks.back().is_some_and(|&(k, _)| k > self.sent) {
            self.marks.pop_back();
        }
    }

    /// A circuit SENDME arrived at `now`: SENDME_INC cells are acknowledged
    /// (R14.6: more than were in flight is a violation), and the window is
    /// sized again (R14.7).
    pub fn on_sendme(&mut self, now: Instant) -> Result<(), FlowViolation> {
        if self.inflight < SENDME_INC {
            return Err(FlowViolation::SendmeWithoutData);
        }
        if let Some((_, at)) = self.marks.pop_front() {
            self.sample(now.saturating_duration_since(at));
        }
        self.inflight -= SENDME_INC;
        Ok(())
    }

    fn sample(&mut self, rtt: Duration) {
        let rtt = rtt.max(Duration::from_micros(1));
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        let n = if self.slow_start {
            2
        } else {
            (self.cwnd / (2 * SENDME_INC)).clamp(2, 10)
        };
        self.ewma_rtt = Some(match self.ewma_rtt {
            None => rtt,
            Some(e) => (rtt * 2 + e * (n - 1)) / (n + 1),
        });
        let (min, ewma) = (
            self.min_rtt.unwrap_or(rtt).as_nanos(),
            self.ewma_rtt.unwrap_or(rtt).as_nanos().max(1),
        );
        let bdp = (u128::from(self.cwnd) * min / ewma).min(u128::from(self.cwnd)) as u32;
        let queue = self.cwnd - bdp;
        if self.slow_start {
            if queue < GAMMA {
                self.cwnd += SENDME_INC;
            } else {
                self.cwnd = bdp + GAMMA;
                self.end_slow_start();
            }
            if self.cwnd >= CWND_MAX {
                self.cwnd = CWND_MAX;
                self.end_slow_start();
            }
        } else {
            self.until_update = self.until_update.saturating_sub(1);
            if self.until_update == 0 {
                if queue > DELTA {
                    self.cwnd = (bdp + DELTA).saturating_sub(SENDME_INC);
                } else if queue > BETA {
                    self.cwnd = self.cwnd.saturating_sub(SENDME_INC);
                } else if queue < ALPHA && self.full {
                    self.cwnd += SENDME_INC;
                }
                self.until_update = self.cwnd / SENDME_INC;
                self.full = self.inflight >= self.cwnd;
            }
        }
        // R14.5: within the bounds, whatever the algorithm said.
        self.cwnd = self.cwnd.clamp(CWND_MIN, CWND_MAX);
    }

    fn end_slow_start(&mut self) {
        self.slow_start = false;
        self.until_update = self.cwnd / SENDME_INC;
        self.full = false;
    }
}

/// What a circuit's packagers share: §10's circuit package window, or
/// §14's congestion window.
#[derive(Debug, Clone)]
pub enum SendWindow {
    V1(crate::flow::PackageWindow),
    V2(Congestion),
}

impl SendWindow {
    pub fn new(flow: Flow) -> SendWindow {
        match flow {
            Flow::V1 => SendWindow::V1(crate::flow::PackageWindow::circuit()),
            Flow::V2 => SendWindow::V2(Congestion::new()),
        }
    }

    /// Cells that may be sent now (R10.8, R14.5).
    pub fn value(&self) -> u32 {
        match self {
            SendWindow::V1(w) => w.value(),
            SendWindow::V2(c) => c.available(),
        }
    }

    /// Takes up to `wanted` cells for cells sent at `now`.
    pub fn take(&mut self, wanted: u32, now: Instant) -> u32 {
        match self {
            SendWindow::V1(w) => w.take(wanted),
            SendWindow::V2(c) => c.take(wanted, now),
        }
    }

    /// Returns cells taken but not sent.
    pub fn give_back(&mut self, n: u32) {
        match self {
            SendWindow::V1(w) => w.give_back(n),
            SendWindow::V2(c) => c.give_back(n),
        }
    }

    /// A circuit SENDME arrived at `now` (R10.4, R10.11; R14.6, R14.7).
    pub fn on_sendme(&mut self, now: Instant) -> Result<(), FlowViolation> {
        match self {
            SendWindow::V1(w) => w.on_sendme(),
            SendWindow::V2(c) => c.on_sendme(now),
        }
    }

    /// The congestion window, on a version 2 circuit (for status).
    pub fn congestion(&self) -> Option<&Congestion> {
        match self {
            SendWindow::V1(_) => None,
            SendWindow::V2(c) => Some(c),
        }
    }
}

/// The receiver's side of a version 2 circuit: a circuit SENDME for every
/// SENDME_INC DATA cells, as each count completes (R14.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendmeCounter {
    since_sendme: u32,
}

impl SendmeCounter {
    /// DATA cells still to arrive before the next SENDME.
    pub fn until_sendme(&self) -> u32 {
        SENDME_INC - self.since_sendme
    }

    /// A DATA cell arrived (for any stream, known or not): whether a
    /// circuit SENDME is due now.
    pub fn on_data(&mut self) -> bool {
        self.since_sendme += 1;
        if self.since_sendme == SENDME_INC {
            self.since_sendme = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn negotiation_needs_both_edges() {
        // R14.1: the offer follows X; R14.2: the acceptance follows Y | KH.
        let mut create = vec![7u8; 20];
        append_mark(&mut create);
        create.resize(509, 0);
        assert!(has_mark(&create, OFFER_AT));
        assert_eq!(exit_flow(Flow::V2, &create), Flow::V2);
        // An exit with --flow v1 answers as version 1.
        assert_eq!(exit_flow(Flow::V1, &create), Flow::V1);
        // A version 1 client's padding is no offer.
        assert_eq!(exit_flow(Flow::V2, &[0u8; 509]), Flow::V1);
        // R14.3: the client runs v2 only if it offered and was accepted.
        let mut created = vec![9u8; 40];
        append_mark(&mut created);
        assert_eq!(client_flow(true, &created), Flow::V2);
        assert_eq!(client_flow(false, &created), Flow::V1);
        assert_eq!(client_flow(true, &[0u8; 509]), Flow::V1);
        // A near miss (another flow version) is no acceptance.
        let mut other = vec![9u8; 40];
        other.extend_from_slice(b"halfpipe\x03\x1f");
        assert_eq!(client_flow(true, &other), Flow::V1);
    }

    #[test]
    fn sendme_every_31_cells() {
        // R14.4: one SENDME per SENDME_INC DATA cells, at the completing cell.
        let mut c = SendmeCounter::default();
        let due: Vec<u32> = (1..=93).filter(|_| c.on_data()).collect();
        assert_eq!(due.len(), 3);
        for i in 1..=30 {
            assert!(!c.on_data(), "cell {i}");
        }
        assert!(c.on_data());
    }

    #[test]
    fn never_more_than_the_window_in_flight() {
        // R14.5: inflight stays at or below cwnd; CWND_INIT to start.
        let mut c = Congestion::new();
        assert_eq!(c.cwnd(), CWND_INIT);
        assert_eq!(c.take(5000, t0()), CWND_INIT);
        assert_eq!(c.take(1, t0()), 0);
        assert_eq!(c.available(), 0);
        c.on_sendme(t0()).unwrap();
        assert!(c.available() >= SENDME_INC);
    }

    #[test]
    fn sendme_for_cells_never_sent_is_a_violation() {
        // R14.6: a SENDME while fewer than SENDME_INC cells are in flight.
        let mut c = Congestion::new();
        assert!(c.on_sendme(t0()).is_err());
        c.take(30, t0());
        assert!(c.on_sendme(t0()).is_err());
        c.take(1, t0());
        assert!(c.on_sendme(t0()).is_ok());
        assert_eq!(c.inflight(), 0);
    }

    #[test]
    fn given_back_cells_leave_no_round_trip_mark() {
        let mut c = Congestion::new();
        let start = t0();
        c.take(40, start);
        c.give_back(20);
        assert_eq!(c.inflight(), 20);
        // Cell 31 was given back: its mark goes, and the next 31st cell
        // sent is the one timed.
        assert!(c.marks.is_empty());
        c.take(11, start + Duration::from_millis(5));
        assert_eq!(c.marks.len(), 1);
        c.on_sendme(start + Duration::from_millis(15)).unwrap();
        assert_eq!(c.min_rtt(), Some(Duration::from_millis(10)));
    }

    /// Runs a sender against a path whose round trip is `base` plus the
    /// time its queue takes to drain at `rate` cells per ms; returns the
    /// window after `rounds` round trips.
    fn drive(base: Duration, rate: u32, rounds: u32) -> Congestion {
        let mut c = Congestion::new();
        let mut now = t0();
        for _ in 0..rounds {
            c.take(u32::MAX, now);
            let bdp = (base.as_micros() as u64 * u64::from(rate) / 1000) as u32;
            let queued = c.inflight().saturating_sub(bdp);
            let rtt = base + Duration::from_micros(u64::from(queued) * 1000 / u64::from(rate));
            now += rtt;
            while c.inflight() >= SENDME_INC {
                c.on_sendme(now).unwrap();
            }
        }
        c
    }

    #[test]
    fn a_long_path_grows_the_window_in_slow_start() {
        // R14.7: 40 ms round trip, a path that drains 500 cells per ms
        // (20,000 in flight would be needed): slow start doubles the
        // window each round trip, to CWND_MAX, and it stays there.
        let c = drive(Duration::from_millis(40), 500, 1);
        assert!(c.in_slow_start());
        assert_eq!(c.cwnd(), CWND_INIT + CWND_INIT / SENDME_INC * SENDME_INC);
        let c = drive(Duration::from_millis(40), 500, 2);
        assert_eq!(c.cwnd(), CWND_MAX);
        assert!(!c.in_slow_start());
        let c = drive(Duration::from_millis(40), 500, 10);
        assert_eq!(c.cwnd(), CWND_MAX);
    }

    #[test]
    fn a_growing_queue_stops_the_window() {
        // R14.7: a short path (0.1 ms, 1 cell per us) that a window of 4,000
        // already fills: every cell more only queues, and the window stops
        // growing once the queue it sees reaches ALPHA.
        let c = drive(Duration::from_micros(100), 1000, 50);
        assert!(!c.in_slow_start());
        assert!(c.cwnd() <= CWND_MIN + ALPHA + SENDME_INC, "{}", c.cwnd());
        let later = drive(Duration::from_micros(100), 1000, 100);
        assert_eq!(c.cwnd(), later.cwnd(), "steady");
    }

    #[test]
    fn a_queue_beyond_delta_cuts_the_window() {
        // R14.7: samples that show more than DELTA cells queued bring the
        // window down to bdp + DELTA - SENDME_INC, never below CWND_MIN.
        let mut c = drive(Duration::from_millis(40), 500, 6);
        let before = c.cwnd();
        let mut now = t0();
        // Round trips four times the minimum: three quarters queued.
        for _ in 0..3 {
            c.take(u32::MAX, now);
            now += Duration::from_millis(160);
            while c.inflight() >= SENDME_INC {
                c.on_sendme(now).unwrap();
            }
        }
        assert!(c.cwnd() < before, "{} -> {}", before, c.cwnd());
        assert!(c.cwnd() >= CWND_MIN);
    }

    proptest! {
        #[test]
        fn window_stays_in_bounds(steps in proptest::collection::vec((0u32..3000, 0u64..50_000), 1..300)) {
            // R14.5 under any sequence of sends and SENDME timings.
            let mut c = Congestion::new();
            let mut now = t0();
            for (want, gap_us) in steps {
                c.take(want, now);
                now += Duration::from_micros(gap_us);
                if c.inflight() >= SENDME_INC {
                    c.on_sendme(now).unwrap();
                }
                prop_assert!(c.cwnd() >= CWND_MIN && c.cwnd() <= CWND_MAX);
                prop_assert!(c.inflight() <= CWND_MAX);
            }
        }
    }
}
