//! Provider accounts (the people who run GPU boxes): password login, client
//! tokens, and throttling of failed logins.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
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
    /// Too many recent failures for this email or address, or another
    /// attempt for either is still being checked.
    #[error("too many failed logins; retry in {}s", .0.as_secs().max(1))]
    Throttled(Duration),
    /// As many password checks as the server runs at once are under way.
    #[error("too many logins in progress; retry in {}s", BUSY_RETRY.as_secs())]
    Busy,
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
            LoginError::Throttled(_) | LoginError::Busy => "throttled",
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
    /// The client token the session logged in with (issued at a password
    /// login, or presented), re-checked while the session lasts.
    pub token_id: Option<String>,
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

/// How long a caller refused with [`LoginError::Busy`] is asked to wait.
pub const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Accounts and client tokens.
#[derive(Debug)]
pub struct Accounts {
    store: Option<Store>,
    token_ttl: Option<Duration>,
    throttle: Throttle,
    /// Password checks allowed at once (each Argon2 check holds ~19 MiB
    /// and a core for tens of milliseconds).
    checks: Arc<tokio::sync::Semaphore>,
}

impl Accounts {
    /// Accounts in `store`; issued tokens live `token_ttl` (forever when
    /// `None`). Runs as many password checks at once as there are cores.
    pub fn new(store: Option<Store>, token_ttl: Option<Duration>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::with_checks(store, token_ttl, cores)
    }

    /// As [`Accounts::new`], with at most `checks` password checks at once.
    pub fn with_checks(store: Option<Store>, token_ttl: Option<Duration>, checks: usize) -> Self {
        Self {
            store,
            token_ttl,
            throttle: Throttle::default(),
            checks: Arc::new(tokio::sync::Semaphore::new(checks.max(1))),
        }
    }

    /// Verifies email and password and issues a new token. Failures for one
    /// email or one address (an IPv6 /64) are slowed down exponentially,
    /// before Argon2 runs; one attempt per email and per address is checked
    /// at a time, and no more password checks at once than the server has
    /// cores (others are refused with [`LoginError::Busy`]).
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        from: IpAddr,
    ) -> Result<IssuedToken, LoginError> {
        let store = self.store.as_ref().ok_or(LoginError::NoStore)?;
        let keys = throttle_keys(email, from);
        let attempt = self
            .throttle
            .begin(&keys, Instant::now())
            .map_err(LoginError::Throttled)?;
        let permit = self
            .checks
            .clone()
            .try_acquire_owned()
            .map_err(|_| LoginError::Busy)?;
        let user = store.find_user(email).await?;
        let password = password.to_owned();
        let phc = user.as_ref().map(|u| u.password_hash.clone());
        // Unknown emails cost the same Argon2 work as wrong passwords. The
        // permit lives as long as the check, even if this caller goes away.
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify_password(&password, phc.as_deref().unwrap_or(&DUMMY_HASH))
        })
        .await
        .unwrap_or(false);
        let user = match (ok, user) {
            (true, Some(user)) => user,
            _ => {
                attempt.fail(Instant::now());
                return Err(LoginError::InvalidCredentials);
            }
        };
        attempt.succeed();
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
                token_id: Some(s.id.clone()),
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
            token_id: Some(row.id),
        })
    }

    /// Whether the token with this id is still usable (not revoked, not
    /// expired); an unknown id is not.
    pub async fn token_usable(&self, id: &str) -> Result<bool, LoginError> {
        let store = self.store.as_ref().ok_or(LoginError::NoStore)?;
        let row = store.find_client_token_by_id(id).await?;
        Ok(row.is_some_and(|r| r.is_usable(Utc::now().naive_utc())))
    }
}

/// What failed logins are counted against: the email (case-insensitive)
/// and the address, IPv6 by /64 (one host usually holds a whole /64).
fn throttle_keys(email: &str, from: IpAddr) -> [String; 2] {
    let from = match from {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mut bits = v6.octets();
            bits[8..].fill(0);
            format!("ip:{}/64", std::net::Ipv6Addr::from(bits))
        }
        IpAddr::V6(v6) => format!("ip:{}", v6.to_canonical()),
        IpAddr::V4(v4) => format!("ip:{v4}"),
    };
    [format!("email:{}", email.to_lowercase()), from]
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

