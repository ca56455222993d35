//! SOCKS front end: the server side of the SOCKS4, SOCKS4a and SOCKS5
//! handshakes, with no sockets and no threads.
//!
//! Read first: docs/protocol.md §11 (what halfpipe accepts and how it
//! answers), §5 (what a BEGIN can carry as ADDRESS), RFC 1928 (SOCKS5),
//! RFC 1929 (username/password), the SOCKS4 and SOCKS4a memos, and Tor's
//! socks-extensions.txt §2 (RESOLVE 0xF0, RESOLVE_PTR 0xF1).
//!
//! # Use
//!
//! One [`Handshake`] per accepted connection. The connection thread keeps a
//! buffer of bytes read and not yet consumed, and after every read calls
//! [`Handshake::feed`] with the whole buffer:
//!
//! ```text
//! let mut hs = Handshake::new();
//! let mut buf = Vec::new();
//! let request = loop {
//!     read more bytes into buf (EOF: close);
//!     match hs.feed(&buf) {
//!         Ok(step) => {
//!             buf.drain(..step.consumed);
//!             write step.reply (may be empty);
//!             if let Some(request) = step.request { break request; }
//!         }
//!         Err(err) => { log err (one line); write err.reply; close; }
//!     }
//! };
//! // buf now holds optimistic data: the first bytes of the stream.
//! ```
//!
//! `feed` handles every complete message in the buffer at once (a client may
//! send its greeting, credentials and request without waiting for our
//! answers), so `Ok` without a request always means "read more". It never
//! consumes a byte past the request: what follows belongs to the stream.
//!
//! Once the request is known the daemon opens the stream and, after
//! CONNECTED or END (R11.5), writes [`connect_reply`] (with
//! [`reply_for_end_reason`] for an END) or, for [`Command::Resolve`],
//! [`resolve_reply`].
//!
//! Every [`SocksError`] ends the SOCKS connection and nothing else: its
//! `reply` is written, then the connection is closed.
//!
//! # Deliberate departures and choices
//!
//! - RESOLVE may carry port 0: tor-resolve sends 0, and the port of a
//!   lookup means nothing. Port 0 is an error for CONNECT only.
//! - RFC 1929 asks for 1-255 byte usernames and passwords; like Tor we also
//!   accept empty ones, because some clients send them.
//! - RFC 1928 §4 RSV is ignored rather than checked.
//! - SOCKS4 DSTIP 0.0.0.0 is refused, as Tor does: it is neither an address
//!   to connect to nor the SOCKS4a marker 0.0.0.x (x != 0).
//! - A RESOLVE whose target is already an IP address (ATYP 1 or 4, SOCKS4
//!   without 4a, or a name that is an IP literal) is returned as a
//!   `Resolve` of a [`Target::Addr`]; the daemon can answer it at once.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest SOCKS4 USERID or SOCKS4a hostname we accept. SOCKS5 fields
/// cannot be longer: their length prefix is one byte.
const MAX_FIELD: usize = 255;

const SOCKS4: u8 = 4;
const SOCKS5: u8 = 5;

// RFC 1928 §3 methods, RFC 1929 §2 sub-negotiation.
const METHOD_NO_AUTH: u8 = 0x00;
const METHOD_USERPASS: u8 = 0x02;
const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
const USERPASS_VERSION: u8 = 0x01;
const USERPASS_OK: u8 = 0x00;
const USERPASS_FAILED: u8 = 0x01;

// RFC 1928 §4 commands, SOCKS4 CD, Tor socks-extensions.txt §2.
const CMD_CONNECT: u8 = 0x01;
const CMD_BIND: u8 = 0x02;
const CMD_UDP_ASSOCIATE: u8 = 0x03;
const CMD_RESOLVE: u8 = 0xF0;
const CMD_RESOLVE_PTR: u8 = 0xF1;

// RFC 1928 §5 address types.
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAINNAME: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

// SOCKS4 memo: reply CD values.
const SOCKS4_GRANTED: u8 = 0x5A;
const SOCKS4_REJECTED: u8 = 0x5B;

