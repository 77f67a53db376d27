//! Per-API-key rate limits: requests per window and concurrent requests,
//! answered 429 with `Retry-After`; shared through Redis by several frps,
//! counted in-process when Redis is away; changed by the admin command.

use std::time::{Duration, Instant};

use clap::Parser;
use frps::admin::{Admin, KeyCommand, LimitArg};
use frps::auth::KeyValidator;
use frps::auth::secret::Secret;
use frps::ratelimit::Limits;
use frpx_tests::http::{self, Reply};
use frpx_tests::services::{self, Cutter};
use frpx_tests::{API_KEY, Fleet, Frps, eventually, eventually_async, frps_config};

/// A config whose rpm window is `window` (instead of a minute).
fn config(window: Duration) -> frps::Config {
    let mut cfg = frps_config();
    cfg.rate_limit_window = window;
    cfg
}

async fn key_with(frps: &Frps, rpm: Option<u32>, max_concurrency: Option<u32>) -> (String, Secret) {
    let limits = Limits {
        rpm,
        max_concurrency,
    };
    KeyValidator::create_with_limits(&frps.state.store, None, None, limits)
        .await
        .expect("key created")
}

async fn get(frps: &Frps, key: &str) -> Reply {
    http::get(frps.public(), "/", Some(key)).await
}

async fn status(frps: &Frps, key: &str) -> u16 {
    get(frps, key).await.status.as_u16()
}

fn retry_after(reply: &Reply) -> u64 {
    reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds")
}

/// Asserts `reply` is the 429 of `code` and returns its `Retry-After`.
fn assert_limited(reply: &Reply, code: &str) -> u64 {
    assert_eq!(reply.status, 429, "{}", reply.body);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], code, "{}", reply.body);
    assert_eq!(error["type"], "rate_limit_error");
    assert!(error["message"].as_str().unwrap().contains("limit"));
    retry_after(reply)
}

async fn metrics(frps: &Frps) -> String {
    http::get(frps.addrs.api, "/metrics", None).await.body
}

async fn api_errors(frps: &Frps) -> serde_json::Value {
    http::get(frps.addrs.api, "/api/stats", None).await.json()["data"]["errors"].clone()
}

#[tokio::test]
async fn over_rpm_is_429_with_retry_after_until_the_window_moves_on() {
    let window = Duration::from_secs(2);
    let fleet = Fleet::start_with(1, config(window)).await;
    let frps = &fleet.frps;
    let (key, _) = key_with(frps, Some(3), None).await;
    let first = Instant::now();
    for _ in 0..3 {
        assert_eq!(status(frps, &key).await, 200);
    }
    let refused = get(frps, &key).await;
    let refused_at = Instant::now();
    let secs = assert_limited(&refused, "rate_limit_exceeded");
    // The first request leaves the 2 s window 2 s after it was made.
    assert!((1..=2).contains(&secs), "Retry-After {secs}");
    // The message names the window the limit counts over.
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("requests per 2s window"), "{message}");
    // Refusals are not counted: asking again does not push the wait out.
    for _ in 0..5 {
        assert_limited(&get(frps, &key).await, "rate_limit_exceeded");
    }
    let text = metrics(frps).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("frpx_rate_limited_requests_total{reason=\"rpm\"} 6")),
        "{text}"
    );
    assert!(
        text.contains("frpx_rate_limited_requests_total{reason=\"concurrency\"} 0"),
        "{text}"
    );
    let errors = api_errors(frps).await;
    assert_eq!(errors["rate_limited_rpm"], 6);
    assert_eq!(errors["rate_limited_concurrency"], 0);
    eventually_async("the key is admitted again", || async {
        status(frps, &key).await == 200
    })
    .await;
    let waited = refused_at.elapsed();
    assert!(
        first.elapsed() >= window - Duration::from_millis(50),
        "admitted again before the first request left the window"
    );
    assert!(
        waited <= Duration::from_secs(secs) + Duration::from_secs(2),
        "admitted {waited:?} after a Retry-After of {secs}s"
    );

    // Keys without limits, and the static key, are not affected.
    let (unlimited, _) = key_with(frps, None, None).await;
    for _ in 0..20 {
        assert_eq!(status(frps, &unlimited).await, 200);
        assert_eq!(status(frps, API_KEY).await, 200);
    }
}

