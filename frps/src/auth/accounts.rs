//! Provider accounts (the people who run GPU boxes): password login, client
//! tokens, and throttling of failed logins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use chrono::{NaiveDateTime, Utc};

use super::keys::{absent_if_unreadable, within_deadline};
use super::secret;
use crate::store::{Store, StoreError};

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
    #[error("too many failed logins; retry in {}s", .0.as_millis().div_ceil(1000).max(1))]
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

    /// How long a refused caller should wait before trying again, when
    /// an attempt sooner is refused the same way.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LoginError::Throttled(wait) => Some(*wait),
            LoginError::Busy => Some(BUSY_RETRY),
            _ => None,
        }
    }
}

impl From<StoreError> for LoginError {
    fn from(e: StoreError) -> Self {
        tracing::warn!("account lookup failed: {e}");
        LoginError::Unavailable
    }
}

/// A database call past [`DB_DEADLINE`] ([`within_deadline`], shared with
/// key lookups) is unavailable, as a failed one is.
impl From<super::keys::LookupError> for LoginError {
    fn from(e: super::keys::LookupError) -> Self {
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

/// A session's token, re-checked ([`Accounts::review_token`]).
#[derive(Debug, Clone)]
pub enum TokenReview {
    /// Revoked, expired or gone: the session must end.
    Unusable,
    /// Usable, with more than half its lifetime left (or no expiry).
    Usable,
    /// Usable and past half its lifetime: a new token of the same account
    /// and family, to hand the box; the old one is revoked.
    Renewed(IssuedToken),
}

/// Hashes a password with Argon2id (PHC string).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing with default parameters cannot fail")
        .to_string()
}

/// Checks a password against a PHC string. A stored hash frps cannot
/// check (another scheme, as an application's own `users` table may hold,
/// or no hash at all) costs the same Argon2 work as a wrong password, so
/// the time taken does not tell such an account from an unknown email.
pub fn verify_password(password: &str, phc: &str) -> bool {
    let checked = PasswordHash::new(phc).map_err(drop).and_then(|h| {
        if h.hash.is_none() {
            // Nothing to compare with.
            return Err(());
        }
        match Argon2::default().verify_password(password.as_bytes(), &h) {
            Ok(()) => Ok(true),
            Err(argon2::password_hash::Error::Password) => Ok(false),
            Err(_) => Err(()),
        }
    });
    checked.unwrap_or_else(|()| {
        let spent = PasswordHash::new(DUMMY_HASH).expect("the dummy hash parses");
        let _ = Argon2::default().verify_password(password.as_bytes(), &spent);
        false
    })
}

/// Password checks run at once on a machine of `cores` cores: half of
/// them, one at least.
pub fn password_checks(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// How long a caller refused with [`LoginError::Busy`] is asked to wait.
pub const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Longest a login waits for its turn (behind other attempts for the same
/// email or address, or for a free password check).
pub const TURN_WAIT: Duration = Duration::from_secs(5);

/// Longest wait for one account-database call of a login, a token check or
/// a renewal (as for key lookups): the pool's acquire timeout covers only
/// getting a connection, and a query on a path that died without a reset,
/// or waiting on a lock, would never return, holding a password-check
/// permit, the address's turn, or a session's token watch meanwhile.
pub const DB_DEADLINE: Duration = super::keys::DB_TIMEOUT;

/// Accounts and client tokens.
#[derive(Debug)]
pub struct Accounts {
    store: Option<Store>,
    token_ttl: Option<Duration>,
    throttle: Throttle,
    /// Password checks allowed at once (each Argon2 check holds ~19 MiB
    /// and a core for tens of milliseconds).
    checks: Arc<tokio::sync::Semaphore>,
    /// SHA-256 of tokens this frps issued or saw log in lately: not
    /// guesses, so they log in past their address's failures.
    known: KnownTokens,
    /// Where each account logged in from lately: its password logins from
    /// there are not held up by its email's failures from elsewhere.
    logged_in: LoggedIn,
}

/// Where each account logged in from lately, with its password or a token:
/// per email (SHA-256, lowercased), the addresses ([`address_keys`]'s
/// first, SHA-256) of its last [`LOGIN_ADDRESSES`] logins within
/// [`KNOWN_LOGIN_IDLE`]. Only logins that succeeded add to it, and each
/// account's list is capped, so an account holder logging in from ever new
/// addresses fills only its own (a table shared by all, once full, would
/// have stopped remembering the other accounts' owners).
#[derive(Debug, Default)]
struct LoggedIn(Mutex<HashMap<[u8; 32], Vec<LoggedInFrom>>>);

/// An address (SHA-256 of its key) and when the account last logged in
/// from it.
type LoggedInFrom = ([u8; 32], Instant);

impl LoggedIn {
    fn keys(email: &str, from: IpAddr) -> ([u8; 32], [u8; 32]) {
        let [address, ..] = &address_keys(from)[..] else {
            unreachable!("every address has a key")
        };
        (secret::hash(&email.to_lowercase()), secret::hash(address))
    }

    /// Whether `email` logged in from `from` lately.
    fn contains(&self, email: &str, from: IpAddr) -> bool {
        let (email, address) = Self::keys(email, from);
        let logged_in = self.0.lock().expect("logged-in lock");
        logged_in.get(&email).is_some_and(|addresses| {
            addresses
                .iter()
                .any(|(a, at)| *a == address && at.elapsed() < KNOWN_LOGIN_IDLE)
        })
    }

    /// Remembers that `email` logged in from `from` now; past
    /// [`LOGIN_ADDRESSES`] for it, the address unused the longest goes.
    fn insert(&self, email: &str, from: IpAddr) {
        let (email, address) = Self::keys(email, from);
        let mut logged_in = self.0.lock().expect("logged-in lock");
        let addresses = logged_in.entry(email).or_default();
        addresses.retain(|(a, at)| *a != address && at.elapsed() < KNOWN_LOGIN_IDLE);
        if addresses.len() >= LOGIN_ADDRESSES {
            addresses.remove(0);
        }
        addresses.push((address, Instant::now()));
    }
}

/// Addresses remembered per account as ones it logged in from.
pub const LOGIN_ADDRESSES: usize = 8;

/// SHA-256 of the tokens this frps issued or saw log in lately, with when
/// last: a map that grows with the fleet (a cache with its own operation
/// queues held a quarter of a MiB from the start), up to [`KNOWN_TOKENS`]
/// entries.
#[derive(Debug, Default)]
struct KnownTokens {
    seen: Mutex<HashMap<[u8; 32], Instant>>,
}

impl KnownTokens {
    /// Whether `hash` was seen within the last [`KNOWN_TOKEN_IDLE`].
    fn contains(&self, hash: &[u8; 32]) -> bool {
        let seen = self.seen.lock().expect("known tokens lock");
        seen.get(hash)
            .is_some_and(|at| at.elapsed() < KNOWN_TOKEN_IDLE)
    }

    /// Remembers `hash` as seen now. Full, those unseen for
    /// [`KNOWN_TOKEN_IDLE`] go first; still full, it is not remembered (a
    /// token then waits out its address's failures, as one only another
    /// frps has seen does).
    fn insert(&self, hash: [u8; 32]) {
        let mut seen = self.seen.lock().expect("known tokens lock");
        if seen.len() >= KNOWN_TOKENS && !seen.contains_key(&hash) {
            seen.retain(|_, at| at.elapsed() < KNOWN_TOKEN_IDLE);
            if seen.len() >= KNOWN_TOKENS {
                return;
            }
        }
        seen.insert(hash, Instant::now());
    }

    fn forget(&self, hash: &[u8; 32]) {
        self.seen.lock().expect("known tokens lock").remove(hash);
    }

    #[cfg(test)]
    fn clear(&self) {
        self.seen.lock().expect("known tokens lock").clear();
    }
}

/// Most tokens [`Accounts`] remembers as known (SHA-256 each).
pub const KNOWN_TOKENS: usize = 100_000;

/// How long a known token is remembered after its last use.
pub const KNOWN_TOKEN_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long an email and address pair that logged in is remembered after
/// its last login (with the password or a token of that account).
pub const KNOWN_LOGIN_IDLE: Duration = Duration::from_secs(30 * 24 * 3600);

impl Accounts {
    /// Accounts in `store`; issued tokens live `token_ttl` (forever when
    /// `None`). Runs as many password checks at once as there are cores
    /// beyond the first half (one at least): a flood of password logins
    /// from many addresses leaves the rest to the traffic.
    pub fn new(store: Option<Store>, token_ttl: Option<Duration>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::with_checks(store, token_ttl, password_checks(cores))
    }

    /// As [`Accounts::new`], with at most `checks` password checks at once.
    pub fn with_checks(store: Option<Store>, token_ttl: Option<Duration>, checks: usize) -> Self {
        Self {
            store,
            token_ttl,
            throttle: Throttle::default(),
            checks: Arc::new(tokio::sync::Semaphore::new(checks.max(1))),
            known: KnownTokens::default(),
            logged_in: LoggedIn::default(),
        }
    }

    /// Emails and addresses with failed logins remembered now (for tests
    /// and diagnostics).
    pub fn failing(&self) -> usize {
        self.throttle
            .state
            .lock()
            .expect("throttle lock")
            .failures
            .len()
    }

    /// Verifies email and password and issues a new token. Failures are
    /// slowed down before Argon2 runs ([`throttle_keys`]): exponentially
    /// for the email from one address and for the address (an IPv6 /64),
    /// past [`LOOSE_FREE`] failures for the email from anywhere and for an
    /// IPv6 /48 (which an address the account logged in from lately skips).
    /// Attempts sharing a key they are checked against take turns (each
    /// sees the failures of the ones before it, so a burst of guesses costs
    /// one check), and password checks run on half the cores at most; a
    /// login that waits longer than [`TURN_WAIT`] for either is refused
    /// ([`LoginError::Throttled`] / [`LoginError::Busy`]).
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        from: IpAddr,
    ) -> Result<IssuedToken, LoginError> {
        let store = self.store.as_ref().ok_or(LoginError::NoStore)?;
        // No account has a longer email (`frps user add` refuses one), and
        // the throttle would keep it as a key: up to a frame's 64 KiB each.
        // Nor one with a control character: PostgreSQL refuses a NUL in a
        // parameter, which would answer "unavailable" (and log a warning)
        // where SQLite answers "invalid".
        if email.len() > MAX_EMAIL_BYTES || email.contains(char::is_control) {
            return Err(LoginError::InvalidCredentials);
        }
        let keys = throttle_keys(email, from);
        // An email and address pair that logged in lately is not held up
        // by the email's failures from elsewhere (nor waits for the email's
        // turn): someone guessing from many addresses must not keep the
        // owner out. Its own failures still count in the email's.
        let checked = if self.logged_in.contains(email, from) {
            keys.iter()
                .filter(|k| Policy::of(k) == Policy::Tight)
                .cloned()
                .collect()
        } else {
            keys.clone()
        };
        let attempt = self
            .throttle
            .begin(&checked, TURN_WAIT)
            .await
            .map_err(NotNow::refusal)?
            .counting(&keys);
        // The permit first: while every check is taken, the database is not
        // asked either. The lookup under it has its deadline, so a stuck
        // database holds a permit for that long at most.
        let permit = tokio::time::timeout(TURN_WAIT, self.checks.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(LoginError::Busy)?;
        // The account's own email, in any ASCII letter case: PostgreSQL's
        // lower() also folds other letters (`İ` to `i`), so that many
        // spellings would reach one account, each with its own failure
        // budget. Another spelling is checked like an unknown email.
        let user = absent_if_unreadable(within_deadline(store.find_user(email)).await, "users")?
            .filter(|u| u.email.eq_ignore_ascii_case(email));
        let password = password.to_owned();
        let phc = user.as_ref().map(|u| u.password_hash.clone());
        // Unknown emails cost the same Argon2 work as wrong passwords. The
        // permit lives as long as the check, even if this caller goes away.
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify_password(&password, phc.as_deref().unwrap_or(DUMMY_HASH))
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
        self.logged_in.insert(email, from);
        self.issue(store, user.id, &user.email, Some(&user.password_hash))
            .await
    }

    /// A token for the account `user_id`; with `verified`, none if its
    /// password hash is no longer that one (changed while it was checked).
    async fn issue(
        &self,
        store: &Store,
        user_id: i64,
        email: &str,
        verified: Option<&str>,
    ) -> Result<IssuedToken, LoginError> {
        let s = secret::generate("frpxc");
        // A lifetime reaching past the last representable date never ends.
        let expires_at = self
            .token_ttl
            .and_then(|ttl| expiry_after(Utc::now().naive_utc(), ttl));
        let stored = within_deadline(store.insert_client_token(
            &s.id,
            &s.hash_hex,
            &s.prefix,
            user_id,
            expires_at,
            verified,
        ))
        .await?;
        if !stored {
            return Err(LoginError::InvalidCredentials);
        }
        self.known.insert(secret::hash(&s.plaintext));
        Ok(IssuedToken {
            token: s.plaintext,
            expires_at,
            principal: Principal {
                user_id,
                email: email.to_owned(),
                token_id: Some(s.id.clone()),
            },
        })
    }

    /// Re-checks the token with this id and, once less than half of
    /// `--token-ttl` is left of it, renews it: a new token of the same
    /// account and family replaces it, so a box that has only its token (no
    /// password) never runs out, whether it stays connected for months or
    /// logs in again. The old token stays valid until the new one is first
    /// used or said saved ([`Accounts::renewal_saved`]; a renewal lost on
    /// its way, or not saved, costs the box nothing), then stops working with every other token of the family
    /// (a copy used elsewhere, a leaked one). A revoked token is not
    /// renewed; revoking any token of a family revokes all of it.
    ///
    /// A session that started at `session_start` renews nothing once the
    /// token logged in again after that (the same box back on another
    /// connection, perhaps to another frps, before this session was found
    /// gone): that login renewed it or will, and a renewal here would
    /// revoke the one it handed out.
    pub async fn review_token(
        &self,
        id: &str,
        session_start: Option<NaiveDateTime>,
    ) -> Result<TokenReview, LoginError> {
        let store = self.store.as_ref().ok_or(LoginError::NoStore)?;
        let found = within_deadline(store.find_client_token_by_id(id)).await;
        let Some(row) = absent_if_unreadable(found, "client_tokens")? else {
            return Ok(TokenReview::Unusable);
        };
        let now = Utc::now().naive_utc();
        if !row.is_usable(now) {
            return Ok(TokenReview::Unusable);
        }
        if let (Some(start), Some(used)) = (session_start, row.last_used_at)
            && used > start
        {
            return Ok(TokenReview::Usable);
        }
        // Renewed: past half its lifetime; with an expiry though tokens
        // no longer expire (`--token-ttl 0` set after it was issued: it
        // would still end); without one though tokens now do (it would
        // never end).
        let expires_at = self.token_ttl.and_then(|ttl| expiry_after(now, ttl));
        let due = match (self.token_ttl, row.expires_at) {
            (Some(ttl), Some(ends)) => (ends - now).to_std().unwrap_or_default() <= ttl / 2,
            (None, Some(_)) => true,
            (Some(_), None) => expires_at.is_some(),
            (None, None) => false,
        };
        if !due {
            return Ok(TokenReview::Usable);
        }
        let s = secret::generate("frpxc");
        if !within_deadline(store.rotate_client_token(
            &row.id,
            &s.id,
            &s.hash_hex,
            &s.prefix,
            expires_at,
            session_start,
        ))
        .await?
        {
            // Revoked meanwhile, or (for a session's review) logged in
            // again since the session started: that login renewed it.
            let again = within_deadline(store.find_client_token_by_id(id)).await;
            let still = absent_if_unreadable(again, "client_tokens")?
                .is_some_and(|row| row.is_usable(Utc::now().naive_utc()));
            return Ok(if still {
                TokenReview::Usable
            } else {
                TokenReview::Unusable
            });
        }
        self.known.insert(secret::hash(&s.plaintext));
        Ok(TokenReview::Renewed(IssuedToken {
            token: s.plaintext,
            expires_at,
            principal: Principal {
                user_id: row.user_id,
                email: row.email,
                token_id: Some(s.id),
            },
        }))
    }

    /// Logs in from `from` with a saved token. Refused tokens (unknown,
    /// revoked or expired) count as failures of the address's token
    /// logins ([`token_address_keys`]; wrong passwords count for its
    /// password logins), which take turns: guessing tokens is slowed down
    /// as guessing passwords is, before the database is asked
    /// ([`LoginError::Throttled`]). A valid token from an address without
    /// failures goes at once. A success leaves the address's failures as
    /// they are: one valid token must not reset the throttle for guesses.
    /// A token this frps issued or saw log in within [`KNOWN_TOKEN_IDLE`]
    /// is no guess: it is checked at once, past its address's failures, so
    /// wrong tokens sent from behind the same address (a NAT shared with a
    /// box whose token was revoked, restarted in a loop, or with someone
    /// who means harm) do not keep the boxes there from reconnecting.
    pub async fn login_token(&self, token: &str, from: IpAddr) -> Result<Principal, LoginError> {
        if self.store.is_none() {
            return Err(LoginError::NoStore);
        }
        let hash = secret::hash(token);
        if self.known.contains(&hash) {
            let outcome = self.check_token_hash(&hash).await;
            match &outcome {
                Err(LoginError::TokenInvalid | LoginError::TokenExpired) => {
                    self.known.forget(&hash)
                }
                // Seen log in now: known for KNOWN_TOKEN_IDLE from now,
                // not from when it was issued or first seen.
                Ok(who) => {
                    self.known.insert(hash);
                    self.logged_in.insert(&who.email, from);
                }
                Err(_) => {}
            }
            return outcome;
        }
        // Checked against (and waiting for) the address's token logins
        // only ([`token_address_keys`]).
        let keys = token_address_keys(from);
        let attempt = self
            .throttle
            .begin(&keys, TURN_WAIT)
            .await
            .map_err(NotNow::refusal)?
            .counting(&keys);
        let outcome = self.check_token_hash(&hash).await;
        match &outcome {
            Err(LoginError::TokenInvalid | LoginError::TokenExpired) => {
                attempt.fail(Instant::now())
            }
            Ok(who) => {
                self.known.insert(hash);
                self.logged_in.insert(&who.email, from);
            }
            Err(_) => {}
        }
        outcome
    }

    /// Renewal `hash`, sent to a session of account `user_id`, is saved by
    /// its box (`TokenSaved`): taken as used, as at its first login, so
    /// what it was renewed from and copies of that stop working now (one
    /// logging in meanwhile would have it renewed again, revoking this
    /// one and locking the box out). Whether it was confirmed now.
    pub async fn renewal_saved(&self, hash: &[u8; 32], user_id: i64) -> Result<bool, LoginError> {
        let store = self.store.as_ref().ok_or(LoginError::NoStore)?;
        let found = within_deadline(store.find_client_token(&secret::hex(hash))).await;
        let Some(row) = absent_if_unreadable(found, "client_tokens")? else {
            return Ok(false);
        };
        let Some(parent) = row
            .renewed_from
            .as_deref()
            .filter(|_| row.user_id == user_id)
        else {
            return Ok(false);
        };
        let confirmed = within_deadline(store.confirm_saved_client_token(&row.id, parent)).await?;
        Ok(confirmed.is_some())
    }

    /// Checks a saved token, without throttling: logins on the control port
    /// must go through [`Accounts::login_token`].
    pub async fn check_token(&self, token: &str) -> Result<Principal, LoginError> {
        self.check_token_hash(&secret::hash(token)).await
    }

    /// [`Accounts::check_token`] for the token whose SHA-256 is `hash`.
    async fn check_token_hash(&self, hash: &[u8; 32]) -> Result<Principal, LoginError> {
        let store = self.store.as_ref().ok_or(LoginError::NoStore)?;
        let found = within_deadline(store.find_client_token(&secret::hex(hash))).await;
        let row = absent_if_unreadable(found, "client_tokens")?.ok_or(LoginError::TokenInvalid)?;
        if row.revoked_at.is_some() {
            return Err(LoginError::TokenInvalid);
        }
        if !row.is_usable(Utc::now().naive_utc()) {
            return Err(LoginError::TokenExpired);
        }
        if let Some(parent) = &row.renewed_from {
            // The first use of a renewal: the box has it, so what it
            // replaced (and any renewal lost before it) stops working.
            // Revoked meanwhile (a login with its parent renewed that
            // again): refused like any revoked token.
            if within_deadline(store.confirm_client_token(&row.id, parent))
                .await?
                .is_none()
            {
                return Err(LoginError::TokenInvalid);
            }
        } else {
            within_deadline(store.touch_client_token(&row.id)).await?;
        }
        Ok(Principal {
            user_id: row.user_id,
            email: row.email,
            token_id: Some(row.id),
        })
    }
}

/// Longest email an account can have (RFC 5321's path limit, less the
/// angle brackets).
pub const MAX_EMAIL_BYTES: usize = 254;

/// What failed password logins are counted against: the email
/// (case-insensitive) from the address, with delays from the first failure;
/// the email from anywhere, with delays only past [`LOOSE_FREE`] failures
/// ([`Policy::Loose`]: one address guessing an email's password must not
/// keep its owner out); and the address ([`address_keys`]). The first is
/// the pair.
fn throttle_keys(email: &str, from: IpAddr) -> Vec<String> {
    let email = email.to_lowercase();
    let addresses = address_keys(from);
    // No address key holds a space: the pair reads back one way only.
    let mut keys = vec![
        format!("login:{email} {}", addresses[0]),
        format!("email:{email}"),
    ];
    keys.extend(addresses);
    keys
}

/// What failed logins from `from` are counted against: the address, IPv6
/// by /64 (one host usually holds a whole /64); and for IPv6 its /48 too,
/// loosely ([`Policy::Loose`]): whoever holds a /48 (a tunnel broker hands
/// them out for free) would otherwise get 65,536 first attempts at full
/// speed.
fn address_keys(from: IpAddr) -> Vec<String> {
    match crate::limits::address_block(from) {
        IpAddr::V6(block) => {
            let mut net = block.octets();
            net[6..].fill(0);
            let net = std::net::Ipv6Addr::from(net);
            vec![format!("ip:{block}/64"), format!("net:{net}/48")]
        }
        v4 => vec![format!("ip:{v4}")],
    }
}

/// The address key token logins are throttled by: [`address_keys`]'s
/// first (the address, or its /64), of their own (`token-ip:`). A box
/// whose saved token was refused logs in with its password next, at once:
/// under the password logins' keys that token's failure held it up
/// (refused as throttled, a retry later, "too many failed logins" in its
/// log). Guessing passwords gains nothing from it: tokens failing no
/// longer spend that budget, and passwords failing still do. Tokens are
/// not guessable, so this throttle only spares the database, and the /48's
/// loose count would only make the boxes of one /48 share a fate.
fn token_address_keys(from: IpAddr) -> Vec<String> {
    address_keys(from)
        .into_iter()
        .take(1)
        .map(|k| format!("token-{k}"))
        .collect()
}

/// `now + lifetime`, or `None` when that lies past the last date that can
/// be represented (or `lifetime` exceeds any date difference).
pub fn expiry_after(now: NaiveDateTime, lifetime: Duration) -> Option<NaiveDateTime> {
    now.checked_add_signed(chrono::Duration::from_std(lifetime).ok()?)
}

/// What an unknown email's password is checked against: a hash made with
/// [`hash_password`]'s parameters, written out so that the first unknown
/// email costs no more than the next (a hash computed on first use made
/// that one take twice as long as a wrong password).
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$rLpGYZyGG9az4+cg5gAEQg$GARExp7SsAfSyTKevl2Yg1fz3JzLvENpIXBQEXOSp8M";

/// Longest enforced wait between failed attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Wait after the first failure; doubles with each further one.
pub const BASE_DELAY: Duration = Duration::from_millis(500);
/// Failures older than this are forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Failures counted loosely ([`Policy::Loose`]: an email's from anywhere,
/// an IPv6 /48's) that delay nothing: the delays start with the next one.
/// For an email, they come on top of each address's and each pair's own
/// delays, and spare the addresses it logged in from.
pub const LOOSE_FREE: u32 = 19;
/// Loosely counted failures leak away one per this long, so that one
/// address failing once a minute (its own delays' pace) never gets past
/// [`LOOSE_FREE`]: four a minute from many addresses do.
pub const LOOSE_LEAK: Duration = Duration::from_secs(15);

/// How failures of a key turn into a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// [`BASE_DELAY`] after the first failure, doubling with each further
    /// one up to [`MAX_DELAY`]; forgotten after [`FORGET_AFTER`] without
    /// one.
    Tight,
    /// Failures leak away one per [`LOOSE_LEAK`]; past [`LOOSE_FREE`] of
    /// them, delays as [`Policy::Tight`]'s after the ones beyond.
    Loose,
}

impl Policy {
    fn of(key: &str) -> Self {
        if key.starts_with("email:") || key.starts_with("net:") || key == OVERFLOW {
            Policy::Loose
        } else {
            Policy::Tight
        }
    }
}
/// Emails, email and address pairs, and addresses with failures tracked at
/// most (about 15 MiB with ordinary emails, 40 MiB at most with the
/// longest ones frps takes). Once full, failures of further emails share one
/// entry, [`OVERFLOW`] (password guessing must not escape its throttle by
/// filling the table first); further pairs and addresses are not tracked
/// (their email's failures still count; the address throttle only spares
/// the database, and whoever holds 100,000 addresses in 15 minutes gets
/// past it anyway: sharing one entry would throttle every box logging in
/// from a new address instead).
const MAX_TRACKED: usize = 100_000;
/// The entry of the failures no tracked entry could take (no email or
/// address is empty).
const OVERFLOW: &str = "";

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// The last failure.
    last: Instant,
    /// How far leaking has been counted ([`Policy::Loose`]).
    leaked: Instant,
}

impl Failures {
    /// The failures still counted at `now`.
    fn level(&self, policy: Policy, now: Instant) -> u32 {
        if now.saturating_duration_since(self.last) >= FORGET_AFTER {
            return 0;
        }
        match policy {
            Policy::Tight => self.count,
            Policy::Loose => self.count.saturating_sub(self.leaks(now)),
        }
    }

