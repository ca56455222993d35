//! The TLS link layer (docs/protocol.md §13): the rustls configurations of
//! the two edges, the certificate checks that stand in for a PKI (the
//! client pins its exit's fingerprint; an exit may list its clients'), and
//! the handshake, run to completion on the link's thread before the link
//! starts, within the handshake deadline.
//!
//! Certificates mean nothing here but the key they carry (R13.6): names,
//! issuer and validity are not looked at. The key's possession is proven by
//! TLS 1.3's CertificateVerify, checked by rustls with aws-lc-rs.

use super::handshake::TlsConfig;
use super::record::{self, Kernel, Opener, Sealer};
use crate::process::authorized::AuthorizedClients;
use crate::process::identity::Identity;
use crate::process::metrics::TlsReason;
use halfpipe_proto::identity::Fingerprint;
use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, InsufficientSizeError, UnbufferedStatus,
};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    Error, OtherError, ServerConfig, SignatureScheme,
};
use rustls::{CommonState, ExtractedSecrets};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// R13.2: the ALPN protocol of a halfpipe link.
pub const ALPN: &[u8] = b"halfpipe/1";

/// The clients an exit serves, shared with the process so that SIGHUP can
/// replace the list while links are being made.
pub type ClientList = Arc<RwLock<Arc<AuthorizedClients>>>;

/// aws-lc-rs, with AES-128-GCM first: the fastest suite on CPUs with AES
/// instructions, which is what both edges spend their time on.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The exit's configuration: its identity, and with `clients` only the
/// clients listed there (R13.7).
pub fn server_config(identity: &Identity, clients: Option<ClientList>) -> Arc<ServerConfig> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        // R13.1: TLS 1.3 only.
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3");
    let builder = match clients {
        Some(list) => builder.with_client_cert_verifier(Arc::new(ListedClients { list, provider })),
        None => builder.with_no_client_auth(),
    };
    // R13.4: the identity key, in a certificate.
    let mut config = builder
        .with_single_cert(vec![identity.cert.clone()], identity.key())
        .expect("the identity's own certificate and key match");
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.ignore_client_order = true;
    config.send_tls13_tickets = 0;
    config.key_log = Arc::new(rustls::KeyLogFile::new());
    // The link's threads protect their own records (`record`).
    config.enable_secret_extraction = true;
    Arc::new(config)
}

/// The client's configuration for an exit whose fingerprint is `exit`.
pub fn client_config(identity: &Identity, exit: Fingerprint) -> Arc<ClientConfig> {
    let provider = provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedExit {
            expected: exit,
            provider,
        }))
        // R13.8: shown when the exit asks.
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key())
        .expect("the identity's own certificate and key match");
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    config.key_log = Arc::new(rustls::KeyLogFile::new());
    // The link's threads protect their own records (`record`).
    config.enable_secret_extraction = true;
    Arc::new(config)
}

/// The fingerprint of the key a certificate carries (R13.6: nothing else
/// of it matters).
pub fn fingerprint_of(cert: &CertificateDer<'_>) -> Result<Fingerprint, Error> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    Ok(Fingerprint::of_spki(ee.subject_public_key_info().as_ref()))
}

/// Why a certificate was refused, carried through rustls's error so that
/// the log line can name both fingerprints.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("the exit's fingerprint is {got}, not {expected} as --exit-fingerprint says")]
    WrongExit {
        expected: Fingerprint,
        got: Fingerprint,
    },
    #[error("client {0} is not in --authorized-clients")]
    Unlisted(Fingerprint),
}

fn refuse(why: Refusal) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(why))))
}

/// R13.1: TLS 1.2 is never negotiated, so never verified.
fn no_tls12() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::General(
        "TLS 1.2 is not used on halfpipe links".into(),
    ))
}

/// The handshake signature by the certificate's key (R13.4, R13.8).
fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn schemes(provider: &CryptoProvider) -> Vec<SignatureScheme> {
    provider
        .signature_verification_algorithms
        .supported_schemes()
}

