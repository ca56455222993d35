//! §5 (opening a stream) and §6 (data), the exit's side.

use super::common::*;
use crate::case::{check, fail, CaseError, Ctx, Verdict};
use crate::link::{describe, ANSWER};
use crate::targets::{ending, read_n, write_all, Ending, Target};
use halfpipe_proto::cell::destroy_reason;
use halfpipe_proto::relay::{end_reason, relay_cmd};
use std::time::Duration;

/// A port nothing listens on (bound, then closed).
fn closed_port() -> u16 {
    crate::subject::free_port()
}

pub fn begin_connects_and_connected_comes_first_and_once(cx: &mut Ctx) -> Verdict {
    // R5.3, R5.4: CONNECTED carries 127.0.0.1 and a TTL; R5.20: it is the
    // stream's first cell and comes once.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, &t.begin())?;
    let mut conn = t.accept(ANSWER)?;
    write_all(&mut conn, b"early bytes")?;
    let c = l.expect(
        "CONNECTED as the stream's first cell (R5.20)",
        |c| c.circ == CIRC && matches!(c.relay(), Some((_, 1, _))),
        is_sendme,
    )?;
    let (command, _, body) = c.relay().expect("a relay cell");
    check(
        command == relay_cmd::CONNECTED,
        "CONNECTED first (R5.20)",
        describe(&c),
    )?;
    check(
        body.len() == 8 && body[..4] == [127, 0, 0, 1],
        "CONNECTED with IPv4 127.0.0.1 and a TTL: 8 bytes (R5.4)",
        format!("{body:02x?}"),
    )?;
    let got = recv_data(&mut l, CIRC, 1, 11)?;
    check(
        got == b"early bytes",
        "the target's bytes",
        format!("{got:?}"),
    )?;
    let (cells, _) = l.collect(Duration::from_millis(300));
    if let Some(c) = cells
        .iter()
        .find(|c| c.is_relay(CIRC, relay_cmd::CONNECTED, 1))
    {
        return Err(fail("CONNECTED at most once (R5.20)", describe(c)));
    }
    Ok(())
}

pub fn a_name_is_resolved_then_checked_and_connected(cx: &mut Ctx) -> Verdict {
    // R5.3: `localhost` resolves to 127.0.0.1 (and perhaps ::1): the
    // policy, which admits those two and no name, is applied to what the
    // name resolved to, and the exit connects there (the target listens on
    // both).
    let mut l = cx.linked(CIRC)?;
    let t = Target::dual();
    let body = format!("localhost:{}\0", t.addr.port());
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, body.as_bytes())?;
    // The answer first (the kernel completes the connection before the
    // target accepts it), so that a refusal fails as the answer it is.
    l.expect(
        "CONNECTED for a name that resolves to an allowed address (R5.3)",
        |c| c.is_relay(CIRC, relay_cmd::CONNECTED, 1),
        is_sendme,
    )?;
    let _conn = t.accept(ANSWER)?;
    Ok(())
}

pub fn malformed_begins_get_end_torprotocol(cx: &mut Ctx) -> Verdict {
    // R5.5, with R5.2's grammar: each of these is malformed.
    let mut l = cx.linked(CIRC)?;
    let bad: [&[u8]; 8] = [
        b"127.0.0.1:80",      // no NUL
        b"127.0.0.1\0",       // no port
        b"127.0.0.1:0\0",     // port zero
        b"127.0.0.1:65536\0", // port too large
        b"127.0.0.1:8x\0",    // port not decimal
        b"[::1:80\0",         // "[" never closed
        b"bad host!:80\0",    // bytes outside the set
        b"\0",                // empty
    ];
    for (i, body) in bad.iter().enumerate() {
        let stream = 10 + i as u16;
        l.send_relay(CIRC, relay_cmd::BEGIN, stream, body)?;
        expect_end(&mut l, CIRC, stream, end_reason::TORPROTOCOL)?;
    }
    circuit_works(&mut l, CIRC, 1)
}

pub fn a_target_outside_the_policy_gets_end_exitpolicy(cx: &mut Ctx) -> Verdict {
    // R5.6: the kit's policy admits 127.0.0.1 only.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let body = format!("127.0.0.2:{}\0", t.addr.port());
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, body.as_bytes())?;
    expect_end(&mut l, CIRC, 1, end_reason::EXITPOLICY)
}

