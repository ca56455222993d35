//! Steps many cases share: a stream to a target, data both ways, and the
//! answers a violation must get.

use crate::case::{check, fail, CaseError, Verdict};
use crate::link::{describe, Cell, Got, RawLink, ANSWER, QUIET};
use crate::targets::Target;
use halfpipe_proto::cell::{cmd, destroy_reason};
use halfpipe_proto::relay::{end_reason, relay_cmd, DATA_MAX};
use std::net::TcpStream;

/// The first CircID of a case's link (most significant bit set, R3.1).
pub const CIRC: u32 = 0x8000_0001;
pub const CIRC2: u32 = 0x8000_0002;

/// A SENDME on any stream of `circ` (skipped where a case does not look
/// at flow control).
pub fn is_sendme(c: &Cell) -> bool {
    matches!(c.relay(), Some((relay_cmd::SENDME, _, _)))
}

/// BEGIN on `stream` to `target`; returns the exit's connection once
/// CONNECTED has come (R5.3, R5.4).
pub fn open_stream(
    l: &mut RawLink,
    circ: u32,
    stream: u16,
    target: &Target,
) -> Result<TcpStream, CaseError> {
    l.send_relay(circ, relay_cmd::BEGIN, stream, &target.begin())?;
    let conn = target.accept(ANSWER)?;
    l.expect(
        "CONNECTED for the BEGIN (R5.4)",
        |c| c.is_relay(circ, relay_cmd::CONNECTED, stream),
        is_sendme,
    )?;
    Ok(conn)
}

/// `data` in DATA cells of at most 498 bytes.
pub fn send_data(l: &mut RawLink, circ: u32, stream: u16, data: &[u8]) -> Verdict {
    for chunk in data.chunks(DATA_MAX) {
        l.send_relay(circ, relay_cmd::DATA, stream, chunk)?;
    }
    Ok(())
}

/// Reads DATA for `stream` until `n` bytes have come, checking each cell
/// on the way (R6.1, R6.2); SENDMEs and PADDING are skipped, anything else
/// fails.
pub fn recv_data(l: &mut RawLink, circ: u32, stream: u16, n: usize) -> Result<Vec<u8>, CaseError> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let c = l.expect(
            &format!(
                "DATA on stream {stream} ({} of {n} bytes so far)",
                got.len()
            ),
            |c| c.is_relay(circ, relay_cmd::DATA, stream),
            is_sendme,
        )?;
        let (_, _, body) = c.relay().expect("a DATA cell");
        // R6.2: never an empty DATA cell (R6.1's bound is the codec's).
        check(
            !body.is_empty(),
            "no DATA cell with Length 0 (R6.2)",
            describe(&c),
        )?;
        got.extend_from_slice(body);
    }
    Ok(got)
}

/// The next cell for `stream` must be END with `reason` (R8.1).
pub fn expect_end(l: &mut RawLink, circ: u32, stream: u16, reason: u8) -> Verdict {
    expect_end_within(l, (circ, stream), reason, ANSWER, "R8.1")
}

/// END with `reason` on `(circ, stream)` within `wait`, for answers that
/// take long; `why` names the requirement.
pub fn expect_end_within(
    l: &mut RawLink,
    (circ, stream): (u32, u16),
    reason: u8,
    wait: std::time::Duration,
    why: &str,
) -> Verdict {
    let c = l.expect_within(
        &format!(
            "END({}) on stream {stream} ({why})",
            end_reason::name(reason)
        ),
        wait,
        |c| c.is_relay(circ, relay_cmd::END, stream),
        is_sendme,
    )?;
    let (_, _, body) = c.relay().expect("an END cell");
    check(
        body.first() == Some(&reason),
        format!("END reason {} ({why})", end_reason::name(reason)),
        describe(&c),
    )
}

/// The target's connection must be reset (`why` names the requirement).
pub fn expect_reset(conn: &mut TcpStream, why: &str) -> Verdict {
    match crate::targets::ending(conn, ANSWER) {
        crate::targets::Ending::Reset(_) => Ok(()),
        other => Err(fail(
            format!("a reset at the target ({why})"),
            short(&other),
        )),
    }
}

