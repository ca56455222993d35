//! §14 (flow control, version 2): the exit started with `--flow v2`, the
//! client likewise; both behind `CMD supports flow-v2`.

use super::common::*;
use crate::case::{check, fail, CaseError, Ctx, Verdict};
use crate::link::{describe, Cell, Got, RawLink, ANSWER, QUIET};
use crate::targets::{read_n, Target};
use halfpipe_proto::cell::{cmd, destroy_reason};
use halfpipe_proto::relay::{relay_cmd, DATA_MAX};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// The offer in CREATE_FAST, and the acceptance in CREATED_FAST.
const MARK: [u8; 10] = *b"halfpipe\x02\x1f";
pub(super) const SENDME_INC: usize = 31;
pub(super) const CWND_MIN: usize = 4000;
const CWND_MAX: usize = 10000;
const XOFF_GRACE: usize = 1000;

/// The exit under test, with version 2.
pub(super) fn v2_exit(cx: &mut Ctx) -> Result<RawLink, CaseError> {
    let addr = cx.exit_with(&["--flow", "v2"])?;
    let mut l = RawLink::connect(addr, &cx.trace)?;
    l.handshake()?;
    Ok(l)
}

/// A version 2 circuit: the offer sent, the acceptance checked (R14.2).
pub(super) fn v2_circuit(l: &mut RawLink, circ: u32) -> Verdict {
    let created = l.create_circuit_with(circ, &MARK)?;
    check(
        created[40..50] == MARK,
        "the acceptance at bytes 40 to 49 of CREATED_FAST (R14.2)",
        format!("{:02x?}", &created[40..50]),
    )
}

fn is_xoff(c: &Cell, stream: u16) -> bool {
    c.is_relay(CIRC, relay_cmd::XOFF, stream)
}

fn is_xon(c: &Cell, stream: u16) -> bool {
    c.is_relay(CIRC, relay_cmd::XON, stream)
}

pub fn an_exit_accepts_the_offer_and_nothing_else(cx: &mut Ctx) -> Verdict {
    // R14.2: exactly the offer gets the acceptance; no offer, or another
    // one, gets none, and that circuit runs §10 (a stream SENDME after 50
    // cells written, R10.3).
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    let mut other = MARK;
    other[8] = 3;
    for (circ, offer) in [(CIRC2, &[][..]), (0x8000_0003, &other[..])] {
        let created = l.create_circuit_with(circ, offer)?;
        check(
            created[40..50] != MARK,
            "no acceptance without exactly the offer (R14.2)",
            format!("the acceptance, for offer {offer:02x?}"),
        )?;
    }
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC2, 1, &t)?;
    send_data(&mut l, CIRC2, 1, &vec![1; 100 * DATA_MAX])?;
    read_n(&mut conn, 100 * DATA_MAX, ANSWER)?;
    let (cells, _) = l.collect(Duration::from_secs(1));
    let circuit = cells
        .iter()
        .filter(|c| c.is_relay(CIRC2, relay_cmd::SENDME, 0))
        .count();
    let stream = cells
        .iter()
        .filter(|c| c.is_relay(CIRC2, relay_cmd::SENDME, 1))
        .count();
    check(
        circuit == 1 && stream == 2,
        "§10 on the circuit without v2: one circuit SENDME and two stream SENDMEs for 100 DATA cells (R14.2)",
        format!("{circuit} circuit and {stream} stream SENDMEs"),
    )
}

pub fn circuit_sendmes_every_31_cells_and_no_stream_sendmes(cx: &mut Ctx) -> Verdict {
    // R14.4: a circuit SENDME per 31 DATA cells, unknown streams counted;
    // R14.8: no stream SENDME; R10.12: their payloads.
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    send_data(&mut l, CIRC, 1, &vec![7; 62 * DATA_MAX])?;
    send_data(&mut l, CIRC, 99, &vec![8; 31 * DATA_MAX])?;
    read_n(&mut conn, 62 * DATA_MAX, ANSWER)?;
    let (cells, _) = l.collect(Duration::from_secs(1));
    let circuit: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.is_relay(CIRC, relay_cmd::SENDME, 0))
        .collect();
    if let Some(c) = cells
        .iter()
        .find(|c| is_sendme(c) && !c.is_relay(CIRC, relay_cmd::SENDME, 0))
    {
        return Err(fail(
            "no stream SENDME on a v2 circuit (R14.8)",
            describe(c),
        ));
    }
    check(
        circuit.len() == 3,
        "3 circuit SENDMEs for 93 DATA cells, 31 of them for an unknown stream (R14.4)",
        format!("{}", circuit.len()),
    )?;
    for c in circuit {
        let (_, _, body) = c.relay().expect("a SENDME");
        check(
            body.is_empty() || body[0] == 0,
            "an empty or version-0 SENDME (R10.12)",
            describe(c),
        )?;
    }
    Ok(())
}

