//! Exit policy: which targets an exit may connect to (docs/protocol.md §5:
//! R5.3 checks the target against it, and R5.6 answers a refused BEGIN with
//! END reason EXITPOLICY).
//!
//! Read first: docs/protocol.md §5; Tor's `ExitPolicy` option in the torrc manual
//! and dir-spec 2.1.3 (`accept`/`reject` exitpattern), whose syntax this
//! module takes:
//!
//! ```text
//! policy  = entry *( "," entry )          ; whitespace allowed around entries
//! entry   = ("accept" / "reject" / "accept6" / "reject6") 1*WSP target
//! target  = addr [ "/" bits ] [ ":" ports ]
//! addr    = "*" / "*4" / "*6" / "private" / IPv4 / "[" IPv6 "]"
//! bits    = prefix length (0-32, 0-128), or a contiguous dotted IPv4 netmask
//! ports   = "*" / port / port "-" port    ; 1..65535, missing = all ports
//! ```
//!
//! Matching ([`Policy::allows`]): the first entry that matches address and
//! port decides. What no entry matches is refused, as a firewall does.
//!
//! IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`) IPv6
//! addresses are matched *as the IPv4 address they carry*: a BEGIN to
//! `[::ffff:127.0.0.1]` must not slip past `reject private:*` or
//! `reject 127.0.0.0/8:*`. `::` and `::1` are the IPv6 unspecified and
//! loopback addresses, not IPv4-compatible ones, and stay IPv6.
//!
//! `private` is the fixed list in [`PRIVATE_V4`] and [`PRIVATE_V6`] and
//! the exit host's own addresses, which the caller reads from the system
//! and passes in ([`HostAddrs`], [`Policy::allows_on`]), as Tor's
//! ExitPolicyRejectPrivate with ExitPolicyRejectLocalInterfaces does: a
//! service listening on all of the exit host's addresses is as private as
//! one on loopback.
//!
//! Deliberate departures from Tor:
//! - No default policy is appended: what the policy does not accept is
//!   refused ([`DEFAULT_EXIT_POLICY`] is the usual choice).
//! - Tor warns about and drops an `accept6`/`reject6` entry with an IPv4
//!   address, and skips empty entries; here both are errors, so a typo in
//!   the policy stops the daemon instead of silently changing what it allows.
//! - An IPv6 entry that could only match IPv4-mapped or IPv4-compatible
//!   addresses (e.g. `[::ffff:10.0.0.0]/104`) would never match after the
//!   normalisation above, so it is an error asking for the IPv4 form.
//! - Port 0 is matched by no entry, so it is always refused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The policy an exit uses unless configured otherwise: anything but the
/// exit's private networks.
pub const DEFAULT_EXIT_POLICY: &str = "reject private:*,accept *:*";

/// A policy that accepts every target, for test and development runs.
pub const RUN_POLICY: &str = "accept *:*";

/// IPv4 networks that `private` stands for.
pub const PRIVATE_V4: [(Ipv4Addr, u8); 7] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),      // "this network" (RFC 1122)
    (Ipv4Addr::new(10, 0, 0, 0), 8),     // RFC 1918
    (Ipv4Addr::new(100, 64, 0, 0), 10),  // carrier-grade NAT (RFC 6598)
    (Ipv4Addr::new(127, 0, 0, 0), 8),    // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local
    (Ipv4Addr::new(172, 16, 0, 0), 12),  // RFC 1918
    (Ipv4Addr::new(192, 168, 0, 0), 16), // RFC 1918
];

/// IPv6 networks that `private` stands for.
pub const PRIVATE_V6: [(Ipv6Addr, u8); 4] = [
    (Ipv6Addr::UNSPECIFIED, 128),
    (Ipv6Addr::LOCALHOST, 128),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),  // unique local
];

/// The exit host's own addresses, which `private` stands for too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAddrs(Vec<IpAddr>);

impl HostAddrs {
    /// The addresses as the policy matches them (IPv4-mapped and
    /// IPv4-compatible ones as IPv4), sorted, each once.
    pub fn new(addrs: impl IntoIterator<Item = IpAddr>) -> HostAddrs {
        let mut v: Vec<IpAddr> = addrs.into_iter().map(normalise).collect();
        v.sort();
        v.dedup();
        HostAddrs(v)
    }

    /// Is `addr` (in any spelling) one of the host's addresses?
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.binary_search(&normalise(addr)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A parsed exit policy: entries in order, the first match decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Whether the exit may connect to `addr:port` (R5.3), `private`
    /// standing for the fixed networks only. The first entry that matches
    /// decides; if none does, the target is refused (R5.6).
    pub fn allows(&self, addr: IpAddr, port: u16) -> bool {
        self.allows_on(&HostAddrs::default(), addr, port)
    }

    /// Whether an exit on a host with addresses `host` may connect to
    /// `addr:port`: `private` also stands for `host`.
    pub fn allows_on(&self, host: &HostAddrs, addr: IpAddr, port: u16) -> bool {
        self.deciding_entry(host, addr, port)
            .is_some_and(|(_, rule)| rule.action == Action::Accept)
    }

    /// Why `addr:port` is refused on a host with addresses `host`, for a
    /// person: the entry that rejects it (its position from 1, as written
    /// canonically), or that no entry matches. `None` if it is allowed.
    pub fn refusal_on(&self, host: &HostAddrs, addr: IpAddr, port: u16) -> Option<String> {
        match self.deciding_entry(host, addr, port) {
            Some((_, rule)) if rule.action == Action::Accept => None,
            Some((n, rule)) => Some(format!("entry {n}, \"{rule}\"")),
            None => Some("no entry matches".to_owned()),
        }
    }

    /// Whether an entry says `private`: only then do the host's own
    /// addresses matter.
    pub fn mentions_private(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.pattern, Pattern::Private | Pattern::PrivateV6))
    }

    /// The first entry that matches, with its position from 1.
    fn deciding_entry(&self, host: &HostAddrs, addr: IpAddr, port: u16) -> Option<(usize, &Rule)> {
        let addr = normalise(addr);
        self.rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matches(host, addr, port))
            .map(|(i, rule)| (i + 1, rule))
    }
}

