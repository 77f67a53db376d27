//! Faults that must be survived (issue #8): an frpc killed with SIGKILL
//! mid-stream, frps restarted under a connected fleet, PostgreSQL and Redis
//! stopped and started again under load, and a soak with an frpc killed
//! every 30 s. Where the fault needs a real process (kill -9, a process's
//! own RSS), frps, frpc and redis-server run as child processes
//! (`frpx_tests::process`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Command;
use frps::auth::KeyValidator;
use frps::auth::redis::{RedisCache, Seal};
use frps::store::Store;
use frpx_tests::fake::FakeClient;
use frpx_tests::http::{self, Conn};
use frpx_tests::process::{FrpcSpec, FrpsProcess, RedisProcess, provision_token};
use frpx_tests::services::{self, Cutter, TestPg};
use frpx_tests::{API_KEY, Backend, Frpc, Frps, WAIT, frpc_config, frps_config, temp_sqlite_url};
use http_body_util::BodyExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The workspace's frps `main.rs`, built as a binary of the test package.
const FRPS_BIN: &str = env!("CARGO_BIN_EXE_e2e-frps");
/// The workspace's frpc `main.rs`, likewise.
const FRPC_BIN: &str = env!("CARGO_BIN_EXE_e2e-frpc");

/// A request through the public port that may fail: `Ok((status, body))`,
/// or `Err` for a connection or body error (the connection is then dead).
async fn try_request(
    conn: &mut Conn,
    req: ::http::Request<http_body_util::Full<Bytes>>,
) -> Result<(u16, String), String> {
    let exchange = async {
        let resp = conn.send(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no complete answer within {WAIT:?}")))
}

#[tokio::test]
async fn kill_9_of_an_frpc_mid_stream_ends_that_stream_and_moves_traffic_at_once() {
    let mut cfg = frps_config();
    // Silence would evict a client only after 30 s: the kill must be seen
    // from the socket.
    cfg.heartbeat_interval = Duration::from_secs(10);
    let frps = Frps::start(cfg).await;
    let backend_a = Backend::start("box-a").await;
    let backend_b = Backend::start("box-b").await;
    let (control, proxy) = (frps.addrs.control, frps.addrs.proxy);
    let spec_a = FrpcSpec::new(FRPC_BIN, "box-a", control, proxy, backend_a.addr);
    let spec_b = FrpcSpec::new(FRPC_BIN, "box-b", control, proxy, backend_b.addr);
    let mut box_a = spec_a.start().await;
    let _box_b = spec_b.start().await;
    frps.wait_for_clients(&["box-a", "box-b"]).await;

    // A stream through box A, its first event received.
    let mut conn = Conn::open(frps.public()).await;
    let mut req = http::request("GET", frps.public(), "/sse", Some(API_KEY), Bytes::new());
    req.headers_mut()
        .insert("x-frpx-client", "box-a".parse().unwrap());
    let resp = conn.send(req).await.expect("stream starts");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the first event within WAIT")
        .expect("a first event")
        .expect("frame");
    assert_eq!(first.into_data().unwrap(), Bytes::from("data: first\n\n"));

    box_a.kill_9().await;
    let killed = Instant::now();

    // The caller's stream ends with an error (not a hang, not a clean end,
    // nothing from another box), at once.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => rest.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d)),
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    })
    .await
    .expect("the stream ends within 2 s of the kill, not at a heartbeat timeout");
    assert!(
        end.is_err(),
        "a cut stream must not end like a complete one"
    );
    assert!(rest.is_empty(), "nothing more may arrive: {rest:?}");
    let stream_ended = killed.elapsed();

    // The registry drops box A from its socket closing, far below the 30 s
    // three missed heartbeats would take.
    frps.wait_for_clients(&["box-b"]).await;
    let dropped = killed.elapsed();
    // (Milliseconds here; seconds of slack for a loaded machine.)
    assert!(
        dropped < Duration::from_secs(3),
        "box A dropped {dropped:?} after the kill"
    );

    // New requests go to box B at once, every one of them.
    for _ in 0..20 {
        let sent = Instant::now();
        let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["backend"], "box-b");
        // No wait for box A (a dial-back to it would wait out the 3 s
        // --connect-timeout): at once, with slack.
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "{:?}",
            sent.elapsed()
        );
    }
    assert_eq!(frps.state.pending.len(), 0, "no dial-back left waiting");
    assert_eq!(backend_b.hits(), 20);
    eprintln!(
        "kill -9 mid-stream: stream ended after {stream_ended:?}, client dropped after {dropped:?}"
    );
}

