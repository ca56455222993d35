//! Relay message bodies (docs/protocol.md §4, §5, §8, §10): BEGIN, CONNECTED,
//! END, SENDME, RESOLVE and RESOLVED, plus the relay header around them.
//!
//! Input: byte 0 picks the relay command (and the stream ID with byte 1);
//! the rest is the message body, as the circuit thread would get it from
//! `relay::decode`. Every parser runs on every body.
//!
//! Checks, besides "no panic":
//! - The body travels in a relay cell: `relay::encode` then `cell::decode`
//!   and `relay::decode` give back command, stream ID and body (up to 498
//!   bytes); a payload that is not 509 bytes is `Truncated`.
//! - BEGIN: an accepted target has a port 1..65535, a name that is a valid
//!   §5 hostname (lower case, not a dotted IPv4 address) or an IP; it
//!   re-encodes (`encode_begin`) to a body that parses to the same target,
//!   and that body is what the accepted text was, up to case and the
//!   optional FLAGS after the NUL. A body without NUL is refused.
//! - CONNECTED: an address read from a body re-encodes (`encode_connected`)
//!   to a body that reads back as the same address; so does any address
//!   other than 0.0.0.0 (which §5's layout cannot tell from the IPv6 marker).
//! - END: the reason is the first byte, MISC for an empty body; every
//!   reason has a name and a SOCKS reply (§11) without panicking.
//! - SENDME: §10 says the payload is ignored; the cell decodes with any
//!   body, and nothing parses it.
//! - RESOLVE: an accepted name is a valid §5 hostname without NUL.
//! - RESOLVED: the answers re-encode (`encode_resolved`) to a body that
//!   parses back to the same answers (as many as fit in one cell).
#![no_main]

use halfpipe_proto::cell;
use halfpipe_proto::relay::{self, end_reason, relay_cmd, Answer, Host, RelayError, DATA_MAX};
use halfpipe_proto::socks;
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const COMMANDS: [u8; 9] = [
    relay_cmd::BEGIN,
    relay_cmd::DATA,
    relay_cmd::END,
    relay_cmd::CONNECTED,
    relay_cmd::SENDME,
    relay_cmd::DROP,
    relay_cmd::RESOLVE,
    relay_cmd::RESOLVED,
    relay_cmd::FIN,
];

fn check_cell_round_trip(command: u8, stream_id: u16, body: &[u8]) {
    let body = &body[..body.len().min(DATA_MAX)];
    let mut out = Vec::new();
    relay::encode(&mut out, 0x8000_0001, command, stream_id, body);
    let (c, used) = cell::decode(&out).expect("a whole cell");
    assert_eq!(used, out.len());
    assert_eq!(c.command, cell::cmd::RELAY);
    let rc = relay::decode(c.payload).expect("a valid relay cell");
    assert_eq!(
        (rc.command, rc.stream_id, rc.body),
        (command, stream_id, body)
    );
    // §4: padding may be anything.
    let mut padded = out.clone();
    for b in &mut padded[5 + relay::HEADER_LEN + body.len()..] {
        *b = 0xA5;
    }
    assert_eq!(relay::decode(&padded[5..]), Ok(rc));
}

fn check_begin(body: &[u8]) {
    let parsed = relay::parse_begin(body);
    let Some(nul) = body.iter().position(|&b| b == 0) else {
        assert!(parsed.is_err(), "BEGIN without NUL accepted");
        return;
    };
    let Ok(target) = parsed else {
        return;
    };
    assert_ne!(target.port, 0);
    match &target.host {
        Host::Name(name) => {
            assert!(relay::valid_hostname(name.as_bytes()), "bad name {name:?}");
            assert_eq!(name.to_ascii_lowercase(), *name);
            assert!(
                name.parse::<Ipv4Addr>().is_err(),
                "IPv4 address kept as a name"
            );
        }
        Host::Ip(_) => {}
    }
    let encoded = relay::encode_begin(&target);
    assert_eq!(relay::parse_begin(&encoded).as_ref(), Ok(&target));
    // The text before the NUL was this target, up to case, leading zeros
    // in the port and how an IPv6 address was written.
    let text = &body[..nul];
    let colon = text.iter().rposition(|&b| b == b':').expect("a port");
    let (addr, port) = (&text[..colon], &text[colon + 1..]);
    assert!(port.iter().all(u8::is_ascii_digit));
    let port: u32 = std::str::from_utf8(port).unwrap().parse().unwrap();
    assert_eq!(port, u32::from(target.port));
    let again = &encoded[..encoded.iter().rposition(|&b| b == b':').unwrap()];
    match target.host {
        Host::Name(_) => assert!(addr.eq_ignore_ascii_case(again)),
        Host::Ip(IpAddr::V4(_)) => assert_eq!(addr, again),
        Host::Ip(IpAddr::V6(_)) => assert!(addr.starts_with(b"[") && addr.ends_with(b"]")),
    }
}

