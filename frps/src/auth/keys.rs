//! Consumer API keys on the public port: the static `--api-key`, then an
//! in-process cache, then Redis, then the database. Never fails open: when
//! the database is down, only keys already cached (and the static key) pass.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{NaiveDateTime, Utc};
use moka::future::Cache;
use tracing::{info, warn};

use super::redis::{CachedKey, RedisCache, TOMBSTONE_TTL};
use super::secret::{self, Secret};
use super::secret_eq;
use crate::limits::{FailureBudget, LookupGates};
use crate::ratelimit::{Limits, LimitsChange};
use crate::store::{ApiKeyRow, NewApiKey, Store, StoreError};

/// How long a valid key is trusted from the in-process cache, and how long
/// a revocation keeps the key from being cached again in-process.
pub const LOCAL_TTL: Duration = Duration::from_secs(10);
/// Deadline for the database lookup of a key that is not cached. A
/// revocation keeps a key from being cached again only for [`LOCAL_TTL`]
/// (in-process) and [`TOMBSTONE_TTL`] (Redis): an answer read before the
/// revocation but arriving after those guards expire would cache the revoked
/// key again. So a slower lookup is given up, the
/// request is answered as if the database were down (503), and the late
/// answer is never seen. Half the guards, leaving room for the Redis calls
/// before and after the lookup.
pub const DB_TIMEOUT: Duration = Duration::from_secs(5);
const _: () = assert!(
    2 * DB_TIMEOUT.as_millis() <= LOCAL_TTL.as_millis()
        && 2 * DB_TIMEOUT.as_millis() <= TOMBSTONE_TTL.as_millis(),
    "a key lookup must end well before the revocation guards expire"
);
/// How long an unknown key is remembered as invalid (in-process only).
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Entries kept in each in-process cache.
pub const LOCAL_CAPACITY: u64 = 100_000;

/// What a valid key is allowed: who it is (for rate limiting) and its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyGrant {
    /// The key's SHA-256: its identity in rate-limit counters (never the key).
    pub id: [u8; 32],
    /// Its rate limits.
    pub limits: Limits,
}

/// Outcome of checking a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// The key is valid, with what it is allowed.
    Valid(KeyGrant),
    /// No key was presented.
    Missing,
    /// The key is unknown, revoked, inactive or expired.
    Invalid,
    /// The key is not cached and the database cannot be asked.
    Unavailable,
    /// The caller's address has spent its budget of failed lookups
    /// ([`crate::limits::FailureBudget`]); one is free again after this.
    Throttled(Duration),
}

/// Counts a failed lookup when dropped, unless `counted` was cleared.
struct Failure<'a> {
    failures: &'a FailureBudget,
    from: IpAddr,
    counted: bool,
}

impl Drop for Failure<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.failures.fail(self.from, tokio::time::Instant::now());
        }
    }
}

/// Where validations were answered (for `/metrics` and the benchmark).
#[derive(Debug, Default)]
pub struct KeyStats {
    /// Answered by the static key.
    pub static_hits: AtomicU64,
    /// Answered by the in-process cache (valid or invalid).
    pub local_hits: AtomicU64,
    /// Answered by Redis.
    pub redis_hits: AtomicU64,
    /// Answered by the database.
    pub db_hits: AtomicU64,
    /// Database unavailable.
    pub db_errors: AtomicU64,
    /// Refused unasked: the caller's address had no failed lookups left.
    pub throttled: AtomicU64,
    /// Unavailable unasked: the caller's address had lookups under way for
    /// as long as a lookup may take ([`crate::limits::LookupGates`]).
    pub turn_timeouts: AtomicU64,
}

/// Validates consumer API keys.
pub struct KeyValidator {
    /// The static key, if one is set; `static_grant.id` is its SHA-256.
    static_key: Option<String>,
    static_grant: KeyGrant,
    /// Whether the static key is at least [`super::STRONG_SECRET`]
    /// characters long (see [`Self::check_from`]).
    static_strong: bool,
    store: Option<Store>,
    redis: Option<Arc<RedisCache>>,
    /// Valid keys, each with when it was asked about: trusted for
    /// [`LOCAL_TTL`] from then ([`FromAsked`]), not from when the answer
    /// came.
    valid: Cache<[u8; 32], (CachedKey, std::time::Instant)>,
    invalid: Cache<[u8; 32], ()>,
    /// When each key was last revoked (told through Redis): a database
    /// answer read before that is not cached.
    revoked: Cache<[u8; 32], std::time::Instant>,
    db_healthy: AtomicBool,
    /// Failed lookups allowed per caller address (none: unlimited).
    failures: Option<FailureBudget>,
    /// Lookups under way at once per caller address (with `failures`).
    gates: LookupGates,
    /// Counters.
    pub stats: KeyStats,
}

