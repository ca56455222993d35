//! The client's side: the kit is its exit (a fake one on a loopback port)
//! and its SOCKS application. §1, §3 to §5, §7 to §9 where they bind the
//! client, and §11.

use super::common::*;
use crate::case::{check, fail, Begin, ClientRig, Ctx, Verdict};
use crate::link::{describe, Got, ANSWER, QUIET};
use crate::socks::{self, Dest};
use crate::targets::{ending, write_all, Ending};
use halfpipe_proto::cell::{cmd, destroy_reason};
use halfpipe_proto::relay::{self, end_reason, relay_cmd};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};
use std::time::{Duration, Instant};

/// A port for the targets the client asks for: the kit's exit connects
/// nowhere, so any number does.
const PORT: u16 = 4321;

/// Whether a BEGIN's ADDRESS ":" PORT names `want`: the same text, or for
/// an IPv6 address any text form of it (R5.2's grammar allows them all).
fn same_target(text: &[u8], want: &str) -> bool {
    if text == want.as_bytes() {
        return true;
    }
    let parse = |t: &str| -> Option<(std::net::IpAddr, u16)> {
        let (host, port) = t.rsplit_once(':')?;
        let host = host.strip_prefix('[')?.strip_suffix(']')?;
        Some((host.parse().ok()?, port.parse().ok()?))
    };
    match (std::str::from_utf8(text).ok().and_then(parse), parse(want)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A SOCKS5 CONNECT through the client; returns the application's socket
/// and the BEGIN it became.
fn socks_connect(
    rig: &mut ClientRig,
    dest: Dest<'_>,
    creds: Option<(&str, &str)>,
) -> Result<(TcpStream, Begin), crate::case::CaseError> {
    let mut app = socks::connect(rig.socks)?;
    socks::greet5(&mut app, creds)?;
    socks::request5(&mut app, 1, &dest, PORT)?;
    let begin = rig.await_begin()?;
    Ok((app, begin))
}

/// CONNECTED for an IPv4 target (R5.4's 8 bytes).
fn connected(rig: &mut ClientRig, b: &Begin) -> Verdict {
    rig.link.send_relay(
        b.circ,
        relay_cmd::CONNECTED,
        b.stream,
        &[127, 0, 0, 1, 0, 0, 1, 44],
    )
}

pub fn the_client_begins_with_versions_4_and_creates_circuits_as_specified(
    cx: &mut Ctx,
) -> Verdict {
    // R1.1 (`client_with` checks the seven bytes), R3.1: CircIDs with the
    // top bit set and not in use; R3.2: CREATE_FAST with 20 bytes of X.
    // Every CREATE_FAST is checked: those the client makes at start and
    // those two isolated requests make (R11.4).
    let mut rig = cx.client_with(&[])?;
    let mut circs = Vec::new();
    let check_create = |c: &crate::link::Cell, circs: &mut Vec<u32>| -> Verdict {
        check(
            c.circ & 0x8000_0000 != 0,
            "a CircID with its top bit set (R3.1)",
            describe(c),
        )?;
        check(
            !circs.contains(&c.circ),
            "a CircID not in use (R3.1)",
            describe(c),
        )?;
        check(
            c.payload[..20] != [0; 20],
            "20 random bytes of X (R3.2)",
            "20 zero bytes",
        )?;
        circs.push(c.circ);
        Ok(())
    };
    // The circuits made at start, if any.
    while let crate::link::Got::Cell(c) = rig.link.recv(QUIET) {
        if c.command == cmd::CREATE_FAST {
            check_create(&c, &mut circs)?;
            rig.link.answer_create_fast(&c, true)?;
        }
    }
    let mut apps = Vec::new();
    let mut begins = 0;
    for user in ["a", "b"] {
        let mut app = socks::connect(rig.socks)?;
        socks::greet5(&mut app, Some((user, "x")))?;
        socks::request5(
            &mut app,
            1,
            &Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            PORT,
        )?;
        apps.push(app);
        loop {
            let c = rig.await_cell("CREATE_FAST or BEGIN", |c| {
                c.command == cmd::CREATE_FAST || matches!(c.relay(), Some((relay_cmd::BEGIN, _, _)))
            })?;
            if c.command != cmd::CREATE_FAST {
                begins += 1;
                break;
            }
            check_create(&c, &mut circs)?;
            rig.link.answer_create_fast(&c, true)?;
        }
    }
    check(
        circs.len() >= 2 && begins == 2,
        "a circuit of its own for each of two credentials (R3.2, R11.4)",
        format!("{} circuits for {begins} BEGINs", circs.len()),
    )
}

pub fn the_client_checks_kh(cx: &mut Ctx) -> Verdict {
    // R3.4: a wrong KH gets DESTROY(PROTOCOL) for that CircID. The
    // client's first circuit: made at start, or for a first request.
    let mut rig = cx.client_with(&[])?;
    // Kept open: the request that made the circuit.
    let mut _app = None;
    let c = match rig.link.recv(QUIET) {
        crate::link::Got::Cell(c) if c.command == cmd::CREATE_FAST => c,
        _ => {
            let app = _app.insert(socks::connect(rig.socks)?);
            socks::greet5(app, None)?;
            socks::request5(app, 1, &Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), PORT)?;
            rig.link
                .expect("CREATE_FAST", |c| c.command == cmd::CREATE_FAST, |_| false)?
        }
    };
    rig.link.answer_create_fast(&c, false)?;
    let d = rig.link.expect(
        "DESTROY(PROTOCOL) for a CREATED_FAST with a wrong KH (R3.4)",
        |d| d.is_destroy(c.circ),
        |d| d.command == cmd::CREATE_FAST || d.circ != c.circ,
    )?;
    check(
        d.payload.first() == Some(&destroy_reason::PROTOCOL),
        "DESTROY(PROTOCOL) (R3.4)",
        describe(&d),
    )
}

pub fn socks_connects_wait_for_connected_and_half_close_end_to_end(cx: &mut Ctx) -> Verdict {
    // R11.1: IPv4, DOMAINNAME and IPv6 requests; R5.1, R5.2: each a BEGIN
    // on a fresh non-zero stream ID with a well-formed payload; R11.5: no
    // reply before CONNECTED, success after it; then R7.2 and R7.4 at the
    // client: the application's half-close travels as FIN, the reply
    // still arrives, and the exit's FIN ends it normally.
    let mut rig = cx.client()?;
    let mut ids = Vec::new();
    let cases: [(Dest<'_>, String); 3] = [
        (
            Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            format!("127.0.0.1:{PORT}"),
        ),
        (Dest::Name("example.test"), format!("example.test:{PORT}")),
        (
            Dest::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            format!("[::1]:{PORT}"),
        ),
    ];
    for (dest, want) in cases {
        let (mut app, b) = socks_connect(&mut rig, dest, None)?;
        check(
            b.stream != 0 && !ids.contains(&b.stream),
            "a fresh non-zero stream ID (R5.1)",
            format!("{}", b.stream),
        )?;
        ids.push(b.stream);
        let text = b.payload.split(|&x| x == 0).next().unwrap_or(&[]);
        check(
            same_target(text, &want) && b.payload.get(text.len()) == Some(&0),
            format!("BEGIN payload {want:?} NUL (R5.2)"),
            format!("{:?}", String::from_utf8_lossy(&b.payload)),
        )?;
        if let Some(code) = socks::reply5(&mut app, QUIET)? {
            return Err(fail(
                "no SOCKS reply before CONNECTED (R11.5)",
                format!("reply {code:#04x}"),
            ));
        }
        connected(&mut rig, &b)?;
        let code = socks::reply5(&mut app, ANSWER)?;
        check(
            code == Some(0),
            "SOCKS5 success after CONNECTED (R11.5)",
            format!("{code:?}"),
        )?;
        // The request, half-closed.
        write_all(&mut app, b"request")?;
        crate::targets::half_close(&app)?;
        let got = recv_data(&mut rig.link, b.circ, b.stream, 7)?;
        check(got == b"request", "the request's bytes", format!("{got:?}"))?;
        rig.link.expect(
            "FIN for the application's end of file (R7.2)",
            |c| c.is_relay(b.circ, relay_cmd::FIN, b.stream),
            is_sendme,
        )?;
        send_data(&mut rig.link, b.circ, b.stream, b"the reply")?;
        rig.link.send_relay(b.circ, relay_cmd::FIN, b.stream, &[])?;
        match ending(&mut app, ANSWER) {
            Ending::Eof(got) if got == b"the reply" => {}
            other => {
                return Err(fail(
                    "the reply, then end of file (R7.4, R7.9)",
                    short(&other),
                ))
            }
        }
    }
    Ok(())
}

pub fn an_end_before_connected_gets_its_socks_reply(cx: &mut Ctx) -> Verdict {
    // R8.10 and R11.7 to R11.12: the failure each END reason maps to.
    let mut rig = cx.client()?;
    for (reason, want) in [
        (end_reason::EXITPOLICY, 0x02),
        (end_reason::NOROUTE, 0x03),
        (end_reason::RESOLVEFAILED, 0x04),
        (end_reason::CONNECTREFUSED, 0x05),
        (end_reason::TIMEOUT, 0x06),
        (end_reason::MISC, 0x01),
        (end_reason::RESOURCELIMIT, 0x01),
    ] {
        let (mut app, b) =
            socks_connect(&mut rig, Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), None)?;
        rig.link
            .send_relay(b.circ, relay_cmd::END, b.stream, &[reason])?;
        let code = socks::reply5(&mut app, ANSWER)?;
        check(
            code == Some(want),
            format!(
                "SOCKS5 reply {want:#04x} for END({})",
                end_reason::name(reason)
            ),
            format!("{code:?}"),
        )?;
    }
    Ok(())
}

pub fn a_circuit_lost_before_connected_is_a_general_failure(cx: &mut Ctx) -> Verdict {
    // R11.6: DESTROY before CONNECTED: 0x01.
    let mut rig = cx.client()?;
    let (mut app, b) = socks_connect(&mut rig, Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), None)?;
    rig.link
        .send_cell(b.circ, cmd::DESTROY, &[destroy_reason::REQUESTED])?;
    let code = socks::reply5(&mut app, ANSWER)?;
    check(
        code == Some(1),
        "SOCKS5 reply 0x01 (R11.6)",
        format!("{code:?}"),
    )
}