pub fn the_exit_sends_within_its_congestion_window(cx: &mut Ctx) -> Verdict {
    // R14.5: with no SENDME from us, the exit stops at its window, which
    // is at least CWND_MIN and at most CWND_MAX cells.
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    conn.set_write_timeout(Some(Duration::from_secs(2))).ok();
    let big = vec![b'c'; 16 << 20];
    let _ = conn.write_all(&big);
    let (cells, _) = l.collect(Duration::from_secs(2));
    let n = cells
        .iter()
        .filter(|c| c.is_relay(CIRC, relay_cmd::DATA, 1))
        .count();
    check(
        (CWND_MIN..=CWND_MAX).contains(&n),
        format!("between {CWND_MIN} and {CWND_MAX} DATA cells without a SENDME (R14.5)"),
        format!("{n}"),
    )
}

pub fn sendmes_for_cells_never_sent_and_stream_sendmes_are_violations(cx: &mut Ctx) -> Verdict {
    // R14.6: a circuit SENDME with nothing in flight; R14.8: a stream
    // SENDME on a v2 circuit.
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    l.send_relay(CIRC, relay_cmd::SENDME, 0, &[])?;
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL)?;
    v2_circuit(&mut l, CIRC2)?;
    let t = Target::new();
    let _conn = open_stream(&mut l, CIRC2, 1, &t)?;
    l.send_relay(CIRC2, relay_cmd::SENDME, 1, &[])?;
    expect_destroy(&mut l, CIRC2, destroy_reason::PROTOCOL)
}

/// Sends DATA on stream 1 of a v2 circuit to a target that reads nothing,
/// until the exit's XOFF comes; returns the cells sent.
fn send_until_xoff(l: &mut RawLink) -> Result<usize, CaseError> {
    let chunk = [0x33u8; DATA_MAX];
    let mut sent = 0;
    // What the kernel may take first: the exit's send buffer and the
    // target's receive buffer at their largest, then 500 held cells.
    let limit = (2 * (super::flow::kernel_max("tcp_wmem") + super::flow::kernel_max("tcp_rmem")))
        / DATA_MAX
        + 8_000;
    while sent < limit {
        for _ in 0..SENDME_INC {
            l.send_relay_quiet(CIRC, relay_cmd::DATA, 1, &chunk)?;
        }
        sent += SENDME_INC;
        loop {
            match l.recv(Duration::from_millis(1)) {
                Got::Cell(c) if is_xoff(&c, 1) => {
                    let (_, _, body) = c.relay().expect("XOFF");
                    check(
                        body.first() == Some(&0),
                        "XOFF with Version 0 (§14)",
                        describe(&c),
                    )?;
                    return Ok(sent);
                }
                Got::Cell(_) => {}
                Got::Nothing => break,
                Got::Closed(why) => return Err(fail("XOFF (R14.9)", why)),
            }
        }
    }
    Err(fail(
        "XOFF once 500 cells are held (R14.9)",
        format!("none after {sent} DATA cells"),
    ))
}

pub fn xoff_when_cells_pile_up_and_xon_when_they_drain(cx: &mut Ctx) -> Verdict {
    // R14.9: XOFF once 500 cells are held; R14.10: XON once they are down
    // to 250 (the target reads them all).
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    let t = Target::small();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    let sent = send_until_xoff(&mut l)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0;
    let deadline = Instant::now() + ANSWER * 2;
    conn.set_read_timeout(Some(Duration::from_millis(20))).ok();
    loop {
        if read < sent * DATA_MAX {
            if let Ok(n) = conn.read(&mut buf) {
                read += n;
            }
        }
        match l.recv(Duration::from_millis(1)) {
            Got::Cell(c) if is_xon(&c, 1) => {
                let (_, _, body) = c.relay().expect("XON");
                return check(
                    body.len() >= 5 && body[0] == 0,
                    "XON with Version 0 and a 4-byte Rate (§14)",
                    describe(&c),
                );
            }
            Got::Closed(why) => return Err(fail("XON (R14.10)", why)),
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(fail(
                "XON once the held cells drain (R14.10)",
                format!("none after the target read {} KiB", read >> 10),
            ));
        }
    }
}

