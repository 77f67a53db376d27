//! Dead clients, restarts, bad peers, expiry and shutdown.

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Command, write_command};
use frpx_tests::fake::FakeClient;
use frpx_tests::http::{self, Conn};
use frpx_tests::{API_KEY, Backend, Fleet, Frpc, Frps, WAIT, frps_config};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn no_client_online_is_503() {
    let frps = Frps::start_default().await;
    let reply = http::get(frps.public(), "/v1/chat/completions", Some(API_KEY)).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "no_clients_available");
    // The SDKs retry a 503; this says when.
    assert_eq!(reply.headers["retry-after"], "1");
}

#[tokio::test]
async fn a_killed_clients_traffic_goes_to_the_others() {
    let mut fleet = Fleet::start(3).await;
    let mut conn = Conn::open(fleet.frps.public()).await;
    for _ in 0..10 {
        assert_eq!(conn.get("/", Some(API_KEY)).await.status, 200);
    }
    let killed = fleet.clients.remove(0);
    killed.kill().await;
    fleet.frps.wait_for_clients(&["client-1", "client-2"]).await;
    for _ in 0..40 {
        let reply = conn.get("/", Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_ne!(reply.json()["backend"], "client-0");
    }
}

#[tokio::test]
async fn frpc_comes_back_after_frps_restarts() {
    let fleet = Fleet::start(1).await;
    let addrs = fleet.frps.addrs;
    assert_eq!(
        http::get(addrs.public, "/", Some(API_KEY)).await.status,
        200
    );
    fleet.frps.stop().await;

    let mut cfg = frps_config();
    cfg.control_port = addrs.control.port();
    cfg.proxy_port = addrs.proxy.port();
    let frps = Frps::start(cfg).await;
    frps.wait_for_clients(&["client-0"]).await;
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        !fleet.clients[0].is_finished(),
        "frpc never exits because the server went away"
    );
}

async fn assert_closed_by_server(mut s: TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(frpx_tests::WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue, // an error frame may come first
            Err(_) => panic!("server kept a bad connection open"),
        }
    }
}

#[tokio::test]
async fn bad_frames_on_control_and_proxy_ports_harm_no_one_else() {
    let fleet = Fleet::start(1).await;
    let addrs = fleet.frps.addrs;
    for port in [addrs.control, addrs.proxy] {
        // A 4 GiB length prefix.
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert_closed_by_server(s).await;
        // Garbage.
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(b"\x00\x00\x00\x10not json at all!")
            .await
            .unwrap();
        assert_closed_by_server(s).await;
        // Invalid UTF-8 and a truncated frame.
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(&[0, 0, 0, 4, 0xff, 0xfe, 0xfd, 0xfc])
            .await
            .unwrap();
        assert_closed_by_server(s).await;
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(&[0, 0, 1, 0, b'{']).await.unwrap();
        s.shutdown().await.unwrap();
        assert_closed_by_server(s).await;
        // HTTP on a frame port.
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_closed_by_server(s).await;
    }
    // A forged data hello for a connection id nobody asked for.
    let mut s = TcpStream::connect(addrs.proxy).await.unwrap();
    let forged = Command::DataHello {
        conn_id: uuid::Uuid::new_v4(),
        client_id: "client-0".into(),
        session_key: "guess".into(),
    };
    write_command(&mut s, &forged).await.unwrap();
    let mut reader = common::FrameReader::new(s, common::MAX_FRAME);
    assert!(matches!(
        reader.read_command().await.unwrap(),
        Some(Command::DataRejected { .. })
    ));

    fleet.frps.wait_for_clients(&["client-0"]).await;
    let reply = http::get(addrs.public, "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// frpc pointed at the proxy port instead of the control port hears which
/// port it reached, and stops (a configuration error).
#[tokio::test]
async fn a_frpc_pointed_at_the_proxy_port_is_told_so() {
    let fleet = Fleet::start(0).await;
    let backend = Backend::start("b").await;
    let mut cfg = frpx_tests::frpc_config("lost", &fleet.frps.addrs, backend.addr);
    cfg.control_port = fleet.frps.addrs.proxy.port();
    let err = Frpc::start(cfg).exit().await.unwrap_err().to_string();
    assert!(err.contains("this is frps's proxy port"), "{err}");
    assert!(err.contains("--control-port"), "{err}");
}

#[tokio::test]
async fn a_pending_pairing_expires_with_504_and_is_cleaned_up() {
    let mut cfg = frps_config();
    cfg.connect_timeout = Duration::from_millis(300);
    let frps = Frps::start(cfg).await;
    // Registers, then never dials back.
    let (mut silent, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "silent").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let request = tokio::spawn(http::get(frps.public(), "/", Some(API_KEY)));
    assert!(matches!(
        silent.recv().await,
        Some(Command::OpenConnection { .. })
    ));
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "client_timeout");
    assert_eq!(frps.state.pending.len(), 0);
}

#[tokio::test]
async fn a_clients_reason_for_not_connecting_stays_out_of_the_callers_answer() {
    let mut cfg = frps_config();
    cfg.max_retries = 0;
    let frps = Frps::start(cfg).await;
    let (mut box_, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "box").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let request = tokio::spawn(http::get(frps.public(), "/", Some(API_KEY)));
    let Some(Command::OpenConnection { conn_id }) = box_.recv().await else {
        panic!("no OpenConnection")
    };
    let reason = "connection refused\n2026-12-04T00:00:00Z  INFO frps: forged line".to_owned();
    box_.send(Command::OpenFailed { conn_id, reason }).await;
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 502, "{}", reply.body);
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    // The box's text (a forged log line here) never reaches the caller.
    assert_eq!(
        message,
        "could not reach a client's service: the client could not open a connection to its service"
    );
}

#[tokio::test]
async fn frps_keeps_its_user_timeout_on_a_paired_data_connection() {
    // frps only sends requests on a data connection: a request written into
    // a pooled connection whose path died must fail after
    // `LINK_USER_TIMEOUT`, not wait out `--upstream-idle-timeout`.
    let frps = Frps::start_default().await;
    let (_control, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "box").await;
    let Command::Registered { session_key, .. } = answer else {
        panic!("{answer:?}")
    };
    let client = frps.state.registry.get("box").unwrap();
    let mut waiter = frps.state.pending.register(&client, 8).unwrap();
    let mut dial_back = TcpStream::connect(frps.addrs.proxy).await.unwrap();
    let hello = Command::DataHello {
        conn_id: waiter.conn_id,
        client_id: "box".into(),
        session_key,
    };
    write_command(&mut dial_back, &hello).await.unwrap();
    let paired = waiter.wait(frpx_tests::WAIT).await.unwrap();
    assert!(common::stream::link_is_tuned(paired.tcp()).unwrap());
}

#[tokio::test]
async fn a_client_with_its_dial_backs_all_outstanding_is_busy_not_failing() {
    let mut cfg = frps_config();
    // Within the fake client's eviction for silence (3 heartbeats, 1.5 s).
    cfg.connect_timeout = Duration::from_secs(1);
    cfg.max_pending_per_client = 1;
    let frps = Frps::start(cfg).await;
    // Registers, then never dials back: its one dial-back stays pending.
    let (mut silent, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "slow").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let first = tokio::spawn(http::get(frps.public(), "/", Some(API_KEY)));
    assert!(matches!(
        silent.recv().await,
        Some(Command::OpenConnection { .. })
    ));
    // Three more while it is outstanding: a burst, answered at once, and
    // the box is not put in a cool-down for it.
    for _ in 0..3 {
        let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "client_busy");
        assert_eq!(reply.headers["retry-after"], "1");
    }
    let client = frps.state.registry.get("slow").unwrap();
    assert!(!client.is_cooling_down());
    assert_eq!(first.await.unwrap().status, 504, "the first one times out");
}