#[tokio::test]
async fn concurrency_is_held_until_the_stream_ends_or_the_caller_leaves() {
    let fleet = Fleet::start(1).await;
    let frps = &fleet.frps;
    let backend = &fleet.backends[0];
    let (key, secret) = key_with(frps, None, Some(1)).await;
    let hash = frps::auth::secret::hash(&key);
    assert!(!secret.id.is_empty());

    // Headers sent, body streaming: the slot is still taken.
    let (conn, resp) = http::start_hold(frps.public(), &key).await;
    let refused = get(frps, &key).await;
    assert_eq!(assert_limited(&refused, "concurrency_limit_exceeded"), 1);
    assert_eq!(frps.state.rate_limits.local_in_flight(&hash), 1);

    // The caller goes away mid-stream: the slot is freed.
    drop(resp);
    drop(conn);
    eventually_async("the slot is freed after the caller left", || async {
        status(frps, &key).await == 200
    })
    .await;
    eventually("the backend saw the cancellation", || {
        backend.cancelled() >= 1
    })
    .await;
    assert_eq!(frps.state.rate_limits.local_in_flight(&hash), 0);

    // A stream that ends normally frees it too, and only then.
    let (_conn, resp) = http::start_hold(frps.public(), &key).await;
    assert_limited(&get(frps, &key).await, "concurrency_limit_exceeded");
    backend.release_holds();
    let body = http::read(resp).await.body;
    assert!(body.ends_with("done\n"), "{body}");
    eventually_async("the slot is freed after the stream ended", || async {
        status(frps, &key).await == 200
    })
    .await;
    let counted = api_errors(frps).await["rate_limited_concurrency"].as_u64();
    assert!(counted >= Some(2), "{counted:?}");

    // Several at once are fine up to the limit.
    let (wide, _) = key_with(frps, None, Some(3)).await;
    let (x, y, z) = tokio::join!(get(frps, &wide), get(frps, &wide), get(frps, &wide));
    assert!([x, y, z].iter().all(|r| r.status == 200));
}

/// Two frps (one client each) sharing one database and `redis` under one
/// fresh prefix, both connected to it; and that prefix.
/// Two frps sharing one database and one Redis prefix; `a_redis` is the
/// address a reaches Redis by, when not `redis` itself.
async fn two_frps_sharing(redis: &str, a_redis: Option<String>) -> (Fleet, Fleet, String) {
    let database = frpx_tests::temp_sqlite_url();
    let prefix = services::redis_prefix();
    let cfg = |redis: &str| {
        let mut cfg = config(Duration::from_secs(30));
        cfg.database_url = database.clone();
        cfg.redis_url = redis.to_owned();
        cfg.redis_prefix = prefix.clone();
        cfg
    };
    let a = Fleet::start_with(1, cfg(a_redis.as_deref().unwrap_or(redis))).await;
    let b = Fleet::start_with(1, cfg(redis)).await;
    for f in [&a, &b] {
        let r = f.frps.state.redis.clone().unwrap();
        eventually("Redis connected", || r.is_healthy()).await;
    }
    (a, b, prefix)
}

#[tokio::test]
async fn two_frps_sharing_redis_share_one_budget() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let (a, b, _) = two_frps_sharing(&redis, None).await;
    let (key, _) = key_with(&a.frps, Some(4), None).await;
    for frps in [&a.frps, &b.frps, &a.frps, &b.frps] {
        assert_eq!(status(frps, &key).await, 200);
    }
    for frps in [&a.frps, &b.frps] {
        let secs = assert_limited(&get(frps, &key).await, "rate_limit_exceeded");
        assert!((1..=30).contains(&secs), "Retry-After {secs}");
    }

    // One concurrency slot for both: held on a, refused on b, freed in Redis.
    let (one, _) = key_with(&a.frps, None, Some(1)).await;
    let (conn, resp) = http::start_hold(a.frps.public(), &one).await;
    assert_eq!(a.frps.state.rate_limits.shared_leases(), 1);
    assert_limited(&get(&b.frps, &one).await, "concurrency_limit_exceeded");
    drop((resp, conn));
    eventually_async("b admits once a's stream is gone", || async {
        status(&b.frps, &one).await == 200
    })
    .await;
    assert_eq!(a.frps.state.rate_limits.shared_leases(), 0);
    a.frps.stop().await;
    b.frps.stop().await;
}

