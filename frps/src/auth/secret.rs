//! Generating and hashing secrets (API keys, client tokens).

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A freshly generated secret.
#[derive(Debug, Clone)]
pub struct Secret {
    /// The secret itself: shown once, never stored.
    pub plaintext: String,
    /// SHA-256 of the plaintext, hex: what is stored.
    pub hash_hex: String,
    /// The visible start, for listing.
    pub prefix: String,
    /// A short id for listing and revocation.
    pub id: String,
}

/// How many characters of a secret stay visible in listings.
pub const VISIBLE: usize = 12;

/// Generates `<kind>_<43 base64url chars>` carrying 256 random bits.
pub fn generate(kind: &str) -> Secret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let plaintext = format!("{kind}_{}", base64url(&bytes));
    let mut id = [0u8; 6];
    rand::rng().fill_bytes(&mut id);
    Secret {
        hash_hex: hash_hex(&plaintext),
        prefix: plaintext.chars().take(VISIBLE).collect(),
        id: hex(&id),
        plaintext,
    }
}

/// SHA-256 of `secret`, raw.
pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// SHA-256 of `secret`, hex.
pub fn hash_hex(secret: &str) -> String {
    hex(&hash(secret))
}

pub use common::hex::encode as hex;

/// 32 bytes from 64 hex digits; `None` for anything else.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    common::hex::decode_array(s)
}

/// Unpadded base64url.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_hashed() {
        let a = generate("frpx");
        let b = generate("frpx");
        assert_ne!(a.plaintext, b.plaintext);
        assert!(a.plaintext.starts_with("frpx_"));
        assert_eq!(a.plaintext.len(), 5 + 43);
        assert_eq!(a.hash_hex, hash_hex(&a.plaintext));
        assert_eq!(a.hash_hex.len(), 64);
        assert!(a.plaintext.starts_with(&a.prefix));
        assert_eq!(a.prefix.len(), VISIBLE);
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            hash_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(b"fo"), "Zm8");
    }
}
