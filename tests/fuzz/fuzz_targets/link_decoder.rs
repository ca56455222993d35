//! The link byte stream (docs/protocol.md §1, §2, §4), read the way the
//! daemon's link reads it (src/link/handshake.rs, src/link/reader.rs):
//! first the peer's VERSIONS cell, byte-exact, with the requests
//! `read_versions` makes; then cells, decoded from a buffer that reads
//! append to and `dispatch` drains. Bytes arrive in arbitrary chunks.
//!
//! Input: byte 0 gives `k` (0-7) chunk-size bytes that follow it; the rest
//! is the byte stream from the peer. The chunk sizes (cycled) say how many
//! bytes each read() on the "socket" returns at most; `k = 0` delivers the
//! stream in one piece.
//!
//! Checks, besides "no panic":
//! - `decode_versions` uses exactly the bytes `read_versions` asked for
//!   (its `debug_assert`), never needs 0 more bytes while incomplete, and
//!   gives the same answer as decoding the whole stream at once; a decoded
//!   VERSIONS re-encodes to the bytes read; errors match §1's conditions;
//!   `negotiate` picks 4 exactly when it is offered.
//! - `cell::decode` never uses more than it was given, uses 514 bytes for a
//!   fixed cell and 7 + Length for a variable one, needs more on every
//!   shorter prefix, and re-encodes (`encode_fixed` / `encode_var`) to the
//!   exact bytes it read.
//! - Chunked reading hands on the same cells, in the same order, with the
//!   same bytes left over, as decoding the whole stream at once.
//! - RELAY/RELAY_EARLY payloads: `relay::decode` fails exactly when §4 says
//!   (Recognized != 0, Length > 498) and its fields re-encode to the header
//!   and data of the cell.
//! - CREATE_FAST payloads: a CREATED_FAST built from them passes
//!   `check_created_fast`, and checking any CREATED_FAST payload is safe.
//!
//! Not mirrored: `read_loop`'s zero-copy path for buffers of at least
//! 128 KiB of one circuit's RELAY cells (inputs here are far smaller); it
//! hands on whole cells exactly as `dispatch` does.
#![no_main]

use halfpipe_proto::cell::{self, cmd, HandshakeError, CELL_LEN, PAYLOAD_LEN, VAR_HEADER_LEN};
use halfpipe_proto::kdf;
use halfpipe_proto::relay::{self, RelayError, DATA_MAX};
use libfuzzer_sys::fuzz_target;

/// What `src/link/reader.rs` asks of one `read()`: its link reader reads up to
/// 256 KiB at a time.
const READ_BUF: usize = 256 * 1024;

/// The peer's bytes, cut into the pieces the network delivers.
struct Socket<'a> {
    data: &'a [u8],
    pos: usize,
    sizes: Vec<usize>,
    next_size: usize,
    /// Bytes left in the piece being read.
    left_in_piece: usize,
}

impl<'a> Socket<'a> {
    fn new(data: &'a [u8], sizes: Vec<usize>) -> Self {
        Socket {
            data,
            pos: 0,
            sizes,
            next_size: 0,
            left_in_piece: 0,
        }
    }

