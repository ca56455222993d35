//! §3 (circuits) and §4 (relay cells), the exit's side.

use super::common::*;
use crate::case::{check, fail, Ctx, Verdict};
use crate::link::{describe, random, ANSWER};
use crate::targets::{ending, Ending, Target};
use halfpipe_proto::cell::{cmd, destroy_reason};
use halfpipe_proto::relay::{self, relay_cmd};
use std::time::Duration;

pub fn created_fast_carries_y_and_kh(cx: &mut Ctx) -> Verdict {
    // R3.2, R3.3 (`create_circuit` checks KH itself), and R3.5: the relay
    // cells that follow are read in the clear.
    let mut l = cx.link()?;
    let x: [u8; 20] = random();
    l.send_cell(CIRC, cmd::CREATE_FAST, &x)?;
    let c = l.expect(
        "CREATED_FAST",
        |c| c.circ == CIRC && c.command == cmd::CREATED_FAST,
        |_| false,
    )?;
    let (y, kh) = (&c.payload[..20], &c.payload[20..40]);
    check(y != x, "Y, fresh random bytes (R3.3)", "Y equal to X")?;
    check(
        kh == crate::link::key_hash(&x, y),
        "KH = KDF-TOR(X | Y) (R3.3)",
        format!("{kh:02x?}"),
    )?;
    // A second circuit gets another Y.
    let x2: [u8; 20] = random();
    l.send_cell(CIRC2, cmd::CREATE_FAST, &x2)?;
    let c2 = l.expect(
        "CREATED_FAST",
        |c| c.circ == CIRC2 && c.command == cmd::CREATED_FAST,
        |_| false,
    )?;
    check(
        c2.payload[..20] != c.payload[..20],
        "a fresh Y per circuit (R3.3)",
        "the same Y twice",
    )?;
    circuit_works(&mut l, CIRC, 1)
}

pub fn create_fast_on_a_circid_in_use_destroys_that_circuit(cx: &mut Ctx) -> Verdict {
    // R3.6 with R3.12: DESTROY(PROTOCOL) for that circuit; another
    // circuit on the link carries on.
    let mut l = cx.linked(CIRC)?;
    l.create_circuit(CIRC2)?;
    l.send_cell(CIRC, cmd::CREATE_FAST, &random::<20>())?;
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL)?;
    circuit_works(&mut l, CIRC2, 1)
}

pub fn create_fast_with_the_top_bit_clear_is_a_violation(cx: &mut Ctx) -> Verdict {
    // R3.6: the client's CircIDs have the most significant bit set.
    let mut l = cx.link()?;
    l.send_cell(0x0000_0005, cmd::CREATE_FAST, &random::<20>())?;
    expect_destroy(&mut l, 0x0000_0005, destroy_reason::PROTOCOL)?;
    link_works(&mut l, CIRC)
}

pub fn a_destroyed_circid_drops_late_cells_and_is_free_again(cx: &mut Ctx) -> Verdict {
    // R3.11: cells on a destroyed CircID are dropped silently; R3.7: the
    // CircID is free for a new CREATE_FAST.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    l.send_cell(CIRC, cmd::DESTROY, &[destroy_reason::REQUESTED])?;
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, &t.begin())?;
    l.send_relay(CIRC, relay_cmd::DATA, 1, b"late")?;
    expect_quiet(&mut l, "cells on a destroyed circuit are dropped (R3.11)")?;
    check(
        !t.connected_within(Duration::from_millis(100)),
        "no connection for a BEGIN on a destroyed circuit (R3.11)",
        "the exit connected",
    )?;
    l.create_circuit(CIRC)?;
    circuit_works(&mut l, CIRC, 1)
}

pub fn circuits_up_to_the_limit_and_resourcelimit_beyond(cx: &mut Ctx) -> Verdict {
    // R3.9: at least 32 circuits on a link by default; R3.8: a refusal
    // past the limit is DESTROY(RESOURCELIMIT), whatever the limit is (up
    // to the 256 this case tries).
    let mut l = cx.link()?;
    for i in 0..32u32 {
        l.create_circuit(0x8000_1000 + i)?;
    }
    for i in 32..256u32 {
        let circ = 0x8000_1000 + i;
        l.send_cell(circ, cmd::CREATE_FAST, &random::<20>())?;
        let c = next_cell(&mut l, "CREATED_FAST or DESTROY(RESOURCELIMIT)")?;
        match c.command {
            cmd::CREATED_FAST if c.circ == circ => {}
            cmd::DESTROY if c.circ == circ => {
                return check(
                    c.payload.first() == Some(&destroy_reason::RESOURCELIMIT),
                    "DESTROY(RESOURCELIMIT) past the limit (R3.8)",
                    describe(&c),
                );
            }
            _ => return Err(fail("CREATED_FAST or DESTROY(RESOURCELIMIT)", describe(&c))),
        }
    }
    Ok(())
}

