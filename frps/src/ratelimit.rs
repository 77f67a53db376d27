//! Per-API-key rate limits on the public port: requests per window
//! (`rpm`, the window being a minute unless `--rate-limit-window` says
//! otherwise) and requests in flight at once (`max_concurrency`).
//!
//! Requests per minute use a sliding window log: the times of the requests
//! admitted in the last window are kept, and a request is admitted only when
//! fewer than `rpm` remain. Any window of that length, wherever it starts,
//! holds at most `rpm` admitted requests (no 2x burst at a boundary), and
//! `Retry-After` is exact: when the entry that has to leave the window
//! leaves it. Refused requests are not counted.
//!
//! With Redis, both counters live there and every frps sharing it shares one
//! budget per key: one Lua script checks and takes both atomically (a
//! sorted set of request times per key, a sorted set of leases per key
//! scored by their expiry), one `ZREM` releases a lease. Leases expire after
//! [`LEASE_TTL`] unless refreshed, which this frps does every
//! [`LEASE_REFRESH`] for its own live ones (putting back any Redis lost), so
//! a crashed frps leaks no slot for longer than that. Time is Redis's clock, so frps clocks may differ.
//! When Redis fails, counting falls back to this process (logged once) and
//! Redis is tried again after [`REDIS_BACKOFF`]; no request fails because
//! Redis is down.
//!
//! A key without limits costs one branch: no lock, no Redis, no allocation.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::keys::KeyGrant;
use crate::auth::redis::RedisCache;
use crate::auth::secret;
use crate::listeners::public::{PublicBody, error_response};
use crate::state::{State, Stats};

/// Largest `rpm` a key may have (each admitted request is remembered for a
/// window, so this bounds the memory one key can take).
pub const MAX_RPM: u32 = 100_000;
/// Largest `max_concurrency` a key may have.
pub const MAX_CONCURRENCY: u32 = 100_000;
/// How long a concurrency lease in Redis lives without a refresh.
pub const LEASE_TTL: Duration = Duration::from_secs(60);
/// How often this frps refreshes its live leases in Redis.
pub const LEASE_REFRESH: Duration = Duration::from_secs(20);
/// How long counting stays in-process after a Redis failure.
pub const REDIS_BACKOFF: Duration = Duration::from_secs(1);

/// A key's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests admitted per window (a minute by default).
    pub rpm: Option<u32>,
    /// Requests in flight at once.
    pub max_concurrency: Option<u32>,
}

impl Limits {
    /// Whether neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.rpm.is_none() && self.max_concurrency.is_none()
    }
}

/// New values for some of a key's limits: `None` leaves a limit as it is,
/// `Some(None)` lifts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsChange {
    /// New requests per window.
    pub rpm: Option<Option<u32>>,
    /// New requests in flight at once.
    pub max_concurrency: Option<Option<u32>>,
}

impl From<Limits> for LimitsChange {
    /// Both limits set to `limits`.
    fn from(limits: Limits) -> Self {
        LimitsChange {
            rpm: Some(limits.rpm),
            max_concurrency: Some(limits.max_concurrency),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// The key used its requests for the window; one is admitted again
    /// after `retry_after`.
    Rpm {
        /// Until the oldest counted request leaves the window.
        retry_after: Duration,
    },
    /// The key has `max_concurrency` requests in flight.
    Concurrency,
}

impl Limited {
    /// `Retry-After` in whole seconds (at least 1, rounded up).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Limited::Rpm { retry_after } => retry_after.as_millis().div_ceil(1000).max(1) as u64,
            Limited::Concurrency => 1,
        }
    }

    /// The error code in the response body.
    pub fn code(&self) -> &'static str {
        match self {
            Limited::Rpm { .. } => "rate_limit_exceeded",
            Limited::Concurrency => "concurrency_limit_exceeded",
        }
    }

    /// The `reason` label of the `frpx_rate_limited_requests` counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Limited::Rpm { .. } => "rpm",
            Limited::Concurrency => "concurrency",
        }
    }
}