#[tokio::test]
async fn after_an_frps_restart_every_frpc_is_back_within_5_s_without_a_storm() {
    const N: usize = 20;
    // frpc's shipped reconnect delays, not the harness's short ones.
    let shipped = <frpc::Config as clap::Parser>::parse_from(["frpc"]);
    // The database outlives the restart, as it would in production.
    let mut cfg = frps_config();
    cfg.database_url = temp_sqlite_url();
    let database_url = cfg.database_url.clone();
    let mut frps = Frps::start(cfg).await;
    let addrs = frps.addrs;
    // Clients reach the control port through a forwarder that timestamps
    // every connection attempt.
    let tap = Cutter::start(addrs.control).await;
    let mut backends = Vec::new();
    let mut clients = Vec::new();
    let ids: Vec<String> = (0..N).map(|i| format!("gpu-{i:02}")).collect();
    for id in &ids {
        let backend = Backend::start(id).await;
        let mut cfg = frpc_config(id, &addrs, backend.addr);
        cfg.control_port = tap.addr.port();
        cfg.reconnect_min = shipped.reconnect_min;
        cfg.reconnect_max = shipped.reconnect_max;
        clients.push(Frpc::start(cfg));
        backends.push(backend);
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    frps.wait_for_clients(&ids).await;

    for round in 1..=3 {
        let before = tap.accepted().len();
        let old = frps.state.clone();
        let stopped = Instant::now();
        frps.stop().await;
        assert!(old.registry.is_empty(), "the old server kept clients");
        assert_eq!(old.pending.len(), 0);

        // The same ports (the old listeners are closed once `stop` returns).
        let mut cfg = frps_config();
        cfg.database_url = database_url.clone();
        cfg.control_port = addrs.control.port();
        cfg.proxy_port = addrs.proxy.port();
        frps = Frps::start(cfg).await;
        frps.wait_for_clients(&ids).await;
        let back = stopped.elapsed();
        assert!(
            back < Duration::from_secs(5),
            "round {round}: clients back after {back:?}"
        );

        // No storm: nobody retried before its (jittered) first delay, the
        // attempts are spread out, and hardly any was wasted.
        let attempts: Vec<Duration> = tap.accepted()[before..]
            .iter()
            .map(|t| t.saturating_duration_since(stopped))
            .collect();
        let first = *attempts.iter().min().unwrap();
        let last = *attempts.iter().max().unwrap();
        assert!(
            first >= shipped.reconnect_min.mul_f64(0.75),
            "round {round}: a client reconnected {first:?} after the stop"
        );
        assert!(
            last - first >= Duration::from_millis(100),
            "round {round}: {} attempts within {:?}: not jittered",
            attempts.len(),
            last - first
        );
        assert!(
            attempts.len() <= 2 * N,
            "round {round}: {} connection attempts for {N} clients",
            attempts.len()
        );

        // No leftover state: exactly the N clients, nothing pending or pooled.
        assert_eq!(frps.state.registry.len(), N);
        assert_eq!(frps.state.pending.len(), 0);
        let pooled: usize = frps.state.registry.all().iter().map(|c| c.idle.len()).sum();
        assert_eq!(pooled, 0);
        let mut conn = Conn::open(frps.public()).await;
        for _ in 0..2 * N {
            let reply = conn.get("/", Some(API_KEY)).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
        }
        eprintln!(
            "frps restart {round}: all {N} back after {back:?}; {} attempts from {first:?} to {last:?} after the stop",
            attempts.len()
        );
    }
    assert!(clients.iter().all(|c| !c.is_finished()));
    for client in clients {
        client.kill().await;
    }
}

/// Callers sending `GET /` with a rotating set of keys until stopped,
/// counting successes and recording every failure.
struct Load {
    ok: Arc<AtomicU64>,
    stop: CancellationToken,
    callers: Vec<JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(public: std::net::SocketAddr, keys: &[String], callers: usize) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let callers = (0..callers)
            .map(|i| {
                let (ok, stop, keys) = (ok.clone(), stop.clone(), keys.to_vec());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut conn = Conn::open(public).await;
                    let mut n = i;
                    while !stop.is_cancelled() {
                        let key = &keys[n % keys.len()];
                        n += 1;
                        let req = http::request("GET", public, "/", Some(key), Bytes::new());
                        match try_request(&mut conn, req).await {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((status, body)) => failures.push(format!("{status} {body}")),
                            Err(e) => {
                                failures.push(e);
                                conn = Conn::open(public).await;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    failures
                })
            })
            .collect();
        Load { ok, stop, callers }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have succeeded.
    async fn progress(&self, n: u64) {
        let target = self.ok() + n;
        frpx_tests::eventually(&format!("{n} more requests succeed"), || {
            self.ok() >= target
        })
        .await;
    }

    /// Stops the callers; returns the successes and every failure.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.cancel();
        let mut failures = Vec::new();
        for caller in self.callers {
            failures.extend(caller.await.expect("caller"));
        }
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// frps as a process on `database_url` and `redis_url`, one in-process frpc
/// holding a token from `store`, and `n` consumer keys used once each (so
/// cached in-process and in Redis).
struct StorageRig {
    frps: FrpsProcess,
    store: Store,
    prefix: String,
    keys: Vec<String>,
    _backend: Backend,
    frpc: Frpc,
}

async fn storage_rig(
    frps_database_url: &str,
    direct_database_url: &str,
    redis: &RedisProcess,
    n: usize,
) -> StorageRig {
    let prefix = services::redis_prefix();
    let frps = FrpsProcess::start(
        FRPS_BIN,
        frps_database_url,
        &redis.url(),
        &["--redis-prefix", &prefix],
    )
    .await;
    let store = Store::connect_without_migrations(direct_database_url)
        .await
        .expect("database");
    // frps holds a command connection (its health says when it is up) and
    // a subscription: wait for both, so the keys below are cached in Redis
    // too.
    let api = frps.addrs.api;
    frpx_tests::eventually_async("frps's Redis connection is up", || async move {
        http::get(api, "/api/health", None).await.json()["data"]["redis"] == true
    })
    .await;
    let channel = format!("{prefix}revocations");
    frpx_tests::eventually_async("frps subscribes to revocations", || {
        let (url, channel) = (redis.url(), channel.clone());
        async move { subscribers(&url, &channel).await >= 1 }
    })
    .await;
    let cache = RedisCache::connect_now(&redis.url(), &prefix, Seal::random())
        .await
        .expect("redis");

    let backend = Backend::start("box").await;
    let addrs = frps::BoundAddrs {
        control: frps.addrs.control,
        proxy: frps.addrs.proxy,
        public: frps.addrs.public,
        api: frps.addrs.api,
    };
    let cfg = frpc_config("box", &addrs, backend.addr);
    provision_token(&store, &cfg.token_file).await;
    let frpc = Frpc::start(cfg);
    frps.proc.wait_for_line("Client 'box' registered").await;

    let mut keys = Vec::new();
    for _ in 0..n {
        let (key, _) = KeyValidator::create(&store, None, None).await.unwrap();
        assert_eq!(status(frps.addrs.public, &key).await, 200);
        keys.push(key);
    }
    assert_eq!(cache.count_entries().await, Some(n), "keys cached in Redis");
    StorageRig {
        frps,
        store,
        prefix,
        keys,
        _backend: backend,
        frpc,
    }
}

impl StorageRig {
    /// A new key, valid in the database and cached nowhere.
    async fn fresh_key(&self) -> String {
        KeyValidator::create(&self.store, None, None)
            .await
            .unwrap()
            .0
    }

    /// The process is alive and never panicked.
    fn assert_healthy(&mut self) {
        assert!(!self.frps.proc.has_exited(), "frps died");
        let panics = self.frps.proc.lines_with("panicked");
        assert!(panics.is_empty(), "frps panicked: {panics:?}");
    }

    /// Ends an outage test: the load saw no failure, frps is healthy; then
    /// stops frpc and drops the database. Returns the requests served.
    async fn finish(mut self, load: Load, pg: TestPg) -> u64 {
        let (ok, failures) = load.finish().await;
        assert!(failures.is_empty(), "cached keys failed: {failures:?}");
        self.assert_healthy();
        self.frpc.kill().await;
        pg.drop_db().await;
        ok
    }
}

async fn status(public: std::net::SocketAddr, key: &str) -> u16 {
    http::get(public, "/", Some(key)).await.status.as_u16()
}

/// Subscribers of `channel`.
async fn subscribers(url: &str, channel: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return 0;
    };
    let reply: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    reply.1
}

/// An outage longer than the in-process key cache lasts, so cached keys
/// must be carried by the other layer.
fn outage() -> Duration {
    frps::auth::keys::LOCAL_TTL + Duration::from_secs(2)
}

#[tokio::test]
async fn postgres_stopped_and_started_under_load() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    // frps reaches PostgreSQL through a cutter: cut = the server is gone.
    let cutter = Cutter::start(pg.addr()).await;
    let rig = storage_rig(&pg.url_via(cutter.addr), &pg.url, &redis, 4).await;
    let public = rig.frps.addrs.public;
    let uncached = rig.fresh_key().await;
    let load = Load::start(public, &rig.keys, 4);
    load.progress(20).await;

    cutter.cut().await;
    let cut_at = Instant::now();
    let reply = http::get(public, "/", Some(&uncached)).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "auth_unavailable");
    assert_eq!(reply.headers["retry-after"], "1");
    let during = load.ok();
    tokio::time::sleep(outage().saturating_sub(cut_at.elapsed())).await;
    load.progress(20).await;
    let served_during = load.ok() - during;

    cutter.restore();
    frpx_tests::eventually_async("the uncached key works once PostgreSQL is back", || {
        let key = uncached.clone();
        async move { status(public, &key).await == 200 }
    })
    .await;
    load.progress(20).await;
    let ok = rig.finish(load, pg).await;
    eprintln!(
        "PostgreSQL down {:?}: {served_during} requests with cached keys served during the outage, {ok} in all, no failure",
        outage()
    );
}

