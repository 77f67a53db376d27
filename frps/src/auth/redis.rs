//! The shared Redis layer of key validation: entries keyed by the key's
//! SHA-256 (never the key), a 5-minute TTL, and a pub/sub channel carrying
//! revocations to every frps. Redis is optional: when it is unreachable,
//! frps serves from its in-process cache and the database, reconnects in
//! the background, and says so once rather than per request.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::secret::hex;

/// How long a validated key stays in Redis (the seed's 5 minutes).
pub const REDIS_TTL: Duration = Duration::from_secs(300);

/// Deadline for one Redis operation on the request path.
const OP_TIMEOUT: Duration = Duration::from_millis(250);

/// Delay between reconnection attempts.
const RETRY: Duration = Duration::from_secs(1);

/// Operations in a row that got no answer in time after which the
/// connection is replaced. A connection whose path died without a reset (a
/// NAT or firewall forgetting the flow, a host gone from the network) gets
/// no error for as long as the kernel keeps retransmitting (about 15
/// minutes): the manager only reconnects on an error, so every operation
/// would wait out [`OP_TIMEOUT`] until then.
const STALLS_BEFORE_RECONNECT: u32 = 3;

/// How the revocation subscription checks that its connection still
/// carries messages. A subscription only reads: when the path to Redis dies
/// without a reset (a NAT or firewall forgetting an idle flow, a host gone
/// from the network), nothing fails on frps's side and revocations stop
/// arriving unnoticed. So it pings Redis every `every` and, when the answer
/// (or the connection and `SUBSCRIBE` of a new subscription) takes longer
/// than `within`, drops the connection and subscribes again; every key
/// cached in-process is forgotten then, since revocations sent in between
/// were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between two pings of an open subscription.
    pub every: Duration,
    /// Longest wait for a ping's answer, or for a new subscription.
    pub within: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            every: Duration::from_secs(15),
            within: Duration::from_secs(5),
        }
    }
}

/// How long a revocation keeps a key's entry from being cached again: an
/// frps that read the key's row just before it was revoked must not put it
/// back into Redis (for [`REDIS_TTL`]) after the revocation deleted it.
/// frps gives up a key's database lookup after [`super::keys::DB_TIMEOUT`],
/// but a write it already handed to its Redis connection is still sent (a
/// path to Redis retransmitting may deliver it many seconds late), so the
/// tombstone outlasts every entry sealed before the revocation could be
/// accepted: [`REDIS_TTL`] past its seal, with the clock skew of the frps
/// that sealed it and of the one reading it, and the lookup's time.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(600);
const _: () = assert!(
    TOMBSTONE_TTL.as_secs()
        >= REDIS_TTL.as_secs() + 2 * CLOCK_SKEW as u64 + super::keys::DB_TIMEOUT.as_secs(),
    "a tombstone outlasts every entry sealed before it"
);

/// Caches an entry unless its key was revoked within [`TOMBSTONE_TTL`].
/// KEYS: entry, tombstone. ARGV: value, ttl seconds.
const SET_LUA: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
";

/// Deletes an entry and leaves a tombstone. KEYS: entry, tombstone.
/// ARGV: tombstone ttl seconds.
const REVOKE_LUA: &str = r"
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return 1
";

static SET: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SET_LUA));
static REVOKE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REVOKE_LUA));

/// What is cached about a valid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedKey {
    /// Expiry as a Unix timestamp (seconds), if the key expires.
    pub expires_at: Option<i64>,
    /// The key's rate limits. Required when reading: an entry written by an
    /// frps that predates limits does not parse, so it is looked up again.
    pub limits: crate::ratelimit::Limits,
}

impl CachedKey {
    /// Whether the key is still valid at `now` (Unix seconds).
    pub fn valid_at(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|exp| exp > now)
    }
}

/// Authenticates the key entries frps writes to Redis with HMAC-SHA256
/// under a secret the frps instances share through their database
/// (`server_secrets`), never through Redis: an entry someone else wrote
/// (a Redis shared with other software, a process listening on Redis's
/// port where none runs) does not pass for a valid key, however it reads.
#[derive(Clone)]
pub struct Seal([u8; 32]);

/// The name of the seal's secret in `server_secrets`.
const SEAL_SECRET: &str = "redis-entry-mac";

