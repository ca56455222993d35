//! Whole conversations between a client edge and an exit edge, in memory
//! (`pair::Pair`): the real stream map and stream states of both edges,
//! exchanging encoded cells. Each test names the requirements of
//! docs/protocol.md it checks.

mod pair;

use halfpipe_proto::flow::{STREAM_SENDME_INCREMENT, STREAM_WINDOW_START};
use halfpipe_proto::halfclose::{CloseCause, State};
use halfpipe_proto::relay::{end_reason, relay_cmd, DATA_MAX};
use halfpipe_proto::stream::StreamViolation;
use halfpipe_proto::streammap::CircuitViolation;
use pair::{pattern, state, Pair};

/// A stream opened and connected, with `request` sent by the client's
/// application and `reply` by the target.
fn opened(request: &[u8], reply: &[u8]) -> (Pair, u16) {
    let mut p = Pair::default();
    let id = p.open();
    p.drive();
    p.client_stream(id)
        .app
        .borrow_mut()
        .to_send
        .extend_from_slice(request);
    p.exit_stream(id)
        .app
        .borrow_mut()
        .to_send
        .extend_from_slice(reply);
    (p, id)
}

// R5.3, R5.4, R6.1, R6.4: a stream opens and carries bytes both ways, in
// order.
#[test]
fn a_stream_opens_and_carries_bytes_both_ways() {
    let (req, rep) = (pattern(100_000, 1), pattern(70_000, 2));
    let (mut p, id) = opened(&req, &rep);
    p.drive();
    assert!(p.client_stream(id).state.borrow().connected);
    assert_eq!(p.exit_stream(id).app.borrow().received, req);
    assert_eq!(p.client_stream(id).app.borrow().received, rep);
    assert_eq!(state(&p.client_stream(id)), State::Open);
}

// R7.2, R7.4, R7.3, R7.5, R7.9: the case Tor loses. The client's
// application half-closes after its request; the target still answers,
// then closes. Both edges end CLOSED by FIN both ways, nothing reset.
#[test]
fn client_half_closes_first_and_the_reply_still_arrives() {
    let (req, rep) = (pattern(30_000, 3), pattern(250_000, 4));
    let (mut p, id) = opened(&req, &[]);
    p.client_stream(id).app.borrow_mut().eof = true;
    p.drive();
    assert_eq!(state(&p.client_stream(id)), State::DonePackaging);
    assert_eq!(state(&p.exit_stream(id)), State::DoneDelivering);
    assert!(p.exit_stream(id).app.borrow().got_eof, "the target saw EOF");
    assert_eq!(p.exit_stream(id).app.borrow().received, req);
    // The reply flows back through the half-closed stream.
    {
        let s = p.exit_stream(id);
        let mut app = s.app.borrow_mut();
        app.to_send.extend_from_slice(&rep);
        app.eof = true;
    }
    p.drive();
    let (c, e) = (p.client_stream(id), p.exit_stream(id));
    assert_eq!(c.app.borrow().received, rep, "the whole reply");
    assert!(c.app.borrow().got_eof);
    for s in [&c, &e] {
        assert_eq!(state(s), State::Closed(CloseCause::Finished));
        assert!(!s.app.borrow().reset, "closed normally, not reset");
    }
    assert!(p.client.map.stream(id).is_none(), "released");
    assert!(p.client.map.is_recently_closed(id), "R9.1");
}

// R7.2, R7.4, R7.3, R7.5: the other order: the target half-closes first
// and the application still sends.
#[test]
fn exit_half_closes_first_and_the_request_still_arrives() {
    let (req, rep) = (pattern(90_000, 5), pattern(10_000, 6));
    let (mut p, id) = opened(&[], &rep);
    p.exit_stream(id).app.borrow_mut().eof = true;
    p.drive();
    assert_eq!(state(&p.exit_stream(id)), State::DonePackaging);
    assert_eq!(state(&p.client_stream(id)), State::DoneDelivering);
    assert!(p.client_stream(id).app.borrow().got_eof);
    {
        let s = p.client_stream(id);
        let mut app = s.app.borrow_mut();
        app.to_send.extend_from_slice(&req);
        app.eof = true;
    }
    p.drive();
    assert_eq!(p.exit_stream(id).app.borrow().received, req);
    assert_eq!(p.client_stream(id).app.borrow().received, rep);
    assert_eq!(
        state(&p.exit_stream(id)),
        State::Closed(CloseCause::Finished)
    );
}

