//! §1 (the link handshake) and §2 (cell commands), the exit's side.

use super::common::*;
use crate::case::{check, fail, Ctx, Verdict};
use crate::link::{RawLink, ANSWER, QUIET, VERSIONS_4};
use halfpipe_proto::cell::{self, cmd, destroy_reason};
use halfpipe_proto::relay::relay_cmd;
use std::time::{Duration, Instant};

/// VERSIONS with `versions`, and an odd `Length` when `odd`.
fn versions_cell(versions: &[u16], odd: bool) -> Vec<u8> {
    let mut body: Vec<u8> = versions.iter().flat_map(|v| v.to_be_bytes()).collect();
    if odd {
        body.push(0);
    }
    let mut out = vec![0, 0, cmd::VERSIONS];
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn exit_speaks_only_after_the_clients_versions(cx: &mut Ctx) -> Verdict {
    let addr = cx.exit()?;
    let mut l = RawLink::connect(addr, &cx.trace)?;
    // R1.2: nothing before our VERSIONS.
    let (early, _) = l.raw_within(QUIET);
    if !early.is_empty() {
        return Err(fail(
            "nothing before the client's VERSIONS (R1.2)",
            format!("{:02x?}", &early[..early.len().min(16)]),
        ));
    }
    l.handshake()?;
    // R1.11: no CERTS, AUTH_CHALLENGE or NETINFO after VERSIONS.
    expect_quiet(&mut l, "no handshake cell but VERSIONS (R1.11)")?;
    // R1.9, R2.1: fixed-length cells of 514 bytes, CREATED_FAST is 6.
    l.create_circuit(CIRC)
}

pub fn the_highest_common_version_is_adopted(cx: &mut Ctx) -> Verdict {
    // R1.3: a list with 3, 4 and 5 has 4 in common with the exit's.
    let addr = cx.exit()?;
    let mut l = RawLink::connect(addr, &cx.trace)?;
    l.send_raw(&versions_cell(&[3, 4, 5], false), "VERSIONS [3, 4, 5]")?;
    let versions = l.recv_versions()?;
    check(
        versions.contains(&4),
        "VERSIONS listing 4",
        format!("{versions:?}"),
    )?;
    // Version 4's framing from here on (4-byte CircIDs).
    l.create_circuit(CIRC)
}

pub fn no_common_version_closes_the_link(cx: &mut Ctx) -> Verdict {
    let mut l = RawLink::connect(cx.exit()?, &cx.trace)?;
    l.send_raw(&versions_cell(&[3], false), "VERSIONS [3]")?;
    expect_closed_without_versions(&mut l, "no common version, R1.3")
}

pub fn an_odd_versions_length_closes_the_link(cx: &mut Ctx) -> Verdict {
    let mut l = RawLink::connect(cx.exit()?, &cx.trace)?;
    l.send_raw(&versions_cell(&[4], true), "VERSIONS with Length 3")?;
    expect_closed_without_versions(&mut l, "odd Length, R1.4")
}

pub fn a_first_cell_that_is_not_versions_closes_the_link(cx: &mut Ctx) -> Verdict {
    let mut l = RawLink::connect(cx.exit()?, &cx.trace)?;
    let mut create = Vec::new();
    cell::encode_fixed(&mut create, CIRC, cmd::CREATE_FAST, &[7; 20]);
    // Sent as raw bytes: a v3-framed CREATE_FAST would have 2-byte CircIDs,
    // this one is in v4 framing, and neither is VERSIONS.
    l.send_raw(&create, "CREATE_FAST before VERSIONS")?;
    expect_closed_without_versions(&mut l, "first cell not VERSIONS, R1.5")
}

pub fn a_silent_or_partial_handshake_is_closed_after_10_seconds(cx: &mut Ctx) -> Verdict {
    // R1.6: 10 s from the accept, for a silent link and for one that sent
    // half a VERSIONS cell.
    let addr = cx.exit()?;
    let mut silent = RawLink::connect(addr, &cx.trace)?;
    let mut partial = RawLink::connect(addr, &cx.trace)?;
    partial.send_raw(&VERSIONS_4[..4], "the first 4 bytes of VERSIONS")?;
    let since = Instant::now();
    let bound = Duration::from_secs(10) + ANSWER;
    for (l, what) in [(&mut silent, "silent"), (&mut partial, "partial")] {
        let left = bound.saturating_sub(since.elapsed());
        expect_closed_without_versions_within(
            l,
            &format!("the {what} link, 10 s after the accept, R1.6"),
            left,
        )?;
    }
    Ok(())
}

pub fn a_failed_handshake_touches_nothing_else(cx: &mut Ctx) -> Verdict {
    // R1.8: a good link with a stream carries on while other connections
    // fail their handshakes.
    let mut good = cx.linked(CIRC)?;
    let t = crate::targets::Target::new();
    let mut conn = open_stream(&mut good, CIRC, 1, &t)?;
    let addr = cx.exit()?;
    for bytes in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &versions_cell(&[3], false),
        &versions_cell(&[4], true),
    ] {
        let mut bad = RawLink::connect(addr, &cx.trace)?;
        bad.send_raw(bytes, "a bad handshake")?;
        expect_closed_without_versions(&mut bad, "a bad handshake")?;
    }
    send_data(&mut good, CIRC, 1, b"still here")?;
    let got = crate::targets::read_n(&mut conn, 10, ANSWER)?;
    check(
        got == b"still here",
        "the good stream's bytes",
        format!("{got:?}"),
    )?;
    circuit_works(&mut good, CIRC, 2)
}

