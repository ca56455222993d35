//! A TLS link's records once its handshake is done (docs/protocol.md §13,
//! RFC 8446 §5): each link thread protects its own direction. The link
//! reader opens the peer's records in place, in the buffer it read them
//! into; the link writer seals its cells straight into records of its own.
//! Neither takes a lock on the way, and the only copy left is the one AEAD
//! sealing needs (the reader's copy out of its buffer into the cell buffer).
//!
//! rustls runs the handshake and keeps the key schedule (its
//! `KernelConnection`): this module asks it for the next key when either
//! side updates its keys. What rustls's own record layer would do
//! besides, this module does: key updates (the peer's, answered when it
//! asks; ours, before the suite's confidentiality limit), close_notify and
//! alerts, and the record size limits.

use parking_lot::Mutex;
use rustls::client::ClientConnectionData;
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, Error, ExtractedSecrets,
    HandshakeType, PeerMisbehaved, ProtocolVersion, Tls13CipherSuite,
};
use std::io;
use std::net::TcpStream;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A record's header: content type, legacy version, length.
const HEADER: usize = 5;
/// RFC 8446 §5.1: at most 2^14 bytes of plaintext in a record.
const MAX_PLAIN: usize = 1 << 14;
/// RFC 8446 §5.2: at most 2^14 + 256 bytes of ciphertext in a record.
const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// Ciphertext the reader asks the socket for at a time: as much as a plain
/// link's reader asks for, so that a busy TLS link also hands its circuits
/// large, well-filled buffers.
const CIPHER_READ: usize = 256 * 1024;
/// Post-handshake messages (a key update, a session ticket) are small; a
/// peer that sends more than this in pieces is not making one.
const MAX_HANDSHAKE_MSG: usize = 64 * 1024;
/// Records in a row that carry no application data (key updates, session
/// tickets, empty records, user_canceled): a peer sending more than this is
/// making us work for nothing, as rustls's own limits say.
const MAX_IDLE_RECORDS: u32 = 64;
/// A KeyUpdate's request byte (RFC 8446 §4.6.3).
const UPDATE_NOT_REQUESTED: u8 = 0;
const UPDATE_REQUESTED: u8 = 1;

/// rustls's key schedule after the handshake, for either side.
pub enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

/// What the two directions share: the key schedule, and the peer's request
/// for our key update, which the reader hears and the writer answers.
struct Keys {
    kernel: Mutex<Kernel>,
    /// This side is the client (it may get session tickets).
    client: bool,
    update_requested: AtomicBool,
    suite: &'static Tls13CipherSuite,
}

#[derive(Clone, Copy)]
enum Direction {
    Send,
    Receive,
}

impl Keys {
    fn next(&self, dir: Direction) -> Result<(AeadKey, Iv), Error> {
        let mut kernel = self.kernel.lock();
        let (_seq, secrets) = match (&mut *kernel, dir) {
            (Kernel::Client(k), Direction::Send) => k.update_tx_secret()?,
            (Kernel::Client(k), Direction::Receive) => k.update_rx_secret()?,
            (Kernel::Server(k), Direction::Send) => k.update_tx_secret()?,
            (Kernel::Server(k), Direction::Receive) => k.update_rx_secret()?,
        };
        key_and_iv(secrets)
    }
}

fn key_and_iv(secrets: ConnectionTrafficSecrets) -> Result<(AeadKey, Iv), Error> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(Error::General(
            "a cipher suite halfpipe does not offer".into(),
        )),
    }
}

/// The two directions of a session whose handshake is done. `leftover` is
/// ciphertext the handshake read past its last record.
pub fn split(
    secrets: ExtractedSecrets,
    kernel: Kernel,
    suite: &'static Tls13CipherSuite,
    leftover: &[u8],
) -> Result<(Opener, Sealer), Error> {
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let (tx_key, tx_iv) = key_and_iv(tx)?;
    let (rx_key, rx_iv) = key_and_iv(rx)?;
    let keys = Arc::new(Keys {
        client: matches!(kernel, Kernel::Client(_)),
        kernel: Mutex::new(kernel),
        update_requested: AtomicBool::new(false),
        suite,
    });
    let mut cipher = Vec::with_capacity(CIPHER_READ.max(leftover.len()));
    cipher.extend_from_slice(leftover);
    let opener = Opener {
        dec: suite.aead_alg.decrypter(rx_key, rx_iv),
        seq: rx_seq,
        cipher,
        start: 0,
        plain: 0..0,
        handshake: Vec::new(),
        idle_records: 0,
        #[cfg(test)]
        rx_updates: 0,
        closed: false,
        eof: false,
        keys: keys.clone(),
    };
    let sealer = Sealer {
        enc: suite.aead_alg.encrypter(tx_key, tx_iv),
        seq: tx_seq,
        // Our key update is the last record under the old key.
        rekey_at: suite.common.confidentiality_limit.saturating_sub(1),
        records: Vec::new(),
        keys,
    };
    Ok((opener, sealer))
}