    /// Failures leaked away between `leaked` and `now`.
    fn leaks(&self, now: Instant) -> u32 {
        let since = now.saturating_duration_since(self.leaked);
        u32::try_from(since.as_nanos() / LOOSE_LEAK.as_nanos()).unwrap_or(u32::MAX)
    }

    /// How long an attempt at `now` must still wait.
    fn wait(&self, policy: Policy, now: Instant) -> Duration {
        let level = self.level(policy, now);
        let over = match policy {
            Policy::Tight => level,
            Policy::Loose => level.saturating_sub(LOOSE_FREE),
        };
        (self.last + Throttle::delay(over)).saturating_duration_since(now)
    }

    /// Counts one more failure at `now`.
    fn add(&mut self, policy: Policy, now: Instant) {
        let level = self.level(policy, now);
        if policy == Policy::Loose {
            // Whole leaks only, so the time toward the next one is kept.
            let leaks = self.leaks(now).min(self.count);
            self.leaked = if level == 0 {
                now
            } else {
                self.leaked + LOOSE_LEAK * leaks
            };
        }
        self.count = level.saturating_add(1);
        self.last = now;
    }
}

/// Why a login may not be checked now ([`Throttle::begin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotNow {
    /// Failures for its email or address ask it to wait this long.
    Wait(Duration),
    /// Its turn behind the attempts already under way for its email or
    /// address did not come in time (a fleet logging in together).
    NoTurn,
}

