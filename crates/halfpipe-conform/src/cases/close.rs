//! §7 (half-close), §8 (abortive close) and §9 (late cells), the exit's
//! side: the part of the protocol halfpipe exists for.

use super::common::*;
use crate::case::{check, fail, CaseError, Ctx, Verdict};
use crate::link::{describe, ANSWER};
use crate::targets::{ending, read_n, reset, write_all, Ending, Target};
use halfpipe_proto::cell::destroy_reason;
use halfpipe_proto::relay::{end_reason, relay_cmd};
use std::time::Duration;

/// How long a half-closed stream is left alone before its other direction
/// is used: long enough that a timer on half-closed streams would show.
const HALF_CLOSED_FOR: Duration = Duration::from_secs(3);

pub fn the_clients_fin_half_closes_and_the_reply_still_flows(cx: &mut Ctx) -> Verdict {
    // R7.4: FIN after DATA: the data, then shutdown(SHUT_WR) at the target;
    // R7.10: the stream is kept while the target answers later; R7.3: the
    // target's end of file becomes FIN; R7.9: the connection is then closed
    // normally, not reset.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    send_data(&mut l, CIRC, 1, b"request")?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    match ending(&mut conn, ANSWER) {
        Ending::Eof(got) if got == b"request" => {}
        other => {
            return Err(fail(
                "'request', then end of file at the target (R7.4)",
                short(&other),
            ))
        }
    }
    std::thread::sleep(HALF_CLOSED_FOR);
    write_all(&mut conn, b"the reply")?;
    let got = recv_data(&mut l, CIRC, 1, 9)?;
    check(
        got == b"the reply",
        "the reply after the half-close (R7.10)",
        format!("{got:?}"),
    )?;
    crate::targets::half_close(&conn)?;
    l.expect(
        "FIN after the reply's DATA (R7.3)",
        |c| c.is_relay(CIRC, relay_cmd::FIN, 1),
        is_sendme,
    )?;
    // R7.9: closed normally: the target reads end of file, not a reset.
    match ending(&mut conn, ANSWER) {
        Ending::Eof(rest) if rest.is_empty() => {}
        other => return Err(fail("a normal close after both FINs (R7.9)", short(&other))),
    }
    expect_quiet(&mut l, "nothing more on a CLOSED stream (R7.1)")
}

pub fn the_targets_fin_comes_after_its_data_and_the_request_still_flows(cx: &mut Ctx) -> Verdict {
    // R7.2: FIN after every DATA read before the end of file; R7.1: no
    // DATA after it; R7.5: our FIN then ends the stream, after our data;
    // R7.9: closed normally.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    let banner: Vec<u8> = (0..3000u32).map(|i| (i % 200) as u8).collect();
    write_all(&mut conn, &banner)?;
    crate::targets::half_close(&conn)?;
    let got = recv_data(&mut l, CIRC, 1, banner.len())?;
    check(got == banner, "the target's bytes in order", "other bytes")?;
    l.expect(
        "FIN after the last DATA (R7.2)",
        |c| c.is_relay(CIRC, relay_cmd::FIN, 1),
        is_sendme,
    )?;
    std::thread::sleep(HALF_CLOSED_FOR);
    send_data(&mut l, CIRC, 1, b"late request")?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    match ending(&mut conn, ANSWER) {
        Ending::Eof(got) if got == b"late request" => {}
        other => {
            return Err(fail(
                "'late request', then end of file (R7.5, R7.9)",
                short(&other),
            ))
        }
    }
    expect_quiet(&mut l, "no DATA after FIN (R7.1)")
}

pub fn data_or_fin_after_fin_is_a_violation(cx: &mut Ctx) -> Verdict {
    // R7.6: in DONE_DELIVERING, DATA or FIN destroys the circuit.
    let mut l = cx.linked(CIRC)?;
    l.create_circuit(CIRC2)?;
    let t = Target::new();
    let _a = open_stream(&mut l, CIRC, 1, &t)?;
    let _b = open_stream(&mut l, CIRC2, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    l.send_relay(CIRC, relay_cmd::DATA, 1, b"too late")?;
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL)?;
    l.send_relay(CIRC2, relay_cmd::FIN, 1, &[])?;
    l.send_relay(CIRC2, relay_cmd::FIN, 1, &[])?;
    expect_destroy(&mut l, CIRC2, destroy_reason::PROTOCOL)
}