impl std::fmt::Debug for KeyValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyValidator")
            .field("static_key", &self.static_key.is_some())
            .field("store", &self.store.as_ref().map(Store::backend))
            .field("redis", &self.redis)
            .finish()
    }
}

impl KeyValidator {
    /// A validator over the static key (if any), the store (if any) and
    /// Redis (if any).
    pub fn new(
        static_key: Option<String>,
        store: Option<Store>,
        redis: Option<Arc<RedisCache>>,
    ) -> Self {
        let static_key = static_key.filter(|k| !k.is_empty());
        let static_strong = static_key
            .as_ref()
            .is_some_and(|k| k.chars().count() >= super::STRONG_SECRET);
        if static_key.is_some() {
            // It may come from an inherited `API_KEY` variable: say so.
            warn!(
                "a static API key is set (--api-key or API_KEY): the public port accepts it with no rate limits until frps restarts without it"
            );
            if !static_strong {
                warn!(
                    "the static API key is shorter than {} characters: an address out of its budget for wrong keys (--key-failures-per-minute) is refused even the right one until the budget refills; choose a long random key (openssl rand -hex 32)",
                    super::STRONG_SECRET
                );
            }
        }
        // The static key has no limits (there are no flags for them).
        let static_grant = KeyGrant {
            id: secret::hash(static_key.as_deref().unwrap_or_default()),
            limits: Limits::default(),
        };
        Self {
            static_key,
            static_grant,
            static_strong,
            store,
            redis,
            valid: Cache::builder()
                .max_capacity(LOCAL_CAPACITY)
                .time_to_live(LOCAL_TTL)
                .expire_after(FromAsked)
                .build(),
            invalid: Cache::builder()
                .max_capacity(LOCAL_CAPACITY)
                .time_to_live(NEGATIVE_TTL)
                .build(),
            revoked: Cache::builder()
                .max_capacity(LOCAL_CAPACITY)
                .time_to_live(LOCAL_TTL)
                .build(),
            db_healthy: AtomicBool::new(true),
            failures: None,
            gates: LookupGates::default(),
            stats: KeyStats::default(),
        }
    }

    /// Attaches the Redis layer (it needs a callback into this validator,
    /// so it is created after it).
    pub fn set_redis(&mut self, redis: Arc<RedisCache>) {
        self.redis = Some(redis);
    }

    /// Allows each caller address (block) `per_minute` lookups a minute
    /// that find no valid key (see [`FailureBudget`]).
    pub fn set_failure_budget(&mut self, per_minute: u32) {
        self.failures = Some(FailureBudget::new(per_minute));
    }

    /// Allows each caller address (block) `at_once` lookups under way at
    /// once (see [`LookupGates`]; with a failure budget only).
    pub fn set_lookups_per_address(&mut self, at_once: usize) {
        self.gates = LookupGates::new(at_once);
    }

    /// Whether any key at all can be valid.
    pub fn has_keys(&self) -> bool {
        self.static_key.is_some() || self.store.is_some()
    }

    /// Forgets what is cached in-process about `hash` (all keys when `None`).
    pub fn forget(&self, hash: Option<[u8; 32]>) {
        match hash {
            Some(h) => {
                let (valid, revoked) = (self.valid.clone(), self.revoked.clone());
                let at = std::time::Instant::now();
                tokio::spawn(async move {
                    revoked.insert(h, at).await;
                    valid.invalidate(&h).await;
                });
            }
            None => self.valid.invalidate_all(),
        }
    }

    /// Checks the key carried by a request's headers, from a caller at
    /// `from`.
    pub async fn check_headers(&self, headers: &http::HeaderMap, from: IpAddr) -> KeyCheck {
        match super::request_key(headers) {
            None => KeyCheck::Missing,
            Some(key) => self.check_from(key, Some(from)).await,
        }
    }