/// How sealed entries start: `v2.<hex MAC>.<written at, Unix s>.<JSON>`.
const SEALED: &str = "v2.";

/// How far frps clocks in one fleet may disagree, for the age of a sealed
/// entry.
const CLOCK_SKEW: i64 = 60;

type Mac = hmac::Hmac<sha2::Sha256>;

impl Seal {
    /// The seal every frps on `store`'s database uses (the first to ask
    /// makes it).
    pub async fn load(store: &crate::store::Store) -> Result<Seal, crate::store::StoreError> {
        let fresh = Seal::random();
        let value = store.server_secret(SEAL_SECRET, &hex(&fresh.0)).await?;
        Ok(super::secret::parse_hex32(&value)
            .map(Seal)
            .unwrap_or_else(|| {
                // Not ours (edited by hand): still a secret, used as it is.
                Seal(
                    sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
                        value.as_bytes(),
                    ))
                    .into(),
                )
            }))
    }

    /// A seal of its own, shared with no other frps: entries it writes are
    /// read back only through it (tests, benchmarks).
    pub fn random() -> Seal {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
        Seal(key)
    }

    fn mac(&self, hash: &[u8; 32], at: &str, json: &str) -> Mac {
        use hmac::Mac as _;
        let mut mac = Mac::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(hash);
        mac.update(at.as_bytes());
        mac.update(b".");
        mac.update(json.as_bytes());
        mac
    }

    /// The Redis value for key `hash`'s entry `json`, written at `now`
    /// (Unix seconds).
    fn seal(&self, hash: &[u8; 32], json: &str, now: i64) -> String {
        use hmac::Mac as _;
        let at = now.to_string();
        let tag = self.mac(hash, &at, json).finalize().into_bytes();
        format!("{SEALED}{}.{at}.{json}", hex(&tag))
    }

    /// The JSON of a value sealed for key `hash` no longer than
    /// [`REDIS_TTL`] before `now`; `None` when it is not (another key's
    /// entry, an unsealed, forged or replayed one: an entry saved while its
    /// key was valid and written back after a revocation is refused once it
    /// is older than an entry could live). Compared in constant time.
    fn open<'a>(&self, hash: &[u8; 32], value: &'a str, now: i64) -> Option<(&'a str, i64)> {
        use hmac::Mac as _;
        let rest = value.strip_prefix(SEALED)?;
        let (tag_hex, rest) = rest.split_once('.')?;
        let (at, json) = rest.split_once('.')?;
        let tag = super::secret::parse_hex32(tag_hex)?;
        self.mac(hash, at, json).verify_slice(&tag).ok()?;
        let written: i64 = at.parse().ok()?;
        let oldest = now - REDIS_TTL.as_secs() as i64 - CLOCK_SKEW;
        (oldest..=now + CLOCK_SKEW)
            .contains(&written)
            .then_some((json, written))
    }
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal(..)")
    }
}

/// Called with the hash of each key revoked anywhere in the fleet; `None`
/// means "anything may have changed" (after a reconnect).
pub type OnRevoke = Arc<dyn Fn(Option<[u8; 32]>) + Send + Sync>;

/// A Redis connection that may be absent.
pub struct RedisCache {
    conn: Arc<RwLock<Option<ConnectionManager>>>,
    /// What new connections are made from.
    client: redis::Client,
    /// Operations in a row that got no answer in time.
    stalls: Arc<AtomicU32>,
    /// A new connection is being made to replace a stalled one.
    replacing: Arc<AtomicBool>,
    prefix: String,
    healthy: AtomicBool,
    seal: Seal,
    /// Whether an entry that failed its seal was reported (once per
    /// process; later ones are logged at debug level).
    forgery_reported: AtomicBool,
    /// Entries sealed before this time (Unix seconds) are not taken on
    /// Redis's word ([`Cached::trusted`]): a revocation this frps did not
    /// hear of while it had no subscription may be one Redis lost too.
    distrust_before: AtomicI64,
    /// Subscriptions to revocations made so far.
    subscriptions: AtomicU64,
    /// Bumped each time commands start failing: the subscription is made
    /// again (with [`Self::distrust_before`] moved on), since what failed
    /// may be Redis itself, restarted or failed over to a replica, while
    /// the subscription's connection has not noticed yet (it learns of a
    /// dead peer only from its pings, up to 20 s later).
    broken: tokio::sync::watch::Sender<u64>,
}