pub fn end_resets_the_target_and_nothing_follows_it(cx: &mut Ctx) -> Verdict {
    // R7.8, R8.8: END: the target's connection is reset (it wrote nothing,
    // so a plain close would show as an end of file); R8.9: no cell on the
    // stream after it. The stream is idle: the exit has nothing of its own
    // in flight on it.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::END, 1, &[end_reason::MISC])?;
    // The exit handles a circuit's cells in order: once a malformed BEGIN
    // sent after the END is answered, the END has been handled.
    l.send_relay(CIRC, relay_cmd::BEGIN, 2, b"no NUL")?;
    l.expect(
        "END(TORPROTOCOL) for a malformed BEGIN, and no cell on stream 1 after our END (R8.9)",
        |c| c.is_relay(CIRC, relay_cmd::END, 2),
        |c| c.is_relay(CIRC, relay_cmd::SENDME, 0),
    )?;
    match ending(&mut conn, ANSWER) {
        Ending::Reset(_) => {}
        other => return Err(fail("a reset at the target (R8.8)", short(&other))),
    }
    let (cells, _) = l.collect(Duration::from_millis(300));
    if let Some(c) = cells
        .iter()
        .find(|c| c.circ == CIRC && matches!(c.relay(), Some((_, 1, _))))
    {
        return Err(fail("no cell on the stream after END (R8.9)", describe(c)));
    }
    circuit_works(&mut l, CIRC, 3)
}

pub fn a_connection_aborted_on_the_host_is_ended_with_misc(cx: &mut Ctx) -> Verdict {
    // R8.6: an error on an open stream that is not a reset by the peer, a
    // timeout or a lack of resources. The kit aborts the exit's own
    // connection to the target on this host (`ss -K`): the exit's next read
    // fails with ECONNABORTED. It must send END(MISC), and the circuit
    // carries on.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    let (exit_side, target_side) = (
        conn.peer_addr()
            .map_err(|e| fail("the target's peer", e.to_string()))?,
        conn.local_addr()
            .map_err(|e| fail("the target's address", e.to_string()))?,
    );
    crate::host::abort_connection(exit_side, target_side).map_err(CaseError::Skip)?;
    // The abort resets the target's side too: the proof that it took.
    if !matches!(ending(&mut conn, ANSWER), Ending::Reset(_)) {
        return Err(CaseError::Skip(
            "`ss -K` did not abort the exit's connection (needs root and SOCK_DESTROY)".into(),
        ));
    }
    expect_end(&mut l, CIRC, 1, end_reason::MISC)?;
    circuit_works(&mut l, CIRC, 2)
}

pub fn end_discards_what_is_queued_for_the_target(cx: &mut Ctx) -> Verdict {
    // R8.8: data still queued for the stream is discarded. The target
    // reads nothing until the kit's DATA has filled every buffer on the
    // way (the stall); then END; then the target reads: it must get a
    // reset before all of what was sent, not all of it and an end of file.
    let mut l = cx.linked(CIRC)?;
    let t = Target::small();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    let (sent, _) = super::flow::fill_until_stalled(&mut l, CIRC, 1)?;
    l.send_relay(CIRC, relay_cmd::END, 1, &[end_reason::MISC])?;
    std::thread::sleep(Duration::from_millis(200));
    match ending(&mut conn, ANSWER * 2) {
        Ending::Reset(got) if got.len() < sent => Ok(()),
        other => Err(fail(
            format!("a reset before the {sent} bytes sent were all delivered (R8.8)"),
            short(&other),
        )),
    }
}

pub fn a_target_reset_becomes_end_connreset(cx: &mut Ctx) -> Verdict {
    // R7.7, R8.2 (with R8.1's reason byte); the circuit carries on.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let conn = open_stream(&mut l, CIRC, 1, &t)?;
    reset(conn);
    expect_end(&mut l, CIRC, 1, end_reason::CONNRESET)?;
    circuit_works(&mut l, CIRC, 2)
}