#[tokio::test]
async fn a_busy_client_uses_no_retry() {
    let mut cfg = frps_config();
    cfg.connect_timeout = Duration::from_secs(1);
    cfg.max_pending_per_client = 1;
    cfg.max_retries = 0;
    cfg.balance = frps::router::Balance::Random;
    let frps = Frps::start(cfg).await;
    let (mut silent, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "slow").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let backend = Backend::start("good").await;
    let _good = Frpc::start(frpx_tests::frpc_config("good", &frps.addrs, backend.addr));
    frps.wait_for_clients(&["slow", "good"]).await;
    // "slow" gets one request, whose dial-back stays outstanding.
    let public = frps.public();
    let first = tokio::spawn(async move {
        let mut conn = Conn::open(public).await;
        let req = ::http::Request::builder()
            .uri("/")
            .header("host", "x")
            .header("authorization", format!("Bearer {API_KEY}"))
            .header("x-frpx-client", "slow")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        http::read(conn.send(req).await.unwrap()).await
    });
    assert!(matches!(
        silent.recv().await,
        Some(Command::OpenConnection { .. })
    ));
    // Without retries, requests that land on the busy one at random still
    // go to the other: skipping a busy client is not a retry.
    for _ in 0..10 {
        let reply = http::get(public, "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["backend"], "good");
    }
    assert_eq!(first.await.unwrap().status, 504);
}

/// A box that took a request and froze (kernel still up: its connections
/// stay open, nothing answers) is evicted after three heartbeat intervals;
/// the request then fails over to another box at once instead of waiting
/// out `--upstream-idle-timeout`.
#[tokio::test]
async fn a_request_on_a_box_evicted_for_silence_fails_over() {
    let mut cfg = frps_config();
    // Evicted 6 s after it registers: time for another box to come online
    // on a slow machine.
    cfg.heartbeat_interval = Duration::from_secs(2);
    cfg.upstream_idle_timeout = Duration::from_secs(120);
    let frps = Frps::start(cfg).await;
    let (mut frozen, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "frozen").await;
    let Command::Registered { session_key, .. } = answer else {
        panic!("{answer:?}")
    };
    let started = std::time::Instant::now();
    let request = tokio::spawn(http::get(frps.public(), "/", Some(API_KEY)));
    let Some(Command::OpenConnection { conn_id }) = frozen.recv().await else {
        panic!("no dial-back asked for");
    };
    // It dials back, takes the request, and answers nothing.
    let mut data = TcpStream::connect(frps.addrs.proxy).await.unwrap();
    let hello = Command::DataHello {
        conn_id,
        client_id: "frozen".into(),
        session_key,
    };
    write_command(&mut data, &hello).await.unwrap();
    let mut head = [0u8; 4];
    tokio::time::timeout(frpx_tests::WAIT, data.read_exact(&mut head))
        .await
        .expect("the request arrives")
        .unwrap();
    assert_eq!(&head, b"GET ");
    // Another box comes online meanwhile.
    let backend = Backend::start("good").await;
    let _good = Frpc::start(frpx_tests::frpc_config("good", &frps.addrs, backend.addr));
    frps.wait_for_clients(&["frozen", "good"]).await;
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "good");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "answered after {:?}, not at the eviction",
        started.elapsed()
    );
    assert!(frps.state.registry.get("frozen").is_none(), "evicted");
    drop(data);
}

/// A box that froze partway through a streamed answer (its connections
/// left open) is evicted after three heartbeat intervals, and the stream
/// ends a heartbeat interval after its last bytes, not after
/// `--upstream-idle-timeout`: the caller, the box's slot and the key's
/// lease were held that long. Bytes still coming after the eviction (only
/// the control connection stalled) go on to the caller.
#[tokio::test]
async fn a_stream_from_a_box_evicted_for_silence_ends_at_the_eviction() {
    let mut cfg = frps_config();
    // Evicted after 3 s; bytes after the eviction have a second to come
    // (room for a loaded machine between the test seeing it and writing).
    cfg.heartbeat_interval = Duration::from_secs(1);
    cfg.upstream_idle_timeout = Duration::from_secs(120);
    let frps = Frps::start(cfg).await;
    let (mut frozen, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "frozen").await;
    let Command::Registered { session_key, .. } = answer else {
        panic!("{answer:?}")
    };
    let mut caller = TcpStream::connect(frps.public()).await.unwrap();
    let head =
        format!("GET /stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n");
    caller.write_all(head.as_bytes()).await.unwrap();
    let Some(Command::OpenConnection { conn_id }) = frozen.recv().await else {
        panic!("no dial-back asked for");
    };
    let mut data = TcpStream::connect(frps.addrs.proxy).await.unwrap();
    let hello = Command::DataHello {
        conn_id,
        client_id: "frozen".into(),
        session_key,
    };
    write_command(&mut data, &hello).await.unwrap();
    read_head(&mut data).await;
    // The answer begins, then the box freezes: no more bytes, no heartbeat.
    data.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        .await
        .unwrap();
    let begun = read_until(&mut caller, "first").await;
    assert!(begun.starts_with("HTTP/1.1 200"), "{begun}");
    // Only its control connection may have stalled: bytes still coming
    // within a heartbeat interval after the eviction go on to the caller.
    frpx_tests::eventually("evicted", || frps.state.registry.get("frozen").is_none()).await;
    data.write_all(b"6\r\nsecond\r\n").await.unwrap();
    read_until(&mut caller, "second").await;
    let mut rest = Vec::new();
    tokio::time::timeout(frpx_tests::WAIT, caller.read_to_end(&mut rest))
        .await
        .expect("the stream ends at the eviction, not after --upstream-idle-timeout")
        .ok();
    assert!(frps.state.registry.get("frozen").is_none(), "evicted");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("0\r\n\r\n"),
        "cut, not ended as complete: {rest:?}"
    );
    drop(data);
}

#[tokio::test]
async fn a_silent_client_is_evicted_after_three_heartbeat_intervals() {
    const INTERVAL: Duration = Duration::from_millis(300);
    let mut cfg = frps_config();
    cfg.heartbeat_interval = INTERVAL;
    let frps = Frps::start(cfg).await;
    let (mut silent, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "mute").await;
    // frps heard it last before it answered.
    let registered = Instant::now();
    match answer {
        Command::Registered {
            heartbeat_interval_ms,
            ..
        } => assert_eq!(heartbeat_interval_ms, 300),
        other => panic!("{other:?}"),
    }
    match silent.recv().await {
        Some(Command::Disconnect { reason }) => {
            assert!(reason.contains("no heartbeat"), "{reason}")
        }
        other => panic!("expected Disconnect, got {other:?}"),
    }
    // Not before three intervals of silence (a little slack for the time
    // the answer took to come here).
    let silent_for = registered.elapsed();
    assert!(
        silent_for >= INTERVAL * 3 - Duration::from_millis(50),
        "{silent_for:?}"
    );
    frps.wait_for_clients(&[]).await;
}

/// frps's writes to a client wait (up to `--handshake-timeout` each) while
/// the client does not read; heartbeats that came meanwhile are read
/// before the silence window is found to have passed.
#[tokio::test]
async fn heartbeats_that_came_while_frps_could_not_write_keep_the_client() {
    let mut cfg = frps_config();
    // Silent after 600 ms; a write may wait 10 s.
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.handshake_timeout = Duration::from_secs(10);
    let frps = Frps::start(cfg).await;
    let registration = common::Registration {
        client_id: "busy".into(),
        machine_id: "machine-busy".into(),
        protocol_version: common::PROTOCOL_VERSION,
        ..Default::default()
    };
    let (client, answer) = FakeClient::connect_receiving_little(frps.addrs.control, 4096)
        .await
        .log_in_and_register(&frps.client_token().await, registration)
        .await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let FakeClient {
        mut reader,
        mut writer,
    } = client;
    // Heartbeats without a pause, their acks unread: the acks fill the
    // socket buffers, frps's write of the next one waits, and heartbeats
    // pile up unread on its side in turn (this write then waits too).
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let written = std::sync::Arc::new(AtomicU64::new(0));
    let flood = tokio::spawn({
        let (stop, written) = (stop.clone(), written.clone());
        async move {
            let mut seq = 0;
            while !stop.load(Ordering::Acquire) {
                seq += 1;
                write_command(&mut writer, &Command::Heartbeat { seq })
                    .await
                    .expect("heartbeat");
                written.store(seq, Ordering::Release);
            }
            (writer, seq)
        }
    });
    // The flood stalls once frps reads no more (its write of an ack
    // waiting); from then, well past the silence window, well within the
    // write's limit.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = written.load(Ordering::Acquire);
        if now > 0 && now == last {
            break;
        }
        last = now;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    // Reading again: frps's write completes, and the heartbeats it had not
    // read are read, each acked, none evicting.
    let mut acked = 0;
    let sent = loop {
        match tokio::time::timeout(frpx_tests::WAIT, reader.read_command()).await {
            Ok(Ok(Some(Command::HeartbeatAck { seq }))) => {
                acked = seq;
                if flood.is_finished() {
                    break seq;
                }
            }
            other => panic!("after {acked} acks: {other:?}"),
        }
    };
    let (writer, last) = flood.await.unwrap();
    assert!(sent <= last);
    assert!(
        frps.state.registry.get("busy").is_some(),
        "still registered"
    );
    drop(writer);
}

#[tokio::test]
async fn heartbeats_keep_a_client_registered() {
    const INTERVAL: Duration = Duration::from_millis(500);
    let mut cfg = frps_config();
    cfg.heartbeat_interval = INTERVAL;
    let frps = Frps::start(cfg).await;
    let (mut c, _) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "alive").await;
    // A heartbeat every half interval (frpc's pace is one per interval):
    // a stall of a whole interval on a loaded machine evicts nobody.
    let started = Instant::now();
    for seq in 1..=8 {
        c.send(Command::Heartbeat { seq }).await;
        assert_eq!(c.recv().await, Some(Command::HeartbeatAck { seq }));
        tokio::time::sleep(INTERVAL / 2).await;
    }
    // Well over three intervals passed, yet still registered.
    assert!(started.elapsed() > INTERVAL * 3);
    assert!(frps.state.registry.get("alive").is_some());
}

#[tokio::test]
async fn a_reconnect_with_the_same_id_replaces_the_stale_connection() {
    let frps = Frps::start_default().await;
    let (mut first, a) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "gpu").await;
    assert!(matches!(a, Command::Registered { .. }));
    let (_second, b) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "gpu").await;
    assert!(
        matches!(b, Command::Registered { .. }),
        "no 'id already in use' lockout: {b:?}"
    );
    match first.recv().await {
        Some(Command::Disconnect { reason }) => assert!(reason.contains("replaced")),
        other => panic!("expected Disconnect, got {other:?}"),
    }
    assert!(first.recv().await.is_none());
    assert_eq!(frps.state.registry.len(), 1);
}