#[tokio::test]
async fn redis_killed_and_restarted_under_load() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let Some(mut redis) = RedisProcess::start().await else {
        return;
    };
    let rig = storage_rig(&pg.url, &pg.url, &redis, 4).await;
    let public = rig.frps.addrs.public;
    let channel = format!("{}revocations", rig.prefix);
    let load = Load::start(public, &rig.keys, 4);
    load.progress(20).await;

    redis.kill_9().await;
    let killed = Instant::now();
    let uncached = rig.fresh_key().await;
    assert_eq!(status(public, &uncached).await, 200, "the database answers");
    let during = load.ok();
    tokio::time::sleep(outage().saturating_sub(killed.elapsed())).await;
    load.progress(20).await;
    let served_during = load.ok() - during;

    redis.restart().await;
    // frps subscribes to revocations again by itself...
    frpx_tests::eventually_async("frps subscribes to revocations again", || {
        let (url, channel) = (redis.url(), channel.clone());
        async move { subscribers(&url, &channel).await >= 1 }
    })
    .await;
    // ... and a revocation reaches it well before its in-process cache
    // would have expired the key.
    let cache = RedisCache::connect_now(&redis.url(), &rig.prefix, Seal::random())
        .await
        .expect("redis");
    let victim = rig.fresh_key().await;
    assert_eq!(status(public, &victim).await, 200);
    let (revoked, published) = KeyValidator::revoke(&rig.store, Some(&cache), &victim)
        .await
        .unwrap();
    assert_eq!(revoked.len(), 1);
    assert!(published, "the revocation was published");
    let revoked_at = Instant::now();
    while status(public, &victim).await != 401 {
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "the revoked key is still accepted: no resubscription"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The cache is written again: a new key lands in the new Redis.
    frpx_tests::eventually_async("keys are cached in Redis again", || {
        let (store, cache) = (&rig.store, &cache);
        async move {
            let (key, _) = KeyValidator::create(store, None, None).await.unwrap();
            status(public, &key).await == 200 && cache.count_entries().await >= Some(1)
        }
    })
    .await;
    load.progress(20).await;
    let ok = rig.finish(load, pg).await;
    eprintln!(
        "Redis killed for {:?}: {served_during} requests served during the outage, {ok} in all, no failure; revocations resubscribed",
        outage()
    );
}

