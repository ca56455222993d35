//! CREATE_FAST / CREATED_FAST (docs/protocol.md §3, tor-spec 5.1.3 and
//! 5.2.1).
//!
//! R3.5: version 1 derives nothing from the shared secret but KH, the proof
//! that the exit saw the client's X: relay cells are not encrypted (§12).

use sha1::{Digest, Sha1};

/// Length of X, Y and KH.
pub const HASH_LEN: usize = 20;

/// KDF-TOR (tor-spec 5.2.1): K = SHA1(K0 | 00) | SHA1(K0 | 01) | ...,
/// truncated to `len` bytes.
pub fn kdf_tor(k0: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + HASH_LEN);
    let mut i: u8 = 0;
    while out.len() < len {
        let mut h = Sha1::new();
        h.update(k0);
        h.update([i]);
        out.extend_from_slice(&h.finalize());
        i = i.wrapping_add(1);
    }
    out.truncate(len);
    out
}

/// KH: the first 20 bytes of KDF-TOR(X | Y) (R3.3).
pub fn key_hash(x: &[u8; HASH_LEN], y: &[u8; HASH_LEN]) -> [u8; HASH_LEN] {
    let mut k0 = [0u8; 2 * HASH_LEN];
    k0[..HASH_LEN].copy_from_slice(x);
    k0[HASH_LEN..].copy_from_slice(y);
    let k = kdf_tor(&k0, HASH_LEN);
    let mut kh = [0u8; HASH_LEN];
    kh.copy_from_slice(&k);
    kh
}

/// R3.3: the exit's CREATED_FAST payload for the client's X and its own
/// random Y (the caller draws Y: this crate reads no random source): Y | KH.
pub fn created_fast_payload(x: &[u8; HASH_LEN], y: &[u8; HASH_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * HASH_LEN);
    out.extend_from_slice(y);
    out.extend_from_slice(&key_hash(x, y));
    out
}

/// R3.4: the client's check of CREATED_FAST: is KH right for our X and
/// their Y?
pub fn check_created_fast(x: &[u8; HASH_LEN], payload: &[u8]) -> bool {
    if payload.len() < 2 * HASH_LEN {
        return false;
    }
    let mut y = [0u8; HASH_LEN];
    y.copy_from_slice(&payload[..HASH_LEN]);
    key_hash(x, &y)[..] == payload[HASH_LEN..2 * HASH_LEN]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdf_tor_is_sha1_of_k0_and_counter() {
        // R3.3: KH is KDF-TOR(X | Y) cut to 20 bytes, and KDF-TOR is
        // tor-spec 5.2.1's K = H(K0 | [00]) | H(K0 | [01]) | ...
        let k = kdf_tor(b"abc", 45);
        assert_eq!(k.len(), 45);
        let first: [u8; 20] = Sha1::digest(b"abc\x00").into();
        let second: [u8; 20] = Sha1::digest(b"abc\x01").into();
        assert_eq!(&k[..20], &first);
        assert_eq!(&k[20..40], &second);
        // A vector computed independently with Python's hashlib:
        // sha1(bytes(range(40)) + b"\x00").
        let x: [u8; 20] = std::array::from_fn(|i| i as u8);
        let y: [u8; 20] = std::array::from_fn(|i| 20 + i as u8);
        let kh: String = key_hash(&x, &y)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(kh, "ee4290b7cadc050642954479851159fd567f8cf3");
    }

    #[test]
    fn created_fast_round_trip() {
        // R3.3: CREATED_FAST is Y | KH; R3.4: the client checks KH, and a
        // wrong one (or a short payload) fails the check.
        let x = [7u8; HASH_LEN];
        let y: [u8; HASH_LEN] = std::array::from_fn(|i| i as u8);
        let payload = created_fast_payload(&x, &y);
        assert_eq!(&payload[..HASH_LEN], &y);
        assert!(check_created_fast(&x, &payload));
        let mut bad = payload.clone();
        bad[25] ^= 1;
        assert!(!check_created_fast(&x, &bad));
        assert!(!check_created_fast(&[8u8; HASH_LEN], &payload));
        assert!(!check_created_fast(&x, &payload[..39]));
    }
}