// R7.2, R7.5: both half-close at once; FINs cross on the wire.
#[test]
fn both_half_close_at_once() {
    let (req, rep) = (pattern(5_000, 7), pattern(6_000, 8));
    let (mut p, id) = opened(&req, &rep);
    p.client_stream(id).app.borrow_mut().eof = true;
    p.exit_stream(id).app.borrow_mut().eof = true;
    p.drive();
    for s in [p.client_stream(id), p.exit_stream(id)] {
        assert_eq!(state(&s), State::Closed(CloseCause::Finished));
        assert!(s.app.borrow().got_eof && !s.app.borrow().reset);
    }
    assert_eq!(p.exit_stream(id).app.borrow().received, req);
    assert_eq!(p.client_stream(id).app.borrow().received, rep);
}

// R7.7, R8.2, R8.7, R7.8, R8.8, R8.9: an application's reset aborts the
// stream at both edges: END(CONNRESET), and a reset at the other end.
#[test]
fn a_reset_aborts_both_ends() {
    let (mut p, id) = opened(b"some", b"bytes");
    p.drive();
    p.client_stream(id).app.borrow_mut().fails = true;
    p.drive();
    let (c, e) = (p.client_stream(id), p.exit_stream(id));
    assert_eq!(
        state(&c),
        State::Closed(CloseCause::EndSent(end_reason::CONNRESET))
    );
    assert_eq!(
        state(&e),
        State::Closed(CloseCause::EndReceived(end_reason::CONNRESET))
    );
    assert!(e.app.borrow().reset, "the target sees a reset, not EOF");
    assert!(!e.app.borrow().got_eof);
}

// R7.8, R8.9, R9.3: after END, late cells for the stream are dropped
// silently, and the edge that got END sends nothing more on it.
#[test]
fn late_cells_after_end_are_dropped() {
    let (mut p, id) = opened(&[], &[]);
    p.drive();
    p.client_stream(id).app.borrow_mut().fails = true;
    p.drive();
    // The exit's application has more to say, but its stream is CLOSED.
    p.exit_stream(id)
        .app
        .borrow_mut()
        .to_send
        .extend_from_slice(b"late");
    let data_before = p.exit.data_sent;
    p.drive();
    assert_eq!(p.exit.data_sent, data_before, "nothing sent after END");
    // Late cells from the exit to the client: DATA, FIN, SENDME, END.
    for command in [
        relay_cmd::DATA,
        relay_cmd::FIN,
        relay_cmd::SENDME,
        relay_cmd::END,
    ] {
        p.exit_sends(command, id, &[end_reason::DONE]);
    }
    p.drive();
    assert!(p.client.violation.is_none(), "{:?}", p.client.violation);
    assert!(p.exit.violation.is_none());
    let c = p.client_stream(id);
    assert!(
        c.app.borrow().received.is_empty(),
        "late DATA is not delivered"
    );
    assert!(!c.app.borrow().got_eof, "a late FIN is not delivered");
    assert!(p.client.map.is_recently_closed(id));
}

// R10.3, R10.7, R10.8, R10.9: a stopped reader holds its stream at the
// window: the sender stops after 500 cells; each 50 cells the reader takes
// let exactly 50 more through; the rest flows once it reads again.
#[test]
fn a_stopped_reader_holds_its_stream_at_the_window() {
    let reply = pattern(2_000 * DATA_MAX, 9);
    let (mut p, id) = opened(&[], &[]);
    p.drive();
    p.client_stream(id).app.borrow_mut().room = Some(0);
    p.exit_stream(id)
        .app
        .borrow_mut()
        .to_send
        .extend_from_slice(&reply);
    p.drive();
    assert_eq!(
        p.exit.data_sent, STREAM_WINDOW_START,
        "one window in flight"
    );
    assert_eq!(p.exit_stream(id).state.borrow().package.value(), 0);
    // The reader takes 50 cells: one SENDME, 50 more cells (R10.9).
    p.client_stream(id).app.borrow_mut().room = Some(STREAM_SENDME_INCREMENT as usize * DATA_MAX);
    p.drive();
    assert_eq!(
        p.exit.data_sent,
        STREAM_WINDOW_START + STREAM_SENDME_INCREMENT
    );
    assert!(p.exit_stream(id).woken.get() >= 1, "the packager was woken");
    // It reads on: everything arrives.
    p.client_stream(id).app.borrow_mut().room = None;
    p.drive();
    assert_eq!(p.client_stream(id).app.borrow().received, reply);
}