/// What the soak's callers saw.
#[derive(Debug, Default)]
struct Tally {
    /// Answered 200 with exactly the request's id.
    ok: u64,
    /// Answered with a 5xx error from frps, by status.
    server_errors: std::collections::BTreeMap<u16, u64>,
    /// Connection or body errors.
    connection_errors: u64,
    /// Anything else: a wrong body (spliced, duplicated, someone else's), an
    /// unexpected status, no answer at all. Must stay empty.
    wrong: Vec<String>,
}

/// One soak caller: `count` requests, the i-th due at `start + i * period`.
async fn soak_caller(
    public: std::net::SocketAddr,
    caller: usize,
    count: u64,
    start: tokio::time::Instant,
    period: Duration,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn = Conn::open(public).await;
    for i in 0..count {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let id = format!("soak-{caller}-{i}-{}", uuid::Uuid::new_v4().simple());
        let req = http::request(
            "POST",
            public,
            "/echo",
            Some(API_KEY),
            Bytes::from(id.clone()),
        );
        match try_request(&mut conn, req).await {
            Ok((200, body)) if body == id => tally.ok += 1,
            Ok((status, body)) if status >= 500 && body.contains("\"error\"") => {
                *tally.server_errors.entry(status).or_default() += 1
            }
            Ok((status, body)) => tally.wrong.push(format!("{id}: {status} {body:?}")),
            Err(e) if e.starts_with("no complete answer") => tally.wrong.push(format!("{id}: {e}")),
            Err(_) => {
                tally.connection_errors += 1;
                conn = Conn::open(public).await;
            }
        }
    }
    tally
}