/// A key's concurrency leases in Redis, seen through a connection of the
/// test's own.
struct Leases {
    conn: redis::aio::MultiplexedConnection,
    name: String,
}

impl Leases {
    /// Of `key`, with frps's `prefix`.
    async fn of(redis: &str, prefix: &str, key: &str) -> Leases {
        let conn = redis::Client::open(redis)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let hex = frps::auth::secret::hex(&frps::auth::secret::hash(key));
        Leases {
            conn,
            name: format!("{prefix}ratelimit:{{{hex}}}:concurrency"),
        }
    }

    /// How many there are.
    async fn held(&self) -> i64 {
        redis::cmd("ZCARD")
            .arg(&self.name)
            .query_async(&mut self.conn.clone())
            .await
            .unwrap()
    }

    /// Waits until there are `n`.
    async fn until(&self, what: &str, n: i64) {
        eventually_async(what, || async move { self.held().await == n }).await;
    }
}

#[tokio::test]
async fn a_renewal_puts_back_leases_redis_lost_and_never_released_ones() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let (a, b, prefix) = two_frps_sharing(&redis, None).await;
    let (one, _) = key_with(&a.frps, None, Some(1)).await;
    let leases = Leases::of(&redis, &prefix, &one).await;

    // A stream holds the key's one slot on a; Redis loses it (a restart
    // without persistence): b would admit a second stream.
    let (conn_a, resp) = http::start_hold(a.frps.public(), &one).await;
    assert_eq!(leases.held().await, 1);
    let _: () = redis::cmd("DEL")
        .arg(&leases.name)
        .query_async(&mut leases.conn.clone())
        .await
        .unwrap();
    // a's renewal puts it back: b refuses again.
    let limits = &a.frps.state.rate_limits;
    limits.refresh(&limits.live_leases()).await;
    assert_eq!(leases.held().await, 1);
    assert_limited(&get(&b.frps, &one).await, "concurrency_limit_exceeded");

    // A renewal of leases seen before they were released does not bring
    // them back (the release's ZREM ran first; the renewal removes again
    // what it put back).
    let seen = limits.live_leases();
    assert_eq!(seen.len(), 1);
    drop((resp, conn_a));
    eventually("a released its lease", || limits.shared_leases() == 0).await;
    leases.until("the release reached Redis", 0).await;
    limits.refresh(&seen).await;
    assert_eq!(leases.held().await, 0);
    assert_eq!(status(&b.frps, &one).await, 200);
    a.frps.stop().await;
    b.frps.stop().await;
}

/// Two frps sharing Redis, a reaching it through a forwarder that can hold
/// Redis's answers, and a key with one concurrency slot.
struct Gated {
    gate: Cutter,
    a: Fleet,
    b: Fleet,
    /// The key.
    one: String,
    /// The key's leases.
    leases: Leases,
}

async fn gated(redis: &str) -> Gated {
    let gate = Cutter::start(services::redis_addr(redis)).await;
    let (a, b, prefix) = two_frps_sharing(redis, Some(format!("redis://{}", gate.addr))).await;
    let (one, _) = key_with(&a.frps, None, Some(1)).await;
    let leases = Leases::of(redis, &prefix, &one).await;
    Gated {
        gate,
        a,
        b,
        one,
        leases,
    }
}

