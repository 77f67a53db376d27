//! The management API, `frps --monitor`, `/metrics` and the dashboard.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::Command;
use frps::Server;
use frpx_tests::fake::FakeClient;
use frpx_tests::http::{self, Conn, Reply};
use frpx_tests::{API_KEY, Backend, Fleet, Frpc, Frps, frpc_config, frps_config};

pub(crate) const ADMIN: &str = "test-admin-token";

async fn fleet_with_admin(n: usize) -> Fleet {
    let mut cfg = frps_config();
    cfg.admin_token = Some(ADMIN.into());
    Fleet::start_with(n, cfg).await
}

fn assert_envelope(reply: &Reply, success: bool) -> serde_json::Value {
    let json = reply.json();
    assert_eq!(json["success"], success, "{json}");
    assert!(
        json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{json}"
    );
    // The prototype's form: UTC, microseconds, `Z`.
    let ts = json["timestamp"].as_str().expect("timestamp");
    chrono::DateTime::parse_from_rfc3339(ts).expect("RFC 3339 timestamp");
    assert!(
        ts.len() == "2025-06-01T17:55:48.826362Z".len() && ts.ends_with('Z'),
        "{ts}"
    );
    assert!(json.get("data").is_some(), "{json}");
    json["data"].clone()
}

pub(crate) async fn api(fleet: &Fleet, method: &str, path: &str) -> Reply {
    let mut conn = Conn::open(fleet.frps.addrs.api).await;
    let req = http::request(
        method,
        fleet.frps.addrs.api,
        path,
        Some(ADMIN),
        Bytes::new(),
    );
    http::read(conn.send(req).await.unwrap()).await
}