/// R13.5: the client accepts the exit whose key has the pinned fingerprint.
#[derive(Debug)]
struct PinnedExit {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedExit {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let got = fingerprint_of(end_entity)?;
        if got == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(refuse(Refusal::WrongExit {
                expected: self.expected,
                got,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// R13.7: the exit serves the clients whose fingerprints it lists.
#[derive(Debug)]
struct ListedClients {
    list: ClientList,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ListedClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let fp = fingerprint_of(end_entity)?;
        if self.list.read().contains(&fp) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(refuse(Refusal::Unlisted(fp)))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// How a TLS handshake failed: the log line, and the label it is counted
/// under in /metrics.
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    #[error("{0}")]
    Refused(Refusal),
    #[error("the exit refused this client ({0}): is this client's fingerprint in the exit's --authorized-clients?")]
    RefusedByExit(String),
    #[error("the client refused this exit's certificate ({0}): its --exit-fingerprint is not this exit's")]
    RefusedByClient(String),
    #[error("the peer speaks a plain link (a VERSIONS cell where a TLS ClientHello belongs): both edges need the same --link")]
    PlainPeer,
    #[error(
        "the peer did not offer ALPN {:?} (R13.2): not a halfpipe link",
        String::from_utf8_lossy(ALPN)
    )]
    NoAlpn,
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("the peer closed the connection during the TLS handshake (does it use --link plain?)")]
    Closed,
    #[error("TLS handshake failed: {0}")]
    Other(String),
}

impl TlsFailure {
    /// What `halfpipe_tls_handshake_failures_total` counts it as.
    pub fn reason(&self) -> TlsReason {
        match self {
            TlsFailure::Refused(Refusal::WrongExit { .. }) => TlsReason::WrongExit,
            TlsFailure::Refused(Refusal::Unlisted(_)) => TlsReason::UnlistedClient,
            TlsFailure::RefusedByExit(_) => TlsReason::RefusedByExit,
            TlsFailure::RefusedByClient(_) => TlsReason::RefusedByClient,
            TlsFailure::PlainPeer => TlsReason::PlainPeer,
            TlsFailure::NoAlpn => TlsReason::NoAlpn,
            TlsFailure::Timeout(_) => TlsReason::Timeout,
            TlsFailure::Closed => TlsReason::Closed,
            TlsFailure::Other(_) => TlsReason::Other,
        }
    }

    /// `exit`: this side is the exit (a refusal alert then comes from a
    /// client that does not want this exit).
    pub(crate) fn from_rustls(e: Error, exit: bool) -> TlsFailure {
        match &e {
            Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                match inner.downcast_ref::<Refusal>() {
                    Some(r) => TlsFailure::Refused(r.clone()),
                    None => TlsFailure::Other(e.to_string()),
                }
            }
            Error::AlertReceived(
                a @ (AlertDescription::BadCertificate
                | AlertDescription::CertificateRequired
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied),
            ) if exit => TlsFailure::RefusedByClient(format!("{a:?}")),
            Error::AlertReceived(
                a @ (AlertDescription::BadCertificate
                | AlertDescription::CertificateRequired
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied),
            ) => TlsFailure::RefusedByExit(format!("{a:?}")),
            Error::NoApplicationProtocol => TlsFailure::NoAlpn,
            _ => TlsFailure::Other(e.to_string()),
        }
    }
}

/// What status shows of a link's TLS session.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub version: String,
    pub cipher_suite: String,
    /// The peer's fingerprint, if it showed a certificate.
    pub peer: Option<Fingerprint>,
}

impl TlsInfo {
    fn of(conn: &CommonState) -> TlsInfo {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(v) => format!("{v:?}"),
            None => "-".to_owned(),
        };
        let cipher_suite = conn
            .negotiated_cipher_suite()
            .map(|s| {
                let name = format!("{:?}", s.suite());
                // rustls names them TLS13_AES_128_GCM_SHA256; IANA's names
                // (what Wireshark and openssl show) have no "13".
                name.replacen("TLS13_", "TLS_", 1)
            })
            .unwrap_or_else(|| "-".to_owned());
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| fingerprint_of(c).ok());
        TlsInfo {
            version,
            cipher_suite,
            peer,
        }
    }
}