pub fn bind_and_udp_associate_are_not_supported(cx: &mut Ctx) -> Verdict {
    // R11.13.
    let rig = cx.client()?;
    for command in [2u8, 3] {
        let mut app = socks::connect(rig.socks)?;
        socks::greet5(&mut app, None)?;
        socks::request5(
            &mut app,
            command,
            &Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            PORT,
        )?;
        let code = socks::reply5(&mut app, ANSWER)?;
        check(
            code == Some(7),
            format!("reply 0x07 for command {command} (R11.13)"),
            format!("{code:?}"),
        )?;
    }
    Ok(())
}

pub fn credentials_isolate_streams_onto_circuits(cx: &mut Ctx) -> Verdict {
    // R11.2: any username and password; R11.4: different credentials never
    // share a circuit.
    let mut rig = cx.client()?;
    let mut circ_of = Vec::new();
    for user in ["alice", "bob", "alice"] {
        let (mut app, b) = socks_connect(
            &mut rig,
            Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Some((user, "any password")),
        )?;
        connected(&mut rig, &b)?;
        let code = socks::reply5(&mut app, ANSWER)?;
        check(code == Some(0), "success", format!("{code:?}"))?;
        circ_of.push((user, b.circ, app));
    }
    check(
        circ_of[0].1 != circ_of[1].1,
        "alice's and bob's streams on different circuits (R11.4)",
        format!("both on {:#x}", circ_of[0].1),
    )
}