#[tokio::test]
async fn a_box_replaced_while_requests_wait_for_its_dial_backs_is_not_cooled_down() {
    let mut cfg = frps_config();
    // The dial-backs wait far longer than the reconnect takes.
    cfg.connect_timeout = Duration::from_secs(30);
    // The fake clients send no heartbeats: not evicted for silence here.
    cfg.heartbeat_interval = Duration::from_secs(10);
    // A session's end uses none: the box's next session is tried anyway.
    cfg.max_retries = 0;
    let frps = Frps::start(cfg).await;
    let token = frps.client_token().await;
    let (mut first, answer) = FakeClient::register(frps.addrs.control, &token, "gpu").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    // Requests enough to cool a box down wait on its dial-backs...
    let waiting = frps::registry::FAILURES_BEFORE_COOLDOWN as usize;
    let requests: Vec<_> = (0..waiting)
        .map(|_| tokio::spawn(http::get(frps.public(), "/", Some(API_KEY))))
        .collect();
    for _ in 0..waiting {
        assert!(matches!(
            first.recv().await,
            Some(Command::OpenConnection { .. })
        ));
    }
    // ...when the box reconnects (its frpc restarted): the session they
    // waited on ended, the box did not fail, and its new session takes them.
    let (mut second, answer) = FakeClient::register(frps.addrs.control, &token, "gpu").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let mut asked = Vec::new();
    for _ in 0..waiting {
        match tokio::time::timeout(frpx_tests::WAIT, second.recv()).await {
            Ok(Some(Command::OpenConnection { conn_id })) => asked.push(conn_id),
            other => panic!("{other:?}"),
        }
    }
    assert!(!frps.state.registry.get("gpu").unwrap().is_cooling_down());
    // The new session cannot reach its service: that is its failure.
    for conn_id in asked {
        let reason = "connection refused".to_owned();
        second.send(Command::OpenFailed { conn_id, reason }).await;
    }
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 502, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    }
}

/// A frpc that crashes whenever frps asks it for a connection (its session
/// lost while the dial-back is awaited) counts one failure each time: after
/// two such sessions the box cools down, and its next session inherits the
/// count. A session that ends with no dial-back awaited, or that frpc ends
/// with a `Disconnect` (its shutdown), counts none.
#[tokio::test]
async fn a_box_crashing_at_each_dial_back_cools_down_across_reconnects() {
    let mut cfg = frps_config();
    cfg.connect_timeout = Duration::from_secs(30);
    // The fake clients send no heartbeats: not evicted for silence here.
    cfg.heartbeat_interval = Duration::from_secs(10);
    let frps = Frps::start(cfg).await;
    let token = frps.client_token().await;
    let registry = &frps.state.registry;
    let public = frps.public();
    let session = || async {
        let (fake, answer) = FakeClient::register(frps.addrs.control, &token, "gpu").await;
        assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
        fake
    };
    let left = || async {
        frpx_tests::eventually("the session ends", || registry.get("gpu").is_none()).await;
    };
    // One request, waiting for the box's dial-back when `end` ends its
    // session; with no other session to take it, the caller hears its
    // client left.
    let asked_then = |end: fn(&mut FakeClient) -> Option<Command>| async move {
        let mut fake = session().await;
        let request = tokio::spawn(http::get(public, "/", Some(API_KEY)));
        assert!(matches!(
            fake.recv().await,
            Some(Command::OpenConnection { .. })
        ));
        if let Some(bye) = end(&mut fake) {
            fake.send(bye).await;
        }
        drop(fake);
        left().await;
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 502, "{}", reply.body);
        assert!(reply.body.contains("client disconnected"), "{}", reply.body);
    };
    let failures = || async {
        let fake = session().await;
        let failures = registry.get("gpu").unwrap().failures();
        drop(fake);
        left().await;
        failures
    };
    // Sessions that end idle: nothing awaited, nothing counted.
    for _ in 0..frps::registry::FAILURES_BEFORE_COOLDOWN {
        drop(session().await);
        left().await;
    }
    assert_eq!(failures().await, 0, "idle ends");
    // frpc stopping under dial-backs says so: nothing counted.
    let stop = |_: &mut FakeClient| {
        Some(Command::Disconnect {
            reason: frpc::control::STOPPING.into(),
        })
    };
    for _ in 0..frps::registry::FAILURES_BEFORE_COOLDOWN {
        asked_then(stop).await;
    }
    assert_eq!(failures().await, 0, "stops");
    // Crashes: one failure per lost session, whatever it was asked.
    let crash = |_: &mut FakeClient| None;
    asked_then(crash).await;
    assert_eq!(failures().await, 1, "one crash");
    let before = Instant::now();
    asked_then(crash).await;
    let lost_within = before.elapsed();
    let _next = session().await;
    let client = registry.get("gpu").unwrap();
    assert_eq!(client.failures(), 2, "two crashes");
    // Its cool-down (the first, 1 s) runs from the lost session's end,
    // which came between `before` and `lost_within` after it.
    let left = client
        .cooling_left(before)
        .expect("two sessions lost under dial-backs cool the box down");
    let base = frps::registry::COOLDOWN_BASE;
    assert!(
        left >= base && left <= base + lost_within,
        "cool-down ends {left:?} after the crash began ({lost_within:?} to lose it)"
    );
}

#[tokio::test]
async fn a_client_whose_service_dies_fails_over_and_cools_down() {
    let fleet = Fleet::start(1).await;
    // A second client whose service answers at registration, then dies; it
    // reports only once a minute, so frps finds out from failed requests.
    let flaky_backend = frpx_tests::Backend::start("flaky").await;
    let mut cfg = frpx_tests::frpc_config("flaky", &fleet.frps.addrs, flaky_backend.addr);
    cfg.metrics_interval = Duration::from_secs(60);
    let flaky = Frpc::start(cfg);
    fleet.frps.wait_for_clients(&["client-0", "flaky"]).await;
    flaky_backend.stop();
    drop(flaky_backend);
    for _ in 0..20 {
        let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["backend"], "client-0");
    }
    let handle = fleet.frps.state.registry.get("flaky").unwrap();
    assert!(
        handle.is_cooling_down(),
        "repeated failures put the client in a cool-down"
    );

    // Pinned to it while it cools down: spared, no retry elsewhere.
    let pinned = || async {
        let mut conn = Conn::open(fleet.frps.public()).await;
        let req = ::http::Request::builder()
            .uri("/")
            .header("host", "x")
            .header("authorization", format!("Bearer {API_KEY}"))
            .header("x-frpx-client", "flaky")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        http::read(conn.send(req).await.unwrap()).await
    };
    let reply = pinned().await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "no_healthy_clients");
    // Once the cool-down is over, pinned to the dead service: a clean 502,
    // no retry elsewhere.
    handle.record_success();
    let reply = pinned().await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    flaky.kill().await;
}