/// An error that ends the link, carrying rustls's error (so that the
/// handshake's refusals can be told apart, see `TlsFailure::from_rustls`).
fn fatal(e: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What one read of a link brought (`Opener::read`, and `Transport::read`
/// on a plain link too).
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    /// Plaintext bytes appended.
    pub n: usize,
    /// The peer's close_notify has come and every byte before it is read
    /// (R13.10).
    pub end: bool,
    /// The peer asked for our key update: the writer must send it now.
    pub wants_write: bool,
}

/// The reader's half: opens the peer's records in its own buffer.
pub struct Opener {
    dec: Box<dyn MessageDecrypter>,
    seq: u64,
    /// Ciphertext read from the socket; records are opened in place.
    cipher: Vec<u8>,
    /// Where the first record not yet opened begins.
    start: usize,
    /// Plaintext of the last record opened, not yet handed out.
    plain: Range<usize>,
    /// A post-handshake message arriving in pieces.
    handshake: Vec<u8>,
    /// Records since the last one with application data in it.
    idle_records: u32,
    /// Receive keys taken since the handshake.
    #[cfg(test)]
    rx_updates: u32,
    /// close_notify has come: nothing after it is read.
    closed: bool,
    /// The socket has said end of file.
    eof: bool,
    keys: Arc<Keys>,
}

impl Opener {
    /// Appends the peer's plaintext to `buf`, at most up to its capacity
    /// (which must not be full), reading the socket only when no whole
    /// record is left. Blocks until there is plaintext, the end, or a key
    /// update to answer.
    pub fn read(&mut self, tcp: &TcpStream, buf: &mut Vec<u8>) -> io::Result<Opened> {
        self.read_from(tcp, buf, usize::MAX)
    }

    /// As `read`, but with at most one read of the socket: for a caller
    /// that bounds each wait itself (the VERSIONS handshake's deadline).
    /// Nothing but a partial record yet: `n` is 0 and `end` false.
    pub fn read_once(&mut self, tcp: &TcpStream, buf: &mut Vec<u8>) -> io::Result<Opened> {
        self.read_from(tcp, buf, 1)
    }

    fn read_from(
        &mut self,
        tcp: &TcpStream,
        buf: &mut Vec<u8>,
        mut fills: usize,
    ) -> io::Result<Opened> {
        let mut opened = Opened {
            n: 0,
            end: false,
            wants_write: false,
        };
        loop {
            let room = buf.capacity() - buf.len();
            if !self.plain.is_empty() {
                let k = self.plain.len().min(room);
                let from = self.plain.start;
                buf.extend_from_slice(&self.cipher[from..from + k]);
                self.plain.start += k;
                opened.n += k;
                if !self.plain.is_empty() {
                    return Ok(opened);
                }
            }
            if self.closed {
                opened.end = opened.n == 0;
                return Ok(opened);
            }
            if let Some(len) = self.whole_record()? {
                opened.wants_write |= self.open(len)?;
                continue;
            }
            if opened.n > 0 || opened.wants_write || fills == 0 {
                return Ok(opened);
            }
            if self.eof {
                // A FIN without close_notify, or within a record (R13.10).
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without a TLS close_notify",
                ));
            }
            self.fill(tcp)?;
            fills -= 1;
        }
    }

    /// The length of the whole record at `start`, if it is all here.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        let rest = &self.cipher[self.start..];
        if rest.len() < HEADER {
            return Ok(None);
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        // After the handshake every record is protected: outer type
        // application_data, legacy version 3.3 (RFC 8446 §5.2).
        if rest[0] != u8::from(ContentType::ApplicationData) {
            return Err(fatal(Error::InappropriateMessage {
                expect_types: vec![ContentType::ApplicationData],
                got_type: ContentType::from(rest[0]),
            }));
        }
        if len > MAX_CIPHER {
            return Err(fatal(Error::PeerSentOversizedRecord));
        }
        Ok((rest.len() >= HEADER + len).then_some(len))
    }

    /// Opens the record at `start` (R13.9: one that fails authentication
    /// ends the link before any of its bytes is read). Returns whether the
    /// peer asked for our key update.
    fn open(&mut self, len: usize) -> io::Result<bool> {
        let body = self.start + HEADER..self.start + HEADER + len;
        self.start = body.end;
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut self.cipher[body.clone()],
        );
        let plain = self.dec.decrypt(msg, self.seq).map_err(fatal)?;
        self.seq += 1;
        let (typ, plen) = (plain.typ, plain.payload.len());
        // The plaintext sits at the front of the record's body.
        let text = body.start..body.start + plen;
        if typ == ContentType::ApplicationData && plen > 0 {
            self.idle_records = 0;
        } else {
            self.idle_records += 1;
            if self.idle_records > MAX_IDLE_RECORDS {
                return Err(fatal(PeerMisbehaved::TooManyKeyUpdateRequests.into()));
            }
        }
        if typ != ContentType::Handshake && !self.handshake.is_empty() {
            // RFC 8446 §5.1: a handshake message is not interleaved.
            return Err(fatal(
                PeerMisbehaved::MessageInterleavedWithHandshakeMessage.into(),
            ));
        }
        match typ {
            ContentType::ApplicationData => {
                self.plain = text;
                Ok(false)
            }
            ContentType::Alert => self.alert(text).map(|()| false),
            // RFC 8446 §5.1: no zero-length handshake fragments.
            ContentType::Handshake if plen == 0 => Err(fatal(Error::InvalidMessage(
                rustls::InvalidMessage::InvalidEmptyPayload,
            ))),
            ContentType::Handshake => {
                self.handshake.extend_from_slice(&self.cipher[text]);
                self.handshake_messages()
            }
            other => Err(fatal(Error::InappropriateMessage {
                expect_types: vec![ContentType::ApplicationData],
                got_type: other,
            })),
        }
    }

    fn alert(&mut self, text: Range<usize>) -> io::Result<()> {
        let [_level, desc] = self.cipher[text] else {
            return Err(fatal(Error::InvalidMessage(
                rustls::InvalidMessage::MessageTooShort,
            )));
        };
        match AlertDescription::from(desc) {
            AlertDescription::CloseNotify => {
                self.closed = true;
                Ok(())
            }
            // RFC 8446 §6.1: a user_canceled is followed by close_notify.
            AlertDescription::UserCanceled => Ok(()),
            other => Err(fatal(Error::AlertReceived(other))),
        }
    }

    /// Acts on the whole post-handshake messages gathered so far.
    fn handshake_messages(&mut self) -> io::Result<bool> {
        let mut wants_write = false;
        loop {
            let m = &self.handshake;
            if m.len() < 4 {
                break;
            }
            let len = u32::from_be_bytes([0, m[1], m[2], m[3]]) as usize;
            if len > MAX_HANDSHAKE_MSG {
                return Err(fatal(Error::InvalidMessage(
                    rustls::InvalidMessage::HandshakePayloadTooLarge,
                )));
            }
            if m.len() < 4 + len {
                break;
            }
            let typ = HandshakeType::from(m[0]);
            match (typ, &m[4..4 + len]) {
                (HandshakeType::KeyUpdate, &[request]) => {
                    if m.len() != 4 + len {
                        // RFC 8446 §5.1: a key change ends its record.
                        return Err(fatal(PeerMisbehaved::KeyEpochWithPendingFragment.into()));
                    }
                    let requested = match request {
                        UPDATE_NOT_REQUESTED => false,
                        UPDATE_REQUESTED => true,
                        _ => {
                            return Err(fatal(Error::InvalidMessage(
                                rustls::InvalidMessage::InvalidKeyUpdate,
                            )))
                        }
                    };
                    let (key, iv) = self.keys.next(Direction::Receive).map_err(fatal)?;
                    self.dec = self.keys.suite.aead_alg.decrypter(key, iv);
                    self.seq = 0;
                    #[cfg(test)]
                    {
                        self.rx_updates += 1;
                    }
                    // The writer is told once per update it owes.
                    if requested && !self.keys.update_requested.swap(true, Ordering::AcqRel) {
                        wants_write = true;
                    }
                }
                // A session ticket from an exit that is not halfpipe:
                // resumption is off (R13.1), so it is not kept.
                (HandshakeType::NewSessionTicket, _) if self.keys.client => {}
                (typ, _) => {
                    return Err(fatal(Error::InappropriateHandshakeMessage {
                        expect_types: vec![HandshakeType::KeyUpdate],
                        got_type: typ,
                    }))
                }
            }
            self.handshake.drain(..4 + len);
        }
        Ok(wants_write)
    }

    /// Reads more ciphertext from the socket, keeping a partial record.
    fn fill(&mut self, tcp: &TcpStream) -> io::Result<()> {
        self.cipher.drain(..self.start);
        self.start = 0;
        self.plain = 0..0;
        if self.cipher.capacity() - self.cipher.len() < MAX_CIPHER {
            self.cipher.reserve(CIPHER_READ);
        }
        let spare = self.cipher.spare_capacity_mut();
        let k = loop {
            match socket2::SockRef::from(tcp).recv(spare) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        // SAFETY: recv() initialised the first `k` bytes of the spare
        // capacity (socket2's contract for `recv` into MaybeUninit).
        unsafe { self.cipher.set_len(self.cipher.len() + k) };
        if k == 0 {
            self.eof = true;
        }
        Ok(())
    }
}