pub fn a_begin_sent_to_the_client_is_a_violation(cx: &mut Ctx) -> Verdict {
    // R4.7: BEGIN (and RESOLVE) the wrong way: DESTROY(PROTOCOL).
    let mut rig = cx.client()?;
    let (_app, b) = socks_connect(&mut rig, Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), None)?;
    rig.link
        .send_relay(b.circ, relay_cmd::BEGIN, 77, b"127.0.0.1:80\0")?;
    let d = rig.await_cell("DESTROY(PROTOCOL) (R4.7)", |c| c.is_destroy(b.circ))?;
    check(
        d.payload.first() == Some(&destroy_reason::PROTOCOL),
        "DESTROY(PROTOCOL) (R4.7)",
        describe(&d),
    )
}

pub fn the_client_does_not_reuse_recently_closed_ids(cx: &mut Ctx) -> Verdict {
    // R9.4: stream IDs ended by END stay out of use.
    let mut rig = cx.client()?;
    let mut seen: Vec<(u32, u16)> = Vec::new();
    for _ in 0..6 {
        let (mut app, b) =
            socks_connect(&mut rig, Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), None)?;
        check(
            !seen.contains(&(b.circ, b.stream)),
            "a stream ID not recently closed on its circuit (R9.4)",
            format!("stream {} on {:#x} again", b.stream, b.circ),
        )?;
        seen.push((b.circ, b.stream));
        connected(&mut rig, &b)?;
        socks::reply5(&mut app, ANSWER)?;
        rig.link
            .send_relay(b.circ, relay_cmd::END, b.stream, &[end_reason::MISC])?;
        match ending(&mut app, ANSWER) {
            Ending::Reset(_) => {}
            other => return Err(fail("a reset for the application (R8.8)", short(&other))),
        }
    }
    Ok(())
}

