//! The tunnel connection: each client's upstream connections as streams of
//! one multiplexed connection, and the dial-backs frps falls back to.

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Command, read_one_command, write_command};
use frpx_tests::http::{self, Conn};
use frpx_tests::{API_KEY, Backend, Fleet, Frpc};
use http_body_util::BodyExt;

use super::api::{ADMIN, api};
use super::tunnel::{hold_many, refused_for_the_cap};

/// frps's test configuration with the tunnel connection offered.
fn offering() -> frps::Config {
    let mut config = frpx_tests::frps_config();
    config.tunnel_mux = true;
    config
}

/// [`offering`] for boxes played by the test ([`fake_box`]), which send no
/// heartbeats: not evicted for silence while a test runs.
fn quiet_offering() -> frps::Config {
    let mut config = offering();
    config.heartbeat_interval = Duration::from_secs(10);
    config
}

/// A fleet of `n` whose clients use their tunnel connections (the fleet
/// waits for them).
async fn fleet(n: usize) -> Fleet {
    Fleet::start_with(n, offering()).await
}

async fn api_stats(fleet: &Fleet) -> serde_json::Value {
    api(fleet, "GET", "/api/stats").await.json()["data"].clone()
}

/// A `NewWorkConn` plugin is asked once for a box's tunnel connection,
/// which it allows: the tunnel is taken and requests go over it.
#[tokio::test]
async fn a_work_conn_plugin_allows_the_tunnel_connection() {
    let plugin = frpx_tests::plugin::PluginServer::allow_all().await;
    let mut config = offering();
    config.plugins = vec![plugin.spec("work", &["NewWorkConn"])];
    let fleet = Fleet::start_with(1, config).await;
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    assert!(client.tunnel().is_some(), "the fleet waits for it");
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(plugin.calls_for("NewWorkConn").len(), 1, "the tunnel's");
    let stats = &fleet.frps.state.stats;
    assert_eq!(stats.upstream_dial_backs.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn upstream_connections_are_streams_of_the_tunnel_connection() {
    let mut config = offering();
    config.admin_token = Some(ADMIN.into());
    let fleet = Fleet::start_with(1, config).await;
    let stats = &fleet.frps.state.stats;
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    let tunnel = client.tunnel().expect("the fleet waits for it");
    // Twenty callers at once need twenty upstream connections: twenty
    // streams, and not one dial-back.
    let streams = hold_many(&fleet, 20).await;
    assert_eq!(tunnel.streams(), 20);
    assert_eq!(stats.upstream_streams.load(Ordering::Relaxed), 20);
    assert_eq!(stats.upstream_dial_backs.load(Ordering::Relaxed), 0);
    fleet.backends[0].release_holds();
    for (_conn, resp) in streams {
        let body = frpx_tests::whole(resp.into_body()).await.unwrap();
        assert!(body.ends_with(b"done\n"));
    }
    // Back in the pool, still streams of the same connection, and reused.
    frpx_tests::eventually("20 in the pool", || client.idle.len() == 20).await;
    let mut conn = Conn::open(fleet.frps.public()).await;
    assert_eq!(conn.get("/again", Some(API_KEY)).await.status, 200);
    assert_eq!(stats.upstream_streams.load(Ordering::Relaxed), 20);
    // A streamed body takes a new stream (never a pooled connection the
    // service could close under it), still no dial-back.
    let payload = frpx_tests::numbered(2_000_000);
    let reply = conn.post("/echo", Some(API_KEY), payload.clone()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), payload.len(), "over the window both ways");
    assert!(reply.body == payload, "the body came back changed");
    assert_eq!(stats.upstream_streams.load(Ordering::Relaxed), 21);
    assert!(client.tunnel().unwrap().same(&tunnel));
    // The management API says so.
    let api = api(&fleet, "GET", "/api/connections").await.json();
    assert_eq!(api["data"]["clients"][0]["tunnel"], true, "{api}");
    let api = api_stats(&fleet).await;
    assert_eq!(api["upstream_streams"], 21, "{api}");
    assert_eq!(api["upstream_dial_backs"], 0, "{api}");
}

#[tokio::test]
async fn without_the_offer_clients_are_asked_for_dial_backs() {
    let fleet = Fleet::start(1).await;
    assert!(!fleet.frps.state.config.tunnel_mux, "off by default");
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    assert!(client.tunnel().is_none());
    let stats = &fleet.frps.state.stats;
    assert_eq!(stats.upstream_dial_backs.load(Ordering::Relaxed), 1);
    assert_eq!(stats.upstream_streams.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_lost_tunnel_connection_is_dialed_again_and_dial_backs_fill_the_gap() {
    let fleet = fleet(1).await;
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    let first = client.tunnel().unwrap();
    let mut conn = Conn::open(fleet.frps.public()).await;
    assert_eq!(conn.get("/", Some(API_KEY)).await.status, 200);
    first.close();
    // The pooled stream died with it; the next request is still served
    // (another stream once frpc is back, else a dial-back meanwhile).
    for _ in 0..5 {
        let reply = conn.get("/", Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    frpx_tests::eventually("frpc dials a new tunnel connection", || {
        client.tunnel().is_some_and(|t| !t.same(&first))
    })
    .await;
    let stats = &fleet.frps.state.stats;
    let dial_backs = stats.upstream_dial_backs.load(Ordering::Relaxed);
    // A fresh connection (the pool may hold one from the gap): with the
    // tunnel back, the request needs no dial-back.
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200);
    assert!(client.idle.len() <= 1);
    assert_eq!(
        stats.upstream_dial_backs.load(Ordering::Relaxed),
        dial_backs,
        "a dial-back with the tunnel back"
    );
    // Held open, a second request at once cannot take the first one's
    // pooled connection: it goes as a stream of the new tunnel.
    let streams = stats.upstream_streams.load(Ordering::Relaxed);
    let (_held, _body) = http::start_hold(fleet.frps.public(), API_KEY).await;
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200);
    assert!(stats.upstream_streams.load(Ordering::Relaxed) > streams);
    assert_eq!(
        stats.upstream_dial_backs.load(Ordering::Relaxed),
        dial_backs
    );
    assert!(client.is_routable(std::time::Instant::now()));
    fleet.backends[0].release_holds();
}

#[tokio::test]
async fn an_unreachable_service_resets_its_stream_and_the_caller_hears_frps() {
    let frps = frpx_tests::Frps::start(offering()).await;
    let backend = Backend::start("gone").await;
    let frpc = Frpc::connect("gone", &frps, &backend);
    frps.wait_for_clients(&["gone"]).await;
    let client = frps.state.registry.get("gone").unwrap();
    frpx_tests::eventually("the tunnel connection is up", || client.tunnel().is_some()).await;
    backend.stop();
    drop(backend);
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    // frpc's reason (naming the box's service address) stays in frps's
    // log: the caller hears frps's own words.
    assert_eq!(
        message,
        "could not reach a client's service: the client could not open a connection to its service"
    );
    assert_eq!(
        frps.state.stats.upstream_dial_backs.load(Ordering::Relaxed),
        0
    );
    frpc.kill().await;
}

/// A box played by the test: registered as `id` on a control connection
/// (kept in the answer: dropped, the box leaves), its tunnel connection up,
/// and every stream frps opens on it handed to `serve`. The task's result
/// is how many streams frps opened, once the tunnel connection closes.
async fn fake_box<F, Fut>(
    frps: &frpx_tests::Frps,
    id: &str,
    serve: F,
) -> (frpx_tests::fake::FakeClient, tokio::task::JoinHandle<usize>)
where
    F: Fn(common::mux::MuxStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let token = frps.client_token().await;
    let (control, registered) =
        frpx_tests::fake::FakeClient::register(frps.addrs.control, &token, id).await;
    let Command::Registered {
        client_id,
        session_key,
        mux: true,
        ..
    } = registered
    else {
        panic!("{registered:?}")
    };
    let mut tunnel = tokio::net::TcpStream::connect(frps.addrs.proxy)
        .await
        .unwrap();
    let hello = Command::MuxHello {
        client_id,
        session_key,
    };
    write_command(&mut tunnel, &hello).await.unwrap();
    let answer = read_one_command(&mut tunnel, 1 << 20, frpx_tests::WAIT)
        .await
        .unwrap();
    assert!(matches!(answer, Command::MuxAccepted), "{answer:?}");
    let (mux, driver) = common::mux::Mux::new(tunnel, common::mux::Role::Acceptor);
    tokio::spawn(driver);
    let streams = tokio::spawn(async move {
        let mut opened = 0;
        while let Some(stream) = mux.accept().await {
            tokio::spawn(serve(stream));
            opened += 1;
        }
        opened
    });
    let client = frps.state.registry.get(id).unwrap();
    frpx_tests::eventually("the tunnel connection is up", || client.tunnel().is_some()).await;
    (control, streams)
}

/// What frpc resets a stream with when its local service reads slowly
/// while the tunnel connection holds its whole receive budget.
fn shed(stream: &common::mux::MuxStream) {
    stream.reset(&format!(
        "{}the tunnel connection held 32770 KiB received and unread",
        common::mux::SHED
    ));
}

/// Reads one request head from `stream` (empty when it ended first).
async fn request_head(stream: &mut common::mux::MuxStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return Vec::new(),
        }
    }
    head
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

#[tokio::test]
async fn a_stream_shed_for_the_receive_budget_is_a_busy_client_not_a_failing_one() {
    let frps = frpx_tests::Frps::start(quiet_offering()).await;
    let (_control, shedding) = fake_box(&frps, "shedding", |stream| async move {
        shed(&stream);
    })
    .await;
    let client = frps.state.registry.get("shedding").unwrap();
    let tries = frps::registry::SHEDS_BEFORE_FAILURE as usize;
    let mut conn = Conn::open(frps.public()).await;
    for i in 0..tries {
        // A body frps holds whole and one it streams: either way the
        // caller is told to come back, not that the box failed.
        let reply = if i % 2 == 0 {
            conn.get("/", Some(API_KEY)).await
        } else {
            conn.post("/upload", Some(API_KEY), frpx_tests::numbered(200_000))
                .await
        };
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "client_busy");
        assert_eq!(reply.headers["retry-after"], "1");
        let message = reply.json()["error"]["message"].to_string();
        assert!(message.contains("is busy; retry shortly"), "{message}");
        assert!(!message.contains("budget"), "{message}");
        // Busy is no failure: the box keeps taking requests.
        assert!(!client.is_cooling_down(), "after {} sheds", i + 1);
    }
    assert!(client.is_routable(std::time::Instant::now()));
    // The reason is the box's own text: one that sheds everything, with
    // no success between, is taken for a failing box after that many.
    for _ in 0..frps::registry::FAILURES_BEFORE_COOLDOWN {
        let reply = conn.get("/", Some(API_KEY)).await;
        assert_eq!(reply.status, 502, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    }
    assert!(client.is_cooling_down());
    drop(conn);
    frps.stop().await;
    let sent = tries + frps::registry::FAILURES_BEFORE_COOLDOWN as usize;
    assert_eq!(shedding.await.unwrap(), sent, "each went to the box once");
}

#[tokio::test]
async fn a_pooled_stream_shed_once_too_often_is_a_failure_not_a_keep_alive_race() {
    let mut cfg = quiet_offering();
    // The end of the warm-up burst keeps every pooled stream.
    cfg.pool_idle_after_burst = frps::registry::SHEDS_BEFORE_FAILURE as usize + 1;
    let frps = frpx_tests::Frps::start(cfg).await;
    // Pooled streams enough for every shed a box may make before it counts
    // as failing, and one more.
    let pooled = frps::registry::SHEDS_BEFORE_FAILURE as usize + 1;
    let warm = std::sync::Arc::new(tokio::sync::Barrier::new(pooled));
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = opened.clone();
    // Each stream's first request is answered (the first `pooled` of them
    // together, so that all are in use at once and all are pooled); any
    // later request on it is shed.
    let (_control, streams) = fake_box(&frps, "box", move |mut stream| {
        let warm = warm.clone();
        let n = count.fetch_add(1, Ordering::SeqCst);
        async move {
            use tokio::io::AsyncWriteExt;
            if request_head(&mut stream).await.is_empty() {
                return;
            }
            if n < pooled {
                warm.wait().await;
            }
            if stream.write_all(OK).await.is_err() {
                return;
            }
            if !request_head(&mut stream).await.is_empty() {
                shed(&stream);
            }
        }
    })
    .await;
    let warming = (0..pooled).map(|_| http::get(frps.public(), "/", Some(API_KEY)));
    for reply in futures_util::future::join_all(warming).await {
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let client = frps.state.registry.get("box").unwrap();
    frpx_tests::eventually("every stream is pooled", || client.idle.len() == pooled).await;
    // Busy as long as the box may shed: come back shortly.
    for _ in 0..frps::registry::SHEDS_BEFORE_FAILURE {
        let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "client_busy");
    }
    // One more shed is the box failing: not taken for the service closing
    // an idle connection (which would send the request once more, on a
    // new stream).
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    frps.stop().await;
    assert_eq!(
        streams.await.unwrap(),
        pooled,
        "no stream opened to send it again"
    );
    assert_eq!(opened.load(Ordering::SeqCst), pooled);
}

#[tokio::test]
async fn a_busy_box_after_a_failed_one_leaves_the_failure_as_the_answer() {
    let frps = frpx_tests::Frps::start(quiet_offering()).await;
    // One box cannot reach its service; the other is busy.
    let (_failing, _) = fake_box(&frps, "failing", |stream| async move {
        stream.reset("could not connect to the local service: connection refused");
    })
    .await;
    let (_busy, _) = fake_box(&frps, "busy", |stream| async move {
        shed(&stream);
    })
    .await;
    let boxes = ["failing", "busy"].map(|id| frps.state.registry.get(id).unwrap());
    // Whichever is tried first (at random), the caller hears of the
    // failure, not that a box was busy.
    for _ in 0..12 {
        for b in &boxes {
            b.record_success();
        }
        let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 502, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
        let message = reply.json()["error"]["message"].to_string();
        assert!(message.contains("could not open a connection"), "{message}");
        assert!(!message.contains("refused"), "{message}");
    }
}

#[tokio::test]
async fn a_tunnel_hello_must_prove_its_session() {
    let fleet = fleet(1).await;
    let proxy = fleet.frps.addrs.proxy;
    for (client_id, key) in [("client-0", "not-the-key"), ("nobody", "x")] {
        let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let hello = Command::MuxHello {
            client_id: client_id.into(),
            session_key: key.into(),
        };
        write_command(&mut s, &hello).await.unwrap();
        let answer = read_one_command(&mut s, 1 << 20, Duration::from_secs(5))
            .await
            .unwrap();
        match answer {
            Command::DataRejected { reason, conn_id } => {
                assert!(conn_id.is_nil());
                assert_eq!(reason, "unknown client or wrong session key");
            }
            other => panic!("{other:?}"),
        }
    }
    // The real tunnel connection is untouched.
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    assert!(client.tunnel().is_some());
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn the_tunnel_connection_runs_over_tls_and_streams_events_one_by_one() {
    let ca = frpx_tests::tls::TestCa::new();
    let cert = ca.issue("frps", &["localhost", "127.0.0.1"]);
    let mut config = offering();
    config.tls_cert = Some(cert.cert);
    config.tls_key = Some(cert.key);
    let frps = frpx_tests::Frps::start(config).await;
    let backend = Backend::start("client-0").await;
    let mut cfg = frpx_tests::frpc_config("client-0", &frps.addrs, backend.addr);
    cfg.tls = true;
    cfg.tls_ca = Some(ca.ca_pem.clone());
    let frpc = Frpc::start(cfg);
    frps.wait_for_clients(&["client-0"]).await;
    let client = frps.state.registry.get("client-0").unwrap();
    frpx_tests::eventually("the tunnel connection is up", || client.tunnel().is_some()).await;

    let mut conn = Conn::open(frps.public()).await;
    let payload = vec![b'y'; 300_000];
    let reply = conn.post("/echo", Some(API_KEY), payload.clone()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.as_bytes(), payload.as_slice());
    // An event is not held back waiting for more bytes to batch with.
    let req = http::request(
        "GET",
        frps.public(),
        "/sse",
        Some(API_KEY),
        bytes::Bytes::new(),
    );
    let mut body = conn.send(req).await.unwrap().into_body();
    let first = tokio::time::timeout(frpx_tests::WAIT, body.frame())
        .await
        .unwrap();
    let first = first.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, bytes::Bytes::from("data: first\n\n"));
    backend.release_sse();
    assert_eq!(
        frpx_tests::whole(body).await.unwrap(),
        bytes::Bytes::from("data: last\n\n")
    );
    assert_eq!(
        frps.state.stats.upstream_dial_backs.load(Ordering::Relaxed),
        0
    );
    assert!(frps.state.stats.upstream_streams.load(Ordering::Relaxed) >= 1);
    frpc.kill().await;
}

/// Holds one stream on client-0's tunnel connection, then ends its session
/// (frpc is told, and registers again with a tunnel connection of its
/// own); returns the old connection and the held stream.
async fn session_ended_with_a_stream_held(
    fleet: &Fleet,
) -> (
    common::mux::Mux,
    Vec<(Conn, hyper::Response<hyper::body::Incoming>)>,
) {
    let registry = &fleet.frps.state.registry;
    let old = registry.get("client-0").unwrap();
    let tunnel = old.tunnel().unwrap();
    let held = hold_many(fleet, 1).await;
    old.kick("the operator says so");
    frpx_tests::eventually("a new session with its own tunnel connection", || {
        registry.get("client-0").is_some_and(|c| {
            c.session != old.session && c.tunnel().is_some_and(|t| !t.same(&tunnel))
        })
    })
    .await;
    (tunnel, held)
}

#[tokio::test]
async fn a_stream_in_flight_outlives_its_session() {
    let fleet = fleet(1).await;
    // The session ends while the stream is still answering.
    let (tunnel, mut held) = session_ended_with_a_stream_held(&fleet).await;
    assert!(
        !tunnel.is_closed(),
        "the old connection still carries the stream"
    );
    fleet.backends[0].release_holds();
    let (_conn, resp) = held.pop().unwrap();
    let body = frpx_tests::whole(resp.into_body()).await.unwrap();
    assert!(body.ends_with(b"done\n"), "{body:?}");
    frpx_tests::eventually("the old connection closes once drained", || {
        tunnel.is_closed()
    })
    .await;
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn tunnel_streams_count_against_frpcs_data_connection_cap() {
    let frps = frpx_tests::Frps::start(offering()).await;
    let backend = Backend::start("capped").await;
    let mut cfg = frpx_tests::frpc_config("capped", &frps.addrs, backend.addr);
    cfg.max_data_connections = 1;
    let _frpc = Frpc::start(cfg);
    frps.wait_for_clients(&["capped"]).await;
    let registry = &frps.state.registry;
    frpx_tests::eventually("the tunnel connection is up", || {
        registry.get("capped").is_some_and(|c| c.tunnel().is_some())
    })
    .await;
    // The one stream frpc may serve is taken.
    let (_conn, held) = http::start_hold(frps.public(), API_KEY).await;
    // The next is reset at once as the box busy: the caller hears why,
    // and the box is not cooled down.
    refused_for_the_cap(&frps).await;
    assert_eq!(
        backend.hits(),
        1,
        "the refused request never reached the box"
    );
    assert!(!registry.get("capped").unwrap().is_cooling_down());
    backend.release_holds();
    let rest = frpx_tests::whole(held.into_body()).await.unwrap();
    assert!(rest.ends_with(b"done\n"));
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test]
async fn a_tunnel_connection_of_an_ended_session_takes_no_new_stream() {
    let fleet = fleet(1).await;
    // A stream in flight keeps the old connection open past its session.
    let (tunnel, mut held) = session_ended_with_a_stream_held(&fleet).await;
    // A new stream on the old connection (as a misbehaving frps could
    // open): frpc resets it rather than reach the service for it.
    let mut stream = tunnel.open().unwrap();
    let request = b"GET /late HTTP/1.1\r\nhost: x\r\n\r\n";
    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, request).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(
        frpx_tests::WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut got),
    )
    .await
    .expect("frpc answers the stream");
    let err = read.expect_err("the stream is reset");
    assert!(err.to_string().contains("has ended"), "{err}");
    // As the box busy (a stop or reconnect is no failure of it): frps
    // moves such a request elsewhere without blaming the box.
    let reset = common::mux::StreamReset::find(&err).expect("a stream reset");
    assert!(reset.is_busy(), "{reset}");
    assert_eq!(fleet.backends[0].hits(), 1, "only the held request");
    fleet.backends[0].release_holds();
    let (_conn, resp) = held.pop().unwrap();
    let body = frpx_tests::whole(resp.into_body()).await.unwrap();
    assert!(body.ends_with(b"done\n"), "{body:?}");
}