/// The writer's half: seals cells into records, ready for one writev().
pub struct Sealer {
    enc: Box<dyn MessageEncrypter>,
    seq: u64,
    /// The sequence number at which we update our key ourselves.
    rekey_at: u64,
    /// Records sealed and not yet written.
    records: Vec<Vec<u8>>,
    keys: Arc<Keys>,
}

impl Sealer {
    /// Seals `bufs`, in order, as application data.
    pub fn seal(&mut self, bufs: &[Vec<u8>]) -> Result<(), Error> {
        let slices: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
        let mut rest = OutboundChunks::new(&slices);
        while !rest.is_empty() {
            let (record, tail) = rest.split_at(MAX_PLAIN);
            self.seal_record(ContentType::ApplicationData, record)?;
            rest = tail;
        }
        Ok(())
    }

    /// Seals our key update now if the peer asked for it (RFC 8446
    /// §4.6.3: before any more application data).
    pub fn answer_key_update(&mut self) -> Result<(), Error> {
        // A load first: this runs before every record.
        if self.keys.update_requested.load(Ordering::Relaxed)
            && self.keys.update_requested.swap(false, Ordering::AcqRel)
        {
            self.update_key(UPDATE_NOT_REQUESTED)?;
        }
        Ok(())
    }

    /// Seals a close_notify alert (R13.10).
    pub fn seal_close_notify(&mut self) -> Result<(), Error> {
        let alert = [1, u8::from(AlertDescription::CloseNotify)];
        self.seal_record(ContentType::Alert, OutboundChunks::Single(&alert))
    }