#[tokio::test]
async fn a_plain_http_service_without_a_model_list_is_healthy() {
    let frps = Frps::start_default().await;
    let backend = frpx_tests::Backend::start("plain").await;
    backend.without_model_list();
    let frpc = Frpc::connect("plain", &frps, &backend);
    frps.wait_for_clients(&["plain"]).await;
    let client = frps.state.registry.get("plain").unwrap();
    assert!(client.is_healthy());
    assert!(client.models().is_empty());
    let reply = http::get(frps.public(), "/index.html", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    frpc.kill().await;
}

#[tokio::test]
async fn two_frpc_with_one_client_id_take_turns_slowly() {
    let frps = Frps::start(frps_config()).await;
    let backend = Backend::start("b").await;
    let mut first = frpx_tests::frpc_config("twin", &frps.addrs, backend.addr);
    first.reconnect_max = Duration::from_secs(30);
    let a = Frpc::start(first);
    frps.wait_for_clients(&["twin"]).await;
    let a_session = frps.state.registry.get("twin").unwrap().session;
    let mut second = frpx_tests::frpc_config("twin", &frps.addrs, backend.addr);
    second.token_file = second.token_file.with_file_name("second-token.json");
    let b = Frpc::start(second);
    frpx_tests::eventually("the second takes the id", || {
        frps.state
            .registry
            .get("twin")
            .is_some_and(|c| c.session != a_session)
    })
    .await;
    let b_session = frps.state.registry.get("twin").unwrap().session;
    // The first waits its longest backoff (30 s) before taking it back;
    // it used to be back after its shortest (50 ms here).
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(2) {
        assert_eq!(frps.state.registry.get("twin").unwrap().session, b_session);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.kill().await;
    b.kill().await;
}

#[tokio::test]
async fn a_hung_local_service_does_not_keep_frpc_from_registering() {
    let mut cfg = frps_config();
    cfg.handshake_timeout = Duration::from_secs(1);
    let frps = Frps::start(cfg).await;
    // Accepts connections, never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let mut client = frpx_tests::frpc_config("stuck", &frps.addrs, hung_addr);
    // The probe waits longer than frps gives a handshake.
    client.connect_timeout = Duration::from_secs(2);
    let frpc = Frpc::start(client);
    frps.wait_for_clients(&["stuck"]).await;
    assert!(!frps.state.registry.get("stuck").unwrap().is_healthy());
    frpc.kill().await;
    holder.abort();
}

#[tokio::test]
async fn a_client_whose_service_is_down_gets_no_traffic() {
    let fleet = Fleet::start(1).await;
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let broken = Frpc::start(frpx_tests::frpc_config(
        "broken",
        &fleet.frps.addrs,
        dead_port,
    ));
    fleet.frps.wait_for_clients(&["broken", "client-0"]).await;
    assert!(
        !fleet
            .frps
            .state
            .registry
            .get("broken")
            .unwrap()
            .is_healthy()
    );
    for _ in 0..20 {
        let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["backend"], "client-0");
    }
    fleet.clients.into_iter().next().unwrap().kill().await;
    fleet.frps.wait_for_clients(&["broken"]).await;
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "no_healthy_clients");
    broken.kill().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_tells_clients() {
    // The watcher below never heartbeats: give it time to see the shutdown.
    let mut cfg = frps_config();
    cfg.heartbeat_interval = Duration::from_secs(30);
    let fleet = Fleet::start_with(1, cfg).await;
    let (mut watcher, _) = FakeClient::register(
        fleet.frps.addrs.control,
        &fleet.frps.client_token().await,
        "watcher",
    )
    .await;
    let mut conn = Conn::open(fleet.frps.public()).await;
    let req = http::request(
        "GET",
        fleet.frps.public(),
        "/sse",
        Some(API_KEY),
        Bytes::new(),
    );
    let resp = conn.send(req).await.unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(frpx_tests::WAIT, body.frame())
        .await
        .expect("the first event within WAIT")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from("data: first\n\n"));

    let public = fleet.frps.public();
    let state = fleet.frps.state.clone();
    let stopping = tokio::spawn(fleet.frps.stop());
    frpx_tests::eventually("the public port stops accepting", || {
        std::net::TcpStream::connect(public).is_err()
    })
    .await;
    assert!(state.shutdown.is_cancelled());
    // Client sessions last while the public port drains.
    assert!(!state.drained.is_cancelled());
    // So does the management API, which says so (and keeps serving
    // /metrics while the in-flight gauge matters most).
    let health = http::get(state.addrs.api, "/api/health", None).await;
    assert_eq!(health.status, 503, "{}", health.body);
    assert_eq!(health.json()["success"], false);
    assert_eq!(health.json()["data"]["status"], "shutting_down");
    let metrics = http::get(state.addrs.api, "/metrics", None).await;
    assert!(
        metrics.body.contains("frpx_in_flight_requests 1"),
        "{}",
        metrics.body
    );
    // The in-flight stream still completes.
    fleet.backends[0].release_sse();
    let rest = frpx_tests::whole(body).await.unwrap();
    assert_eq!(rest, Bytes::from("data: last\n\n"));
    drop(conn);
    // Then clients are told why they are dropped.
    loop {
        match watcher.recv().await {
            Some(Command::Disconnect { reason }) => {
                assert!(reason.contains("shutting down"));
                break;
            }
            Some(_) => continue,
            None => panic!("closed without a Disconnect"),
        }
    }
    assert!(state.drained.is_cancelled());
    stopping.await.unwrap();
    assert!(
        std::net::TcpStream::connect(state.addrs.api).is_err(),
        "the API closed at the end"
    );
}

#[tokio::test]
async fn dropping_a_running_server_stops_what_it_started() {
    let server = frps::Server::bind(frps_config()).await.unwrap();
    let (state, addrs) = (server.state(), server.addrs());
    let running = tokio::spawn(server.run());
    frpx_tests::eventually_async("the API serves", || async {
        http::get(addrs.api, "/api/health", None).await.status == 200
    })
    .await;
    running.abort();
    let _ = running.await;
    assert!(state.shutdown.is_cancelled() && state.hard_stop.is_cancelled());
    frpx_tests::eventually("every port closed", || {
        [addrs.control, addrs.proxy, addrs.public, addrs.api]
            .iter()
            .all(|a| std::net::TcpStream::connect(a).is_err())
    })
    .await;
}

#[tokio::test]
async fn a_machines_offline_write_outlives_the_hard_stop() {
    let mut cfg = frps_config();
    cfg.shutdown_timeout = Duration::from_millis(200);
    let fleet = Fleet::start_with(1, cfg).await;
    // A request still running at the deadline: the drain is overdue.
    let (_conn, _held) = http::start_hold(fleet.frps.public(), API_KEY).await;
    let state = fleet.frps.state.clone();
    let client = state.registry.get("client-0").unwrap();
    frpx_tests::eventually("the machine is recorded online", || {
        client.asset_written_at.lock().unwrap().is_some()
    })
    .await;
    // The box's `offline` write waits its turn past the second sessions
    // get after the deadline (a database slow with many boxes' writes).
    let writes = client.asset_writes.clone().lock_owned().await;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(writes);
    });
    let url = state.config.database_url.clone();
    let machine = fleet.frps.machine_id("client-0");
    fleet.frps.stop().await;
    // frps closed its pool: the row is read on a connection of our own.
    let store = frps::store::Store::connect(&url).await.unwrap();
    let row = store.gpu_asset(&machine).await.unwrap().unwrap();
    assert_eq!(row.status.as_deref(), Some("offline"));
}

#[tokio::test]
async fn a_caller_that_stops_reading_does_not_hold_up_shutdown() {
    let mut cfg = frps_config();
    cfg.shutdown_timeout = Duration::from_millis(300);
    cfg.heartbeat_interval = Duration::from_secs(30);
    let fleet = Fleet::start_with(1, cfg).await;
    let (mut watcher, _) = FakeClient::register(
        fleet.frps.addrs.control,
        &fleet.frps.client_token().await,
        "watcher",
    )
    .await;
    // 32 MiB echoed back to a caller that never reads: frps's writes to it
    // block once the socket buffers are full.
    let size = 32 << 20;
    let mut caller = TcpStream::connect(fleet.frps.public()).await.unwrap();
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {size}\r\n\r\n"
    );
    caller.write_all(head.as_bytes()).await.unwrap();
    caller.write_all(&vec![b'x'; size]).await.unwrap();
    let state = fleet.frps.state.clone();
    frpx_tests::eventually("the echo is under way", || {
        state
            .stats
            .bytes_out
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    })
    .await;
    let url = state.config.database_url.clone();
    let machine = fleet.frps.machine_id("client-0");
    // `stop` fails the test unless frps ends within its wait.
    fleet.frps.stop().await;
    let store = frps::store::Store::connect(&url).await.unwrap();
    // Past the deadline too, sessions clean up before connections close...
    let row = store.gpu_asset(&machine).await.unwrap().unwrap();
    assert_eq!(row.status.as_deref(), Some("offline"));
    // ... and clients hear why.
    loop {
        match watcher.recv().await {
            Some(Command::Disconnect { reason }) => {
                assert!(reason.contains("shutting down"), "{reason}");
                break;
            }
            Some(_) => continue,
            None => panic!("closed without a Disconnect"),
        }
    }
    drop(caller);
}

#[tokio::test]
async fn a_caller_that_stops_reading_loses_its_connection_and_frees_the_slot() {
    let mut cfg = frps_config();
    cfg.keepalive_timeout = Duration::from_millis(500);
    let fleet = Fleet::start_with(1, cfg).await;
    // 32 MiB echoed back to a caller that never reads.
    let size = 32 << 20;
    let mut caller = TcpStream::connect(fleet.frps.public()).await.unwrap();
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {size}\r\n\r\n"
    );
    caller.write_all(head.as_bytes()).await.unwrap();
    // The body is sent while frps echoes it; frps stops taking it once its
    // writes back are blocked, so the write may not finish.
    let body = vec![b'x'; size];
    let _ = tokio::time::timeout(Duration::from_secs(2), caller.write_all(&body)).await;
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    let in_flight = || client.in_flight.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(in_flight(), 1, "the echo holds the client's slot");
    // Past --keepalive-timeout without taking a byte, frps closes the
    // connection: the slot is back and the service's request cancelled.
    frpx_tests::eventually("the slot comes back", || in_flight() == 0).await;
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(frpx_tests::WAIT, caller.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "the connection was closed");
    assert!(sink.len() < size, "not the whole answer: {}", sink.len());
    // The client serves the next caller.
    let mut next = Conn::open(fleet.frps.public()).await;
    assert_eq!(next.get("/", Some(API_KEY)).await.status, 200);
}