#[tokio::test]
async fn every_endpoint_answers_in_the_envelope() {
    let fleet = fleet_with_admin(2).await;
    // Some traffic, so the counters have something to say.
    for _ in 0..4 {
        assert_eq!(
            http::get(fleet.frps.public(), "/", Some(API_KEY))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        http::get(fleet.frps.public(), "/", Some("bad"))
            .await
            .status,
        401
    );

    let ok = [
        "/api/health",
        "/api/clients",
        "/api/clients/client-0",
        "/api/clients/client-0/status",
        "/api/clients/client-0/heartbeat",
        "/api/monitoring",
        "/api/monitoring/client-1",
        "/api/stats",
        "/api/connections",
        "/api/connections/pending",
        "/api/config",
        "/api/ports",
        "/api/users",
        "/api/tokens/active",
        "/api/models",
    ];
    for path in ok {
        let reply = api(&fleet, "GET", path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert_eq!(reply.headers["content-type"], "application/json", "{path}");
        assert_envelope(&reply, true);
    }
    for path in [
        "/api/clients/nobody",
        "/api/clients/nobody/status",
        "/api/clients/nobody/heartbeat",
        "/api/monitoring/nobody",
        "/api/no-such-endpoint",
    ] {
        let reply = api(&fleet, "GET", path).await;
        assert_eq!(reply.status, 404, "{path}");
        assert!(assert_envelope(&reply, false).is_null());
    }
    assert_eq!(
        api(&fleet, "DELETE", "/api/clients/nobody").await.status,
        404
    );

    let clients = assert_envelope(&api(&fleet, "GET", "/api/clients").await, true);
    let ids: Vec<_> = clients
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["client-0", "client-1"]);
    assert_eq!(clients[0]["status"], "online");
    assert_eq!(clients[0]["models"][0], "model-of-client-0");

    let stats = assert_envelope(&api(&fleet, "GET", "/api/stats").await, true);
    assert_eq!(stats["requests_total"], 5);
    assert_eq!(stats["errors"]["auth_failures"], 1);
    let per_client: u64 = stats["requests_per_client"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(per_client, 4);
    assert!(stats["bytes_out"].as_u64().unwrap() > 0);

    let ports = assert_envelope(&api(&fleet, "GET", "/api/ports").await, true);
    assert_eq!(ports["public"], fleet.frps.addrs.public.port());
    assert_eq!(ports["api"], fleet.frps.addrs.api.port());

    let config = api(&fleet, "GET", "/api/config").await;
    assert!(
        !config.body.contains(API_KEY) && !config.body.contains(ADMIN),
        "secrets in /api/config"
    );
    assert_eq!(assert_envelope(&config, true)["admin_token"], true);

    let users = api(&fleet, "GET", "/api/users").await;
    assert!(
        users.body.contains(frpx_tests::TEST_EMAIL) && !users.body.contains("argon2"),
        "{}",
        users.body
    );
    let tokens = assert_envelope(&api(&fleet, "GET", "/api/tokens/active").await, true);
    assert_eq!(
        tokens.as_array().unwrap().len(),
        2,
        "one token per logged-in frpc"
    );
    for t in tokens.as_array().unwrap() {
        let shown = t["token"].as_str().unwrap();
        assert!(
            shown.ends_with('…') && shown.chars().count() <= 13,
            "{shown}"
        );
    }

    let models = assert_envelope(&api(&fleet, "GET", "/api/models").await, true);
    assert_eq!(models.as_array().unwrap().len(), 2);
    assert_eq!(models[0]["clients"][0], "client-0");
}

#[tokio::test]
async fn the_admin_token_is_enforced() {
    let fleet = fleet_with_admin(1).await;
    let addr = fleet.frps.addrs.api;
    let health = http::get(addr, "/api/health", None).await;
    assert_eq!(health.status, 200, "health needs no token");
    for path in [
        "/api/clients",
        "/api/stats",
        "/metrics",
        "/api/openapi.json",
    ] {
        let missing = http::get(addr, path, None).await;
        assert_eq!(missing.status, 401, "{path}");
        assert_envelope(&missing, false);
        assert_eq!(missing.headers["www-authenticate"], "Bearer", "{path}");
        let wrong = http::get(addr, path, Some("not-the-token")).await;
        assert_eq!(wrong.status, 401, "{path}");
        // RFC 9110: every 401 names the scheme; RFC 6750: why it failed.
        assert_eq!(
            wrong.headers["www-authenticate"], r#"Bearer error="invalid_token""#,
            "{path}"
        );
        assert_eq!(
            http::get(addr, path, Some(ADMIN)).await.status,
            200,
            "{path}"
        );
    }
    // The scheme's name is case-insensitive (RFC 9110).
    let mut conn = Conn::open(addr).await;
    let mut req = http::request("GET", addr, "/api/clients", None, Bytes::new());
    req.headers_mut()
        .insert("authorization", format!("bearer {ADMIN}").parse().unwrap());
    assert_eq!(conn.send(req).await.unwrap().status(), 200);
    // Consumer keys are not admin tokens.
    assert_eq!(
        http::get(addr, "/api/clients", Some(API_KEY)).await.status,
        401
    );
    // No permissive CORS.
    let reply = http::get(addr, "/api/health", None).await;
    assert!(!reply.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn without_a_token_the_api_answers_only_this_machine() {
    let fleet = Fleet::start(1).await;
    let addr = fleet.frps.addrs.api;
    let send = |host: &'static str, origin: Option<&'static str>, method: &'static str| async move {
        let mut conn = Conn::open(addr).await;
        let mut req = http::request(method, addr, "/api/clients/client-0", None, Bytes::new());
        req.headers_mut().insert("host", host.parse().unwrap());
        if let Some(origin) = origin {
            req.headers_mut().insert("origin", origin.parse().unwrap());
        }
        http::read(conn.send(req).await.unwrap()).await
    };
    let before = fleet.frps.state.registry.get("client-0").unwrap();
    let session = before.session;
    for host in ["127.0.0.1:18081", "localhost:18081", "[::1]:18081"] {
        assert_eq!(send(host, None, "GET").await.status, 200, "{host}");
    }
    // A page that rebound its own name to 127.0.0.1.
    let rebound = send("attacker.example:18081", None, "GET").await;
    assert_eq!(rebound.status, 403, "{}", rebound.body);
    assert_envelope(&rebound, false);
    // A page posting (or deleting) across origins.
    let crossed = send("127.0.0.1:18081", Some("http://attacker.example"), "DELETE").await;
    assert_eq!(crossed.status, 403, "{}", crossed.body);
    assert!(crossed.body.contains("Origin"), "{}", crossed.body);
    // Nothing was done: the session was never kicked (set at the kick
    // itself, so no wait for its end is needed) and is still the one.
    assert_eq!(before.kick_reason(), None);
    assert_eq!(
        fleet.frps.state.registry.get("client-0").unwrap().session,
        session
    );
    // The dashboard's own calls (same origin) go through.
    let own = send("localhost:18081", Some("http://localhost:18081"), "GET").await;
    assert_eq!(own.status, 200, "{}", own.body);
}

#[tokio::test]
async fn a_body_budget_below_the_largest_body_is_refused_at_start() {
    let mut cfg = frps_config();
    cfg.max_buffered_bodies = 1024;
    cfg.max_body = 4096;
    let err = Server::bind(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("--max-buffered-bodies"), "{err}");
}

#[tokio::test]
async fn a_self_signed_certificate_and_a_given_one_are_refused_together_at_start() {
    let mut cfg = frps_config();
    cfg.tls_self_signed = true;
    cfg.tls_cert = Some("/etc/frps/cert.pem".into());
    cfg.tls_key = Some("/etc/frps/key.pem".into());
    let err = Server::bind(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("choose one"), "{err}");
}

#[tokio::test]
async fn wrong_admin_tokens_are_throttled_per_address() {
    let mut cfg = frps_config();
    cfg.admin_token = Some(ADMIN.into());
    let frps = Frps::start(cfg).await;
    let api = frps.addrs.api;
    // A stale token repeated (a dashboard tab left open) counts once.
    for _ in 0..3 * frps::api::ADMIN_FAILURES_PER_MINUTE {
        let reply = http::get(api, "/api/stats", Some("stale")).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
    }
    assert_eq!(http::get(api, "/api/stats", Some(ADMIN)).await.status, 200);
    // Distinct guesses each count.
    for i in 1..frps::api::ADMIN_FAILURES_PER_MINUTE {
        let reply = http::get(api, "/api/stats", Some(&format!("guess-{i}"))).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
    }
    // Out of budget: every request with a token waits, the right one too,
    // so a guess that would be right tells nothing.
    for token in ["guess", ADMIN] {
        let reply = http::get(api, "/api/stats", Some(token)).await;
        assert_eq!(reply.status, 429, "{}", reply.body);
        let wait: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&wait), "Retry-After {wait}");
        // Rounded up: a client waiting as told is not refused again.
        let left = frps
            .state
            .admin_failures
            .check(api.ip(), false)
            .unwrap_err();
        assert!(
            Duration::from_secs(wait) >= left,
            "Retry-After {wait} s, {left:?} left"
        );
    }
    // Every loopback address is one caller: a local user cannot take a
    // new budget by connecting from 127.0.0.2.
    for from in ["127.0.0.2", "127.3.2.1"] {
        let reply = Conn::open_from(api, from.parse().unwrap())
            .await
            .get("/api/stats", Some(&format!("guess-from-{from}")))
            .await;
        assert_eq!(reply.status, 429, "{from}: {}", reply.body);
    }
    // What needs no token still answers.
    assert_eq!(http::get(api, "/api/health", None).await.status, 200);
    let reply = http::get(api, "/api/stats", None).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
}

/// A web page in the operator's browser that rebound its name to
/// 127.0.0.1 (its requests name its own host) spends a budget of its own:
/// the operator's tools, naming this machine, keep theirs.
#[tokio::test]
async fn a_page_naming_another_host_cannot_lock_local_tools_out() {
    let mut cfg = frps_config();
    cfg.admin_token = Some(ADMIN.into());
    let frps = Frps::start(cfg).await;
    let api = frps.addrs.api;
    let from_page = |token: String| async move {
        let req = ::http::Request::builder()
            .uri("/api/stats")
            .header("host", format!("rebound.example:{}", api.port()))
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        http::read(Conn::open(api).await.send(req).await.unwrap()).await
    };
    for i in 0..frps::api::ADMIN_FAILURES_PER_MINUTE {
        assert_eq!(from_page(format!("guess-{i}")).await.status, 401);
    }
    assert_eq!(from_page("one-more".into()).await.status, 429);
    // The operator's tools still get in.
    assert_eq!(http::get(api, "/api/stats", Some(ADMIN)).await.status, 200);
}

#[tokio::test]
async fn a_strong_admin_token_passes_from_an_address_out_of_budget() {
    // Behind a reverse proxy every caller has the proxy's address: wrong
    // guesses from anyone must not lock the operator out, and a token this
    // long cannot be found by guessing anyway.
    let strong = "s".repeat(frps::api::STRONG_ADMIN_TOKEN);
    let mut cfg = frps_config();
    cfg.admin_token = Some(strong.clone());
    let frps = Frps::start(cfg).await;
    let api = frps.addrs.api;
    for i in 0..frps::api::ADMIN_FAILURES_PER_MINUTE {
        let reply = http::get(api, "/api/stats", Some(&format!("guess-{i}"))).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
    }
    assert_eq!(
        http::get(api, "/api/stats", Some("guess")).await.status,
        429
    );
    assert_eq!(
        http::get(api, "/api/stats", Some(&strong)).await.status,
        200
    );
    assert_eq!(
        http::get(api, "/api/stats", Some("guess")).await.status,
        429
    );
}

#[tokio::test]
async fn an_api_caller_that_stops_reading_loses_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = frps_config();
    cfg.header_timeout = Duration::from_millis(300);
    // One connection per address: a new one is refused while the deaf
    // caller's is open.
    cfg.max_connections_per_ip = 1;
    let frps = Frps::start(cfg).await;
    let api = frps.addrs.api;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut deaf = socket.connect(api).await.unwrap();
    // A thousand dashboards (8 KiB each), asked for at once and never read:
    // frps's writes wait once the socket buffers are full.
    let one = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    deaf.write_all(&one.repeat(1000)).await.unwrap();
    let healthy = || async {
        let Ok(mut conn) = tokio::net::TcpStream::connect(api).await else {
            return false;
        };
        let asked = conn
            .write_all(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(frpx_tests::WAIT, conn.read_to_end(&mut answer)).await;
        asked.is_ok() && matches!(read, Ok(Ok(_))) && answer.starts_with(b"HTTP/1.1 200")
    };
    assert!(
        !healthy().await,
        "the deaf caller holds the address's one connection"
    );
    frpx_tests::eventually_async("the deaf caller's connection is closed", healthy).await;
    let mut got = Vec::new();
    let ended = tokio::time::timeout(frpx_tests::WAIT, deaf.read_to_end(&mut got)).await;
    assert!(ended.is_ok(), "closed, not held");
    assert!(got.len() < 1000 * 8000, "not every answer: {}", got.len());
}

#[tokio::test]
async fn the_api_closes_idle_and_oversized_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = frps_config();
    cfg.header_timeout = Duration::from_millis(300);
    let frps = Frps::start(cfg).await;
    let api = frps.addrs.api;
    // Silent, or a head that stops half-way: closed after --header-timeout.
    for sent in ["", "GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"] {
        // frps's clock starts at its accept, after this one.
        let started = std::time::Instant::now();
        let mut conn = tokio::net::TcpStream::connect(api).await.unwrap();
        conn.write_all(sent.as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(frpx_tests::WAIT, conn.read_to_end(&mut rest))
            .await
            .expect("closed, not held")
            .ok();
        assert!(started.elapsed() >= Duration::from_millis(300), "{sent:?}");
    }
    // A stray body dripped after its head (no route takes one): 408 once
    // --header-timeout has passed, not after the request's whole minute.
    let mut conn = tokio::net::TcpStream::connect(api).await.unwrap();
    conn.write_all(
        b"POST /api/clients/x/disconnect HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 100\r\n\r\nx",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let answer = http::first_read(&mut conn, "an answer").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("not complete within 300ms"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A keep-alive connection idle after its answer: closed too.
    let mut conn = tokio::net::TcpStream::connect(api).await.unwrap();
    conn.write_all(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(frpx_tests::WAIT, conn.read_to_end(&mut all))
        .await
        .expect("closed once idle")
        .ok();
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
    // A head over 16 KiB is refused.
    let mut conn = tokio::net::TcpStream::connect(api).await.unwrap();
    let head = format!(
        "GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nx-pad: {}\r\n\r\n",
        "p".repeat(20_000)
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(frpx_tests::WAIT, conn.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A body over 1 KiB (no route takes one) is refused once it passes the
    // limit, announced or not: a caller without the token cannot make frps
    // hold more.
    let mut conn = tokio::net::TcpStream::connect(api).await.unwrap();
    conn.write_all(
        b"POST /api/clients/x/disconnect HTTP/1.1\r\nHost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let chunk = format!("258\r\n{}\r\n", "x".repeat(600));
        conn.write_all(chunk.as_bytes()).await.unwrap();
    }
    let answer = http::first_read(&mut conn, "an answer before the body ends").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let mut conn = tokio::net::TcpStream::connect(api).await.unwrap();
    let len = 2 << 20;
    let head = format!(
        "POST /api/clients/x/disconnect HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: {len}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = conn.into_split();
    let send = tokio::spawn(async move {
        let _ = wr.write_all(&vec![b'x'; len]).await;
    });
    let answer = http::first_read(&mut rd, "an answer").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    send.abort();
}

#[tokio::test]
async fn binding_the_api_publicly_without_a_token_is_refused() {
    let mut cfg = frps_config();
    cfg.api_bind = "0.0.0.0".parse().unwrap();
    let err = Server::bind(cfg.clone()).await.err().expect("refused");
    assert!(err.to_string().contains("admin token"), "{err}");
    // Nor with a token short enough to guess from many addresses.
    cfg.admin_token = Some("x".repeat(frps::api::STRONG_ADMIN_TOKEN - 1));
    let err = Server::bind(cfg.clone()).await.err().expect("refused");
    assert!(err.to_string().contains("under 32 characters"), "{err}");
    cfg.admin_token = Some("x".repeat(frps::api::STRONG_ADMIN_TOKEN));
    let server = Server::bind(cfg).await.expect("allowed with a token");
    assert!(server.addrs().api.ip().is_unspecified());
}

#[tokio::test]
async fn a_token_or_key_no_request_could_present_is_refused_at_start() {
    let strong = "x".repeat(frps::api::STRONG_ADMIN_TOKEN);
    for token in [
        format!("{strong}\r"),
        format!(" {strong}"),
        format!("{strong}é"),
        format!("{strong}\u{7f}"),
    ] {
        let mut cfg = frps_config();
        cfg.admin_token = Some(token.clone());
        let err = Server::bind(cfg).await.err().expect("refused");
        assert!(
            err.to_string().contains("visible ASCII"),
            "{token:?}: {err}"
        );
        // The public port's static key is read the same way.
        let mut cfg = frps_config();
        cfg.api_key = Some(token.clone());
        let err = Server::bind(cfg).await.err().expect("refused");
        let err = err.to_string();
        assert!(
            err.contains("static API key") && err.contains("visible ASCII"),
            "{token:?}: {err}"
        );
    }
    // Spaces inside reach the API as they are (a passphrase): allowed, and
    // presented, they let a request in.
    let phrase = "correct horse battery staple\tand more words";
    let mut cfg = frps_config();
    cfg.admin_token = Some(phrase.into());
    let frps = Frps::start(cfg).await;
    let reply = http::get(frps.addrs.api, "/api/stats", Some(phrase)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test]
async fn delete_disconnects_a_client_and_it_comes_back() {
    let fleet = fleet_with_admin(1).await;
    let before = fleet.frps.state.registry.get("client-0").unwrap().session;
    let reply = api(&fleet, "DELETE", "/api/clients/client-0").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_envelope(&reply, true);
    fleet
        .frps
        .wait_until("client-0 reconnects with a new session", |s| {
            s.registry
                .get("client-0")
                .is_some_and(|c| c.session != before)
        })
        .await;
    assert_eq!(
        http::get(fleet.frps.public(), "/", Some(API_KEY))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn secret_looking_metas_are_masked_in_the_api() {
    let mut cfg = frps_config();
    cfg.admin_token = Some(ADMIN.into());
    let frps = Frps::start(cfg).await;
    let backend = Backend::start("gpu-meta").await;
    let mut fc = frpc_config("gpu-meta", &frps.addrs, backend.addr);
    fc.metas = vec![
        ("token".into(), "plugin-secret".into()),
        ("Api_Key".into(), "k1".into()),
        ("version".into(), "1.0.0".into()),
    ];
    let frpc = Frpc::start(fc);
    frps.wait_for_clients(&["gpu-meta"]).await;
    let get = |path: &'static str| {
        let addr = frps.addrs.api;
        async move { Conn::open(addr).await.get(path, Some(ADMIN)).await }
    };
    let listed = get("/api/clients").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let detail = get("/api/clients/gpu-meta").await;
    assert_eq!(detail.status, 200, "{}", detail.body);
    for metas in [
        &listed.json()["data"][0]["metas"],
        &detail.json()["data"]["metas"],
    ] {
        assert_eq!(
            metas,
            &serde_json::json!({"token": "***", "Api_Key": "***", "version": "1.0.0"})
        );
    }
    assert!(!listed.body.contains("plugin-secret") && !detail.body.contains("plugin-secret"));
    // frps itself (and so the server plugins) keeps the real values.
    let client = frps.state.registry.get("gpu-meta").unwrap();
    assert_eq!(client.registration.metas["token"], "plugin-secret");
    frpc.kill().await;
}

#[tokio::test]
async fn monitor_prints_a_row_per_client() {
    let fleet = fleet_with_admin(3).await;
    let mut cfg = frps_config();
    cfg.monitor = true;
    cfg.api_url = Some(format!("http://{}", fleet.frps.addrs.api));
    cfg.admin_token = Some(ADMIN.into());
    let mut out = Vec::new();
    frps::monitor::run(&cfg, &mut out).await.unwrap();
    let table = String::from_utf8(out).unwrap();
    for id in ["client-0", "client-1", "client-2"] {
        let rows = table.lines().filter(|l| l.contains(id)).count();
        assert_eq!(rows, 1, "{id} in\n{table}");
        assert!(table.contains(&format!("model-of-{id}")), "{table}");
    }
    assert!(table.contains("CPU %") && table.contains("last heartbeat"));

    // Wrong token and unreachable server: one clear error.
    cfg.admin_token = Some("wrong".into());
    let err = frps::monitor::run(&cfg, &mut Vec::new()).await.unwrap_err();
    assert!(format!("{err:#}").contains("401"), "{err:#}");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cfg.api_url = Some(format!("http://{dead}"));
    let err = frps::monitor::run(&cfg, &mut Vec::new()).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot reach the frps management API"),
        "{err:#}"
    );
}

/// Parses the text exposition: every sample line is `name{labels} value`.
fn samples(text: &str) -> Vec<(String, f64)> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
            (
                series.to_owned(),
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad value in {l}")),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_request_abandoned_before_its_answer_is_counted_as_499() {
    use tokio::io::AsyncWriteExt;
    let fleet = fleet_with_admin(1).await;
    let public = fleet.frps.public();
    let mut caller = tokio::net::TcpStream::connect(public).await.unwrap();
    caller
        .write_all(
            format!(
                "GET /sleep?ms=60000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    frpx_tests::eventually("the request reached the box", || {
        fleet.backends[0]
            .requests()
            .iter()
            .any(|s| s.path == "/sleep")
    })
    .await;
    drop(caller);
    let addr = fleet.frps.addrs.api;
    frpx_tests::eventually_async("the abandoned request is counted", || async {
        let text = http::get(addr, "/metrics", Some(ADMIN)).await.body;
        samples(&text).iter().any(|(s, v)| {
            s.starts_with("frpx_requests_total{") && s.contains("status=\"499\"") && *v == 1.0
        })
    })
    .await;
}

#[tokio::test]
async fn gpu_metrics_are_labelled_by_the_index_frpc_reports() {
    let mut cfg = frps_config();
    cfg.admin_token = Some(ADMIN.into());
    // The fake boxes send no heartbeats: not evicted during the test.
    cfg.heartbeat_interval = Duration::from_secs(30);
    let frps = Frps::start(cfg).await;
    let token = frps.client_token().await;
    let gpu = |index: Option<u32>, name: &str, memory_used: u64| common::GpuInfo {
        index,
        name: name.into(),
        utilization: 50.0,
        memory_used,
        memory_total: 1 << 30,
        temperature: None,
    };
    // NVML could not read card 0: card 1 keeps its own label. A box that
    // sends no index (an older frpc) or a repeated one is numbered by place.
    let boxes = [
        (
            "skips-0",
            vec![gpu(Some(1), "A", 11), gpu(Some(2), "B", 12)],
        ),
        ("no-index", vec![gpu(None, "C", 21), gpu(None, "D", 22)]),
        (
            "repeats",
            vec![gpu(Some(5), "E", 31), gpu(Some(5), "F", 32)],
        ),
    ];
    let mut held = Vec::new();
    for (id, gpus) in boxes {
        let (mut fake, answer) = FakeClient::register(frps.addrs.control, &token, id).await;
        assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
        fake.send(Command::SystemInfo(common::SystemInfo {
            hostname: id.into(),
            gpus,
            ..Default::default()
        }))
        .await;
        held.push(fake);
    }
    let addr = frps.addrs.api;
    let wanted = [
        ("skips-0", "1", "A", 11.0),
        ("skips-0", "2", "B", 12.0),
        ("no-index", "0", "C", 21.0),
        ("no-index", "1", "D", 22.0),
        ("repeats", "0", "E", 31.0),
        ("repeats", "1", "F", 32.0),
    ];
    frpx_tests::eventually_async("every GPU is exported", || async {
        let text = http::get(addr, "/metrics", Some(ADMIN)).await.body;
        let samples = samples(&text);
        let gpu_series = samples
            .iter()
            .filter(|(s, _)| s.starts_with("frpx_client_gpu_memory_used_bytes{"))
            .count();
        gpu_series == wanted.len()
            && wanted.iter().all(|(client, index, name, used)| {
                samples.iter().any(|(s, v)| {
                    s.starts_with("frpx_client_gpu_memory_used_bytes{")
                        && s.contains(&format!("client=\"{client}\""))
                        && s.contains(&format!("gpu=\"{index}\""))
                        && s.contains(&format!("name=\"{name}\""))
                        && v == used
                })
            })
    })
    .await;
}

#[tokio::test]
async fn metrics_count_requests_and_follow_model_changes() {
    let fleet = fleet_with_admin(1).await;
    assert_eq!(
        http::get(fleet.frps.public(), "/x", Some(API_KEY))
            .await
            .status,
        200
    );
    assert_eq!(http::get(fleet.frps.public(), "/x", None).await.status, 401);
    let metrics = |fleet: &Fleet| {
        let addr = fleet.frps.addrs.api;
        async move { http::get(addr, "/metrics", Some(ADMIN)).await.body }
    };
    frpx_tests::eventually_async("the request is counted", || async {
        samples(&metrics(&fleet).await).iter().any(|(s, v)| {
            s.starts_with("frpx_requests_total{")
                && s.contains("status=\"200\"")
                && s.contains("client=\"client-0\"")
                && *v == 1.0
        })
    })
    .await;
    let all = samples(&metrics(&fleet).await);
    let get = |name: &str| all.iter().find(|(s, _)| s == name).map(|(_, v)| *v);
    assert_eq!(get("frpx_clients_online"), Some(1.0));
    assert!(
        all.iter()
            .any(|(s, v)| s.starts_with("frpx_requests_total{")
                && s.contains("status=\"401\"")
                && *v == 1.0)
    );
    assert!(get("frpx_request_duration_seconds_count").unwrap() >= 1.0);
    assert_eq!(get("frpx_gateway_overhead_seconds_count"), Some(1.0));
    assert!(
        all.iter()
            .any(|(s, v)| s == "frpx_auth_lookups_total{layer=\"static\"}" && *v >= 1.0)
    );
    frpx_tests::eventually_async("the client's system metrics arrive", || async {
        metrics(&fleet)
            .await
            .contains("frpx_client_memory_total_bytes{client=\"client-0\"}")
    })
    .await;

    // The backend's model list changes: frps learns it within a report interval.
    fleet.backends[0].set_models(&["qwen2.5:1.5b", "llama3:latest"]);
    frpx_tests::eventually_async("the new models reach /api/models", || async {
        let models = api(&fleet, "GET", "/api/models").await.json();
        let names: BTreeSet<_> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect();
        names == BTreeSet::from(["qwen2.5:1.5b".to_owned(), "llama3:latest".to_owned()])
    })
    .await;
    // Requests failing on it cool it down: shown as such (its service
    // answers the probes all the same), and not routable.
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    for _ in 0..frps::registry::FAILURES_BEFORE_COOLDOWN + 2 {
        client.record_failure();
    }
    let status = api(&fleet, "GET", "/api/clients/client-0/status")
        .await
        .json();
    assert_eq!(status["data"]["status"], "cooling_down", "{status}");
    assert_eq!(status["data"]["healthy"], true);
    assert_eq!(status["data"]["failures"], 4);
    let left = status["data"]["cooling_down_secs"].as_f64().unwrap();
    assert!(left > 0.0 && left <= 4.0, "{left}");
    let listed = api(&fleet, "GET", "/api/clients").await.json();
    assert_eq!(listed["data"][0]["status"], "cooling_down", "{listed}");
    let text = metrics(&fleet).await;
    assert!(
        text.contains("frpx_client_routable{client=\"client-0\"} 0"),
        "{text}"
    );
    assert!(text.contains("frpx_client_healthy{client=\"client-0\"} 1"));
    client.record_success();
    let status = api(&fleet, "GET", "/api/clients/client-0/status")
        .await
        .json();
    assert_eq!(status["data"]["status"], "online", "{status}");
    assert!(status["data"]["cooling_down_secs"].is_null());
    assert!(
        metrics(&fleet)
            .await
            .contains("frpx_client_routable{client=\"client-0\"} 1")
    );
    // The backend goes down: the client stays registered but unhealthy.
    fleet.backends[0].stop();
    fleet.backends[0].set_models(&[]);
    frpx_tests::eventually_async("the client is marked unhealthy", || async {
        api(&fleet, "GET", "/api/clients/client-0/status")
            .await
            .json()["data"]["status"]
            == "unhealthy"
    })
    .await;
    assert!(
        metrics(&fleet)
            .await
            .contains("frpx_client_healthy{client=\"client-0\"} 0")
    );
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let fleet = fleet_with_admin(0).await;
    let reply = http::get(fleet.frps.addrs.api, "/api/openapi.json", Some(ADMIN)).await;
    assert_eq!(reply.headers["content-type"], "application/json");
    let doc = reply.json();
    let paths: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let expected: BTreeSet<String> = [
        "/api/health",
        "/api/clients",
        "/api/clients/{id}",
        "/api/clients/{id}/status",
        "/api/clients/{id}/heartbeat",
        "/api/monitoring",
        "/api/monitoring/{id}",
        "/api/stats",
        "/api/connections",
        "/api/connections/pending",
        "/api/config",
        "/api/ports",
        "/api/users",
        "/api/tokens/active",
        "/api/models",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths, expected);
    assert!(doc["paths"]["/api/clients/{id}"]["delete"].is_object());
    assert!(doc["components"]["schemas"]["SystemInfo"].is_object());
    // As this frps answers: it has an admin token.
    assert_eq!(doc["security"][0]["admin_token"], serde_json::json!([]));
    assert!(doc["paths"]["/api/stats"]["get"]["responses"]["401"].is_object());
}

/// The dashboard, rendered by a real browser, shows a row per client, read
/// in pages of one (`#page=1`) through the listings' `Link` headers.
#[tokio::test]
async fn the_dashboard_renders_a_row_per_client() {
    let Some(chromium) = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        if std::env::var("FRPX_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") {
            panic!("chromium is required (FRPX_REQUIRE_CHROMIUM=1) but not installed");
        }
        eprintln!("skipping: chromium not installed");
        return;
    };
    let fleet = fleet_with_admin(3).await;
    frpx_tests::eventually("system metrics reported", || {
        fleet
            .frps
            .state
            .registry
            .all()
            .iter()
            .all(|c| c.system().is_some())
    })
    .await;
    let url = format!("http://{}/#token={ADMIN}&page=1", fleet.frps.addrs.api);
    let profile = std::env::temp_dir().join(format!("frpx-chromium-{}", uuid::Uuid::new_v4()));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-dev-shm-usage",
                &format!("--user-data-dir={}", profile.display()),
                "--virtual-time-budget=5000",
                "--dump-dom",
                &url,
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finishes")
    .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    for id in ["client-0", "client-1", "client-2"] {
        assert!(
            dom.contains(&format!("data-client=\"{id}\"")),
            "no row for {id} in:\n{dom}"
        );
    }
    assert!(dom.contains("model-of-client-2"));
    // Every client's metrics too, from every page of /api/monitoring.
    assert_eq!(dom.matches(" CPUs</div>").count(), 3, "{dom}");
    // With clients listed, the "no client" line is hidden.
    let at = dom.find(r#"id="empty""#).expect("the empty-fleet line");
    let tag_start = dom[..at].rfind('<').unwrap();
    let tag_end = at + dom[at..].find('>').unwrap();
    let tag = &dom[tag_start..=tag_end];
    assert!(tag.contains("hidden"), "shown with clients listed: {tag}");
}

/// Every answer is kept out of caches and read as its type; the dashboard
/// page is not framed and calls only its own origin (its rendering under
/// that policy: `the_dashboard_renders_a_row_per_client`).
#[tokio::test]
async fn answers_are_kept_out_of_caches_and_the_page_out_of_frames() {
    let fleet = fleet_with_admin(1).await;
    let api = fleet.frps.addrs.api;
    for (path, token) in [
        ("/api/clients", Some(ADMIN)),
        ("/api/clients", None),
        ("/api/health", None),
        ("/metrics", Some(ADMIN)),
        ("/", None),
    ] {
        let reply = http::get(api, path, token).await;
        assert_eq!(reply.headers["cache-control"], "no-store", "{path}");
        assert_eq!(reply.headers["x-content-type-options"], "nosniff", "{path}");
        let html = path == "/";
        assert_eq!(
            reply.headers.contains_key("x-frame-options"),
            html,
            "{path}"
        );
        if html {
            let policy = reply.headers["content-security-policy"].to_str().unwrap();
            assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
            assert!(policy.contains("connect-src 'self'"), "{policy}");
        }
    }
}

#[tokio::test]
async fn clients_and_their_metrics_come_in_pages() {
    let fleet = fleet_with_admin(3).await;
    frpx_tests::eventually("system metrics reported", || {
        let all = fleet.frps.state.registry.all();
        all.len() == 3 && all.iter().all(|c| c.system().is_some())
    })
    .await;
    // Each with its age, current here.
    let one = assert_envelope(&api(&fleet, "GET", "/api/monitoring/client-1").await, true);
    let age = one["system_secs_ago"].as_f64().expect("a number");
    assert!((0.0..60.0).contains(&age), "{age}");
    assert!(one["system"]["cpu_count"].as_u64().unwrap() > 0);
    let detail = assert_envelope(&api(&fleet, "GET", "/api/clients/client-1").await, true);
    assert!(detail["system_secs_ago"].as_f64().unwrap() < 60.0);
    let metrics = http::get(fleet.frps.addrs.api, "/metrics", Some(ADMIN)).await;
    assert!(
        metrics
            .body
            .contains("frpx_client_system_age_seconds{client=\"client-1\"}"),
        "{}",
        metrics.body
    );
    // A listing's page is its data, or (`/api/connections`) its `clients`.
    let ids = |reply: &Reply| -> Vec<String> {
        let data = assert_envelope(reply, true);
        let page = data.get("clients").unwrap_or(&data);
        page.as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Without parameters: every client, in id order, no next page.
    let all = api(&fleet, "GET", "/api/clients").await;
    assert_eq!(ids(&all), ["client-0", "client-1", "client-2"]);
    assert!(all.headers.get("link").is_none());
    for (listing, size, pages) in [
        ("/api/clients", 2, 2),
        ("/api/monitoring", 1, 3),
        ("/api/connections", 2, 2),
    ] {
        let mut path = format!("{listing}?limit={size}");
        let mut seen = Vec::new();
        for page in 1..=pages {
            let reply = api(&fleet, "GET", &path).await;
            seen.extend(ids(&reply));
            let link = reply.headers.get("link").map(|l| l.to_str().unwrap());
            if page == pages {
                assert_eq!(link, None, "{path}");
                continue;
            }
            let link = link.expect("a next page");
            let last = seen.last().unwrap();
            assert_eq!(
                link,
                format!("<{listing}?limit={size}&after={last}>; rel=\"next\"")
            );
            assert!(
                reply.json()["message"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("more after {last}"))
            );
            path = link[1..link.find('>').unwrap()].to_owned();
        }
        assert_eq!(seen, ["client-0", "client-1", "client-2"], "{listing}");
    }
    // Models too (one per client here), in name order, the cursor being
    // the last name in hexadecimal.
    let names = |reply: &Reply| -> Vec<(String, String)> {
        let page = assert_envelope(reply, true);
        let page = page.as_array().unwrap();
        page.iter()
            .map(|m| {
                let served = &m["clients"];
                assert_eq!(served.as_array().unwrap().len(), 1, "{m}");
                (
                    m["name"].as_str().unwrap().to_owned(),
                    served[0].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let first = api(&fleet, "GET", "/api/models?limit=2").await;
    assert_eq!(
        names(&first),
        [
            ("model-of-client-0".into(), "client-0".into()),
            ("model-of-client-1".into(), "client-1".into())
        ]
    );
    let cursor: String = "model-of-client-1"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        first.headers["link"],
        format!("</api/models?limit=2&after={cursor}>; rel=\"next\"")
    );
    let last = api(
        &fleet,
        "GET",
        &format!("/api/models?limit=2&after={cursor}"),
    )
    .await;
    assert_eq!(
        names(&last),
        [("model-of-client-2".into(), "client-2".into())]
    );
    assert!(last.headers.get("link").is_none());
    // After the last one: an empty page. A cursor no client id could be,
    // or an unknown parameter: 400.
    let past = api(&fleet, "GET", "/api/clients?after=client-2").await;
    assert!(ids(&past).is_empty());
    for bad in [
        "/api/clients?after=a%20b",
        "/api/monitoring?limit=0",
        "/api/models?after=model",
        "/api/clients?offset=1",
    ] {
        let reply = api(&fleet, "GET", bad).await;
        assert_eq!(reply.status, 400, "{bad}");
        assert_envelope(&reply, false);
    }
    fleet.frps.stop().await;
}

#[tokio::test]
async fn users_and_tokens_come_in_pages() {
    let fleet = fleet_with_admin(0).await;
    let store = &fleet.frps.state.store;
    for i in 1..=4 {
        store
            .create_user(&format!("user{i}@example.com"), "not-a-hash")
            .await
            .unwrap();
    }
    for _ in 0..5 {
        fleet.frps.client_token().await;
    }

    // Without parameters: everything, no next page.
    let all = api(&fleet, "GET", "/api/users").await;
    assert_eq!(assert_envelope(&all, true).as_array().unwrap().len(), 5);
    assert!(all.headers.get("link").is_none());

    // Pages of two, followed through their `Link` headers.
    let mut path = "/api/users?limit=2".to_owned();
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let page = api(&fleet, "GET", &path).await;
        let data = assert_envelope(&page, true);
        ids.extend(
            data.as_array()
                .unwrap()
                .iter()
                .map(|u| u["id"].as_i64().unwrap()),
        );
        pages += 1;
        let Some(link) = page.headers.get("link") else {
            break;
        };
        let link = link.to_str().unwrap();
        assert!(link.ends_with(">; rel=\"next\""), "{link}");
        assert!(
            page.json()["message"]
                .as_str()
                .unwrap()
                .contains("more after")
        );
        path = link[1..link.find('>').unwrap()].to_owned();
        assert!(pages < 5, "pages never end: {path}");
    }
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 5);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "oldest first, no repeats: {ids:?}"
    );

    // Tokens, newest first, in pages of three: a login between two pages
    // (a new token on top) neither repeats nor skips a row.
    let first = api(&fleet, "GET", "/api/tokens/active?limit=3").await;
    let token_ids = |reply: &Reply| -> Vec<String> {
        assert_envelope(reply, true)
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut seen = token_ids(&first);
    assert_eq!(seen.len(), 3);
    let link = first.headers.get("link").unwrap().to_str().unwrap();
    assert!(
        link.starts_with("</api/tokens/active?limit=3&after=") && link.ends_with(">; rel=\"next\""),
        "{link}"
    );
    fleet.frps.client_token().await;
    let next = api(&fleet, "GET", &link[1..link.find('>').unwrap()]).await;
    seen.extend(token_ids(&next));
    assert!(next.headers.get("link").is_none());
    let everything = api(&fleet, "GET", "/api/tokens/active").await;
    let everything = token_ids(&everything);
    assert_eq!(everything.len(), 6);
    assert_eq!(
        seen,
        everything[1..],
        "the new token is on top, outside both pages"
    );

    for bad in [
        "/api/users?limit=0",
        "/api/users?limit=1001",
        "/api/users?limit=two",
        "/api/users?after=two",
        // Offset paging is gone (rows added meanwhile shifted the pages).
        "/api/users?offset=2",
        "/api/tokens/active?after=12",
        "/api/tokens/active?after=x_abc",
        "/api/connections?limit=0",
        "/api/connections?after=%20",
    ] {
        let reply = api(&fleet, "GET", bad).await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
        assert_envelope(&reply, false);
    }
}