impl NotNow {
    /// What the login is told: throttled after failures, busy without.
    pub fn refusal(self) -> LoginError {
        match self {
            NotNow::Wait(wait) => LoginError::Throttled(wait),
            NotNow::NoTurn => LoginError::Busy,
        }
    }
}

/// Delays after failed logins, per key ([`Policy`]: exponential, or loose
/// past some free failures); and attempts for one key in turn, so attempts
/// sent together cannot all pass before the first failure is counted.
#[derive(Debug, Default)]
pub struct Throttle {
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    failures: HashMap<String, Failures>,
    /// When a full table last dropped its forgotten failures (at most once
    /// a second: each sweep reads every entry).
    swept: Option<Instant>,
    /// One lock per key with attempts under way or waiting.
    turns: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

/// One login attempt's turn; it ends (and frees its keys) when dropped.
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    keys: Vec<String>,
    /// What a failure counts against ([`Attempt::counting`]).
    counted: Vec<String>,
    turns: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

impl<'a> Attempt<'a> {
    /// Counts a failure against `keys` instead of the ones it waited for.
    pub fn counting(mut self, keys: &[String]) -> Attempt<'a> {
        self.counted = keys.to_vec();
        self
    }

    /// Records a failure for each key counted.
    pub fn fail(self, now: Instant) {
        self.throttle.fail(&self.counted, now);
    }