pub fn a_circuit_past_the_limit_gets_destroy_resourcelimit(cx: &mut Ctx) -> Verdict {
    // R3.8, with the limit set on the command line (R3.9: configurable):
    // `--max-circuits-per-link 3`.
    let addr = cx.exit_with(&["--max-circuits-per-link", "3"])?;
    let mut l = crate::link::RawLink::connect(addr, &cx.trace)?;
    l.handshake()?;
    for i in 0..3u32 {
        l.create_circuit(0x8000_2000 + i)?;
    }
    l.send_cell(0x8000_2003, cmd::CREATE_FAST, &random::<20>())?;
    expect_destroy(&mut l, 0x8000_2003, destroy_reason::RESOURCELIMIT)?;
    // The link and its circuits carry on.
    circuit_works(&mut l, 0x8000_2000, 1)
}

pub fn destroy_aborts_the_circuits_streams(cx: &mut Ctx) -> Verdict {
    // R3.10: each stream as though END(DESTROY): its TCP connection reset.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_cell(CIRC, cmd::DESTROY, &[destroy_reason::REQUESTED])?;
    match ending(&mut conn, ANSWER) {
        Ending::Reset(_) => Ok(()),
        other => Err(fail(
            "the target's connection reset (R3.10, R8.8)",
            format!("{other:?}"),
        )),
    }
}

pub fn a_violation_destroys_only_its_circuit(cx: &mut Ctx) -> Verdict {
    // R3.12: DESTROY(PROTOCOL), the streams of that circuit reset, the
    // other circuit unaffected.
    let mut l = cx.linked(CIRC)?;
    l.create_circuit(CIRC2)?;
    let t = Target::new();
    let mut doomed = open_stream(&mut l, CIRC, 1, &t)?;
    let mut kept = open_stream(&mut l, CIRC2, 1, &t)?;
    // DATA on stream 0 (R4.8).
    l.send_relay(CIRC, relay_cmd::DATA, 0, b"x")?;
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL)?;
    match ending(&mut doomed, ANSWER) {
        Ending::Reset(_) => {}
        other => {
            return Err(fail(
                "the violating circuit's stream reset (R3.12)",
                format!("{other:?}"),
            ))
        }
    }
    send_data(&mut l, CIRC2, 1, b"alive")?;
    let got = crate::targets::read_n(&mut kept, 5, ANSWER)?;
    check(
        got == b"alive",
        "the other circuit's stream carries on",
        format!("{got:?}"),
    )
}

pub fn a_lost_link_resets_every_stream(cx: &mut Ctx) -> Verdict {
    // R3.13: the link's TCP connection ends: every stream is reset.
    let mut l = cx.linked(CIRC)?;
    l.create_circuit(CIRC2)?;
    let t = Target::new();
    let mut a = open_stream(&mut l, CIRC, 1, &t)?;
    let mut b = open_stream(&mut l, CIRC2, 7, &t)?;
    drop(l);
    for (conn, which) in [(&mut a, "first"), (&mut b, "second")] {
        match ending(conn, ANSWER) {
            Ending::Reset(_) => {}
            other => {
                return Err(fail(
                    format!("the {which} circuit's stream reset (R3.13)"),
                    format!("{other:?}"),
                ))
            }
        }
    }
    Ok(())
}

pub fn cells_for_circuits_never_created_are_dropped(cx: &mut Ctx) -> Verdict {
    // R3.14: RELAY, RELAY_EARLY and DESTROY on an unknown CircID.
    let mut l = cx.link()?;
    let t = Target::new();
    l.send_relay(0x8000_0777, relay_cmd::BEGIN, 1, &t.begin())?;
    l.send_cell(0x8000_0778, cmd::RELAY_EARLY, &[0; 509])?;
    l.send_cell(0x8000_0779, cmd::DESTROY, &[destroy_reason::REQUESTED])?;
    expect_quiet(&mut l, "cells on unknown circuits are dropped (R3.14)")?;
    link_works(&mut l, CIRC)
}

/// A RELAY cell whose header `patch` changes after encoding.
fn patched(circ: u32, command: u8, stream: u16, body: &[u8], patch: impl Fn(&mut [u8])) -> Vec<u8> {
    let mut out = Vec::new();
    relay::encode(&mut out, circ, command, stream, body);
    patch(&mut out[5..]);
    out
}