/// Counts the refusal and answers it: 429, `Retry-After`, OpenAI-shaped body.
pub fn refuse(state: &State, limited: Limited) -> Response<PublicBody> {
    let message = match limited {
        Limited::Rpm { .. } => {
            Stats::inc(&state.stats.rate_limited_rpm);
            // The limit counts over --rate-limit-window: a minute unless
            // the operator chose another.
            let window = match state.config.rate_limit_window {
                w if w == Duration::from_secs(60) => "per minute".to_owned(),
                w => format!("per {w:?} window"),
            };
            format!(
                "rate limit reached: this API key made its allowed requests {window}; retry after the time in Retry-After"
            )
        }
        Limited::Concurrency => {
            Stats::inc(&state.stats.rate_limited_concurrency);
            "concurrency limit reached: this API key has its allowed number of requests in flight; retry when one finishes".to_owned()
        }
    };
    let mut resp = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        &message,
        "rate_limit_error",
        limited.code(),
    );
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(limited.retry_after_secs()),
    );
    resp
}

/// Clears its flag when dropped: the slots are being put back into Redis
/// by one request only while that request runs.
struct Restoring<'a>(&'a AtomicBool);

impl Drop for Restoring<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Checks and takes both counters of one key in Redis, atomically.
/// KEYS: request-times set, lease set. ARGV: window ms, rpm (0: none),
/// max concurrency (0: none), member (unique per request), lease TTL ms.
/// Returns `{0, 0}` admitted, `{1, ms}` over rpm (free again in ms),
/// `{2, 0}` over concurrency.
const ACQUIRE_LUA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local maxc = tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= maxc then return {2, 0} end
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  local count = redis.call('ZCARD', KEYS[1])
  if count >= rpm then
    local leaving = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
    return {1, math.max(1, tonumber(leaving[2]) + window - now)}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {0, 0}
";

/// Pushes the expiry of live leases out by a TTL, adding back any Redis
/// lost (a restart without persistence, a failover to a replica that had
/// not seen it): a stream still running holds its slot. KEYS: one API
/// key's lease set (a script's keys must share a Redis Cluster slot, which
/// the sets of different API keys do not). ARGV: TTL ms, then its members.
/// A lease released while this ran is removed again by the caller
/// ([`RateLimiter::refresh`]).
const REFRESH_LUA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
return #ARGV - 1
";

/// Most leases one refresh script call carries.
const REFRESH_BATCH: usize = 500;

/// Most refresh script calls under way at once.
const REFRESH_AT_ONCE: usize = 16;

/// `leases` in refresh script calls: one lease set each (a Redis Cluster
/// refuses a script whose keys lie in different slots), at most
/// [`REFRESH_BATCH`] leases each.
fn refresh_batches(leases: &[LiveLease]) -> Vec<(&str, Vec<&LiveLease>)> {
    let mut by_set: std::collections::BTreeMap<&str, Vec<&LiveLease>> = Default::default();
    for live in leases {
        by_set
            .entry(live.lease.key.as_str())
            .or_default()
            .push(live);
    }
    by_set
        .into_iter()
        .flat_map(|(set, lives)| {
            lives
                .chunks(REFRESH_BATCH)
                .map(|batch| (set, batch.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ACQUIRE_LUA));
static REFRESH: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REFRESH_LUA));

/// In-process counters of one key.
#[derive(Debug, Default)]
struct LocalKey {
    /// Admission times within the last window, oldest first.
    admitted: VecDeque<Instant>,
    /// Requests in flight.
    in_flight: u32,
}

impl LocalKey {
    fn forget_before(&mut self, now: Instant, window: Duration) {
        while self
            .admitted
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.admitted.pop_front();
        }
    }
}

/// A lease held in Redis: the set it is in and its member.
#[derive(Debug, Clone)]
struct SharedLease {
    /// The API key's id (its hash).
    id: [u8; 32],
    key: String,
    member: String,
}

/// One of this frps's live leases in Redis, as [`RateLimiter::live_leases`]
/// saw it.
#[derive(Debug, Clone)]
pub struct LiveLease {
    seq: u64,
    lease: SharedLease,
}