pub fn a_sender_that_ignores_xoff_is_a_violation(cx: &mut Ctx) -> Verdict {
    // R14.15: past CWND_MAX + XOFF_GRACE cells after XOFF: DESTROY.
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    let t = Target::small();
    let _conn = open_stream(&mut l, CIRC, 1, &t)?;
    send_until_xoff(&mut l)?;
    let chunk = [0x44u8; DATA_MAX];
    for _ in 0..CWND_MAX + XOFF_GRACE + 1 {
        l.send_relay_quiet(CIRC, relay_cmd::DATA, 1, &chunk)?;
    }
    expect_destroy(&mut l, CIRC, destroy_reason::PROTOCOL)
}

pub fn xoff_stops_the_exits_sender_until_xon(cx: &mut Ctx) -> Verdict {
    // R14.11: after our XOFF the exit sends no more DATA on the stream
    // (but what it had read), however the window stands; XON resumes it.
    // R14.12: XOFF takes no window: our SENDMEs keep the circuit open.
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    let t = Target::new();
    let conn = open_stream(&mut l, CIRC, 1, &t)?;
    // Bounded: the writer ends on its own if the exit stops reading for good.
    conn.set_write_timeout(Some(Duration::from_secs(5))).ok();
    let writer = std::thread::Builder::new()
        .name("conform target writer".into())
        .spawn(move || {
            let mut conn = conn;
            let chunk = vec![b'w'; 64 * 1024];
            while conn.write_all(&chunk).is_ok() {}
        })
        .map_err(|e| fail("a thread for the target", e.to_string()))?;
    let mut acked = 0usize;
    let mut got = 0usize;
    // Acknowledge as a v2 receiver would, and count.
    let mut pump = |l: &mut RawLink, wait: Duration| -> Result<usize, CaseError> {
        let deadline = Instant::now() + wait;
        let mut n = 0;
        loop {
            match l.recv(deadline.saturating_duration_since(Instant::now())) {
                Got::Cell(c) if c.is_relay(CIRC, relay_cmd::DATA, 1) => {
                    n += 1;
                    got += 1;
                    if got - acked >= SENDME_INC {
                        acked += SENDME_INC;
                        l.send_relay_quiet(CIRC, relay_cmd::SENDME, 0, &[])?;
                    }
                }
                Got::Cell(_) => {}
                Got::Nothing => return Ok(n),
                Got::Closed(why) => return Err(fail("the link to stay open", why)),
            }
        }
    };
    let before = pump(&mut l, Duration::from_millis(500))?;
    check(before > 0, "DATA before the XOFF", "none")?;
    l.send_relay(CIRC, relay_cmd::XOFF, 1, &[0])?;
    // What the exit had read before the XOFF may still come.
    pump(&mut l, Duration::from_secs(1))?;
    let after = pump(&mut l, Duration::from_secs(1))?;
    let verdict = check(
        after == 0,
        "no DATA a second after our XOFF (R14.11)",
        format!("{after} DATA cells in the next second"),
    )
    .and_then(|()| {
        l.send_relay(CIRC, relay_cmd::XON, 1, &[0, 0, 0, 0, 0])?;
        let resumed = pump(&mut l, Duration::from_secs(1))?;
        check(resumed > 0, "DATA again after XON (R14.11)", "none")
    });
    drop(l);
    let _ = writer.join();
    verdict
}

pub fn xon_and_xoff_take_no_window_and_change_no_state(cx: &mut Ctx) -> Verdict {
    // R14.12: XOFF and XON are no part of the SENDME_INC count (31 DATA
    // cells with an XOFF and an XON among them get one circuit SENDME,
    // sent when the 31st DATA arrives) and change no §7 state (a FIN after
    // them still half-closes the stream, and the reply still flows).
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    send_data(&mut l, CIRC, 1, &vec![3; 30 * DATA_MAX])?;
    l.send_relay(CIRC, relay_cmd::XOFF, 1, &[0])?;
    l.send_relay(CIRC, relay_cmd::XON, 1, &[0, 0, 0, 0, 0])?;
    let (cells, _) = l.collect(QUIET);
    check(
        !cells.iter().any(|c| c.is_relay(CIRC, relay_cmd::SENDME, 0)),
        "no circuit SENDME for 30 DATA cells and an XOFF and an XON (R14.12)",
        "a SENDME",
    )?;
    send_data(&mut l, CIRC, 1, &[4; DATA_MAX])?;
    l.expect(
        "a circuit SENDME once the 31st DATA cell arrives (R14.12, R14.4)",
        |c| c.is_relay(CIRC, relay_cmd::SENDME, 0),
        |_| false,
    )?;
    l.send_relay(CIRC, relay_cmd::FIN, 1, &[])?;
    match crate::targets::ending(&mut conn, ANSWER) {
        crate::targets::Ending::Eof(got) if got.len() == 31 * DATA_MAX => {}
        other => {
            return Err(fail(
                "the 31 cells' data, then end of file (R14.12, R7.4)",
                short(&other),
            ))
        }
    }
    crate::targets::write_all(&mut conn, b"reply")?;
    let got = recv_data(&mut l, CIRC, 1, 5)?;
    check(
        got == b"reply",
        "the reply after the half-close",
        format!("{got:?}"),
    )
}