// R10.2, R10.8: the circuit window (1000) bounds what all streams of a
// circuit have in flight together: with the client not reading its link,
// three streams (500 each by their own windows) send 1000 cells in all;
// once it reads again, everything arrives.
#[test]
fn the_circuit_window_bounds_all_streams_together() {
    let mut p = Pair::default();
    let ids: Vec<u16> = (0..3).map(|_| p.open()).collect();
    p.drive();
    p.client_link_stalled = true;
    for &id in &ids {
        p.exit_stream(id)
            .app
            .borrow_mut()
            .to_send
            .extend_from_slice(&pattern(600 * DATA_MAX, id as u8));
    }
    p.drive();
    assert_eq!(p.exit.data_sent, 1000, "the circuit window");
    // Once the client reads its link again, all of it arrives.
    p.client_link_stalled = false;
    p.drive();
    for &id in &ids {
        assert_eq!(
            p.client_stream(id).app.borrow().received,
            pattern(600 * DATA_MAX, id as u8)
        );
    }
}

// R7.6: DATA after the peer's FIN is a violation: the circuit is destroyed
// and every stream on it aborted (R3.10, R3.12).
#[test]
fn data_after_fin_destroys_the_circuit() {
    let (mut p, id) = opened(&[], &[]);
    let other = p.open();
    p.drive();
    p.client_stream(id).app.borrow_mut().eof = true;
    p.drive();
    p.client_sends(relay_cmd::DATA, id, b"after FIN");
    p.drive();
    assert_eq!(
        p.exit.violation,
        Some(CircuitViolation::Stream(StreamViolation::HalfClose(
            halfpipe_proto::halfclose::Violation::DataAfterFin
        )))
    );
    assert!(p.client.destroyed, "the client got DESTROY");
    assert!(
        p.client_stream(other).app.borrow().reset,
        "every stream aborted"
    );
}

// R5.13: BEGIN on an open stream ID is a violation; R5.14: on a recently
// closed one it opens a new stream.
#[test]
fn begin_on_an_open_id_is_a_violation_and_on_a_closed_one_opens() {
    let (mut p, id) = opened(&[], &[]);
    p.drive();
    for s in [p.client_stream(id), p.exit_stream(id)] {
        s.app.borrow_mut().eof = true;
    }
    p.drive();
    assert!(p.exit.map.is_recently_closed(id));
    let begin = halfpipe_proto::relay::encode_begin(&halfpipe_proto::relay::Target {
        host: halfpipe_proto::relay::Host::Name("again.example".into()),
        port: 80,
    });
    p.client_sends(relay_cmd::BEGIN, id, &begin);
    p.drive();
    assert!(p.exit.violation.is_none());
    assert!(p.exit.map.stream(id).is_some(), "a new stream on the ID");
    assert!(!p.exit.map.is_recently_closed(id));
    p.client_sends(relay_cmd::BEGIN, id, &begin);
    p.drive();
    assert_eq!(
        p.exit.violation,
        Some(CircuitViolation::IdInUse(relay_cmd::BEGIN))
    );
}

// R5.6, R8.10, R9.1: a refused BEGIN ends the client's stream before
// CONNECTED; the ID is recently closed at both edges and never reused.
#[test]
fn a_refused_begin_ends_the_stream_and_retires_its_id() {
    let mut p = Pair::default();
    p.exit.refuse_with = Some(end_reason::EXITPOLICY);
    let id = p.open();
    p.drive();
    let c = p.client_stream(id);
    assert_eq!(
        state(&c),
        State::Closed(CloseCause::EndReceived(end_reason::EXITPOLICY))
    );
    assert!(!c.state.borrow().connected);
    assert!(p.exit.map.is_recently_closed(id));
    assert!(
        p.client.map.is_recently_closed(id),
        "R9.1 at the client too"
    );
}

// R4.6, R4.7, R4.8: commands the wrong way and stream 0.
#[test]
fn wrong_way_and_stream_zero_are_violations() {
    let cases: [(bool, u8, u16, CircuitViolation); 4] = [
        (
            true,
            relay_cmd::CONNECTED,
            1,
            CircuitViolation::WrongDirection(relay_cmd::CONNECTED),
        ),
        (
            false,
            relay_cmd::BEGIN,
            1,
            CircuitViolation::WrongDirection(relay_cmd::BEGIN),
        ),
        (
            true,
            relay_cmd::DATA,
            0,
            CircuitViolation::StreamZero(relay_cmd::DATA),
        ),
        (
            false,
            relay_cmd::FIN,
            0,
            CircuitViolation::StreamZero(relay_cmd::FIN),
        ),
    ];
    for (to_exit, command, stream, expected) in cases {
        let mut p = Pair::default();
        if to_exit {
            p.client_sends(command, stream, &[]);
        } else {
            p.exit_sends(command, stream, &[]);
        }
        p.drive();
        let got = if to_exit {
            p.exit.violation
        } else {
            p.client.violation
        };
        assert_eq!(got, Some(expected));
    }
}