    /// Writes every record sealed so far.
    pub fn write_to(&mut self, tcp: &TcpStream) -> io::Result<()> {
        let r = super::transport::write_all_vectored(tcp, &self.records);
        self.records.clear();
        r
    }

    /// The records sealed so far, for a caller that writes them itself.
    pub fn take_records(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.records)
    }

    fn seal_record(&mut self, typ: ContentType, payload: OutboundChunks<'_>) -> Result<(), Error> {
        if self.seq >= self.rekey_at {
            self.update_key(UPDATE_NOT_REQUESTED)?;
        }
        self.answer_key_update()?;
        self.seal_now(typ, payload)
    }

    fn seal_now(&mut self, typ: ContentType, payload: OutboundChunks<'_>) -> Result<(), Error> {
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload,
        };
        let record = self.enc.encrypt(msg, self.seq)?;
        self.seq += 1;
        self.records.push(record.encode());
        Ok(())
    }

    /// Sends a KeyUpdate under the old key and takes the next one. We
    /// never ask for the peer's (`request` 0, but in tests): when the peer
    /// asked, this is the answer, and when we rekey at the confidentiality
    /// limit the peer's direction has its own limit.
    fn update_key(&mut self, request: u8) -> Result<(), Error> {
        let msg = [u8::from(HandshakeType::KeyUpdate), 0, 0, 1, request];
        self.seal_now(ContentType::Handshake, OutboundChunks::Single(&msg))?;
        let (key, iv) = self.keys.next(Direction::Send)?;
        self.enc = self.keys.suite.aead_alg.encrypter(key, iv);
        self.seq = 0;
        Ok(())
    }

    /// Test hook: update the key after `records` more records.
    #[cfg(test)]
    pub(crate) fn rekey_after(&mut self, records: u64) {
        self.rekey_at = self.seq + records;
    }

    /// Test hook: seal a KeyUpdate that asks the peer for theirs.
    #[cfg(test)]
    pub(crate) fn request_key_update(&mut self) -> Result<(), Error> {
        self.update_key(UPDATE_REQUESTED)
    }
}