pub fn variable_padding_and_unknown_cells_are_ignored(cx: &mut Ctx) -> Verdict {
    let mut l = cx.link()?;
    // R1.10: variable-length cells read in full and ignored (their bodies
    // look like cells, to catch a reader that does not skip them whole).
    let mut fake = Vec::new();
    cell::encode_fixed(&mut fake, CIRC, cmd::CREATE, &[1; 100]);
    l.send_cell(0, cmd::VPADDING, &fake)?;
    l.send_cell(0, 200, &[0xAB; 2000])?;
    l.send_cell(0, cmd::VERSIONS, &[0, 4])?;
    // R2.2: PADDING; R2.6: unknown fixed-length commands.
    l.send_cell(0, cmd::PADDING, &[])?;
    l.send_cell(CIRC, 42, &[9; 20])?;
    l.send_cell(0, 11, &[])?;
    expect_quiet(&mut l, "ignored cells get no answer (R1.10, R2.2, R2.6)")?;
    l.create_circuit(CIRC)?;
    circuit_works(&mut l, CIRC, 1)
}

pub fn relay_early_is_handled_as_relay(cx: &mut Ctx) -> Verdict {
    // R2.3: BEGIN in a RELAY_EARLY cell opens a stream.
    let mut l = cx.linked(CIRC)?;
    let t = crate::targets::Target::new();
    let mut payload = Vec::new();
    halfpipe_proto::relay::encode(&mut payload, CIRC, relay_cmd::BEGIN, 1, &t.begin());
    payload[4] = cmd::RELAY_EARLY;
    l.send_raw(&payload, "RELAY_EARLY BEGIN stream 1")?;
    let _conn = t.accept(ANSWER)?;
    l.expect(
        "CONNECTED for a BEGIN sent in RELAY_EARLY",
        |c| c.is_relay(CIRC, relay_cmd::CONNECTED, 1),
        is_sendme,
    )?;
    Ok(())
}

pub fn create_and_create2_get_destroy_protocol(cx: &mut Ctx) -> Verdict {
    // R2.5, with R2.4's reason byte first.
    let mut l = cx.link()?;
    l.send_cell(CIRC, cmd::CREATE, &[1; 100])?;
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL)?;
    l.send_cell(CIRC2, cmd::CREATE2, &[0, 2, 0, 32])?;
    expect_destroy(&mut l, CIRC2, destroy_reason::PROTOCOL)?;
    link_works(&mut l, 0x8000_0003)
}
