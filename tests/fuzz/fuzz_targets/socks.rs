//! The SOCKS4/4a/5 handshake parser (docs/protocol.md §11, `socks::Handshake`),
//! driven the way the client's connection thread drives it: bytes are read
//! into a buffer, `feed` gets the whole buffer, consumed bytes are dropped.
//!
//! Input: byte 0 gives `k` (0-7) chunk-size bytes that follow it; the rest
//! is what the application sends.
//!
//! Checks, besides "no panic":
//! - `feed` never consumes more than it was given.
//! - `Ok` without a request means "read more": feeding the same buffer
//!   again changes nothing.
//! - Feeding after a request or an error is `AlreadyFinished`.
//! - The outcome (request, every reply byte written, stream data left
//!   over; or the error and its reply bytes) is the same whether the input
//!   arrives in the fuzzed chunks, all at once or one byte at a time.
//! - The request never takes bytes past its own end: the optimistic data
//!   left over is exactly the input after the request.
//! - A request re-encodes (canonical SOCKS4/4a or SOCKS5 bytes for the same
//!   version, command, target and credentials) to bytes that parse to the
//!   same request.
//! - CONNECT never has port 0, a `Target::Name` is a
//!   §5 hostname that is not an IP literal.
//! - Replies (`connect_reply`, `resolve_reply`) have their fixed sizes.
#![no_main]

use halfpipe_proto::relay;
use halfpipe_proto::socks::{
    self, Command, ErrorKind, Handshake, Reply, Request, SocksVersion, Step, Target,
};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Done {
        request: Request,
        replies: Vec<u8>,
        rest: Vec<u8>,
    },
    Failed {
        kind: ErrorKind,
        replies: Vec<u8>,
    },
    Pending {
        replies: Vec<u8>,
        buffered: Vec<u8>,
    },
}

/// Delivers `input` in pieces of `sizes` (cycled), as reads would.
fn drive(input: &[u8], sizes: &[usize]) -> Outcome {
    let mut hs = Handshake::new();
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    let mut fed = 0;
    let mut i = 0;
    while fed < input.len() {
        let n = sizes[i % sizes.len()].clamp(1, input.len() - fed);
        i += 1;
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        match hs.feed(&buf) {
            Ok(step) => {
                assert!(step.consumed <= buf.len(), "consumed more than given");
                buf.drain(..step.consumed);
                replies.extend(step.reply);
                if let Some(request) = step.request {
                    let after = hs.feed(&buf);
                    assert!(matches!(after, Err(ref e) if e.kind == ErrorKind::AlreadyFinished));
                    buf.extend_from_slice(&input[fed..]);
                    return Outcome::Done {
                        request,
                        replies,
                        rest: buf,
                    };
                }
                assert_eq!(
                    hs.feed(&buf),
                    Ok(Step::default()),
                    "complete message left unhandled"
                );
            }
            Err(err) => {
                replies.extend(err.reply);
                let after = hs.feed(&buf);
                assert!(matches!(after, Err(ref e) if e.kind == ErrorKind::AlreadyFinished));
                return Outcome::Failed {
                    kind: err.kind,
                    replies,
                };
            }
        }
    }
    Outcome::Pending {
        replies,
        buffered: buf,
    }
}

/// Canonical client bytes for `req`.
fn encode(req: &Request) -> Vec<u8> {
    let code = match req.command {
        Command::Connect => 0x01,
        Command::Resolve => 0xF0,
    };
    let port = req.target.port().to_be_bytes();
    let mut out = Vec::new();
    match req.version {
        SocksVersion::V5 => {
            match &req.isolation {
                Some(key) => {
                    out.extend_from_slice(&[5, 1, 2, 1]);
                    out.extend_from_slice(key); // ULEN UNAME PLEN PASSWD
                }
                None => out.extend_from_slice(&[5, 1, 0]),
            }
            out.extend_from_slice(&[5, code, 0]);
            match &req.target {
                Target::Addr(SocketAddr::V4(a)) => {
                    out.push(1);
                    out.extend_from_slice(&a.ip().octets());
                }
                Target::Addr(SocketAddr::V6(a)) => {
                    out.push(4);
                    out.extend_from_slice(&a.ip().octets());
                }
                Target::Name { host, .. } => {
                    out.push(3);
                    out.push(u8::try_from(host.len()).expect("names are at most 255 bytes"));
                    out.extend_from_slice(host.as_bytes());
                }
            }
            out.extend_from_slice(&port);
        }
        SocksVersion::V4 => {
            out.extend_from_slice(&[4, code]);
            out.extend_from_slice(&port);
            let user: &[u8] = match &req.isolation {
                // ULEN USER PLEN(0), as SOCKS4 USERIDs are keyed.
                Some(key) => {
                    assert_eq!(key.len(), 2 + usize::from(key[0]));
                    assert_eq!(*key.last().unwrap(), 0);
                    &key[1..key.len() - 1]
                }
                None => b"",
            };
            let host: Option<Vec<u8>> = match &req.target {
                // DSTIP 0.0.0.x is the SOCKS4a marker, not an address: such
                // a target came as a 4a hostname and goes back as one.
                Target::Addr(SocketAddr::V4(a)) if a.ip().octets()[..3] != [0, 0, 0] => {
                    out.extend_from_slice(&a.ip().octets());
                    None
                }
                Target::Addr(SocketAddr::V4(a)) => {
                    out.extend_from_slice(&[0, 0, 0, 1]);
                    Some(a.ip().to_string().into_bytes())
                }
                Target::Addr(SocketAddr::V6(a)) => {
                    out.extend_from_slice(&[0, 0, 0, 1]);
                    Some(format!("[{}]", a.ip()).into_bytes())
                }
                Target::Name { host, .. } => {
                    out.extend_from_slice(&[0, 0, 0, 1]);
                    Some(host.clone().into_bytes())
                }
            };
            out.extend_from_slice(user);
            out.push(0);
            if let Some(h) = host {
                out.extend_from_slice(&h);
                out.push(0);
            }
        }
    }
    out
}

