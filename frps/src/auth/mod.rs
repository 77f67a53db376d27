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

/// Characters from which a secret an operator chose (the static API key,
/// the admin token) counts as too long to guess: it is accepted even from
/// an address out of its budget for wrong ones. A shorter one is refused
/// there too, or a right guess would tell.
pub const STRONG_SECRET: usize = 32;

/// The header that may carry an API key instead of `Authorization`.
pub const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// The credentials of `Authorization: Bearer <credentials>`, trimmed
/// (possibly empty), when that is the header's scheme.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim())
}

/// The API key a request carries: `Authorization: Bearer <key>`, else
/// `x-api-key: <key>`. An `Authorization` header that holds no bearer key
/// (`Basic` credentials a proxy in front checked, say) leaves the choice to
/// `x-api-key`.
pub fn request_key(headers: &HeaderMap) -> Option<&str> {
    bearer(headers).filter(|k| !k.is_empty()).or_else(|| {
        headers
            .get(X_API_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty())
    })
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
        // Credentials of another scheme (a proxy's) leave x-api-key in play;
        // a bearer key comes first.
        assert_eq!(
            request_key(&headers(&[
                ("authorization", "Basic dXNlcjpwdw=="),
                ("x-api-key", "k2")
            ])),
            Some("k2")
        );
        assert_eq!(
            request_key(&headers(&[
                ("authorization", "Bearer "),
                ("x-api-key", "k2")
            ])),
            Some("k2")
        );
        assert_eq!(
            request_key(&headers(&[
                ("authorization", "Bearer k1"),
                ("x-api-key", "k2")
            ])),
            Some("k1")
        );
    }
}