/// Enforces per-key limits; one per frps.
pub struct RateLimiter {
    window: Duration,
    redis: Option<Arc<RedisCache>>,
    local: Mutex<HashMap<[u8; 32], LocalKey>>,
    /// This frps's live leases in Redis, by sequence number, for refreshing.
    shared: Mutex<HashMap<u64, SharedLease>>,
    /// Makes lease members unique across frps.
    instance: String,
    seq: AtomicU64,
    /// Until when Redis is skipped after a failure.
    redis_skip_until: Mutex<Option<Instant>>,
    redis_down: AtomicBool,
    /// A request is putting this frps's slots back into Redis after an
    /// outage: the others count here meanwhile rather than each do it.
    restoring: AtomicBool,
    tasks: TaskTracker,
    /// While [`RateLimiter::maintain`] runs.
    maintaining: AtomicBool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("window", &self.window)
            .field("redis", &self.redis.is_some())
            .finish()
    }
}

/// A concurrency slot of one key, released when dropped.
#[derive(Debug)]
pub struct Lease {
    limiter: Arc<RateLimiter>,
    id: [u8; 32],
    shared: Option<u64>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        match self.shared {
            Some(seq) => self.limiter.release_shared(seq),
            None => self.limiter.release_local(&self.id),
        }
    }
}