    /// Checks one key (no caller address: no failure budget applies).
    pub async fn check(&self, key: &str) -> KeyCheck {
        self.check_from(key, None).await
    }

    /// Checks one key presented from `from`: a key not cached here is looked
    /// up only while `from` has failed lookups left.
    pub async fn check_from(&self, key: &str, from: Option<IpAddr>) -> KeyCheck {
        // Compared so that the time tells a timing observer neither where a
        // guess differs from the static key nor how long that key is (and
        // without hashing each request's key first: the static key is the
        // common case of a small deployment).
        if let Some(k) = &self.static_key {
            // A short static key stays out of reach of an address out of
            // its budget (or a guess that would be right would tell, and
            // guessing it would go on at line rate); a strong one cannot be
            // guessed, and its common case stays one comparison.
            if !self.static_strong
                && let Some((failures, from)) = self.failures.as_ref().zip(from)
                && let Err(wait) = failures.check(from, tokio::time::Instant::now())
            {
                // Only a stored key known valid here still passes: it is
                // no guess at the static key (which is never cached).
                let hash = secret::hash(key);
                if let Some(answer) = self.cached(hash, Utc::now().timestamp()).await
                    && !matches!(answer, KeyCheck::Invalid)
                {
                    return answer;
                }
                return self.throttled(wait);
            }
            if secret_eq(key.as_bytes(), k.as_bytes()) {
                self.stats.static_hits.fetch_add(1, Ordering::Relaxed);
                return KeyCheck::Valid(self.static_grant);
            }
        }
        if self.store.is_none() {
            return KeyCheck::Invalid;
        }
        // What the database stores is not a key: whoever reads a stored
        // hash (a backup, Redis key names) must not be able to present it.
        if key.starts_with(crate::store::HASH_PREFIX) {
            return KeyCheck::Invalid;
        }
        let hash = secret::hash(key);
        let now = Utc::now().timestamp();
        if let Some(answer) = self.cached(hash, now).await {
            return answer;
        }
        let Some((failures, from)) = self.failures.as_ref().zip(from) else {
            return self.look_up(key, hash, now).await;
        };
        let over_budget = || {
            let wait = failures.check(from, tokio::time::Instant::now()).err()?;
            Some(self.throttled(wait))
        };
        if let Some(throttled) = over_budget() {
            return throttled;
        }
        // A few lookups per address at once (one address cannot take every
        // database connection); the rest wait, as long as a lookup may take.
        let Some(_turn) = self.gates.enter(from, DB_TIMEOUT).await else {
            self.stats.turn_timeouts.fetch_add(1, Ordering::Relaxed);
            return KeyCheck::Unavailable;
        };
        // The lookups ahead of this one may have cached its key (a caller's
        // concurrent requests with one new key ask the database once), or
        // spent the address's budget. And the wait may have been long.
        let now = Utc::now().timestamp();
        if let Some(answer) = self.cached(hash, now).await {
            return answer;
        }
        if let Some(throttled) = over_budget() {
            return throttled;
        }
        // Counted as failed when it finds no key, or is abandoned midway (a
        // caller closing its connection before the answer: a guesser must
        // not escape the count that way). Not when the database could not
        // answer: that says nothing of the caller, and counting it would
        // lock every caller behind a busy address (a NAT, an application's
        // backend) out for minutes after a short outage of the database.
        let mut failed = Failure {
            failures,
            from,
            counted: true,
        };
        let answer = self.look_up(key, hash, now).await;
        failed.counted = matches!(answer, KeyCheck::Invalid);
        answer
    }

    /// The answer to an address out of its failed-lookup budget for `wait`,
    /// counted.
    fn throttled(&self, wait: Duration) -> KeyCheck {
        self.stats.throttled.fetch_add(1, Ordering::Relaxed);
        KeyCheck::Throttled(wait)
    }

    /// What the in-process caches know of `hash`.
    async fn cached(&self, hash: [u8; 32], now: i64) -> Option<KeyCheck> {
        if let Some((entry, _)) = self.valid.get(&hash).await {
            self.stats.local_hits.fetch_add(1, Ordering::Relaxed);
            return Some(verdict(hash, entry, now));
        }
        if self.invalid.contains_key(&hash) {
            self.stats.local_hits.fetch_add(1, Ordering::Relaxed);
            return Some(KeyCheck::Invalid);
        }
        None
    }