pub fn without_a_link_socks_fails_at_once_and_the_client_links_again(cx: &mut Ctx) -> Verdict {
    // R11.15: no link: 0x01 at once; R11.16: a new link within 30 s.
    let mut rig = cx.client()?;
    let (mut app, b) = socks_connect(&mut rig, Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), None)?;
    connected(&mut rig, &b)?;
    socks::reply5(&mut app, ANSWER)?;
    // The link is lost (R3.13: the application sees a reset).
    let crate::case::ClientRig {
        socks: addr,
        link,
        listener,
    } = rig;
    drop(link);
    match ending(&mut app, ANSWER) {
        Ending::Reset(_) => {}
        other => return Err(fail("a reset when the link is lost (R3.13)", short(&other))),
    }
    // Refuse to link for a while: the client must answer at once.
    let mut refused = Vec::new();
    let since = Instant::now();
    let mut s = socks::connect(addr)?;
    socks::greet5(&mut s, None)?;
    socks::request5(&mut s, 1, &Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), PORT)?;
    while let Ok((sock, _)) = listener.accept() {
        refused.push(sock);
    }
    let code = socks::reply5(&mut s, ANSWER)?;
    check(
        code == Some(1),
        "SOCKS5 0x01 while there is no link (R11.15)",
        format!("{code:?} after {:?}", since.elapsed()),
    )?;
    drop(refused);
    // R11.16: it tries again, and again after each failure, never waiting
    // more than 30 s between tries: two tries closed at once, the third
    // linked.
    for _ in 0..2 {
        let l = crate::link::RawLink::accept(&listener, Duration::from_secs(31), &cx.trace)
            .map_err(|_| {
                fail(
                    "another try within 30 s of the last (R11.16)",
                    "none within 31 s",
                )
            })?;
        drop(l);
    }
    let mut link = crate::link::RawLink::accept(&listener, Duration::from_secs(31), &cx.trace)
        .map_err(|_| {
            fail(
                "another try within 30 s of the last (R11.16)",
                "none within 31 s",
            )
        })?;
    link.accept_handshake()
}

