//! Stream flow control of version 2 circuits (docs/protocol.md §14): the
//! receiver holds a stream back with XOFF when it holds too many of its
//! cells unwritten, and lets it go with XON; the sender stops reading the
//! stream's socket in between. XOFF and XON take no window and change no
//! §7 state (R14.12).

use crate::congestion::CWND_MAX;
use crate::flow::FlowViolation;

/// Held cells that make the receiver send XOFF (R14.9).
pub const XOFF_AT: u32 = 500;
/// Held cells at or below which a receiver that sent XOFF sends XON (R14.10).
pub const XON_AT: u32 = 250;
/// DATA cells a stream may carry after our XOFF beyond a congestion window:
/// what its sender had read before the XOFF came (R14.15).
pub const XOFF_GRACE: u32 = 1000;
/// DATA cells after our XOFF past which more is a violation (R14.15).
pub const AFTER_XOFF_MAX: u32 = CWND_MAX + XOFF_GRACE;

/// XOFF's body: version 0 (R14.14's format).
pub fn encode_xoff() -> [u8; 1] {
    [0]
}

/// XON's body: version 0 and a rate in kilobytes per second, 0 for none.
pub fn encode_xon(rate_kbps: u32) -> [u8; 5] {
    let r = rate_kbps.to_be_bytes();
    [0, r[0], r[1], r[2], r[3]]
}

/// R14.14: an XOFF body must be at least its version byte, version 0.
pub fn parse_xoff(body: &[u8]) -> Result<(), FlowViolation> {
    match body.first() {
        Some(0) => Ok(()),
        _ => Err(FlowViolation::MalformedXonXoff),
    }
}

/// R14.14: an XON body is version 0 and a 4-byte rate; returns the rate.
pub fn parse_xon(body: &[u8]) -> Result<u32, FlowViolation> {
    match body {
        [0, a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(FlowViolation::MalformedXonXoff),
    }
}

/// One stream's XOFF/XON state at one edge: what it holds for its socket
/// and what it told the peer (receiving side), and what the peer told it
/// (sending side).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XonXoff {
    /// DATA cells received and not yet written to the TCP connection.
    held: u32,
    /// We sent XOFF and no XON since.
    xoff_sent: bool,
    /// DATA cells arrived since that XOFF (R14.15).
    since_xoff: u32,
    /// The peer sent XOFF and no XON since: we may not package (R14.11).
    paused: bool,
}

/// A cell the receiving side must send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Xoff,
    Xon,
    None,
}