#[tokio::test]
async fn a_slow_upload_does_not_count_against_the_services_answer_time() {
    let mut cfg = frps_config();
    cfg.upstream_idle_timeout = Duration::from_millis(800);
    let fleet = Fleet::start_with(1, cfg).await;
    let mut caller = TcpStream::connect(fleet.frps.public()).await.unwrap();
    // /echo answers once it has the whole body, which takes the caller
    // about 1.8 s: over the service's 800 ms, which counts from the end.
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    caller.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        caller.write_all(b"5\r\nhello\r\n").await.unwrap();
    }
    caller.write_all(b"0\r\n\r\n").await.unwrap();
    let answer = read_until(&mut caller, &"hello".repeat(6)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Reads a raw answer from `caller` until it contains `marker`.
async fn read_until(caller: &mut TcpStream, marker: &str) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains(marker) {
        let n = tokio::time::timeout(frpx_tests::WAIT, caller.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// A caller that sent `path` (`/early`, which reads the body after
/// answering, or `/early-deaf`, which never does) the first chunk of its
/// upload, and got the answer the service sends before reading the body.
async fn answered_early(fleet: &Fleet, path: &str) -> TcpStream {
    let mut caller = TcpStream::connect(fleet.frps.public()).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    );
    caller.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until(&mut caller, r#"{"early":true}"#).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    caller
}

#[tokio::test]
async fn a_connection_still_uploading_is_not_pooled() {
    let fleet = Fleet::start(1).await;
    let mut caller = answered_early(&fleet, "/early").await;
    // That connection still carries the rest of the upload: the next request
    // gets a connection of its own at once instead of waiting on it for
    // --connect-timeout.
    let connect_timeout = fleet.frps.state.config.connect_timeout;
    let since = std::time::Instant::now();
    let mut next = Conn::open(fleet.frps.public()).await;
    assert_eq!(next.get("/", Some(API_KEY)).await.status, 200);
    assert!(
        since.elapsed() < connect_timeout,
        "waited {:?} for the uploading connection",
        since.elapsed()
    );
    // The caller can still finish its upload.
    caller.write_all(b"0\r\n\r\n").await.unwrap();
}

#[tokio::test]
async fn an_answer_before_the_upload_ends_keeps_the_boxs_slot_until_it_does() {
    let fleet = Fleet::start(1).await;
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    let in_flight = || client.in_flight.load(std::sync::atomic::Ordering::SeqCst);
    let mut caller = answered_early(&fleet, "/early").await;
    // The answer is done with (counted), the upload is not: the box is
    // still at work on it.
    let addr = fleet.frps.addrs.api;
    frpx_tests::eventually_async("the answer is counted", || async {
        let text = frpx_tests::http::get(addr, "/metrics", None).await.body;
        text.lines()
            .any(|l| l.starts_with("frpx_requests_total{") && l.contains("status=\"200\""))
    })
    .await;
    assert_eq!(
        in_flight(),
        1,
        "the slot went back with the upload going on"
    );
    caller.write_all(b"0\r\n\r\n").await.unwrap();
    frpx_tests::eventually("the slot is given back", || in_flight() == 0).await;
}

#[tokio::test]
async fn an_upload_its_service_stopped_taking_after_answering_is_cut() {
    let mut cfg = frps_config();
    cfg.upstream_idle_timeout = Duration::from_secs(2);
    let fleet = Fleet::start_with(1, cfg).await;
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    let in_flight = || client.in_flight.load(std::sync::atomic::Ordering::SeqCst);
    let caller = answered_early(&fleet, "/early-deaf").await;
    // Answered, the caller keeps sending: every buffer on the way fills,
    // and the service takes nothing.
    let (mut from, mut to) = caller.into_split();
    let sending = tokio::spawn(async move {
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "u".repeat(64 * 1024));
        while to.write_all(chunk.as_bytes()).await.is_ok() {}
    });
    let mut rest = Vec::new();
    let read = tokio::time::timeout(frpx_tests::WAIT, from.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the caller's connection was kept open");
    frpx_tests::eventually("the slot is given back", || in_flight() == 0).await;
    tokio::time::timeout(frpx_tests::WAIT, sending)
        .await
        .expect("the upload is cut")
        .unwrap();
}

#[tokio::test]
async fn connections_over_the_caps_get_503_not_a_stall() {
    let mut cfg = frps_config();
    cfg.max_connections_per_ip = 2;
    let fleet = Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();
    let mut a = Conn::open(public).await;
    let mut b = Conn::open(public).await;
    assert_eq!(a.get("/", Some(API_KEY)).await.status, 200);
    assert_eq!(b.get("/", Some(API_KEY)).await.status, 200);
    // A third connection from the same address is answered at once.
    let mut c = TcpStream::connect(public).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(frpx_tests::WAIT, c.read_to_string(&mut answer))
        .await
        .expect("answered, not starved")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"));
    // One uploading a 6 MiB body (a prompt with images) reads the refusal
    // too, not a reset: what it sends is read to its end.
    let c = TcpStream::connect(public).await.unwrap();
    let (mut from, mut to) = c.into_split();
    let body = vec![b'b'; 6 << 20];
    let upload = tokio::spawn(async move {
        to.write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
        to.write_all(&body).await?;
        to.shutdown().await
    });
    let mut answer = Vec::new();
    tokio::time::timeout(frpx_tests::WAIT, from.read_to_end(&mut answer))
        .await
        .expect("answered, not starved")
        .expect("the refusal, not a reset");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    upload.await.unwrap().expect("the whole upload taken");
    // Closing one frees a place.
    drop(a);
    frpx_tests::eventually_async("a place frees up", || async {
        let mut c = TcpStream::connect(public).await.unwrap();
        c.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer).await;
        answer.starts_with("HTTP/1.1 200")
    })
    .await;
    assert_eq!(b.get("/", Some(API_KEY)).await.status, 200);
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let mut cfg = frps_config();
    cfg.max_head_bytes = 16 * 1024;
    let fleet = Fleet::start_with(1, cfg).await;
    let mut s = TcpStream::connect(fleet.frps.public()).await.unwrap();
    let huge = "x".repeat(64 * 1024);
    let _ = s
        .write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n").as_bytes())
        .await;
    let mut answer = String::new();
    let read = tokio::time::timeout(frpx_tests::WAIT, s.read_to_string(&mut answer))
        .await
        .expect("frps ends the connection, not leaves it hanging");
    match read {
        Ok(_) => assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}"),
        // Closed with part of the head unread: the kernel resets the
        // connection, which may overtake the 431.
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(fleet.backends[0].hits(), 0);
    assert_eq!(
        http::get(fleet.frps.public(), "/", Some(API_KEY))
            .await
            .status,
        200
    );
}

/// Sends a request on `conn` and reads its answer (a `Content-Length` body),
/// failing after [`frpx_tests::WAIT`].
async fn exchange(conn: &mut TcpStream, request: &str) {
    tokio::time::timeout(frpx_tests::WAIT, conn.write_all(request.as_bytes()))
        .await
        .expect("the request written within WAIT")
        .unwrap();
    let head = tokio::time::timeout(frpx_tests::WAIT, read_head(conn))
        .await
        .expect("the response head within WAIT");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; length];
    tokio::time::timeout(frpx_tests::WAIT, conn.read_exact(&mut body))
        .await
        .expect("the response body within WAIT")
        .unwrap();
}

/// Reads `conn` until frps closes it over a head that never completed:
/// a 408 or nothing, within `window_ms` milliseconds.
async fn assert_head_timed_out(conn: &mut TcpStream, window_ms: std::ops::Range<u64>) {
    let (took, answer) = until_closed(conn).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let window = Duration::from_millis(window_ms.start)..Duration::from_millis(window_ms.end);
    assert!(window.contains(&took), "{took:?} not in {window:?}");
}

/// Reads until frps closes `conn`; returns how long that took and what came.
async fn until_closed(conn: &mut TcpStream) -> (std::time::Duration, String) {
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(frpx_tests::WAIT, conn.read_to_end(&mut rest))
        .await
        .expect("closed by frps")
        .unwrap();
    (
        started.elapsed(),
        String::from_utf8_lossy(&rest).into_owned(),
    )
}

#[tokio::test]
async fn a_first_head_is_due_within_the_header_timeout_and_later_ones_within_the_keepalive_timeout()
{
    use std::time::Duration;
    let mut cfg = frps_config();
    cfg.header_timeout = Duration::from_millis(500);
    cfg.keepalive_timeout = Duration::from_millis(2000);
    let fleet = Fleet::start_with(1, cfg).await;
    let request = format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n");
    let half = &request.as_bytes()[..20];

    // Slowloris on a new connection: half a head, then silence.
    let mut slow = TcpStream::connect(fleet.frps.public()).await.unwrap();
    slow.write_all(half).await.unwrap();
    assert_head_timed_out(&mut slow, 400..1500).await;

    // Keep-alive: idle for longer than the first-head deadline between
    // requests is fine.
    let mut conn = TcpStream::connect(fleet.frps.public()).await.unwrap();
    exchange(&mut conn, &request).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    exchange(&mut conn, &request).await;
    // A later head, idle then arriving slowly, is due within the keep-alive
    // timeout of the previous response.
    tokio::time::sleep(Duration::from_millis(900)).await;
    conn.write_all(half).await.unwrap();
    assert_head_timed_out(&mut conn, 700..1800).await;

    // Idle past --keepalive-timeout: closed, nothing sent.
    let mut idle = TcpStream::connect(fleet.frps.public()).await.unwrap();
    exchange(&mut idle, &request).await;
    let (took, answer) = until_closed(&mut idle).await;
    assert!(answer.is_empty(), "{answer}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
}

/// A raw TCP "service" for fault cases. frpc's model-list probes get 404
/// (no list: healthy, no models); every other request's socket, its head
/// already read, goes to `behave`.
async fn raw_service<F, Fut>(behave: F) -> std::net::SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let behave = std::sync::Arc::new(behave);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let behave = behave.clone();
            tokio::spawn(async move {
                if is_probe(&read_head(&mut s).await) {
                    let _ = s
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                behave(s).await;
            });
        }
    });
    addr
}