/// How a connection ended, without its bytes.
pub fn short(e: &crate::targets::Ending) -> String {
    match e {
        crate::targets::Ending::Eof(g) => format!("end of file after {} bytes", g.len()),
        crate::targets::Ending::Reset(g) => format!("a reset after {} bytes", g.len()),
        crate::targets::Ending::Open(g) => format!("still open after {} bytes", g.len()),
    }
}

/// The next cell on `circ` must be DESTROY with `reason` (R2.4).
pub fn expect_destroy(l: &mut RawLink, circ: u32, reason: u8) -> Verdict {
    let c = l.expect(
        &format!(
            "DESTROY({}) on circ {circ:#x}",
            destroy_reason::name(reason)
        ),
        |c| c.is_destroy(circ),
        |c| is_sendme(c) || c.circ != circ,
    )?;
    check(
        c.payload.first() == Some(&reason),
        format!("DESTROY reason {}", destroy_reason::name(reason)),
        describe(&c),
    )
}

/// Nothing but PADDING and SENDMEs for `QUIET`: a cell that must not come.
pub fn expect_quiet(l: &mut RawLink, what_not: &str) -> Verdict {
    let (cells, closed) = l.collect(QUIET);
    if let Some(c) = cells.iter().find(|c| !is_sendme(c)) {
        return Err(fail(format!("no answer ({what_not})"), describe(c)));
    }
    if let Some(why) = closed {
        return Err(fail(
            format!("the link to stay open ({what_not})"),
            format!("it closed: {why}"),
        ));
    }
    Ok(())
}

/// A circuit that still carries a stream both ways: the proof that a fault
/// elsewhere left it alone.
pub fn circuit_works(l: &mut RawLink, circ: u32, stream: u16) -> Verdict {
    let t = Target::new();
    let mut conn = open_stream(l, circ, stream, &t)?;
    send_data(l, circ, stream, b"ping")?;
    let got = crate::targets::read_n(&mut conn, 4, ANSWER)?;
    check(got == b"ping", "ping at the target", format!("{got:?}"))?;
    crate::targets::write_all(&mut conn, b"pong")?;
    let back = recv_data(l, circ, stream, 4)?;
    check(back == b"pong", "pong back", format!("{back:?}"))
}

/// Whether the link is still open: a new circuit on it is answered.
pub fn link_works(l: &mut RawLink, circ: u32) -> Verdict {
    l.create_circuit(circ)
}

/// The exit must close the link, without a VERSIONS cell (R1.7).
pub fn expect_closed_without_versions(l: &mut RawLink, why: &str) -> Verdict {
    expect_closed_without_versions_within(l, why, ANSWER)
}

/// As `expect_closed_without_versions`, within `wait`. Before a handshake
/// there is no framing, so the bytes are looked at raw: a VERSIONS cell
/// begins `00 00 07`.
pub fn expect_closed_without_versions_within(
    l: &mut RawLink,
    why: &str,
    wait: std::time::Duration,
) -> Verdict {
    let (bytes, ended) = l.raw_within(wait);
    if bytes.starts_with(&[0, 0, cmd::VERSIONS]) {
        return Err(fail(
            format!("no VERSIONS before closing (R1.7; {why})"),
            format!("{:02x?}", &bytes[..bytes.len().min(16)]),
        ));
    }
    match ended {
        Some(_) => Ok(()),
        None => Err(fail(
            format!("the link closed ({why})"),
            format!("still open after {wait:?}"),
        )),
    }
}

/// Waits for the next cell whatever it is, for cases that look at it raw.
pub fn next_cell(l: &mut RawLink, what: &str) -> Result<Cell, CaseError> {
    match l.recv(ANSWER) {
        Got::Cell(c) => Ok(c),
        Got::Nothing => Err(fail(what, "nothing")),
        Got::Closed(why) => Err(fail(what, format!("the link closed ({why})"))),
    }
}