/// `FRPX_SOAK_SECS` (default 300: the full five minutes).
fn soak_duration() -> Duration {
    let secs = std::env::var("FRPX_SOAK_SECS")
        .ok()
        .map(|v| v.parse().expect("FRPX_SOAK_SECS is a number of seconds"))
        .unwrap_or(300u64);
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_20000_requests_in_5_minutes_with_an_frpc_killed_every_30_s() {
    const CALLERS: u64 = 8;
    const BOXES: usize = 3;
    let duration = soak_duration();
    // 20,000 requests per 5 minutes, scaled when FRPX_SOAK_SECS shortens it.
    let total = 20_000 * duration.as_secs() / 300;
    let kill_every = Duration::from_secs(30).min(duration / 4);
    let warm_up = duration / 5;

    let database_url = temp_sqlite_url();
    let frps = FrpsProcess::start(FRPS_BIN, &database_url, "none", &[]).await;
    let store = Store::connect_without_migrations(&database_url)
        .await
        .expect("database");
    let mut backends = Vec::new();
    let mut specs = Vec::new();
    let mut boxes = Vec::new();
    for i in 0..BOXES {
        let backend = Backend::start(&format!("soak-{i}")).await;
        let spec = FrpcSpec::new(
            FRPC_BIN,
            &format!("soak-{i}"),
            frps.addrs.control,
            frps.addrs.proxy,
            backend.addr,
        );
        provision_token(&store, &spec.token_file).await;
        boxes.push(spec.start().await);
        specs.push(spec);
        backends.push(backend);
    }

    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let per_caller = total / CALLERS;
    let period = duration.div_f64(per_caller as f64);
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            // Callers interleave rather than fire together.
            let offset = period.mul_f64(c as f64 / CALLERS as f64);
            tokio::spawn(soak_caller(
                frps.addrs.public,
                c as usize,
                per_caller,
                start + offset,
                period,
            ))
        })
        .collect();

    // Kill -9 one box after another and start it again, every `kill_every`;
    // note frps's memory once warmed up.
    let mut baseline_kib = None;
    let mut kills = 0;
    let mut next_kill = start + kill_every;
    while next_kill + kill_every / 2 < start + duration {
        if baseline_kib.is_none() && next_kill > start + warm_up {
            tokio::time::sleep_until(start + warm_up).await;
            baseline_kib = Some(frps.proc.rss_kib());
        }
        tokio::time::sleep_until(next_kill).await;
        let victim = kills % BOXES;
        boxes[victim].kill_9().await;
        boxes[victim] = specs[victim].start().await;
        kills += 1;
        next_kill += kill_every;
    }
    let baseline_kib = baseline_kib.unwrap_or_else(|| frps.proc.rss_kib());

    let mut tally = Tally::default();
    for caller in callers {
        let t = caller.await.expect("caller");
        tally.ok += t.ok;
        for (status, n) in t.server_errors {
            *tally.server_errors.entry(status).or_default() += n;
        }
        tally.connection_errors += t.connection_errors;
        tally.wrong.extend(t.wrong);
    }
    let elapsed = start.elapsed();
    let final_kib = frps.proc.rss_kib();
    let sent = per_caller * CALLERS;
    let clean_5xx: u64 = tally.server_errors.values().sum();
    eprintln!(
        "soak: {sent} requests in {elapsed:?}, {kills} frpc killed with -9 and restarted: {} ok, {clean_5xx} 5xx {:?}, {} connection errors, {} wrong; frps RSS {baseline_kib} KiB after warm-up, {final_kib} KiB at the end",
        tally.ok,
        tally.server_errors,
        tally.connection_errors,
        tally.wrong.len()
    );
    assert!(
        tally.wrong.is_empty(),
        "answers that were neither right nor a clean error: {:?}",
        &tally.wrong[..tally.wrong.len().min(20)]
    );
    assert_eq!(tally.ok + clean_5xx + tally.connection_errors, sent);
    assert!(kills >= 2, "the soak killed {kills} clients");
    assert!(
        tally.ok * 100 >= sent * 95,
        "only {} of {sent} requests succeeded",
        tally.ok
    );
    assert!(
        final_kib * 10 <= baseline_kib * 11,
        "frps grew from {baseline_kib} KiB to {final_kib} KiB"
    );
    let panics = frps.proc.lines_with("panicked");
    assert!(panics.is_empty(), "frps panicked: {panics:?}");
}