fn check_connected(body: &[u8]) {
    if let Some(ip) = relay::parse_connected(body) {
        let ttl = body
            .get(..4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        assert_eq!(
            relay::parse_connected(&relay::encode_connected(ip, ttl)),
            Some(ip)
        );
    }
    // Any address built from the body survives encode + parse.
    let mut v6 = [0u8; 16];
    for (d, s) in v6.iter_mut().zip(body) {
        *d = *s;
    }
    let v4 = Ipv4Addr::new(v6[0], v6[1], v6[2], v6[3]);
    let ip6 = IpAddr::V6(Ipv6Addr::from(v6));
    assert_eq!(
        relay::parse_connected(&relay::encode_connected(ip6, 300)),
        Some(ip6)
    );
    let ip4 = IpAddr::V4(v4);
    let back = relay::parse_connected(&relay::encode_connected(ip4, 300));
    if v4.is_unspecified() {
        // 0.0.0.0 reads as the IPv6 marker; the address is advisory (§5).
        assert_eq!(back, None);
    } else {
        assert_eq!(back, Some(ip4));
    }
}

fn check_end(body: &[u8]) {
    let reason = relay::parse_end(body);
    assert_eq!(reason, body.first().copied().unwrap_or(end_reason::MISC));
    let _ = end_reason::name(reason);
    let reply = socks::reply_for_end_reason(reason);
    assert_ne!(reply, socks::Reply::Succeeded, "an END never means success");
}

fn check_resolve(body: &[u8]) {
    if let Ok(name) = relay::parse_resolve(body) {
        assert!(relay::valid_hostname(name.as_bytes()));
        assert!(!name.contains('\0'));
        assert!(body.len() > name.len() && body[name.len()] == 0);
    }
}

fn check_resolved(body: &[u8], ttl: u32) {
    let answers = relay::parse_resolved(body);
    let encoded = relay::encode_resolved(&answers, ttl);
    assert!(
        encoded.len() <= DATA_MAX,
        "RESOLVED body does not fit a cell"
    );
    let again = relay::parse_resolved(&encoded);
    // tor-spec 6.4: an answer's Length is one byte, so a longer hostname
    // (possible after a lossy read of non-UTF-8 bytes) is left out; and
    // encode_resolved stops before the cell overflows. So what reads back
    // is a prefix of the sendable answers, exactly.
    let sendable: Vec<Answer> = answers
        .iter()
        .filter(|a| !matches!(a, Answer::Hostname(h) if h.len() > 255))
        .cloned()
        .collect();
    assert!(again.len() <= sendable.len());
    assert_eq!(
        again[..],
        sendable[..again.len()],
        "RESOLVED answers changed"
    );
    if body.len() <= DATA_MAX {
        // Whatever fitted in one cell fits again, unless a hostname held
        // bytes that are not UTF-8 (read lossily, so longer now).
        let lossy = answers
            .iter()
            .any(|a| matches!(a, Answer::Hostname(h) if h.contains('\u{FFFD}')));
        if !lossy {
            assert_eq!(
                again, answers,
                "answers from one cell no longer fit one cell"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (command, stream_id, body) = match data {
        [c, s, rest @ ..] => (
            COMMANDS[usize::from(*c) % COMMANDS.len()],
            u16::from_be_bytes([*s, *c]),
            rest,
        ),
        _ => return,
    };
    // §4: only a 509-byte payload is a relay cell.
    if body.len() != cell::PAYLOAD_LEN {
        assert_eq!(relay::decode(body), Err(RelayError::Truncated(body.len())));
    }
    check_cell_round_trip(command, stream_id, body);
    let ttl = u32::from(stream_id) << 8 | u32::from(command);
    // The command byte says which parser the circuit would use; run the
    // others too, as they must all take any bytes.
    check_begin(body);
    check_connected(body);
    check_end(body);
    check_resolve(body);
    check_resolved(body, ttl);
    if command == relay_cmd::SENDME {
        // §10: the SENDME payload (version 0 or empty) is ignored; only
        // its stream ID matters, which the round trip above checked.
        let _ = relay_cmd::name(command);
    }
});