    /// One read() of at most `want` bytes; empty at EOF.
    fn read(&mut self, want: usize) -> &'a [u8] {
        assert!(want > 0, "read() asked for 0 bytes, which looks like EOF");
        if self.pos == self.data.len() {
            return &[];
        }
        if self.left_in_piece == 0 {
            self.left_in_piece = if self.sizes.is_empty() {
                self.data.len()
            } else {
                let s = self.sizes[self.next_size % self.sizes.len()];
                self.next_size += 1;
                s
            };
        }
        let n = want.min(self.left_in_piece).min(self.data.len() - self.pos);
        self.left_in_piece -= n;
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        out
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Cell {
    circ_id: u32,
    command: u8,
    payload: Vec<u8>,
}

/// Checks one `cell::decode` answer against the bytes it came from.
fn check_cell(bytes: &[u8], c: cell::CellRef<'_>, used: usize) {
    assert!(used <= bytes.len(), "decode used more than it was given");
    let raw = &bytes[..used];
    assert_eq!(
        c.circ_id,
        u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]])
    );
    assert_eq!(c.command, raw[4]);
    let mut again = Vec::new();
    if cell::is_var_cmd(c.command) {
        let len = u16::from_be_bytes([raw[5], raw[6]]) as usize;
        assert_eq!(used, VAR_HEADER_LEN + len);
        assert_eq!(c.payload.len(), len);
        cell::encode_var(&mut again, c.circ_id, c.command, c.payload);
    } else {
        assert_eq!(used, CELL_LEN);
        assert_eq!(c.payload.len(), PAYLOAD_LEN);
        cell::encode_fixed(&mut again, c.circ_id, c.command, c.payload);
    }
    assert_eq!(again, raw, "cell does not re-encode to its bytes");
    // A shorter buffer never holds the cell; the cell alone is enough.
    assert_eq!(cell::decode(&bytes[..used - 1]), None);
    assert_eq!(cell::decode(raw), Some((c, used)));

    match c.command {
        cmd::RELAY | cmd::RELAY_EARLY => check_relay(raw),
        cmd::CREATE_FAST => {
            // What src/link/reader.rs does with it: X is the first 20 payload
            // bytes.
            let mut x = [0u8; kdf::HASH_LEN];
            x.copy_from_slice(&c.payload[..kdf::HASH_LEN]);
            let mut y = [0u8; kdf::HASH_LEN];
            y.copy_from_slice(&c.payload[kdf::HASH_LEN..2 * kdf::HASH_LEN]);
            let mut created = y.to_vec();
            created.extend_from_slice(&kdf::key_hash(&x, &y));
            assert!(kdf::check_created_fast(&x, &created));
        }
        cmd::CREATED_FAST => {
            let _ = kdf::check_created_fast(&[7; kdf::HASH_LEN], c.payload);
        }
        cmd::DESTROY => {
            let _ = cell::destroy_reason::name(c.payload[0]);
        }
        _ => {}
    }
}

/// A whole RELAY cell: §4's header rules, and a round trip of its fields.
fn check_relay(raw: &[u8]) {
    let payload = &raw[5..];
    let recognized = u16::from_be_bytes([payload[1], payload[2]]);
    let length = u16::from_be_bytes([payload[9], payload[10]]);
    match relay::decode(payload) {
        Ok(rc) => {
            assert_eq!(recognized, 0);
            assert!(usize::from(length) <= DATA_MAX);
            assert_eq!(rc.body.len(), usize::from(length));
            let mut again = Vec::new();
            let circ = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            relay::encode(&mut again, circ, rc.command, rc.stream_id, rc.body);
            let end = 5 + relay::HEADER_LEN + rc.body.len();
            // Digest is not checked (docs/protocol.md §12) and RELAY_EARLY reads
            // as RELAY, so compare command, Recognized, StreamID, Length, Data.
            assert_eq!(again[5..10], raw[5..10]);
            assert_eq!(again[14..end], raw[14..end]);
            let _ = relay::relay_cmd::name(rc.command);
        }
        Err(RelayError::Recognized(r)) => assert!(r != 0 && r == recognized),
        Err(RelayError::Length(l)) => {
            assert!(recognized == 0 && l == length && usize::from(l) > DATA_MAX)
        }
        Err(RelayError::Truncated(_)) => panic!("a fixed cell's payload is 509 bytes"),
    }
}

/// What `decode_versions` answers: not yet, the versions and bytes used,
/// or why the handshake fails.
type Versions = Result<Option<(Vec<u16>, usize)>, HandshakeError>;

/// `link::read_versions`: ask for exactly what the VERSIONS cell still
/// needs. Returns the result and the bytes read.
fn handshake(sock: &mut Socket<'_>) -> (Versions, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        match cell::decode_versions(&buf) {
            Ok(Some((versions, used))) => {
                assert_eq!(
                    used,
                    buf.len(),
                    "VERSIONS did not use exactly what was read"
                );
                return (Ok(Some((versions, used))), buf);
            }
            Err(e) => return (Err(e), buf),
            Ok(None) => {}
        }
        let need = if buf.len() < cell::VERSIONS_HEADER_LEN {
            cell::VERSIONS_HEADER_LEN - buf.len()
        } else {
            cell::VERSIONS_HEADER_LEN + u16::from_be_bytes([buf[3], buf[4]]) as usize - buf.len()
        };
        let got = sock.read(need);
        if got.is_empty() {
            return (Ok(None), buf); // closed during the handshake
        }
        buf.extend_from_slice(got);
    }
}