    /// Clears the failures of the first key (the email and address pair
    /// of a password login) after a success.
    pub fn succeed(self) {
        if let Some(first) = self.counted.first() {
            self.throttle.succeed(first);
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.turns.clear();
        let mut state = self.throttle.state.lock().expect("throttle lock");
        for k in &self.keys {
            // Nobody else holds or waits for this key's turn: forget it.
            if state
                .turns
                .get(k)
                .is_some_and(|t| Arc::strong_count(t) == 1)
            {
                state.turns.remove(k);
            }
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

    /// The entry `key`'s failures count in: its own, or, when the table is
    /// full, [`OVERFLOW`] for an email and none for an address.
    fn slot<'a>(state: &ThrottleState, key: &'a str) -> Option<&'a str> {
        if state.failures.len() < MAX_TRACKED || state.failures.contains_key(key) {
            Some(key)
        } else if key.starts_with("email:") {
            Some(OVERFLOW)
        } else {
            None
        }
    }

    fn wait(state: &ThrottleState, keys: &[String], now: Instant) -> Result<(), Duration> {
        let wait = keys
            .iter()
            .filter_map(|k| {
                let slot = Self::slot(state, k)?;
                Some(state.failures.get(slot)?.wait(Policy::of(slot), now))
            })
            .max()
            .unwrap_or_default();
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    /// Waits (at most `patience`) for the turn of `keys`, behind attempts
    /// for any of them already under way, then checks their failures:
    /// [`NotNow::Wait`] when any must still wait after failures,
    /// [`NotNow::NoTurn`] when the turn did not come in time.
    pub async fn begin(&self, keys: &[String], patience: Duration) -> Result<Attempt<'_>, NotNow> {
        let mut attempt = Attempt {
            throttle: self,
            keys: keys.to_vec(),
            counted: keys.to_vec(),
            turns: Vec::with_capacity(keys.len()),
        };
        // Always in the same order, so two attempts never wait on each other.
        let mut order: Vec<&String> = keys.iter().collect();
        order.sort();
        order.dedup();
        let deadline = tokio::time::Instant::now() + patience;
        for key in order {
            let turn = {
                let mut state = self.state.lock().expect("throttle lock");
                state.turns.entry(key.clone()).or_default().clone()
            };
            match tokio::time::timeout_at(deadline, turn.lock_owned()).await {
                Ok(guard) => attempt.turns.push(guard),
                Err(_) => return Err(NotNow::NoTurn),
            }
        }
        self.check(keys, Instant::now()).map_err(NotNow::Wait)?;
        Ok(attempt)
    }

    /// Records a failure for each of `keys`.
    pub fn fail(&self, keys: &[String], now: Instant) {
        let mut state = self.state.lock().expect("throttle lock");
        if state.failures.len() >= MAX_TRACKED
            && state
                .swept
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            state
                .failures
                .retain(|k, f| f.level(Policy::of(k), now) > 0);
            state.swept = Some(now);
        }
        for k in keys {
            let Some(slot) = Self::slot(&state, k).map(str::to_owned) else {
                continue;
            };
            let policy = Policy::of(&slot);
            state
                .failures
                .entry(slot)
                .or_insert(Failures {
                    count: 0,
                    last: now,
                    leaked: now,
                })
                .add(policy, now);
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
    fn the_dummy_hash_costs_what_a_real_one_does() {
        let dummy = PasswordHash::new(DUMMY_HASH).unwrap();
        let real_hash = hash_password("x");
        let real = PasswordHash::new(&real_hash).unwrap();
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(dummy.params, real.params, "Argon2's default cost changed");
        assert!(verify_password(
            "frpx-dummy-password-for-unknown-users",
            DUMMY_HASH
        ));
    }

    #[test]
    fn a_full_failure_table_stops_growing_and_throttles_new_addresses_no_more() {
        let throttle = Throttle::default();
        let start = Instant::now();
        for i in 0..MAX_TRACKED {
            throttle.fail(
                &[format!("ip:10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)],
                start,
            );
        }
        let len = || throttle.state.lock().unwrap().failures.len();
        assert_eq!(len(), MAX_TRACKED);
        // Further emails share the overflow entry (one more entry at most),
        // so a new email waits on the shared failures: guessing passwords
        // does not escape its throttle by filling the table.
        for i in 0..1_000 {
            throttle.fail(
                &[format!("email:{i}@x"), format!("ip:192.168.0.{}", i % 250)],
                start,
            );
        }
        assert_eq!(len(), MAX_TRACKED + 1);
        assert!(throttle.check(&["email:new@x".into()], start).is_err());
        // Further addresses are not tracked: a box logging in with its
        // token from a new address is not held up by others' failures.
        assert!(throttle.check(&["ip:192.168.0.1".into()], start).is_ok());
        // A tracked key keeps its own count.
        throttle.fail(&["ip:10.0.0.7".into()], start);
        assert_eq!(
            throttle.state.lock().unwrap().failures["ip:10.0.0.7"].count,
            2
        );
        // Once forgotten, the table is swept on the next failure.
        let later = start + FORGET_AFTER + Duration::from_secs(1);
        throttle.fail(&["email:fresh@x".into()], later);
        assert_eq!(len(), 1);
        assert!(throttle.check(&["email:new@x".into()], later).is_ok());
    }

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
        let keys = vec!["login:a ip:1".to_string(), "ip:1".to_string()];
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
        assert!(
            t.check(&["login:b ip:1".into(), "ip:1".into()], start)
                .is_err()
        );
        assert!(
            t.check(&["login:b ip:2".into(), "ip:2".into()], start)
                .is_ok()
        );
        assert!(t.check(&keys, start + FORGET_AFTER).is_ok());
        assert_eq!(Throttle::delay(40), MAX_DELAY);
        t.succeed("login:a ip:1");
        assert!(t.check(&["login:a ip:1".into()], start).is_ok());
    }

    #[test]
    fn an_emails_failures_from_anywhere_delay_only_past_its_free_ones_and_leak_away() {
        let t = Throttle::default();
        let email = vec!["email:a".to_string()];
        let count = |k: &str| t.state.lock().unwrap().failures.get(k).map(|f| f.count);
        let start = Instant::now();
        for _ in 0..LOOSE_FREE {
            t.fail(&email, start);
        }
        assert_eq!(t.check(&email, start), Ok(()), "{LOOSE_FREE} free");
        t.fail(&email, start);
        assert_eq!(t.check(&email, start), Err(BASE_DELAY));
        t.fail(&email, start);
        assert_eq!(t.check(&email, start), Err(BASE_DELAY * 2));
        // One leaks away per LOOSE_LEAK: a failure then counts on what is
        // left.
        let at = |leaks: u32| start + LOOSE_LEAK * leaks;
        t.fail(&email, at(1));
        assert_eq!(t.check(&email, at(1)), Err(BASE_DELAY * 2));
        // A leak and a half on: one leaked away, and the half is kept
        // toward the next across a failure.
        let half = at(2) + LOOSE_LEAK / 2;
        t.fail(&email, half);
        assert_eq!(count("email:a"), Some(LOOSE_FREE + 2));
        t.fail(&email, at(3));
        assert_eq!(count("email:a"), Some(LOOSE_FREE + 2));
        assert_eq!(t.check(&email, at(3)), Err(BASE_DELAY * 2));
        // All leaked away: free, and counted from one again.
        let empty = at(3 + LOOSE_FREE + 2);
        assert!(t.check(&email, empty).is_ok());
        t.fail(&email, empty);
        assert_eq!(count("email:a"), Some(1));
        // Forgotten 15 minutes after the last failure, as tight ones are
        // (more than leak away in that time).
        for _ in 0..100 {
            t.fail(&email, empty);
        }
        let forgotten = empty + FORGET_AFTER;
        assert!(t.check(&email, forgotten).is_ok());
        t.fail(&email, forgotten);
        assert_eq!(count("email:a"), Some(1));
    }

    #[test]
    fn one_address_guessing_at_its_own_pace_never_delays_the_emails_owner() {
        let t = Throttle::default();
        let attacker = throttle_keys("owner@x.test", "198.51.100.9".parse().unwrap());
        let owner = throttle_keys("owner@x.test", "192.0.2.1".parse().unwrap());
        let start = Instant::now();
        let mut now = start;
        let mut guesses = 0;
        // Two hours of guessing as fast as the throttle lets one address.
        while now < start + Duration::from_secs(2 * 3600) {
            match t.check(&attacker, now) {
                Ok(()) => {
                    t.fail(&attacker, now);
                    guesses += 1;
                }
                Err(wait) => now += wait,
            }
            assert_eq!(t.check(&owner, now), Ok(()), "owner held up at {guesses}");
        }
        assert!((120..=130).contains(&guesses), "{guesses} guesses");
        // Many addresses, each guessing once, do delay the email's logins
        // from anywhere (what lets the owner through: below).
        for i in 0..=LOOSE_FREE {
            let from = IpAddr::from([203, 0, 113, i as u8]);
            let keys = throttle_keys("owner@x.test", from);
            if t.check(&keys, now).is_ok() {
                t.fail(&keys, now);
            }
        }
        assert!(t.check(&owner, now).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_for_one_email_or_address_take_turns() {
        use futures_util::FutureExt;
        let t = Throttle::default();
        let patience = Duration::from_secs(5);
        let keys = throttle_keys("A@x.test", "192.0.2.1".parse().unwrap());
        let first = t.begin(&keys, patience).await.unwrap();
        // Same email (any case) from elsewhere, or anything from the same
        // address: waits for the first to end.
        let same_email = throttle_keys("a@X.test", "192.0.2.2".parse().unwrap());
        let same_address = throttle_keys("b@x.test", "192.0.2.1".parse().unwrap());
        let mut behind = Box::pin(t.begin(&same_address, patience));
        assert!(behind.as_mut().now_or_never().is_none(), "waits its turn");
        let gave_up = t.begin(&same_email, Duration::from_millis(10)).await;
        assert_eq!(
            gave_up.unwrap_err(),
            NotNow::NoTurn,
            "no turn within its patience"
        );
        // Told as logins in progress, not as failed ones (nothing failed).
        let told = NotNow::NoTurn.refusal();
        assert_eq!(told, LoginError::Busy);
        assert!(told.to_string().contains("in progress"), "{told}");
        // Unrelated keys go at once.
        let other = throttle_keys("c@x.test", "192.0.2.3".parse().unwrap());
        drop(t.begin(&other, patience).await.unwrap());
        // The first fails: the one waiting behind it is throttled without a
        // check of its own.
        first.fail(Instant::now());
        let waited = behind.await;
        assert!(
            matches!(waited, Err(NotNow::Wait(d)) if d > Duration::ZERO),
            "{waited:?}"
        );
        // Once the delay has passed, the next attempt goes, and a success
        // clears the failures of the email from that address (not the
        // address's). One failure does not delay the email from elsewhere.
        assert!(t.check(&same_email, Instant::now()).is_ok());
        let later = Instant::now() + BASE_DELAY;
        assert!(t.check(&keys, later).is_ok());
        assert!(t.check(&keys[..1], Instant::now()).is_err());
        t.succeed(&keys[0]);
        assert!(t.check(&keys[..1], Instant::now()).is_ok());
        assert!(t.check(&same_address, Instant::now()).is_err());
        // Every turn was handed back and forgotten.
        assert!(t.state.lock().unwrap().turns.is_empty());
    }

    #[tokio::test]
    async fn a_login_waits_for_a_free_password_check_then_gives_up() {
        let db = crate::store::TempDb::new("accounts");
        let accounts = Accounts::with_checks(Some(Store::connect(&db.url).await.unwrap()), None, 1);
        let ip = |n| IpAddr::from([192, 0, 2, n]);
        // Every password check is taken: the login waits TURN_WAIT, then is
        // told to come back (the database is not even asked).
        let held = accounts.checks.clone().acquire_owned().await.unwrap();
        tokio::time::pause();
        let started = tokio::time::Instant::now();
        let busy = accounts.login("who@x.test", "pw", ip(1)).await;
        assert_eq!(busy.unwrap_err(), LoginError::Busy);
        let waited = started.elapsed();
        assert!(waited >= TURN_WAIT && waited < TURN_WAIT * 2, "{waited:?}");
        tokio::time::resume();
        // A check frees up while a login waits: it goes ahead.
        let waiting = accounts.login("who@x.test", "pw", ip(2));
        let freeing = async {
            tokio::task::yield_now().await;
            drop(held);
        };
        let (outcome, ()) = tokio::join!(waiting, freeing);
        assert_eq!(outcome.unwrap_err(), LoginError::InvalidCredentials);
    }

    #[test]
    fn expiries_past_the_last_date_are_none_not_a_panic() {
        let now = Utc::now().naive_utc();
        let day = Duration::from_secs(86400);
        assert_eq!(
            expiry_after(now, day),
            Some(now + chrono::Duration::days(1))
        );
        // Within chrono's durations but past the year 262143; beyond them.
        assert_eq!(expiry_after(now, day * 100_000_000), None);
        assert_eq!(expiry_after(now, Duration::MAX), None);
    }

    /// A fresh database with one account, `email`, password `password`.
    async fn store_with(email: &str) -> (crate::store::TempDb, Store) {
        let db = crate::store::TempDb::new("accounts");
        let store = Store::connect(&db.url).await.unwrap();
        store
            .create_user(email, &hash_password("password"))
            .await
            .unwrap();
        (db, store)
    }

    #[tokio::test]
    async fn huge_token_lifetimes_issue_tokens_without_expiry() {
        let (_db, store) = store_with("ttl@x.test").await;
        let ip = IpAddr::from([192, 0, 2, 1]);
        for ttl in [Duration::MAX, Duration::from_secs(86400 * 100_000_000)] {
            let accounts = Accounts::new(Some(store.clone()), Some(ttl));
            let issued = accounts.login("ttl@x.test", "password", ip).await.unwrap();
            assert_eq!(issued.expires_at, None, "{ttl:?}");
        }
    }

    #[test]
    fn password_checks_leave_half_the_cores_to_the_traffic() {
        assert_eq!([1, 2, 3, 8].map(password_checks), [1, 1, 1, 4]);
    }

    #[test]
    fn a_hash_frps_cannot_check_costs_a_wrong_passwords_work() {
        let timed = |phc: &str| {
            let started = std::time::Instant::now();
            assert!(!verify_password("password", phc));
            started.elapsed()
        };
        // The quickest of three (a busy machine only makes the rest slower).
        let wrong = (0..3).map(|_| timed(DUMMY_HASH)).min().unwrap();
        for foreign in [
            "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
            "$argon2id$v=19$m=19456,t=2,p=1$bm90IGEgaGFzaA",
            "plaintext",
            "",
        ] {
            let took = timed(foreign);
            assert!(took * 4 >= wrong, "{foreign:?}: {took:?} against {wrong:?}");
        }
    }

    #[tokio::test]
    async fn a_session_whose_token_logged_in_again_since_renews_nothing() {
        let (_db, store) = store_with("race@x.test").await;
        let ip = IpAddr::from([192, 0, 2, 1]);
        let expiring = Accounts::new(Some(store.clone()), Some(Duration::from_secs(86400)));
        let forever = Accounts::new(Some(store.clone()), None);
        let issued = expiring.login("race@x.test", "password", ip).await.unwrap();
        let id = issued.principal.token_id.clone().unwrap();
        // The session that logged in with it started here; the box then
        // came back on another connection and logged in with it again.
        let session_start = Utc::now().naive_utc();
        tokio::time::sleep(Duration::from_millis(5)).await;
        forever.login_token(&issued.token, ip).await.unwrap();
        // Due for renewal (tokens no longer expire), yet the old session
        // leaves it to the new one.
        assert!(matches!(
            forever
                .review_token(&id, Some(session_start))
                .await
                .unwrap(),
            TokenReview::Usable
        ));
        // A session that started after that login renews it.
        assert!(matches!(
            forever
                .review_token(&id, Some(Utc::now().naive_utc()))
                .await
                .unwrap(),
            TokenReview::Renewed(_)
        ));
    }

    /// The same, interleaved: the old session found the token not used
    /// since it started, then the box's new login renewed it and handed
    /// the renewal out, then the old session's renewal ran. The renewal the
    /// box holds stays valid (it was revoked as lost, and a box without a
    /// password stopped for good).
    #[tokio::test]
    async fn a_login_renewing_the_token_meanwhile_keeps_its_renewal() {
        let (_db, store) = store_with("interleave@x.test").await;
        let ip = IpAddr::from([192, 0, 2, 1]);
        let expiring = Accounts::new(Some(store.clone()), Some(Duration::from_secs(86400)));
        let forever = Accounts::new(Some(store.clone()), None);
        let issued = expiring
            .login("interleave@x.test", "password", ip)
            .await
            .unwrap();
        let id = issued.principal.token_id.clone().unwrap();
        let session_start = Utc::now().naive_utc();
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The new login, and its renewal at login (due: tokens no longer
        // expire).
        forever.login_token(&issued.token, ip).await.unwrap();
        let TokenReview::Renewed(handed) = forever.review_token(&id, None).await.unwrap() else {
            panic!("renewed at login");
        };
        // The old session's renewal, its check passed before that login.
        let rotated = store
            .rotate_client_token(&id, "late", "late-hash", "late", None, Some(session_start))
            .await
            .unwrap();
        assert!(!rotated, "renewed though logged in again since");
        assert!(
            forever.login_token(&handed.token, ip).await.is_ok(),
            "the renewal handed to the box was revoked"
        );
    }

    #[tokio::test]
    async fn a_changed_token_lifetime_reaches_tokens_issued_before() {
        let (_db, store) = store_with("ttl@x.test").await;
        let ip = IpAddr::from([192, 0, 2, 1]);
        let day = Duration::from_secs(86400);
        let expiring = Accounts::new(Some(store.clone()), Some(day * 30));
        let forever = Accounts::new(Some(store.clone()), None);
        let id = |t: &IssuedToken| t.principal.token_id.clone().unwrap();
        // Issued to expire, reviewed once tokens no longer do: renewed
        // into one without expiry, which is then left alone.
        let issued = expiring.login("ttl@x.test", "password", ip).await.unwrap();
        assert!(issued.expires_at.is_some());
        let TokenReview::Renewed(lasting) = forever.review_token(&id(&issued), None).await.unwrap()
        else {
            panic!("not renewed");
        };
        assert_eq!(lasting.expires_at, None);
        assert!(matches!(
            forever.review_token(&id(&lasting), None).await.unwrap(),
            TokenReview::Usable
        ));
        // And back: once tokens expire again, it is renewed into one that
        // does, which is then usable until half its life.
        let TokenReview::Renewed(ending) =
            expiring.review_token(&id(&lasting), None).await.unwrap()
        else {
            panic!("not renewed");
        };
        assert!(ending.expires_at.is_some());
        assert!(matches!(
            expiring.review_token(&id(&ending), None).await.unwrap(),
            TokenReview::Usable
        ));
        // A lifetime past the last date issues tokens without expiry: those
        // are not renewed over and over.
        let huge = Accounts::new(Some(store.clone()), Some(Duration::MAX));
        assert!(matches!(
            huge.review_token(&id(&lasting), None).await.unwrap(),
            TokenReview::Usable
        ));
    }

    #[tokio::test]
    async fn an_email_no_account_can_have_is_refused_before_the_throttle_keeps_it() {
        let db = crate::store::TempDb::new("accounts");
        let store = Store::connect(&db.url).await.unwrap();
        let accounts = Accounts::new(Some(store), None);
        let ip = IpAddr::from([192, 0, 2, 7]);
        let long = format!("{}@x.test", "a".repeat(60_000));
        let err = accounts.login(&long, "password", ip).await.unwrap_err();
        assert_eq!(err, LoginError::InvalidCredentials);
        {
            let state = accounts.throttle.state.lock().unwrap();
            assert!(state.failures.is_empty() && state.turns.is_empty());
        }
        // Nor with a control character (a NUL trips PostgreSQL).
        for odd in ["a\u{0}@x.test", "a@x.test\n", "a\u{7f}@x.test"] {
            let err = accounts.login(odd, "password", ip).await.unwrap_err();
            assert_eq!(err, LoginError::InvalidCredentials, "{odd:?}");
        }
        {
            let state = accounts.throttle.state.lock().unwrap();
            assert!(state.failures.is_empty() && state.turns.is_empty());
        }
        // At the limit the login is an ordinary failed one.
        let longest = format!("{}@x.test", "a".repeat(MAX_EMAIL_BYTES - 7));
        assert_eq!(longest.len(), MAX_EMAIL_BYTES);
        let err = accounts.login(&longest, "password", ip).await.unwrap_err();
        assert_eq!(err, LoginError::InvalidCredentials);
        assert_eq!(accounts.throttle.state.lock().unwrap().failures.len(), 3);
    }

    #[tokio::test]
    async fn guesses_from_many_addresses_keep_out_only_addresses_the_owner_never_used() {
        let (_db, store) = store_with("owner@x.test").await;
        let accounts = Accounts::new(Some(store), None);
        let home = IpAddr::from([192, 0, 2, 1]);
        let box_ = IpAddr::from([192, 0, 2, 2]);
        let issued = accounts
            .login("owner@x.test", "password", home)
            .await
            .unwrap();
        // The box logs in with its token from another address, and again
        // from a third as a token another frps issued.
        let moved = IpAddr::from([192, 0, 2, 3]);
        accounts.login_token(&issued.token, box_).await.unwrap();
        accounts.known.clear();
        accounts.login_token(&issued.token, moved).await.unwrap();
        for i in 0..=LOOSE_FREE {
            let from = IpAddr::from([203, 0, 113, i as u8]);
            let guess = accounts.login("owner@x.test", "guess", from).await;
            assert_eq!(guess.err(), Some(LoginError::InvalidCredentials));
        }
        // A new address waits, even with the right password...
        let elsewhere = IpAddr::from([198, 51, 100, 1]);
        let refused = accounts.login("owner@x.test", "password", elsewhere).await;
        assert!(
            matches!(refused, Err(LoginError::Throttled(_))),
            "{refused:?}"
        );
        // ... while the addresses the account logged in from, with the
        // password or with a token, go at once.
        for from in [home, box_, moved] {
            let started = Instant::now();
            let issued = accounts.login("owner@x.test", "password", from).await;
            assert!(issued.is_ok(), "{from}: {issued:?}");
            assert!(started.elapsed() < BASE_DELAY);
        }
        // A wrong password from there is still counted, against the pair.
        let count = |k: &str| accounts.throttle.state.lock().unwrap().failures[k].count;
        let before = count("email:owner@x.test");
        let typo = accounts.login("owner@x.test", "typo", home).await;
        assert_eq!(typo.err(), Some(LoginError::InvalidCredentials));
        assert_eq!(
            count("email:owner@x.test"),
            before + 1,
            "counted all the same"
        );
        let again = accounts.login("owner@x.test", "password", home).await;
        assert!(matches!(again, Err(LoginError::Throttled(_))), "{again:?}");
    }

    #[test]
    fn an_account_is_remembered_at_its_last_addresses_only() {
        let logged_in = LoggedIn::default();
        let ip = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        logged_in.insert("Owner@x.test", ip(0));
        logged_in.insert("other@x.test", ip(0));
        for n in 1..1000 {
            logged_in.insert("owner@x.test", ip(n));
        }
        assert!(logged_in.contains("owner@X.test", ip(999)));
        let kept = (0..1000).filter(|&n| logged_in.contains("owner@x.test", ip(n)));
        assert_eq!(kept.count(), LOGIN_ADDRESSES);
        assert!(!logged_in.contains("owner@x.test", ip(0)));
        assert!(
            logged_in.contains("other@x.test", ip(0)),
            "another account's"
        );
        // A login again from an address moves it to the end.
        logged_in.insert("other@x.test", ip(1));
        logged_in.insert("other@x.test", ip(0));
        for n in 2..=LOGIN_ADDRESSES as u32 {
            logged_in.insert("other@x.test", ip(n));
        }
        assert!(logged_in.contains("other@x.test", ip(0)));
        assert!(!logged_in.contains("other@x.test", ip(1)));
    }

    #[tokio::test]
    async fn token_logins_count_and_wait_on_their_64_only() {
        let (_db, store) = store_with("v6@x.test").await;
        let accounts = Accounts::new(Some(store), None);
        let ip = |n: u16| IpAddr::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 7, n, 0, 0, 0, 1));
        let token = accounts
            .login("v6@x.test", "password", IpAddr::from([192, 0, 2, 1]))
            .await
            .unwrap()
            .token;
        for n in 0..=LOOSE_FREE as u16 {
            let guess = accounts.login_token("frpxc_guess", ip(n)).await;
            assert_eq!(guess, Err(LoginError::TokenInvalid), "/64 number {n}");
        }
        // A box of the /48 with a token this frps does not know goes at
        // once; so does a password login from the /48: tokens failing
        // count for their own /64's token logins only.
        accounts.known.clear();
        let started = Instant::now();
        assert!(accounts.login_token(&token, ip(100)).await.is_ok());
        assert!(started.elapsed() < BASE_DELAY);
        let guess = accounts.login_token("frpxc_guess", ip(0)).await;
        assert!(matches!(guess, Err(LoginError::Throttled(_))), "{guess:?}");
        assert!(
            accounts
                .login("v6@x.test", "password", ip(101))
                .await
                .is_ok()
        );
    }

    #[test]
    fn known_tokens_are_held_up_to_their_cap() {
        let known = KnownTokens::default();
        let hash = |i: usize| {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i as u64).to_be_bytes());
            h
        };
        for i in 0..KNOWN_TOKENS {
            known.insert(hash(i));
        }
        assert!(known.contains(&hash(0)) && known.contains(&hash(KNOWN_TOKENS - 1)));
        // Full of tokens seen lately: a further one is not remembered, one
        // already there is seen again.
        known.insert(hash(KNOWN_TOKENS));
        assert!(!known.contains(&hash(KNOWN_TOKENS)));
        known.insert(hash(7));
        assert!(known.contains(&hash(7)));
        known.forget(&hash(7));
        assert!(!known.contains(&hash(7)));
        known.insert(hash(KNOWN_TOKENS));
        assert!(known.contains(&hash(KNOWN_TOKENS)), "room again");
    }

    #[tokio::test]
    async fn a_token_this_frps_knows_logs_in_past_its_addresses_failures() {
        let (_db, store) = store_with("nat@x.test").await;
        let accounts = Accounts::new(Some(store.clone()), None);
        let nat = IpAddr::from([198, 51, 100, 7]);
        let issued = accounts
            .login("nat@x.test", "password", IpAddr::from([192, 0, 2, 1]))
            .await
            .unwrap();
        // Wrong tokens from behind the same NAT: the address is throttled.
        for guess in ["frpxc_a", "frpxc_b"] {
            let _ = accounts.login_token(guess, nat).await;
        }
        let guess = accounts.login_token("frpxc_c", nat).await;
        assert!(matches!(guess, Err(LoginError::Throttled(_))), "{guess:?}");
        // The box's own token, issued here, goes at once all the same.
        let started = Instant::now();
        let who = accounts.login_token(&issued.token, nat).await.unwrap();
        assert_eq!(who.email, "nat@x.test");
        assert!(started.elapsed() < BASE_DELAY);
        // Still checked: revoked, it is refused, and is a stranger again.
        let id = issued.principal.token_id.clone().unwrap();
        assert_eq!(store.revoke_client_tokens(&id).await.unwrap(), 1);
        assert_eq!(
            accounts.login_token(&issued.token, nat).await,
            Err(LoginError::TokenInvalid)
        );
        assert!(matches!(
            accounts.login_token(&issued.token, nat).await,
            Err(LoginError::Throttled(_))
        ));
    }

    #[tokio::test]
    async fn a_copy_of_a_token_whose_renewal_is_saved_cannot_take_over() {
        let (_db, store) = store_with("box@x.test").await;
        let (at_box, elsewhere) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([203, 0, 113, 9]));
        // Issued with a day to live, judged by a 3-day lifetime: due.
        let short = Accounts::new(Some(store.clone()), Some(Duration::from_secs(86400)));
        let accounts = Accounts::new(Some(store.clone()), Some(Duration::from_secs(3 * 86400)));
        let t1 = short.login("box@x.test", "password", at_box).await.unwrap();
        let t1_id = t1.principal.token_id.clone().unwrap();
        let start = Utc::now().naive_utc() - chrono::Duration::seconds(1);
        // The box's session renews T1 into T2, which the box saves and says so.
        let TokenReview::Renewed(t2) = accounts.review_token(&t1_id, Some(start)).await.unwrap()
        else {
            panic!("not renewed");
        };
        let t2_hash = secret::hash(&t2.token);
        // Said saved by another account's session: nothing happens.
        assert!(
            !accounts
                .renewal_saved(&t2_hash, t2.principal.user_id + 1)
                .await
                .unwrap()
        );
        assert!(
            accounts
                .renewal_saved(&t2_hash, t2.principal.user_id)
                .await
                .unwrap()
        );
        assert!(
            !accounts
                .renewal_saved(&t2_hash, t2.principal.user_id)
                .await
                .unwrap(),
            "once"
        );
        // A copy of T1 no longer logs in, so it cannot be renewed again
        // (which would revoke T2 and lock the box out).
        assert!(matches!(
            accounts.login_token(&t1.token, elsewhere).await,
            Err(LoginError::TokenInvalid)
        ));
        // The box's session goes on under T2, which it has not logged in
        // with yet: renewed in turn when due, not taken for another login.
        let t2_id = t2.principal.token_id.clone().unwrap();
        assert!(matches!(
            accounts.review_token(&t2_id, Some(start)).await.unwrap(),
            TokenReview::Usable
        ));
        let later = Accounts::new(Some(store.clone()), Some(Duration::from_secs(30 * 86400)));
        assert!(matches!(
            later.review_token(&t2_id, Some(start)).await.unwrap(),
            TokenReview::Renewed(_)
        ));
        // And logs in with it.
        accounts.login_token(&t2.token, at_box).await.unwrap();
    }

    #[tokio::test]
    async fn a_renewal_said_saved_after_it_was_renewed_again_revokes_nothing() {
        let (_db, store) = store_with("box@x.test").await;
        let at_box = IpAddr::from([192, 0, 2, 1]);
        let short = Accounts::new(Some(store.clone()), Some(Duration::from_secs(86400)));
        let accounts = Accounts::new(Some(store.clone()), Some(Duration::from_secs(3 * 86400)));
        let later = Accounts::new(Some(store.clone()), Some(Duration::from_secs(30 * 86400)));
        let t1 = short.login("box@x.test", "password", at_box).await.unwrap();
        let start = Utc::now().naive_utc() - chrono::Duration::seconds(1);
        async fn renew(accounts: &Accounts, t: &IssuedToken, start: NaiveDateTime) -> IssuedToken {
            let id = t.principal.token_id.as_deref().unwrap();
            match accounts.review_token(id, Some(start)).await.unwrap() {
                TokenReview::Renewed(t) => t,
                other => panic!("{other:?}"),
            }
        }
        let t2 = renew(&accounts, &t1, start).await;
        // T2's write is slow: the session renews it again before frpc says
        // T2 is saved.
        let t3 = renew(&later, &t2, start).await;
        let user = t2.principal.user_id;
        assert!(
            !accounts
                .renewal_saved(&secret::hash(&t2.token), user)
                .await
                .unwrap()
        );
        // (Read, not checked: a check would be T3's first use.)
        let t3_row = store.find_client_token(&secret::hash_hex(&t3.token)).await;
        assert!(
            t3_row.unwrap().unwrap().revoked_at.is_none(),
            "T3 still valid"
        );
        // T3 said saved: what came before it stops working.
        assert!(
            accounts
                .renewal_saved(&secret::hash(&t3.token), user)
                .await
                .unwrap()
        );
        for old in [&t1.token, &t2.token] {
            assert!(matches!(
                accounts.check_token(old).await,
                Err(LoginError::TokenInvalid)
            ));
        }
    }

    #[tokio::test]
    async fn a_known_token_logging_in_is_known_from_then_on() {
        let (_db, store) = store_with("k@x.test").await;
        let accounts = Accounts::new(Some(store.clone()), None);
        let from = IpAddr::from([192, 0, 2, 1]);
        let issued = accounts.login("k@x.test", "password", from).await.unwrap();
        let hash = secret::hash(&issued.token);
        // Issued almost KNOWN_TOKEN_IDLE ago.
        let old = Instant::now() - (KNOWN_TOKEN_IDLE - Duration::from_secs(3600));
        accounts.known.seen.lock().unwrap().insert(hash, old);
        accounts.login_token(&issued.token, from).await.unwrap();
        let at = accounts.known.seen.lock().unwrap()[&hash];
        assert!(at.elapsed() < Duration::from_secs(60), "{:?}", at.elapsed());
    }

    #[tokio::test]
    async fn failed_token_logins_are_throttled_per_address() {
        let db = crate::store::TempDb::new("accounts");
        let store = Store::connect(&db.url).await.unwrap();
        store
            .create_user("tok@x.test", &hash_password("password"))
            .await
            .unwrap();
        let accounts = Accounts::new(Some(store), None);
        let ip = |n| IpAddr::from([192, 0, 2, n]);
        let token = accounts
            .login("tok@x.test", "password", ip(1))
            .await
            .unwrap()
            .token;
        // A valid token from an address without failures: at once.
        let started = Instant::now();
        let who = accounts.login_token(&token, ip(2)).await.unwrap();
        assert_eq!(who.email, "tok@x.test");
        assert!(started.elapsed() < BASE_DELAY, "{:?}", started.elapsed());
        // A guess fails and counts against its address: the next attempt
        // from there, even with a valid token this frps does not know (one
        // another frps issued), is refused unchecked.
        assert_eq!(
            accounts.login_token("frpxc_guess", ip(3)).await,
            Err(LoginError::TokenInvalid)
        );
        accounts.known.clear();
        let throttled = accounts.login_token(&token, ip(3)).await;
        assert!(
            matches!(throttled, Err(LoginError::Throttled(d)) if d > Duration::ZERO && d <= BASE_DELAY),
            "{throttled:?}"
        );
        // Not a password login from there: a box whose saved token was
        // refused logs in with its password next, at once (the token's
        // failure is no password guess). Passwords failing throttle
        // passwords, not tokens.
        assert!(
            accounts
                .login("tok@x.test", "password", ip(3))
                .await
                .is_ok()
        );
        let wrong = accounts.login("tok@x.test", "wrong", ip(5)).await;
        assert_eq!(wrong.err(), Some(LoginError::InvalidCredentials));
        let password = accounts.login("tok@x.test", "password", ip(5)).await;
        assert!(
            matches!(password, Err(LoginError::Throttled(_))),
            "{password:?}"
        );
        accounts.known.clear();
        assert!(accounts.login_token(&token, ip(5)).await.is_ok());
        // Other addresses are not slowed down.
        assert!(accounts.login_token(&token, ip(4)).await.is_ok());
        // Once the delay has passed, the valid token logs in; it does not
        // clear the address's failures, so the next guess waits longer.
        // (A token this frps issued or saw is let through at once: below.)
        accounts.known.clear();
        tokio::time::sleep(BASE_DELAY).await;
        assert!(accounts.login_token(&token, ip(3)).await.is_ok());
        assert_eq!(
            accounts.login_token("frpxc_guess", ip(3)).await,
            Err(LoginError::TokenInvalid)
        );
        let again = accounts.login_token("frpxc_guess", ip(3)).await;
        assert!(
            matches!(again, Err(LoginError::Throttled(d)) if d > BASE_DELAY),
            "two failures: {again:?}"
        );
    }

    #[test]
    fn ipv6_addresses_count_by_64() {
        let key = |ip: &str| address_keys(ip.parse().unwrap())[0].clone();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "ip:2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:bbbb::9"), key("2001:db8:1:2::1"));
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::ffff:192.0.2.7"), "ip:192.0.2.7");
        assert_eq!(key("192.0.2.7"), "ip:192.0.2.7");
        assert_eq!(address_keys("192.0.2.7".parse().unwrap()).len(), 1);
        assert_eq!(
            address_keys("2001:db8:1:2:aaaa::1".parse().unwrap()),
            ["ip:2001:db8:1:2::/64", "net:2001:db8:1::/48"]
        );
    }

    #[test]
    fn an_ipv6_48_gets_its_free_failures_then_waits_on_every_64() {
        let t = Throttle::default();
        let now = Instant::now();
        let keys = |net: u16, n: u16| {
            address_keys(std::net::Ipv6Addr::new(0x2001, 0xdb8, net, n, 0, 0, 0, 1).into())
        };
        for n in 0..=LOOSE_FREE as u16 {
            assert_eq!(t.check(&keys(1, n), now), Ok(()), "/64 number {n}");
            t.fail(&keys(1, n), now);
        }
        assert_eq!(t.check(&keys(1, 1000), now), Err(BASE_DELAY));
        assert_eq!(t.check(&keys(2, 0), now), Ok(()), "another /48");
    }
}
