//! §10 (flow control, version 1), the exit's side. The kit's circuits do
//! not offer version 2 (§14), so these windows apply.

use super::common::*;
use crate::case::{check, fail, CaseError, Ctx, Verdict};
use crate::link::{describe, Cell, Got, RawLink, ANSWER, QUIET};
use crate::targets::{write_all, Target};
use halfpipe_proto::cell::destroy_reason;
use halfpipe_proto::relay::{relay_cmd, DATA_MAX};
use std::time::Duration;

/// A SENDME's payload is empty or version 0 (R10.12).
fn sendme_payload_ok(body: &[u8]) -> bool {
    body.is_empty() || body[0] == 0
}

pub fn the_receiver_sends_sendmes_as_data_arrives(cx: &mut Ctx) -> Verdict {
    // R10.2: a circuit SENDME once 100 DATA cells have arrived, counting
    // DATA for a stream it does not know (R10.5); R10.3: stream SENDMEs as
    // the target takes the data (R10.6); R10.12: their payloads.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    for _ in 0..60 {
        l.send_relay(CIRC, relay_cmd::DATA, 1, &[1; DATA_MAX])?;
    }
    for _ in 0..40 {
        l.send_relay(CIRC, relay_cmd::DATA, 99, &[2; DATA_MAX])?;
    }
    let got = crate::targets::read_n(&mut conn, 60 * DATA_MAX, ANSWER)?;
    check(
        got.iter().all(|&b| b == 1),
        "stream 1's bytes only",
        "other bytes",
    )?;
    let (cells, _) = l.collect(Duration::from_secs(1));
    let sendmes: Vec<&Cell> = cells.iter().filter(|c| is_sendme(c)).collect();
    let circuit = sendmes
        .iter()
        .filter(|c| matches!(c.relay(), Some((_, 0, _))))
        .count();
    let stream = sendmes
        .iter()
        .filter(|c| matches!(c.relay(), Some((_, 1, _))))
        .count();
    check(
        circuit == 1,
        "one circuit SENDME for 100 DATA cells, 40 of them for an unknown stream (R10.2, R10.5)",
        format!("{circuit}"),
    )?;
    check(
        stream == 1,
        "one stream SENDME for 60 cells written (R10.3)",
        format!("{stream}"),
    )?;
    for c in sendmes {
        let (_, _, body) = c.relay().expect("a SENDME");
        check(
            sendme_payload_ok(body),
            "an empty or version-0 SENDME (R10.12)",
            describe(c),
        )?;
    }
    Ok(())
}

/// DATA cells per stream that arrive within `wait`, up to silence.
/// DATA cells per stream (1, 2) until the link has been quiet for `quiet`
/// (at most 20 s in all).
fn count_data(l: &mut crate::link::RawLink, quiet: Duration) -> (usize, usize) {
    let since = std::time::Instant::now();
    let mut cells = Vec::new();
    loop {
        let (more, closed) = l.collect(quiet);
        let done = more.is_empty() || closed.is_some() || since.elapsed() > Duration::from_secs(20);
        cells.extend(more);
        if done {
            break;
        }
    }
    let on = |s: u16| {
        cells
            .iter()
            .filter(|c| c.is_relay(CIRC, relay_cmd::DATA, s))
            .count()
    };
    (on(1), on(2))
}

pub fn the_sender_stops_at_its_windows_and_resumes_on_sendme(cx: &mut Ctx) -> Verdict {
    // R10.4, R10.8: with no SENDME from us, a stream gets 500 DATA cells
    // and no more; two streams together stop at the circuit's 1000.
    // R10.9: one stream SENDME lets exactly 50 more go once the circuit
    // allows it.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut a = open_stream(&mut l, CIRC, 1, &t)?;
    let mut b = open_stream(&mut l, CIRC, 2, &t)?;
    let lots = vec![b'x'; 600 * DATA_MAX];
    write_all(&mut a, &lots)?;
    write_all(&mut b, &lots)?;
    let (n1, n2) = count_data(&mut l, Duration::from_secs(2));
    check(
        n1 == 500 && n2 == 500,
        "500 DATA cells per stream, then nothing (R10.8)",
        format!("{n1} and {n2}"),
    )?;
    // The circuit's window is 0 as well: a stream SENDME alone moves
    // nothing.
    l.send_relay(CIRC, relay_cmd::SENDME, 1, &[])?;
    let (n1, n2) = count_data(&mut l, QUIET * 2);
    check(
        n1 == 0 && n2 == 0,
        "nothing while the circuit window is 0 (R10.8)",
        format!("{n1} and {n2} DATA cells"),
    )?;
    l.send_relay(CIRC, relay_cmd::SENDME, 0, &[])?;
    let (n1, n2) = count_data(&mut l, Duration::from_secs(1));
    check(
        n1 == 50 && n2 == 0,
        "50 more on stream 1 once the circuit SENDME came (R10.9)",
        format!("{n1} on stream 1 and {n2} on stream 2"),
    )?;
    Ok(())
}