pub fn socks4_and_4a_connect_and_fail_with_5b(cx: &mut Ctx) -> Verdict {
    // R11.3 and R11.14.
    let mut rig = cx.client()?;
    let mut app = socks::connect(rig.socks)?;
    socks::request4(&mut app, [127, 0, 0, 1], PORT, "", None)?;
    let b = rig.await_begin()?;
    connected(&mut rig, &b)?;
    let code = socks::reply4(&mut app, ANSWER)?;
    check(
        code == 0x5A,
        "SOCKS4 0x5A after CONNECTED (R11.3, R11.5)",
        format!("{code:#04x}"),
    )?;
    let mut app = socks::connect(rig.socks)?;
    socks::request4(&mut app, [0, 0, 0, 1], PORT, "", Some("example.test"))?;
    let b = rig.await_begin()?;
    check(
        b.payload
            .starts_with(format!("example.test:{PORT}\0").as_bytes()),
        "the SOCKS4a name in BEGIN (R11.3)",
        format!("{:?}", String::from_utf8_lossy(&b.payload)),
    )?;
    rig.link
        .send_relay(b.circ, relay_cmd::END, b.stream, &[end_reason::EXITPOLICY])?;
    let code = socks::reply4(&mut app, ANSWER)?;
    check(
        code == 0x5B,
        "SOCKS4 0x5B for a failure (R11.14)",
        format!("{code:#04x}"),
    )?;
    Ok(())
}

/// How many requests the R8.4 case makes, and for how long, before it
/// concludes that the client needs no new thread per stream.
const THREADLESS_TRIES: usize = 40;
const THREADLESS_FOR: Duration = Duration::from_secs(40);

/// What became of one SOCKS request made while the client could start
/// no more threads than the case allowed.
enum Squeezed {
    /// Refused before any BEGIN: the failure came before a stream existed.
    NoStream,
    /// The stream opened and works: the client had threads enough.
    Opened(TcpStream),
    /// The client ended the stream itself, with this END reason, and the
    /// application's request came to this SOCKS reply code (None: the
    /// connection closed or was reset).
    Ended(u8, Option<u8>),
}

/// One SOCKS request under the cap: a BEGIN or not, then END or not.
fn squeezed_request(rig: &mut ClientRig) -> Result<Squeezed, crate::case::CaseError> {
    let mut app = socks::connect(rig.socks)?;
    let asked = socks::greet5(&mut app, None).and_then(|_| {
        socks::request5(
            &mut app,
            1,
            &Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            PORT,
        )
    });
    if asked.is_err() {
        return Ok(Squeezed::NoStream);
    }
    let Some(b) = rig.begin_within(QUIET * 3)? else {
        return Ok(Squeezed::NoStream);
    };
    let (circ, stream) = (b.circ, b.stream);
    // The client's END, at once or once CONNECTED has come.
    let ended = |rig: &mut ClientRig, wait| -> Option<u8> {
        let (cells, _) = rig.link.collect(wait);
        cells
            .iter()
            .find(|c| c.is_relay(circ, relay_cmd::END, stream))
            .map(|c| relay::parse_end(c.relay().map_or(&[][..], |r| r.2)))
    };
    if let Some(reason) = ended(rig, QUIET * 2) {
        return Ok(Squeezed::Ended(
            reason,
            socks::reply5(&mut app, ANSWER).ok().flatten(),
        ));
    }
    connected(rig, &b)?;
    let code = socks::reply5(&mut app, ANSWER).ok().flatten();
    if let Some(reason) = ended(rig, QUIET) {
        return Ok(Squeezed::Ended(reason, code));
    }
    check(
        code == Some(0),
        "SOCKS5 success after CONNECTED on a stream the client did not end",
        format!("{code:?}"),
    )?;
    Ok(Squeezed::Opened(app))
}