impl XonXoff {
    pub fn held(&self) -> u32 {
        self.held
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn xoff_sent(&self) -> bool {
        self.xoff_sent
    }

    /// `cells` DATA cells arrived for the stream: R14.15, a peer that
    /// ignored XOFF is caught; R14.9, XOFF once XOFF_AT are held.
    pub fn on_data(&mut self, cells: u32) -> Result<Signal, FlowViolation> {
        if self.xoff_sent {
            if self.since_xoff + cells > AFTER_XOFF_MAX {
                return Err(FlowViolation::XoffIgnored);
            }
            self.since_xoff += cells;
        }
        self.held += cells;
        if self.held >= XOFF_AT && !self.xoff_sent {
            self.xoff_sent = true;
            self.since_xoff = 0;
            return Ok(Signal::Xoff);
        }
        Ok(Signal::None)
    }

    /// `cells` held cells were written to the TCP connection. R14.10: XON
    /// once XON_AT or fewer are held, if more DATA can still come.
    pub fn on_written(&mut self, cells: u32, more_may_come: bool) -> Signal {
        self.held = self.held.saturating_sub(cells);
        if self.xoff_sent && self.held <= XON_AT && more_may_come {
            self.xoff_sent = false;
            self.since_xoff = 0;
            return Signal::Xon;
        }
        Signal::None
    }

    /// The peer's XOFF (R14.11).
    pub fn on_xoff(&mut self) {
        self.paused = true;
    }

    /// The peer's XON: returns whether packaging was paused (the packager
    /// must be woken).
    pub fn on_xon(&mut self) -> bool {
        std::mem::replace(&mut self.paused, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bodies() {
        // R14.14: versions and lengths.
        assert_eq!(parse_xoff(&encode_xoff()), Ok(()));
        assert_eq!(parse_xon(&encode_xon(1234)), Ok(1234));
        assert!(parse_xoff(&[]).is_err());
        assert!(parse_xoff(&[1]).is_err());
        assert!(parse_xon(&[0, 0, 0, 0]).is_err());
        assert!(parse_xon(&[1, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn xoff_at_500_xon_at_250() {
        // R14.9: XOFF when held reaches XOFF_AT, once.
        let mut s = XonXoff::default();
        assert_eq!(s.on_data(499), Ok(Signal::None));
        assert_eq!(s.on_data(1), Ok(Signal::Xoff));
        assert_eq!(s.on_data(100), Ok(Signal::None), "one XOFF until XON");
        // R14.10: XON once held falls to XON_AT.
        assert_eq!(s.on_written(349, true), Signal::None);
        assert_eq!(s.held(), 251);
        assert_eq!(s.on_written(1, true), Signal::Xon);
        assert_eq!(s.on_written(10, true), Signal::None);
        // And again.
        assert_eq!(s.on_data(260), Ok(Signal::Xoff));
    }

    #[test]
    fn no_xon_once_no_more_data_can_come() {
        // R14.10: after the peer's FIN, XON is not needed.
        let mut s = XonXoff::default();
        assert_eq!(s.on_data(600), Ok(Signal::Xoff));
        assert_eq!(s.on_written(600, false), Signal::None);
    }

    #[test]
    fn ignoring_xoff_is_a_violation() {
        // R14.15: after XOFF, CWND_MAX + XOFF_GRACE cells may come, not one
        // more.
        let mut s = XonXoff::default();
        assert_eq!(s.on_data(XOFF_AT), Ok(Signal::Xoff));
        assert_eq!(s.on_data(AFTER_XOFF_MAX - 1), Ok(Signal::None));
        assert_eq!(s.on_data(1), Ok(Signal::None));
        assert_eq!(s.on_data(1), Err(FlowViolation::XoffIgnored));
    }

    #[test]
    fn a_sender_at_full_window_is_within_bounds() {
        // R14.15 against what an obedient sender does at CWND_MAX: XOFF
        // goes out after a run of 515 cells read from the link at once
        // (held 1,014), a whole window arrives after it, and then the 512
        // cells of a read the sender had made before the XOFF came.
        let mut s = XonXoff::default();
        assert_eq!(s.on_data(499), Ok(Signal::None));
        assert_eq!(s.on_data(515), Ok(Signal::Xoff));
        assert_eq!(s.on_data(CWND_MAX), Ok(Signal::None));
        assert_eq!(s.on_data(512), Ok(Signal::None));
        // XON resets the count: the next XOFF starts a new one.
        assert_eq!(s.on_written(s.held() - XON_AT, true), Signal::Xon);
        assert_eq!(s.on_data(XOFF_AT - XON_AT), Ok(Signal::Xoff));
        assert_eq!(s.on_data(AFTER_XOFF_MAX), Ok(Signal::None));
    }

    #[test]
    fn the_peers_xoff_pauses_until_xon() {
        // R14.11.
        let mut s = XonXoff::default();
        assert!(!s.paused());
        s.on_xoff();
        assert!(s.paused());
        assert!(s.on_xon());
        assert!(!s.paused());
        assert!(!s.on_xon(), "an XON without XOFF wakes nobody");
    }

    proptest! {
        #[test]
        fn xoff_and_xon_alternate(ops in proptest::collection::vec((any::<bool>(), 0u32..400), 1..400)) {
            // R14.9, R14.10: signals alternate XOFF, XON, XOFF...; every
            // XOFF was sent at XOFF_AT or more held, every XON at XON_AT or
            // fewer.
            let mut s = XonXoff::default();
            let mut last = Signal::Xon;
            for (arrive, n) in ops {
                let sig = if arrive {
                    match s.on_data(n) { Ok(sig) => sig, Err(_) => break }
                } else {
                    s.on_written(n, true)
                };
                match sig {
                    Signal::Xoff => { prop_assert_eq!(last, Signal::Xon); prop_assert!(s.held() >= XOFF_AT); last = sig; }
                    Signal::Xon => { prop_assert_eq!(last, Signal::Xoff); prop_assert!(s.held() <= XON_AT); last = sig; }
                    Signal::None => {}
                }
            }
        }
    }
}
