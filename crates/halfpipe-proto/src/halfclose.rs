//! The half-close state machine of docs/protocol.md §7 (normative) with the
//! abort rules of §8. Read this file beside §7: each arm of
//! `HalfClose::handle` is one row of its event table, R7.2 to R7.8.
//!
//! Pure logic: an event goes in, the new state and one action come out. The
//! stream's packager, deliverer and circuit thread feed it under the stream's
//! lock and carry out the action after releasing the lock (docs/design.md,
//! invariant 5).

use std::fmt;

/// How a stream reached CLOSED. Kept for the status table and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// Both directions finished with FIN: the TCP connection closes normally.
    Finished,
    /// We saw an error and sent END with this reason (§8).
    EndSent(u8),
    /// The peer sent END with this reason, or the circuit went away (R3.10:
    /// as though END(DESTROY) had arrived).
    EndReceived(u8),
}

/// The four states of docs/protocol.md §7. Data that belongs to CLOSED only (why
/// it closed) lives inside that variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Open,
    /// We sent FIN; we may still deliver.
    DonePackaging,
    /// We received FIN and shut our TCP write side; we may still package.
    DoneDelivering,
    Closed(CloseCause),
}

impl fmt::Display for State {
    /// The spec names, as the status table and logs print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Open => "OPEN",
            State::DonePackaging => "DONE_PACKAGING",
            State::DoneDelivering => "DONE_DELIVERING",
            State::Closed(_) => "CLOSED",
        })
    }
}

/// What happened to the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// read() on the TCP connection returned EOF.
    ReadEof,
    /// A FIN cell arrived.
    FinReceived,
    /// A DATA cell arrived.
    DataReceived,
    /// An error on the stream (§8): a read or write error, a local resource
    /// failure, or the shutdown deadline. `reason` is the END reason to send.
    Error { reason: u8 },
    /// An END cell arrived with `reason` (or the circuit was destroyed).
    EndReceived { reason: u8 },
}

/// What the shell must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send FIN, after every DATA cell already sent (§7).
    SendFin,
    /// Write this DATA to the TCP connection.
    Deliver,
    /// Write every DATA received before the FIN, then shutdown(SHUT_WR) (§7).
    DeliverThenShutdownWrite,
    /// Send END(reason), reset the TCP connection, discard queued data (R8.7).
    SendEndAndReset(u8),
    /// Reset the TCP connection and discard queued data; send nothing (R8.8).
    Reset,
    /// Nothing: the event comes after the stream closed (a late cell, §9, or
    /// a socket woken by our own reset).
    Nothing,
}

/// A cell the peer may not send in this state: the circuit is destroyed
/// with DESTROY(PROTOCOL) (§7, §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("DATA after the peer's FIN (stream is DONE_DELIVERING)")]
    DataAfterFin,
    #[error("second FIN from the peer (stream is DONE_DELIVERING)")]
    FinAfterFin,
}

/// The result of one event: where we were, where we are, what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub from: State,
    pub to: State,
    pub action: Action,
}

/// One stream's half-close state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HalfClose {
    state: State,
}

impl Default for HalfClose {
    fn default() -> Self {
        Self::new()
    }
}