#[tokio::test]
async fn a_reconnect_records_the_box_online_after_its_old_sessions_offline() {
    let frps = Frps::start(frps_config()).await;
    let token = frps.client_token().await;
    let (old, answer) = FakeClient::register(frps.addrs.control, &token, "box").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let machine = "machine-box";
    frpx_tests::wait_for_asset(&frps.state.store, machine, "online", None).await;
    // The box's asset writes wait (as behind a slow database) while its old
    // session ends and a new one registers: the old session's `offline` is
    // recorded first and the reconnect's `online` after it, never the
    // other way round.
    let first = frps.state.registry.get("box").unwrap();
    let held = first.asset_writes.clone().lock_owned().await;
    drop(old);
    frpx_tests::eventually("the old session is gone", || {
        frps.state.registry.get("box").is_none()
    })
    .await;
    let (_new, answer) = FakeClient::register(frps.addrs.control, &token, "box").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let second = frps.state.registry.get("box").unwrap();
    assert_ne!(second.session, first.session);
    assert!(
        std::sync::Arc::ptr_eq(&first.asset_writes, &second.asset_writes),
        "one write order per box"
    );
    let before = frps.state.store.gpu_asset(machine).await.unwrap().unwrap();
    drop(held);
    // The reconnect's write lands (the row changes), and it is the last.
    let store = &frps.state.store;
    frpx_tests::eventually_async("the reconnect's write lands", || async {
        let row = store.gpu_asset(machine).await.unwrap().unwrap();
        row.updated_at != before.updated_at
    })
    .await;
    // Every write queued behind the held turn has landed once the turn
    // is ours again (it is first come, first served).
    drop(
        tokio::time::timeout(WAIT, second.asset_writes.lock())
            .await
            .expect("the box's asset-write turn within WAIT"),
    );
    let row = store.gpu_asset(machine).await.unwrap().unwrap();
    assert_eq!(row.status.as_deref(), Some("online"));
    frps.stop().await;
}