/// A TLS session whose handshake is done: its two directions (each link
/// thread keeps one) and what status shows of it.
pub struct Session {
    pub opener: Opener,
    pub sealer: Sealer,
    pub info: TlsInfo,
}

/// rustls's two unbuffered connections, driven by one handshake loop.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &CommonState;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), Error>;
}

/// The two impls differ in their types and the `Kernel` variant only.
macro_rules! unbuffered {
    ($conn:ty, $data:ty, $kernel:path) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn common(&self) -> &CommonState {
                self
            }
            fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), Error> {
                let (secrets, k) = self.dangerous_into_kernel_connection()?;
                Ok((secrets, $kernel(k)))
            }
        }
    };
}

unbuffered!(
    UnbufferedClientConnection,
    ClientConnectionData,
    Kernel::Client
);
unbuffered!(
    UnbufferedServerConnection,
    ServerConnectionData,
    Kernel::Server
);

/// Runs the TLS handshake on `tcp` to the end, before `deadline` (R13.3:
/// the same clock as VERSIONS, R1.6). The exit first looks at what the
/// client sent, to say so when it is a plain link's VERSIONS.
pub fn handshake(
    tcp: &TcpStream,
    config: &TlsConfig,
    deadline: Instant,
    timeout: Duration,
) -> Result<Session, TlsFailure> {
    let io = HandshakeIo {
        tcp,
        deadline,
        timeout,
    };
    match config {
        TlsConfig::Exit { config, .. } => {
            io.refuse_plain_peer()?;
            let conn = UnbufferedServerConnection::new(config.clone())
                .map_err(|e| TlsFailure::Other(e.to_string()))?;
            drive(conn, &io, true)
        }
        TlsConfig::Client(config) => {
            // No name is checked (R13.6) and none is sent (no SNI): the
            // peer's address stands in for one.
            let ip = tcp.peer_addr().map_err(|e| io.failure(e))?.ip();
            let conn = UnbufferedClientConnection::new(config.clone(), ip.into())
                .map_err(|e| TlsFailure::Other(e.to_string()))?;
            drive(conn, &io, false)
        }
    }
}

/// The socket during the handshake, every wait bounded by the deadline.
struct HandshakeIo<'a> {
    tcp: &'a TcpStream,
    deadline: Instant,
    timeout: Duration,
}

impl HandshakeIo<'_> {
    fn left(&self) -> Result<Duration, TlsFailure> {
        let d = self.deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(TlsFailure::Timeout(self.timeout))
        } else {
            Ok(d)
        }
    }

    fn failure(&self, e: io::Error) -> TlsFailure {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                TlsFailure::Timeout(self.timeout)
            }
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => TlsFailure::Closed,
            _ => TlsFailure::Other(e.to_string()),
        }
    }

    fn refuse_plain_peer(&self) -> Result<(), TlsFailure> {
        self.tcp
            .set_read_timeout(Some(self.left()?))
            .map_err(|e| self.failure(e))?;
        let mut first = [0u8; 3];
        match self.tcp.peek(&mut first) {
            Ok(0) => Err(TlsFailure::Closed),
            // A VERSIONS cell: CircID 0, command 7 (docs/protocol.md §1).
            Ok(n) if n >= 3 && first == [0, 0, 7] => Err(TlsFailure::PlainPeer),
            Ok(_) => Ok(()),
            Err(e) => Err(self.failure(e)),
        }
    }

    fn write(&self, bytes: &[u8]) -> Result<(), TlsFailure> {
        self.tcp
            .set_write_timeout(Some(self.left()?))
            .map_err(|e| self.failure(e))?;
        (&*self.tcp).write_all(bytes).map_err(|e| self.failure(e))
    }

    /// Appends what the socket has to `inb`.
    fn read(&self, inb: &mut Vec<u8>) -> Result<(), TlsFailure> {
        self.tcp
            .set_read_timeout(Some(self.left()?))
            .map_err(|e| self.failure(e))?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match (&*self.tcp).read(&mut chunk) {
                Ok(0) => return Err(TlsFailure::Closed),
                Ok(n) => {
                    inb.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.failure(e)),
            }
        }
    }
}

