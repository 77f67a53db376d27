//! Provider accounts (the people who run GPU boxes): password login, client
//! tokens, and throttling of failed logins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use chrono::{NaiveDateTime, Utc};

use super::secret;
use crate::store::{Store, StoreError, UserRow};

/// Why a login failed. The `code` goes to frpc in `LoginResult`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Unknown email or wrong password (deliberately not telling which).
    #[error("invalid email or password")]
    InvalidCredentials,
    /// The token is unknown or revoked.
    #[error("the saved token is invalid or revoked; log in again with email and password")]
    TokenInvalid,
    /// The token has expired.
    #[error("the saved token has expired; log in again with email and password")]
    TokenExpired,
    /// Too many recent failures for this email or address.
    #[error("too many failed logins; retry in {}s", .0.as_secs().max(1))]
    Throttled(Duration),
    /// The account database cannot be reached.
    #[error("account database unavailable; retry later")]
    Unavailable,
    /// The server has no account store.
    #[error("this server has no account store")]
    NoStore,
}

impl LoginError {
    /// Machine-readable code for `LoginResult.code`.
    pub fn code(&self) -> &'static str {
        match self {
            LoginError::InvalidCredentials => "invalid_credentials",
            LoginError::TokenInvalid => "token_invalid",
            LoginError::TokenExpired => "token_expired",
            LoginError::Throttled(_) => "throttled",
            LoginError::Unavailable | LoginError::NoStore => "unavailable",
        }
    }
}

impl From<StoreError> for LoginError {
    fn from(e: StoreError) -> Self {
        tracing::warn!("account lookup failed: {e}");
        LoginError::Unavailable
    }
}

/// Who a control connection logged in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User id.
    pub user_id: i64,
    /// User email.
    pub email: String,
}

/// A token issued at login.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The token (shown once; only its hash is stored).
    pub token: String,
    /// Expiry (UTC).
    pub expires_at: Option<NaiveDateTime>,
    /// Who it belongs to.
    pub principal: Principal,
}

/// Hashes a password with Argon2id (PHC string).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing with default parameters cannot fail")
        .to_string()
}

/// Checks a password against a PHC string.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Accounts and client tokens.
#[derive(Debug)]
pub struct Accounts {
    store: Option<Store>,
    token_ttl: Option<Duration>,
    throttle: Throttle,
}

impl Accounts {
    /// Accounts in `store`; issued tokens live `token_ttl` (forever when `None`).
    pub fn new(store: Option<Store>, token_ttl: Option<Duration>) -> Self {
        Self {
            store,
            token_ttl,
            throttle: Throttle::default(),
        }
    }

    /// Verifies email and password and issues a new token. Failures for one
    /// email or one address are slowed down exponentially, before Argon2 runs.
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        from: IpAddr,
    ) -> Result<IssuedToken, LoginError> {
        let store = self.store.as_ref().ok_or(LoginError::NoStore)?;
        let keys = [
            format!("email:{}", email.to_lowercase()),
            format!("ip:{from}"),
        ];
        if let Err(wait) = self.throttle.check(&keys, Instant::now()) {
            return Err(LoginError::Throttled(wait));
        }
        let user = store.find_user(email).await?;
        let password = password.to_owned();
        let phc = user.as_ref().map(|u| u.password_hash.clone());
        // Unknown emails cost the same Argon2 work as wrong passwords.
        let ok = tokio::task::spawn_blocking(move || {
            verify_password(&password, phc.as_deref().unwrap_or(&DUMMY_HASH))
        })
        .await
        .unwrap_or(false);
        let user = match (ok, user) {
            (true, Some(user)) => user,
            _ => {
                self.throttle.fail(&keys, Instant::now());
                return Err(LoginError::InvalidCredentials);
            }
        };
        self.throttle.succeed(&keys[0]);
        self.issue(store, &user).await
    }

    async fn issue(&self, store: &Store, user: &UserRow) -> Result<IssuedToken, LoginError> {
        let s = secret::generate("frpxc");
        let expires_at = self
            .token_ttl
            .and_then(|ttl| chrono::Duration::from_std(ttl).ok())
            .map(|ttl| Utc::now().naive_utc() + ttl);
        store
            .insert_client_token(&s.id, &s.hash_hex, &s.prefix, user.id, expires_at)
            .await?;
        Ok(IssuedToken {
            token: s.plaintext,
            expires_at,
            principal: Principal {
                user_id: user.id,
                email: user.email.clone(),
            },
        })
    }

    /// Checks a saved token.
    pub async fn check_token(&self, token: &str) -> Result<Principal, LoginError> {
        let store = self.store.as_ref().ok_or(LoginError::NoStore)?;
        let row = store
            .find_client_token(&secret::hash_hex(token))
            .await?
            .ok_or(LoginError::TokenInvalid)?;
        if row.revoked_at.is_some() {
            return Err(LoginError::TokenInvalid);
        }
        if !row.is_usable(Utc::now().naive_utc()) {
            return Err(LoginError::TokenExpired);
        }
        store.touch_client_token(&row.id).await?;
        Ok(Principal {
            user_id: row.user_id,
            email: row.email,
        })
    }
}