    /// Asks Redis, then the database, about a key the caches do not know.
    async fn look_up(&self, key: &str, hash: [u8; 32], now: i64) -> KeyCheck {
        let Some(store) = &self.store else {
            return KeyCheck::Invalid;
        };
        let asked = std::time::Instant::now();
        // An entry Redis may have kept past a revocation it lost: the
        // database decides, and the entry serves only when it cannot.
        let mut suspect = None;
        if let Some(redis) = &self.redis
            && let Some(cached) = redis.get(&hash).await
        {
            if cached.trusted {
                return self.redis_answer(hash, cached.entry, asked, now).await;
            }
            suspect = Some(cached.entry);
        }
        match absent_if_unreadable(
            within_deadline(store.find_api_key(key, &hash)).await,
            "api_keys",
        ) {
            Ok(row) => {
                self.db_ok();
                self.stats.db_hits.fetch_add(1, Ordering::Relaxed);
                match row.filter(|r| r.is_valid(Utc::now().naive_utc())) {
                    Some(row) => {
                        let entry = CachedKey {
                            expires_at: row.expires_at.map(|t| t.and_utc().timestamp()),
                            limits: row.limits(),
                        };
                        if self.remember(hash, entry, asked).await
                            && let Some(redis) = &self.redis
                        {
                            redis.set(&hash, entry, now).await;
                        }
                        KeyCheck::Valid(KeyGrant {
                            id: hash,
                            limits: entry.limits,
                        })
                    }
                    None => {
                        self.invalid.insert(hash, ()).await;
                        // An entry Redis kept past its key's revocation:
                        // gone, with a tombstone, so no frps (one that
                        // still trusts Redis) takes it.
                        if suspect.is_some()
                            && let Some(redis) = &self.redis
                        {
                            redis.revoke(&hash).await;
                        }
                        KeyCheck::Invalid
                    }
                }
            }
            Err(e) => {
                self.db_failed(&e);
                match suspect {
                    // As any key cached before the database went away.
                    Some(entry) => self.redis_answer(hash, entry, asked, now).await,
                    None => KeyCheck::Unavailable,
                }
            }
        }
    }

    /// The answer of Redis's `entry` for `hash`, asked at `asked`: counted,
    /// and cached in-process ([`Self::remember`]).
    async fn redis_answer(
        &self,
        hash: [u8; 32],
        entry: CachedKey,
        asked: std::time::Instant,
        now: i64,
    ) -> KeyCheck {
        self.stats.redis_hits.fetch_add(1, Ordering::Relaxed);
        self.remember(hash, entry, asked).await;
        verdict(hash, entry, now)
    }

    /// Caches `entry` in-process unless a revocation of `hash` (or a change
    /// of its limits) arrived since `asked`, before or just after the insert:
    /// such an answer is used once, not remembered. Returns whether it was.
    async fn remember(&self, hash: [u8; 32], entry: CachedKey, asked: std::time::Instant) -> bool {
        if self.revoked_since(&hash, asked).await {
            return false;
        }
        self.valid.insert(hash, (entry, asked)).await;
        if self.revoked_since(&hash, asked).await {
            self.valid.invalidate(&hash).await;
            return false;
        }
        true
    }

    /// Whether a revocation of `hash` arrived at or after `asked`.
    async fn revoked_since(&self, hash: &[u8; 32], asked: std::time::Instant) -> bool {
        self.revoked.get(hash).await.is_some_and(|at| at >= asked)
    }

    fn db_ok(&self) {
        if !self.db_healthy.swap(true, Ordering::Relaxed) {
            info!("database reachable again: key validation restored");
        }
    }

    fn db_failed(&self, e: &LookupError) {
        self.stats.db_errors.fetch_add(1, Ordering::Relaxed);
        if self.db_healthy.swap(false, Ordering::Relaxed) {
            warn!(
                "database unavailable ({e}): only cached and static keys are accepted until it returns"
            );
        }
    }

    /// Creates a key without limits; returns its plaintext (shown once)
    /// and stored row.
    pub async fn create(
        store: &Store,
        name: Option<&str>,
        expires_at: Option<NaiveDateTime>,
    ) -> Result<(String, Secret), StoreError> {
        Self::create_with_limits(store, name, expires_at, Limits::default()).await
    }

