//! Who may do what: consumer API keys on the public port, provider
//! credentials on the control port. The two are kept apart: a consumer key
//! never registers a client and a provider secret never calls the public port.

use http::HeaderMap;

/// Outcome of checking a consumer's API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// The key is valid.
    Valid,
    /// No key was presented.
    Missing,
    /// A key was presented and is not valid.
    Invalid,
}

/// Validates consumer API keys (the public port).
#[derive(Debug, Clone)]
pub struct KeyValidator {
    static_key: Option<String>,
}

impl KeyValidator {
    /// A validator accepting only `static_key` (when set).
    pub fn new(static_key: Option<String>) -> Self {
        Self {
            static_key: static_key.filter(|k| !k.is_empty()),
        }
    }

    /// Whether any key at all can be valid.
    pub fn has_keys(&self) -> bool {
        self.static_key.is_some()
    }

    /// Checks the key carried by a request's headers.
    pub fn check_headers(&self, headers: &HeaderMap) -> KeyCheck {
        match request_key(headers) {
            None => KeyCheck::Missing,
            Some(key) => self.check(key),
        }
    }

    /// Checks one key.
    pub fn check(&self, key: &str) -> KeyCheck {
        match &self.static_key {
            Some(k) if constant_time_eq(k.as_bytes(), key.as_bytes()) => KeyCheck::Valid,
            _ => KeyCheck::Invalid,
        }
    }
}

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
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Validates provider credentials (the control port).
#[derive(Debug, Clone)]
pub struct ProviderAuth {
    secret: Option<String>,
}

impl ProviderAuth {
    /// Accepts clients presenting `secret` (when set).
    pub fn new(secret: Option<String>) -> Self {
        Self {
            secret: secret.filter(|s| !s.is_empty()),
        }
    }

    /// Whether any client can register.
    pub fn is_configured(&self) -> bool {
        self.secret.is_some()
    }

    /// Checks a token presented with `LoginToken`.
    pub fn check_token(&self, token: &str) -> Result<(), String> {
        match &self.secret {
            None => Err("this server accepts no clients: start frps with --client-secret".into()),
            Some(s) if constant_time_eq(s.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err("invalid client token".into()),
        }
    }

    /// Checks an email/password login. Accounts come with the account store;
    /// until it is configured this always refuses, saying what to use instead.
    pub fn check_password(&self, _email: &str, _password: &str) -> Result<String, String> {
        Err(
            "this server has no account store; log in with the provider secret (frpc --token)"
                .into(),
        )
    }
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

    #[test]
    fn static_key_validation() {
        let v = KeyValidator::new(Some("secret".into()));
        assert_eq!(v.check("secret"), KeyCheck::Valid);
        assert_eq!(v.check("secreT"), KeyCheck::Invalid);
        assert_eq!(v.check_headers(&headers(&[])), KeyCheck::Missing);
        let none = KeyValidator::new(None);
        assert!(!none.has_keys());
        assert_eq!(none.check(""), KeyCheck::Invalid);
        assert_eq!(none.check("abc123"), KeyCheck::Invalid);
    }

    #[test]
    fn provider_secret_is_separate_from_api_keys() {
        let p = ProviderAuth::new(Some("provider".into()));
        assert!(p.check_token("provider").is_ok());
        assert!(p.check_token("consumer-key").is_err());
        assert!(ProviderAuth::new(None).check_token("").is_err());
    }
}