impl HalfClose {
    /// A stream starts OPEN, also while the exit is still connecting (R5.15:
    /// optimistic DATA and FIN are accepted before CONNECTED).
    pub fn new() -> Self {
        HalfClose { state: State::Open }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// May we still package (read TCP, send DATA)? §7, first table: R7.1,
    /// no DATA in DONE_PACKAGING or CLOSED.
    pub fn may_package(&self) -> bool {
        matches!(self.state, State::Open | State::DoneDelivering)
    }

    /// May we still deliver (receive DATA, write TCP)? §7, first table.
    pub fn may_deliver(&self) -> bool {
        matches!(self.state, State::Open | State::DonePackaging)
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// Applies one event: the rows of docs/protocol.md §7's event table, plus what
    /// each event means once CLOSED (§9: late cells are dropped silently).
    pub fn handle(&mut self, event: Event) -> Result<Step, Violation> {
        use Action::*;
        use State::*;
        let from = self.state;
        let (to, action) = match (from, event) {
            // R7.2: read() returns EOF | OPEN | send FIN after every DATA
            // read before the EOF | DONE_PACKAGING.
            (Open, Event::ReadEof) => (DonePackaging, SendFin),
            // R7.3: read() returns EOF | DONE_DELIVERING | send FIN | CLOSED
            // (R7.9: both directions complete, a normal close).
            (DoneDelivering, Event::ReadEof) => (Closed(CloseCause::Finished), SendFin),
            // The packager stops at its first EOF; a second one changes nothing.
            (DonePackaging, Event::ReadEof) => (DonePackaging, Nothing),
            // A read woken by our own reset after the stream closed.
            (Closed(c), Event::ReadEof) => (Closed(c), Nothing),

            // R7.4: FIN received | OPEN | write every DATA received before
            // it, then shutdown(SHUT_WR) | DONE_DELIVERING.
            (Open, Event::FinReceived) => (DoneDelivering, DeliverThenShutdownWrite),
            // R7.5: FIN received | DONE_PACKAGING | ... | CLOSED (R7.9).
            (DonePackaging, Event::FinReceived) => {
                (Closed(CloseCause::Finished), DeliverThenShutdownWrite)
            }
            // R7.6: DATA or FIN received | DONE_DELIVERING | protocol violation.
            (DoneDelivering, Event::FinReceived) => return Err(Violation::FinAfterFin),
            // R9.3: a late FIN for a closed stream is dropped silently.
            (Closed(c), Event::FinReceived) => (Closed(c), Nothing),

            // §7, first table: OPEN and DONE_PACKAGING still deliver.
            (Open, Event::DataReceived) => (Open, Deliver),
            (DonePackaging, Event::DataReceived) => (DonePackaging, Deliver),
            // R7.6: DATA or FIN received | DONE_DELIVERING | protocol violation.
            (DoneDelivering, Event::DataReceived) => return Err(Violation::DataAfterFin),
            // R9.3: late DATA for a closed stream is dropped silently.
            (Closed(c), Event::DataReceived) => (Closed(c), Nothing),

            // R7.7: error on the stream | any | abort | CLOSED; R8.7: send
            // END with the reason (R8.2 to R8.6) and reset the connection.
            (Open | DonePackaging | DoneDelivering, Event::Error { reason }) => {
                (Closed(CloseCause::EndSent(reason)), SendEndAndReset(reason))
            }
            // Already closed: nothing is left to abort, and nothing may be
            // sent (R8.9 after the peer's END).
            (Closed(c), Event::Error { .. }) => (Closed(c), Nothing),

            // R7.8: END received | any | abort without sending | CLOSED (R8.8).
            (Open | DonePackaging | DoneDelivering, Event::EndReceived { reason }) => {
                (Closed(CloseCause::EndReceived(reason)), Reset)
            }
            // R9.3: a late END for a closed stream is dropped silently.
            (Closed(c), Event::EndReceived { .. }) => (Closed(c), Nothing),
        };
        self.state = to;
        Ok(Step { from, to, action })
    }
}

#[cfg(test)]
mod tests {
    //! One fixture per state; each test names the §7 rule it checks.
    use super::*;
    use proptest::prelude::*;

    fn in_state(state: State) -> HalfClose {
        HalfClose { state }
    }

    fn step(state: State, event: Event) -> Result<(State, Action), Violation> {
        let mut hc = in_state(state);
        let s = hc.handle(event)?;
        assert_eq!(s.from, state);
        assert_eq!(s.to, hc.state());
        Ok((s.to, s.action))
    }

    const FINISHED: State = State::Closed(CloseCause::Finished);

    mod open {
        use super::*;
        #[test]
        fn read_eof_sends_fin_and_is_done_packaging() {
            // R7.2: read() returns EOF | OPEN | send FIN | DONE_PACKAGING
            assert_eq!(
                step(State::Open, Event::ReadEof),
                Ok((State::DonePackaging, Action::SendFin))
            );
        }
        #[test]
        fn fin_received_shuts_write_side() {
            // R7.4: FIN received | OPEN | write, shutdown(SHUT_WR) | DONE_DELIVERING
            assert_eq!(
                step(State::Open, Event::FinReceived),
                Ok((State::DoneDelivering, Action::DeliverThenShutdownWrite))
            );
        }
        #[test]
        fn data_is_delivered() {
            assert_eq!(
                step(State::Open, Event::DataReceived),
                Ok((State::Open, Action::Deliver))
            );
        }
        #[test]
        fn error_sends_end() {
            // R7.7: error | any | abort | CLOSED; R8.7: END and a reset
            assert_eq!(
                step(State::Open, Event::Error { reason: 12 }),
                Ok((
                    State::Closed(CloseCause::EndSent(12)),
                    Action::SendEndAndReset(12)
                ))
            );
        }
        #[test]
        fn end_received_resets_without_sending() {
            // R7.8: END received | any | abort without sending | CLOSED
            assert_eq!(
                step(State::Open, Event::EndReceived { reason: 3 }),
                Ok((State::Closed(CloseCause::EndReceived(3)), Action::Reset))
            );
        }
        #[test]
        fn may_package_and_deliver() {
            // §7 first table, row OPEN: yes | yes (R7.1 allows DATA)
            let hc = in_state(State::Open);
            assert!(hc.may_package() && hc.may_deliver() && !hc.is_closed());
            assert_eq!(HalfClose::new(), hc);
        }
    }

    mod done_packaging {
        use super::*;
        const S: State = State::DonePackaging;
        #[test]
        fn fin_received_closes() {
            // R7.5: FIN received | DONE_PACKAGING | write, shutdown(SHUT_WR) | CLOSED
            assert_eq!(
                step(S, Event::FinReceived),
                Ok((FINISHED, Action::DeliverThenShutdownWrite))
            );
        }
        #[test]
        fn data_still_delivered() {
            // §7 first table, row DONE_PACKAGING: deliver yes
            assert_eq!(step(S, Event::DataReceived), Ok((S, Action::Deliver)));
        }
        #[test]
        fn second_eof_does_nothing() {
            assert_eq!(step(S, Event::ReadEof), Ok((S, Action::Nothing)));
        }
        #[test]
        fn error_and_end() {
            // R7.7, R7.8 in DONE_PACKAGING.
            assert_eq!(
                step(S, Event::Error { reason: 1 }),
                Ok((
                    State::Closed(CloseCause::EndSent(1)),
                    Action::SendEndAndReset(1)
                ))
            );
            assert_eq!(
                step(S, Event::EndReceived { reason: 5 }),
                Ok((State::Closed(CloseCause::EndReceived(5)), Action::Reset))
            );
        }
        #[test]
        fn may_deliver_only() {
            // R7.1: no DATA in DONE_PACKAGING (we sent FIN); it still delivers
            let hc = in_state(S);
            assert!(!hc.may_package() && hc.may_deliver());
        }
    }

    mod done_delivering {
        use super::*;
        const S: State = State::DoneDelivering;
        #[test]
        fn read_eof_sends_fin_and_closes() {
            // R7.3: read() returns EOF | DONE_DELIVERING | send FIN | CLOSED
            assert_eq!(step(S, Event::ReadEof), Ok((FINISHED, Action::SendFin)));
        }
        #[test]
        fn data_is_a_violation() {
            // R7.6: DATA received | DONE_DELIVERING | protocol violation
            assert_eq!(step(S, Event::DataReceived), Err(Violation::DataAfterFin));
        }
        #[test]
        fn fin_is_a_violation() {
            // R7.6: FIN received | DONE_DELIVERING | protocol violation
            assert_eq!(step(S, Event::FinReceived), Err(Violation::FinAfterFin));
        }
        #[test]
        fn error_and_end() {
            // R7.7, R7.8 in DONE_DELIVERING.
            assert_eq!(
                step(S, Event::Error { reason: 9 }),
                Ok((
                    State::Closed(CloseCause::EndSent(9)),
                    Action::SendEndAndReset(9)
                ))
            );
            assert_eq!(
                step(S, Event::EndReceived { reason: 6 }),
                Ok((State::Closed(CloseCause::EndReceived(6)), Action::Reset))
            );
        }
        #[test]
        fn may_package_only() {
            // §7 first table, row DONE_DELIVERING: yes | no (we received FIN)
            let hc = in_state(S);
            assert!(hc.may_package() && !hc.may_deliver());
        }
        #[test]
        fn violation_leaves_state_unchanged() {
            let mut hc = in_state(S);
            assert!(hc.handle(Event::DataReceived).is_err());
            assert_eq!(hc.state(), S);
        }
    }

    mod closed {
        use super::*;
        #[test]
        fn everything_after_close_is_dropped() {
            // R9.3: late cells after CLOSED are dropped; R8.9 and R7.1:
            // nothing is sent after END (or once CLOSED).
            for cause in [
                CloseCause::Finished,
                CloseCause::EndSent(1),
                CloseCause::EndReceived(2),
            ] {
                let s = State::Closed(cause);
                for ev in [
                    Event::ReadEof,
                    Event::FinReceived,
                    Event::DataReceived,
                    Event::Error { reason: 1 },
                    Event::EndReceived { reason: 1 },
                ] {
                    assert_eq!(step(s, ev), Ok((s, Action::Nothing)), "{s:?} {ev:?}");
                }
                let hc = in_state(s);
                assert!(!hc.may_package() && !hc.may_deliver() && hc.is_closed());
            }
        }
    }

    #[test]
    fn display_uses_spec_names() {
        assert_eq!(State::Open.to_string(), "OPEN");
        assert_eq!(State::DonePackaging.to_string(), "DONE_PACKAGING");
        assert_eq!(State::DoneDelivering.to_string(), "DONE_DELIVERING");
        assert_eq!(FINISHED.to_string(), "CLOSED");
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::ReadEof),
            Just(Event::FinReceived),
            Just(Event::DataReceived),
            (1u8..15).prop_map(|reason| Event::Error { reason }),
            (1u8..15).prop_map(|reason| Event::EndReceived { reason }),
        ]
    }