/// A service that reads a request's head, then says and reads nothing
/// more, holding the connection for two minutes.
async fn silent_service() -> std::net::SocketAddr {
    raw_service(|s| async move {
        let _held = s;
        tokio::time::sleep(Duration::from_secs(120)).await;
    })
    .await
}

/// Reads a request head from `s` (up to the blank line).
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Whether a request is frpc's model-list probe (answered 404: no list).
fn is_probe(head: &str) -> bool {
    head.contains("/api/tags") || head.contains("/v1/models")
}

async fn fleet_on(service: std::net::SocketAddr, cfg: frps::Config) -> (Frps, Frpc) {
    let frps = Frps::start(cfg).await;
    let frpc = Frpc::start(frpx_tests::frpc_config("svc", &frps.addrs, service));
    frps.wait_for_clients(&["svc"]).await;
    (frps, frpc)
}

#[tokio::test]
async fn an_upload_cut_at_the_shutdown_deadline_never_reaches_the_service_as_ended() {
    // The service tells what it got of a chunked body: once its first
    // piece, then all of it when the connection ends.
    let (got, mut told) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let service = raw_service(move |mut s| {
        let got = got.clone();
        async move {
            let mut body = Vec::new();
            let mut buf = [0u8; 1024];
            let mut first = true;
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                body.extend_from_slice(&buf[..n]);
                if first && body.windows(5).any(|w| w == b"hello") {
                    first = false;
                    let _ = got.send(Vec::new());
                }
            }
            let _ = got.send(body);
        }
    })
    .await;
    let mut cfg = frps_config();
    cfg.shutdown_timeout = Duration::from_millis(200);
    let (frps, frpc) = fleet_on(service, cfg).await;
    let mut caller = TcpStream::connect(frps.public()).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    );
    caller.write_all(head.as_bytes()).await.unwrap();
    let first = tokio::time::timeout(WAIT, told.recv()).await.unwrap();
    assert_eq!(
        first,
        Some(Vec::new()),
        "the first piece reached the service"
    );
    // frps stops with the upload under way; at its deadline the caller's
    // connection is dropped: the service's body must not end as whole
    // (hyper from 1.12 ends a body whose connection is dropped with an
    // error, not a clean end, which frps's upstream would have relayed as
    // the chunked body's last chunk).
    frps.stop().await;
    let body = tokio::time::timeout(WAIT, told.recv())
        .await
        .unwrap()
        .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("hello"), "{body}");
    assert!(
        !body.contains("0\r\n\r\n"),
        "a cut body was ended: {body:?}"
    );
    drop(caller);
    frpc.kill().await;
}

/// A request a box's service got and failed on (dropped its connection)
/// goes to another box only when running it twice changes nothing: an
/// idempotent method, or a model's answer; a `POST` elsewhere or a `PATCH`
/// is answered 502 after one box. None goes again after
/// `--upstream-idle-timeout` without an answer (the caller waited that long).
#[tokio::test]
async fn only_requests_safe_to_run_twice_fail_over_once_a_service_got_them() {
    // Records each request's line; holds `/hold` unanswered, drops the rest.
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    let seen = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let head = read_head(&mut s).await;
                    if head.is_empty() {
                        return;
                    }
                    if is_probe(&head) {
                        let answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let line = head.lines().next().unwrap_or_default().to_owned();
                    let hold = line.contains("/hold");
                    seen.lock().unwrap().push(line);
                    if hold {
                        tokio::time::sleep(Duration::from_secs(120)).await;
                    }
                    return;
                }
            });
        }
    });
    for (method, path, body, boxes, status) in [
        ("GET", "/v1/things", "", 2, 502),
        ("DELETE", "/v1/files/f1", "", 2, 502),
        ("POST", "/v1/chat/completions", "{}", 2, 502),
        ("POST", "/v1/files", "{}", 1, 502),
        ("PATCH", "/v1/files/f1", "{}", 1, 502),
        ("GET", "/v1/hold", "", 1, 504),
    ] {
        let mut cfg = frps_config();
        cfg.max_retries = 2;
        cfg.upstream_idle_timeout = Duration::from_millis(500);
        let frps = Frps::start(cfg).await;
        let a = Frpc::start(frpx_tests::frpc_config("a", &frps.addrs, service));
        let b = Frpc::start(frpx_tests::frpc_config("b", &frps.addrs, service));
        frps.wait_for_clients(&["a", "b"]).await;
        got.lock().unwrap().clear();
        let mut conn = Conn::open(frps.public()).await;
        let req = http::request(
            method,
            frps.public(),
            path,
            Some(API_KEY),
            bytes::Bytes::from_static(body.as_bytes()),
        );
        let reply = http::read(conn.send(req).await.expect("an answer")).await;
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.body);
        let lines = got.lock().unwrap().clone();
        assert_eq!(lines.len(), boxes, "{method} {path}: {lines:?}");
        a.kill().await;
        b.kill().await;
    }
}

#[tokio::test]
async fn a_service_that_accepts_and_never_answers_gets_a_clean_504() {
    let service = silent_service().await;
    // With failover or without: the answer is why the last client failed,
    // not that no client is left to try (the only one is excluded).
    for retries in [0, 2] {
        let mut cfg = frps_config();
        cfg.upstream_idle_timeout = Duration::from_millis(300);
        cfg.max_retries = retries;
        let (frps, frpc) = fleet_on(service, cfg).await;
        let reply = http::get(frps.public(), "/never", Some(API_KEY)).await;
        assert_eq!(reply.status, 504, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
        frpc.kill().await;
    }
}

#[tokio::test]
async fn an_upload_the_service_stops_taking_ends_in_504_not_a_hang() {
    let service = silent_service().await;
    let mut cfg = frps_config();
    cfg.upstream_idle_timeout = Duration::from_secs(1);
    let (frps, frpc) = fleet_on(service, cfg).await;
    // A 256 MiB upload, sent for as long as anything takes it: the buffers
    // on the way fill, then nothing moves.
    let caller = TcpStream::connect(frps.public()).await.unwrap();
    let (mut from_frps, mut to_frps) = caller.into_split();
    let len = 256 << 20;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: frps\r\nauthorization: Bearer {API_KEY}\r\ncontent-length: {len}\r\n\r\n"
    );
    to_frps.write_all(head.as_bytes()).await.unwrap();
    let uploader = tokio::spawn(async move {
        let chunk = vec![b'u'; 64 << 10];
        for _ in 0..len / chunk.len() {
            if to_frps.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let answer = http::first_read(&mut from_frps, "an answer, not a hang").await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("upstream_timeout"), "{answer}");
    uploader.abort();
    frpc.kill().await;
}

/// A streamed (chunked) upload that ends with trailers has ended: a
/// service silent after it gets `--upstream-idle-timeout`, as after any
/// other body (hyper stops polling a body at its trailers, so its end was
/// never seen and the wait for an answer had no limit).
#[tokio::test]
async fn an_upload_ending_in_trailers_then_silence_ends_in_504() {
    let service = silent_service().await;
    let mut cfg = frps_config();
    cfg.upstream_idle_timeout = Duration::from_millis(500);
    let (frps, frpc) = fleet_on(service, cfg).await;
    let caller = TcpStream::connect(frps.public()).await.unwrap();
    let (mut from_frps, mut to_frps) = caller.into_split();
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: frps\r\nauthorization: Bearer {API_KEY}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
    );
    to_frps.write_all(head.as_bytes()).await.unwrap();
    // frps waits for more of the body (the upload's clock at "waiting")...
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...then it ends, with a trailer.
    to_frps.write_all(b"0\r\nx-sum: 1\r\n\r\n").await.unwrap();
    let answer = http::first_read(&mut from_frps, "an answer, not a hang").await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("upstream_timeout"), "{answer}");
    frpc.kill().await;
}