#[tokio::test]
async fn a_renewal_whose_answer_is_lost_brings_back_no_released_lease() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let Gated {
        gate,
        a,
        b,
        one,
        leases,
    } = gated(&redis).await;
    let (conn_a, resp) = http::start_hold(a.frps.public(), &one).await;
    assert_eq!(leases.held().await, 1);
    // One renewal with answers flowing: Redis knows the script by its
    // digest from then on (a NOSCRIPT answer held back would stop it).
    let limits = &a.frps.state.rate_limits;
    limits.refresh(&limits.live_leases()).await;
    let seen = limits.live_leases();
    assert_eq!(seen.len(), 1);
    drop((resp, conn_a));
    eventually("a released its lease", || limits.shared_leases() == 0).await;
    leases.until("the release reached Redis", 0).await;
    // The renewal of what was seen before the release runs in Redis (and
    // puts the lease back); its answer never comes.
    gate.hold_answers();
    limits.refresh(&seen).await;
    // The lease goes again at once, not after the lease's minute.
    leases.until("the renewed lease was taken back", 0).await;
    gate.release_answers();
    assert_eq!(status(&b.frps, &one).await, 200, "the slot is free");
    a.frps.stop().await;
    b.frps.stop().await;
}

#[tokio::test]
async fn a_caller_gone_while_its_lease_was_being_taken_holds_no_slot() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let Gated {
        gate,
        a,
        b,
        one,
        leases,
    } = gated(&redis).await;
    let frps::auth::KeyCheck::Valid(grant) = a.frps.state.keys.check(&one).await else {
        panic!("the key is valid");
    };
    // Redis runs the admission script by its digest and, the first time
    // (a fresh Redis), answers NOSCRIPT, upon which the script itself is
    // sent: with answers held, that second send would never happen. So one
    // admission first, its lease seen in Redis and given back.
    let first = a.frps.state.rate_limits.admit(&grant).await;
    assert!(matches!(first, Ok(Some(_))), "admitted with a lease");
    assert_eq!(leases.held().await, 1, "taken in Redis");
    drop(first);
    leases.until("the first lease was given back", 0).await;
    // The script runs and adds the lease; the caller leaves before its
    // answer is read (the request future is dropped).
    gate.hold_answers();
    let limits = a.frps.state.rate_limits.clone();
    let admit = tokio::spawn(async move { limits.admit(&grant).await.is_ok() });
    leases.until("the script added the lease", 1).await;
    // Unless Redis's operation timeout (250 ms) ran out first on a machine
    // this slow, in which case that path must give the lease back too.
    if admit.is_finished() {
        eprintln!("admit gave up waiting for Redis before it was cancelled");
    }
    admit.abort();
    // Taken back at once, not held for the lease's minute.
    gate.release_answers();
    leases.until("the lease was taken back", 0).await;
    assert_eq!(status(&b.frps, &one).await, 200);
    a.frps.stop().await;
    b.frps.stop().await;
}

/// One frps whose Redis (`redis`) is reached through a [`Cutter`], once
/// connected; with the Redis key prefix it uses.
async fn behind_a_cutter(redis: &str) -> (Cutter, String, Fleet) {
    let cutter = Cutter::start(services::redis_addr(redis)).await;
    let prefix = services::redis_prefix();
    let mut cfg = config(Duration::from_secs(30));
    cfg.redis_url = format!("redis://{}", cutter.addr);
    cfg.redis_prefix = prefix.clone();
    let fleet = Fleet::start_with(1, cfg).await;
    let cache = fleet.frps.state.redis.clone().unwrap();
    eventually("Redis connected", || cache.is_healthy()).await;
    (cutter, prefix, fleet)
}

