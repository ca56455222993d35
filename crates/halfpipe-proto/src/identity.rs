//! Identity fingerprints (docs/protocol.md §13): the SHA-256 hash of the
//! DER encoding of a key's X.509 SubjectPublicKeyInfo, written as 64
//! lowercase hexadecimal digits. A client pins its exit by fingerprint
//! (R13.5); an exit may list the fingerprints of the clients it serves
//! (R13.7).

use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// A fingerprint: what identifies a side of a TLS link.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a key, from its DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(spki_der).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// 64 lowercase hexadecimal digits.
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    #[error("a fingerprint is 64 hexadecimal digits, not {0}")]
    Length(usize),
    #[error("{0:?} is not a hexadecimal digit")]
    Digit(char),
}

/// 64 hexadecimal digits; upper case is read as well (it is what some tools
/// print), though fingerprints are written in lower case.
impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Fingerprint, FingerprintError> {
        let chars: Vec<char> = s.chars().collect();
        if chars.len() != 64 {
            return Err(FingerprintError::Length(chars.len()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in chars.chunks(2).enumerate() {
            let hi = pair[0]
                .to_digit(16)
                .ok_or(FingerprintError::Digit(pair[0]))?;
            let lo = pair[1]
                .to_digit(16)
                .ok_or(FingerprintError::Digit(pair[1]))?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(Fingerprint(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fingerprint_is_sha256_of_the_spki_in_lowercase_hex() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let f = Fingerprint::of_spki(b"abc");
        assert_eq!(
            f.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(f.to_string().parse::<Fingerprint>(), Ok(f));
        assert_eq!(f.to_string().to_uppercase().parse::<Fingerprint>(), Ok(f));
    }

    #[test]
    fn bad_fingerprints_say_what_is_wrong() {
        assert_eq!(
            "ab".parse::<Fingerprint>(),
            Err(FingerprintError::Length(2))
        );
        let g = format!("{}g", "0".repeat(63));
        assert_eq!(g.parse::<Fingerprint>(), Err(FingerprintError::Digit('g')));
        // Multi-byte characters count as characters, not bytes.
        let e = "é".repeat(64);
        assert_eq!(e.parse::<Fingerprint>(), Err(FingerprintError::Digit('é')));
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(bytes in any::<[u8; 32]>()) {
            let f = Fingerprint(bytes);
            let s = f.to_string();
            prop_assert_eq!(s.len(), 64);
            prop_assert!(s.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
            prop_assert_eq!(s.parse::<Fingerprint>(), Ok(f));
        }
    }
}