/// frps speaks HTTP/1.1 to the service whatever version the caller spoke
/// (RFC 9110 §6.2): an HTTP/1.0 caller's request does not make the service
/// close the connection after its answer (and frame it by the close).
#[tokio::test]
async fn an_http_1_0_request_goes_to_the_service_as_http_1_1() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                loop {
                    let head = read_head(&mut s).await;
                    if head.is_empty() {
                        return;
                    }
                    // The request line, as the service got it.
                    let line = head.lines().next().unwrap_or_default().to_owned();
                    let status = if is_probe(&head) {
                        "404 Not Found"
                    } else {
                        "200 OK"
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{line}",
                        line.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (frps, frpc) = fleet_on(service, frps_config()).await;
    let mut caller = TcpStream::connect(frps.public()).await.unwrap();
    let head = format!("GET /old HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n");
    caller.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, caller.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains(" 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("GET /old HTTP/1.1"), "{answer}");
    frpc.kill().await;
}

/// A service answering 101 to a request frps sent without `Upgrade` gets
/// the caller a 502, not a protocol switch without a protocol.
#[tokio::test]
async fn an_unasked_protocol_switch_is_a_502() {
    let service = raw_service(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let (frps, frpc) = fleet_on(service, frps_config()).await;
    let reply = http::get(frps.public(), "/ws", Some(API_KEY)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "upstream_failed");
    assert!(reply.body.contains("protocol switch"), "{}", reply.body);
    frpc.kill().await;
}

/// A service that answers in full, then closes with the request's body
/// unread (its kernel resets the connection), has its whole answer reach
/// the caller: frpc ends the dial-back with a close, not a reset (one
/// would make frps's kernel drop what frps has not read yet).
#[tokio::test]
async fn a_full_answer_before_the_services_reset_reaches_the_caller_whole() {
    const ANSWER: usize = 8 << 20;
    let service = raw_service(|mut s| async move {
        // The body has arrived meanwhile, unread.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {ANSWER}\r\n\r\n");
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(&vec![b'a'; ANSWER]).await;
        // Once frpc has it all, closed with the body unread: the kernel
        // resets (at once it would also throw away its own unsent bytes).
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await;
    let (frps, frpc) = fleet_on(service, frps_config()).await;
    let mut caller = TcpStream::connect(frps.public()).await.unwrap();
    let body = vec![b'u'; 16 << 10];
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: frps\r\nauthorization: Bearer {API_KEY}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    caller.write_all(head.as_bytes()).await.unwrap();
    caller.write_all(&body).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, caller.read_to_end(&mut answer))
        .await
        .expect("answered");
    let text = String::from_utf8_lossy(&answer[..answer.len().min(200)]);
    assert!(
        read.is_ok(),
        "{read:?} after {} bytes: {text}",
        answer.len()
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| answer.len() - at - 4);
    assert_eq!(body, Some(ANSWER), "the whole answer: {text}");
    frpc.kill().await;
}

#[tokio::test]
async fn a_request_the_service_drops_is_sent_twice_at_most_and_answered_502() {
    // Answers /warm on a connection and keeps it; drops the connection on
    // anything else after reading the request (as a service that crashes
    // on it, or a proxy that closes), counting how often it got it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = drops.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let head = read_head(&mut s).await;
                    if head.is_empty() {
                        return;
                    }
                    if is_probe(&head) || head.starts_with("GET /warm ") {
                        let answer: &[u8] = if is_probe(&head) {
                            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // One it works on first fails past the keep-alive race.
                    if head.starts_with("GET /work ") {
                        let past = frps::listeners::public::RACE_WINDOW;
                        tokio::time::sleep(past + Duration::from_millis(300)).await;
                    }
                    return;
                }
            });
        }
    });
    let mut cfg = frps_config();
    cfg.max_retries = 0;
    let (frps, frpc) = fleet_on(service, cfg).await;
    // Four pooled connections to the box.
    let warm = (0..4).map(|_| http::get(frps.public(), "/warm", Some(API_KEY)));
    for reply in futures_util::future::join_all(warm).await {
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let reply = http::get(frps.public(), "/drop", Some(API_KEY)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "upstream_failed");
    // Once on a pooled connection (the keep-alive race: no blame), once on
    // a new one (the client's failure); not once per pooled connection.
    assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 2);
    // One the service worked on before dropping it is not run again.
    let mut conn = Conn::open(frps.public()).await;
    assert_eq!(conn.get("/warm", Some(API_KEY)).await.status, 200);
    let reply = conn.get("/work", Some(API_KEY)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 3);
    frpc.kill().await;
}

#[tokio::test]
async fn a_pooled_connection_the_service_closes_under_a_request_is_retried_without_blame() {
    // Answers a connection's first request, then closes it when the next
    // one arrives: a service closing an idle keep-alive connection just as
    // frps reuses it.
    let service = raw_service(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        let _ = read_head(&mut s).await;
    })
    .await;
    // No failover: a request blamed on the only client would fail.
    let mut cfg = frps_config();
    cfg.max_retries = 0;
    let (frps, frpc) = fleet_on(service, cfg).await;
    let mut conn = Conn::open(frps.public()).await;
    for _ in 0..3 {
        // Every request after the first meets a pooled connection that
        // closes under it; each must still be answered.
        let reply = conn.get("/", Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body, "ok");
    }
    // A small body of announced length is read whole: it meets the pooled
    // connection closing under it and goes out again, answered.
    let reply = conn.post("/small", Some(API_KEY), vec![b's'; 1000]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, "ok");
    // A streamed body (over 64 KiB, not a routed path) cannot be sent
    // twice: it goes on a new connection, not the pooled one that would
    // close under it.
    let pooled = frps.state.registry.get("svc").unwrap().idle.len();
    assert!(pooled >= 1, "a pooled connection is there to be avoided");
    let big = vec![b'u'; frps::listeners::public::SMALL_BODY as usize + 1];
    let reply = conn.post("/upload", Some(API_KEY), big).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, "ok");
    frpc.kill().await;
}

/// A request without a body pinned (`X-Frpx-Client`) to box `to`.
fn pinned(
    public: std::net::SocketAddr,
    method: &str,
    path: &str,
    to: &str,
) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = http::request(method, public, path, Some(API_KEY), bytes::Bytes::new());
    req.headers_mut()
        .insert("x-frpx-client", to.parse().unwrap());
    req
}

/// Box `to` made busy with a held stream, so that an unpinned request goes
/// to the other box (fewest in flight); keep what comes back to keep it so.
async fn busy(
    public: std::net::SocketAddr,
    to: &str,
) -> (Conn, hyper::Response<hyper::body::Incoming>) {
    let mut holding = Conn::open(public).await;
    let held = holding
        .send(pinned(public, "GET", "/hold", to))
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    (holding, held)
}

/// A request only safe to run once (a `POST` outside the model paths),
/// sent on a pooled connection its service closes under it (the keep-alive
/// race) as its box leaves, is not sent to another box: the service may
/// have got it. 502 `upstream_unavailable`. (On the same box, still there,
/// it goes out once more: `a_pooled_connection_the_service_closes_...`.)
#[tokio::test]
async fn a_request_unsafe_to_run_twice_is_not_sent_elsewhere_after_the_keep_alive_race() {
    let frps_state =
        std::sync::Arc::new(std::sync::OnceLock::<std::sync::Arc<frps::state::State>>::new());
    let state = frps_state.clone();
    // Answers a connection's first request; at the next, its box leaves
    // and the connection closes.
    let service = raw_service(move |mut s| {
        let state = state.clone();
        async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            if read_head(&mut s).await.is_empty() {
                return;
            }
            if let Some(a) = state.get().and_then(|st| st.registry.get("a")) {
                a.kick("disconnected by an operator through the management API");
            }
        }
    })
    .await;
    let frps = Frps::start(frps_config()).await;
    let _ = frps_state.set(frps.state.clone());
    let mut cfg = frpx_tests::frpc_config("a", &frps.addrs, service);
    cfg.reconnect_min = Duration::from_secs(60);
    cfg.reconnect_max = Duration::from_secs(60);
    let a = Frpc::start(cfg);
    let other = Backend::start("b").await;
    let b = Frpc::start(frpx_tests::frpc_config("b", &frps.addrs, other.addr));
    frps.wait_for_clients(&["a", "b"]).await;
    let public = frps.public();
    // A pooled connection to a; b busy, so the next request goes to a.
    let mut warm = Conn::open(public).await;
    let reply = http::read(warm.send(pinned(public, "GET", "/", "a")).await.unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let _held = busy(public, "b").await;
    let reply = Conn::open(public)
        .await
        .post("/v1/files", Some(API_KEY), "{}")
        .await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    assert!(
        !other.paths().iter().any(|p| p == "/v1/files"),
        "sent to b: {:?}",
        other.paths()
    );
    other.release_holds();
    a.kill().await;
    b.kill().await;
}

/// After the keep-alive race, a request unsafe to run twice goes out once
/// more on its own box only: when that fails before it went out (the box
/// leaves while frps waits for its dial-back), it is answered 502, not sent
/// to another box.
#[tokio::test]
async fn after_the_keep_alive_race_an_unsafe_request_stays_with_its_box() {
    let mut cfg = frps_config();
    // The box played here sends no heartbeats.
    cfg.heartbeat_interval = Duration::from_secs(30);
    let frps = Frps::start(cfg).await;
    let (mut played, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "a").await;
    let Command::Registered { session_key, .. } = answer else {
        panic!("{answer:?}")
    };
    let other = Backend::start("b").await;
    let b = Frpc::start(frpx_tests::frpc_config("b", &frps.addrs, other.addr));
    frps.wait_for_clients(&["a", "b"]).await;
    let public = frps.public();
    // a's first request: the played box dials back and answers, and the
    // connection goes to frps's pool.
    let warming = tokio::spawn(async move {
        let mut warm = Conn::open(public).await;
        http::read(warm.send(pinned(public, "GET", "/", "a")).await.unwrap()).await
    });
    let Some(Command::OpenConnection { conn_id }) = played.recv().await else {
        panic!("no dial-back asked for");
    };
    let mut data = TcpStream::connect(frps.addrs.proxy).await.unwrap();
    let hello = Command::DataHello {
        conn_id,
        client_id: "a".into(),
        session_key: session_key.clone(),
    };
    write_command(&mut data, &hello).await.unwrap();
    read_head(&mut data).await;
    data.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap();
    assert_eq!(warming.await.unwrap().status, 200);
    // b busy with a held stream: the POST goes to a, on the pooled
    // connection, which closes under it (the race).
    let _held = busy(public, "b").await;
    let posting = tokio::spawn(async move {
        Conn::open(public)
            .await
            .post("/v1/files", Some(API_KEY), "{}")
            .await
    });
    let head = read_head(&mut data).await;
    assert!(head.starts_with("POST /v1/files "), "{head}");
    // Its body read too: the close is a clean one (FIN), as a service's
    // closing an idle connection is.
    let mut body = [0u8; 2];
    data.read_exact(&mut body).await.unwrap();
    drop(data);
    // Sent once more on a: frps asks for a new dial-back, and the box
    // leaves instead.
    match tokio::time::timeout(WAIT, played.recv()).await {
        Ok(Some(Command::OpenConnection { .. })) => {}
        other => panic!("expected a second dial-back asked for, got {other:?}"),
    }
    drop(played);
    let reply = posting.await.unwrap();
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert!(
        !other.paths().iter().any(|p| p == "/v1/files"),
        "sent to b: {:?}",
        other.paths()
    );
    other.release_holds();
    b.kill().await;
}