pub fn xon_and_xoff_for_ended_or_unknown_streams_are_dropped(cx: &mut Ctx) -> Verdict {
    // R14.13.
    let mut l = v2_exit(cx)?;
    v2_circuit(&mut l, CIRC)?;
    let t = Target::new();
    let _conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::END, 1, &[6])?;
    l.send_relay(CIRC, relay_cmd::XOFF, 1, &[0])?;
    l.send_relay(CIRC, relay_cmd::XON, 1, &[0, 0, 0, 0, 0])?;
    l.send_relay(CIRC, relay_cmd::XOFF, 77, &[0])?;
    expect_quiet(
        &mut l,
        "XOFF/XON for ended or unknown streams are dropped (R14.13)",
    )?;
    circuit_works(&mut l, CIRC, 2)
}

pub fn malformed_xon_and_xoff_are_violations(cx: &mut Ctx) -> Verdict {
    // R14.14: StreamID 0, a body shorter than its format, Version not 0.
    let mut l = v2_exit(cx)?;
    let t = Target::new();
    let bad: [(u8, u16, &[u8]); 4] = [
        (relay_cmd::XOFF, 0, &[0]),
        (relay_cmd::XON, 1, &[0, 0]),
        (relay_cmd::XOFF, 1, &[]),
        (relay_cmd::XOFF, 1, &[1]),
    ];
    // Kept open: a target that closes would end its stream with a FIN.
    let mut conns = Vec::new();
    for (i, (command, stream, body)) in bad.iter().enumerate() {
        let circ = 0x8000_0300 + i as u32;
        v2_circuit(&mut l, circ)?;
        if *stream != 0 {
            conns.push(open_stream(&mut l, circ, *stream, &t)?);
        }
        l.send_relay(circ, *command, *stream, body)?;
        expect_destroy(&mut l, circ, destroy_reason::PROTOCOL).map_err(|e| match e {
            CaseError::Fail { got, .. } => fail(
                format!("DESTROY(PROTOCOL) for relay command {command} on stream {stream} with {body:?} (R14.14)"),
                got,
            ),
            other => other,
        })?;
    }
    Ok(())
}

pub fn xon_and_xoff_on_a_v1_circuit_are_dropped(cx: &mut Ctx) -> Verdict {
    // R14.16: on a circuit that runs §10 (no offer), XOFF changes nothing:
    // the target's bytes still come.
    let mut l = v2_exit(cx)?;
    l.create_circuit(CIRC)?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    l.send_relay(CIRC, relay_cmd::XOFF, 1, &[0])?;
    expect_quiet(&mut l, "XOFF on a v1 circuit is dropped (R14.16)")?;
    // And it sends none itself, even for a stream whose target reads
    // nothing (on a v2 circuit that would bring XOFF, R14.9).
    let small = Target::small();
    let _stalled = open_stream(&mut l, CIRC, 2, &small)?;
    let (_, xon_xoff) = super::flow::fill_until_stalled(&mut l, CIRC, 2)?;
    if let Some(c) = xon_xoff {
        return Err(fail(
            "no XOFF or XON sent on a v1 circuit (R14.16)",
            describe(&c),
        ));
    }
    crate::targets::write_all(&mut conn, b"still flowing")?;
    let got = recv_data(&mut l, CIRC, 1, 13)?;
    check(
        got == b"still flowing",
        "DATA after an XOFF on a v1 circuit (R14.16)",
        format!("{got:?}"),
    )?;
    let (cells, _) = l.collect(QUIET);
    match cells
        .iter()
        .find(|c| matches!(c.relay(), Some((relay_cmd::XOFF | relay_cmd::XON, _, _))))
    {
        Some(c) => Err(fail(
            "no XOFF or XON sent on a v1 circuit (R14.16)",
            describe(c),
        )),
        None => Ok(()),
    }
}