/// HTTP request methods with their trailing space: a client that starts
/// with one of these is an HTTP client pointed at a SOCKS port.
const HTTP_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Which SOCKS the client spoke; SOCKS4a is `V4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocksVersion {
    V4,
    V5,
}

impl fmt::Display for SocksVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocksVersion::V4 => f.write_str("SOCKS4"),
            SocksVersion::V5 => f.write_str("SOCKS5"),
        }
    }
}

/// Where the client wants to go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An IP address, given as such or as a literal in place of a hostname.
    Addr(SocketAddr),
    /// A hostname valid for BEGIN (§5), resolved by the exit.
    Name { host: String, port: u16 },
}

impl Target {
    #[must_use]
    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(addr) => addr.port(),
            Target::Name { port, .. } => *port,
        }
    }
}

/// Prints `ADDRESS ":" PORT` as BEGIN carries it (§5): IPv6 addresses come
/// out in brackets.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(addr) => write!(f, "{addr}"),
            Target::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// RFC 1928 §4 CONNECT, SOCKS4 CD 1: open a stream (BEGIN).
    Connect,
    /// Tor's RESOLVE 0xF0 (socks-extensions.txt §2): look the name up
    /// (RELAY RESOLVE) and answer with [`resolve_reply`]. The port is
    /// meaningless and may be 0.
    Resolve,
}

/// A complete, valid SOCKS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub version: SocksVersion,
    pub command: Command,
    pub target: Target,
    /// Stream isolation key (R11.4): streams with different keys never share a
    /// circuit. With SOCKS5 username/password it is `ULEN UNAME PLEN PASSWD` as
    /// in RFC 1929 §2 (length-prefixed, so unambiguous, and present even if
    /// both are empty); a non-empty SOCKS4 USERID is encoded the same way, as a
    /// username with an empty password, so a SOCKS4 client isolates like a
    /// SOCKS5 client with that username. `None` without credentials.
    pub isolation: Option<Vec<u8>>,
}

/// The result of one [`Handshake::feed`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input that were used; drop them from the buffer.
    pub consumed: usize,
    /// Bytes to write to the client now; may be empty.
    pub reply: Vec<u8>,
    /// The request, once the handshake is complete. Input after it was not
    /// consumed and is the start of the stream.
    pub request: Option<Request>,
}

/// SOCKS5 reply codes (RFC 1928 §6) that halfpipe sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    NotAllowed = 0x02,
    NetworkUnreachable = 0x03,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    TtlExpired = 0x06,
    CommandNotSupported = 0x07,
    AddressTypeNotSupported = 0x08,
}

impl Reply {
    /// The REP byte.
    #[must_use]
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A failed handshake: log it, write `reply` (possibly empty), close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct SocksError {
    pub kind: ErrorKind,
    /// Bytes to write before closing: any answers to earlier messages of
    /// the same `feed` call, then the failure reply, if the protocol has one.
    pub reply: Vec<u8>,
}

/// What was wrong, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    #[error("not a SOCKS client: first byte {0:#04x} is neither 4 nor 5")]
    NotSocks(u8),
    #[error("HTTP request on the SOCKS port: this is an HTTP client pointed at a SOCKS port")]
    HttpRequest,
    #[error("SOCKS5 client offers neither no-auth (0x00) nor username/password (0x02)")]
    NoAcceptableMethod,
    #[error("SOCKS5 username/password message has version {0:#04x}, not 1")]
    BadAuthVersion(u8),
    #[error("SOCKS5 request has version {0:#04x}, not 5")]
    BadRequestVersion(u8),
    #[error("{version} command {code:#04x} ({}) is not supported", command_name(*code))]
    UnsupportedCommand { version: SocksVersion, code: u8 },
    #[error("SOCKS5 address type {0:#04x} is not supported")]
    UnsupportedAddressType(u8),
    #[error("invalid hostname \"{}\"", .0.escape_ascii())]
    BadHostname(Vec<u8>),
    #[error("SOCKS4 USERID longer than 255 bytes")]
    UserIdTooLong,
    #[error("SOCKS4a hostname longer than 255 bytes")]
    HostnameTooLong,
    #[error("CONNECT to port 0")]
    ZeroPort,
    #[error("SOCKS4 request for 0.0.0.0")]
    ZeroAddress,
    #[error("SOCKS handshake fed after it had already finished (a bug in the caller)")]
    AlreadyFinished,
}

/// For error messages only.
fn command_name(code: u8) -> &'static str {
    match code {
        CMD_CONNECT => "CONNECT",
        CMD_BIND => "BIND",
        CMD_UDP_ASSOCIATE => "UDP ASSOCIATE",
        CMD_RESOLVE => "RESOLVE",
        CMD_RESOLVE_PTR => "RESOLVE_PTR",
        _ => "unknown",
    }
}

/// The server side of one SOCKS handshake.
#[derive(Debug)]
pub struct Handshake {
    state: State,
}

/// Which message we wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Nothing read yet: the first byte says SOCKS5 (a method-selection
    /// message, RFC 1928 §3) or SOCKS4 (the whole request).
    Start,
    /// RFC 1929 §2: we chose username/password; wait for the credentials.
    Socks5Auth,
    /// RFC 1928 §4: method negotiation is over; wait for the request.
    Socks5Request { isolation: Option<Vec<u8>> },
    /// The request was returned; what follows is stream data, not ours.
    Done,
    /// An error was returned; the caller closes the connection.
    Failed,
}

/// Why a message parser stopped short of a complete message.
enum Stop {
    /// The message is not all there yet; nothing is consumed.
    NeedMore,
    /// The message is invalid.
    Fail(SocksError),
}

/// A complete, valid message.
struct Advance {
    /// Its length in bytes.
    len: usize,
    /// What to answer.
    reply: Vec<u8>,
    next: Next,
}

enum Next {
    Wait(State),
    Finished(Request),
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    #[must_use]
    pub fn new() -> Self {
        Handshake {
            state: State::Start,
        }
    }

    /// Feed all bytes received and not yet consumed. Handles every
    /// complete message in `input`; see the module documentation.
    ///
    /// # Errors
    ///
    /// A [`SocksError`] when the client is not speaking a SOCKS we accept,
    /// or asks for something we refuse; also when called again after a
    /// request or an error was returned. Write its `reply`, then close.
    pub fn feed(&mut self, input: &[u8]) -> Result<Step, SocksError> {
        let mut step = Step::default();
        loop {
            // Parsers never report more than they were given, so this
            // stays in bounds.
            let rest = &input[step.consumed..];
            let parsed = match &self.state {
                // First byte picks the protocol.
                State::Start => start(rest),
                // RFC 1929 §2 credentials.
                State::Socks5Auth => socks5_auth(rest),
                // RFC 1928 §4 request.
                State::Socks5Request { isolation } => socks5_request(rest, isolation.as_deref()),
                // The caller should have stopped feeding.
                State::Done | State::Failed => Err(fail(ErrorKind::AlreadyFinished, Vec::new())),
            };
            match parsed {
                Ok(Advance { len, reply, next }) => {
                    step.consumed += len;
                    step.reply.extend(reply);
                    match next {
                        Next::Wait(state) => self.state = state,
                        Next::Finished(request) => {
                            self.state = State::Done;
                            step.request = Some(request);
                            return Ok(step);
                        }
                    }
                }
                Err(Stop::NeedMore) => return Ok(step),
                Err(Stop::Fail(mut err)) => {
                    self.state = State::Failed;
                    // Answers to earlier messages in this call are not
                    // written yet; they must go out first.
                    step.reply.append(&mut err.reply);
                    err.reply = step.reply;
                    return Err(err);
                }
            }
        }
    }
}

/// The first message: a SOCKS5 greeting or a complete SOCKS4 request.
fn start(buf: &[u8]) -> Result<Advance, Stop> {
    match buf.first() {
        None => Err(Stop::NeedMore),
        Some(&SOCKS5) => socks5_greeting(buf),
        Some(&SOCKS4) => socks4_request(buf),
        // Not SOCKS: no reply bytes, just say what it looks like.
        Some(&other) => match looks_like_http(buf) {
            None => Err(Stop::NeedMore),
            Some(true) => Err(fail(ErrorKind::HttpRequest, Vec::new())),
            Some(false) => Err(fail(ErrorKind::NotSocks(other), Vec::new())),
        },
    }
}

/// Whether `buf` starts with an HTTP method and a space; `None` while it is
/// still a prefix of one (at most 8 bytes to wait for).
fn looks_like_http(buf: &[u8]) -> Option<bool> {
    if HTTP_METHODS.iter().any(|m| buf.starts_with(m)) {
        Some(true)
    } else if HTTP_METHODS.iter().any(|m| m.starts_with(buf)) {
        None
    } else {
        Some(false)
    }
}

/// RFC 1928 §3: `VER NMETHODS METHODS`.
fn socks5_greeting(buf: &[u8]) -> Result<Advance, Stop> {
    let mut r = Reader::new(buf);
    r.u8()?; // VER, 5: how we got here
    let n = r.u8()?;
    let methods = r.take(usize::from(n))?;
    // R11.2: both methods are offered; username/password is preferred when
    // the client offers it, because the credentials are the stream
    // isolation key (R11.4).
    let (method, next) = if methods.contains(&METHOD_USERPASS) {
        (METHOD_USERPASS, State::Socks5Auth)
    } else if methods.contains(&METHOD_NO_AUTH) {
        (METHOD_NO_AUTH, State::Socks5Request { isolation: None })
    } else {
        // RFC 1928 §3: X'FF', and the client must close.
        return Err(fail(
            ErrorKind::NoAcceptableMethod,
            vec![SOCKS5, METHOD_NONE_ACCEPTABLE],
        ));
    };
    Ok(Advance {
        len: r.pos,
        reply: vec![SOCKS5, method],
        next: Next::Wait(next),
    })
}

/// RFC 1929 §2: `VER ULEN UNAME PLEN PASSWD`; any credentials are accepted
/// (R11.2).
fn socks5_auth(buf: &[u8]) -> Result<Advance, Stop> {
    let mut r = Reader::new(buf);
    let version = r.u8()?;
    if version != USERPASS_VERSION {
        // RFC 1929 §2: a non-zero STATUS, then close.
        return Err(fail(
            ErrorKind::BadAuthVersion(version),
            vec![USERPASS_VERSION, USERPASS_FAILED],
        ));
    }
    let ulen = r.u8()?;
    let user = r.take(usize::from(ulen))?;
    let plen = r.u8()?;
    let pass = r.take(usize::from(plen))?;
    Ok(Advance {
        len: r.pos,
        reply: vec![USERPASS_VERSION, USERPASS_OK],
        next: Next::Wait(State::Socks5Request {
            isolation: Some(isolation_key(user, pass)),
        }),
    })
}

/// RFC 1928 §4: `VER CMD RSV ATYP DST.ADDR DST.PORT`. Checks each field as
/// soon as it arrives, so a bad one is answered without waiting for more.
fn socks5_request(buf: &[u8], isolation: Option<&[u8]>) -> Result<Advance, Stop> {
    let mut r = Reader::new(buf);
    let version = r.u8()?;
    if version != SOCKS5 {
        return Err(fail5(
            ErrorKind::BadRequestVersion(version),
            Reply::GeneralFailure,
        ));
    }
    let code = r.u8()?;
    let command = match code {
        CMD_CONNECT => Command::Connect,
        CMD_RESOLVE => Command::Resolve,
        // R11.13: BIND and UDP ASSOCIATE get 0x07; so do RESOLVE_PTR and
        // anything unknown (RFC 1928 §6).
        _ => {
            return Err(fail5(
                ErrorKind::UnsupportedCommand {
                    version: SocksVersion::V5,
                    code,
                },
                Reply::CommandNotSupported,
            ))
        }
    };
    r.u8()?; // RSV: no meaning in RFC 1928 §4; ignored.
    let atyp = r.u8()?;
    // R11.1: IPv4, DOMAINNAME and IPv6 (RFC 1928 §5).
    let host = match atyp {
        ATYP_IPV4 => Host::Ip(Ipv4Addr::from(r.array::<4>()?).into()),
        ATYP_IPV6 => Host::Ip(Ipv6Addr::from(r.array::<16>()?).into()),
        ATYP_DOMAINNAME => {
            let len = r.u8()?;
            let raw = r.take(usize::from(len))?;
            parse_host(raw).map_err(|kind| fail5(kind, Reply::GeneralFailure))?
        }
        _ => {
            return Err(fail5(
                ErrorKind::UnsupportedAddressType(atyp),
                Reply::AddressTypeNotSupported,
            ))
        }
    };
    let port = r.u16()?;
    if port == 0 && command == Command::Connect {
        return Err(fail5(ErrorKind::ZeroPort, Reply::GeneralFailure));
    }
    Ok(Advance {
        len: r.pos,
        // R11.5: the reply waits for CONNECTED or END.
        reply: Vec::new(),
        next: Next::Finished(Request {
            version: SocksVersion::V5,
            command,
            target: host.with_port(port),
            isolation: isolation.map(<[u8]>::to_vec),
        }),
    })
}

/// SOCKS4: `VN CD DSTPORT DSTIP USERID NUL`; SOCKS4a: DSTIP 0.0.0.x with
/// x != 0 and `HOSTNAME NUL` after the USERID (R11.3: both accepted).
fn socks4_request(buf: &[u8]) -> Result<Advance, Stop> {
    let mut r = Reader::new(buf);
    r.u8()?; // VN, 4: how we got here
    let code = r.u8()?;
    let command = match code {
        CMD_CONNECT => Command::Connect,
        // Tor socks-extensions.txt §2: RESOLVE in SOCKS4 and 4a.
        CMD_RESOLVE => Command::Resolve,
        // R11.14: 0x5B for any failure, BIND included.
        _ => {
            return Err(fail4(ErrorKind::UnsupportedCommand {
                version: SocksVersion::V4,
                code,
            }))
        }
    };
    let port = r.u16()?;
    if port == 0 && command == Command::Connect {
        return Err(fail4(ErrorKind::ZeroPort));
    }
    let ip = Ipv4Addr::from(r.array::<4>()?);
    if ip.is_unspecified() {
        return Err(fail4(ErrorKind::ZeroAddress));
    }
    let userid = r.nul_terminated(MAX_FIELD, fail4(ErrorKind::UserIdTooLong))?;
    let host = match ip.octets() {
        // SOCKS4a: 0.0.0.x (0.0.0.0 was refused above); the hostname
        // follows the USERID.
        [0, 0, 0, _] => {
            let raw = r.nul_terminated(MAX_FIELD, fail4(ErrorKind::HostnameTooLong))?;
            parse_host(raw).map_err(fail4)?
        }
        _ => Host::Ip(ip.into()),
    };
    Ok(Advance {
        len: r.pos,
        reply: Vec::new(),
        next: Next::Finished(Request {
            version: SocksVersion::V4,
            command,
            target: host.with_port(port),
            isolation: (!userid.is_empty()).then(|| isolation_key(userid, b"")),
        }),
    })
}

/// `ULEN UNAME PLEN PASSWD` (RFC 1929 §2 without VER): length-prefixed, so
/// two different pairs never give the same key (R11.4).
fn isolation_key(user: &[u8], pass: &[u8]) -> Vec<u8> {
    // Callers hold both to 255 bytes (one-byte lengths in RFC 1929,
    // MAX_FIELD for SOCKS4), so the casts are exact.
    debug_assert!(user.len() <= MAX_FIELD && pass.len() <= MAX_FIELD);
    let mut key = Vec::with_capacity(2 + user.len() + pass.len());
    key.push(user.len() as u8);
    key.extend_from_slice(user);
    key.push(pass.len() as u8);
    key.extend_from_slice(pass);
    key
}

/// A target before its port is read.
enum Host {
    Ip(IpAddr),
    Name(String),
}

impl Host {
    fn with_port(self, port: u16) -> Target {
        match self {
            Host::Ip(ip) => Target::Addr(SocketAddr::new(ip, port)),
            Host::Name(host) => Target::Name { host, port },
        }
    }
}

/// A hostname from the client, checked as §5 checks BEGIN's ADDRESS. A
/// dotted IPv4 or an IPv6 literal (bracketed or not) becomes an address,
/// so a `Target::Name` is always a real name and an IPv6 address never
/// reaches BEGIN without its brackets.
fn parse_host(raw: &[u8]) -> Result<Host, ErrorKind> {
    if let Some(ip) = ip_literal(raw) {
        return Ok(Host::Ip(ip));
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if raw.is_empty() || raw.len() > MAX_FIELD || !raw.iter().all(allowed) {
        return Err(ErrorKind::BadHostname(raw.to_vec()));
    }
    // All ASCII, checked just above.
    Ok(Host::Name(raw.iter().map(|&b| char::from(b)).collect()))
}

fn ip_literal(raw: &[u8]) -> Option<IpAddr> {
    // Not UTF-8 means not a literal; parse_host then rejects it as a name.
    let text = std::str::from_utf8(raw).ok()?;
    match text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        Some(inner) => inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        None => text.parse::<IpAddr>().ok(),
    }
}

fn fail(kind: ErrorKind, reply: Vec<u8>) -> Stop {
    Stop::Fail(SocksError { kind, reply })
}

fn fail5(kind: ErrorKind, reply: Reply) -> Stop {
    fail(kind, connect_reply(SocksVersion::V5, reply, None))
}

fn fail4(kind: ErrorKind) -> Stop {
    fail(
        kind,
        connect_reply(SocksVersion::V4, Reply::GeneralFailure, None),
    )
}

/// A cursor over one message; running out of bytes is `Stop::NeedMore`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let bytes = rest.get(..n).ok_or(Stop::NeedMore)?;
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Stop> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        let [b] = self.array()?;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A NUL-terminated field of at most `max` bytes (NUL not counted);
    /// `too_long` as soon as `max + 1` bytes have come without a NUL.
    fn nul_terminated(&mut self, max: usize, too_long: Stop) -> Result<&'a [u8], Stop> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        match rest.iter().take(max + 1).position(|&b| b == 0) {
            Some(len) => {
                self.pos += len + 1;
                Ok(&rest[..len])
            }
            None if rest.len() > max => Err(too_long),
            None => Err(Stop::NeedMore),
        }
    }
}

/// The SOCKS5 reply for an END received before CONNECTED: the table of
/// §11, R11.7 to R11.12.
#[must_use]
pub fn reply_for_end_reason(reason: u8) -> Reply {
    // END reasons, §8 and tor-spec 6.3.
    const RESOLVEFAILED: u8 = 2;
    const CONNECTREFUSED: u8 = 3;
    const EXITPOLICY: u8 = 4;
    const TIMEOUT: u8 = 7;
    const NOROUTE: u8 = 8;
    match reason {
        EXITPOLICY => Reply::NotAllowed,            // R11.7
        NOROUTE => Reply::NetworkUnreachable,       // R11.8
        RESOLVEFAILED => Reply::HostUnreachable,    // R11.9
        CONNECTREFUSED => Reply::ConnectionRefused, // R11.10
        TIMEOUT => Reply::TtlExpired,               // R11.11
        _ => Reply::GeneralFailure,                 // R11.12
    }
}

/// The answer to a CONNECT (or a failure reply for any request).
///
/// SOCKS5 (RFC 1928 §6): `05 REP 00 ATYP BND.ADDR BND.PORT`, with
/// 0.0.0.0:0 when `bound` is `None`. SOCKS4: `00 CD DSTPORT DSTIP` with CD
/// 0x5A for `Succeeded` (R11.5) and 0x5B for anything else (R11.14); an
/// IPv6 `bound` cannot be carried and is sent as 0.0.0.0:0.
#[must_use]
pub fn connect_reply(version: SocksVersion, reply: Reply, bound: Option<SocketAddr>) -> Vec<u8> {
    match version {
        SocksVersion::V5 => socks5_reply(reply, bound),
        SocksVersion::V4 => socks4_reply(reply == Reply::Succeeded, bound),
    }
}

/// The answer to a RESOLVE (Tor socks-extensions.txt §2): on success the
/// address is in BND.ADDR (DSTIP for SOCKS4), port 0.
///
/// SOCKS4 cannot carry an IPv6 answer, so that is a failure (0x5B), as in
/// Tor. `Err(Reply::Succeeded)` is a caller mistake and is sent as
/// `GeneralFailure`, never as a success without an address.
#[must_use]
pub fn resolve_reply(version: SocksVersion, answer: Result<IpAddr, Reply>) -> Vec<u8> {
    match (version, answer) {
        (_, Err(Reply::Succeeded)) => connect_reply(version, Reply::GeneralFailure, None),
        (_, Err(reply)) => connect_reply(version, reply, None),
        (SocksVersion::V5, Ok(ip)) => socks5_reply(Reply::Succeeded, Some(SocketAddr::new(ip, 0))),
        (SocksVersion::V4, Ok(IpAddr::V4(ip))) => {
            socks4_reply(true, Some(SocketAddr::new(ip.into(), 0)))
        }
        (SocksVersion::V4, Ok(IpAddr::V6(_))) => socks4_reply(false, None),
    }
}

fn socks5_reply(reply: Reply, bound: Option<SocketAddr>) -> Vec<u8> {
    let bound = bound.unwrap_or_else(|| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
    let mut out = vec![SOCKS5, reply.code(), 0x00];
    match bound.ip() {
        IpAddr::V4(ip) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

fn socks4_reply(granted: bool, bound: Option<SocketAddr>) -> Vec<u8> {
    let (ip, port) = match bound {
        Some(SocketAddr::V4(addr)) => (*addr.ip(), addr.port()),
        Some(SocketAddr::V6(_)) | None => (Ipv4Addr::UNSPECIFIED, 0),
    };
    // SOCKS4 memo: the reply's VN is 0, not 4.
    let code = if granted {
        SOCKS4_GRANTED
    } else {
        SOCKS4_REJECTED
    };
    let mut out = vec![0x00, code];
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&ip.octets());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    // ---- What a client sends ----

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// RFC 1928 §3 method-selection message.
    fn greeting(methods: &[u8]) -> Vec<u8> {
        cat(&[&[SOCKS5, methods.len() as u8], methods])
    }

    /// RFC 1929 §2 username/password message.
    fn userpass(user: &[u8], pass: &[u8]) -> Vec<u8> {
        cat(&[&[1, user.len() as u8], user, &[pass.len() as u8], pass])
    }

    /// RFC 1928 §4 request; `addr` is ATYP and DST.ADDR.
    fn req5(cmd: u8, addr: &[u8], port: u16) -> Vec<u8> {
        cat(&[&[SOCKS5, cmd, 0], addr, &port.to_be_bytes()])
    }

    fn atyp4(ip: [u8; 4]) -> Vec<u8> {
        cat(&[&[ATYP_IPV4], &ip])
    }

    fn atyp6(ip: Ipv6Addr) -> Vec<u8> {
        cat(&[&[ATYP_IPV6], &ip.octets()])
    }

    fn atyp_name(name: &[u8]) -> Vec<u8> {
        cat(&[&[ATYP_DOMAINNAME, name.len() as u8], name])
    }

    /// A no-auth greeting followed by `request`.
    fn s5(request: &[u8]) -> Vec<u8> {
        cat(&[&greeting(&[METHOD_NO_AUTH]), request])
    }

    /// SOCKS4 request; SOCKS4a when `host` is given.
    fn req4(cd: u8, port: u16, ip: [u8; 4], userid: &[u8], host: Option<&[u8]>) -> Vec<u8> {
        let mut out = cat(&[&[SOCKS4, cd], &port.to_be_bytes(), &ip, userid, &[0]]);
        if let Some(host) = host {
            out.extend_from_slice(host);
            out.push(0);
        }
        out
    }

    // ---- What we expect ----

    const NO_AUTH_OK: [u8; 2] = [SOCKS5, METHOD_NO_AUTH];
    const R4_REJECTED: [u8; 8] = [0, 0x5B, 0, 0, 0, 0, 0, 0];

    /// RFC 1928 §6 reply with REP `code` and BND 0.0.0.0:0.
    fn r5(code: u8) -> Vec<u8> {
        vec![SOCKS5, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
    }

    fn addr(text: &str) -> Target {
        Target::Addr(text.parse().expect("test address"))
    }

    fn name(host: &str, port: u16) -> Target {
        Target::Name {
            host: host.to_string(),
            port,
        }
    }

    fn request(
        version: SocksVersion,
        command: Command,
        target: Target,
        isolation: Option<&[u8]>,
    ) -> Request {
        Request {
            version,
            command,
            target,
            isolation: isolation.map(<[u8]>::to_vec),
        }
    }

    fn connect5(target: Target) -> Request {
        request(SocksVersion::V5, Command::Connect, target, None)
    }

    fn connect4(target: Target) -> Request {
        request(SocksVersion::V4, Command::Connect, target, None)
    }

    // ---- Driving a handshake the way a connection thread does ----

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Outcome {
        /// `replies`: everything written before; `rest`: stream data left.
        Done {
            request: Request,
            replies: Vec<u8>,
            rest: Vec<u8>,
        },
        /// `replies`: everything written, the error's reply included.
        Failed { kind: ErrorKind, replies: Vec<u8> },
        /// Input ran out; `buffered`: bytes not consumed.
        Pending { replies: Vec<u8>, buffered: Vec<u8> },
    }

    fn done(request: Request, replies: &[u8]) -> Outcome {
        Outcome::Done {
            request,
            replies: replies.to_vec(),
            rest: Vec::new(),
        }
    }

    fn failed(kind: ErrorKind, replies: &[u8]) -> Outcome {
        Outcome::Failed {
            kind,
            replies: replies.to_vec(),
        }
    }

    fn pending(replies: &[u8], buffered: &[u8]) -> Outcome {
        Outcome::Pending {
            replies: replies.to_vec(),
            buffered: buffered.to_vec(),
        }
    }

    /// Deliver `input` in chunks of `sizes` (cycled), keeping unconsumed
    /// bytes in a buffer, and check the invariants of every step.
    fn drive(input: &[u8], sizes: &[usize]) -> Outcome {
        let mut hs = Handshake::new();
        let mut buf = Vec::new();
        let mut replies = Vec::new();
        let mut sizes = sizes.iter().copied().cycle();
        let mut fed = 0;
        while fed < input.len() {
            let n = sizes.next().unwrap_or(1).clamp(1, input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + n]);
            fed += n;
            match hs.feed(&buf) {
                Ok(step) => {
                    assert!(step.consumed <= buf.len(), "consumed more than given");
                    buf.drain(..step.consumed);
                    replies.extend(step.reply);
                    if let Some(request) = step.request {
                        buf.extend_from_slice(&input[fed..]);
                        return Outcome::Done {
                            request,
                            replies,
                            rest: buf,
                        };
                    }
                    // Ok without a request means every complete message was
                    // handled: the same bytes again must change nothing.
                    assert_eq!(hs.feed(&buf), Ok(Step::default()));
                }
                Err(err) => {
                    replies.extend(err.reply);
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

    /// Feed `input` whole, one byte at a time and in threes; all three
    /// must agree.
    fn run(input: &[u8]) -> Outcome {
        let whole = drive(input, &[input.len()]);
        assert_eq!(drive(input, &[1]), whole, "byte at a time differs");
        assert_eq!(drive(input, &[3]), whole, "three at a time differs");
        whole
    }

    // ---- Start: telling SOCKS4, SOCKS5 and strangers apart ----

    #[test]
    fn empty_input_consumes_nothing() {
        // Sans-IO contract (module doc): nothing to parse, nothing consumed.
        assert_eq!(Handshake::new().feed(&[]), Ok(Step::default()));
    }

    #[test]
    fn first_byte_neither_4_nor_5_fails_without_reply() {
        // §11 accepts only SOCKS4/4a/5; anything else gets no reply bytes. 0x16
        // is a TLS ClientHello; 0x01 is an RFC 1929 message out of place.
        for first in [0x00, 0x01, 0x03, 0x06, 0x16, 0xFF, b'x', b'G'] {
            let input = [first, 0x20, 0x20];
            assert_eq!(run(&input), failed(ErrorKind::NotSocks(first), &[]));
        }
    }

    #[test]
    fn http_request_is_its_own_error() {
        // Tor socks-extensions.txt §4: an HTTP client pointed at the SOCKS
        // port gets a distinct error (so the log says what it is), and no
        // reply bytes.
        for line in [
            &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
            b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
            b"POST /x HTTP/1.0\r\n",
            b"HEAD / HTTP/1.1\r\n",
            b"PUT / HTTP/1.1\r\n",
            b"DELETE / HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"TRACE / HTTP/1.1\r\n",
            b"PATCH / HTTP/1.1\r\n",
        ] {
            assert_eq!(run(line), failed(ErrorKind::HttpRequest, &[]), "{line:?}");
        }
    }

    #[test]
    fn http_method_prefix_waits_for_more() {
        // A prefix of an HTTP method is undecided, so nothing is consumed.
        assert_eq!(run(b"CONNEC"), pending(&[], b"CONNEC"));
        assert_eq!(run(b"GET"), pending(&[], b"GET"));
    }

    #[test]
    fn letters_that_are_not_an_http_method_are_not_socks() {
        // Only METHOD + space counts as HTTP; the error names the first byte.
        assert_eq!(run(b"GETX / "), failed(ErrorKind::NotSocks(b'G'), &[]));
        assert_eq!(run(b"Hello"), failed(ErrorKind::NotSocks(b'H'), &[]));
        assert_eq!(run(b"get / "), failed(ErrorKind::NotSocks(b'g'), &[]));
    }

    #[test]
    fn feeding_after_the_request_is_a_caller_bug() {
        // Module doc: after the request, bytes belong to the stream.
        let mut hs = Handshake::new();
        let step = hs.feed(&s5(&req5(CMD_CONNECT, &atyp4([1, 2, 3, 4]), 80)));
        assert!(step.is_ok_and(|s| s.request.is_some()));
        let err = hs
            .feed(b"GET / HTTP/1.1\r\n")
            .expect_err("already finished");
        assert_eq!(err.kind, ErrorKind::AlreadyFinished);
        assert!(err.reply.is_empty());
    }

    #[test]
    fn feeding_after_a_failure_is_a_caller_bug() {
        let mut hs = Handshake::new();
        assert!(hs.feed(&[0x16]).is_err());
        let err = hs.feed(&[5, 1, 0]).expect_err("already failed");
        assert_eq!(err.kind, ErrorKind::AlreadyFinished);
    }

    // ---- SOCKS5 method selection (RFC 1928 §3) ----

    #[test]
    fn no_auth_is_chosen_when_it_is_all_there_is() {
        // R11.2: "no authentication" is offered (RFC 1928 §3: answer VER
        // METHOD).
        assert_eq!(run(&greeting(&[0x00])), pending(&NO_AUTH_OK, &[]));
        assert_eq!(
            run(&greeting(&[0x01, 0x00, 0x80])),
            pending(&NO_AUTH_OK, &[])
        );
    }

    #[test]
    fn username_password_is_preferred_when_offered() {
        // R11.2: username/password is offered; the credentials are the
        // isolation key (R11.4), so it is chosen whenever offered.
        for methods in [
            &[0x02][..],
            &[0x00, 0x02],
            &[0x02, 0x00],
            &[0x01, 0x02, 0x00],
        ] {
            assert_eq!(
                run(&greeting(methods)),
                pending(&[5, 2], &[]),
                "{methods:?}"
            );
        }
    }

    #[test]
    fn no_acceptable_method_is_answered_ff() {
        // RFC 1928 §3: X'FF' when none of the offered methods is acceptable
        // (here: GSSAPI only, nothing at all, private methods).
        for methods in [&[0x01][..], &[], &[0x03, 0x80, 0xFE, 0xFF]] {
            assert_eq!(
                run(&greeting(methods)),
                failed(ErrorKind::NoAcceptableMethod, &[5, 0xFF]),
                "{methods:?}"
            );
        }
    }

    #[test]
    fn all_255_methods_are_read() {
        // RFC 1928 §3: NMETHODS is 1 to 255.
        let methods: Vec<u8> = (0..=254).collect();
        assert_eq!(run(&greeting(&methods)), pending(&[5, 2], &[]));
    }

    #[test]
    fn incomplete_greeting_consumes_nothing() {
        // Sans-IO: a partial message stays in the caller's buffer.
        assert_eq!(run(&[5, 3, 0, 1]), pending(&[], &[5, 3, 0, 1]));
    }

    #[test]
    fn greeting_is_consumed_only_when_complete() {
        // Byte at a time, step by step: nothing until the last byte.
        let mut hs = Handshake::new();
        assert_eq!(hs.feed(&[5]), Ok(Step::default()));
        assert_eq!(hs.feed(&[5, 2]), Ok(Step::default()));
        assert_eq!(hs.feed(&[5, 2, 1]), Ok(Step::default()));
        let step = hs.feed(&[5, 2, 1, 0]).expect("complete greeting");
        assert_eq!(
            (step.consumed, step.reply, step.request),
            (4, vec![5, 0], None)
        );
    }

    // ---- SOCKS5 username/password (RFC 1929 §2) ----

    fn with_auth(user: &[u8], pass: &[u8]) -> Vec<u8> {
        cat(&[
            &greeting(&[METHOD_NO_AUTH, METHOD_USERPASS]),
            &userpass(user, pass),
            &req5(CMD_CONNECT, &atyp_name(b"example.com"), 443),
        ])
    }

    #[test]
    fn any_credentials_are_accepted_and_become_the_isolation_key() {
        // R11.2 (accept any credentials), RFC 1929 §2 (STATUS 0).
        let expected = request(
            SocksVersion::V5,
            Command::Connect,
            name("example.com", 443),
            Some(b"\x05alice\x06secret"),
        );
        assert_eq!(
            run(&with_auth(b"alice", b"secret")),
            done(expected, &[5, 2, 1, 0])
        );
    }

    #[test]
    fn empty_username_and_password_are_accepted() {
        // Deliberate departure from RFC 1929 §2 (1-255 bytes), as in Tor.
        let outcome = run(&with_auth(b"", b""));
        let Outcome::Done { request, .. } = outcome else {
            panic!("not done: {outcome:?}");
        };
        assert_eq!(request.isolation, Some(vec![0, 0]));
    }

    #[test]
    fn isolation_keys_are_unambiguous() {
        // R11.4: different credentials, different keys (so different
        // circuits); the length prefixes keep ("ab","c") apart from
        // ("a","bc").
        let key = |user: &[u8], pass: &[u8]| match run(&with_auth(user, pass)) {
            Outcome::Done { request, .. } => request.isolation,
            other => panic!("not done: {other:?}"),
        };
        assert_ne!(key(b"ab", b"c"), key(b"a", b"bc"));
        assert_ne!(key(b"a", b""), key(b"", b"a"));
        assert_eq!(key(b"a", b"b"), key(b"a", b"b"));
    }

    #[test]
    fn longest_credentials_are_accepted() {
        // RFC 1929 §2: ULEN and PLEN up to 255, binary allowed.
        let user = vec![0xAB; 255];
        let pass = vec![0x00; 255];
        let outcome = run(&with_auth(&user, &pass));
        let Outcome::Done { request, .. } = outcome else {
            panic!("not done: {outcome:?}");
        };
        assert_eq!(
            request.isolation,
            Some(cat(&[&[255], &user, &[255], &pass]))
        );
    }

    #[test]
    fn wrong_subnegotiation_version_fails_with_status_1() {
        // RFC 1929 §2: VER is 1; a non-zero STATUS, then close. The method
        // choice from the same buffer goes out first.
        let input = cat(&[&greeting(&[METHOD_USERPASS]), &[5, 1, b'a', 1, b'b']]);
        assert_eq!(
            run(&input),
            failed(ErrorKind::BadAuthVersion(5), &[5, 2, 1, 1])
        );
    }

    #[test]
    fn no_auth_client_gets_no_isolation() {
        // Request doc: None without credentials.
        let input = s5(&req5(CMD_CONNECT, &atyp_name(b"example.com"), 80));
        assert_eq!(
            run(&input),
            done(connect5(name("example.com", 80)), &NO_AUTH_OK)
        );
    }

    // ---- SOCKS5 request (RFC 1928 §4, §5) ----

    #[test]
    fn connect_ipv4() {
        // R11.1: CONNECT with RFC 1928 §5 ATYP 1 (IPv4).
        let input = s5(&req5(CMD_CONNECT, &atyp4([192, 0, 2, 7]), 8080));
        assert_eq!(
            run(&input),
            done(connect5(addr("192.0.2.7:8080")), &NO_AUTH_OK)
        );
    }

    #[test]
    fn connect_ipv6() {
        // R11.1: CONNECT with RFC 1928 §5 ATYP 4 (IPv6).
        let ip: Ipv6Addr = "2001:db8::1".parse().expect("test address");
        let input = s5(&req5(CMD_CONNECT, &atyp6(ip), 443));
        assert_eq!(
            run(&input),
            done(connect5(addr("[2001:db8::1]:443")), &NO_AUTH_OK)
        );
    }

    #[test]
    fn connect_domainname() {
        // R11.1: CONNECT with RFC 1928 §5 ATYP 3 (DOMAINNAME); §5 allows
        // letters, digits, '-', '_' and '.'.
        let host = "Foo-bar_1.example.COM.";
        let input = s5(&req5(CMD_CONNECT, &atyp_name(host.as_bytes()), 80));
        assert_eq!(run(&input), done(connect5(name(host, 80)), &NO_AUTH_OK));
    }

    #[test]
    fn domainname_of_255_bytes_is_accepted() {
        // RFC 1928 §5 and docs/protocol.md §5: up to 255 bytes.
        let host = "a".repeat(255);
        let input = s5(&req5(CMD_CONNECT, &atyp_name(host.as_bytes()), 80));
        assert_eq!(run(&input), done(connect5(name(&host, 80)), &NO_AUTH_OK));
    }

    #[test]
    fn domainname_that_is_an_ip_literal_becomes_an_address() {
        // Dotted IPv4 and IPv6 literals (bracketed or not) are IP targets,
        // so BEGIN never carries an unbracketed IPv6 (§5).
        for (host, expected) in [
            ("10.1.2.3", "10.1.2.3:80"),
            ("::1", "[::1]:80"),
            ("[::1]", "[::1]:80"),
            (
                "2001:db8::8:800:200c:417a",
                "[2001:db8::8:800:200c:417a]:80",
            ),
            ("[::ffff:1.2.3.4]", "[::ffff:1.2.3.4]:80"),
        ] {
            let input = s5(&req5(CMD_CONNECT, &atyp_name(host.as_bytes()), 80));
            assert_eq!(
                run(&input),
                done(connect5(addr(expected)), &NO_AUTH_OK),
                "{host}"
            );
        }
    }

    #[test]
    fn almost_ip_literals_are_names_or_errors() {
        // docs/protocol.md §5: "1.2.3.4.5" is hostname characters, so a name;
        // brackets around IPv4 or an unclosed bracket are malformed.
        let input = s5(&req5(CMD_CONNECT, &atyp_name(b"1.2.3.4.5"), 80));
        assert_eq!(
            run(&input),
            done(connect5(name("1.2.3.4.5", 80)), &NO_AUTH_OK)
        );
        for host in [&b"[1.2.3.4]"[..], b"[::1", b"::1]", b"fe80::1%eth0"] {
            let input = s5(&req5(CMD_CONNECT, &atyp_name(host), 80));
            let expected = failed(
                ErrorKind::BadHostname(host.to_vec()),
                &cat(&[&NO_AUTH_OK, &r5(1)]),
            );
            assert_eq!(run(&input), expected, "{host:?}");
        }
    }

    #[test]
    fn empty_domainname_is_general_failure() {
        // An empty DOMAINNAME is no hostname (§5); reply 0x01.
        let input = s5(&req5(CMD_CONNECT, &atyp_name(b""), 80));
        let expected = failed(
            ErrorKind::BadHostname(Vec::new()),
            &cat(&[&NO_AUTH_OK, &r5(1)]),
        );
        assert_eq!(run(&input), expected);
    }

    #[test]
    fn domainname_with_forbidden_bytes_is_general_failure() {
        // docs/protocol.md §5: only ASCII letters, digits, '-', '_' and '.'.
        for host in [
            &b"exa mple.com"[..],
            b"example.com:80",
            b"a/b",
            b"a\0b",
            b"caf\xc3\xa9.fr",
            b"a\nb",
            b"*.example.com",
        ] {
            let input = s5(&req5(CMD_CONNECT, &atyp_name(host), 80));
            let expected = failed(
                ErrorKind::BadHostname(host.to_vec()),
                &cat(&[&NO_AUTH_OK, &r5(1)]),
            );
            assert_eq!(run(&input), expected, "{host:?}");
        }
    }

    #[test]
    fn unsupported_commands_get_07() {
        // R11.13: BIND and UDP ASSOCIATE get 0x07; RESOLVE_PTR
        // (socks-extensions.txt §2) and unknown commands too (RFC 1928 §6).
        for code in [
            CMD_BIND,
            CMD_UDP_ASSOCIATE,
            CMD_RESOLVE_PTR,
            0x00,
            0x04,
            0xF2,
            0xFF,
        ] {
            let input = s5(&req5(code, &atyp4([1, 2, 3, 4]), 80));
            let kind = ErrorKind::UnsupportedCommand {
                version: SocksVersion::V5,
                code,
            };
            assert_eq!(
                run(&input),
                failed(kind, &cat(&[&NO_AUTH_OK, &r5(7)])),
                "{code:#x}"
            );
        }
    }

    #[test]
    fn unsupported_command_is_answered_before_the_rest_arrives() {
        // A bad CMD is known at byte 2 of the request; no need to wait.
        let input = s5(&[SOCKS5, CMD_BIND]);
        let kind = ErrorKind::UnsupportedCommand {
            version: SocksVersion::V5,
            code: CMD_BIND,
        };
        assert_eq!(run(&input), failed(kind, &cat(&[&NO_AUTH_OK, &r5(7)])));
    }

    #[test]
    fn unsupported_address_types_get_08() {
        // RFC 1928 §5/§6: only ATYP 1, 3 and 4; the address length of any
        // other is unknown, so we answer at once.
        for atyp in [0x00, 0x02, 0x05, 0xFF] {
            let input = s5(&[SOCKS5, CMD_CONNECT, 0, atyp]);
            let expected = failed(
                ErrorKind::UnsupportedAddressType(atyp),
                &cat(&[&NO_AUTH_OK, &r5(8)]),
            );
            assert_eq!(run(&input), expected, "{atyp:#x}");
        }
    }

    #[test]
    fn request_with_wrong_version_is_general_failure() {
        // RFC 1928 §4: VER is 5.
        let mut request = req5(CMD_CONNECT, &atyp4([1, 2, 3, 4]), 80);
        request[0] = 4;
        let expected = failed(
            ErrorKind::BadRequestVersion(4),
            &cat(&[&NO_AUTH_OK, &r5(1)]),
        );
        assert_eq!(run(&s5(&request)), expected);
    }

    #[test]
    fn reserved_byte_is_ignored() {
        // RFC 1928 §4 gives RSV no meaning (deliberate choice: not checked).
        let mut request = req5(CMD_CONNECT, &atyp4([1, 2, 3, 4]), 80);
        request[2] = 0x7F;
        assert_eq!(
            run(&s5(&request)),
            done(connect5(addr("1.2.3.4:80")), &NO_AUTH_OK)
        );
    }

    #[test]
    fn connect_to_port_zero_is_general_failure() {
        // A CONNECT to port 0 is an error (BEGIN's PORT is 1 to 65535, §5),
        // reply 0x01 for SOCKS5.
        for atyp in [
            atyp4([1, 2, 3, 4]),
            atyp_name(b"example.com"),
            atyp6(Ipv6Addr::LOCALHOST),
        ] {
            let input = s5(&req5(CMD_CONNECT, &atyp, 0));
            assert_eq!(
                run(&input),
                failed(ErrorKind::ZeroPort, &cat(&[&NO_AUTH_OK, &r5(1)]))
            );
        }
    }

    #[test]
    fn resolve_is_a_request() {
        // socks-extensions.txt §2: RESOLVE 0xF0 looks the name up; tor-resolve
        // sends port 0, which is fine for a lookup (module doc).
        let input = s5(&req5(CMD_RESOLVE, &atyp_name(b"example.com"), 0));
        let expected = request(
            SocksVersion::V5,
            Command::Resolve,
            name("example.com", 0),
            None,
        );
        assert_eq!(run(&input), done(expected, &NO_AUTH_OK));
    }

    #[test]
    fn resolve_of_an_address_is_returned_as_such() {
        // Module doc: the daemon can answer a RESOLVE of an address at once.
        let input = s5(&req5(CMD_RESOLVE, &atyp4([1, 2, 3, 4]), 0));
        let expected = request(SocksVersion::V5, Command::Resolve, addr("1.2.3.4:0"), None);
        assert_eq!(run(&input), done(expected, &NO_AUTH_OK));
    }

    // ---- Pipelining and optimistic data (module doc) ----

    #[test]
    fn whole_pipelined_handshake_in_one_buffer() {
        // A client may send greeting, credentials, request and data without
        // waiting; all answers come back from one feed, data is left alone
        // (socks-extensions.txt §5, docs/protocol.md §5 optimistic data).
        let input = cat(&[&with_auth(b"u", b"p"), b"GET / HTTP/1.1\r\n\r\n"]);
        let step = Handshake::new().feed(&input).expect("valid handshake");
        assert_eq!(step.reply, [5, 2, 1, 0]);
        assert_eq!(&input[step.consumed..], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            step.request.map(|r| r.target),
            Some(name("example.com", 443))
        );
    }

    #[test]
    fn optimistic_data_is_never_consumed() {
        // Module doc: bytes after the request belong to the stream, even if
        // they look like SOCKS.
        let data = cat(&[&[5, 1, 0], b"\0\0\0 and more"]);
        let input = cat(&[&s5(&req5(CMD_CONNECT, &atyp4([1, 2, 3, 4]), 80)), &data]);
        assert_eq!(
            run(&input),
            Outcome::Done {
                request: connect5(addr("1.2.3.4:80")),
                replies: NO_AUTH_OK.to_vec(),
                rest: data.clone(),
            }
        );
        let input = cat(&[&req4(CMD_CONNECT, 80, [1, 2, 3, 4], b"", None), &data]);
        assert_eq!(
            run(&input),
            Outcome::Done {
                request: connect4(addr("1.2.3.4:80")),
                replies: Vec::new(),
                rest: data,
            }
        );
    }

    #[test]
    fn failure_after_pipelined_greeting_keeps_reply_order() {
        // SocksError doc: the method choice from the same feed precedes the
        // failure reply, as the client expects them in order.
        let input = s5(&req5(CMD_UDP_ASSOCIATE, &atyp4([1, 2, 3, 4]), 80));
        let err = Handshake::new().feed(&input).expect_err("UDP ASSOCIATE");
        assert_eq!(err.reply, cat(&[&NO_AUTH_OK, &r5(7)]));
    }

    // ---- SOCKS4 and SOCKS4a ----

    #[test]
    fn socks4_connect() {
        // R11.3: SOCKS4 CONNECT (memo: VN CD DSTPORT DSTIP USERID NUL);
        // empty USERID, no key.
        let input = req4(CMD_CONNECT, 443, [198, 51, 100, 1], b"", None);
        assert_eq!(run(&input), done(connect4(addr("198.51.100.1:443")), &[]));
    }

    #[test]
    fn socks4_userid_is_the_isolation_key() {
        // R11.4: a non-empty USERID isolates; encoded as a username with an
        // empty password, equal to SOCKS5 with the same username.
        let input = req4(CMD_CONNECT, 80, [1, 2, 3, 4], b"alice", None);
        let expected = request(
            SocksVersion::V4,
            Command::Connect,
            addr("1.2.3.4:80"),
            Some(b"\x05alice\x00"),
        );
        assert_eq!(run(&input), done(expected, &[]));
        let socks5 = match run(&with_auth(b"alice", b"")) {
            Outcome::Done { request, .. } => request.isolation,
            other => panic!("not done: {other:?}"),
        };
        assert_eq!(socks5.as_deref(), Some(&b"\x05alice\x00"[..]));
    }

    #[test]
    fn socks4a_hostname() {
        // R11.3: SOCKS4a CONNECT (memo: DSTIP 0.0.0.x (x != 0), hostname
        // NUL after USERID).
        let input = req4(CMD_CONNECT, 80, [0, 0, 0, 1], b"bob", Some(b"example.org"));
        let expected = request(
            SocksVersion::V4,
            Command::Connect,
            name("example.org", 80),
            Some(b"\x03bob\x00"),
        );
        assert_eq!(run(&input), done(expected, &[]));
        let input = req4(CMD_CONNECT, 80, [0, 0, 0, 255], b"", Some(b"example.org"));
        assert_eq!(run(&input), done(connect4(name("example.org", 80)), &[]));
    }

    #[test]
    fn socks4a_ip_literal_becomes_an_address() {
        // IP literals in place of a hostname are IP targets (as in SOCKS5).
        let input = req4(CMD_CONNECT, 80, [0, 0, 0, 1], b"", Some(b"10.0.0.1"));
        assert_eq!(run(&input), done(connect4(addr("10.0.0.1:80")), &[]));
        let input = req4(CMD_CONNECT, 80, [0, 0, 0, 1], b"", Some(b"[::1]"));
        assert_eq!(run(&input), done(connect4(addr("[::1]:80")), &[]));
    }

    #[test]
    fn socks4a_resolve() {
        // socks-extensions.txt §2: RESOLVE 0xF0 in SOCKS4a, port may be 0.
        let input = req4(CMD_RESOLVE, 0, [0, 0, 0, 1], b"", Some(b"example.org"));
        let expected = request(
            SocksVersion::V4,
            Command::Resolve,
            name("example.org", 0),
            None,
        );
        assert_eq!(run(&input), done(expected, &[]));
    }

    #[test]
    fn socks4_other_commands_get_5b() {
        // R11.14: SOCKS4 replies 0x5B for any failure (BIND too).
        for code in [CMD_BIND, 0x00, CMD_UDP_ASSOCIATE, CMD_RESOLVE_PTR, 0xFF] {
            let input = req4(code, 80, [1, 2, 3, 4], b"", None);
            let kind = ErrorKind::UnsupportedCommand {
                version: SocksVersion::V4,
                code,
            };
            assert_eq!(run(&input), failed(kind, &R4_REJECTED), "{code:#x}");
        }
    }

    #[test]
    fn socks4_connect_to_port_zero_gets_5b() {
        // R11.14: a CONNECT to port 0 is an error, 0x5B for SOCKS4.
        let input = req4(CMD_CONNECT, 0, [1, 2, 3, 4], b"", None);
        assert_eq!(run(&input), failed(ErrorKind::ZeroPort, &R4_REJECTED));
        let input = req4(CMD_CONNECT, 0, [0, 0, 0, 1], b"", Some(b"example.org"));
        assert_eq!(run(&input), failed(ErrorKind::ZeroPort, &R4_REJECTED));
    }

    #[test]
    fn socks4_address_zero_gets_5b() {
        // Module doc (as Tor): 0.0.0.0 is neither an address nor 4a.
        let input = req4(CMD_CONNECT, 80, [0, 0, 0, 0], b"", None);
        assert_eq!(run(&input), failed(ErrorKind::ZeroAddress, &R4_REJECTED));
    }

    #[test]
    fn socks4_userid_is_capped_at_255_bytes() {
        // 255 bytes is fine; the 256th byte without a NUL fails at once
        // instead of buffering forever (R11.14: with 0x5B).
        let input = req4(CMD_CONNECT, 80, [1, 2, 3, 4], &[b'u'; 255], None);
        assert!(matches!(run(&input), Outcome::Done { .. }));
        let header = [SOCKS4, CMD_CONNECT, 0, 80, 1, 2, 3, 4];
        let almost = cat(&[&header, &[b'u'; 255]]);
        assert_eq!(run(&almost), pending(&[], &almost));
        let over = cat(&[&header, &[b'u'; 256]]);
        assert_eq!(run(&over), failed(ErrorKind::UserIdTooLong, &R4_REJECTED));
    }

    #[test]
    fn socks4a_hostname_is_capped_at_255_bytes() {
        // The same cap for the 4a hostname.
        let host = "h".repeat(255);
        let input = req4(CMD_CONNECT, 80, [0, 0, 0, 1], b"", Some(host.as_bytes()));
        assert_eq!(run(&input), done(connect4(name(&host, 80)), &[]));
        let over = cat(&[&[SOCKS4, CMD_CONNECT, 0, 80, 0, 0, 0, 1, 0], &[b'h'; 256]]);
        assert_eq!(run(&over), failed(ErrorKind::HostnameTooLong, &R4_REJECTED));
    }

    #[test]
    fn socks4a_bad_hostnames_get_5b() {
        // docs/protocol.md §5 hostname rules; must not be empty.
        for host in [&b""[..], b"exa mple", b"a:b", b"\xff"] {
            let input = req4(CMD_CONNECT, 80, [0, 0, 0, 1], b"", Some(host));
            let expected = failed(ErrorKind::BadHostname(host.to_vec()), &R4_REJECTED);
            assert_eq!(run(&input), expected, "{host:?}");
        }
    }

    #[test]
    fn incomplete_socks4_requests_consume_nothing() {
        // Sans-IO: header only, USERID without NUL, 4a without hostname NUL.
        for input in [
            &[SOCKS4, CMD_CONNECT, 0, 80, 1, 2][..],
            &[SOCKS4, CMD_CONNECT, 0, 80, 1, 2, 3, 4, b'u'],
            &[SOCKS4, CMD_CONNECT, 0, 80, 0, 0, 0, 1, 0, b'h'],
        ] {
            assert_eq!(run(input), pending(&[], input));
        }
    }

    // ---- Replies ----

    #[test]
    fn reply_codes_are_rfc_1928_values() {
        // RFC 1928 §6.
        let codes = [
            (Reply::Succeeded, 0x00),
            (Reply::GeneralFailure, 0x01),
            (Reply::NotAllowed, 0x02),
            (Reply::NetworkUnreachable, 0x03),
            (Reply::HostUnreachable, 0x04),
            (Reply::ConnectionRefused, 0x05),
            (Reply::TtlExpired, 0x06),
            (Reply::CommandNotSupported, 0x07),
            (Reply::AddressTypeNotSupported, 0x08),
        ];
        for (reply, code) in codes {
            assert_eq!(reply.code(), code, "{reply:?}");
        }
    }

    #[test]
    fn end_reasons_map_as_in_the_table() {
        // The table of §11: R11.7 EXITPOLICY, R11.8 NOROUTE, R11.9
        // RESOLVEFAILED, R11.10 CONNECTREFUSED, R11.11 TIMEOUT; R11.12:
        // every other reason is 0x01.
        for reason in 0..=u8::MAX {
            let expected = match reason {
                4 => Reply::NotAllowed,
                8 => Reply::NetworkUnreachable,
                2 => Reply::HostUnreachable,
                3 => Reply::ConnectionRefused,
                7 => Reply::TtlExpired,
                _ => Reply::GeneralFailure,
            };
            assert_eq!(
                reply_for_end_reason(reason),
                expected,
                "END reason {reason}"
            );
        }
    }

    #[test]
    fn socks5_connect_replies() {
        // RFC 1928 §6: VER REP RSV ATYP BND.ADDR BND.PORT; R11.5: success
        // is 0x00.
        use SocksVersion::V5;
        assert_eq!(connect_reply(V5, Reply::Succeeded, None), r5(0));
        assert_eq!(
            connect_reply(
                V5,
                Reply::Succeeded,
                Some("10.0.0.2:4660".parse().expect("addr"))
            ),
            [5, 0, 0, 1, 10, 0, 0, 2, 0x12, 0x34]
        );
        let v6 = connect_reply(
            V5,
            Reply::Succeeded,
            Some("[::1]:80".parse().expect("addr")),
        );
        assert_eq!(
            v6,
            cat(&[&[5, 0, 0, 4], &Ipv6Addr::LOCALHOST.octets(), &[0, 80]])
        );
        assert_eq!(connect_reply(V5, Reply::ConnectionRefused, None), r5(5));
    }

    #[test]
    fn socks4_connect_replies() {
        // SOCKS4 memo: VN 0, CD 0x5A granted (R11.5); R11.14: 0x5B for
        // every failure; IPv6 cannot be carried.
        use SocksVersion::V4;
        let bound = Some("10.0.0.2:4660".parse().expect("addr"));
        assert_eq!(
            connect_reply(V4, Reply::Succeeded, bound),
            [0, 0x5A, 0x12, 0x34, 10, 0, 0, 2]
        );
        assert_eq!(
            connect_reply(V4, Reply::Succeeded, None),
            [0, 0x5A, 0, 0, 0, 0, 0, 0]
        );
        let v6 = Some("[::1]:80".parse().expect("addr"));
        assert_eq!(
            connect_reply(V4, Reply::Succeeded, v6),
            [0, 0x5A, 0, 0, 0, 0, 0, 0]
        );
        for reply in [
            Reply::GeneralFailure,
            Reply::NotAllowed,
            Reply::NetworkUnreachable,
            Reply::HostUnreachable,
            Reply::ConnectionRefused,
            Reply::TtlExpired,
            Reply::CommandNotSupported,
            Reply::AddressTypeNotSupported,
        ] {
            assert_eq!(connect_reply(V4, reply, None), R4_REJECTED, "{reply:?}");
        }
    }

    #[test]
    fn resolve_replies() {
        // socks-extensions.txt §2: the answer is in BND.ADDR / DSTIP.
        use SocksVersion::{V4, V5};
        let v4: IpAddr = "93.184.216.34".parse().expect("addr");
        let v6: IpAddr = "2001:db8::2".parse().expect("addr");
        let v6_octets = match v6 {
            IpAddr::V6(ip) => ip.octets(),
            IpAddr::V4(_) => unreachable!(),
        };
        assert_eq!(
            resolve_reply(V5, Ok(v4)),
            [5, 0, 0, 1, 93, 184, 216, 34, 0, 0]
        );
        assert_eq!(
            resolve_reply(V5, Ok(v6)),
            cat(&[&[5, 0, 0, 4], &v6_octets, &[0, 0]])
        );
        assert_eq!(resolve_reply(V5, Err(Reply::HostUnreachable)), r5(4));
        assert_eq!(resolve_reply(V4, Ok(v4)), [0, 0x5A, 0, 0, 93, 184, 216, 34]);
        // SOCKS4 cannot carry IPv6.
        assert_eq!(resolve_reply(V4, Ok(v6)), R4_REJECTED);
        assert_eq!(resolve_reply(V4, Err(Reply::HostUnreachable)), R4_REJECTED);
    }

    #[test]
    fn resolve_failure_is_never_sent_as_success() {
        // resolve_reply doc: Err(Succeeded) is a caller mistake.
        assert_eq!(
            resolve_reply(SocksVersion::V5, Err(Reply::Succeeded)),
            r5(1)
        );
        assert_eq!(
            resolve_reply(SocksVersion::V4, Err(Reply::Succeeded)),
            R4_REJECTED
        );
    }

    #[test]
    fn target_prints_as_begin_address() {
        // docs/protocol.md §5: ADDRESS ":" PORT, IPv6 in brackets.
        assert_eq!(addr("1.2.3.4:80").to_string(), "1.2.3.4:80");
        assert_eq!(addr("[2001:db8::1]:443").to_string(), "[2001:db8::1]:443");
        assert_eq!(name("example.com", 8080).to_string(), "example.com:8080");
        assert_eq!(name("example.com", 8080).port(), 8080);
    }

    #[test]
    fn errors_print_on_one_line() {
        // Each error is one log line, even for hostile hostnames.
        let kinds = [
            ErrorKind::NotSocks(0x16),
            ErrorKind::HttpRequest,
            ErrorKind::NoAcceptableMethod,
            ErrorKind::BadAuthVersion(5),
            ErrorKind::BadRequestVersion(4),
            ErrorKind::UnsupportedCommand {
                version: SocksVersion::V5,
                code: CMD_BIND,
            },
            ErrorKind::UnsupportedAddressType(2),
            ErrorKind::BadHostname(b"evil\r\nhost\0\xff".to_vec()),
            ErrorKind::UserIdTooLong,
            ErrorKind::HostnameTooLong,
            ErrorKind::ZeroPort,
            ErrorKind::ZeroAddress,
            ErrorKind::AlreadyFinished,
        ];
        for kind in kinds {
            let err = SocksError {
                kind,
                reply: Vec::new(),
            };
            let text = err.to_string();
            assert!(
                !text.is_empty() && !text.contains(['\n', '\r', '\0']),
                "{text:?}"
            );
        }
        let bind = ErrorKind::UnsupportedCommand {
            version: SocksVersion::V5,
            code: CMD_BIND,
        };
        assert_eq!(
            bind.to_string(),
            "SOCKS5 command 0x02 (BIND) is not supported"
        );
    }

    // ---- Properties ----

    /// A SOCKS5 DST.ADDR as a client would send it.
    #[derive(Debug, Clone)]
    enum Dst {
        V4([u8; 4]),
        V6([u8; 16]),
        Name(String),
    }

    /// A valid request, the bytes a client sends for it, and our answers.
    #[derive(Debug, Clone)]
    struct Case {
        request: Request,
        wire: Vec<u8>,
        replies: Vec<u8>,
    }

    fn hostname() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,255}".prop_filter("an IPv4 literal is an address, not a name", |h| {
            h.parse::<Ipv4Addr>().is_err()
        })
    }

    /// RESOLVE may use port 0, CONNECT may not.
    fn command_and_port() -> impl Strategy<Value = (Command, u16)> {
        prop_oneof![
            (Just(Command::Connect), 1..=u16::MAX),
            (Just(Command::Resolve), any::<u16>()),
        ]
    }

    fn command_code(command: Command) -> u8 {
        match command {
            Command::Connect => CMD_CONNECT,
            Command::Resolve => CMD_RESOLVE,
        }
    }

    fn socks5_case() -> impl Strategy<Value = Case> {
        let dst = prop_oneof![
            any::<[u8; 4]>().prop_map(Dst::V4),
            any::<[u8; 16]>().prop_map(Dst::V6),
            hostname().prop_map(Dst::Name),
        ];
        let creds = proptest::option::of((vec(any::<u8>(), 0..=255), vec(any::<u8>(), 0..=255)));
        let other_methods = vec(any::<u8>(), 0..8);
        (
            command_and_port(),
            dst,
            creds,
            other_methods,
            any::<prop::sample::Index>(),
        )
            .prop_map(|((command, port), dst, creds, mut methods, at)| {
                // The method we expect goes anywhere among other offers.
                let chosen = if creds.is_some() {
                    METHOD_USERPASS
                } else {
                    methods.retain(|&m| m != METHOD_USERPASS);
                    METHOD_NO_AUTH
                };
                methods.insert(at.index(methods.len() + 1), chosen);
                let mut wire = greeting(&methods);
                let mut replies = vec![SOCKS5, chosen];
                let isolation = creds.map(|(user, pass)| {
                    wire.extend(userpass(&user, &pass));
                    replies.extend([1, 0]);
                    cat(&[&[user.len() as u8], &user, &[pass.len() as u8], &pass])
                });
                let (atyp, target) = match dst {
                    Dst::V4(ip) => (atyp4(ip), Target::Addr(SocketAddr::new(ip.into(), port))),
                    Dst::V6(ip) => (
                        atyp6(ip.into()),
                        Target::Addr(SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
                    ),
                    Dst::Name(host) => (atyp_name(host.as_bytes()), Target::Name { host, port }),
                };
                wire.extend(req5(command_code(command), &atyp, port));
                let request = Request {
                    version: SocksVersion::V5,
                    command,
                    target,
                    isolation,
                };
                Case {
                    request,
                    wire,
                    replies,
                }
            })
    }

    fn socks4_case() -> impl Strategy<Value = Case> {
        // Plain SOCKS4 addresses must not look like 0.0.0.x.
        let plain = any::<[u8; 4]>().prop_filter("0.0.0.x is SOCKS4a", |ip| ip[..3] != [0, 0, 0]);
        let dst = prop_oneof![plain.prop_map(Dst::V4), hostname().prop_map(Dst::Name)];
        let userid = vec(1..=u8::MAX, 0..=255);
        (command_and_port(), dst, userid, 1..=u8::MAX).prop_map(
            |((command, port), dst, userid, x)| {
                let code = command_code(command);
                let (wire, target) = match dst {
                    Dst::V4(ip) => (
                        req4(code, port, ip, &userid, None),
                        Target::Addr(SocketAddr::new(ip.into(), port)),
                    ),
                    Dst::Name(host) => (
                        req4(code, port, [0, 0, 0, x], &userid, Some(host.as_bytes())),
                        Target::Name { host, port },
                    ),
                    Dst::V6(_) => unreachable!("SOCKS4 has no IPv6"),
                };
                let isolation =
                    (!userid.is_empty()).then(|| cat(&[&[userid.len() as u8], &userid, &[0]]));
                let request = Request {
                    version: SocksVersion::V4,
                    command,
                    target,
                    isolation,
                };
                Case {
                    request,
                    wire,
                    replies: Vec::new(),
                }
            },
        )
    }

    /// Byte strings that often get past the first checks: small values
    /// make plausible lengths, methods, commands and address types.
    fn noise() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![3 => 0u8..=6, 1 => any::<u8>()];
        let tail = vec(byte, 0..600);
        prop_oneof![
            vec(any::<u8>(), 0..64),
            tail.clone().prop_map(|t| cat(&[&[SOCKS4], &t])),
            tail.clone().prop_map(|t| cat(&[&[SOCKS5, 1, 0], &t])),
            tail.clone().prop_map(|t| cat(&[&[SOCKS5, 1, 2, 1], &t])),
            tail.prop_map(|t| cat(&[&[SOCKS5, 1, 0, SOCKS5], &t])),
        ]
    }

    fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
        vec(1usize..=16, 1..24)
    }

    proptest! {
        /// (a) Any valid request, cut anywhere and followed by stream data,
        /// parses to the same request with the same answers, and the data
        /// is left untouched.
        #[test]
        fn valid_requests_survive_any_fragmentation(
            case in prop_oneof![socks5_case(), socks4_case()],
            sizes in chunk_sizes(),
            data in vec(any::<u8>(), 0..64),
        ) {
            let input = cat(&[&case.wire, &data]);
            let expected = Outcome::Done {
                request: case.request,
                replies: case.replies,
                rest: data,
            };
            prop_assert_eq!(drive(&input, &sizes), expected.clone());
            prop_assert_eq!(drive(&input, &[1]), expected);
        }

        /// (b) Arbitrary bytes never panic and never over-consume (`drive`
        /// checks `consumed` on every step), and (c) how they are cut does
        /// not change the outcome.
        #[test]
        fn arbitrary_bytes_are_handled_the_same_however_cut(
            input in noise(),
            sizes in chunk_sizes(),
        ) {
            let whole = drive(&input, &[input.len()]);
            prop_assert_eq!(drive(&input, &sizes), whole);
        }
    }
}