#[tokio::test]
async fn a_box_that_leaves_during_the_keep_alive_race_is_a_502_not_a_missing_box() {
    // The box goes offline (an operator disconnects it) just as its service
    // closes a pooled connection under a request.
    let frps_state =
        std::sync::Arc::new(std::sync::OnceLock::<std::sync::Arc<frps::state::State>>::new());
    let state = frps_state.clone();
    let service = raw_service(move |mut s| {
        let state = state.clone();
        async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            if read_head(&mut s).await.is_empty() {
                return;
            }
            if let Some(svc) = state.get().and_then(|st| st.registry.get("svc")) {
                svc.kick("disconnected by an operator through the management API");
            }
        }
    })
    .await;
    let frps = Frps::start(frps_config()).await;
    let _ = frps_state.set(frps.state.clone());
    // It stays away for the test.
    let mut cfg = frpx_tests::frpc_config("svc", &frps.addrs, service);
    cfg.reconnect_min = Duration::from_secs(60);
    cfg.reconnect_max = Duration::from_secs(60);
    let frpc = Frpc::start(cfg);
    frps.wait_for_clients(&["svc"]).await;
    let mut conn = Conn::open(frps.public()).await;
    let reply = conn.get("/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Sent on the pooled connection, which closes under it; the box is
    // gone by then: the caller hears that its box left, not that no box
    // was ever there to serve it.
    let reply = conn.get("/", Some(API_KEY)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    frpc.kill().await;
}

#[tokio::test]
async fn a_service_answering_byte_by_byte_is_streamed_through() {
    let service = raw_service(|mut s| async move {
        let body = b"slowly but surely";
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        for b in head.as_bytes().iter().chain(body.iter()) {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let (frps, frpc) = fleet_on(service, frps_config()).await;
    let reply = http::get(frps.public(), "/slow", Some(API_KEY)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "slowly but surely");
    frpc.kill().await;
}

#[tokio::test]
async fn an_answer_in_a_transfer_coding_frps_cannot_relay_is_a_clean_502() {
    // Answers every request with `transfer-encoding: <its path>, chunked`
    // (`/identity`: the old name for no coding; `/gzip`: gzip's magic in
    // the chunk), a body unless the request is a HEAD or asks for a 304.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let head = read_head(&mut s).await;
            if is_probe(&head) {
                let _ = s
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await;
                continue;
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let coding = if head.contains(" /identity ") {
                "identity"
            } else {
                "gzip"
            };
            let status = if head.contains("if-none-match") {
                "304 Not Modified"
            } else {
                "200 OK"
            };
            let mut answer =
                format!("HTTP/1.1 {status}\r\ntransfer-encoding: {coding}, chunked\r\n\r\n")
                    .into_bytes();
            if status == "200 OK" && !head.starts_with("HEAD ") {
                answer.extend_from_slice(b"4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n");
            }
            let _ = s.write_all(&answer).await;
        }
    });
    let (frps, frpc) = fleet_on(service, frps_config()).await;
    let client = frps.state.registry.online().pop().unwrap();
    for _ in 1..frps::registry::FAILURES_BEFORE_COOLDOWN {
        assert_eq!(client.record_failure(), None);
    }
    let reply = http::get(frps.public(), "/gzip", Some(API_KEY)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "unsupported_transfer_coding");
    // The service answered: the request is not sent elsewhere or again,
    // and the box's earlier failures are forgotten (one more does not
    // cool it down).
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(client.record_failure(), None);
    // Nothing to undo: relayed.
    let reply = http::get(frps.public(), "/identity", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, "\u{1f}\u{fffd}\u{8}\u{0}");
    // Answers without a body: nothing coded to pass on.
    let mut conn = Conn::open(frps.public()).await;
    let head = http::request("HEAD", frps.public(), "/gzip", Some(API_KEY), Bytes::new());
    let reply = http::read(conn.send(head).await.unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut cached = http::request("GET", frps.public(), "/gzip", Some(API_KEY), Bytes::new());
    cached
        .headers_mut()
        .insert("if-none-match", ::http::HeaderValue::from_static("\"v1\""));
    let reply = http::read(conn.send(cached).await.unwrap()).await;
    assert_eq!(reply.status, 304, "{}", reply.body);
    frpc.kill().await;
}

#[tokio::test]
async fn a_service_resetting_mid_body_gives_the_caller_a_clean_error() {
    let service = raw_service(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly part of it")
            .await;
        let _ = s.set_zero_linger();
        drop(s); // RST
    })
    .await;
    let (frps, frpc) = fleet_on(service, frps_config()).await;
    let mut conn = Conn::open(frps.public()).await;
    let req = http::request("GET", frps.public(), "/reset", Some(API_KEY), Bytes::new());
    let resp = conn.send(req).await.unwrap();
    assert_eq!(resp.status(), 200, "headers had already been sent");
    let body = frpx_tests::whole(resp.into_body()).await;
    assert!(body.is_err(), "a cut body must not look complete");
    // The server keeps serving.
    assert_eq!(frps.state.registry.len(), 1);
    frpc.kill().await;
}

/// frpc `id` on `frps` with `backend`, draining for `drain` when stopped.
fn draining(id: &str, frps: &Frps, backend: &Backend, drain: Duration) -> Frpc {
    let mut cfg = frpx_tests::frpc_config(id, &frps.addrs, backend.addr);
    cfg.shutdown_timeout = drain;
    Frpc::start(cfg)
}

/// The rest of a `/hold` body, as text, and whether it ended cleanly.
async fn rest_of(resp: hyper::Response<hyper::body::Incoming>) -> (String, bool) {
    let mut body = resp.into_body();
    let mut text = String::new();
    loop {
        match tokio::time::timeout(frpx_tests::WAIT, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    text.push_str(&String::from_utf8_lossy(d));
                }
            }
            Ok(Some(Err(_))) => return (text, false),
            Ok(None) => return (text, true),
            Err(_) => panic!("the body neither went on nor ended"),
        }
    }
}

#[tokio::test]
async fn a_stopped_frpc_lets_requests_in_flight_finish_and_takes_no_new_ones() {
    let mut tunnel = frps_config();
    tunnel.tunnel_mux = true;
    for config in [frps_config(), tunnel] {
        let frps = Frps::start(config).await;
        let backend = Backend::start("b").await;
        let frpc = draining("gpu", &frps, &backend, Duration::from_secs(60));
        frps.wait_for_clients(&["gpu"]).await;
        if frps.state.config.tunnel_mux {
            let registry = &frps.state.registry;
            frpx_tests::eventually("the tunnel connection is up", || {
                registry.get("gpu").is_some_and(|c| c.tunnel().is_some())
            })
            .await;
        }
        // A request pooled and idle, and one in flight.
        assert_eq!(
            http::get(frps.public(), "/", Some(API_KEY)).await.status,
            200
        );
        let (_conn, resp) = http::start_hold(frps.public(), API_KEY).await;

        frpc.signal();
        frps.wait_for_clients(&[]).await;
        let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 503, "no new request reaches a stopping frpc");
        assert!(!frpc.is_finished(), "frpc waits for the request in flight");
        backend.release_holds();
        let (rest, clean) = rest_of(resp).await;
        assert!(clean && rest.ends_with("done\n"), "{rest}");
        frpc.exit().await.expect("a clean exit");
    }
}

#[tokio::test]
async fn a_stopped_frpc_ends_what_is_left_at_its_shutdown_timeout() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("b").await;
    let frpc = draining("gpu", &frps, &backend, Duration::from_millis(300));
    frps.wait_for_clients(&["gpu"]).await;
    let (_conn, resp) = http::start_hold(frps.public(), API_KEY).await;
    let stopped = std::time::Instant::now();
    frpc.signal();
    frpc.exit().await.expect("a clean exit");
    assert!(stopped.elapsed() >= Duration::from_millis(300));
    let (rest, clean) = rest_of(resp).await;
    assert!(!clean && !rest.contains("done"), "{rest}");
    frpx_tests::eventually("the service sees the caller gone", || {
        backend.cancelled() == 1
    })
    .await;
}
