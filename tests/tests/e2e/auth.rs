//! Authentication on the public and control ports.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::Command;
use frpx_tests::fake::FakeClient;
use frpx_tests::http::{self, Conn};
use frpx_tests::{API_KEY, Fleet, Frps};

fn assert_openai_error(reply: &http::Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    let json = reply.json();
    assert_eq!(json["error"]["code"], code, "{json}");
    assert!(json["error"]["message"].is_string());
    assert!(json["error"]["type"].is_string());
}

#[tokio::test]
async fn missing_or_wrong_key_is_401() {
    let fleet = Fleet::start(1).await;
    let reply = http::get(fleet.frps.public(), "/", None).await;
    assert_openai_error(&reply, 401, "missing_api_key");
    let reply = http::get(fleet.frps.public(), "/", Some("wrong")).await;
    assert_openai_error(&reply, 401, "invalid_api_key");
    // The seed's default key is not a key here.
    let reply = http::get(fleet.frps.public(), "/", Some("abc123")).await;
    assert_openai_error(&reply, 401, "invalid_api_key");
    assert_eq!(
        fleet.backends[0].hits(),
        0,
        "nothing unauthenticated reaches a GPU box"
    );
}

/// Sends `request` on `raw` and reads what frps answers until it closes
/// the connection (within WAIT), as text.
async fn answer_then_close(mut raw: tokio::net::TcpStream, request: &str) -> String {
    raw.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(frpx_tests::WAIT, raw.read_to_end(&mut answer))
        .await
        .expect("frps closes the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn every_request_on_a_keep_alive_connection_is_authenticated() {
    let fleet = Fleet::start(1).await;
    let public = fleet.frps.public();
    for (key, code) in [
        (Some("not-the-key"), "invalid_api_key"),
        (None, "missing_api_key"),
    ] {
        let mut conn = Conn::open(public).await;
        assert_eq!(conn.get("/first", Some(API_KEY)).await.status, 200);
        let second = conn.get("/second", key).await;
        assert_openai_error(&second, 401, code);
        // And frps closes the connection after it: a caller without a
        // working key holds none open (one keyless request a minute kept
        // one).
        assert_eq!(second.headers["connection"], "close");
        let raw = tokio::net::TcpStream::connect(public).await.unwrap();
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let answer =
            answer_then_close(raw, &format!("GET / HTTP/1.1\r\nHost: frps\r\n{auth}\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{code}: {answer}");
    }
    let mut conn = Conn::open(public).await;
    assert_eq!(conn.get("/third", Some(API_KEY)).await.status, 200);
    assert_eq!(fleet.backends[0].paths(), ["/first", "/first", "/third"]);
}

#[tokio::test]
async fn an_address_guessing_keys_is_refused_unasked_once_its_budget_is_spent() {
    let mut cfg = frpx_tests::frps_config();
    cfg.key_failures_per_minute = 5;
    // A static key too long to guess: served even to a spent address (a
    // shorter one is not: the next test).
    let api_key = "k".repeat(frps::auth::STRONG_SECRET);
    cfg.api_key = Some(api_key.clone());
    let api_key = api_key.as_str();
    let fleet = Fleet::start_with(1, cfg).await;
    let frps = &fleet.frps;
    let public = frps.public();
    let here: IpAddr = [127, 0, 0, 1].into();
    let elsewhere: IpAddr = [127, 0, 0, 2].into();
    let (fresh, _) = frps::auth::KeyValidator::create(&frps.state.store, None, None)
        .await
        .expect("key created");
    let asked = || frps.state.keys.stats.db_hits.load(Ordering::Relaxed);

    // Each 401 closes its connection: a guesser pays for one per guess.
    let guess = |key: String| async move {
        Conn::open_from(public, here)
            .await
            .get("/", Some(&key))
            .await
    };
    for i in 0..5 {
        let reply = guess(format!("guess-{i}")).await;
        assert_openai_error(&reply, 401, "invalid_api_key");
    }
    assert_eq!(asked(), 5);
    // A key just refused is cached as unknown: 401 as before, not counted.
    let again = guess("guess-4".into()).await;
    assert_openai_error(&again, 401, "invalid_api_key");
    // Spent: the next unknown key is not looked up.
    let refused = guess("guess-5".into()).await;
    assert_openai_error(&refused, 429, "too_many_invalid_keys");
    let wait: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=12).contains(&wait), "one refills every 12 s: {wait}");
    assert_eq!(refused.headers["connection"], "close");
    // And frps closes the connection after it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(here, 0)).unwrap();
    let raw = socket.connect(public).await.unwrap();
    let answer = answer_then_close(
        raw,
        "GET / HTTP/1.1\r\nHost: frps\r\nAuthorization: Bearer guess-6\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert_eq!(asked(), 5, "no lookup for a spent address");
    // A key frps knows is served as before.
    let mut conn = Conn::open_from(public, here).await;
    assert_eq!(conn.get("/static", Some(api_key)).await.status, 200);
    // A valid key frps has not seen waits too from this address, not from
    // another; once it is cached, it is served here as well.
    let reply = Conn::open_from(public, here)
        .await
        .get("/", Some(&fresh))
        .await;
    assert_openai_error(&reply, 429, "too_many_invalid_keys");
    let mut other = Conn::open_from(public, elsewhere).await;
    assert_eq!(other.get("/other", Some(&fresh)).await.status, 200);
    let mut conn = Conn::open_from(public, here).await;
    assert_eq!(conn.get("/cached", Some(&fresh)).await.status, 200);
    // Valid keys cost nothing, however many are looked up at once: twenty
    // first requests with a new key in parallel, from an address with 5.
    let (burst, _) = frps::auth::KeyValidator::create(&frps.state.store, None, None)
        .await
        .expect("key created");
    let firsts = (0..20).map(|_| async {
        let mut conn = Conn::open_from(public, elsewhere).await;
        conn.get("/burst", Some(&burst)).await.status
    });
    let statuses = futures_util::future::join_all(firsts).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let guess_elsewhere = |key: String| async move {
        Conn::open_from(public, elsewhere)
            .await
            .get("/", Some(&key))
            .await
    };
    for i in 0..5 {
        let reply = guess_elsewhere(format!("other-guess-{i}")).await;
        assert_openai_error(&reply, 401, "invalid_api_key");
    }
    let reply = guess_elsewhere("other-guess-5".into()).await;
    assert_openai_error(&reply, 429, "too_many_invalid_keys");
    assert_eq!(frps.state.keys.stats.throttled.load(Ordering::Relaxed), 4);
    let metrics = http::get(frps.addrs.api, "/metrics", None).await.body;
    assert!(
        metrics.contains(r#"frpx_auth_lookups_total{layer="throttled"} 4"#),
        "{metrics}"
    );
    let mut paths = fleet.backends[0].paths();
    paths.retain(|p| p != "/burst");
    assert_eq!(paths, ["/static", "/other", "/cached"]);
}

#[tokio::test]
async fn a_short_static_key_waits_with_the_guesses_of_a_spent_address() {
    let mut cfg = frpx_tests::frps_config();
    cfg.key_failures_per_minute = 3;
    // API_KEY, the static key, is under 32 characters.
    assert!(API_KEY.len() < frps::auth::STRONG_SECRET);
    let fleet = Fleet::start_with(1, cfg).await;
    let frps = &fleet.frps;
    let public = frps.public();
    let here: IpAddr = [127, 0, 0, 1].into();
    let elsewhere: IpAddr = [127, 0, 0, 2].into();
    let (stored, _) = frps::auth::KeyValidator::create(&frps.state.store, None, None)
        .await
        .expect("key created");
    let mut conn = Conn::open_from(public, here).await;
    assert_eq!(conn.get("/stored", Some(&stored)).await.status, 200);
    for i in 0..3 {
        // Each 401 closes its connection.
        let reply = Conn::open_from(public, here)
            .await
            .get("/", Some(&format!("guess-{i}")))
            .await;
        assert_openai_error(&reply, 401, "invalid_api_key");
    }
    // Spent: the static key gets what any guess gets, so a right guess
    // does not tell; so does a guess refused before.
    for key in [API_KEY, "guess-3", "guess-2"] {
        let reply = Conn::open_from(public, here)
            .await
            .get("/", Some(key))
            .await;
        assert_openai_error(&reply, 429, "too_many_invalid_keys");
    }
    // A stored key known valid is no guess at it, and is served; the
    // static key is served from other addresses.
    let mut conn = Conn::open_from(public, here).await;
    assert_eq!(conn.get("/stored-again", Some(&stored)).await.status, 200);
    let mut other = Conn::open_from(public, elsewhere).await;
    assert_eq!(other.get("/static", Some(API_KEY)).await.status, 200);
    assert_eq!(
        fleet.backends[0].paths(),
        ["/stored", "/stored-again", "/static"]
    );
}

#[tokio::test]
async fn a_consumer_key_cannot_register_a_client() {
    let frps = Frps::start_default().await;
    let (mut fake, answer) = FakeClient::register(frps.addrs.control, API_KEY, "intruder").await;
    match answer {
        Command::LoginResult {
            ok: false, reason, ..
        } => {
            assert!(reason.unwrap().contains("invalid"));
        }
        other => panic!("expected a refused login, got {other:?}"),
    }
    assert!(
        fake.recv().await.is_none(),
        "connection closes after a refusal"
    );
    assert!(frps.state.registry.is_empty());
}

#[tokio::test]
async fn a_client_token_cannot_call_the_public_port() {
    let fleet = Fleet::start(1).await;
    let token = fleet.frps.client_token().await;
    let reply = http::get(fleet.frps.public(), "/", Some(&token)).await;
    assert_openai_error(&reply, 401, "invalid_api_key");
}

#[tokio::test]
async fn registration_must_follow_login() {
    let frps = Frps::start_default().await;
    let mut fake = FakeClient::connect(frps.addrs.control).await;
    fake.send(Command::Register(Default::default())).await;
    match fake.recv().await {
        Some(Command::LoginResult {
            ok: false, reason, ..
        }) => {
            assert!(reason.unwrap().contains("expected Login"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(frps.state.registry.is_empty());
}

#[tokio::test]
async fn guessed_client_tokens_are_throttled_per_address_on_the_control_port() {
    let fleet = Fleet::start(0).await;
    let frps = &fleet.frps;
    let token = frps.client_token().await;
    // A guess from this address is refused as a bad token...
    let (_guess, answer) = FakeClient::register(frps.addrs.control, "frpxc_guess", "g").await;
    match answer {
        Command::LoginResult {
            ok: false, code, ..
        } => assert_ne!(code.as_deref(), Some("throttled")),
        other => panic!("expected a refused login, got {other:?}"),
    }
    // ... and right after it, even the valid token from the same address
    // waits its turn instead of reaching the database.
    let (_next, answer) = FakeClient::register(frps.addrs.control, &token, "g").await;
    match answer {
        Command::LoginResult {
            ok: false, code, ..
        } => assert_eq!(code.as_deref(), Some("throttled")),
        other => panic!("expected a throttled login, got {other:?}"),
    }
    // Once the delay has passed, the valid token logs in.
    let since = std::time::Instant::now();
    loop {
        let (_client, answer) = FakeClient::register(frps.addrs.control, &token, "g").await;
        if matches!(answer, Command::Registered { .. }) {
            break;
        }
        assert!(
            since.elapsed() < frpx_tests::WAIT,
            "never let in: {answer:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn by_default_a_key_reaches_the_models_but_not_the_boxes_management() {
    let mut config = frpx_tests::frps_config();
    config.forward_paths = frps::Config::ephemeral(API_KEY, "sqlite::memory:").forward_paths;
    config.admin_token = Some(crate::api::ADMIN.into());
    let fleet = Fleet::start_with(1, config).await;
    let public = fleet.frps.public();
    let mut conn = Conn::open(public).await;
    for path in [
        "/v1/chat/completions",
        "/api/chat",
        "/api/show",
        "/api/version",
    ] {
        let reply = conn.post(path, Some(API_KEY), "{}").await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    }
    for (method, path) in [
        ("DELETE", "/api/delete"),
        ("POST", "/api/pull"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("POST", "/api/push"),
        ("GET", "/"),
        ("POST", "/v1/../api/delete"),
        ("POST", "/v1/%2e%2e/api/pull"),
    ] {
        let req = http::request(
            method,
            public,
            path,
            Some(API_KEY),
            r#"{"model":"m"}"#.into(),
        );
        let reply = http::read(conn.send(req).await.unwrap()).await;
        assert_openai_error(&reply, 403, "path_not_allowed");
        assert!(
            reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("/v1/*"),
            "names what is forwarded"
        );
    }
    // Unauthenticated, the answer is still 401: nothing about paths leaks.
    let reply = http::get(public, "/api/delete", None).await;
    assert_openai_error(&reply, 401, "missing_api_key");
    assert_eq!(
        fleet.backends[0].paths(),
        [
            "/v1/chat/completions",
            "/api/chat",
            "/api/show",
            "/api/version"
        ]
    );
    // The configuration view lists them.
    let view = crate::api::api(&fleet, "GET", "/api/config").await.json();
    let listed = view["data"]["forward_paths"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 9, "{listed:?}");
    assert_eq!(listed[0], "/v1/*");
}