    /// Creates a key with rate limits; returns its plaintext (shown once)
    /// and stored row.
    pub async fn create_with_limits(
        store: &Store,
        name: Option<&str>,
        expires_at: Option<NaiveDateTime>,
        limits: Limits,
    ) -> Result<(String, Secret), StoreError> {
        let secret = secret::generate("frpx");
        let new = NewApiKey {
            id: &secret.id,
            prefix: &secret.prefix,
            name,
            expires_at,
            limits,
        };
        store.insert_api_key(&new, &secret.hash_hex).await?;
        Ok((secret.plaintext.clone(), secret))
    }

    /// Changes the limits of keys matching `needle` (key, id or prefix):
    /// those `change` gives, leaving the others as they are (also when
    /// another change of them runs at the same time). Drops the keys'
    /// cached entries from Redis and tells every frps sharing it to forget
    /// them, so the new limits apply at once. Returns the rows with their
    /// new limits and whether the fleet-wide invalidation was published.
    pub async fn set_limits(
        store: &Store,
        redis: Option<&RedisCache>,
        needle: &str,
        change: LimitsChange,
    ) -> Result<(Vec<(ApiKeyRow, Limits)>, bool), StoreError> {
        let rows = store
            .match_api_keys(needle, &secret::hash_hex(needle))
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut published = redis.is_some();
        let column =
            |v: Option<Option<u32>>| v.map(|v| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX)));
        for mut row in rows {
            let Some((rpm, max_concurrency)) = store
                .set_api_key_limits(&row.key, column(change.rpm), column(change.max_concurrency))
                .await?
            else {
                // Deleted meanwhile: nothing to report.
                continue;
            };
            (row.rpm, row.max_concurrency) = (rpm, max_concurrency);
            if let (Some(redis), Some(hash)) = (redis, stored_hash(&row)) {
                published &= redis.revoke(&hash).await;
            }
            let limits = row.limits();
            out.push((row, limits));
        }
        Ok((out, published))
    }

    /// Revokes keys matching `needle` (key, id or prefix) in `store`, drops
    /// them from Redis and tells every frps sharing it. Returns the rows and
    /// whether the fleet-wide invalidation was published.
    pub async fn revoke(
        store: &Store,
        redis: Option<&RedisCache>,
        needle: &str,
    ) -> Result<(Vec<ApiKeyRow>, bool), StoreError> {
        let rows = store
            .revoke_api_keys(needle, &secret::hash_hex(needle))
            .await?;
        let mut published = redis.is_some();
        for row in &rows {
            let hash = stored_hash(row);
            if let (Some(redis), Some(hash)) = (redis, hash) {
                published &= redis.revoke(&hash).await;
            }
        }
        Ok((rows, published))
    }
}

/// Why the database gave no answer about a key.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupError {
    /// The database failed.
    #[error(transparent)]
    Failed(#[from] StoreError),
    /// The database did not answer within [`DB_TIMEOUT`].
    #[error("no answer within {DB_TIMEOUT:?}")]
    TimedOut,
}

/// A valid key's in-process entry lasts [`LOCAL_TTL`] from when the key
/// was asked about (before its row was read), not from when the answer
/// came: without Redis to tell of a revocation, a key revoked just after
/// its row was read is accepted for at most [`LOCAL_TTL`] from then, however
/// long the lookup took (up to [`DB_TIMEOUT`]).
struct FromAsked;