/// Where the record that begins at `at` ends, if `inb` holds all of it. A
/// header that rustls refuses by itself (garbage instead of a ClientHello,
/// say) is given to rustls with everything after it, so that it refuses it
/// at once rather than at the deadline.
fn next_record(inb: &[u8], at: usize) -> Option<usize> {
    /// rustls refuses a record this long or longer from its header alone.
    const NO_RECORD_LEN: usize = (1 << 14) + 2048;
    let rest = &inb[at..];
    if rest.len() < 5 {
        return None;
    }
    let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
    // Content types 20 to 24 (heartbeat included, as rustls reads them),
    // a 3.x version.
    let plausible = (20..=24).contains(&rest[0]) && rest[1] == 3 && len < NO_RECORD_LEN;
    if !plausible {
        return Some(inb.len());
    }
    (rest.len() >= 5 + len).then_some(at + 5 + len)
}

/// Drives rustls's unbuffered handshake. rustls sees whole records one at a
/// time, so that it stops at the record that ends the handshake: what
/// follows (the peer's first cells) is the record layer's (`record`).
fn drive<C: Unbuffered>(
    mut conn: C,
    io: &HandshakeIo<'_>,
    exit: bool,
) -> Result<Session, TlsFailure> {
    // Received, not yet discarded by rustls; its first `given` bytes are
    // whole records rustls may see.
    let mut inb: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut given = 0;
    let mut out: Vec<u8> = Vec::new();
    loop {
        let status = conn.process(&mut inb[..given]);
        let discard = status.discard;
        let mut blocked = false;
        match status.state {
            Err(e) => {
                inb.drain(..discard);
                given -= discard;
                send_alert(&mut conn, &mut inb[..given], io);
                return Err(TlsFailure::from_rustls(e, exit));
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => encode(&mut data, &mut out)?,
            Ok(ConnectionState::TransmitTlsData(t)) => {
                io.write(&out)?;
                out.clear();
                t.done();
            }
            // WriteTraffic comes before the handshake's end on the exit's
            // side (it may send after its Finished): wait for the client's.
            Ok(ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_)) => {
                blocked = true
            }
            Ok(other) => {
                return Err(TlsFailure::Other(format!(
                    "unexpected TLS state during the handshake: {other:?}"
                )))
            }
        }
        inb.drain(..discard);
        given -= discard;
        if !blocked {
            continue;
        }
        if !conn.common().is_handshaking() {
            // rustls has used up every record it was given.
            debug_assert_eq!(given, 0);
            break;
        }
        match next_record(&inb, given) {
            Some(end) => given = end,
            None => io.read(&mut inb)?,
        }
    }
    // R13.2: an exit serves only clients that asked for halfpipe/1.
    if conn.common().alpn_protocol() != Some(ALPN) {
        return Err(TlsFailure::NoAlpn);
    }
    let info = TlsInfo::of(conn.common());
    let suite = conn
        .common()
        .negotiated_cipher_suite()
        .and_then(|s| s.tls13())
        .ok_or_else(|| TlsFailure::Other("no TLS 1.3 cipher suite".into()))?;
    let (secrets, kernel) = conn
        .into_kernel()
        .map_err(|e| TlsFailure::Other(e.to_string()))?;
    let (opener, sealer) = record::split(secrets, kernel, suite, &inb[given..])
        .map_err(|e| TlsFailure::Other(e.to_string()))?;
    Ok(Session {
        opener,
        sealer,
        info,
    })
}