    proptest! {
        /// R7.1 to R7.8: random event sequences against an independent
        /// model of §7: two flags for the two directions plus "aborted".
        #[test]
        fn random_events_follow_the_table(events in proptest::collection::vec(event(), 0..40)) {
            let mut hc = HalfClose::new();
            let (mut sent_fin, mut got_fin, mut aborted) = (false, false, false);
            let mut fins_sent = 0;
            let mut ends_sent = 0;
            for ev in events {
                let before = hc.state();
                let result = hc.handle(ev);
                let closed = aborted || (sent_fin && got_fin);
                match ev {
                    Event::DataReceived | Event::FinReceived if got_fin && !closed => {
                        prop_assert!(result.is_err());
                        prop_assert_eq!(hc.state(), before);
                        continue;
                    }
                    _ => {}
                }
                let s = result.unwrap();
                match s.action {
                    Action::SendFin => { prop_assert!(!closed && !sent_fin); fins_sent += 1; sent_fin = true; }
                    Action::DeliverThenShutdownWrite => { prop_assert!(!closed && !got_fin); got_fin = true; }
                    Action::Deliver => prop_assert!(!closed && !got_fin),
                    Action::SendEndAndReset(_) => { prop_assert!(!closed); ends_sent += 1; aborted = true; }
                    Action::Reset => { prop_assert!(!closed); aborted = true; }
                    Action::Nothing => prop_assert!(closed || (sent_fin && ev == Event::ReadEof)),
                }
                // The state is exactly what the two flags say.
                let expect = match (aborted || (sent_fin && got_fin), sent_fin, got_fin) {
                    (true, _, _) => "CLOSED",
                    (false, true, false) => "DONE_PACKAGING",
                    (false, false, true) => "DONE_DELIVERING",
                    (false, false, false) => "OPEN",
                    (false, true, true) => unreachable!(),
                };
                prop_assert_eq!(hc.state().to_string(), expect);
                prop_assert_eq!(hc.may_package(), !hc.is_closed() && !sent_fin);
                prop_assert_eq!(hc.may_deliver(), !hc.is_closed() && !got_fin);
            }
            // At most one FIN and one END leave a stream, never both an END
            // and anything after it.
            prop_assert!(fins_sent <= 1 && ends_sent <= 1);
        }
    }
}
