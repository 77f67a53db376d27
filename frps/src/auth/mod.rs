//! Who may do what: consumer API keys on the public port ([`keys`]),
//! provider accounts and client tokens on the control port ([`accounts`]).
//! The two are kept apart: a consumer key never registers a client and a
//! client token never calls the public port.

pub mod accounts;
pub mod keys;
pub mod redis;
pub mod secret;

pub use accounts::{Accounts, LoginError, Principal};
pub use keys::{KeyCheck, KeyValidator};

use http::HeaderMap;

/// The header that may carry an API key instead of `Authorization`.
pub const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// The API key a request carries: `Authorization: Bearer <key>`, else
/// `x-api-key: <key>`.
pub fn request_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, rest) = v.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") {
            let key = rest.trim();
            return (!key.is_empty()).then_some(key);
        }
        return None;
    }
    headers
        .get(X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Whether `presented` is `secret`, in time that depends on neither where
/// they differ nor the secret's length: only on the presented one's (which
/// its sender knows). Each presented byte is compared with the secret's
/// byte at that place, the secret repeated as needed, and the lengths are
/// compared too; no early exit. `secret` must not be empty.
pub fn secret_eq(presented: &[u8], secret: &[u8]) -> bool {
    debug_assert!(!secret.is_empty());
    let mut diff = u8::from(presented.len() != secret.len());
    for (i, byte) in presented.iter().enumerate() {
        diff |= byte ^ secret[i % secret.len()];
    }
    diff == 0 && !presented.is_empty()
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presented_key_matches_the_secret_only_when_equal() {
        let secret = b"static-key";
        assert!(secret_eq(b"static-key", secret));
        for other in [
            &b""[..],
            b"static-ke",
            b"static-key!",
            b"static-kez",
            b"static-keystatic-key",
            b"Static-key",
        ] {
            assert!(!secret_eq(other, secret), "{other:?}");
        }
    }
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn bearer_and_x_api_key_are_read() {
        assert_eq!(
            request_key(&headers(&[("authorization", "Bearer k1")])),
            Some("k1")
        );
        assert_eq!(
            request_key(&headers(&[("authorization", "bearer  k1 ")])),
            Some("k1")
        );
        assert_eq!(request_key(&headers(&[("x-api-key", "k2")])), Some("k2"));
        assert_eq!(
            request_key(&headers(&[("authorization", "Basic abc")])),
            None
        );
        assert_eq!(request_key(&headers(&[("authorization", "Bearer ")])), None);
        assert_eq!(request_key(&headers(&[])), None);
    }
}