pub fn relay_header_violations_destroy_the_circuit(cx: &mut Ctx) -> Verdict {
    // R4.4: Recognized not zero, Length above 498.
    let mut l = cx.linked(CIRC)?;
    l.send_raw(
        &patched(CIRC, relay_cmd::DROP, 0, b"", |p| p[1] = 1),
        "RELAY with Recognized 0x0100",
    )?;
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL)?;
    l.create_circuit(CIRC2)?;
    l.send_raw(
        &patched(CIRC2, relay_cmd::DROP, 0, b"", |p| {
            p[9..11].copy_from_slice(&499u16.to_be_bytes())
        }),
        "RELAY with Length 499",
    )?;
    expect_destroy(&mut l, CIRC2, destroy_reason::PROTOCOL)?;
    link_works(&mut l, 0x8000_0003)
}

pub fn relay_cells_are_laid_out_as_specified(cx: &mut Ctx) -> Verdict {
    // R4.1, R4.2, R4.5: the exit's cells have Recognized and Digest zero
    // and Length at most 498; R4.3: the padding of ours is ignored.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    let junk = patched(CIRC, relay_cmd::DATA, 1, b"hello", |p| {
        for b in &mut p[11 + 5..] {
            *b = 0xEE;
        }
    });
    l.send_raw(&junk, "DATA 'hello' with non-zero padding")?;
    let got = crate::targets::read_n(&mut conn, 5, ANSWER)?;
    check(
        got == b"hello",
        "exactly the DATA's bytes (R4.3)",
        format!("{got:?}"),
    )?;
    crate::targets::write_all(&mut conn, &vec![b'z'; 3000])?;
    let mut seen = 0;
    while seen < 3000 {
        let c = l.expect(
            "DATA",
            |c| c.circ == CIRC && c.command == cmd::RELAY,
            |_| false,
        )?;
        let p = &c.payload;
        check(p[1..3] == [0, 0], "Recognized 0 (R4.2)", describe(&c))?;
        check(p[5..9] == [0, 0, 0, 0], "Digest 0 (R4.2)", describe(&c))?;
        let len = u16::from_be_bytes([p[9], p[10]]) as usize;
        check(len <= 498, "Length at most 498 (R4.2)", describe(&c))?;
        if p[0] == relay_cmd::DATA {
            seen += len;
        }
    }
    Ok(())
}

pub fn wrong_way_commands_are_violations(cx: &mut Ctx) -> Verdict {
    // R4.6: CONNECTED or RESOLVED sent to the exit, whatever the stream.
    let mut l = cx.link()?;
    for (i, (command, stream)) in [
        (relay_cmd::CONNECTED, 1u16),
        (relay_cmd::CONNECTED, 0),
        (relay_cmd::RESOLVED, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let circ = 0x8000_0100 + i as u32;
        l.create_circuit(circ)?;
        l.send_relay(circ, command, stream, &[127, 0, 0, 1, 0, 0, 0, 0])?;
        expect_destroy(&mut l, circ, destroy_reason::PROTOCOL)?;
    }
    link_works(&mut l, CIRC)
}

pub fn stream_zero_is_a_violation(cx: &mut Ctx) -> Verdict {
    // R4.8: DATA, FIN, END on stream 0; R4.10: BEGIN and RESOLVE there.
    let mut l = cx.link()?;
    let t = Target::new();
    let cases: [(u8, Vec<u8>); 5] = [
        (relay_cmd::DATA, b"x".to_vec()),
        (relay_cmd::FIN, vec![]),
        (relay_cmd::END, vec![6]),
        (relay_cmd::BEGIN, t.begin()),
        (relay_cmd::RESOLVE, b"localhost\0".to_vec()),
    ];
    for (i, (command, body)) in cases.iter().enumerate() {
        let circ = 0x8000_0200 + i as u32;
        l.create_circuit(circ)?;
        l.send_relay(circ, *command, 0, body)?;
        expect_destroy(&mut l, circ, destroy_reason::PROTOCOL)?;
    }
    check(
        !t.connected_within(Duration::from_millis(100)),
        "no connection for BEGIN on stream 0",
        "the exit connected",
    )
}

pub fn drop_and_unknown_relay_commands_are_dropped(cx: &mut Ctx) -> Verdict {
    // R4.9.
    let mut l = cx.linked(CIRC)?;
    l.send_relay(CIRC, relay_cmd::DROP, 0, b"padding")?;
    l.send_relay(CIRC, relay_cmd::DROP, 5, b"padding")?;
    l.send_relay(CIRC, 77, 1, b"who knows")?;
    l.send_relay(CIRC, 200, 0, b"")?;
    expect_quiet(&mut l, "DROP and unknown relay commands are dropped (R4.9)")?;
    circuit_works(&mut l, CIRC, 1)
}