impl moka::Expiry<[u8; 32], (CachedKey, std::time::Instant)> for FromAsked {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &(CachedKey, std::time::Instant),
        created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(LOCAL_TTL.saturating_sub(created_at.saturating_duration_since(value.1)))
    }

    fn expire_after_update(
        &self,
        key: &[u8; 32],
        value: &(CachedKey, std::time::Instant),
        updated_at: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

/// A row that cannot be decoded ([`StoreError::is_unreadable_row`]) as no
/// row, with a warning naming `table`: a key, account or token whose row
/// was edited into a value frps cannot read is refused (not reported as
/// the database down, which would flip frps's health and answer 503 for
/// as long as the row stays so).
pub(crate) fn absent_if_unreadable<T>(
    answer: Result<Option<T>, LookupError>,
    table: &str,
) -> Result<Option<T>, LookupError> {
    match answer {
        Err(LookupError::Failed(e)) if e.is_unreadable_row() => {
            // A line a second at most: a column of a kept seed table that
            // frps cannot read makes every lookup such a one.
            static PACE: common::pace::SharedPace =
                common::pace::SharedPace::new(Duration::from_secs(1));
            if PACE.admit() {
                warn!("a row of {table} cannot be read ({e}): treated as absent until it is fixed");
            } else {
                tracing::debug!("a row of {table} cannot be read ({e})");
            }
            Ok(None)
        }
        other => other,
    }
}

/// `lookup`'s answer if it comes within [`DB_TIMEOUT`]; a later one is
/// dropped unread, so it can never be cached.
pub(crate) async fn within_deadline<T>(
    lookup: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, LookupError> {
    match tokio::time::timeout(DB_TIMEOUT, lookup).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(LookupError::TimedOut),
    }
}

/// The SHA-256 a row's key is cached under.
pub fn stored_hash(row: &ApiKeyRow) -> Option<[u8; 32]> {
    match row.key.strip_prefix(crate::store::HASH_PREFIX) {
        Some(hex) => secret::parse_hex32(hex),
        None => Some(secret::hash(&row.key)),
    }
}

fn verdict(hash: [u8; 32], entry: CachedKey, now: i64) -> KeyCheck {
    if entry.valid_at(now) {
        KeyCheck::Valid(KeyGrant {
            id: hash,
            limits: entry.limits,
        })
    } else {
        KeyCheck::Invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row with `key` and nothing else set.
    fn bare_row(key: &str) -> ApiKeyRow {
        ApiKeyRow {
            key: key.into(),
            ..ApiKeyRow::default()
        }
    }

    #[test]
    fn stored_hashes_round_trip() {
        let h = secret::hash("k");
        let row = bare_row(&format!("sha256:{}", secret::hex(&h)));
        assert_eq!(stored_hash(&row), Some(h));
        let legacy = ApiKeyRow {
            key: "k".into(),
            ..row
        };
        assert_eq!(stored_hash(&legacy), Some(h));
        assert_eq!(secret::parse_hex32("zz"), None);
        assert_eq!(secret::parse_hex32(&"+a".repeat(32)), None);
    }

    #[tokio::test]
    async fn answers_read_before_a_revocation_are_not_remembered() {
        let v = KeyValidator::new(None, None, None);
        let h = secret::hash("k");
        let before = std::time::Instant::now();
        v.forget(Some(h));
        // `forget` records on a task of its own.
        let since = std::time::Instant::now();
        while !v.revoked_since(&h, before).await {
            assert!(since.elapsed() < Duration::from_secs(5));
            tokio::task::yield_now().await;
        }
        let after = std::time::Instant::now();
        assert!(!v.revoked_since(&h, after).await);
        assert!(!v.revoked_since(&secret::hash("other"), before).await);
    }

    #[tokio::test]
    async fn a_valid_key_is_trusted_for_the_local_ttl_from_when_it_was_asked() {
        let v = KeyValidator::new(None, None, None);
        let entry = CachedKey {
            expires_at: None,
            limits: Limits::default(),
        };
        let now = std::time::Instant::now();
        let (fresh, stale) = (secret::hash("fresh"), secret::hash("stale"));
        // Asked just now: cached. Asked a LOCAL_TTL ago (a lookup that
        // took that long): used once, not trusted any longer.
        assert!(v.remember(fresh, entry, now).await);
        let asked_long_ago = now
            .checked_sub(LOCAL_TTL)
            .expect("a monotonic clock this old");
        v.remember(stale, entry, asked_long_ago).await;
        assert!(v.cached(fresh, 0).await.is_some());
        assert!(v.cached(stale, 0).await.is_none());
        // The time left is counted from the asking.
        let asked = now.checked_sub(Duration::from_secs(3)).unwrap();
        let left = moka::Expiry::expire_after_create(&FromAsked, &fresh, &(entry, asked), now);
        assert_eq!(left, Some(LOCAL_TTL - Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_slower_than_the_deadline_is_unavailable_not_late() {
        let row = || bare_row("k");
        // An answer just within the deadline is used.
        let prompt = within_deadline(async {
            tokio::time::sleep(DB_TIMEOUT - Duration::from_millis(1)).await;
            Ok(Some(row()))
        });
        assert!(matches!(prompt.await, Ok(Some(_))));
        // One that would come after the revocation guards expired is given
        // up at the deadline, never read.
        let started = tokio::time::Instant::now();
        let late = within_deadline(async {
            tokio::time::sleep(LOCAL_TTL + Duration::from_secs(1)).await;
            Ok(Some(row()))
        });
        assert!(matches!(late.await, Err(LookupError::TimedOut)));
        assert_eq!(started.elapsed(), DB_TIMEOUT);
        // A failure stays a failure.
        let failed = within_deadline(async {
            Err::<Option<ApiKeyRow>, _>(StoreError::Database(sqlx::Error::PoolTimedOut))
        });
        assert!(matches!(failed.await, Err(LookupError::Failed(_))));
        assert!(
            LookupError::TimedOut
                .to_string()
                .contains("no answer within 5s"),
            "{}",
            LookupError::TimedOut
        );
    }

    #[tokio::test]
    async fn without_a_store_only_the_static_key_passes() {
        let v = KeyValidator::new(Some("s".into()), None, None);
        assert!(matches!(v.check("s").await, KeyCheck::Valid(g) if g.limits.is_unlimited()));
        assert_eq!(v.check("abc123").await, KeyCheck::Invalid);
        // Nor a key the static one starts with, or one it starts with.
        let long = KeyValidator::new(Some("static-key".into()), None, None);
        for near in ["static-ke", "static-key!", "static-kez", ""] {
            assert_eq!(long.check(near).await, KeyCheck::Invalid, "{near}");
        }
        let none = KeyValidator::new(None, None, None);
        assert!(!none.has_keys());
        assert_eq!(none.check("").await, KeyCheck::Invalid);
        // An empty static key is none at all.
        let empty = KeyValidator::new(Some(String::new()), None, None);
        assert!(!empty.has_keys());
        assert_eq!(empty.check("").await, KeyCheck::Invalid);
    }

    /// The static key may come from an inherited `API_KEY`: frps says it
    /// accepts one.
    #[test]
    fn a_static_key_is_announced() {
        let logged = |key: Option<&str>| {
            common::testing::logged(|| KeyValidator::new(key.map(str::to_owned), None, None)).1
        };
        let said = logged(Some("from-the-environment"));
        assert!(
            said.contains("WARN") && said.contains("a static API key is set"),
            "{said}"
        );
        assert!(
            !said.contains("from-the-environment"),
            "the key itself is not logged"
        );
        assert_eq!(logged(None), "");
        assert_eq!(logged(Some("")), "");
        assert!(said.contains("shorter than 32 characters"), "{said}");
        let strong = logged(Some(&"k".repeat(super::super::STRONG_SECRET)));
        assert!(strong.contains("a static API key is set"), "{strong}");
        assert!(!strong.contains("shorter than"), "{strong}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_static_key_is_refused_to_an_address_out_of_budget() {
        let spent: IpAddr = [192, 0, 2, 7].into();
        let other: IpAddr = [198, 51, 100, 7].into();
        let strong = "k".repeat(super::super::STRONG_SECRET);
        for (key, short) in [("short-static-key", true), (strong.as_str(), false)] {
            let mut v = KeyValidator::new(Some(key.to_owned()), None, None);
            v.set_failure_budget(2);
            let budget = v.failures.as_ref().expect("set");
            let now = tokio::time::Instant::now();
            budget.fail(spent, now);
            budget.fail(spent, now);
            let answer = v.check_from(key, Some(spent)).await;
            if short {
                // A guess that happens to be right tells nothing either.
                assert!(matches!(answer, KeyCheck::Throttled(_)), "{answer:?}");
                assert!(matches!(
                    v.check_from("a-guess", Some(spent)).await,
                    KeyCheck::Throttled(_)
                ));
                assert_eq!(v.stats.throttled.load(Ordering::Relaxed), 2);
                assert_eq!(v.stats.static_hits.load(Ordering::Relaxed), 0);
            } else {
                assert!(matches!(answer, KeyCheck::Valid(_)), "{answer:?}");
            }
            // Other addresses are served; so is the address once refilled
            // (two a minute: one every 30 s).
            assert!(matches!(
                v.check_from(key, Some(other)).await,
                KeyCheck::Valid(_)
            ));
            tokio::time::advance(Duration::from_secs(30)).await;
            assert!(matches!(
                v.check_from(key, Some(spent)).await,
                KeyCheck::Valid(_)
            ));
        }
    }
}