/// The error this host's own connect to `target` fails with at once, or
/// why the case cannot use it: the kit asks the same of the kernel before
/// it asks the exit, so a host that behaves otherwise skips the case. The
/// exit must run on this host (no packet may leave for `target`).
fn local_connect_error(cx: &Ctx, target: &str, want: i32) -> Result<(), CaseError> {
    if let crate::subject::Impl::RunningExit(exit) = cx.imp {
        if !exit.ip().is_loopback() {
            return Err(CaseError::Skip(format!(
                "the exit at {exit} may be on another host, whose connect to {target} the kit cannot vouch for"
            )));
        }
    }
    let addr: std::net::SocketAddr = target.parse().expect("a socket address");
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        Err(e) if e.raw_os_error() == Some(want) => Ok(()),
        other => Err(CaseError::Skip(format!(
            "this host's own connect to {target} gave {other:?}, not the error the case needs"
        ))),
    }
}

pub fn an_unreachable_network_gets_end_noroute(cx: &mut Ctx) -> Verdict {
    // R5.10: the kit's policy admits 224.0.0.1:9. A TCP connect to a
    // multicast address fails in the connecting host's kernel with
    // ENETUNREACH before any packet is sent, so the case stays on this
    // host and still meets a network the target cannot be reached on.
    local_connect_error(cx, "224.0.0.1:9", libc::ENETUNREACH)?;
    let mut l = cx.linked(CIRC)?;
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, b"224.0.0.1:9\0")?;
    expect_end(&mut l, CIRC, 1, end_reason::NOROUTE)?;
    circuit_works(&mut l, CIRC, 2)
}

pub fn a_connect_that_fails_otherwise_gets_end_misc(cx: &mut Ctx) -> Verdict {
    // R5.12: a failure that no other row names. The kit's policy admits
    // [fe80::1]:9; a link-local address without an interface cannot be
    // connected to (EINVAL, in the kernel, before any packet): neither a
    // refusal, a timeout, an unreachable network nor a lack of resources.
    local_connect_error(cx, "[fe80::1]:9", libc::EINVAL)?;
    let mut l = cx.linked(CIRC)?;
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, b"[fe80::1]:9\0")?;
    expect_end(&mut l, CIRC, 1, end_reason::MISC)?;
    circuit_works(&mut l, CIRC, 2)
}

pub fn a_name_that_does_not_resolve_gets_end_resolvefailed(cx: &mut Ctx) -> Verdict {
    // R5.7: `.invalid` never resolves (RFC 6761).
    let mut l = cx.linked(CIRC)?;
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, b"no-such-host.invalid:80\0")?;
    expect_end(&mut l, CIRC, 1, end_reason::RESOLVEFAILED)
}

pub fn a_refused_connection_gets_end_connectrefused(cx: &mut Ctx) -> Verdict {
    // R5.8.
    let mut l = cx.linked(CIRC)?;
    let body = format!("127.0.0.1:{}\0", closed_port());
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, body.as_bytes())?;
    expect_end(&mut l, CIRC, 1, end_reason::CONNECTREFUSED)
}

/// The answers of a RESOLVED payload, each (type, value), or what is
/// wrong with its layout (R5.18: Type, Length, Value, TTL).
fn parse_resolved(mut p: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !p.is_empty() {
        if p.len() < 2 {
            return Err(format!("{} stray bytes", p.len()));
        }
        let (typ, len) = (p[0], p[1] as usize);
        if p.len() < 2 + len + 4 {
            return Err(format!("answer type {typ:#04x} longer than the payload"));
        }
        if (typ == 4 && len != 4) || (typ == 6 && len != 16) {
            return Err(format!("answer type {typ:#04x} with length {len}"));
        }
        out.push((typ, p[2..2 + len].to_vec()));
        p = &p[2 + len + 4..];
    }
    if out.is_empty() {
        return Err("no answer".into());
    }
    Ok(out)
}