pub fn a_stream_that_cannot_have_a_thread_is_ended_with_resourcelimit(cx: &mut Ctx) -> Verdict {
    // R8.4: a local resource failure on a stream is answered with
    // END(RESOURCELIMIT), and the application's request fails. The kit
    // brings one about from outside: the client goes into a pids cgroup
    // that lets it start no task beyond those it has, or one more at a
    // time while requests are refused before any stream exists (a client
    // that needs a thread to read SOCKS). Streams that still open are held
    // open, so the threads they have stay taken. A client that needs no
    // new thread per stream shows no such failure: the case is skipped.
    let mut rig = cx.client()?;
    let pid = cx
        .pids
        .lock()
        .ok()
        .and_then(|p| p.first().copied())
        .ok_or_else(|| fail("the client's process", "none started"))?;
    // One stream first, end to end: the link, the circuit and whatever the
    // client starts once are up before the cap.
    let (mut first, b) = socks_connect(&mut rig, Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), None)?;
    connected(&mut rig, &b)?;
    let code = socks::reply5(&mut first, ANSWER)?;
    check(
        code == Some(0),
        "SOCKS5 success before the cap",
        format!("{code:?}"),
    )?;
    let cap = crate::host::ThreadCap::new(pid).map_err(crate::case::CaseError::Skip)?;
    let mut held = vec![first];
    let mut spare = 0;
    let since = Instant::now();
    for _ in 0..THREADLESS_TRIES {
        if since.elapsed() > THREADLESS_FOR {
            break;
        }
        cap.allow_more(spare)
            .map_err(|e| fail("the cap to be set", e))?;
        match squeezed_request(&mut rig)? {
            Squeezed::NoStream => spare += 1,
            Squeezed::Opened(app) => {
                held.push(app);
                spare = 0;
            }
            Squeezed::Ended(reason, code) => {
                check(
                    reason == end_reason::RESOURCELIMIT,
                    "END(RESOURCELIMIT) for a stream whose thread could not start (R8.4)",
                    format!("END({reason})"),
                )?;
                return check(
                    code != Some(0),
                    "the SOCKS request to fail, not succeed",
                    "SOCKS5 success",
                );
            }
        }
    }
    Err(crate::case::CaseError::Skip(format!(
        "{} streams opened under the cap in {:.0?}: the client needs no new thread per stream",
        held.len(),
        since.elapsed()
    )))
}

/// Stream IDs on a circuit: the client must close every one of them once
/// before it can need one that left its recently-closed set.
const ALL_IDS: usize = u16::MAX as usize;

/// The applications the R9.2 case runs at once.
const APPS: usize = 4;

