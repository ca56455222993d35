//! The exit policy (docs/protocol.md §5: a refused BEGIN gets END(EXITPOLICY);
//! syntax in crates/halfpipe-proto/src/policy.rs, taken from Tor's
//! ExitPolicy).
//!
//! Input: byte 0 picks the mode.
//! - Text (even): the bytes up to the first NUL are the policy text (UTF-8,
//!   lossily); the bytes after it make probe addresses and ports.
//! - Structured (odd): the rest drives `arbitrary` to build a list of
//!   entries (keyword, address, mask, ports, with or without mistakes),
//!   rendered as policy text, plus probes.
//!
//! Checks, besides "no panic":
//! - `allows` never panics, for the probes and for edge addresses (0.0.0.0,
//!   255.255.255.255, ::, ::1, IPv4-mapped and -compatible forms) and ports
//!   0, 1, 65535; port 0 is always refused.
//! - IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d, not :: or
//!   ::1) addresses get the same answer as the IPv4 address they carry.
//! - A parsed policy prints (Display) to text that parses to an equal
//!   policy, and printing that again gives the same text.
//! - Error messages are one line.
//! - Structured mode only: the text parses exactly when an independent
//!   model of the grammar says it should (and the error names the first
//!   bad entry), and `allows` agrees with an independent model of the
//!   matching rules (first match wins, nothing matched is refused,
//!   `private`, `accept6`/`reject6`, masks, port ranges).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use halfpipe_proto::policy::{Policy, PolicyError, PRIVATE_V4, PRIVATE_V6};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// ------------------------------------------------------------ structured

#[derive(Debug, Arbitrary)]
enum Addr {
    Star,
    Star4,
    Star6,
    Private,
    V4([u8; 4]),
    V6([u8; 16]),
}

#[derive(Debug, Arbitrary)]
enum Mask {
    Bits(u8),
    /// A dotted netmask; contiguous when `contiguous`, else these bits.
    Dotted {
        contiguous: bool,
        bits: u8,
        raw: u32,
    },
}

#[derive(Debug, Arbitrary)]
enum Ports {
    Missing,
    Star,
    One(u16),
    Range(u16, u16),
}

#[derive(Debug, Arbitrary)]
struct Entry {
    accept: bool,
    six: bool,
    addr: Addr,
    mask: Option<Mask>,
    ports: Ports,
    /// Whitespace after the keyword and around the comma.
    ws: u8,
}

/// A network in the model: address bits and prefix length.
#[derive(Debug, Clone, Copy)]
enum Net {
    Any,
    AnyV4,
    AnyV6,
    Private,
    PrivateV6,
    V4(u32, u32),
    V6(u128, u32),
}

#[derive(Debug)]
struct ModelRule {
    accept: bool,
    net: Net,
    lo: u16,
    hi: u16,
}

fn mask4(bits: u32) -> u32 {
    if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    }
}

fn mask6(bits: u32) -> u128 {
    if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    }
}

const WS: [&str; 4] = [" ", "  ", "\t", " \t "];