fn resolve(
    l: &mut crate::link::RawLink,
    stream: u16,
    name: &str,
) -> Result<Vec<(u8, Vec<u8>)>, crate::case::CaseError> {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    l.send_relay(CIRC, relay_cmd::RESOLVE, stream, &body)?;
    let c = l.expect(
        &format!("RESOLVED on stream {stream} (R5.17)"),
        |c| c.is_relay(CIRC, relay_cmd::RESOLVED, stream),
        is_sendme,
    )?;
    let (_, _, payload) = c.relay().expect("a relay cell");
    parse_resolved(payload).map_err(|why| fail("a RESOLVED payload laid out as R5.18 says", why))
}

pub fn resolve_is_answered_with_resolved_and_opens_no_stream(cx: &mut Ctx) -> Verdict {
    // R5.17, R5.18: `localhost` is 127.0.0.1 (or ::1); no stream is left
    // on the ID, so a BEGIN on it opens one (not R5.13's violation).
    let mut l = cx.linked(CIRC)?;
    let answers = resolve(&mut l, 5, "localhost")?;
    check(
        answers.iter().any(|(t, v)| {
            (*t == 4 && v[..] == [127, 0, 0, 1]) || (*t == 6 && v[..15] == [0; 15] && v[15] == 1)
        }),
        "an answer 127.0.0.1 or ::1 for localhost (R5.17)",
        format!("{answers:?}"),
    )?;
    let t = Target::new();
    let _conn = open_stream(&mut l, CIRC, 5, &t)?;
    Ok(())
}

pub fn a_name_that_does_not_exist_is_resolved_to_one_nontransient_error(cx: &mut Ctx) -> Verdict {
    // R5.19.
    let mut l = cx.linked(CIRC)?;
    let answers = resolve(&mut l, 6, "no-such-host.invalid")?;
    if answers.len() == 1 && answers[0].0 == 0xF0 {
        // A transient error is R5.19's answer when the lookup itself
        // failed: this machine's resolver could not say.
        return Err(crate::case::CaseError::Skip(
            "the exit's resolver failed (0xF0): whether the name exists is unknown here".into(),
        ));
    }
    check(
        answers.len() == 1 && answers[0].0 == 0xF1,
        "a single 0xF1 answer (R5.19)",
        format!("{answers:?}"),
    )
}

pub fn a_target_that_never_answers_gets_end_timeout(cx: &mut Ctx) -> Verdict {
    // R5.9: protocol.md fixes no connect timeout; this case waits 140 s
    // for the END, past the kernel's own SYN retries (halfpipe's is 10 s).
    let mut l = cx.linked(CIRC)?;
    let t = crate::targets::Unanswering::new()?;
    let body = format!("127.0.0.1:{}\0", t.addr.port());
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, body.as_bytes())?;
    expect_end_within(
        &mut l,
        (CIRC, 1),
        end_reason::TIMEOUT,
        Duration::from_secs(140),
        "a target that never answers, R5.9",
    )
}

pub fn a_begin_past_the_stream_limit_gets_end_resourcelimit(cx: &mut Ctx) -> Verdict {
    // R5.11, with the limit set on the command line (R3.9: configurable):
    // `--max-streams-per-circuit 2`.
    let addr = cx.exit_with(&["--max-streams-per-circuit", "2"])?;
    let mut l = crate::link::RawLink::connect(addr, &cx.trace)?;
    l.handshake()?;
    l.create_circuit(CIRC)?;
    let t = Target::new();
    let _a = open_stream(&mut l, CIRC, 1, &t)?;
    let _b = open_stream(&mut l, CIRC, 2, &t)?;
    l.send_relay(CIRC, relay_cmd::BEGIN, 3, &t.begin())?;
    expect_end(&mut l, CIRC, 3, end_reason::RESOURCELIMIT)
}

pub fn a_begin_on_an_open_stream_id_is_a_violation(cx: &mut Ctx) -> Verdict {
    // R5.13.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let _conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, &t.begin())?;
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL)
}

pub fn a_begin_on_a_recently_closed_id_opens_a_new_stream(cx: &mut Ctx) -> Verdict {
    // R5.14 (with R9.1: END puts the ID in the set).
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut first = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::END, 1, &[end_reason::DONE])?;
    match ending(&mut first, ANSWER) {
        Ending::Reset(_) => {}
        other => {
            return Err(fail(
                "the first stream reset by END (R8.8)",
                format!("{other:?}"),
            ))
        }
    }
    let mut second = open_stream(&mut l, CIRC, 1, &t)?;
    send_data(&mut l, CIRC, 1, b"second")?;
    let got = read_n(&mut second, 6, ANSWER)?;
    check(
        got == b"second",
        "the new stream's bytes",
        format!("{got:?}"),
    )
}