pub fn a_target_reset_while_half_closed_becomes_end_connreset(cx: &mut Ctx) -> Verdict {
    // R7.7 in DONE_DELIVERING: an error aborts whatever the state.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    match ending(&mut conn, ANSWER) {
        Ending::Eof(_) => {}
        other => return Err(fail("end of file at the target (R7.4)", short(&other))),
    }
    reset(conn);
    expect_end(&mut l, CIRC, 1, end_reason::CONNRESET)
}

pub fn an_idle_stream_past_its_timeout_gets_end_timeout(cx: &mut Ctx) -> Verdict {
    // R8.3 with R8.7, the timeout set on the command line:
    // `--idle-timeout 1s`. The stream carries one byte each way, then
    // nothing: END(TIMEOUT), and the target is reset.
    let addr = cx.exit_with(&["--idle-timeout", "1s"])?;
    let mut l = crate::link::RawLink::connect(addr, &cx.trace)?;
    l.handshake()?;
    l.create_circuit(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    send_data(&mut l, CIRC, 1, b"x")?;
    read_n(&mut conn, 1, ANSWER)?;
    expect_end_within(
        &mut l,
        (CIRC, 1),
        end_reason::TIMEOUT,
        ANSWER,
        "a stream idle past --idle-timeout, R8.3",
    )?;
    expect_reset(&mut conn, "R8.7")
}

pub fn streams_open_at_the_shutdown_deadline_get_end_hibernating(cx: &mut Ctx) -> Verdict {
    // R8.5: the exit is told to stop (SIGTERM) while a stream is open and
    // idle; when its shutdown deadline passes (its own grace period; this
    // case waits a minute), the stream gets END(HIBERNATING) and its
    // target a reset (R8.7).
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    cx.signal_all(libc::SIGTERM);
    expect_end_within(
        &mut l,
        (CIRC, 1),
        end_reason::HIBERNATING,
        Duration::from_secs(60),
        "the shutdown deadline, R8.5",
    )?;
    expect_reset(&mut conn, "R8.7")
}

pub fn late_cells_for_closed_and_unknown_streams_are_dropped(cx: &mut Ctx) -> Verdict {
    // R9.1, R9.3: after our END, SENDME, DATA, FIN and END for the stream
    // are dropped silently; R9.5: so are cells for a stream never opened.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let _conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::END, 1, &[end_reason::DONE])?;
    l.send_relay(CIRC, relay_cmd::SENDME, 1, &[])?;
    l.send_relay(CIRC, relay_cmd::DATA, 1, b"late")?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    l.send_relay(CIRC, relay_cmd::END, 1, &[end_reason::DONE])?;
    l.send_relay(CIRC, relay_cmd::DATA, 99, b"never opened")?;
    l.send_relay(CIRC, relay_cmd::FIN, 98, &[])?;
    expect_quiet(
        &mut l,
        "late and unknown-stream cells are dropped (R9.3, R9.5)",
    )?;
    circuit_works(&mut l, CIRC, 2)
}

pub fn cells_after_a_clean_close_are_late_cells(cx: &mut Ctx) -> Verdict {
    // R9.1 for CLOSED through two FINs (R7.9): the ID is recently closed,
    // so DATA for it is dropped, not a violation.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    match ending(&mut conn, ANSWER) {
        Ending::Eof(_) => {}
        other => return Err(fail("end of file at the target (R7.4)", short(&other))),
    }
    crate::targets::half_close(&conn)?;
    l.expect(
        "FIN from the exit",
        |c| c.is_relay(CIRC, relay_cmd::FIN, 1),
        is_sendme,
    )?;
    l.send_relay(CIRC, relay_cmd::DATA, 1, b"late")?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    expect_quiet(
        &mut l,
        "late cells on a cleanly closed stream are dropped (R9.3)",
    )?;
    circuit_works(&mut l, CIRC, 2)
}