/// Renders one entry and says what the model makes of it (None: invalid).
fn render(e: &Entry) -> (String, Option<ModelRule>) {
    let keyword = match (e.accept, e.six) {
        (true, false) => "accept",
        (false, false) => "reject",
        (true, true) => "accept6",
        (false, true) => "reject6",
    };
    let mut text = format!("{keyword}{}", WS[usize::from(e.ws % 4)]);
    let mut valid = true;
    let (addr_text, family) = match &e.addr {
        Addr::Star => ("*".to_string(), 0),
        Addr::Star4 => ("*4".to_string(), 0),
        Addr::Star6 => ("*6".to_string(), 0),
        Addr::Private => ("private".to_string(), 0),
        Addr::V4(a) => (Ipv4Addr::from(*a).to_string(), 4),
        Addr::V6(a) => (format!("[{}]", Ipv6Addr::from(*a)), 6),
    };
    text.push_str(&addr_text);
    let mut bits = match family {
        4 => 32,
        6 => 128,
        _ => 0,
    };
    match &e.mask {
        None => {}
        Some(Mask::Bits(b)) => {
            text.push_str(&format!("/{b}"));
            bits = u32::from(*b);
            match family {
                4 => valid &= *b <= 32,
                6 => valid &= *b <= 128,
                _ => valid = false, // no mask on *, *4, *6, private
            }
        }
        Some(Mask::Dotted {
            contiguous,
            bits: b,
            raw,
        }) => {
            let m = if *contiguous {
                mask4(u32::from(b % 33))
            } else {
                *raw
            };
            text.push_str(&format!("/{}", Ipv4Addr::from(m)));
            let ones = m.leading_ones();
            // Dotted masks are for IPv4 entries, and must be contiguous.
            valid &= family == 4 && ones + m.trailing_zeros() >= 32;
            bits = ones;
        }
    }
    let (lo, hi) = match e.ports {
        Ports::Missing => (1, 65535),
        Ports::Star => {
            text.push_str(":*");
            (1, 65535)
        }
        Ports::One(p) => {
            text.push_str(&format!(":{p}"));
            valid &= p != 0;
            (p, p)
        }
        Ports::Range(lo, hi) => {
            text.push_str(&format!(":{lo}-{hi}"));
            valid &= lo != 0 && hi != 0 && lo <= hi;
            (lo, hi)
        }
    };
    let net = match (&e.addr, e.six) {
        (Addr::Star, false) => Net::Any,
        (Addr::Star4, false) => Net::AnyV4,
        (Addr::Star | Addr::Star6, _) => Net::AnyV6,
        (Addr::Private, false) => Net::Private,
        (Addr::Private, true) => Net::PrivateV6,
        // accept6/reject6 with an IPv4 address is a mistake.
        (Addr::Star4 | Addr::V4(_), true) => {
            valid = false;
            Net::AnyV4
        }
        (Addr::V4(a), false) => {
            let bits = bits.min(32);
            Net::V4(u32::from_be_bytes(*a) & mask4(bits), bits)
        }
        (Addr::V6(a), _) => {
            let bits = bits.min(128);
            let net = u128::from_be_bytes(*a) & mask6(bits);
            // A network that holds only IPv4-mapped or IPv4-compatible
            // addresses could never match (they are matched as IPv4).
            let mapped = bits >= 96 && net & mask6(96) == 0xffff_0000_0000;
            let contains = |x: u128| x & mask6(bits) == net;
            let compatible = bits >= 96 && net & mask6(96) == 0 && !contains(0) && !contains(1);
            valid &= !(mapped || compatible);
            Net::V6(net, bits)
        }
    };
    let rule = valid.then_some(ModelRule {
        accept: e.accept,
        net,
        lo,
        hi,
    });
    (text, rule)
}

fn in_private(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => PRIVATE_V4
            .iter()
            .any(|&(n, b)| u32::from(a) & mask4(b.into()) == u32::from(n) & mask4(b.into())),
        IpAddr::V6(a) => PRIVATE_V6
            .iter()
            .any(|&(n, b)| u128::from(a) & mask6(b.into()) == u128::from(n) & mask6(b.into())),
    }
}

/// The module docs' normalisation: mapped and compatible addresses are IPv4.
fn normalise(addr: IpAddr) -> IpAddr {
    if let IpAddr::V6(a) = addr {
        let x = u128::from(a);
        if x >> 32 == 0xffff || (x >> 32 == 0 && x > 1) {
            return IpAddr::V4(Ipv4Addr::from(x as u32));
        }
    }
    addr
}

fn model_allows(rules: &[ModelRule], addr: IpAddr, port: u16) -> bool {
    let addr = normalise(addr);
    for r in rules {
        if port < r.lo || port > r.hi {
            continue;
        }
        let hit = match (r.net, addr) {
            (Net::Any, _) => true,
            (Net::AnyV4, IpAddr::V4(_)) | (Net::AnyV6, IpAddr::V6(_)) => true,
            (Net::Private, a) => in_private(a),
            (Net::PrivateV6, IpAddr::V6(_)) => in_private(addr),
            (Net::V4(n, b), IpAddr::V4(a)) => u32::from(a) & mask4(b) == n,
            (Net::V6(n, b), IpAddr::V6(a)) => u128::from(a) & mask6(b) == n,
            _ => false,
        };
        if hit {
            return r.accept;
        }
    }
    false
}

// ---------------------------------------------------------------- probes