// R10.10: DATA beyond a stream's deliver window (a peer that ignores the
// window while our reader is stopped) destroys the circuit.
#[test]
fn data_beyond_the_stream_window_is_a_violation() {
    let (mut p, id) = opened(&[], &[]);
    p.drive();
    p.exit_stream(id).app.borrow_mut().room = Some(0);
    for _ in 0..STREAM_WINDOW_START {
        p.client_sends(relay_cmd::DATA, id, b"x");
    }
    p.drive();
    assert!(
        p.exit.violation.is_none(),
        "500 cells are within the window"
    );
    p.client_sends(relay_cmd::DATA, id, b"x");
    p.drive();
    assert!(matches!(
        p.exit.violation,
        Some(CircuitViolation::Stream(StreamViolation::FlowControl(_)))
    ));
}

// R10.5: DATA for a stream the exit never heard of still counts for the
// circuit, and earns circuit SENDMEs (R10.2), but is not delivered (R9.5).
#[test]
fn data_for_unknown_streams_counts_for_the_circuit_only() {
    let mut p = Pair::default();
    for _ in 0..300 {
        p.client_sends(relay_cmd::DATA, 77, b"x");
    }
    p.drive();
    assert!(p.exit.violation.is_none());
    assert_eq!(
        p.exit.map.deliver_window(),
        1000,
        "three circuit SENDMEs sent"
    );
    assert_eq!(p.client.circuit_package.value(), 1000, "and received");
}

// R5.1, R9.4: the client never gives a stream an ID that is 0, open or
// recently closed; once every ID is taken it opens nothing.
#[test]
fn stream_ids_are_never_zero_open_or_recently_closed() {
    let mut p = Pair::default();
    let mut seen = std::collections::HashSet::new();
    while let Some(id) = p.client.map.allocate_id() {
        assert_ne!(id, 0, "R5.1: stream ID 0 is the circuit");
        assert!(seen.insert(id), "R5.1: {id} handed out while open");
        let s = p.client.new_stream(id);
        p.client.map.insert_stream(id, s);
    }
    assert_eq!(seen.len(), usize::from(u16::MAX), "every other ID was used");
    // Stream 1234 closes: its ID is recently closed, and still not free.
    assert!(p.client.map.remove_stream(1234).is_some());
    assert!(p.client.map.is_recently_closed(1234));
    assert_eq!(p.client.map.allocate_id(), None, "R9.4");
}

// R10.1: only DATA uses window. DROP, and FIN and END for streams the exit
// does not know, leave its circuit deliver window at 1000; a stream closed
// by a FIN each way ends with all four of its windows where they started.
#[test]
fn only_data_cells_use_the_windows() {
    let (mut p, id) = opened(&[], &[]);
    p.drive();
    for i in 0..300 {
        p.client_sends(relay_cmd::DROP, id, b"x");
        p.client_sends(relay_cmd::FIN, 9_000 + i, &[]);
        p.client_sends(relay_cmd::END, 9_000 + i, &[end_reason::DONE]);
    }
    p.drive();
    assert!(p.exit.violation.is_none(), "{:?}", p.exit.violation);
    assert_eq!(p.exit.map.deliver_window(), 1000);
    for s in [p.client_stream(id), p.exit_stream(id)] {
        s.app.borrow_mut().eof = true;
    }
    p.drive();
    for s in [p.client_stream(id), p.exit_stream(id)] {
        assert_eq!(state(&s), State::Closed(CloseCause::Finished));
        let st = s.state.borrow();
        assert_eq!(st.package.value(), STREAM_WINDOW_START, "FIN sent");
        assert_eq!(st.deliver.value(), STREAM_WINDOW_START, "FIN received");
    }
    assert_eq!(p.client.circuit_package.value(), 1000);
    assert_eq!(p.exit.circuit_package.value(), 1000);
    assert_eq!(p.client.map.deliver_window(), 1000);
}

// R9.5, R4.10: CONNECTED or RESOLVED with StreamID 0 reach the client for
// no open stream and are dropped; BEGIN on stream 0 at the exit is a
// violation.
#[test]
fn connected_on_stream_zero_is_dropped_and_begin_on_it_is_a_violation() {
    let mut p = Pair::default();
    p.exit_sends(relay_cmd::CONNECTED, 0, &[127, 0, 0, 1, 0, 0, 0, 60]);
    p.exit_sends(relay_cmd::RESOLVED, 0, &[0xF1, 0, 0, 0, 0, 0]);
    p.drive();
    assert_eq!(p.client.violation, None);
    p.client_sends(relay_cmd::BEGIN, 0, b"a.example:80\0");
    p.drive();
    assert_eq!(
        p.exit.violation,
        Some(CircuitViolation::StreamZero(relay_cmd::BEGIN))
    );
}