fn check_request(req: &Request) {
    if req.command == Command::Connect {
        assert_ne!(req.target.port(), 0, "CONNECT to port 0");
    }
    match &req.target {
        Target::Name { host, .. } => {
            assert!(relay::valid_hostname(host.as_bytes()), "bad name {host:?}");
            assert!(host.parse::<IpAddr>().is_err(), "IP literal kept as a name");
        }
        // 0.0.0.0 is refused as SOCKS4's DSTIP only; as a name or a SOCKS5
        // address it is a target like any other (the exit policy decides).
        Target::Addr(_) => {}
    }
    // Display is what BEGIN carries (§5): it must parse as a BEGIN.
    if req.command == Command::Connect {
        let mut begin = req.target.to_string().into_bytes();
        begin.push(0);
        let t = relay::parse_begin(&begin).expect("SOCKS target is not a valid BEGIN");
        assert_eq!(t.port, req.target.port());
    }
    // Canonical bytes parse to the same request, with nothing left over.
    let bytes = encode(req);
    match drive(&bytes, &[bytes.len()]) {
        Outcome::Done { request, rest, .. } => {
            assert_eq!(&request, req, "re-encoded request differs");
            assert!(rest.is_empty());
        }
        other => panic!("re-encoded request {bytes:?} gave {other:?}"),
    }
}

fn check_replies(seed: u8) {
    let bound = SocketAddr::new(IpAddr::from([seed, 1, 2, 3]), u16::from(seed));
    let bound6 = SocketAddr::new(IpAddr::from([u16::from(seed); 8]), 1);
    let reply = socks::reply_for_end_reason(seed);
    for (v, len4, len6) in [(SocksVersion::V5, 10, 22), (SocksVersion::V4, 8, 8)] {
        assert_eq!(socks::connect_reply(v, reply, Some(bound)).len(), len4);
        assert_eq!(socks::connect_reply(v, reply, Some(bound6)).len(), len6);
        assert_eq!(socks::connect_reply(v, reply, None).len(), len4);
        assert_eq!(socks::resolve_reply(v, Ok(bound.ip())).len(), len4);
        assert_eq!(socks::resolve_reply(v, Err(reply)).len(), len4);
        assert_eq!(socks::resolve_reply(v, Err(Reply::Succeeded)).len(), len4);
        // Err(Succeeded) is a caller mistake, never sent as success.
        let r = socks::resolve_reply(v, Err(Reply::Succeeded));
        assert!(r[1] != 0x00 && r[1] != 0x5A);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 8).min(rest.len());
    let sizes: Vec<usize> = rest[..k].iter().map(|&b| usize::from(b % 64) + 1).collect();
    let input = &rest[k..];

    let whole = drive(input, &[input.len().max(1)]);
    if !sizes.is_empty() {
        assert_eq!(drive(input, &sizes), whole, "chunked feeding differs");
    }
    assert_eq!(drive(input, &[1]), whole, "byte-at-a-time feeding differs");

    match &whole {
        Outcome::Done { request, rest, .. } => {
            // The request is a prefix of the input; the rest is untouched.
            assert!(input.ends_with(rest));
            check_request(request);
        }
        Outcome::Failed { kind, .. } => {
            // The log line stays one line.
            assert!(!kind.to_string().contains('\n'));
        }
        Outcome::Pending { buffered, .. } => assert!(input.ends_with(buffered)),
    }
    check_replies(input.first().copied().unwrap_or(0));
});