/// Checks the offer in a client's CREATE_FAST (R14.1) and accepts it.
fn accept_v2(l: &mut RawLink, c: &Cell) -> Verdict {
    check(
        c.payload[20..30] == MARK,
        "the offer at bytes 20 to 29 of CREATE_FAST (R14.1)",
        format!("{:02x?}", &c.payload[20..30]),
    )?;
    let x: [u8; 20] = c.payload[..20].try_into().expect("X");
    let y: [u8; 20] = crate::link::random();
    let mut payload = y.to_vec();
    payload.extend_from_slice(&crate::link::key_hash(&x, &y));
    payload.extend_from_slice(&MARK);
    l.send_cell(c.circ, cmd::CREATED_FAST, &payload)
}

pub fn the_client_offers_v2_and_runs_what_the_exit_answered(cx: &mut Ctx) -> Verdict {
    // R14.1: every CREATE_FAST carries the offer; R14.3: accepted, the
    // client acknowledges with circuit SENDMEs every 31 cells and no
    // stream SENDMEs (R14.4, R14.8).
    let mut rig = cx.client_with(&["--flow", "v2"])?;
    let mut creates = 0;
    while let Got::Cell(c) = rig.link.recv(QUIET) {
        if c.command == cmd::CREATE_FAST {
            accept_v2(&mut rig.link, &c)?;
            creates += 1;
        }
    }
    let mut app = crate::socks::connect(rig.socks)?;
    crate::socks::greet5(&mut app, None)?;
    crate::socks::request5(&mut app, 1, &crate::socks::Dest::Name("example.test"), 80)?;
    let b = loop {
        let c = rig.await_cell("CREATE_FAST or BEGIN", |c| {
            c.command == cmd::CREATE_FAST || matches!(c.relay(), Some((relay_cmd::BEGIN, _, _)))
        })?;
        if c.command == cmd::CREATE_FAST {
            accept_v2(&mut rig.link, &c)?;
            creates += 1;
            continue;
        }
        let (_, stream, _) = c.relay().expect("BEGIN");
        break (c.circ, stream);
    };
    check(creates > 0, "a CREATE_FAST before the BEGIN (R3.2)", "none")?;
    let (circ, stream) = b;
    rig.link.send_relay(
        circ,
        relay_cmd::CONNECTED,
        stream,
        &[127, 0, 0, 1, 0, 0, 1, 44],
    )?;
    crate::socks::reply5(&mut app, ANSWER)?;
    send_data(&mut rig.link, circ, stream, &vec![9; 62 * DATA_MAX])?;
    read_n(&mut app, 62 * DATA_MAX, ANSWER)?;
    let (cells, _) = rig.link.collect(Duration::from_secs(1));
    if let Some(c) = cells
        .iter()
        .find(|c| c.is_relay(circ, relay_cmd::SENDME, stream))
    {
        return Err(fail(
            "no stream SENDME once v2 was agreed (R14.3, R14.8)",
            describe(c),
        ));
    }
    let n = cells
        .iter()
        .filter(|c| c.is_relay(circ, relay_cmd::SENDME, 0))
        .count();
    check(
        n == 2,
        "2 circuit SENDMEs for 62 DATA cells (R14.3, R14.4)",
        format!("{n}"),
    )
}

pub fn a_client_without_v2_makes_no_offer(cx: &mut Ctx) -> Verdict {
    // R14.1: no offer from a client that does not use version 2.
    let mut rig = cx.client_with(&["--flow", "v1"])?;
    let mut app = crate::socks::connect(rig.socks)?;
    let mut asked = false;
    let deadline = Instant::now() + ANSWER;
    let c = loop {
        match rig.link.recv(QUIET) {
            Got::Cell(c) if c.command == cmd::CREATE_FAST => break c,
            Got::Cell(_) => {}
            // No circuit at start: one request makes one.
            Got::Nothing if !asked => {
                asked = true;
                crate::socks::greet5(&mut app, None)?;
                crate::socks::request5(&mut app, 1, &crate::socks::Dest::Name("example.test"), 80)?;
            }
            Got::Nothing if Instant::now() > deadline => {
                return Err(fail("CREATE_FAST for a request", "none"))
            }
            Got::Nothing => {}
            Got::Closed(why) => return Err(fail("CREATE_FAST", why)),
        }
    };
    check(
        c.payload[20..30] != MARK,
        "no offer from a client without v2 (R14.1)",
        "the offer",
    )
}
