//! The kit's TLS (docs/protocol.md §13): a client and an exit of its own,
//! which record the certificate the peer showed so that a case can check
//! it, and the identities they show.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};

/// R13.2.
pub const ALPN: &[u8] = b"halfpipe/1";

/// A key pair and a self-signed certificate for it.
pub struct KitIdentity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    pub fingerprint: String,
}

impl KitIdentity {
    /// A fresh Ed25519 identity; `odd` gives its certificate a name nobody
    /// would check against and a validity that ended long ago (R13.6).
    pub fn new(odd: bool) -> KitIdentity {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("an Ed25519 key");
        let name = if odd {
            "not.this.host.example"
        } else {
            "halfpipe"
        };
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
        if odd {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = params
            .self_signed(&pair)
            .expect("a certificate")
            .der()
            .clone();
        let fingerprint = fingerprint(&cert).expect("our own certificate parses");
        KitIdentity {
            cert,
            key: PrivatePkcs8KeyDer::from(pair.serialize_der()),
            fingerprint,
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// §13's fingerprint: SHA-256 of the key's SubjectPublicKeyInfo, in hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let digest = Sha256::digest(ee.subject_public_key_info().as_ref());
    Some(digest.iter().map(|b| format!("{b:02x}")).collect())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The fingerprint of the certificate the peer showed, if it showed one.
#[derive(Debug, Default)]
pub struct Seen(Mutex<Option<String>>);

impl Seen {
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok()?.clone()
    }

    fn record(&self, cert: &CertificateDer<'_>) -> Result<(), Error> {
        let fp = fingerprint(cert).ok_or(Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        if let Ok(mut s) = self.0.lock() {
            *s = Some(fp);
        }
        Ok(())
    }
}

/// Accepts any certificate and records it; the case judges it. The
/// handshake signature is still checked (R13.4, R13.8).
#[derive(Debug)]
struct Recorder {
    seen: Arc<Seen>,
    provider: Arc<CryptoProvider>,
    mandatory: bool,
}

impl Recorder {
    fn tls13(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.seen.record(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("no TLS 1.2".into()))
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Recorder {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.seen.record(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("no TLS 1.2".into()))
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// The kit as a TLS client: `alpn` offered (none if empty), `identity`
/// shown if the exit asks; the exit's certificate goes into `seen`.
pub fn client_config(
    alpn: &[&[u8]],
    identity: Option<&KitIdentity>,
    seen: Arc<Seen>,
) -> Arc<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recorder {
            seen,
            provider,
            mandatory: false,
        }));
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(vec![id.cert.clone()], id.key())
            .expect("our own certificate and key"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    config.enable_sni = false;
    Arc::new(config)
}

/// The kit as a TLS exit, showing `identity`, asking for a client
/// certificate (and requiring one) when `ask`; the client's goes into
/// `seen`.
pub fn server_config(identity: &KitIdentity, ask: bool, seen: Arc<Seen>) -> Arc<ServerConfig> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3");
    let builder = if ask {
        builder.with_client_cert_verifier(Arc::new(Recorder {
            seen,
            provider,
            mandatory: true,
        }))
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(vec![identity.cert.clone()], identity.key())
        .expect("our own certificate and key");
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// A ClientHello that offers TLS 1.2 only (no supported_versions
/// extension), written out by hand: rustls as built here speaks 1.3 only.
pub fn tls12_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session ID
                  // ECDHE-ECDSA/RSA with AES-128-GCM and AES-256-GCM, and CHACHA20.
    let suites: [u16; 4] = [0xc02b, 0xc02f, 0xc02c, 0xcca9];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    let mut ext = Vec::new();
    // supported_groups: x25519, secp256r1
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    // signature_algorithms: ed25519, ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256
    ext.extend_from_slice(&[
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x08, 0x07, 0x04, 0x03, 0x08, 0x04,
    ]);
    // ALPN: halfpipe/1
    let mut alpn = vec![ALPN.len() as u8];
    alpn.extend_from_slice(ALPN);
    ext.extend_from_slice(&[0x00, 0x10]);
    ext.extend_from_slice(&((alpn.len() + 2) as u16).to_be_bytes());
    ext.extend_from_slice(&(alpn.len() as u16).to_be_bytes());
    ext.extend_from_slice(&alpn);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}