#[tokio::test]
async fn a_machine_replaced_under_its_client_id_by_another_is_recorded_offline() {
    let frps = Frps::start(frps_config()).await;
    let token = frps.client_token().await;
    let registration = |machine: &str| common::Registration {
        client_id: "shared-id".into(),
        machine_id: machine.into(),
        protocol_version: common::PROTOCOL_VERSION,
        ..Default::default()
    };
    let store = &frps.state.store;
    let (_a, answer) =
        FakeClient::register_as(frps.addrs.control, &token, registration("machine-a")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    frpx_tests::wait_for_asset(store, "machine-a", "online", None).await;
    // Another machine registers under the same client id: it replaces the
    // first, whose row goes offline while its own goes online.
    let (_b, answer) =
        FakeClient::register_as(frps.addrs.control, &token, registration("machine-b")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    frpx_tests::wait_for_asset(store, "machine-b", "online", None).await;
    frpx_tests::wait_for_asset(store, "machine-a", "offline", None).await;
    // The same machine reconnecting (a replaced session of its own) keeps
    // its row online.
    let (_b2, answer) =
        FakeClient::register_as(frps.addrs.control, &token, registration("machine-b")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let live = frps.state.registry.get("shared-id").unwrap();
    drop(
        tokio::time::timeout(WAIT, live.asset_writes.lock())
            .await
            .expect("the box's asset-write turn within WAIT"),
    );
    let row = store.gpu_asset("machine-b").await.unwrap().unwrap();
    assert_eq!(row.status.as_deref(), Some("online"));
    frps.stop().await;
}

#[tokio::test]
async fn a_box_that_moved_to_another_frps_stays_online_when_its_old_session_ends() {
    // Two frps on one database; the box registers on `a`, then (its
    // connection to `a` cut without `a` noticing yet) on `b`.
    let mut cfg = frps_config();
    cfg.database_url = frpx_tests::temp_sqlite_url();
    let a = Frps::start(cfg.clone()).await;
    let b = Frps::start(cfg).await;
    let machine = "machine-box";
    let (old, answer) = FakeClient::register(a.addrs.control, &a.client_token().await, "box").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    frpx_tests::wait_for_asset(&a.state.store, machine, "online", None).await;
    let on_a = a.state.store.gpu_asset(machine).await.unwrap().unwrap();
    let (_new, answer) =
        FakeClient::register(b.addrs.control, &b.client_token().await, "box").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let store = &b.state.store;
    frpx_tests::eventually_async("b's online write lands", || async {
        let row = store.gpu_asset(machine).await.unwrap().unwrap();
        row.updated_at != on_a.updated_at
    })
    .await;
    // `a` now sees its session end, and writes what it writes on the way
    // out (its stop waits for that).
    drop(old);
    a.wait_for_clients(&[]).await;
    a.stop().await;
    let row = store.gpu_asset(machine).await.unwrap().unwrap();
    assert_eq!(row.status.as_deref(), Some("online"), "{row:?}");
    b.stop().await;
}

/// Two frpc on one machine, under their own client ids, share its
/// gpu_assets row: one leaving does not record the machine offline while
/// the other serves.
#[tokio::test]
async fn a_machine_stays_online_while_another_of_its_clients_is() {
    let frps = Frps::start(frps_config()).await;
    let token = frps.client_token().await;
    let register = |id: &str| common::Registration {
        client_id: id.into(),
        machine_id: "machine-shared".into(),
        protocol_version: common::PROTOCOL_VERSION,
        ..Default::default()
    };
    let (b, answer) = FakeClient::register_as(frps.addrs.control, &token, register("gpu-b")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let store = &frps.state.store;
    frpx_tests::wait_for_asset(store, "machine-shared", "online", Some("gpu-b")).await;
    // The one leaving wrote the row last (so no later write by another
    // session spares it).
    let (a, answer) = FakeClient::register_as(frps.addrs.control, &token, register("gpu-a")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    frpx_tests::wait_for_asset(store, "machine-shared", "online", Some("gpu-a")).await;
    drop(a);
    frps.wait_for_clients(&["gpu-b"]).await;
    // Its session's clean-up is over once only the other's remains.
    frpx_tests::eventually("gpu-a's session ended", || frps.state.sessions.len() == 1).await;
    let row = store.gpu_asset("machine-shared").await.unwrap().unwrap();
    assert_eq!(row.status.as_deref(), Some("online"), "{row:?}");
    // The last one leaving did not write the row last, but took over what
    // the other left: the machine goes offline.
    drop(b);
    frpx_tests::wait_for_asset(store, "machine-shared", "offline", Some("gpu-b")).await;
    frps.stop().await;
}

#[tokio::test]
async fn an_account_keeps_its_most_recent_offline_machines_only() {
    let mut cfg = frps_config();
    cfg.max_client_ids = 2;
    let frps = Frps::start(cfg).await;
    let token = frps.client_token().await;
    let store = &frps.state.store;
    // One client id, a new machine id at each registration.
    for machine in ["machine-1", "machine-2", "machine-3"] {
        let registration = common::Registration {
            client_id: "gpu".into(),
            machine_id: machine.into(),
            protocol_version: common::PROTOCOL_VERSION,
            ..Default::default()
        };
        let (c, answer) = FakeClient::register_as(frps.addrs.control, &token, registration).await;
        assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
        frpx_tests::wait_for_asset(store, machine, "online", Some("gpu")).await;
        drop(c);
        frpx_tests::wait_for_asset(store, machine, "offline", Some("gpu")).await;
    }
    // The oldest went when the third went offline.
    frpx_tests::eventually_async("the oldest machine row is deleted", || async {
        store.gpu_asset("machine-1").await.unwrap().is_none()
    })
    .await;
    for kept in ["machine-2", "machine-3"] {
        assert!(store.gpu_asset(kept).await.unwrap().is_some(), "{kept}");
    }
    frps.stop().await;
}

/// frps on its own PostgreSQL database whose `gpu_assets` table another
/// connection holds locked (its writes wait; reads, and writes to other
/// tables, go on), with one box registered.
struct SlowAssets {
    pg: TestPg,
    frps: Frps,
    frpc: Option<Frpc>,
    _backend: Backend,
    lock: sqlx::PgConnection,
}

impl SlowAssets {
    async fn start() -> Option<SlowAssets> {
        let pg = TestPg::create().await?;
        let mut cfg = frps_config();
        cfg.database_url = pg.url.clone();
        let frps = Frps::start(cfg).await;
        let mut lock = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url)
            .await
            .expect("database");
        for sql in ["BEGIN", "LOCK TABLE gpu_assets IN EXCLUSIVE MODE"] {
            sqlx::query(sql).execute(&mut lock).await.unwrap();
        }
        let backend = Backend::start("box").await;
        let frpc = Frpc::connect("box", &frps, &backend);
        frps.wait_for_clients(&["box"]).await;
        Some(SlowAssets {
            pg,
            frps,
            frpc: Some(frpc),
            _backend: backend,
            lock,
        })
    }

    /// The box goes away (`kill -9`).
    async fn kill_box(&mut self) {
        if let Some(frpc) = self.frpc.take() {
            frpc.kill().await;
        }
    }

    /// The database answers again.
    async fn unlock(&mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.lock)
            .await
            .unwrap();
    }

    async fn end(mut self) {
        self.kill_box().await;
        self.unlock().await;
        self.frps.stop().await;
        drop(self.lock);
        self.pg.drop_db().await;
    }
}

/// A database that never answers gpu_assets writes (its network path gone
/// without a reset): an ended session is not kept alive waiting for them.
#[tokio::test]
async fn an_ended_session_does_not_wait_for_ever_on_its_gpu_assets_writes() {
    use frps::listeners::control::ASSET_WRITE_DEADLINE;
    let Some(mut slow) = SlowAssets::start().await else {
        return;
    };
    slow.kill_box().await;
    let frps = &slow.frps;
    frps.wait_for_clients(&[]).await;
    // Its `online` write gives up, then its `offline` write: the session
    // ends while the table is still locked.
    let ended = Instant::now();
    let gone = tokio::time::timeout(3 * ASSET_WRITE_DEADLINE, async {
        while !frps.state.sessions.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the session still waits on the database");
    assert!(ended.elapsed() <= 2 * ASSET_WRITE_DEADLINE + Duration::from_secs(2));
    slow.end().await;
}

#[tokio::test]
async fn a_session_serves_while_its_gpu_assets_write_waits_for_the_database() {
    let Some(mut slow) = SlowAssets::start().await else {
        return;
    };
    let frps = &slow.frps;
    let session = frps.state.registry.get("box").expect("registered").session;
    let machine = frps.machine_id("box");
    // Dial-backs are asked for and heartbeats answered meanwhile.
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "box");
    tokio::time::sleep(frps.state.config.heartbeat_interval * 4).await;
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let now = frps.state.registry.get("box").expect("still registered");
    assert_eq!(now.session, session, "the session was never dropped");
    assert!(
        frps.state
            .store
            .gpu_asset(&machine)
            .await
            .unwrap()
            .is_none(),
        "the online write is still waiting"
    );

    // Once the database answers, the write lands.
    slow.unlock().await;
    frpx_tests::wait_for_asset(&slow.frps.state.store, &machine, "online", None).await;
    slow.end().await;
}

#[tokio::test]
async fn an_admin_commands_answer_is_alone_on_its_standard_output() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("frpx-admin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    // A database file others may read: frps warns about it as it opens it.
    let db = dir.join("frpx.db");
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = tokio::process::Command::new(FRPS_BIN);
    frpx_tests::process::scrub(&mut cmd);
    let url = format!("sqlite://{}", db.display());
    let out = cmd
        .args([
            "--database-url",
            &url,
            "--redis-url",
            "none",
            "key",
            "create",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    // A script reading the key takes the first line: the key, nothing else.
    let mut lines = stdout.lines();
    let key = lines.next().unwrap();
    assert!(!key.is_empty() && !key.contains(' '), "{stdout:?}");
    assert!(lines.next().unwrap().starts_with("id "), "{stdout:?}");
    assert_eq!(lines.next(), None, "{stdout:?}");
    // The warning went to standard error, without colour codes off a
    // terminal.
    assert!(stderr.contains("can be read by other users"), "{stderr:?}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    std::fs::remove_dir_all(dir).unwrap();
}