pub fn optimistic_data_and_fin_arrive_in_order_once_connected(cx: &mut Ctx) -> Verdict {
    // R5.15: DATA and FIN right after BEGIN are held while the exit
    // connects, then delivered in order. The target answers no SYN at
    // first, so the exit is surely still connecting when they arrive; it
    // gets through about a second later.
    let mut l = cx.linked(CIRC)?;
    let t = crate::targets::Unanswering::new()?;
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let begin = format!("127.0.0.1:{}\0", t.addr.port());
    l.send_relay(CIRC, relay_cmd::BEGIN, 1, begin.as_bytes())?;
    send_data(&mut l, CIRC, 1, &data)?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    std::thread::sleep(Duration::from_millis(300));
    let mut conn = t.release()?;
    match ending(&mut conn, ANSWER) {
        Ending::Eof(got) if got == data => Ok(()),
        other => Err(fail(
            "the 5000 bytes in order, then end of file (R5.15, R7.4)",
            short(&other),
        )),
    }
}

pub fn optimistic_data_for_a_refused_begin_is_discarded(cx: &mut Ctx) -> Verdict {
    // R5.16: END(EXITPOLICY) and nothing more for the stream; what was
    // held reaches no target: not the refused address (a listener there
    // sees no connection), and not a new stream that reuses the ID.
    let mut l = cx.linked(CIRC)?;
    let refused = std::net::TcpListener::bind("127.0.0.2:0")
        .map_err(|e| fail("a listener on 127.0.0.2", e.to_string()))?;
    refused
        .set_nonblocking(true)
        .map_err(|e| fail("a non-blocking listener", e.to_string()))?;
    let port = refused.local_addr().map(|a| a.port()).unwrap_or(9);
    l.send_relay(
        CIRC,
        relay_cmd::BEGIN,
        1,
        format!("127.0.0.2:{port}\0").as_bytes(),
    )?;
    send_data(&mut l, CIRC, 1, &[1; 2000])?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    expect_end(&mut l, CIRC, 1, end_reason::EXITPOLICY)?;
    expect_quiet(&mut l, "nothing after END for the refused stream (R5.16)")?;
    check(
        refused.accept().is_err(),
        "no connection to a target the policy refuses (R5.6)",
        "a connection to 127.0.0.2",
    )?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    match ending(&mut conn, crate::link::QUIET) {
        Ending::Open(got) if got.is_empty() => Ok(()),
        other => Err(fail(
            "nothing of the refused stream's held DATA or FIN on a new stream with its ID (R5.16)",
            short(&other),
        )),
    }
}

pub fn data_travels_in_order_in_cells_of_at_most_498_bytes(cx: &mut Ctx) -> Verdict {
    // R6.1, R6.2 (`recv_data` checks each cell), R6.4 both ways.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    let up: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 256) as u8).collect();
    send_data(&mut l, CIRC, 1, &up)?;
    let got = read_n(&mut conn, up.len(), ANSWER)?;
    check(
        got == up,
        "the client's 40,000 bytes in order (R6.4)",
        "other bytes",
    )?;
    let down: Vec<u8> = (0..40_000u32).map(|i| (i * 13 % 256) as u8).collect();
    write_all(&mut conn, &down)?;
    let back = recv_data(&mut l, CIRC, 1, down.len())?;
    check(
        back == down,
        "the target's 40,000 bytes in order (R6.1)",
        "other bytes",
    )
}

pub fn an_empty_data_cell_is_accepted_and_writes_nothing(cx: &mut Ctx) -> Verdict {
    // R6.3.
    let mut l = cx.linked(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::DATA, 1, &[])?;
    send_data(&mut l, CIRC, 1, b"after")?;
    let got = read_n(&mut conn, 5, ANSWER)?;
    check(
        got == b"after",
        "only the non-empty cell's bytes (R6.3)",
        format!("{got:?}"),
    )?;
    expect_quiet(&mut l, "an empty DATA is no violation (R6.3)")
}