pub fn a_circuit_outlives_its_stream_ids(cx: &mut Ctx) -> Verdict {
    // R9.2: the recently-closed set is bounded. From outside the bound
    // shows at the client: once every stream ID has been used and closed
    // on a circuit, it must still open streams there, on IDs that have
    // left the set (R9.4 keeps it off the others); a set that forgot
    // nothing would leave it no ID. The kit's exit refuses each BEGIN at
    // once (END(EXITPOLICY)), so each stream closes as soon as it opens,
    // and APPS applications keep the client busy. Which IDs come back is
    // the allocator's choice, so the case checks the bound only: that IDs
    // come back on the circuit that used them all. Which entries leave the
    // set first cannot be seen from outside. One stream stays open
    // throughout: no BEGIN may take its ID (R5.1), however the IDs wrap.
    let mut rig = cx.client()?;
    let (mut kept, b) = socks_connect(&mut rig, Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), None)?;
    connected(&mut rig, &b)?;
    let code = socks::reply5(&mut kept, ANSWER)?;
    check(code == Some(0), "SOCKS5 success", format!("{code:?}"))?;
    let open = (b.circ, b.stream);
    let socks_addr = rig.socks;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let apps: Vec<_> = (0..APPS)
        .map(|_| {
            let (stop, failures) = (stop.clone(), failures.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let asked = socks::connect(socks_addr).and_then(|mut app| {
                        socks::greet5(&mut app, None)?;
                        let dest = Dest::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
                        socks::request5(&mut app, 1, &dest, PORT)?;
                        let code = socks::reply5(&mut app, ANSWER)?;
                        // The client closes first: the TIME_WAIT is on its
                        // side, so that 65,535 requests do not use up this
                        // host's ephemeral ports.
                        ending(&mut app, ANSWER);
                        Ok(code)
                    });
                    match asked {
                        Ok(Some(code)) if code != 0 => {}
                        other => {
                            if let Ok(mut f) = failures.lock() {
                                f.push(format!("{other:?}"));
                            }
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    let outcome = serve_refusing(&mut rig, open);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // The requests still on their way are refused too, so that every
    // application sees its answer and ends.
    let deadline = Instant::now() + ANSWER;
    while !apps.iter().all(|a| a.is_finished()) && Instant::now() < deadline {
        if let Got::Cell(c) = rig.link.recv(QUIET) {
            if let Some((relay_cmd::BEGIN, id, _)) = c.relay() {
                rig.link
                    .send_relay_quiet(c.circ, relay_cmd::END, id, &[end_reason::EXITPOLICY])?;
            }
        }
    }
    for app in apps {
        if app.join().is_err() {
            return Err(fail("the applications to end", "one panicked"));
        }
    }
    let (circ, id, closes) = outcome?;
    if let Some(f) = failures.lock().ok().and_then(|f| f.first().cloned()) {
        return Err(fail("every request refused with SOCKS5 0x02", f));
    }
    cx.trace.note(format!(
        "stream {id} reused on {circ:#x} after {closes} streams closed there"
    ));
    Ok(())
}

/// The R9.2 case's exit: END(EXITPOLICY) for every BEGIN, until one comes
/// on an ID its circuit has already closed; none may come on `open`, a
/// stream still open. Returns that circuit, ID and how many streams had
/// closed on it.
fn serve_refusing(
    rig: &mut ClientRig,
    open: (u32, u16),
) -> Result<(u32, u16, usize), crate::case::CaseError> {
    use std::collections::{HashMap, HashSet};
    let mut closed: HashMap<u32, (HashSet<u16>, usize)> = HashMap::new();
    let mut full: Option<u32> = None;
    let bound = Instant::now() + Duration::from_secs(60);
    while Instant::now() < bound {
        let c = match rig.link.recv(ANSWER) {
            Got::Cell(c) => c,
            Got::Nothing => return Err(fail("another BEGIN", "nothing")),
            Got::Closed(why) => return Err(fail("the link to stay up", why)),
        };
        if c.command == cmd::CREATE_FAST {
            rig.link.answer_create_fast(&c, true)?;
            continue;
        }
        let Some((relay_cmd::BEGIN, id, _)) = c.relay() else {
            continue;
        };
        if (c.circ, id) == open {
            return Err(fail(
                format!("no BEGIN on stream {id}, which is open (R5.1)"),
                describe(&c),
            ));
        }
        if let Some(f) = full.filter(|&f| f != c.circ) {
            return Err(fail(
                format!("streams still opened on {f:#x}, every ID of which had closed once (R9.2)"),
                format!("a BEGIN on {:#x} instead", c.circ),
            ));
        }
        rig.link
            .send_relay_quiet(c.circ, relay_cmd::END, id, &[end_reason::EXITPOLICY])?;
        let (ids, count) = closed.entry(c.circ).or_default();
        if !ids.insert(id) {
            return Ok((c.circ, id, *count));
        }
        *count += 1;
        if *count == ALL_IDS {
            full = Some(c.circ);
        }
    }
    Err(fail(
        "a stream ID reused within 60 s of closes",
        format!(
            "{} streams closed, none on an ID closed before",
            closed.values().map(|v| v.1).sum::<usize>()
        ),
    ))
}