#[tokio::test]
async fn redis_down_falls_back_to_in_process_limits() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let (cutter, prefix, fleet) = behind_a_cutter(&redis).await;
    let frps = &fleet.frps;
    let (key, _) = key_with(frps, Some(3), None).await;
    let (held, _) = key_with(frps, None, Some(1)).await;

    cutter.cut().await;
    // Every request is served or limited, none fails for Redis.
    for _ in 0..3 {
        assert_eq!(status(frps, &key).await, 200);
    }
    assert_limited(&get(frps, &key).await, "rate_limit_exceeded");
    let (conn, resp) = http::start_hold(frps.public(), &held).await;
    assert_limited(&get(frps, &held).await, "concurrency_limit_exceeded");
    drop((resp, conn));
    eventually_async("the in-process slot is freed", || async {
        status(frps, &held).await == 200
    })
    .await;
    for _ in 0..10 {
        assert_eq!(status(frps, API_KEY).await, 200);
    }

    // Redis back: counting goes there again, without a restart.
    cutter.restore();
    let (fresh, _) = key_with(frps, Some(100), None).await;
    let client = redis::Client::open(redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let hex = frps::auth::secret::hex(&frps::auth::secret::hash(&fresh));
    let counted = format!("{prefix}ratelimit:{{{hex}}}:rpm");
    eventually_async("limits are counted in Redis again", || {
        let mut conn = conn.clone();
        let counted = counted.clone();
        let frps = &fleet.frps;
        let fresh = fresh.clone();
        async move {
            assert_eq!(status(frps, &fresh).await, 200);
            let n: i64 = redis::cmd("ZCARD")
                .arg(&counted)
                .query_async(&mut conn)
                .await
                .unwrap();
            n > 0
        }
    })
    .await;
    let _: () = redis::cmd("DEL")
        .arg(&counted)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn one_frps_keeps_a_key_at_its_concurrency_limit_while_redis_comes_and_goes() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let (cutter, prefix, fleet) = behind_a_cutter(&redis).await;
    let frps = &fleet.frps;
    let (held, _) = key_with(frps, None, Some(2)).await;
    let (other, _) = key_with(frps, Some(1000), None).await;
    // One slot taken in Redis; then Redis goes away.
    let first = http::start_hold(frps.public(), &held).await;
    assert_eq!(frps.state.rate_limits.shared_leases(), 1);
    cutter.cut().await;
    // Counted in-process, the slot held in Redis still counts.
    let second = http::start_hold(frps.public(), &held).await;
    assert!(!frps.state.rate_limits.counts_in_redis());
    assert_limited(&get(frps, &held).await, "concurrency_limit_exceeded");
    // Redis comes back without its data (restarted without persistence):
    // frps puts its slot back before granting more, and the second, which
    // Redis never saw, comes off what it may grant.
    let client = redis::Client::open(redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let hex = frps::auth::secret::hex(&frps::auth::secret::hash(&held));
    let slots = format!("{prefix}ratelimit:{{{hex}}}:concurrency");
    let removed: i64 = redis::cmd("DEL")
        .arg(&slots)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1, "the first slot was in Redis");
    cutter.restore();
    let limits = frps.state.rate_limits.clone();
    eventually_async("limits are counted in Redis again", || {
        let limits = limits.clone();
        let other = other.clone();
        async move {
            assert_eq!(status(frps, &other).await, 200);
            limits.counts_in_redis()
        }
    })
    .await;
    assert_limited(&get(frps, &held).await, "concurrency_limit_exceeded");
    drop(second);
    eventually_async("the in-process slot is freed", || async {
        status(frps, &held).await == 200
    })
    .await;
    drop(first);
}

async fn admin(cfg: &frps::Config, command: KeyCommand) -> anyhow::Result<String> {
    let mut out = Vec::new();
    frps::admin::run(
        Admin::Key { command },
        cfg,
        &mut out,
        &mut std::io::sink(),
        &mut std::io::empty(),
    )
    .await?;
    Ok(String::from_utf8(out).unwrap())
}