/// Sends DATA on `stream` as the windows allow, taking the exit's SENDMEs,
/// until none has come for a second: the stall of a target that reads
/// nothing. Returns the bytes sent, or fails past `LIMIT`.
pub(super) fn fill_until_stalled(
    l: &mut RawLink,
    circ: u32,
    stream: u16,
) -> Result<(usize, Option<Cell>), CaseError> {
    // What the kernel may take for a target that reads nothing: the
    // exit's send buffer and the target's receive buffer at their largest.
    let limit = 2 * (kernel_max("tcp_wmem") + kernel_max("tcp_rmem")) + (4 << 20);
    let (mut stream_w, mut circ_w, mut sent) = (500u32, 1000u32, 0usize);
    let mut xon_xoff = None;
    let chunk = [0x5Au8; DATA_MAX];
    loop {
        while stream_w > 0 && circ_w > 0 && sent < limit {
            l.send_relay_quiet(circ, relay_cmd::DATA, stream, &chunk)?;
            stream_w -= 1;
            circ_w -= 1;
            sent += DATA_MAX;
        }
        if sent >= limit {
            return Err(fail(
                "stream SENDMEs to stop once the target's buffers are full (R10.3, R10.7)",
                format!(
                    "{} MiB acknowledged to a target that reads nothing",
                    limit >> 20
                ),
            ));
        }
        match l.recv(Duration::from_secs(2)) {
            Got::Cell(c) => match c.relay() {
                Some((relay_cmd::SENDME, 0, _)) if c.circ == circ => circ_w += 100,
                Some((relay_cmd::SENDME, s, _)) if c.circ == circ && s == stream => stream_w += 50,
                Some((relay_cmd::XOFF | relay_cmd::XON, _, _)) => xon_xoff = Some(c),
                _ => {}
            },
            Got::Nothing => return Ok((sent, xon_xoff)),
            Got::Closed(why) => return Err(fail("the link to stay open", why)),
        }
    }
}

/// The largest buffer size of `/proc/sys/net/ipv4/NAME` (4 MiB if it
/// cannot be read).
pub(super) fn kernel_max(name: &str) -> usize {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

pub fn a_target_that_reads_nothing_holds_back_stream_sendmes(cx: &mut Ctx) -> Verdict {
    // R10.3 with R10.7: stream SENDMEs follow what the target's kernel has
    // taken, so a target that reads nothing stops them once its buffers
    // are full; the kit, sending as its windows allow, must then stall,
    // long before 32 MiB. R10.10: one DATA cell past the window is then a
    // violation.
    let mut l = cx.linked(CIRC)?;
    let t = Target::small();
    let _conn = open_stream(&mut l, CIRC, 1, &t)?;
    let (sent, _) = fill_until_stalled(&mut l, CIRC, 1)?;
    l.send_relay(CIRC, relay_cmd::DATA, 1, b"one too many")?;
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL).map_err(|e| match e {
        CaseError::Fail { got, .. } => fail(
            format!(
                "DESTROY(PROTOCOL) for DATA past a shut window (R10.10), after {} KiB",
                sent >> 10
            ),
            got,
        ),
        other => other,
    })
}

pub fn fin_and_end_take_no_window(cx: &mut Ctx) -> Verdict {
    // R10.1: with the stream's deliver window at 0 (a stalled target), a
    // FIN is no violation; nor is an END on another stream of the circuit.
    let mut l = cx.linked(CIRC)?;
    let t = Target::small();
    let _conn = open_stream(&mut l, CIRC, 1, &t)?;
    let _other = open_stream(&mut l, CIRC, 2, &t)?;
    fill_until_stalled(&mut l, CIRC, 1)?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    l.send_relay(CIRC, relay_cmd::END, 2, &[6])?;
    expect_quiet(
        &mut l,
        "FIN and END at a shut window are no violation (R10.1)",
    )?;
    circuit_works(&mut l, CIRC, 3)
}

pub fn a_sendme_beyond_the_start_value_is_a_violation(cx: &mut Ctx) -> Verdict {
    // R10.11: a stream SENDME on a fresh stream (500 + 50 > 500), and a
    // circuit SENDME on a fresh circuit (1000 + 100 > 1000).
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let _conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::SENDME, 1, &[])?;
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL)?;
    l.create_circuit(CIRC2)?;
    l.send_relay(CIRC2, relay_cmd::SENDME, 0, &[])?;
    expect_destroy(&mut l, CIRC2, destroy_reason::PROTOCOL).map_err(|e| match e {
        crate::case::CaseError::Fail { got, .. } => fail(
            "DESTROY(PROTOCOL) for a circuit SENDME beyond 1000 (R10.11)",
            got,
        ),
        other => other,
    })
}