static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_password("frpx-dummy-password-for-unknown-users"));

/// Longest enforced wait between failed attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Wait after the first failure; doubles with each further one.
pub const BASE_DELAY: Duration = Duration::from_millis(500);
/// Failures older than this are forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Exponential delays after failed logins, per email and per address.
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<String, Failures>>,
}

impl Throttle {
    /// The delay required after `count` consecutive failures.
    pub fn delay(count: u32) -> Duration {
        if count == 0 {
            return Duration::ZERO;
        }
        BASE_DELAY
            .saturating_mul(1u32 << (count - 1).min(16))
            .min(MAX_DELAY)
    }

    /// `Err(remaining)` when any of `keys` must still wait.
    pub fn check(&self, keys: &[String], now: Instant) -> Result<(), Duration> {
        let failures = self.failures.lock().expect("throttle lock");
        let wait = keys
            .iter()
            .filter_map(|k| failures.get(k))
            .filter(|f| now.duration_since(f.last) < FORGET_AFTER)
            .map(|f| (f.last + Self::delay(f.count)).saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    /// Records a failure for each of `keys`.
    pub fn fail(&self, keys: &[String], now: Instant) {
        let mut failures = self.failures.lock().expect("throttle lock");
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
        }
        for k in keys {
            let f = failures.entry(k.clone()).or_insert(Failures {
                count: 0,
                last: now,
            });
            if now.duration_since(f.last) >= FORGET_AFTER {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
        }
    }

    /// Clears the failures of `key` after a success.
    pub fn succeed(&self, key: &str) {
        self.failures.lock().expect("throttle lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("123456");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("123456", &h));
        assert!(!verify_password("1234567", &h));
        assert!(!verify_password("123456", "not a hash"));
    }

    #[test]
    fn failures_slow_down_exponentially_and_are_forgotten() {
        let t = Throttle::default();
        let keys = vec!["email:a".to_string(), "ip:1".to_string()];
        let start = Instant::now();
        assert!(t.check(&keys, start).is_ok());
        t.fail(&keys, start);
        assert_eq!(t.check(&keys, start), Err(BASE_DELAY));
        assert!(t.check(&keys, start + BASE_DELAY).is_ok());
        for i in 1..5 {
            t.fail(&keys, start);
            assert_eq!(t.check(&keys, start), Err(BASE_DELAY * (1 << i)));
        }
        // Another email from the same address waits too.
        assert!(t.check(&["email:b".into(), "ip:1".into()], start).is_err());
        assert!(t.check(&["email:b".into(), "ip:2".into()], start).is_ok());
        assert!(t.check(&keys, start + FORGET_AFTER).is_ok());
        assert_eq!(Throttle::delay(40), MAX_DELAY);
        t.succeed("email:a");
        assert!(t.check(&["email:a".into()], start).is_ok());
    }
}