fn check_handshake(stream: &[u8], result: &Versions, read: &[u8]) {
    // Reading piecemeal must not change the answer.
    let whole = cell::decode_versions(stream);
    match (result, &whole) {
        (Ok(None), Ok(None)) => {}
        (a, b) => assert_eq!(a, b, "chunked handshake differs from all at once"),
    }
    match result {
        Ok(Some((versions, used))) => {
            let mut again = Vec::new();
            cell::encode_versions(&mut again, versions);
            // The 2-byte CircID is not looked at.
            assert_eq!(again[2..], read[2..*used]);
            let agreed = cell::negotiate(versions);
            assert_eq!(agreed.is_ok(), versions.contains(&cell::LINK_VERSION));
            if let Ok(v) = agreed {
                assert_eq!(v, cell::LINK_VERSION);
            }
        }
        Ok(None) => {}
        Err(HandshakeError::NotVersions { command, hint }) => {
            assert_eq!(*command, read[2]);
            assert_ne!(*command, cmd::VERSIONS);
            // The log line must stay one line.
            let line = HandshakeError::NotVersions {
                command: *command,
                hint: *hint,
            }
            .to_string();
            assert!(!line.contains('\n'));
        }
        Err(HandshakeError::OddLength(len)) => {
            assert_eq!(len % 2, 1);
            assert_eq!(*len, u16::from_be_bytes([read[3], read[4]]));
        }
        Err(HandshakeError::NoCommonVersion(_)) => panic!("decode_versions does not negotiate"),
    }
}

/// Decodes every whole cell at the front of `bytes`, as `Link::dispatch`
/// walks its buffer; returns the cells and the bytes used.
fn dispatch(bytes: &[u8], out: &mut Vec<Cell>) -> usize {
    let mut pos = 0;
    while let Some((c, len)) = cell::decode(&bytes[pos..]) {
        check_cell(&bytes[pos..], c, len);
        out.push(Cell {
            circ_id: c.circ_id,
            command: c.command,
            payload: c.payload.to_vec(),
        });
        pos += len;
    }
    pos
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 8).min(rest.len());
    let sizes: Vec<usize> = rest[..k]
        .iter()
        // 1..=128 bytes, or multiples of 64 up to 8 KiB: both small pieces
        // and pieces holding several cells.
        .map(|&b| {
            if b < 128 {
                usize::from(b) + 1
            } else {
                usize::from(b - 127) * 64
            }
        })
        .collect();
    let stream = &rest[k..];
    let mut sock = Socket::new(stream, sizes);

    // §1: the handshake, byte-exact.
    let (result, read) = handshake(&mut sock);
    check_handshake(stream, &result, &read);
    match result {
        Ok(Some((versions, _))) if cell::negotiate(&versions).is_ok() => {}
        // Link closed: nothing after it is read.
        _ => return,
    }
    let after = &stream[read.len()..];

    // §1, §2: cells, as `Link::read_loop` and `dispatch` read them.
    let mut buf: Vec<u8> = Vec::new();
    let mut cells = Vec::new();
    loop {
        let spare = READ_BUF - buf.len();
        let got = sock.read(spare);
        if got.is_empty() {
            break;
        }
        buf.extend_from_slice(got);
        let used = dispatch(&buf, &mut cells);
        assert!(used <= buf.len());
        buf.drain(..used);
        // A buffer with no whole cell is always shorter than the largest cell.
        assert!(buf.len() < VAR_HEADER_LEN + usize::from(u16::MAX));
    }

    // The same bytes all at once give the same cells and the same rest.
    let mut at_once = Vec::new();
    let used = dispatch(after, &mut at_once);
    assert_eq!(cells, at_once, "chunked cells differ from all at once");
    assert_eq!(buf, &after[used..], "chunked leftover differs");
});
