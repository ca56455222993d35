//! Link cells: the framing of docs/protocol.md §1 (handshake) and §2
//! (commands), taken from tor-spec 3 and 4.1.
//!
//! This module knows bytes, not rules: it encodes and decodes cells and
//! leaves every decision about them to `link`, `circuit` and `relay`.

use std::fmt;

/// Link protocol version halfpipe speaks (R1.1: the only one it lists).
pub const LINK_VERSION: u16 = 4;
/// Payload of a fixed-length cell.
pub const PAYLOAD_LEN: usize = 509;
/// R1.9: `CircID [4] | Command [1] | Payload [509]` (link version 4).
pub const CELL_LEN: usize = 4 + 1 + PAYLOAD_LEN;
/// Header of a variable-length cell: `CircID [4] | Command [1] | Length [2]`.
pub const VAR_HEADER_LEN: usize = 7;
/// Header of the VERSIONS cell, which uses 2-byte CircIDs (tor-spec 4.1).
pub const VERSIONS_HEADER_LEN: usize = 5;

/// Cell commands (R2.1: the values of the §2 table; VERSIONS and VPADDING
/// are the variable-length commands of §1).
pub mod cmd {
    pub const PADDING: u8 = 0;
    pub const CREATE: u8 = 1;
    pub const RELAY: u8 = 3;
    pub const DESTROY: u8 = 4;
    pub const CREATE_FAST: u8 = 5;
    pub const CREATED_FAST: u8 = 6;
    pub const VERSIONS: u8 = 7;
    pub const RELAY_EARLY: u8 = 9;
    pub const CREATE2: u8 = 10;
    pub const VPADDING: u8 = 128;
}

/// DESTROY reasons (tor-spec 5.4).
pub mod destroy_reason {
    pub const NONE: u8 = 0;
    pub const PROTOCOL: u8 = 1;
    pub const INTERNAL: u8 = 2;
    pub const REQUESTED: u8 = 3;
    pub const HIBERNATING: u8 = 4;
    pub const RESOURCELIMIT: u8 = 5;
    pub const CONNECTFAILED: u8 = 6;
    pub const CHANNEL_CLOSED: u8 = 8;
    pub const FINISHED: u8 = 9;
    pub const TIMEOUT: u8 = 10;

    /// The tor-spec name of a DESTROY reason, for logs.
    pub fn name(reason: u8) -> &'static str {
        match reason {
            NONE => "NONE",
            PROTOCOL => "PROTOCOL",
            INTERNAL => "INTERNAL",
            REQUESTED => "REQUESTED",
            HIBERNATING => "HIBERNATING",
            RESOURCELIMIT => "RESOURCELIMIT",
            CONNECTFAILED => "CONNECTFAILED",
            7 => "OR_IDENTITY",
            CHANNEL_CLOSED => "CHANNEL_CLOSED",
            FINISHED => "FINISHED",
            TIMEOUT => "TIMEOUT",
            11 => "DESTROYED",
            12 => "NOSUCHSERVICE",
            _ => "unknown",
        }
    }
}

/// R1.9: variable-length commands are VERSIONS and everything from 128 up
/// (tor-spec 3); every other command is fixed-length.
pub fn is_var_cmd(command: u8) -> bool {
    command == cmd::VERSIONS || command >= 128
}

/// One cell borrowed from a read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellRef<'a> {
    pub circ_id: u32,
    pub command: u8,
    /// 509 bytes for a fixed-length cell, `Length` bytes for a variable one.
    pub payload: &'a [u8],
}

/// Decodes the cell at the front of `buf` (link-version-4 framing). Returns
/// the cell and its length on the wire, or `None` if `buf` does not yet hold
/// a whole cell. Every byte sequence is a valid cell framing, so this cannot
/// fail; what the cell means is for the caller to judge.
pub fn decode(buf: &[u8]) -> Option<(CellRef<'_>, usize)> {
    if buf.len() < 5 {
        return None;
    }
    let circ_id = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let command = buf[4];
    if is_var_cmd(command) {
        if buf.len() < VAR_HEADER_LEN {
            return None;
        }
        let len = u16::from_be_bytes([buf[5], buf[6]]) as usize;
        let total = VAR_HEADER_LEN + len;
        if buf.len() < total {
            return None;
        }
        let payload = &buf[VAR_HEADER_LEN..total];
        Some((
            CellRef {
                circ_id,
                command,
                payload,
            },
            total,
        ))
    } else {
        if buf.len() < CELL_LEN {
            return None;
        }
        let payload = &buf[5..CELL_LEN];
        Some((
            CellRef {
                circ_id,
                command,
                payload,
            },
            CELL_LEN,
        ))
    }
}

/// Appends a fixed-length cell; `payload` is zero-padded to 509 bytes.
///
/// # Panics
/// If `payload` is longer than 509 bytes (a bug in the caller).
pub fn encode_fixed(out: &mut Vec<u8>, circ_id: u32, command: u8, payload: &[u8]) {
    assert!(payload.len() <= PAYLOAD_LEN, "cell payload too long");
    out.reserve(CELL_LEN);
    out.extend_from_slice(&circ_id.to_be_bytes());
    out.push(command);
    out.extend_from_slice(payload);
    out.resize(out.len() + PAYLOAD_LEN - payload.len(), 0);
}