/// Exponential delays after failed logins, per email and per address; and
/// one attempt at a time per email and per address, so attempts sent
/// together cannot all pass before the first failure is counted.
#[derive(Debug, Default)]
pub struct Throttle {
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    failures: HashMap<String, Failures>,
    in_flight: HashSet<String>,
}

/// One login attempt under way; it ends (and frees its keys) when dropped.
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    keys: Vec<String>,
}

impl Attempt<'_> {
    /// Records a failure for each key.
    pub fn fail(self, now: Instant) {
        self.throttle.fail(&self.keys, now);
    }

    /// Clears the failures of the first key (the email) after a success.
    pub fn succeed(self) {
        if let Some(email) = self.keys.first() {
            self.throttle.succeed(email);
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut state = self.throttle.state.lock().expect("throttle lock");
        for k in &self.keys {
            state.in_flight.remove(k);
        }
    }
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
        let state = self.state.lock().expect("throttle lock");
        Self::wait(&state, keys, now)
    }

    fn wait(state: &ThrottleState, keys: &[String], now: Instant) -> Result<(), Duration> {
        let wait = keys
            .iter()
            .filter_map(|k| state.failures.get(k))
            .filter(|f| now.duration_since(f.last) < FORGET_AFTER)
            .map(|f| (f.last + Self::delay(f.count)).saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    /// Starts an attempt for `keys`: `Err(wait)` when any of them must still
    /// wait after failures, or has an attempt under way (then the wait is
    /// [`BASE_DELAY`]).
    pub fn begin(&self, keys: &[String], now: Instant) -> Result<Attempt<'_>, Duration> {
        let mut state = self.state.lock().expect("throttle lock");
        Self::wait(&state, keys, now)?;
        if keys.iter().any(|k| state.in_flight.contains(k)) {
            return Err(BASE_DELAY);
        }
        state.in_flight.extend(keys.iter().cloned());
        Ok(Attempt {
            throttle: self,
            keys: keys.to_vec(),
        })
    }

    /// Records a failure for each of `keys`.
    pub fn fail(&self, keys: &[String], now: Instant) {
        let mut state = self.state.lock().expect("throttle lock");
        let failures = &mut state.failures;
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
        self.state
            .lock()
            .expect("throttle lock")
            .failures
            .remove(key);
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

    #[test]
    fn one_attempt_per_email_and_per_address_at_a_time() {
        let t = Throttle::default();
        let now = Instant::now();
        let keys = throttle_keys("A@x.test", "192.0.2.1".parse().unwrap());
        let first = t.begin(&keys, now).unwrap();
        // Same email (any case) from elsewhere, or anything from the same address.
        let same_email = throttle_keys("a@X.test", "192.0.2.2".parse().unwrap());
        let same_address = throttle_keys("b@x.test", "192.0.2.1".parse().unwrap());
        assert_eq!(t.begin(&same_email, now).unwrap_err(), BASE_DELAY);
        assert_eq!(t.begin(&same_address, now).unwrap_err(), BASE_DELAY);
        let other = throttle_keys("b@x.test", "192.0.2.2".parse().unwrap());
        drop(t.begin(&other, now).unwrap());
        // A failure is counted before the keys are free again.
        first.fail(now);
        assert_eq!(t.begin(&keys, now).unwrap_err(), BASE_DELAY);
        let later = t.begin(&keys, now + BASE_DELAY).unwrap();
        later.succeed();
        // The email's failures are cleared, the address's are not.
        assert!(t.begin(&same_email, now + BASE_DELAY).is_ok());
        assert!(t.check(&same_address, now).is_err());
    }

    #[test]
    fn ipv6_addresses_count_by_64() {
        let key = |ip: &str| throttle_keys("e", ip.parse().unwrap())[1].clone();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "ip:2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:bbbb::9"), key("2001:db8:1:2::1"));
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::ffff:192.0.2.7"), "ip:192.0.2.7");
        assert_eq!(key("192.0.2.7"), "ip:192.0.2.7");
    }
}