fn probes(bytes: &[u8], policy_nets: &[(IpAddr, u16)]) -> Vec<(IpAddr, u16)> {
    let mut out: Vec<(IpAddr, u16)> = vec![
        (Ipv4Addr::UNSPECIFIED.into(), 80),
        (Ipv4Addr::BROADCAST.into(), 65535),
        (Ipv4Addr::LOCALHOST.into(), 1),
        (Ipv6Addr::UNSPECIFIED.into(), 80),
        (Ipv6Addr::LOCALHOST.into(), 80),
        (Ipv6Addr::from(0xffff_7f00_0001u128).into(), 80),
        (Ipv6Addr::from(0x0a00_0001u128).into(), 443),
        (Ipv6Addr::from(2u128).into(), 0),
        (Ipv6Addr::from(u128::MAX).into(), 65535),
    ];
    out.extend_from_slice(policy_nets);
    for c in bytes.chunks(19) {
        let mut b = [0u8; 19];
        b[..c.len()].copy_from_slice(c);
        let port = u16::from_be_bytes([b[17], b[18]]);
        let v6: [u8; 16] = b[1..17].try_into().unwrap();
        let v4 = [v6[0], v6[1], v6[2], v6[3]];
        let addr: IpAddr = match b[0] % 4 {
            0 => Ipv4Addr::from(v4).into(),
            1 => Ipv6Addr::from(v6).into(),
            2 => Ipv4Addr::from(v4).to_ipv6_mapped().into(),
            _ => Ipv6Addr::from(u128::from(u32::from_be_bytes(v4))).into(),
        };
        out.push((addr, port));
    }
    out
}

/// What must hold for any policy that parsed.
fn check_policy(p: &Policy, probes: &[(IpAddr, u16)]) {
    for &(addr, port) in probes {
        for port in [port, 0, 1, 65535] {
            let verdict = p.allows(addr, port);
            if port == 0 {
                assert!(!verdict, "port 0 allowed");
            }
            // Mapped and compatible forms are matched as IPv4.
            if let IpAddr::V4(v4) = addr {
                assert_eq!(p.allows(v4.to_ipv6_mapped().into(), port), verdict);
                if u32::from(v4) > 1 {
                    let compat = Ipv6Addr::from(u128::from(u32::from(v4)));
                    assert_eq!(p.allows(compat.into(), port), verdict);
                }
            }
        }
    }
    // Display is canonical: it parses back to an equal policy.
    let text = p.to_string();
    let again: Policy = text
        .parse()
        .unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
    assert_eq!(&again, p, "{text:?} parses to a different policy");
    assert_eq!(again.to_string(), text);
}

fn check_error(e: &PolicyError) {
    let line = e.to_string();
    assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        // Text mode.
        let (text, probe_bytes) = match rest.iter().position(|&b| b == 0) {
            Some(nul) => (&rest[..nul], &rest[nul + 1..]),
            None => (rest, &[][..]),
        };
        let text = String::from_utf8_lossy(text);
        match text.parse::<Policy>() {
            Ok(p) => check_policy(&p, &probes(probe_bytes, &[])),
            Err(e) => check_error(&e),
        }
        return;
    }

    // Structured mode.
    let mut u = Unstructured::new(rest);
    let Ok(entries) = Vec::<Entry>::arbitrary(&mut u) else {
        return;
    };
    let probe_bytes = u.take_rest();
    let mut text = String::new();
    let mut model = Vec::new();
    let mut first_bad = None;
    let mut nets = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let (t, rule) = render(e);
        if i > 0 {
            text.push_str(&format!(
                "{},{}",
                WS[usize::from(e.ws / 4 % 4)],
                WS[usize::from(e.ws / 16 % 4)]
            ));
        }
        text.push_str(&t);
        match rule {
            Some(r) => {
                match r.net {
                    Net::V4(n, b) => {
                        nets.push((Ipv4Addr::from(n).into(), r.lo));
                        nets.push((Ipv4Addr::from(n | !mask4(b)).into(), r.hi));
                    }
                    Net::V6(n, b) => {
                        nets.push((Ipv6Addr::from(n).into(), r.lo));
                        nets.push((Ipv6Addr::from(n | !mask6(b)).into(), r.hi));
                    }
                    _ => {}
                }
                model.push(r);
            }
            None => {
                first_bad.get_or_insert(i + 1);
            }
        }
    }
    match (text.parse::<Policy>(), entries.is_empty(), first_bad) {
        (Err(PolicyError::Empty), true, _) => {}
        (Ok(p), false, None) => {
            let probes = probes(probe_bytes, &nets);
            for &(addr, port) in &probes {
                for port in [port, port.wrapping_add(1), port.wrapping_sub(1)] {
                    assert_eq!(
                        p.allows(addr, port),
                        model_allows(&model, addr, port),
                        "{text:?}: {addr} port {port}"
                    );
                }
            }
            check_policy(&p, &probes);
        }
        (Err(e @ PolicyError::Entry { index, .. }), false, Some(bad)) => {
            assert_eq!(index, bad, "{text:?}: {e}");
            check_error(&e);
        }
        (got, _, bad) => {
            panic!("{text:?}: parser says {got:?}, model says first bad entry {bad:?}")
        }
    }
});