/// Appends a variable-length cell with 4-byte CircID.
///
/// # Panics
/// If `payload` is longer than 65,535 bytes.
pub fn encode_var(out: &mut Vec<u8>, circ_id: u32, command: u8, payload: &[u8]) {
    let len = u16::try_from(payload.len()).expect("variable cell payload too long");
    out.extend_from_slice(&circ_id.to_be_bytes());
    out.push(command);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A DESTROY cell (§3).
pub fn encode_destroy(out: &mut Vec<u8>, circ_id: u32, reason: u8) {
    // R2.4: the reason is the first payload byte; the rest is padding.
    encode_fixed(out, circ_id, cmd::DESTROY, &[reason]);
}

/// Appends the VERSIONS cell of the handshake (§1): `CircID [2] = 0`,
/// `Command [1] = 7`, `Length [2]`, then each version as u16.
pub fn encode_versions(out: &mut Vec<u8>, versions: &[u16]) {
    out.extend_from_slice(&0u16.to_be_bytes());
    out.push(cmd::VERSIONS);
    out.extend_from_slice(&((versions.len() * 2) as u16).to_be_bytes());
    for v in versions {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Why a handshake failed (§1). Each one closes only its link (R1.8).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("first cell is not VERSIONS (command byte {command}){hint}")]
    NotVersions { command: u8, hint: Hint },
    #[error("VERSIONS cell has odd length {0}")]
    OddLength(u16),
    #[error("no common link version (peer offers {0:?}, we speak {LINK_VERSION})")]
    NoCommonVersion(Vec<u16>),
}

/// A guess at what a peer that did not send VERSIONS is, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    None,
    Http,
    Socks,
    Tls,
}

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hint::None => Ok(()),
            Hint::Http => {
                f.write_str(": this looks like an HTTP client; point it at the SOCKS port instead")
            }
            Hint::Socks => f.write_str(
                ": this looks like a SOCKS client; point it at the client's SOCKS port instead",
            ),
            Hint::Tls => {
                f.write_str(": this looks like TLS; halfpipe links are plain TCP (protocol.md §12)")
            }
        }
    }
}

fn guess(buf: &[u8]) -> Hint {
    match buf.first() {
        Some(4 | 5) => Hint::Socks,
        Some(0x16) => Hint::Tls,
        Some(b) if b.is_ascii_uppercase() => Hint::Http,
        _ => Hint::None,
    }
}

/// Decodes the peer's VERSIONS cell from the front of `buf`.
/// `Ok(None)`: not complete yet. `Ok(Some((versions, len)))`: the versions
/// offered and the bytes used. Judging the offer is `negotiate`'s job.
pub fn decode_versions(buf: &[u8]) -> Result<Option<(Vec<u16>, usize)>, HandshakeError> {
    if buf.len() < 3 {
        return Ok(None);
    }
    // R1.5: the first cell must be VERSIONS.
    if buf[2] != cmd::VERSIONS {
        return Err(HandshakeError::NotVersions {
            command: buf[2],
            hint: guess(buf),
        });
    }
    if buf.len() < VERSIONS_HEADER_LEN {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]);
    // R1.4: an odd Length closes the link.
    if len % 2 != 0 {
        return Err(HandshakeError::OddLength(len));
    }
    let total = VERSIONS_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let versions = buf[VERSIONS_HEADER_LEN..total]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(Some((versions, total)))
}