impl RateLimiter {
    /// A limiter counting over `window`, in Redis when given (release tasks
    /// are tracked by `tasks`).
    pub fn new(
        window: Duration,
        redis: Option<Arc<RedisCache>>,
        tasks: TaskTracker,
    ) -> Arc<RateLimiter> {
        Arc::new(RateLimiter {
            window: window.max(Duration::from_millis(1)),
            redis,
            local: Mutex::default(),
            shared: Mutex::default(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            seq: AtomicU64::new(0),
            redis_skip_until: Mutex::new(None),
            redis_down: AtomicBool::new(false),
            restoring: AtomicBool::new(false),
            tasks,
            maintaining: AtomicBool::new(false),
        })
    }

    /// Admits a request of `grant` or says why not. A lease is returned when
    /// the key has a concurrency limit; hold it until the response ends.
    pub async fn admit(self: &Arc<Self>, grant: &KeyGrant) -> Result<Option<Lease>, Limited> {
        if grant.limits.is_unlimited() {
            return Ok(None);
        }
        if let Some(redis) = self.redis_to_use()
            && let Some(outcome) = self.admit_shared(&redis, grant).await
        {
            return outcome;
        }
        self.admit_local(grant, Instant::now())
    }

    fn redis_to_use(&self) -> Option<Arc<RedisCache>> {
        let redis = self.redis.as_ref()?;
        let skip = self.redis_skip_until.lock().expect("rate limit lock");
        match *skip {
            Some(until) if Instant::now() < until => None,
            _ => Some(redis.clone()),
        }
    }

    fn redis_failed(&self) {
        *self.redis_skip_until.lock().expect("rate limit lock") =
            Some(Instant::now() + REDIS_BACKOFF);
        if !self.redis_down.swap(true, Ordering::Relaxed) {
            warn!(
                "Redis unavailable for rate limits: counting per frps until it returns (each frps allows a key its limit meanwhile, counting only its own requests)"
            );
        }
    }

    fn redis_ok(&self) {
        if self.redis_down.swap(false, Ordering::Relaxed) {
            info!("rate limits shared through Redis again");
        }
    }

    /// `None` when Redis could not answer.
    async fn admit_shared(
        self: &Arc<Self>,
        redis: &RedisCache,
        grant: &KeyGrant,
    ) -> Option<Result<Option<Lease>, Limited>> {
        // Back after an outage: this frps's slots go into Redis first (it
        // may have come back without them, restarted without persistence),
        // so what it grants from now on counts them.
        // One request at a time does it (they would each send every
        // lease); Redis is taken for back only once the acquire below is
        // answered (with no lease to put back, nothing was asked of it).
        if self.redis_down.load(Ordering::Relaxed) {
            if self.restoring.swap(true, Ordering::AcqRel) {
                return None;
            }
            // Given back however this ends (the caller gone included).
            let _restoring = Restoring(&self.restoring);
            if !self.refresh(&self.live_leases()).await {
                self.redis_failed();
                return None;
            }
        }
        let hex = secret::hex(&grant.id);
        let times = redis.key(&format!("ratelimit:{{{hex}}}:rpm"));
        let leases = redis.key(&format!("ratelimit:{{{hex}}}:concurrency"));
        // Slots this frps gave while Redis was down, still held: Redis
        // does not know them, so they come off what it may grant.
        let max_concurrency = match grant.limits.max_concurrency {
            Some(max) => {
                let local = self.local_in_flight(&grant.id);
                if local >= max {
                    return Some(Err(Limited::Concurrency));
                }
                max - local
            }
            None => 0,
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let member = format!("{}:{seq}", self.instance);
        let mut call = ACQUIRE.prepare_invoke();
        call.key(&times)
            .key(&leases)
            .arg(self.window.as_millis() as u64)
            .arg(grant.limits.rpm.unwrap_or(0))
            .arg(max_concurrency)
            .arg(&member)
            .arg(LEASE_TTL.as_millis() as u64);
        // Until the script's answer is read, its lease (if it ran) is taken
        // back should this end otherwise: the answer lost (a timeout), or
        // the caller gone while it was on its way (this future dropped).
        // Either way the lease would hold a slot until it expired. A no-op
        // if the script never ran; when Redis is down the lease expires.
        let mut unclaimed = UnclaimedLease {
            limiter: self,
            lease: grant
                .limits
                .max_concurrency
                .is_some()
                .then_some(SharedLease {
                    id: grant.id,
                    key: leases,
                    member,
                }),
        };
        let Some((verdict, ms)) = redis.invoke::<(i64, i64)>(&call).await else {
            self.redis_failed();
            return None;
        };
        self.redis_ok();
        // Answered: a lease exists only if the script granted it (and one
        // was asked for: the key has a concurrency limit).
        Some(match (verdict, unclaimed.lease.take()) {
            (0, Some(lease)) => {
                self.shared
                    .lock()
                    .expect("rate limit lock")
                    .insert(seq, lease);
                Ok(Some(Lease {
                    limiter: self.clone(),
                    id: grant.id,
                    shared: Some(seq),
                }))
            }
            (0, None) => Ok(None),
            (1, _) => Err(Limited::Rpm {
                retry_after: Duration::from_millis(ms.max(1) as u64),
            }),
            _ => Err(Limited::Concurrency),
        })
    }

    /// Removes `lease` from Redis in the background (when Redis is down,
    /// it expires within LEASE_TTL).
    fn take_back(&self, lease: SharedLease) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        // Dropped with the runtime (at shutdown) there is none to run on;
        // the lease then expires.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.tasks.spawn_on(
            async move { redis.zrem(&lease.key, &lease.member).await },
            &runtime,
        );
    }

    fn admit_local(
        self: &Arc<Self>,
        grant: &KeyGrant,
        now: Instant,
    ) -> Result<Option<Lease>, Limited> {
        // Slots this frps holds in Redis for the key (taken before Redis
        // went away, still in use) count too.
        let in_redis = match grant.limits.max_concurrency {
            Some(_) => self
                .shared
                .lock()
                .expect("rate limit lock")
                .values()
                .filter(|lease| lease.id == grant.id)
                .count(),
            None => 0,
        };
        let mut keys = self.local.lock().expect("rate limit lock");
        let key = keys.entry(grant.id).or_default();
        if let Some(max) = grant.limits.max_concurrency
            && key.in_flight + in_redis as u32 >= max
        {
            return Err(Limited::Concurrency);
        }
        if let Some(rpm) = grant.limits.rpm {
            key.forget_before(now, self.window);
            let count = key.admitted.len();
            let rpm = rpm as usize;
            if count >= rpm {
                // Under `rpm` again once this one leaves the window.
                let leaving = key.admitted[count - rpm];
                return Err(Limited::Rpm {
                    retry_after: (leaving + self.window).saturating_duration_since(now),
                });
            }
            key.admitted.push_back(now);
        }
        if grant.limits.max_concurrency.is_none() {
            return Ok(None);
        }
        key.in_flight += 1;
        Ok(Some(Lease {
            limiter: self.clone(),
            id: grant.id,
            shared: None,
        }))
    }