fn encode<D>(data: &mut EncodeTlsData<'_, D>, out: &mut Vec<u8>) -> Result<(), TlsFailure> {
    let at = out.len();
    out.resize(at + 16 * 1024, 0);
    loop {
        match data.encode(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.resize(at + required_size, 0)
            }
            Err(e) => return Err(TlsFailure::Other(e.to_string())),
        }
    }
}

/// Tells the peer why the handshake failed (rustls has queued the alert),
/// if it listens.
/// `given` is what rustls has seen and not discarded: it must see the same
/// again.
fn send_alert<C: Unbuffered>(conn: &mut C, given: &mut [u8], io: &HandshakeIo<'_>) {
    let mut out = Vec::new();
    // rustls hands out the alert it queued before it looks at `given`
    // again. Only once: asked again, it would deframe the failed record
    // anew and queue a second fatal alert (which it asserts against).
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = conn.process(given).state {
        if encode(&mut data, &mut out).is_ok() {
            let _ = io.tcp.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = (&*io.tcp).write_all(&out);
        }
    }
}

/// Plaintext over a TLS session for the VERSIONS handshake, which runs on
/// the link's thread before the link starts. Each read is bounded by what
/// is left until `deadline` (R1.6 with R13.3), so a peer that sends a
/// record a byte at a time cannot stretch the handshake.
pub struct HandshakeStream<'a> {
    pub tcp: &'a TcpStream,
    pub session: &'a mut Session,
    pub deadline: Instant,
}

impl HandshakeStream<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::ErrorKind::TimedOut.into())
        } else {
            Ok(left)
        }
    }
}

impl Read for HandshakeStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = Vec::with_capacity(buf.len());
        loop {
            self.tcp.set_read_timeout(Some(self.left()?))?;
            let opened = self.session.opener.read_once(self.tcp, &mut got)?;
            if opened.wants_write {
                self.flush_key_update()?;
            }
            if opened.n > 0 || opened.end {
                buf[..opened.n].copy_from_slice(&got);
                return Ok(opened.n);
            }
        }
    }
}

impl HandshakeStream<'_> {
    fn flush_key_update(&mut self) -> io::Result<()> {
        self.session
            .sealer
            .answer_key_update()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        io::Write::flush(self)
    }
}

impl io::Write for HandshakeStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.session
            .sealer
            .seal(&[buf.to_vec()])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.set_write_timeout(Some(self.left()?))?;
        self.session.sealer.write_to(self.tcp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `pair` with the given name and validity.
    fn cert(pair: &rcgen::KeyPair, name: &str, expired: bool) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        params.self_signed(pair).unwrap().der().clone()
    }

    #[test]
    fn only_the_key_of_a_certificate_counts() {
        // R13.6: the names and validity of a certificate do not matter, its
        // key does (R13.5): the pin accepts any certificate of the pinned
        // key, an expired one under another name too, and no other key.
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let fresh = cert(&pair, "halfpipe", false);
        let odd = cert(&pair, "not.this.host.example", true);
        let fp = fingerprint_of(&fresh).unwrap();
        assert_eq!(fingerprint_of(&odd).unwrap(), fp);
        assert_eq!(fp, Fingerprint::of_spki(&pair.public_key_der()));
        let pin = PinnedExit {
            expected: fp,
            provider: provider(),
        };
        let name = ServerName::try_from("halfpipe").unwrap();
        let now = UnixTime::now();
        for c in [&fresh, &odd] {
            assert!(pin.verify_server_cert(c, &[], &name, &[], now).is_ok());
        }
        let stranger = cert(&other, "halfpipe", false);
        match pin.verify_server_cert(&stranger, &[], &name, &[], now) {
            Err(e) => assert!(matches!(
                TlsFailure::from_rustls(e, false),
                TlsFailure::Refused(Refusal::WrongExit { .. })
            ),),
            Ok(_) => panic!("another key passed the pin"),
        }
    }
}