/// Matches IPv4-mapped and IPv4-compatible IPv6 addresses as IPv4 (see the
/// module docs), so that IPv4 entries and `private` see through them.
fn normalise(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v4_inside(v6) {
            Some(v4) => IpAddr::V4(v4),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// The IPv4 address an IPv4-mapped or IPv4-compatible address carries.
/// Not `Ipv6Addr::to_ipv4`, which would turn `::1` into `0.0.0.1`.
fn v4_inside(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let bits = u128::from(v6);
    // The top 96 bits are zero and the address is not :: or ::1.
    if bits >> 32 == 0 && bits > 1 {
        return Some(Ipv4Addr::from(bits as u32)); // the low 32 bits, by design
    }
    None
}

impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        if s.trim().is_empty() {
            return Err(PolicyError::Empty);
        }
        let rules = s
            .split(',')
            .enumerate()
            .map(|(i, entry)| {
                let entry = entry.trim();
                parse_entry(entry).map_err(|problem| PolicyError::Entry {
                    index: i + 1,
                    entry: entry.to_string(),
                    problem,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { rules })
    }
}

/// The canonical form: one space after the keyword, ports always written,
/// entries joined by ", ". It parses back to an equal `Policy`.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{rule}")?;
        }
        Ok(())
    }
}

/// Why a policy string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("exit policy is empty")]
    Empty,
    /// `index` counts entries from 1; `entry` is the entry, trimmed.
    #[error("exit policy entry {index} {entry:?}: {problem}")]
    Entry {
        index: usize,
        entry: String,
        problem: EntryProblem,
    },
}

/// What is wrong with one entry. Input text is quoted with `{:?}` so that
/// the message stays on one line whatever it contains.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error("empty entry")]
    EmptyEntry,
    #[error("expected \"accept\" or \"reject\"")]
    BadKeyword,
    #[error("missing address after {0:?}")]
    MissingTarget(&'static str),
    #[error("unexpected {0:?} after the address")]
    TrailingText(String),
    #[error("{0:?} is not an address: expected *, *4, *6, private, an IPv4 address or an IPv6 address in brackets")]
    BadAddress(String),
    #[error("IPv6 address {0:?} must be in brackets, like [::1]")]
    BareIpv6(String),
    #[error("missing \"]\" after the IPv6 address")]
    UnclosedBracket,
    #[error("{0:?} is not an IPv6 address")]
    BadIpv6(String),
    #[error("unexpected {0:?} after \"]\": expected /BITS or :PORT")]
    AfterBracket(String),
    #[error("{0:?} takes no prefix length")]
    MaskNotAllowed(&'static str),
    #[error("{mask:?} is not a prefix length (0-{max})")]
    BadMask { mask: String, max: u8 },
    #[error("netmask {0} is not contiguous")]
    NonContiguousMask(Ipv4Addr),
    #[error("{0} matches IPv4-mapped or IPv4-compatible addresses only, which are matched as IPv4: write the IPv4 address")]
    Ipv4InIpv6(String),
    #[error("{keyword:?} applies to IPv6 only, but {addr:?} is IPv4")]
    Ipv4WithIpv6Only { keyword: &'static str, addr: String },
    #[error("{0:?} is not a port: expected *, 1-65535 or LO-HI")]
    BadPort(String),
    #[error("port range {lo}-{hi} is reversed")]
    ReversedRange { lo: u16, hi: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Accept,
    Reject,
}

impl Action {
    fn keyword(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Reject => "reject",
        }
    }
}

/// One entry. `accept6`/`reject6` are folded into `pattern` at parse time
/// (`accept6 *` is `accept *6`), so equal rules compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    action: Action,
    pattern: Pattern,
    ports: Ports,
}

impl Rule {
    /// `addr` is already normalised.
    fn matches(&self, host: &HostAddrs, addr: IpAddr, port: u16) -> bool {
        self.ports.contains(port) && self.pattern.matches(host, addr)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keyword = self.action.keyword();
        match self.pattern {
            // The only pattern with no spelling of its own.
            Pattern::PrivateV6 => write!(f, "{keyword}6 private:{}", self.ports),
            _ => write!(f, "{keyword} {}:{}", self.pattern, self.ports),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// `*`
    Any,
    /// `*4`
    AnyV4,
    /// `*6`, or `*` after `accept6`/`reject6`
    AnyV6,
    /// `private`
    Private,
    /// `private` after `accept6`/`reject6`: the IPv6 private networks only.
    PrivateV6,
    V4(Net4),
    V6(Net6),
}

impl Pattern {
    fn matches(&self, host: &HostAddrs, addr: IpAddr) -> bool {
        match (self, addr) {
            (Pattern::Any, _) => true,
            (Pattern::AnyV4, IpAddr::V4(_)) => true,
            (Pattern::AnyV6, IpAddr::V6(_)) => true,
            (Pattern::Private, IpAddr::V4(a)) => is_private_v4(a) || host.contains(addr),
            (Pattern::Private | Pattern::PrivateV6, IpAddr::V6(a)) => {
                is_private_v6(a) || host.contains(addr)
            }
            (Pattern::V4(net), IpAddr::V4(a)) => net.contains(a),
            (Pattern::V6(net), IpAddr::V6(a)) => net.contains(a),
            (Pattern::AnyV4 | Pattern::V4(_), IpAddr::V6(_)) => false,
            (Pattern::AnyV6 | Pattern::PrivateV6 | Pattern::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::AnyV4 => f.write_str("*4"),
            Pattern::AnyV6 => f.write_str("*6"),
            Pattern::Private | Pattern::PrivateV6 => f.write_str("private"),
            Pattern::V4(net) => write!(f, "{net}"),
            Pattern::V6(net) => write!(f, "{net}"),
        }
    }
}

fn is_private_v4(a: Ipv4Addr) -> bool {
    PRIVATE_V4
        .iter()
        .any(|&(net, bits)| Net4::new(net, bits).contains(a))
}

fn is_private_v6(a: Ipv6Addr) -> bool {
    PRIVATE_V6
        .iter()
        .any(|&(net, bits)| Net6::new(net, bits).contains(a))
}

/// An IPv4 prefix. The host bits of `addr` are zero (as Tor, `10.1.2.3/8`
/// means `10.0.0.0/8`), so equal networks compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net4 {
    addr: Ipv4Addr,
    bits: u8,
}

impl Net4 {
    /// `bits` is at most 32 (checked by the parser).
    fn new(addr: Ipv4Addr, bits: u8) -> Net4 {
        let addr = Ipv4Addr::from(u32::from(addr) & mask4(bits));
        Net4 { addr, bits }
    }

    fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & mask4(self.bits) == u32::from(self.addr)
    }
}

impl fmt::Display for Net4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bits {
            32 => write!(f, "{}", self.addr),
            bits => write!(f, "{}/{bits}", self.addr),
        }
    }
}

/// An IPv6 prefix, host bits zero as in [`Net4`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net6 {
    addr: Ipv6Addr,
    bits: u8,
}