    fn release_local(&self, id: &[u8; 32]) {
        let mut keys = self.local.lock().expect("rate limit lock");
        if let Some(key) = keys.get_mut(id) {
            key.in_flight = key.in_flight.saturating_sub(1);
            if key.in_flight == 0 && key.admitted.is_empty() {
                keys.remove(id);
            }
        }
    }

    fn release_shared(&self, seq: u64) {
        let lease = self.shared.lock().expect("rate limit lock").remove(&seq);
        if let Some(lease) = lease {
            self.take_back(lease);
        }
    }

    /// Requests in flight counted in-process for the key `id` (while Redis
    /// was down; they come off what Redis may grant once it is back).
    pub fn local_in_flight(&self, id: &[u8; 32]) -> u32 {
        self.local
            .lock()
            .expect("rate limit lock")
            .get(id)
            .map_or(0, |k| k.in_flight)
    }

    /// Whether limits are counted in Redis (configured, and not down at
    /// the last try).
    pub fn counts_in_redis(&self) -> bool {
        self.redis.is_some() && !self.redis_down.load(Ordering::Relaxed)
    }

    /// Whether the leases are being refreshed ([`RateLimiter::maintain`]).
    pub fn is_maintaining(&self) -> bool {
        self.maintaining.load(Ordering::Relaxed)
    }

    /// Leases this frps holds in Redis.
    pub fn shared_leases(&self) -> usize {
        self.shared.lock().expect("rate limit lock").len()
    }

    /// Refreshes this frps's leases in Redis and drops idle in-process
    /// counters every [`LEASE_REFRESH`], until `stop`: frps's hard stop,
    /// not the start of shutdown, since the requests still draining hold
    /// their leases (a lease not refreshed ends in Redis after
    /// [`LEASE_TTL`], and another frps would admit past the limit).
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        self.maintaining.store(true, Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    self.maintaining.store(false, Ordering::Relaxed);
                    return;
                }
                _ = tokio::time::sleep(LEASE_REFRESH) => {}
            }
            self.sweep_local(Instant::now());
            self.refresh_shared().await;
        }
    }

    fn sweep_local(&self, now: Instant) {
        let window = self.window;
        self.local
            .lock()
            .expect("rate limit lock")
            .retain(|_, key| {
                key.forget_before(now, window);
                key.in_flight > 0 || !key.admitted.is_empty()
            });
    }

    async fn refresh_shared(&self) {
        if self.redis.is_some() {
            self.refresh(&self.live_leases()).await;
        }
    }

    /// This frps's leases in Redis now (what a refresh covers).
    pub fn live_leases(&self) -> Vec<LiveLease> {
        self.shared
            .lock()
            .expect("rate limit lock")
            .iter()
            .map(|(&seq, lease)| LiveLease {
                seq,
                lease: lease.clone(),
            })
            .collect()
    }

    /// Renews one lease set's `batch` (see [`RateLimiter::refresh`]);
    /// false when Redis did not answer.
    async fn refresh_set(&self, redis: &RedisCache, set: &str, batch: &[&LiveLease]) -> bool {
        let mut call = REFRESH.prepare_invoke();
        call.key(set).arg(LEASE_TTL.as_millis() as u64);
        for live in batch {
            call.arg(&live.lease.member);
        }
        let refreshed = redis.invoke::<i64>(&call).await.is_some();
        let released: Vec<&SharedLease> = {
            let shared = self.shared.lock().expect("rate limit lock");
            batch
                .iter()
                .filter(|live| !shared.contains_key(&live.seq))
                .map(|live| &live.lease)
                .collect()
        };
        if !refreshed {
            // The script may have run with its answer lost (a timeout):
            // what it put back of the released leases is taken back
            // too, in the background, as a release does.
            for lease in released {
                self.take_back(lease.clone());
            }
            return false;
        }
        for lease in released {
            // When Redis fails here the lease expires within LEASE_TTL.
            redis.zrem(&lease.key, &lease.member).await;
        }
        true
    }

    /// Pushes the expiry of `leases` out by [`LEASE_TTL`] (adding back those
    /// Redis lost), as the maintenance loop does every [`LEASE_REFRESH`].
    /// A lease released since `leases` was taken is removed again
    /// afterwards: its own `ZREM` may have run before this put it back.
    pub async fn refresh(&self, leases: &[LiveLease]) -> bool {
        let Some(redis) = &self.redis else {
            return false;
        };
        // Bounded script calls, each on one lease set, REFRESH_AT_ONCE
        // under way at a time (one round trip per API key, in turn, took a
        // whole LEASE_REFRESH for thousands of keys on a distant Redis).
        let batches = refresh_batches(leases);
        let mut refreshed = true;
        for group in batches.chunks(REFRESH_AT_ONCE) {
            let mut calls = Vec::with_capacity(group.len());
            for (set, batch) in group {
                calls.push(self.refresh_set(redis, set, batch));
            }
            for ok in futures_util::future::join_all(calls).await {
                refreshed &= ok;
            }
        }
        if !refreshed {
            self.redis_failed();
        }
        refreshed
    }
}

