//! The data path: round trips, streaming, header hygiene, load spreading.

use std::collections::HashMap;

use bytes::Bytes;
use frpx_tests::http::{self, Conn};
use frpx_tests::{API_KEY, Backend, Fleet, Frpc, Frps, frpc_config};
use http_body_util::BodyExt;

#[tokio::test]
async fn round_trip_through_the_tunnel() {
    let fleet = Fleet::start(1).await;
    let mut conn = Conn::open(fleet.frps.public()).await;
    let reply = conn.get("/v1/models-or-anything", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    assert_eq!(json["backend"], "client-0");
    assert_eq!(json["path"], "/v1/models-or-anything");

    // A body goes up and comes back intact, on the same keep-alive connection.
    let payload = frpx_tests::numbered(300_000);
    let reply = conn.post("/echo", Some(API_KEY), payload.clone()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), payload.len());
    assert!(reply.body == payload, "the body came back changed");
    assert_eq!(reply.headers["x-backend"], "client-0");
}

#[tokio::test]
async fn the_backend_never_sees_the_consumer_key() {
    let fleet = Fleet::start(1).await;
    let reply = http::get(fleet.frps.public(), "/a", Some(API_KEY)).await;
    assert_eq!(reply.status, 200);
    let mut conn = Conn::open(fleet.frps.public()).await;
    let req = ::http::Request::builder()
        .uri("/b")
        .header("host", "public.example")
        .header("x-api-key", API_KEY)
        // What only frps may say about a caller: a caller's own copies go.
        .header("x-real-ip", "10.9.9.9")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=10.9.9.9")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let reply = http::read(conn.send(req).await.unwrap()).await;
    assert_eq!(reply.status, 200, "x-api-key is accepted too");

    let seen = fleet.backends[0].seen();
    let requests = fleet.backends[0].requests();
    assert_eq!(requests.len(), 2);
    for s in &requests {
        assert!(!s.headers.contains_key("authorization"), "{:?}", s.headers);
        assert!(!s.headers.contains_key("x-api-key"), "{:?}", s.headers);
        // Host is rewritten to the local service (Ollama refuses foreign hosts).
        assert_eq!(s.headers["host"], fleet.backends[0].addr.to_string());
        assert_eq!(s.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(s.headers["x-real-ip"], "127.0.0.1");
        assert_eq!(s.headers["x-forwarded-proto"], "http");
        assert!(!s.headers.contains_key("forwarded"), "{:?}", s.headers);
    }
    let b = seen.iter().find(|s| s.path == "/b").unwrap();
    assert_eq!(b.headers["x-forwarded-host"], "public.example");
}

#[tokio::test]
async fn sixty_requests_over_three_clients_reach_every_client() {
    let fleet = Fleet::start(3).await;
    let mut per_client: HashMap<String, usize> = HashMap::new();
    let mut conn = Conn::open(fleet.frps.public()).await;
    for _ in 0..60 {
        let reply = conn.get("/", Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        *per_client
            .entry(reply.json()["backend"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_client.len(), 3, "{per_client:?}");
    assert_eq!(per_client.values().sum::<usize>(), 60);
    for b in &fleet.backends {
        assert!(b.hits() > 0);
    }
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let fleet = Fleet::start(1).await;
    let mut conn = Conn::open(fleet.frps.public()).await;
    let req = http::request(
        "GET",
        fleet.frps.public(),
        "/sse",
        Some(API_KEY),
        Bytes::new(),
    );
    let resp = conn.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The backend holds its last event until we have seen the first: if frps
    // buffered, this would never complete.
    let first = tokio::time::timeout(frpx_tests::WAIT, body.frame())
        .await
        .expect("first event arrives before the backend sends the last")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from("data: first\n\n"));
    fleet.backends[0].release_sse();
    let rest = frpx_tests::whole(body).await.unwrap();
    assert_eq!(rest, Bytes::from("data: last\n\n"));
}

/// Starts `n` `/hold` streams at once, each on its own public connection
/// and each past its first chunk; the caller reads them out.
/// Asks `frps` for `/` and checks the answer: 503 `client_busy`, for
/// frpc's `--max-data-connections` (whose refusal, the box's own text,
/// stays in frps's log).
pub(crate) async fn refused_for_the_cap(frps: &Frps) {
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "client_busy");
    assert_eq!(
        reply.json()["error"]["message"],
        "every client that could serve this request is busy; retry shortly"
    );
}

pub(crate) async fn hold_many(
    fleet: &Fleet,
    n: usize,
) -> Vec<(Conn, hyper::Response<hyper::body::Incoming>)> {
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(http::start_hold(fleet.frps.public(), API_KEY).await);
    }
    assert_eq!(
        fleet.backends[0].holding(),
        n,
        "the backend holds every stream"
    );
    streams
}

/// Serves 40 `/hold` streams at once on client-0, reads them out and waits
/// until all 40 tunnel connections are back in its pool; returns the
/// callers' connections, still open, and the client.
async fn forty_back_in_the_pool(
    fleet: &Fleet,
) -> (Vec<Conn>, std::sync::Arc<frps::registry::ClientHandle>) {
    let streams = hold_many(fleet, 40).await;
    fleet.backends[0].release_holds();
    let mut conns = Vec::new();
    for (conn, resp) in streams {
        let body = frpx_tests::whole(resp.into_body()).await.unwrap();
        assert!(body.ends_with(b"done\n"));
        conns.push(conn);
    }
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    frpx_tests::eventually("all 40 connections are back in the pool", || {
        client.idle.len() == 40
    })
    .await;
    (conns, client)
}

#[tokio::test]
async fn the_pool_keeps_what_the_load_needed_then_lets_it_go() {
    let mut config = frpx_tests::frps_config();
    // Long enough to see all 40 back even on a slow machine, short enough to
    // watch them expire.
    config.pool_idle_timeout = std::time::Duration::from_secs(4);
    // Kept past the burst's end too (the test below shrinks it instead).
    config.pool_idle_after_burst = 40;
    let fleet = Fleet::start_with(1, config).await;
    // 40 requests at once need 40 tunnel connections: all of them stay
    // pooled afterwards (the old fixed cap of 32 dropped 8, and the next
    // burst paid 8 dial-backs).
    let (conns, client) = forty_back_in_the_pool(&fleet).await;
    let full = std::time::Instant::now();
    // The callers leave; the pool still keeps all 40 until the timeout:
    // past two looks of the burst watcher (four a second), none went.
    drop(conns);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(client.idle.len(), 40, "closed before --pool-idle-timeout");
    // Unused for --pool-idle-timeout, they are closed: not before (the
    // last was used just before `full`; the sweep looks every second).
    frpx_tests::eventually("the idle connections expire", || client.idle.is_empty()).await;
    assert!(
        full.elapsed() >= std::time::Duration::from_secs(3),
        "expired after {:?}",
        full.elapsed()
    );
}

#[tokio::test]
async fn the_pool_shrinks_when_a_burst_ends() {
    // The default --pool-idle-timeout (60 s) is far away: what closes the
    // surplus is the end of the burst.
    let fleet = Fleet::start(1).await;
    let (conns, client) = forty_back_in_the_pool(&fleet).await;
    // The callers leave: open public connections fall from 40 to none.
    drop(conns);
    let keep = fleet.frps.state.config.pool_idle_after_burst;
    assert_eq!(keep, 4, "the default");
    frpx_tests::eventually("the pool keeps --pool-idle-after-burst", || {
        client.idle.len() == keep
    })
    .await;
    // What is kept still serves.
    let mut conn = Conn::open(fleet.frps.public()).await;
    assert_eq!(conn.get("/", Some(API_KEY)).await.status, 200);
}

#[tokio::test]
async fn a_response_head_over_the_upstream_buffer_is_a_bad_gateway() {
    let fleet = Fleet::start(1).await;
    let limit = frps::upstream::UPSTREAM_READ_BUFFER;
    let under = format!("/big-head?bytes={}", limit - 4096);
    let reply = http::get(fleet.frps.public(), &under, Some(API_KEY)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-filler"].len(), limit - 4096);
    let over = format!("/big-head?bytes={}", limit + 1);
    let reply = http::get(fleet.frps.public(), &over, Some(API_KEY)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("response head too large to relay (over 128 KiB"),
        "{}",
        reply.body
    );
    // An answer frps will not relay says nothing about the client: it still
    // serves the next request.
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn idle_upstream_connections_are_reused() {
    let fleet = Fleet::start(1).await;
    let mut conn = Conn::open(fleet.frps.public()).await;
    for _ in 0..5 {
        assert_eq!(conn.get("/", Some(API_KEY)).await.status, 200);
    }
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    // Sequential requests need one tunnel connection, kept idle between them.
    frpx_tests::eventually("the upstream connection is back in the pool", || {
        client.idle.len() == 1
    })
    .await;
    assert_eq!(
        client.requests.load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}

#[tokio::test]
async fn a_service_listing_more_models_than_a_frame_holds_still_registers() {
    let frps = frpx_tests::Frps::start_default().await;
    let backend = frpx_tests::Backend::start("crowded").await;
    // About 450 KiB of names, seven times the 64 KiB frame limit.
    let names: Vec<String> = (0..5_000)
        .map(|i| format!("{i:05}-{}", "a-rather-long-model-name/".repeat(3)))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    backend.set_models(&refs);
    let frpc = frpx_tests::Frpc::connect("crowded", &frps, &backend);
    frps.wait_for_clients(&["crowded"]).await;
    let client = frps.state.registry.get("crowded").unwrap();
    let models = client.models();
    assert!(
        !models.is_empty() && models.len() < names.len(),
        "{} models announced",
        models.len()
    );
    // The first by name, in order.
    for (model, name) in models.iter().zip(&names) {
        assert_eq!(&model.name, name);
    }
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "crowded");
    frpc.kill().await;
}

#[tokio::test]
async fn frpc_refuses_data_connections_past_its_cap_at_once() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("capped").await;
    let mut cfg = frpc_config("capped", &frps.addrs, backend.addr);
    cfg.max_data_connections = 1;
    let _frpc = Frpc::start(cfg);
    frps.wait_for_clients(&["capped"]).await;
    // The one data connection frpc may hold carries a stream.
    let (_conn, held) = http::start_hold(frps.public(), API_KEY).await;
    // frps's next dial-backs are refused without waiting --connect-timeout,
    // and the box is busy, not failing (up to the 16 in a row a box's own
    // word is taken for).
    for _ in 0..10 {
        let asked = std::time::Instant::now();
        refused_for_the_cap(&frps).await;
        assert!(asked.elapsed() < frps.state.config.connect_timeout);
    }
    assert_eq!(
        backend.hits(),
        1,
        "the refused requests never reached the box"
    );
    let client = frps.state.registry.get("capped").unwrap();
    assert!(!client.is_cooling_down(), "busy, not failing");
    // Once the stream ends its connection carries the next request.
    backend.release_holds();
    let rest = frpx_tests::whole(held.into_body()).await.unwrap();
    assert!(rest.ends_with(b"done\n"));
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}