/// A key's entry as Redis holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cached {
    pub entry: CachedKey,
    /// Sealed while this frps was subscribed to revocations. An entry
    /// sealed before its subscription last began may be one Redis brought
    /// back after losing the revocation that deleted it (restarted from
    /// a snapshot older than the revocation, or a replica promoted before
    /// it received it): the database is asked first, and the entry used
    /// only when the database cannot answer.
    pub trusted: bool,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix)
            .field("healthy", &self.healthy.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisCache {
    /// Starts connecting to `url` in the background (and subscribing to
    /// revocations, calling `on_revoke`, the subscription checked as
    /// `keepalive` says) until `shutdown`. Returns at once.
    pub fn start(
        url: &str,
        prefix: &str,
        seal: Seal,
        on_revoke: OnRevoke,
        keepalive: Keepalive,
        shutdown: CancellationToken,
    ) -> Result<Arc<RedisCache>, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let cache = Arc::new(RedisCache {
            conn: Arc::new(RwLock::new(None)),
            client: client.clone(),
            stalls: Arc::new(AtomicU32::new(0)),
            replacing: Arc::new(AtomicBool::new(false)),
            prefix: prefix.to_owned(),
            healthy: AtomicBool::new(true),
            seal,
            forgery_reported: AtomicBool::new(false),
            // Until the first subscription: nothing Redis holds is known
            // to have outlived no revocation.
            distrust_before: AtomicI64::new(i64::MAX),
            subscriptions: AtomicU64::new(0),
            broken: tokio::sync::watch::channel(0).0,
        });
        tokio::spawn(cache.clone().connect_loop(client.clone(), shutdown.clone()));
        tokio::spawn(
            cache
                .clone()
                .subscribe_loop(client, on_revoke, keepalive, shutdown),
        );
        Ok(cache)
    }

    /// Connects once and waits for it (for the admin commands).
    pub async fn connect_now(
        url: &str,
        prefix: &str,
        seal: Seal,
    ) -> Result<RedisCache, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config()).await?;
        Ok(RedisCache {
            conn: Arc::new(RwLock::new(Some(conn))),
            client,
            stalls: Arc::new(AtomicU32::new(0)),
            replacing: Arc::new(AtomicBool::new(false)),
            prefix: prefix.to_owned(),
            healthy: AtomicBool::new(true),
            seal,
            forgery_reported: AtomicBool::new(false),
            // The admin commands read no entries to act on them.
            distrust_before: AtomicI64::new(i64::MIN),
            subscriptions: AtomicU64::new(0),
            broken: tokio::sync::watch::channel(0).0,
        })
    }

    async fn connect_loop(self: Arc<Self>, client: redis::Client, shutdown: CancellationToken) {
        loop {
            let attempt = ConnectionManager::new_with_config(client.clone(), manager_config());
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = attempt => r,
            };
            match result {
                Ok(conn) => {
                    *self.conn.write().expect("redis lock") = Some(conn);
                    self.mark(true, "connected");
                    // The manager reconnects by itself from here on.
                    return;
                }
                Err(e) => self.mark(false, &e.to_string()),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    async fn subscribe_loop(
        self: Arc<Self>,
        client: redis::Client,
        on_revoke: OnRevoke,
        keepalive: Keepalive,
        shutdown: CancellationToken,
    ) {
        let channel = self.channel();
        let mut lost = false;
        let mut broken = self.broken.subscribe();
        loop {
            let ended = tokio::select! {
                _ = shutdown.cancelled() => return,
                ended = subscription(&self, &client, &channel, &on_revoke, keepalive, &mut broken, &mut lost) => ended,
            };
            // Revocations are not heard from now until the next
            // subscription: no entry is taken on Redis's word meanwhile.
            self.distrust_before.store(i64::MAX, Ordering::Relaxed);
            if !lost {
                warn!(
                    "the subscription to key revocations ended ({ended}); subscribing again, and until then revoked keys stay valid for up to {:?} on this frps",
                    super::keys::LOCAL_TTL
                );
            } else {
                tracing::debug!("subscribing to key revocations failed again: {ended}");
            }
            lost = true;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    fn mark(&self, healthy: bool, detail: &str) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was && !healthy {
            // Redis may be coming back as another instance: nothing it
            // holds is taken on its word until the subscription is made
            // again.
            self.distrust_before.store(i64::MAX, Ordering::Relaxed);
            self.broken.send_modify(|n| *n += 1);
        }
        match (was, healthy) {
            (true, false) => warn!(
                "Redis unavailable ({detail}); serving from the in-process cache and the database, reconnecting in the background"
            ),
            (false, true) => info!("Redis {detail}"),
            _ => {}
        }
    }

    /// How many subscriptions to revocations were made so far (each one
    /// after the first replaced a lost one).
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Whether the last operation succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.conn.read().expect("redis lock").is_some()
    }

    fn conn(&self) -> Option<ConnectionManager> {
        self.conn.read().expect("redis lock").clone()
    }

    // The hash in braces: a key's entry and tombstone share a Redis Cluster
    // slot, so one script can touch both.
    fn entry_key(&self, hash: &[u8; 32]) -> String {
        format!("{}key:{{{}}}", self.prefix, hex(hash))
    }

    fn tombstone_key(&self, hash: &[u8; 32]) -> String {
        format!("{}revoked:{{{}}}", self.prefix, hex(hash))
    }

    fn channel(&self) -> String {
        format!("{}revocations", self.prefix)
    }

    async fn run<T>(
        &self,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(OP_TIMEOUT, op).await {
            Ok(Ok(v)) => {
                self.stalls.store(0, Ordering::Relaxed);
                self.mark(true, "reachable again");
                Some(v)
            }
            Ok(Err(e)) => {
                if e.is_timeout() {
                    self.stalled();
                } else {
                    self.stalls.store(0, Ordering::Relaxed);
                }
                self.mark(false, &e.to_string());
                None
            }
            Err(_) => {
                self.stalled();
                self.mark(false, &format!("no answer within {OP_TIMEOUT:?}"));
                None
            }
        }
    }

    /// Counts an operation that got no answer in time; past
    /// [`STALLS_BEFORE_RECONNECT`] in a row, makes a new connection (one at
    /// a time, in the background) to replace the current one.
    fn stalled(&self) {
        if self.stalls.fetch_add(1, Ordering::Relaxed) + 1 < STALLS_BEFORE_RECONNECT
            || self.replacing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.replacing.store(false, Ordering::Release);
            return;
        };
        let (client, conn, stalls, replacing) = (
            self.client.clone(),
            self.conn.clone(),
            self.stalls.clone(),
            self.replacing.clone(),
        );
        runtime.spawn(async move {
            match ConnectionManager::new_with_config(client, manager_config()).await {
                Ok(fresh) => {
                    *conn.write().expect("redis lock") = Some(fresh);
                    stalls.store(0, Ordering::Relaxed);
                    info!(
                        "Redis: replaced a connection that left {STALLS_BEFORE_RECONNECT} operations in a row unanswered"
                    );
                }
                Err(e) => debug!("Redis: no new connection to replace a stalled one: {e}"),
            }
            replacing.store(false, Ordering::Release);
        });
    }

    /// The cached entry for a key hash; `None` when absent or Redis is down.
    pub async fn get(&self, hash: &[u8; 32]) -> Option<Cached> {
        let mut conn = self.conn()?;
        let key = self.entry_key(hash);
        let raw: String = self
            .run(conn.get::<_, Option<String>>(key))
            .await
            .flatten()?;
        let now = chrono::Utc::now().timestamp();
        let Some((json, written)) = self.seal.open(hash, &raw, now) else {
            // An entry from before sealing, or one no frps on this database
            // wrote: a miss, looked up in the database (and sealed then).
            if !self.forgery_reported.swap(true, Ordering::Relaxed) {
                warn!(
                    "a key entry in Redis does not carry this fleet's seal (or is older than any entry could be): ignored and looked up in the database. Expected only while frps from before 2026-12 share this Redis; otherwise, is this Redis shared with other software, or not the one configured?"
                );
            } else {
                tracing::debug!("ignoring a key entry in Redis without this fleet's seal");
            }
            return None;
        };
        let entry = serde_json::from_str(json).ok()?;
        Some(Cached {
            entry,
            trusted: written >= self.distrust_before.load(Ordering::Relaxed),
        })
    }

    /// Caches a valid key for [`REDIS_TTL`] (less if it expires sooner),
    /// unless it was revoked in the last [`TOMBSTONE_TTL`].
    pub async fn set(&self, hash: &[u8; 32], entry: CachedKey, now: i64) {
        let ttl = match entry.expires_at {
            Some(exp) => (exp - now).clamp(1, REDIS_TTL.as_secs() as i64) as u64,
            None => REDIS_TTL.as_secs(),
        };
        let value = self.seal.seal(
            hash,
            &serde_json::to_string(&entry).expect("serializable"),
            now,
        );
        let mut call = SET.prepare_invoke();
        call.key(self.entry_key(hash))
            .key(self.tombstone_key(hash))
            .arg(value)
            .arg(ttl);
        let _: Option<i64> = self.invoke(&call).await;
    }

    /// Deletes a key's entry (leaving a tombstone that keeps it from being
    /// cached again for [`TOMBSTONE_TTL`]) and tells every frps to forget it.
    pub async fn revoke(&self, hash: &[u8; 32]) -> bool {
        let mut call = REVOKE.prepare_invoke();
        call.key(self.entry_key(hash))
            .key(self.tombstone_key(hash))
            .arg(TOMBSTONE_TTL.as_secs());
        let deleted: Option<i64> = self.invoke(&call).await;
        let Some(mut conn) = self.conn() else {
            return false;
        };
        // The entry as frps before 2026-12 named it (`key:<hex>`, no hash
        // tag): gone too, or an older frps in a mixed fleet would read it
        // back after the revocation.
        let legacy = format!("{}key:{}", self.prefix, hex(hash));
        let legacy_deleted: Option<i64> = self.run(conn.del(legacy)).await;
        let published: Option<i64> = self
            .run(conn.publish(self.channel(), hash.as_slice()))
            .await;
        // Heard by nobody (0 subscribers): no frps uses this Redis with
        // this prefix, or none runs; not "published" either way.
        deleted.is_some() && legacy_deleted.is_some() && published.is_some_and(|n| n > 0)
    }

    /// `suffix` under this cache's key prefix.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// Runs a Lua script; `None` when Redis is down or failed.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = self.conn()?;
        self.run(script.invoke_async(&mut conn)).await
    }

    /// Removes `member` from the sorted set `key`; false when Redis failed.
    pub async fn zrem(&self, key: &str, member: &str) -> bool {
        let Some(mut conn) = self.conn() else {
            return false;
        };
        let removed: Option<i64> = self.run(conn.zrem(key, member)).await;
        removed.is_some()
    }

    /// Number of entries under this prefix (for tests and diagnostics).
    pub async fn count_entries(&self) -> Option<usize> {
        let mut conn = self.conn()?;
        let pattern = format!("{}key:*", self.prefix);
        let scan = async {
            let mut cursor = 0u64;
            let mut count = 0usize;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                count += keys.len();
                if next == 0 {
                    return Ok::<_, redis::RedisError>(count);
                }
                cursor = next;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), scan)
            .await
            .ok()?
            .ok()
    }
}