/// R1.3: the highest version both sides speak; we speak only 4, so an offer
/// without 4 has no version in common and the link is closed.
pub fn negotiate(offered: &[u16]) -> Result<u16, HandshakeError> {
    if offered.contains(&LINK_VERSION) {
        Ok(LINK_VERSION)
    } else {
        Err(HandshakeError::NoCommonVersion(offered.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixed_cell_layout_is_514_bytes() {
        // R1.9: CircID [4] | Command [1] | Payload [509], 514 bytes in all.
        let mut out = Vec::new();
        encode_fixed(&mut out, 0x8000_0001, cmd::CREATE_FAST, &[1, 2, 3]);
        assert_eq!(out.len(), 514);
        assert_eq!(&out[..5], &[0x80, 0, 0, 1, 5]);
        assert_eq!(&out[5..8], &[1, 2, 3]);
        assert!(out[8..].iter().all(|&b| b == 0));
        let (cell, used) = decode(&out).unwrap();
        assert_eq!(used, 514);
        assert_eq!(cell.circ_id, 0x8000_0001);
        assert_eq!(cell.command, cmd::CREATE_FAST);
        assert_eq!(cell.payload.len(), 509);
    }

    #[test]
    fn variable_cells_are_framed_by_length() {
        // R1.9: variable-length cells (7 or >= 128) carry Length; the rest
        // are fixed-length.
        let mut out = Vec::new();
        encode_var(&mut out, 9, cmd::VPADDING, &[7; 1000]);
        let (cell, used) = decode(&out).unwrap();
        assert_eq!(used, 1007);
        assert_eq!(cell.payload, &[7; 1000][..]);
        assert_eq!(decode(&out[..1006]), None);
        assert!(is_var_cmd(7) && is_var_cmd(128) && is_var_cmd(255));
        assert!(!is_var_cmd(3) && !is_var_cmd(127));
    }

    #[test]
    fn partial_cells_need_more() {
        let mut out = Vec::new();
        encode_fixed(&mut out, 1, cmd::RELAY, &[]);
        for n in 0..out.len() {
            assert_eq!(decode(&out[..n]), None, "prefix of {n} bytes");
        }
    }

    #[test]
    fn versions_handshake() {
        // R1.1: our VERSIONS (2-byte CircID) is exactly 00 00 07 00 02 00 04;
        // R1.3: the highest common version is adopted, none in common fails.
        let mut out = Vec::new();
        encode_versions(&mut out, &[4]);
        assert_eq!(out, vec![0, 0, 7, 0, 2, 0, 4]);
        assert_eq!(decode_versions(&out), Ok(Some((vec![4], 7))));
        assert_eq!(decode_versions(&out[..6]), Ok(None));
        assert_eq!(negotiate(&[3, 4, 5]), Ok(4));
        assert!(matches!(
            negotiate(&[3, 5]),
            Err(HandshakeError::NoCommonVersion(_))
        ));
        assert_eq!(negotiate(&[]), Err(HandshakeError::NoCommonVersion(vec![])));
    }

    #[test]
    fn versions_errors() {
        // R1.4: an odd Length; R1.5: a first cell that is not VERSIONS.
        assert_eq!(
            decode_versions(&[0, 0, 7, 0, 3, 0, 4, 0]),
            Err(HandshakeError::OddLength(3))
        );
        let http = decode_versions(b"GET / HTTP/1.1\r\n").unwrap_err();
        assert!(matches!(
            http,
            HandshakeError::NotVersions {
                hint: Hint::Http,
                ..
            }
        ));
        assert!(http.to_string().contains("HTTP"));
        let socks = decode_versions(&[5, 1, 0]).unwrap_err();
        assert!(matches!(
            socks,
            HandshakeError::NotVersions {
                hint: Hint::Socks,
                ..
            }
        ));
    }

    #[test]
    fn command_values_are_those_of_section_2() {
        // R2.1: the command values of the §2 table, and the variable-length
        // commands of §1.
        let table = [
            (cmd::PADDING, 0),
            (cmd::CREATE, 1),
            (cmd::RELAY, 3),
            (cmd::DESTROY, 4),
            (cmd::CREATE_FAST, 5),
            (cmd::CREATED_FAST, 6),
            (cmd::RELAY_EARLY, 9),
            (cmd::CREATE2, 10),
            (cmd::VERSIONS, 7),
            (cmd::VPADDING, 128),
        ];
        for (ours, spec) in table {
            assert_eq!(ours, spec);
        }
        let mut out = Vec::new();
        encode_fixed(&mut out, 1, cmd::CREATE_FAST, &[]);
        assert_eq!(out[4], 5, "the command byte on the wire");
    }

    #[test]
    fn destroy_carries_its_reason_first() {
        // R2.4: Payload[0] is the reason (tor-spec 5.4 values); the rest is
        // padding.
        assert_eq!(destroy_reason::PROTOCOL, 1);
        assert_eq!(destroy_reason::HIBERNATING, 4);
        assert_eq!(destroy_reason::RESOURCELIMIT, 5);
        assert_eq!(destroy_reason::FINISHED, 9);
        let mut out = Vec::new();
        encode_destroy(&mut out, 0x8000_0007, destroy_reason::RESOURCELIMIT);
        let (cell, used) = decode(&out).unwrap();
        assert_eq!((used, cell.command), (CELL_LEN, cmd::DESTROY));
        assert_eq!(cell.payload[0], 5);
        assert!(cell.payload[1..].iter().all(|&b| b == 0));
    }

    proptest! {
        #[test]
        fn fixed_round_trip(circ in any::<u32>(), command in 0u8..128, payload in proptest::collection::vec(any::<u8>(), 0..=509)) {
            prop_assume!(command != cmd::VERSIONS);
            let mut out = Vec::new();
            encode_fixed(&mut out, circ, command, &payload);
            let (cell, used) = decode(&out).unwrap();
            prop_assert_eq!(used, CELL_LEN);
            prop_assert_eq!(cell.circ_id, circ);
            prop_assert_eq!(cell.command, command);
            prop_assert_eq!(&cell.payload[..payload.len()], &payload[..]);
        }

        #[test]
        fn var_round_trip(circ in any::<u32>(), command in 128u8..=255, payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut out = Vec::new();
            encode_var(&mut out, circ, command, &payload);
            let (cell, used) = decode(&out).unwrap();
            prop_assert_eq!(used, out.len());
            prop_assert_eq!(cell.payload, &payload[..]);
        }

        #[test]
        fn decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..1200)) {
            if let Some((_, used)) = decode(&buf) {
                prop_assert!(used <= buf.len());
            }
            let _ = decode_versions(&buf);
        }
    }
}