/// A lease the acquire script may have added to Redis and nobody holds
/// yet: taken back when dropped, unless claimed.
struct UnclaimedLease<'a> {
    limiter: &'a RateLimiter,
    lease: Option<SharedLease>,
}

impl Drop for UnclaimedLease<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.limiter.take_back(lease);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(rpm: Option<u32>, max_concurrency: Option<u32>) -> KeyGrant {
        KeyGrant {
            id: secret::hash("k"),
            limits: Limits {
                rpm,
                max_concurrency,
            },
        }
    }

    fn limiter(window: Duration) -> Arc<RateLimiter> {
        RateLimiter::new(window, None, TaskTracker::new())
    }

    /// Each refresh script call renews one API key's lease set (a Redis
    /// Cluster refuses a script whose keys lie in different slots), in
    /// bounded batches.
    #[test]
    fn refresh_calls_each_renew_one_lease_set() {
        let live = |seq: u64, set: &str| LiveLease {
            seq,
            lease: SharedLease {
                id: [0; 32],
                key: set.to_owned(),
                member: format!("m{seq}"),
            },
        };
        let mut leases: Vec<LiveLease> = (0..REFRESH_BATCH as u64 + 3)
            .map(|i| live(i, "ratelimit:{a}:concurrency"))
            .collect();
        leases.insert(1, live(9_000, "ratelimit:{b}:concurrency"));
        let batches = refresh_batches(&leases);
        let shape: Vec<(&str, usize)> = batches.iter().map(|(set, b)| (*set, b.len())).collect();
        assert_eq!(
            shape,
            [
                ("ratelimit:{a}:concurrency", REFRESH_BATCH),
                ("ratelimit:{a}:concurrency", 3),
                ("ratelimit:{b}:concurrency", 1),
            ]
        );
        for (set, batch) in &batches {
            assert!(batch.iter().all(|l| l.lease.key == *set));
        }
        assert_eq!(
            batches.iter().map(|(_, b)| b.len()).sum::<usize>(),
            leases.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rpm_is_a_sliding_window_with_an_exact_retry_after() {
        let l = limiter(Duration::from_secs(60));
        let g = grant(Some(3), None);
        assert!(l.admit(&g).await.unwrap().is_none());
        tokio::time::advance(Duration::from_secs(20)).await;
        l.admit(&g).await.unwrap();
        tokio::time::advance(Duration::from_secs(20)).await;
        l.admit(&g).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        // At 50 s: the first request leaves the window at 60 s.
        assert_eq!(
            l.admit(&g).await.unwrap_err(),
            Limited::Rpm {
                retry_after: Duration::from_secs(10)
            }
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        l.admit(&g).await.unwrap();
        // At 60 s the requests of 20 s, 40 s and 60 s are in the window.
        assert_eq!(
            l.admit(&g).await.unwrap_err(),
            Limited::Rpm {
                retry_after: Duration::from_secs(20)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_double_burst_across_a_minute_boundary() {
        let l = limiter(Duration::from_secs(60));
        let g = grant(Some(10), None);
        tokio::time::advance(Duration::from_secs(59)).await;
        for _ in 0..10 {
            l.admit(&g).await.unwrap();
        }
        // A fixed window would start afresh at 60 s; a sliding one does not.
        tokio::time::advance(Duration::from_secs(2)).await;
        let refused = l.admit(&g).await.unwrap_err();
        assert_eq!(refused.retry_after_secs(), 58);
        tokio::time::advance(Duration::from_secs(58)).await;
        for _ in 0..10 {
            l.admit(&g).await.unwrap();
        }
        assert!(l.admit(&g).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn refused_requests_are_not_counted() {
        let l = limiter(Duration::from_secs(1));
        let g = grant(Some(1), None);
        l.admit(&g).await.unwrap();
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(5)).await;
            assert!(l.admit(&g).await.is_err());
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        l.admit(&g).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lowered_limit_waits_for_enough_requests_to_leave() {
        let l = limiter(Duration::from_secs(60));
        for _ in 0..5 {
            l.admit(&grant(Some(5), None)).await.unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // Times 0..4 s are counted; now 5 s. With rpm 2, at most one may
        // remain, so four must leave: the fourth (3 s) leaves at 63 s.
        let refused = l.admit(&grant(Some(2), None)).await.unwrap_err();
        assert_eq!(
            refused,
            Limited::Rpm {
                retry_after: Duration::from_secs(58)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_held_by_leases_until_they_drop() {
        let l = limiter(Duration::from_secs(60));
        let g = grant(None, Some(2));
        let a = l.admit(&g).await.unwrap().expect("lease");
        let b = l.admit(&g).await.unwrap().expect("lease");
        assert_eq!(l.admit(&g).await.unwrap_err(), Limited::Concurrency);
        assert_eq!(Limited::Concurrency.retry_after_secs(), 1);
        assert_eq!(l.local_in_flight(&g.id), 2);
        drop(a);
        let c = l.admit(&g).await.unwrap().expect("lease");
        drop((b, c));
        assert_eq!(l.local_in_flight(&g.id), 0);
        assert!(l.local.lock().unwrap().is_empty(), "idle keys are dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_concurrency_refusal_takes_no_request_of_the_window() {
        let l = limiter(Duration::from_secs(60));
        let g = grant(Some(2), Some(1));
        let held = l.admit(&g).await.unwrap().expect("lease");
        assert_eq!(l.admit(&g).await.unwrap_err(), Limited::Concurrency);
        drop(held);
        l.admit(&g).await.unwrap();
        assert!(matches!(l.admit(&g).await, Err(Limited::Rpm { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_keys_leave_no_trace() {
        let l = limiter(Duration::from_secs(60));
        let g = grant(None, None);
        for _ in 0..1000 {
            assert!(l.admit(&g).await.unwrap().is_none());
        }
        assert!(l.local.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn sweeping_drops_keys_whose_window_emptied() {
        let l = limiter(Duration::from_secs(1));
        l.admit(&grant(Some(5), None)).await.unwrap();
        l.sweep_local(Instant::now());
        assert_eq!(l.local.lock().unwrap().len(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        l.sweep_local(Instant::now());
        assert!(l.local.lock().unwrap().is_empty());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let rpm = |ms| Limited::Rpm {
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(rpm(1).retry_after_secs(), 1);
        assert_eq!(rpm(1000).retry_after_secs(), 1);
        assert_eq!(rpm(1001).retry_after_secs(), 2);
        assert_eq!(rpm(59_500).retry_after_secs(), 60);
    }
}