/// One subscription to `channel`, passing revocations to `on_revoke`
/// until it fails or stops answering pings; returns why it ended. `lost`
/// says whether an earlier one ended (logged once it is back).
async fn subscription(
    cache: &RedisCache,
    client: &redis::Client,
    channel: &str,
    on_revoke: &OnRevoke,
    keepalive: Keepalive,
    broken: &mut tokio::sync::watch::Receiver<u64>,
    lost: &mut bool,
) -> String {
    let (distrust_before, subscriptions) = (&cache.distrust_before, &cache.subscriptions);
    // Failures of commands from now on end this subscription.
    broken.borrow_and_update();
    let subscribe = async {
        let (mut sink, messages) = client.get_async_pubsub().await?.split();
        sink.subscribe(channel).await?;
        Ok::<_, redis::RedisError>((sink, messages))
    };
    let (mut sink, mut messages) = match tokio::time::timeout(keepalive.within, subscribe).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return e.to_string(),
        Err(_) => return format!("no subscription within {:?}", keepalive.within),
    };
    // Revocations sent while we were away are lost: forget everything,
    // and take entries sealed before now (by any frps of the fleet, whose
    // clocks may be ahead of this one's) on the database's word: Redis may
    // have lost a revocation as well (the reason the subscription ended
    // may be its restart or failover).
    distrust_before.store(
        chrono::Utc::now().timestamp() + CLOCK_SKEW,
        Ordering::Relaxed,
    );
    on_revoke(None);
    subscriptions.fetch_add(1, Ordering::Relaxed);
    if std::mem::take(lost) {
        info!("subscribed to key revocations again");
    }
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + keepalive.every,
        keepalive.every,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = broken.changed() => {
                return "commands to Redis failed: it may have restarted or failed over".to_owned();
            }
            msg = messages.next() => match msg {
                Some(msg) => match <[u8; 32]>::try_from(msg.get_payload_bytes()) {
                    Ok(hash) => on_revoke(Some(hash)),
                    Err(_) => warn!("ignoring a malformed revocation on {channel}"),
                },
                None => return "the connection closed".to_owned(),
            },
            _ = ping.tick() => {
                // Messages arriving meanwhile wait in the subscription's queue.
                match tokio::time::timeout(keepalive.within, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return e.to_string(),
                    Err(_) => return format!("no answer to a ping within {:?}", keepalive.within),
                }
            }
        }
    }
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(OP_TIMEOUT)
        .set_number_of_retries(1)
        .set_max_delay(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Limits;

    #[test]
    fn cached_entries_carry_limits_and_old_entries_are_misses() {
        let entry = CachedKey {
            expires_at: Some(5),
            limits: Limits {
                rpm: Some(60),
                max_concurrency: None,
            },
        };
        let json = serde_json::to_string(&entry).unwrap();
        assert_eq!(serde_json::from_str::<CachedKey>(&json).unwrap(), entry);
        // Written by an frps without limits: not trusted, looked up again.
        assert!(serde_json::from_str::<CachedKey>(r#"{"expires_at":null}"#).is_err());
    }

    #[test]
    fn only_entries_sealed_for_their_key_by_this_fleet_open() {
        let seal = Seal([7; 32]);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let json = r#"{"expires_at":null,"limits":{"rpm":null,"max_concurrency":null}}"#;
        let now = 1_800_000_000;
        let sealed = seal.seal(&a, json, now);
        assert!(sealed.starts_with("v2."));
        assert_eq!(seal.open(&a, &sealed, now), Some((json, now)));
        // Copied to another key's slot, written by another fleet, edited,
        // unsealed or garbled: not an entry.
        assert_eq!(seal.open(&b, &sealed, now), None);
        assert_eq!(Seal([8; 32]).open(&a, &sealed, now), None);
        let edited = sealed.replace("null}}", "1}}");
        assert_eq!(seal.open(&a, &edited, now), None);
        let redated = sealed.replace(".1800000000.", ".1800000100.");
        assert_eq!(seal.open(&a, &redated, now + 100), None);
        assert_eq!(seal.open(&a, json, now), None);
        assert_eq!(seal.open(&a, "v2.zz.1.{}", now), None);
        assert_eq!(seal.open(&a, "v2.", now), None);
        // Replayed after it could have lived in Redis (a saved copy written
        // back after a revocation), or dated ahead of every clock: refused.
        let ttl = REDIS_TTL.as_secs() as i64;
        assert_eq!(
            seal.open(&a, &sealed, now + ttl + CLOCK_SKEW),
            Some((json, now))
        );
        assert_eq!(seal.open(&a, &sealed, now + ttl + CLOCK_SKEW + 1), None);
        assert_eq!(seal.open(&a, &sealed, now - CLOCK_SKEW), Some((json, now)));
        assert_eq!(seal.open(&a, &sealed, now - CLOCK_SKEW - 1), None);
        let secret = hex(&[0xab; 32]);
        assert_eq!(super::super::secret::parse_hex32(&secret), Some([0xab; 32]));
        assert!(super::super::secret::parse_hex32("abc").is_none());
        assert!(super::super::secret::parse_hex32(&"é".repeat(32)).is_none());
    }
}