#[tokio::test]
async fn limits_changed_by_the_admin_command_apply_at_once() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let mut cfg = config(Duration::from_secs(30));
    cfg.redis_url = redis;
    cfg.redis_prefix = services::redis_prefix();
    let fleet = Fleet::start_with(1, cfg.clone()).await;
    let frps = &fleet.frps;
    let cache = frps.state.redis.clone().unwrap();
    eventually("Redis connected", || cache.is_healthy()).await;

    // Created with limits by the admin command, shown in the list.
    let created = admin(
        &cfg,
        KeyCommand::Create {
            name: Some("limited".into()),
            expires_in: None,
            rpm: Some(50),
            max_concurrency: Some(7),
        },
    )
    .await
    .unwrap();
    assert!(created.contains("rpm 50, max concurrency 7"), "{created}");
    let list = admin(&cfg, KeyCommand::List { json: false }).await.unwrap();
    let row = list
        .lines()
        .find(|l| l.contains("limited"))
        .expect("listed");
    assert!(row.contains("50") && row.contains('7'), "{list}");

    // A key without limits, cached everywhere by now.
    let (key, secret) = key_with(frps, None, None).await;
    for _ in 0..5 {
        assert_eq!(status(frps, &key).await, 200);
    }
    let set = |rpm| KeyCommand::Limits {
        key: secret.id.clone(),
        rpm: Some(rpm),
        max_concurrency: None,
    };
    let out = admin(&cfg, set(LimitArg::Set(2))).await.unwrap();
    assert!(out.contains("rpm 2, max concurrency unlimited"), "{out}");
    assert!(!out.contains("note:"), "{out}");
    let changed = Instant::now();
    eventually_async("the new rpm applies", || async {
        status(frps, &key).await == 429
    })
    .await;
    assert!(
        changed.elapsed() < Duration::from_secs(2),
        "took {:?}: the cache was not invalidated",
        changed.elapsed()
    );
    let list = admin(&cfg, KeyCommand::List { json: false }).await.unwrap();
    assert!(list.contains("unlimited"), "{list}");

    admin(&cfg, set(LimitArg::Unlimited)).await.unwrap();
    let cleared = Instant::now();
    eventually_async("cleared limits apply", || async {
        status(frps, &key).await == 200
    })
    .await;
    assert!(cleared.elapsed() < Duration::from_secs(2));
    for _ in 0..10 {
        assert_eq!(status(frps, &key).await, 200);
    }

    let nothing = KeyCommand::Limits {
        key: secret.id.clone(),
        rpm: None,
        max_concurrency: None,
    };
    assert!(admin(&cfg, nothing).await.is_err());
    let unknown = KeyCommand::Limits {
        key: "no-such-key".into(),
        rpm: Some(LimitArg::Set(1)),
        max_concurrency: None,
    };
    assert!(admin(&cfg, unknown).await.is_err());
}

#[test]
fn limit_flags_must_be_positive() {
    let parse = |args: &[&str]| frps::Cli::try_parse_from(args.iter().copied());
    assert!(
        parse(&[
            "frps",
            "key",
            "create",
            "--rpm",
            "60",
            "--max-concurrency",
            "2"
        ])
        .is_ok()
    );
    for bad in ["0", "-3", "many"] {
        assert!(
            parse(&["frps", "key", "create", "--rpm", bad]).is_err(),
            "{bad}"
        );
        assert!(parse(&["frps", "key", "create", "--max-concurrency", bad]).is_err());
        assert!(parse(&["frps", "key", "limits", "k", "--rpm", bad]).is_err());
    }
    assert!(parse(&["frps", "key", "limits", "k", "--rpm", "unlimited"]).is_ok());
}

/// The lease maintenance (renewing live leases every `LEASE_REFRESH`,
/// 20 s: too long to wait for here; the renewal itself is unit-tested in
/// frps's ratelimit module) runs on while requests drain at shutdown and
/// ends with frps's hard stop, not at the start of the shutdown: a stream
/// draining for minutes would otherwise see its lease lapse in Redis.
#[tokio::test]
async fn lease_maintenance_runs_until_the_hard_stop_not_the_shutdown() {
    let mut cfg = frps_config();
    cfg.shutdown_timeout = Duration::from_secs(60);
    let fleet = Fleet::start_with(1, cfg).await;
    let state = fleet.frps.state.clone();
    let (_conn, held) = http::start_hold(fleet.frps.public(), API_KEY).await;
    eventually("the leases are refreshed", || {
        state.rate_limits.is_maintaining()
    })
    .await;
    // Shutdown begins; the stream drains on, holding its lease, and the
    // maintenance goes on with it.
    state.shutdown.cancel();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        assert!(!state.hard_stop.is_cancelled(), "still draining");
        assert!(
            state.rate_limits.is_maintaining(),
            "refreshed while draining"
        );
    }
    fleet.backends[0].release_holds();
    let rest = frpx_tests::whole(held.into_body()).await.unwrap();
    assert!(rest.ends_with(b"done\n"));
    eventually("the refreshing ends with frps", || {
        !state.rate_limits.is_maintaining()
    })
    .await;
}