#[cfg(test)]
mod tests {
    //! Our record layer against rustls's own, over a loopback connection:
    //! what either seals, the other opens, through key updates both ways.
    use super::*;
    use crate::link::handshake::TlsConfig;
    use crate::link::tls::{self, Session};
    use crate::process::identity::Identity;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    /// rustls's buffered server on one end.
    struct Peer {
        conn: rustls::ServerConnection,
        tcp: TcpStream,
    }

    impl Peer {
        fn send(&mut self, data: &[u8]) {
            rustls::Stream::new(&mut self.conn, &mut self.tcp)
                .write_all(data)
                .unwrap();
        }

        fn recv(&mut self, n: usize) -> Vec<u8> {
            let mut got = vec![0; n];
            rustls::Stream::new(&mut self.conn, &mut self.tcp)
                .read_exact(&mut got)
                .unwrap();
            got
        }
    }

    fn identity(name: &str) -> Identity {
        let dir = std::env::temp_dir().join(format!(
            "halfpipe-record-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let id = Identity::load_or_create(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        id
    }

    /// Our client's session and rustls's server, handshake done.
    fn pair() -> (Session, TcpStream, Peer) {
        let exit = identity("exit");
        let client = identity("client");
        let server_config = tls::server_config(&exit, None);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::Builder::new()
            .name("rustls peer".into())
            .spawn(move || {
                let (mut tcp, _) = listener.accept().unwrap();
                let mut conn = rustls::ServerConnection::new(server_config).unwrap();
                while conn.is_handshaking() {
                    conn.complete_io(&mut tcp).unwrap();
                }
                Peer { conn, tcp }
            })
            .unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        let config = TlsConfig::Client(tls::client_config(&client, exit.fingerprint));
        let timeout = Duration::from_secs(10);
        let session = tls::handshake(&tcp, &config, Instant::now() + timeout, timeout).unwrap();
        (session, tcp, server.join().unwrap())
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn read_exact(s: &mut Session, tcp: &TcpStream, n: usize) -> (Vec<u8>, bool) {
        let mut got = Vec::with_capacity(n);
        let mut wants_write = false;
        while got.len() < n {
            let o = s.opener.read(tcp, &mut got).unwrap();
            assert!(!o.end, "close_notify after {} of {n} bytes", got.len());
            wants_write |= o.wants_write;
        }
        (got, wants_write)
    }

    #[test]
    fn records_carry_bytes_both_ways_in_any_split() {
        let (mut s, tcp, mut peer) = pair();
        // Buffers that do not line up with records.
        let data = pattern(100_000, 7);
        let bufs: Vec<Vec<u8>> = [1, 16383, 16385, 3, 40000, 27228]
            .iter()
            .scan(0, |at, &len| {
                let b = data[*at..*at + len].to_vec();
                *at += len;
                Some(b)
            })
            .collect();
        s.sealer.seal(&bufs).unwrap();
        s.sealer.write_to(&tcp).unwrap();
        assert_eq!(peer.recv(data.len()), data);
        let back = pattern(70_001, 3);
        peer.send(&back);
        assert_eq!(read_exact(&mut s, &tcp, back.len()).0, back);
    }

    #[test]
    fn the_peers_key_update_is_followed_and_answered() {
        let (mut s, tcp, mut peer) = pair();
        // rustls's refresh asks for ours in return (update_requested).
        peer.conn.refresh_traffic_keys().unwrap();
        let data = pattern(40_000, 1);
        peer.send(&data);
        let (got, wants_write) = read_exact(&mut s, &tcp, data.len());
        assert_eq!(got, data);
        assert!(wants_write, "a requested key update was not passed on");
        assert_eq!(s.opener.rx_updates, 1);
        s.sealer.answer_key_update().unwrap();
        s.sealer.seal(&[b"after our update".to_vec()]).unwrap();
        // rustls reads on without our answer, so count it: the KeyUpdate,
        // then the data under the new key.
        assert_eq!(s.sealer.records.len(), 2);
        assert_eq!(s.sealer.seq, 1);
        s.sealer.write_to(&tcp).unwrap();
        assert_eq!(peer.recv(16), b"after our update");
        // Answered once only.
        s.sealer.answer_key_update().unwrap();
        assert!(s.sealer.records.is_empty());
    }

    #[test]
    fn we_update_our_key_before_the_limit_and_on_request() {
        let (mut s, tcp, mut peer) = pair();
        s.sealer.rekey_after(2);
        let data = pattern(5 * MAX_PLAIN + 10, 9);
        s.sealer.seal(std::slice::from_ref(&data)).unwrap();
        s.sealer.write_to(&tcp).unwrap();
        assert_eq!(peer.recv(data.len()), data);
        assert!(s.sealer.seq < 5, "no key update: seq {}", s.sealer.seq);
        // Asking rustls for its update: it answers before its next data.
        s.sealer.request_key_update().unwrap();
        s.sealer.seal(&[b"asked".to_vec()]).unwrap();
        s.sealer.write_to(&tcp).unwrap();
        assert_eq!(peer.recv(5), b"asked");
        peer.send(b"answered");
        assert_eq!(read_exact(&mut s, &tcp, 8).0, b"answered");
        assert_eq!(s.opener.rx_updates, 1, "rustls did not answer our request");
    }

    #[test]
    fn close_notify_ends_the_stream_after_its_data() {
        let (mut s, tcp, mut peer) = pair();
        peer.send(b"last words");
        peer.conn.send_close_notify();
        peer.conn.complete_io(&mut peer.tcp).unwrap();
        assert_eq!(read_exact(&mut s, &tcp, 10).0, b"last words");
        let mut rest = Vec::with_capacity(64);
        let o = s.opener.read(&tcp, &mut rest).unwrap();
        assert_eq!(
            o,
            Opened {
                n: 0,
                end: true,
                wants_write: false
            }
        );
        // And ours reaches rustls as the end of its stream.
        s.sealer.seal_close_notify().unwrap();
        s.sealer.write_to(&tcp).unwrap();
        let mut tail = Vec::new();
        let n = rustls::Stream::new(&mut peer.conn, &mut peer.tcp)
            .read_to_end(&mut tail)
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn a_flipped_bit_or_a_fin_without_close_notify_ends_the_link() {
        // R13.9: nothing of a record that fails authentication is read.
        let (mut s, tcp, mut peer) = pair();
        peer.conn.writer().write_all(&pattern(1000, 5)).unwrap();
        let mut wire = Vec::new();
        while peer.conn.wants_write() {
            peer.conn.write_tls(&mut wire).unwrap();
        }
        wire[HEADER + 500] ^= 0x10;
        peer.tcp.write_all(&wire).unwrap();
        let mut got = Vec::with_capacity(4096);
        let e = s.opener.read(&tcp, &mut got).unwrap_err();
        assert!(got.is_empty());
        let inner = e.get_ref().and_then(|e| e.downcast_ref::<Error>());
        assert_eq!(inner, Some(&Error::DecryptError), "{e}");

        // R13.10: a FIN with no close_notify is an error, not an end.
        let (mut s, tcp, mut peer) = pair();
        peer.send(b"cut");
        peer.tcp.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(read_exact(&mut s, &tcp, 3).0, b"cut");
        let e = s
            .opener
            .read(&tcp, &mut Vec::with_capacity(64))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn records_that_break_the_rules_end_the_link() {
        let (mut s, tcp, mut peer) = pair();
        // An unprotected record after the handshake.
        peer.tcp.write_all(&[23 - 1, 3, 3, 0, 2, 1, 0]).unwrap();
        let e = s
            .opener
            .read(&tcp, &mut Vec::with_capacity(64))
            .unwrap_err();
        assert!(e.to_string().contains("Handshake"), "{e}");
        // A record longer than RFC 8446 allows.
        let (mut s, tcp, mut peer) = pair();
        let len = (MAX_CIPHER + 1) as u16;
        let mut rec = vec![23, 3, 3];
        rec.extend_from_slice(&len.to_be_bytes());
        peer.tcp.write_all(&rec).unwrap();
        let e = s
            .opener
            .read(&tcp, &mut Vec::with_capacity(64))
            .unwrap_err();
        let inner = e.get_ref().and_then(|e| e.downcast_ref::<Error>());
        assert_eq!(inner, Some(&Error::PeerSentOversizedRecord), "{e}");
    }
}