impl Net6 {
    /// `bits` is at most 128 (checked by the parser).
    fn new(addr: Ipv6Addr, bits: u8) -> Net6 {
        let addr = Ipv6Addr::from(u128::from(addr) & mask6(bits));
        Net6 { addr, bits }
    }

    fn contains(&self, a: Ipv6Addr) -> bool {
        u128::from(a) & mask6(self.bits) == u128::from(self.addr)
    }

    /// Whether every address in the network is normalised to IPv4 before
    /// matching, so that the entry could never match.
    fn only_v4_inside(&self) -> bool {
        let mapped = Net6::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96);
        let compatible = Net6::new(Ipv6Addr::UNSPECIFIED, 96);
        let inside = |outer: Net6| self.bits >= outer.bits && outer.contains(self.addr);
        inside(mapped)
            || (inside(compatible)
                && !self.contains(Ipv6Addr::UNSPECIFIED)
                && !self.contains(Ipv6Addr::LOCALHOST))
    }
}

impl fmt::Display for Net6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bits {
            128 => write!(f, "[{}]", self.addr),
            bits => write!(f, "[{}]/{bits}", self.addr),
        }
    }
}

/// The mask of a `bits`-long prefix; shifting by the full width is `None`,
/// which is the empty mask of `/0`.
fn mask4(bits: u8) -> u32 {
    u32::MAX
        .checked_shl(32u32.saturating_sub(bits.into()))
        .unwrap_or(0)
}

fn mask6(bits: u8) -> u128 {
    u128::MAX
        .checked_shl(128u32.saturating_sub(bits.into()))
        .unwrap_or(0)
}

/// An inclusive port range, 1 <= lo <= hi.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ports {
    lo: u16,
    hi: u16,
}

impl Ports {
    const ALL: Ports = Ports { lo: 1, hi: 65535 };

    fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Ports::ALL {
            f.write_str("*")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// Parses one trimmed entry.
fn parse_entry(entry: &str) -> Result<Rule, EntryProblem> {
    if entry.is_empty() {
        return Err(EntryProblem::EmptyEntry);
    }
    let (keyword, rest) = match entry.split_once(char::is_whitespace) {
        Some((keyword, rest)) => (keyword, rest.trim_start()),
        None => (entry, ""),
    };
    // `keyword` becomes the static name used in error messages.
    let (action, ipv6_only, keyword) = match keyword {
        "accept" => (Action::Accept, false, "accept"),
        "reject" => (Action::Reject, false, "reject"),
        "accept6" => (Action::Accept, true, "accept6"),
        "reject6" => (Action::Reject, true, "reject6"),
        _ => return Err(EntryProblem::BadKeyword),
    };
    if rest.is_empty() {
        return Err(EntryProblem::MissingTarget(keyword));
    }
    if let Some((_, extra)) = rest.split_once(char::is_whitespace) {
        return Err(EntryProblem::TrailingText(extra.trim().to_string()));
    }
    let (pattern, ports) = parse_target(rest)?;
    let pattern = if ipv6_only {
        restrict_to_ipv6(pattern, keyword, rest)?
    } else {
        pattern
    };
    Ok(Rule {
        action,
        pattern,
        ports,
    })
}

/// Applies `accept6`/`reject6` to a parsed pattern (Tor: the entry applies
/// to IPv6 only; an IPv4 address there is a mistake, see module docs).
fn restrict_to_ipv6(
    pattern: Pattern,
    keyword: &'static str,
    target: &str,
) -> Result<Pattern, EntryProblem> {
    match pattern {
        Pattern::Any | Pattern::AnyV6 => Ok(Pattern::AnyV6),
        Pattern::Private | Pattern::PrivateV6 => Ok(Pattern::PrivateV6),
        Pattern::V6(net) => Ok(Pattern::V6(net)),
        Pattern::AnyV4 | Pattern::V4(_) => {
            let addr = target.split(&[':', '/'][..]).next().unwrap_or(target);
            Err(EntryProblem::Ipv4WithIpv6Only {
                keyword,
                addr: addr.to_string(),
            })
        }
    }
}

/// Parses `ADDR[/BITS][:PORTS]`, which contains no whitespace.
fn parse_target(target: &str) -> Result<(Pattern, Ports), EntryProblem> {
    if let Some(inner) = target.strip_prefix('[') {
        let (inside, after) = inner.split_once(']').ok_or(EntryProblem::UnclosedBracket)?;
        let addr: Ipv6Addr = inside
            .parse()
            .map_err(|_| EntryProblem::BadIpv6(inside.to_string()))?;
        let (mask, ports) = match after.strip_prefix('/') {
            Some(rest) => match rest.split_once(':') {
                Some((mask, ports)) => (Some(mask), Some(ports)),
                None => (Some(rest), None),
            },
            None if after.is_empty() => (None, None),
            None => match after.strip_prefix(':') {
                Some(ports) => (None, Some(ports)),
                None => return Err(EntryProblem::AfterBracket(after.to_string())),
            },
        };
        let bits = match mask {
            Some(mask) => parse_bits(mask, 128)?,
            None => 128,
        };
        let net = Net6::new(addr, bits);
        if net.only_v4_inside() {
            return Err(EntryProblem::Ipv4InIpv6(net.to_string()));
        }
        return Ok((Pattern::V6(net), parse_ports(ports)?));
    }

    if let Some(addr) = bare_ipv6(target) {
        return Err(EntryProblem::BareIpv6(addr.to_string()));
    }
    let (addr_mask, ports) = match target.split_once(':') {
        Some((addr_mask, ports)) => (addr_mask, Some(ports)),
        None => (target, None),
    };
    let (addr, mask) = match addr_mask.split_once('/') {
        Some((addr, mask)) => (addr, Some(mask)),
        None => (addr_mask, None),
    };
    let pattern = match addr {
        "*" => no_mask(Pattern::Any, "*", mask)?,
        "*4" => no_mask(Pattern::AnyV4, "*4", mask)?,
        "*6" => no_mask(Pattern::AnyV6, "*6", mask)?,
        "private" => no_mask(Pattern::Private, "private", mask)?,
        _ => {
            let ip: Ipv4Addr = addr
                .parse()
                .map_err(|_| EntryProblem::BadAddress(addr.to_string()))?;
            let bits = match mask {
                Some(mask) if mask.contains('.') => parse_netmask(mask)?,
                Some(mask) => parse_bits(mask, 32)?,
                None => 32,
            };
            Pattern::V4(Net4::new(ip, bits))
        }
    };
    Ok((pattern, parse_ports(ports)?))
}

/// The address of a target that starts with an unbracketed IPv6 address
/// (`::1`, `2001:db8::/32`, `::ffff:1.2.3.4:80`). Catching it here gives a
/// better message than "is not a port".
fn bare_ipv6(target: &str) -> Option<&str> {
    let addr = target.split('/').next().unwrap_or(target);
    if addr.parse::<Ipv6Addr>().is_ok() {
        return Some(addr);
    }
    // The last colon may start the ports.
    let (head, _) = addr.rsplit_once(':')?;
    head.parse::<Ipv6Addr>().is_ok().then_some(head)
}

fn no_mask(
    pattern: Pattern,
    name: &'static str,
    mask: Option<&str>,
) -> Result<Pattern, EntryProblem> {
    match mask {
        Some(_) => Err(EntryProblem::MaskNotAllowed(name)),
        None => Ok(pattern),
    }
}

/// A decimal prefix length up to `max`. Digits only: `u8::from_str` would
/// also take a leading `+`.
fn parse_bits(mask: &str, max: u8) -> Result<u8, EntryProblem> {
    let bad = || EntryProblem::BadMask {
        mask: mask.to_string(),
        max,
    };
    if mask.is_empty() || !mask.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match mask.parse::<u8>() {
        Ok(bits) if bits <= max => Ok(bits),
        _ => Err(bad()),
    }
}

/// A dotted IPv4 netmask such as `255.255.0.0`, which Tor allows in place
/// of a prefix length. Only contiguous masks mean a prefix.
fn parse_netmask(mask: &str) -> Result<u8, EntryProblem> {
    let netmask: Ipv4Addr = mask.parse().map_err(|_| EntryProblem::BadMask {
        mask: mask.to_string(),
        max: 32,
    })?;
    let m = u32::from(netmask);
    let ones = m.leading_ones();
    if ones + m.trailing_zeros() < 32 {
        return Err(EntryProblem::NonContiguousMask(netmask));
    }
    // `leading_ones` of a u32 is at most 32.
    Ok(ones as u8)
}

/// `*`, `PORT` or `LO-HI`; a missing `:PORTS` means all ports (as Tor).
fn parse_ports(ports: Option<&str>) -> Result<Ports, EntryProblem> {
    let Some(text) = ports else {
        return Ok(Ports::ALL);
    };
    if text == "*" {
        return Ok(Ports::ALL);
    }
    let port = |s: &str| -> Result<u16, EntryProblem> {
        let bad = || EntryProblem::BadPort(text.to_string());
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match s.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad()),
            Ok(p) => Ok(p),
        }
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(EntryProblem::ReversedRange { lo, hi });
    }
    Ok(Ports { lo, hi })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(s: &str) -> Policy {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} is not an address: {e}"))
    }

    /// Whether the one-entry policy `accept TARGET` accepts `addr:port`.
    fn accepts(target: &str, addr: &str, port: u16) -> bool {
        policy(&format!("accept {target}")).allows(ip(addr), port)
    }

    /// The entry problem that `s` fails with.
    fn problem(s: &str) -> EntryProblem {
        match s.parse::<Policy>() {
            Err(PolicyError::Entry { problem, .. }) => problem,
            other => panic!("{s:?} should fail with an entry error, got {other:?}"),
        }
    }

    // ---- syntax forms ----

    #[test]
    fn constants_parse() {
        let default = policy(DEFAULT_EXIT_POLICY);
        assert!(!default.allows(ip("127.0.0.1"), 80));
        assert!(!default.allows(ip("::1"), 80));
        assert!(default.allows(ip("93.184.216.34"), 443));
        assert!(default.allows(ip("2001:db8::1"), 443));
        let run = policy(RUN_POLICY);
        assert!(run.allows(ip("127.0.0.1"), 1));
        assert!(run.allows(ip("::1"), 65535));
    }

    #[test]
    fn star_matches_both_families() {
        assert!(accepts("*:*", "1.2.3.4", 80));
        assert!(accepts("*:*", "2001:db8::1", 80));
    }

    #[test]
    fn star4_matches_ipv4_only() {
        assert!(accepts("*4:*", "1.2.3.4", 80));
        assert!(!accepts("*4:*", "2001:db8::1", 80));
    }

    #[test]
    fn star6_matches_ipv6_only() {
        assert!(!accepts("*6:*", "1.2.3.4", 80));
        assert!(accepts("*6:*", "2001:db8::1", 80));
    }

    #[test]
    fn ipv4_host() {
        assert!(accepts("1.2.3.4:80", "1.2.3.4", 80));
        assert!(!accepts("1.2.3.4:80", "1.2.3.5", 80));
        assert!(!accepts("1.2.3.4:80", "::ffff:1.2.3.5", 80));
        assert!(!accepts("1.2.3.4:80", "2001:db8::1", 80));
    }

    #[test]
    fn ipv4_prefix() {
        assert!(accepts("10.0.0.0/8:*", "10.255.255.255", 1));
        assert!(!accepts("10.0.0.0/8:*", "11.0.0.0", 1));
        assert!(!accepts("10.0.0.0/8:*", "9.255.255.255", 1));
        assert!(accepts("0.0.0.0/0:*", "255.255.255.255", 1));
        assert!(!accepts("0.0.0.0/0:*", "2001:db8::1", 1));
        assert!(accepts("1.2.3.4/32:*", "1.2.3.4", 1));
        assert!(!accepts("1.2.3.4/32:*", "1.2.3.5", 1));
    }

    #[test]
    fn ipv4_host_bits_are_masked() {
        assert_eq!(policy("accept 10.1.2.3/8"), policy("accept 10.0.0.0/8:*"));
        assert_eq!(
            policy("accept 10.1.2.3/8").to_string(),
            "accept 10.0.0.0/8:*"
        );
    }

    #[test]
    fn ipv4_netmask() {
        assert_eq!(
            policy("accept 10.0.0.0/255.0.0.0:*"),
            policy("accept 10.0.0.0/8:*")
        );
        assert_eq!(
            policy("accept 1.2.3.4/255.255.255.255"),
            policy("accept 1.2.3.4")
        );
        assert_eq!(policy("accept 1.2.3.4/0.0.0.0"), policy("accept 0.0.0.0/0"));
        assert_eq!(
            policy("accept 172.16.0.0/255.240.0.0"),
            policy("accept 172.16.0.0/12")
        );
    }

    #[test]
    fn ipv6_host_and_prefix() {
        assert!(accepts("[2001:db8::1]:443", "2001:db8::1", 443));
        assert!(!accepts("[2001:db8::1]:443", "2001:db8::2", 443));
        assert!(accepts("[2001:db8::]/32:*", "2001:db8:ffff::1", 9));
        assert!(!accepts("[2001:db8::]/32:*", "2001:db9::", 9));
        assert!(accepts("[::]/0:*", "2001:db8::1", 9));
        assert!(!accepts("[::]/0:*", "1.2.3.4", 9));
        assert!(accepts("[::1]", "::1", 9));
        assert_eq!(
            policy("accept [2001:db8::1]/32"),
            policy("accept [2001:db8::]/32:*")
        );
    }

    #[test]
    fn ports() {
        assert!(accepts("*:80", "1.2.3.4", 80));
        assert!(!accepts("*:80", "1.2.3.4", 81));
        assert!(!accepts("*:80", "1.2.3.4", 79));
        assert!(accepts("*:80-88", "1.2.3.4", 80));
        assert!(accepts("*:80-88", "1.2.3.4", 88));
        assert!(!accepts("*:80-88", "1.2.3.4", 89));
        assert!(!accepts("*:80-88", "1.2.3.4", 79));
        assert!(accepts("*:1", "1.2.3.4", 1));
        assert!(accepts("*:65535", "1.2.3.4", 65535));
        assert!(accepts("*:1-65535", "1.2.3.4", 1));
        assert!(accepts("*:443-443", "1.2.3.4", 443));
    }

    #[test]
    fn missing_port_means_all_ports() {
        assert_eq!(policy("accept 1.2.3.4"), policy("accept 1.2.3.4:*"));
        assert_eq!(policy("accept *"), policy("accept *:1-65535"));
        assert_eq!(policy("reject private"), policy("reject private:*"));
        assert!(accepts("*", "1.2.3.4", 65535));
    }

    #[test]
    fn port_zero_is_never_matched() {
        let p = policy("reject *:80, accept *:*");
        assert!(!p.allows(ip("1.2.3.4"), 0));
        assert!(!policy("reject *:*").allows(ip("1.2.3.4"), 0));
    }

    #[test]
    fn whitespace_is_tolerated() {
        let want = policy("reject private:*,accept *:80");
        assert_eq!(policy("  reject private:* ,  accept *:80  "), want);
        assert_eq!(policy("reject\tprivate:*,\n accept   *:80\n"), want);
    }

    #[test]
    fn accept6_applies_to_ipv6_only() {
        assert_eq!(policy("accept6 *:80"), policy("accept *6:80"));
        assert_eq!(policy("accept6 *6:80"), policy("accept *6:80"));
        assert_eq!(policy("reject6 [::1]:*"), policy("reject [::1]:*"));
        let p = policy("reject6 *:*, accept *:*");
        assert!(p.allows(ip("1.2.3.4"), 80));
        assert!(!p.allows(ip("2001:db8::1"), 80));
    }

    #[test]
    fn reject6_private_leaves_ipv4_alone() {
        let p = policy("reject6 private:*, accept *:*");
        assert!(p.allows(ip("127.0.0.1"), 80));
        assert!(p.allows(ip("10.0.0.1"), 80));
        assert!(!p.allows(ip("::1"), 80));
        assert!(!p.allows(ip("fe80::1"), 80));
        assert!(p.allows(ip("2001:db8::1"), 80));
        assert_eq!(p.to_string(), "reject6 private:*, accept *:*");
    }

    #[test]
    fn display_is_canonical() {
        let p = policy(
            "reject private, accept 1.2.3.4/32:80-80, accept [::1]/128:1-65535, \
             accept6 *:22, reject *4:1-1024, reject 10.0.0.0/255.0.0.0:5-6",
        );
        assert_eq!(
            p.to_string(),
            "reject private:*, accept 1.2.3.4:80, accept [::1]:*, accept *6:22, \
             reject *4:1-1024, reject 10.0.0.0/8:5-6"
        );
        assert_eq!(policy(&p.to_string()), p);
    }

    // ---- private ----

    /// Each `private` network: its first and last address are refused, the
    /// addresses just outside are accepted.
    #[test]
    fn private_ipv4_boundaries() {
        let p = policy(DEFAULT_EXIT_POLICY);
        let cases = [
            ("0.0.0.0", "0.255.255.255", None, Some("1.0.0.0")),
            (
                "10.0.0.0",
                "10.255.255.255",
                Some("9.255.255.255"),
                Some("11.0.0.0"),
            ),
            (
                "100.64.0.0",
                "100.127.255.255",
                Some("100.63.255.255"),
                Some("100.128.0.0"),
            ),
            (
                "127.0.0.0",
                "127.255.255.255",
                Some("126.255.255.255"),
                Some("128.0.0.0"),
            ),
            (
                "169.254.0.0",
                "169.254.255.255",
                Some("169.253.255.255"),
                Some("169.255.0.0"),
            ),
            (
                "172.16.0.0",
                "172.31.255.255",
                Some("172.15.255.255"),
                Some("172.32.0.0"),
            ),
            (
                "192.168.0.0",
                "192.168.255.255",
                Some("192.167.255.255"),
                Some("192.169.0.0"),
            ),
        ];
        for (first, last, before, after) in cases {
            assert!(!p.allows(ip(first), 80), "{first} is private");
            assert!(!p.allows(ip(last), 80), "{last} is private");
            for outside in [before, after].into_iter().flatten() {
                assert!(p.allows(ip(outside), 80), "{outside} is not private");
            }
        }
        assert_eq!(cases.len(), PRIVATE_V4.len());
    }

    #[test]
    fn private_ipv6_boundaries() {
        let p = policy(DEFAULT_EXIT_POLICY);
        for private in [
            "::",
            "::1",
            "fe80::",
            "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "fc00::",
            "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            assert!(!p.allows(ip(private), 80), "{private} is private");
        }
        for public in [
            "::2:0:0", // neither :: nor ::1, and not IPv4-compatible (> 32 bits)
            "fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "fec0::",
            "fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "fe00::",
            "2001:db8::1",
        ] {
            assert!(p.allows(ip(public), 80), "{public} is not private");
        }
    }

    // ---- IPv4-mapped and IPv4-compatible addresses ----

    #[test]
    fn mapped_addresses_match_as_ipv4() {
        let p = policy(DEFAULT_EXIT_POLICY);
        assert!(!p.allows(ip("::ffff:127.0.0.1"), 80));
        assert!(!p.allows(ip("::ffff:10.1.2.3"), 80));
        assert!(!p.allows(ip("::ffff:0.0.0.0"), 80));
        assert!(p.allows(ip("::ffff:93.184.216.34"), 80));

        let p = policy("reject 10.0.0.0/8:*, accept *:*");
        assert!(!p.allows(ip("::ffff:10.1.2.3"), 80));
        assert!(p.allows(ip("::ffff:11.1.2.3"), 80));

        // A mapped address is IPv4 for *4 and *6 too.
        assert!(accepts("*4", "::ffff:1.2.3.4", 80));
        assert!(!accepts("*6", "::ffff:1.2.3.4", 80));
        assert!(policy("reject6 *, accept *").allows(ip("::ffff:1.2.3.4"), 80));
    }

    #[test]
    fn compatible_addresses_match_as_ipv4() {
        let p = policy(DEFAULT_EXIT_POLICY);
        assert!(!p.allows(ip("::127.0.0.1"), 80));
        assert!(!p.allows(ip("::192.168.1.1"), 80));
        assert!(!p.allows(ip("::0.0.0.2"), 80));
        assert!(p.allows(ip("::93.184.216.34"), 80));
        assert!(accepts("93.184.216.34", "::93.184.216.34", 80));
    }

    #[test]
    fn unspecified_and_loopback_stay_ipv6() {
        // Ipv6Addr::to_ipv4 would make these 0.0.0.0 and 0.0.0.1.
        assert!(accepts("[::1]", "::1", 80));
        assert!(accepts("[::]", "::", 80));
        assert!(!accepts("0.0.0.0/8", "::1", 80));
        assert!(!accepts("0.0.0.0/8", "::", 80));
        assert!(!policy("reject [::1], accept *").allows(ip("::1"), 80));
    }

    // ---- the host's own addresses ----

    /// `private` stands for the exit host's addresses too, in every
    /// spelling the policy sees through for loopback.
    #[test]
    fn private_includes_the_hosts_own_addresses() {
        let host = HostAddrs::new([ip("192.0.2.77"), ip("2001:db8::77"), ip("192.0.2.77")]);
        assert_eq!(host.len(), 2);
        let p = policy(DEFAULT_EXIT_POLICY);
        for own in [
            "192.0.2.77",
            "::ffff:192.0.2.77",
            "::192.0.2.77",
            "2001:db8::77",
        ] {
            assert!(!p.allows_on(&host, ip(own), 443), "{own} is the host's");
            assert!(p.allows(ip(own), 443), "{own} without the host's addresses");
            assert_eq!(
                p.refusal_on(&host, ip(own), 443).as_deref(),
                Some("entry 1, \"reject private:*\"")
            );
        }
        for other in ["192.0.2.78", "2001:db8::78", "::ffff:192.0.2.78"] {
            assert!(p.allows_on(&host, ip(other), 443), "{other}");
        }
        // reject6 private: the host's IPv6 addresses only.
        let p6 = policy("reject6 private:*, accept *:*");
        assert!(!p6.allows_on(&host, ip("2001:db8::77"), 80));
        assert!(p6.allows_on(&host, ip("192.0.2.77"), 80));
        // An entry without `private` does not care about the host.
        let p = policy("reject 10.0.0.0/8:*, accept *:*");
        assert!(p.allows_on(&host, ip("192.0.2.77"), 80));
        assert!(!p.mentions_private());
        assert!(policy(DEFAULT_EXIT_POLICY).mentions_private());
        assert!(p6.mentions_private());
        // A host address given as IPv4-mapped is the IPv4 address.
        let mapped = HostAddrs::new([ip("::ffff:198.51.100.7")]);
        assert!(!policy(DEFAULT_EXIT_POLICY).allows_on(&mapped, ip("198.51.100.7"), 80));
    }

    // ---- matching ----

    #[test]
    fn first_match_wins() {
        let p = policy("accept 10.0.0.1:80, reject 10.0.0.0/8:*, accept *:*");
        assert!(p.allows(ip("10.0.0.1"), 80));
        assert!(!p.allows(ip("10.0.0.1"), 81));
        assert!(!p.allows(ip("10.0.0.2"), 80));
        assert!(p.allows(ip("11.0.0.1"), 80));

        let p = policy("reject 10.0.0.0/8:*, accept 10.0.0.1:80, accept *:*");
        assert!(!p.allows(ip("10.0.0.1"), 80));

        let p = policy("accept *:*, reject *:*");
        assert!(p.allows(ip("10.0.0.1"), 80));
        let p = policy("reject *:*, accept *:*");
        assert!(!p.allows(ip("1.2.3.4"), 80));
    }

    #[test]
    fn no_match_is_refused() {
        let p = policy("accept *:80");
        assert!(p.allows(ip("1.2.3.4"), 80));
        assert!(!p.allows(ip("1.2.3.4"), 443));
        let p = policy("accept *4:*");
        assert!(!p.allows(ip("2001:db8::1"), 80));
        let p = policy("reject private:*");
        assert!(!p.allows(ip("1.2.3.4"), 80));
    }

    // ---- errors ----

    #[test]
    fn error_message_names_entry() {
        let err = "accept *:80, acept *:80".parse::<Policy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"exit policy entry 2 "acept *:80": expected "accept" or "reject""#
        );
    }

    #[test]
    fn error_message_is_one_line() {
        let err = "accept *:80\n\tfoo".parse::<Policy>().unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
        let err = "accept [\n".parse::<Policy>().unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn empty_policy() {
        assert_eq!("".parse::<Policy>(), Err(PolicyError::Empty));
        assert_eq!("  \n\t ".parse::<Policy>(), Err(PolicyError::Empty));
        assert_eq!(PolicyError::Empty.to_string(), "exit policy is empty");
    }

    #[test]
    fn empty_entry() {
        for s in ["accept *,", ",accept *", "accept *, ,reject *", ","] {
            assert_eq!(problem(s), EntryProblem::EmptyEntry, "{s:?}");
        }
        let err = "accept *,,reject *".parse::<Policy>().unwrap_err();
        assert_eq!(err.to_string(), r#"exit policy entry 2 "": empty entry"#);
    }

    #[test]
    fn bad_keyword() {
        for s in [
            "acept *:80",
            "ACCEPT *:80",
            "allow *:80",
            "*:80",
            "accept4 *:80",
            "accept*:80",
            "accept6*:80",
        ] {
            assert_eq!(problem(s), EntryProblem::BadKeyword, "{s:?}");
        }
    }

    #[test]
    fn missing_target() {
        assert_eq!(problem("accept"), EntryProblem::MissingTarget("accept"));
        assert_eq!(problem("reject6  "), EntryProblem::MissingTarget("reject6"));
        assert_eq!(
            problem("accept *, reject"),
            EntryProblem::MissingTarget("reject")
        );
    }

    #[test]
    fn trailing_text() {
        assert_eq!(
            problem("accept *:80 443"),
            EntryProblem::TrailingText("443".into())
        );
        assert_eq!(
            problem("accept 1.2.3.4 :80"),
            EntryProblem::TrailingText(":80".into())
        );
        assert_eq!(
            problem("accept *:80 reject *:*"),
            EntryProblem::TrailingText("reject *:*".into())
        );
    }

    #[test]
    fn bad_address() {
        for addr in [
            "example.com",
            "1.2.3",
            "1.2.3.256",
            "010.0.0.1",
            "**",
            "*5",
            "Private",
            "",
            "1.2.3.4.5",
        ] {
            let s = format!("accept {addr}:80");
            assert_eq!(problem(&s), EntryProblem::BadAddress(addr.into()), "{s:?}");
        }
    }

    #[test]
    fn bare_ipv6() {
        assert_eq!(problem("accept ::1"), EntryProblem::BareIpv6("::1".into()));
        assert_eq!(
            problem("accept 2001:db8::/32:80"),
            EntryProblem::BareIpv6("2001:db8::".into())
        );
        assert_eq!(
            problem("accept ::ffff:1.2.3.4:80"),
            EntryProblem::BareIpv6("::ffff:1.2.3.4".into())
        );
    }

    #[test]
    fn bad_ipv6() {
        assert_eq!(problem("accept [::1"), EntryProblem::UnclosedBracket);
        assert_eq!(problem("accept [::1:80"), EntryProblem::UnclosedBracket);
        for inside in ["", "1.2.3.4", "::g", "fe80::1%eth0", "[::1"] {
            let s = format!("accept [{inside}]:80");
            assert_eq!(problem(&s), EntryProblem::BadIpv6(inside.into()), "{s:?}");
        }
        assert_eq!(
            problem("accept [::1/64]"),
            EntryProblem::BadIpv6("::1/64".into())
        );
    }

    #[test]
    fn after_bracket() {
        assert_eq!(
            problem("accept [::1]80"),
            EntryProblem::AfterBracket("80".into())
        );
        assert_eq!(
            problem("accept [::1]]"),
            EntryProblem::AfterBracket("]".into())
        );
    }

    #[test]
    fn mask_not_allowed() {
        assert_eq!(problem("accept */8:80"), EntryProblem::MaskNotAllowed("*"));
        assert_eq!(problem("accept *4/0"), EntryProblem::MaskNotAllowed("*4"));
        assert_eq!(problem("accept *6/0"), EntryProblem::MaskNotAllowed("*6"));
        assert_eq!(
            problem("reject private/8:*"),
            EntryProblem::MaskNotAllowed("private")
        );
    }

    #[test]
    fn bad_mask() {
        let bad4 = |m: &str| EntryProblem::BadMask {
            mask: m.into(),
            max: 32,
        };
        for m in [
            "33",
            "",
            "+8",
            "-1",
            "8a",
            "256",
            "99999999999999999999",
            "1.2.3",
        ] {
            assert_eq!(problem(&format!("accept 1.2.3.4/{m}:80")), bad4(m), "{m:?}");
        }
        let bad6 = |m: &str| EntryProblem::BadMask {
            mask: m.into(),
            max: 128,
        };
        for m in ["129", "", "+64", "255.0.0.0", "x"] {
            assert_eq!(
                problem(&format!("accept [2001:db8::]/{m}:80")),
                bad6(m),
                "{m:?}"
            );
        }
        assert_eq!(problem("accept [2001:db8::]/"), bad6(""));
    }

    #[test]
    fn non_contiguous_netmask() {
        for m in ["255.0.255.0", "0.255.255.255", "255.255.255.254.0"] {
            let s = format!("accept 10.0.0.0/{m}");
            match m.parse::<Ipv4Addr>() {
                Ok(mask) => assert_eq!(problem(&s), EntryProblem::NonContiguousMask(mask)),
                Err(_) => assert!(matches!(problem(&s), EntryProblem::BadMask { .. })),
            }
        }
        assert_eq!(
            problem("accept 10.0.0.0/255.255.0.1").to_string(),
            "netmask 255.255.0.1 is not contiguous"
        );
    }

    #[test]
    fn ipv6_entry_that_only_covers_ipv4() {
        for target in [
            "[::ffff:10.0.0.0]/104",
            "[::ffff:127.0.0.1]",
            "[::ffff:0:0]/96",
            "[::1.2.3.4]",
            "[::0.0.0.2]/127",
        ] {
            let s = format!("reject {target}:*");
            assert!(matches!(problem(&s), EntryProblem::Ipv4InIpv6(_)), "{s:?}");
        }
        // These still contain addresses that are matched as IPv6.
        for target in [
            "[::]/96",
            "[::]/127",
            "[::]/95",
            "[::ffff:0:0]/95",
            "[::]/0",
        ] {
            policy(&format!("reject {target}:*"));
        }
    }

    #[test]
    fn ipv4_with_ipv6_only() {
        assert_eq!(
            problem("accept6 1.2.3.4:80"),
            EntryProblem::Ipv4WithIpv6Only {
                keyword: "accept6",
                addr: "1.2.3.4".into()
            }
        );
        assert_eq!(
            problem("reject6 10.0.0.0/8"),
            EntryProblem::Ipv4WithIpv6Only {
                keyword: "reject6",
                addr: "10.0.0.0".into()
            }
        );
        assert_eq!(
            problem("reject6 *4:*"),
            EntryProblem::Ipv4WithIpv6Only {
                keyword: "reject6",
                addr: "*4".into()
            }
        );
    }

    #[test]
    fn bad_port() {
        for ports in [
            "0",
            "65536",
            "",
            "http",
            "+80",
            "-80",
            "80-",
            "-",
            "0-80",
            "1-65536",
            "80:81",
            "*-80",
            "80-*",
            "1--2",
            "99999999999999999999",
        ] {
            let s = format!("accept 1.2.3.4:{ports}");
            assert_eq!(problem(&s), EntryProblem::BadPort(ports.into()), "{s:?}");
        }
        assert_eq!(problem("accept [::1]:0"), EntryProblem::BadPort("0".into()));
        assert_eq!(
            problem("accept [::1]/64:"),
            EntryProblem::BadPort("".into())
        );
    }

    #[test]
    fn reversed_range() {
        assert_eq!(
            problem("accept *:90-80"),
            EntryProblem::ReversedRange { lo: 90, hi: 80 }
        );
        assert_eq!(
            problem("accept *:90-80").to_string(),
            "port range 90-80 is reversed"
        );
    }

    #[test]
    fn error_index_counts_from_one() {
        match "accept *:*, reject *:*, accept *:0".parse::<Policy>() {
            Err(PolicyError::Entry { index, entry, .. }) => {
                assert_eq!(index, 3);
                assert_eq!(entry, "accept *:0");
            }
            other => panic!("expected an entry error, got {other:?}"),
        }
    }

    #[test]
    fn every_problem_message_is_nonempty() {
        // Touch each variant's Display so none is left with a broken format.
        for s in [
            ",accept *",
            "acept *",
            "accept",
            "accept * x",
            "accept x",
            "accept ::1",
            "accept [::1",
            "accept [x]",
            "accept [::1]x",
            "accept */8",
            "accept 1.2.3.4/33",
            "accept 1.2.3.4/255.0.255.0",
            "accept [::ffff:1.2.3.4]",
            "accept6 1.2.3.4",
            "accept *:0",
            "accept *:2-1",
        ] {
            let err = s.parse::<Policy>().unwrap_err().to_string();
            assert!(err.starts_with("exit policy entry 1 "), "{err}");
            assert!(!err.ends_with(": "), "{err}");
        }
    }

    // ---- properties ----

    fn arb_ipv4() -> impl Strategy<Value = Ipv4Addr> {
        prop_oneof![
            any::<u32>().prop_map(Ipv4Addr::from),
            prop::sample::select(PRIVATE_V4.map(|(a, _)| a).to_vec()),
        ]
    }

    fn arb_ipv6() -> impl Strategy<Value = Ipv6Addr> {
        prop_oneof![
            any::<u128>().prop_map(Ipv6Addr::from),
            // Near the normalised ranges, to reach the ::, ::1, mapped and
            // compatible special cases.
            any::<u32>().prop_map(|v| Ipv6Addr::from(u128::from(v))),
            arb_ipv4().prop_map(|v4| v4.to_ipv6_mapped()),
            prop::sample::select(PRIVATE_V6.map(|(a, _)| a).to_vec()),
        ]
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            arb_ipv4().prop_map(IpAddr::V4),
            arb_ipv6().prop_map(IpAddr::V6)
        ]
    }

    fn arb_pattern() -> impl Strategy<Value = Pattern> {
        prop_oneof![
            Just(Pattern::Any),
            Just(Pattern::AnyV4),
            Just(Pattern::AnyV6),
            Just(Pattern::Private),
            Just(Pattern::PrivateV6),
            (arb_ipv4(), 0..=32u8).prop_map(|(a, b)| Pattern::V4(Net4::new(a, b))),
            (arb_ipv6(), 0..=128u8)
                .prop_map(|(a, b)| Net6::new(a, b))
                .prop_filter("matches IPv6 addresses", |net| !net.only_v4_inside())
                .prop_map(Pattern::V6),
        ]
    }

    fn arb_ports() -> impl Strategy<Value = Ports> {
        prop_oneof![
            Just(Ports::ALL),
            (1..=65535u16).prop_map(|p| Ports { lo: p, hi: p }),
            (1..=65535u16, 1..=65535u16).prop_map(|(a, b)| Ports {
                lo: a.min(b),
                hi: a.max(b)
            }),
        ]
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            prop_oneof![Just(Action::Accept), Just(Action::Reject)],
            arb_pattern(),
            arb_ports(),
        )
            .prop_map(|(action, pattern, ports)| Rule {
                action,
                pattern,
                ports,
            })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        prop::collection::vec(arb_rule(), 1..8).prop_map(|rules| Policy { rules })
    }

    /// Strings made of policy tokens, to reach deep into the parser more
    /// often than random text does.
    fn policy_soup() -> impl Strategy<Value = String> {
        let tokens = vec![
            "accept",
            "reject",
            "accept6",
            "reject6",
            " ",
            ",",
            "*",
            "*4",
            "*6",
            "private",
            ":",
            "/",
            "-",
            "[",
            "]",
            "::",
            "::1",
            "::ffff:",
            "1.2.3.4",
            "255.255.0.0",
            "0",
            "8",
            "32",
            "128",
            "65535",
            "65536",
            "80",
            ".",
            "\t",
            "\n",
            "é",
            "\0",
        ];
        prop::collection::vec(prop::sample::select(tokens), 0..24).prop_map(|t| t.concat())
    }

    proptest! {
        #[test]
        fn display_parses_back(p in arb_policy()) {
            let text = p.to_string();
            let back: Policy = text.parse().map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            prop_assert_eq!(&back, &p);
            prop_assert_eq!(back.to_string(), text);
        }

        #[test]
        fn parser_never_panics_on_any_string(s in any::<String>()) {
            let _ = s.parse::<Policy>();
        }

        #[test]
        fn parser_never_panics_on_token_soup(s in policy_soup()) {
            // Whatever parses must print to something that parses the same.
            if let Ok(p) = s.parse::<Policy>() {
                prop_assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
            }
        }

        #[test]
        fn mapped_address_is_judged_as_ipv4(p in arb_policy(), v4 in arb_ipv4(), port in any::<u16>()) {
            prop_assert_eq!(
                p.allows(IpAddr::V6(v4.to_ipv6_mapped()), port),
                p.allows(IpAddr::V4(v4), port)
            );
        }

        #[test]
        fn reject_then_accept_is_the_complement(r in arb_rule(), addr in arb_ip(), port in 1..=65535u16) {
            // "reject X, accept *" refuses exactly what "accept X" accepts.
            let accept = Policy { rules: vec![Rule { action: Action::Accept, ..r.clone() }] };
            let reject = Policy { rules: vec![
                Rule { action: Action::Reject, ..r },
                Rule { action: Action::Accept, pattern: Pattern::Any, ports: Ports::ALL },
            ] };
            prop_assert_eq!(accept.allows(addr, port), !reject.allows(addr, port));
        }

        #[test]
        fn private_is_the_listed_networks(addr in arb_ip()) {
            let listed = match normalise(addr) {
                IpAddr::V4(a) => PRIVATE_V4.iter().any(|&(n, b)| {
                    policy(&format!("accept {n}/{b}")).allows(IpAddr::V4(a), 80)
                }),
                IpAddr::V6(a) => PRIVATE_V6.iter().any(|&(n, b)| {
                    policy(&format!("accept [{n}]/{b}")).allows(IpAddr::V6(a), 80)
                }),
            };
            prop_assert_eq!(policy("accept private").allows(addr, 80), listed);
        }

        #[test]
        fn private_on_a_host_is_the_listed_networks_and_its_addresses(
            own in proptest::collection::vec(arb_ip(), 0..4),
            addr in arb_ip(),
            port in 1..=65535u16,
        ) {
            let host = HostAddrs::new(own.iter().copied());
            let p = policy(DEFAULT_EXIT_POLICY);
            let listed = !policy("reject private, accept *").allows(addr, port);
            let is_own = own.iter().any(|o| normalise(*o) == normalise(addr));
            prop_assert_eq!(p.allows_on(&host, addr, port), !(listed || is_own));
        }
    }
}
