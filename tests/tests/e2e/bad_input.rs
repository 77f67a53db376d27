//! Hostile bytes on every port: garbage, truncated frames and requests, a
//! 4 GiB length, invalid UTF-8, deeply nested JSON and forged client ids.
//! Each test keeps a bad connection open while a well-behaved caller is
//! served, and checks that caller again once the bad input is over.

use std::net::SocketAddr;
use std::time::Duration;

use common::Command;
use frpx_tests::fake::FakeClient;
use frpx_tests::http::Conn;
use frpx_tests::{API_KEY, Fleet, WAIT, frps_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// JSON nested far deeper than serde_json's recursion limit (128), still
/// well under the 64 KiB frame limit.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// How a test request ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// As written (the server closes on its own: a bad head, say).
    AsIs,
    /// With `Connection: close` added after the first line: a request the
    /// server answers and then closes the connection after.
    Close,
    /// Half-closed after writing: a body shorter than announced ends there.
    HalfClose,
}

/// Writes `bytes`, ending as `end` says, and returns everything the server
/// sends until it closes the connection.
async fn exchange(addr: SocketAddr, bytes: &[u8], end: End) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut bytes = bytes.to_vec();
    if end == End::Close
        && let Some(eol) = bytes.windows(2).position(|w| w == b"\r\n")
    {
        bytes.splice(eol + 2..eol + 2, b"Connection: close\r\n".iter().copied());
    }
    // The server may close as soon as it has seen enough.
    let _ = s.write_all(&bytes).await;
    if end == End::HalfClose {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("server kept a bad connection open: {out:?}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in `raw`.
fn status(raw: &str) -> u16 {
    raw.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {raw:?}"))
}

/// One routed request through the fleet's public port succeeds.
async fn served(public: SocketAddr) {
    let reply = Conn::open(public)
        .await
        .post(
            "/v1/chat/completions",
            Some(API_KEY),
            r#"{"model":"model-of-client-0"}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "client-0");
}

#[tokio::test]
async fn nested_json_frames_on_control_and_proxy_ports_harm_no_one_else() {
    let fleet = Fleet::start(1).await;
    let addrs = fleet.frps.addrs;
    let body = nested(30_000);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    // The same depth inside a registration that is otherwise well formed.
    let deep_meta = format!(
        r#"{{"type":"Register","client_id":"deep","machine_id":"m","hostname":"h","os":"linux","arch":"x86_64","version":"0","protocol_version":1,"metas":{}}}"#,
        nested(30_000)
    );
    for port in [addrs.control, addrs.proxy] {
        // Half a frame, left open while someone else is served.
        let mut slow = TcpStream::connect(port).await.unwrap();
        slow.write_all(&frame[..frame.len() / 2]).await.unwrap();
        served(addrs.public).await;
        slow.write_all(&frame[frame.len() / 2..]).await.unwrap();
        let rest = exchange_open(slow).await;
        assert!(!rest.contains("Registered"), "{rest}");
    }
    // After a valid login, on the control port.
    let token = fleet.frps.client_token().await;
    let mut c = FakeClient::connect(addrs.control).await;
    c.send(Command::LoginToken { token }).await;
    assert!(matches!(
        c.recv().await,
        Some(Command::LoginResult { ok: true, .. })
    ));
    let mut wr = c.writer;
    wr.write_all(&(deep_meta.len() as u32).to_be_bytes())
        .await
        .unwrap();
    wr.write_all(deep_meta.as_bytes()).await.unwrap();
    assert!(c.reader.read_command().await.unwrap_or(None).is_none());
    assert!(fleet.frps.state.registry.get("deep").is_none());
    served(addrs.public).await;
}

/// Reads from an already written connection until the server closes it.
async fn exchange_open(mut s: TcpStream) -> String {
    let mut out = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await {
        Ok(_) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => panic!("server kept a bad connection open"),
    }
}

#[tokio::test]
async fn a_client_id_stays_its_accounts_while_its_owner_is_offline() {
    let fleet = Fleet::start(0).await;
    let frps = &fleet.frps;
    let owner_token = frps.client_token().await;
    let (owner, answer) = FakeClient::register(frps.addrs.control, &owner_token, "gpu-x").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    drop(owner);
    let state = frps.state.clone();
    let registry = &state.registry;
    frpx_tests::eventually("the owner is gone", || registry.get("gpu-x").is_none()).await;

    // Another account, while the owner is away.
    let squatter = frps.other_account_token("squatter@example.com").await;
    let (_squatter, answer) = FakeClient::register(frps.addrs.control, &squatter, "gpu-x").await;
    match answer {
        Command::RegisterRefused { reason, retry } => {
            assert!(reason.contains("belongs to another account"), "{reason}");
            assert!(!retry);
        }
        other => panic!("expected RegisterRefused, got {other:?}"),
    }
    assert!(registry.get("gpu-x").is_none());

    // The owner comes back to its id.
    let (back, answer) = FakeClient::register(frps.addrs.control, &owner_token, "gpu-x").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    drop(back);
    frpx_tests::eventually("the owner is gone again", || {
        registry.get("gpu-x").is_none()
    })
    .await;

    // Released by the operator, the id goes to the next account.
    assert!(frps.state.store.release_client_id("gpu-x").await.unwrap());
    let (_new_owner, answer) = FakeClient::register(frps.addrs.control, &squatter, "gpu-x").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
}

#[tokio::test]
async fn an_account_past_its_client_ids_cannot_claim_another() {
    let mut config = frps_config();
    config.max_client_ids = 2;
    let fleet = Fleet::start_with(0, config).await;
    let frps = &fleet.frps;
    let token = frps.client_token().await;
    let registered = |id: &'static str| {
        let token = token.clone();
        async move {
            let (client, answer) = FakeClient::register(frps.addrs.control, &token, id).await;
            (client, answer)
        }
    };
    let (_one, answer) = registered("gpu-1").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let (_two, answer) = registered("gpu-2").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let (_three, answer) = registered("gpu-3").await;
    match answer {
        Command::RegisterRefused { reason, retry } => {
            assert!(reason.contains("limit of 2 client ids"), "{reason}");
            assert!(reason.contains("--max-client-ids"), "{reason}");
            assert!(!retry, "waiting does not make room");
        }
        other => panic!("expected RegisterRefused, got {other:?}"),
    }
    assert!(frps.state.registry.get("gpu-3").is_none());
    assert_eq!(
        frps.state.store.client_id_owner("gpu-3").await.unwrap(),
        None
    );
    // An id it holds still registers (a new session of the box).
    let (_again, answer) = registered("gpu-1").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
}

/// frpc reports its models and health only when they change: a report
/// that changes nothing, however often repeated, does not end a failure
/// cool-down (nor wake the queues); a real change does.
#[tokio::test]
async fn a_models_report_ends_a_cool_down_only_as_the_service_back_up_once() {
    use common::protocol::ModelInfo;
    let fleet = Fleet::start(0).await;
    let frps = &fleet.frps;
    let (mut c, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "gpu-m").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let model = |name: &str| ModelInfo {
        name: name.into(),
        size: None,
    };
    // Handled in order: once the heartbeat's answer is back, so is all
    // that came before it.
    let mut seq = 0;
    let mut report = async |c: &mut FakeClient, models: Vec<ModelInfo>, service_up: bool| {
        c.send(Command::ModelsUpdate { models, service_up }).await;
        seq += 1;
        c.send(Command::Heartbeat { seq }).await;
        loop {
            match c.recv().await {
                Some(Command::HeartbeatAck { seq: acked }) if acked == seq => break,
                Some(_) => {}
                None => panic!("frps closed the session"),
            }
        }
    };
    report(&mut c, vec![model("a:latest")], true).await;
    let client = frps.state.registry.get("gpu-m").expect("registered");
    assert_eq!(client.models(), vec![model("a:latest")]);
    // Failures enough for the longest cool-down (60 s).
    for _ in 0..10 {
        client.record_failure();
    }
    assert!(client.is_cooling_down());
    for _ in 0..50 {
        report(&mut c, vec![model("a:latest")], true).await;
    }
    assert!(
        client.is_cooling_down(),
        "an unchanged report ended the cool-down"
    );
    // Nor does a change of models (a box could flip them for ever).
    for n in 0..10 {
        let models = (0..=n % 2).map(|i| model(&format!("m{i}"))).collect();
        report(&mut c, models, true).await;
    }
    assert!(client.is_cooling_down(), "a change of models ended it");
    assert_eq!(client.models().len(), 2);
    // The service back up ends it, once: the box's next failure cools it
    // down again, and flipping its health does not end that one.
    report(&mut c, vec![model("a:latest")], false).await;
    assert!(!client.is_healthy());
    report(&mut c, vec![model("a:latest")], true).await;
    assert!(!client.is_cooling_down(), "the service back up ends it");
    assert!(client.record_failure().is_some(), "cooled down again");
    for up in [false, true, false, true] {
        report(&mut c, vec![model("a:latest")], up).await;
    }
    assert!(
        client.is_cooling_down(),
        "flipping its health ended it again"
    );
    // A request served ends it.
    client.record_success();
    assert!(!client.is_cooling_down());
}

/// An id the operator released while its previous owner is still online:
/// the new owner's box is told to retry (not to give up), and gets in once
/// that session ends.
#[tokio::test]
async fn a_released_id_still_in_use_is_retried_until_its_old_session_ends() {
    let fleet = Fleet::start(0).await;
    let frps = &fleet.frps;
    let (old, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "gpu-r").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    assert!(frps.state.store.release_client_id("gpu-r").await.unwrap());
    let heir = frps.other_account_token("heir@example.com").await;
    let (_early, answer) = FakeClient::register(frps.addrs.control, &heir, "gpu-r").await;
    match answer {
        Command::RegisterRefused { reason, retry } => {
            assert!(reason.contains("still live"), "{reason}");
            assert!(retry, "the box must not give up: {reason}");
        }
        other => panic!("expected RegisterRefused, got {other:?}"),
    }
    let registry = &frps.state.registry;
    let live = registry.get("gpu-r").expect("the old session stays");
    assert_eq!(
        live.owner.user_id, frps.user_id,
        "still the first account's"
    );
    drop(old);
    frpx_tests::eventually("the old session is gone", || {
        registry.get("gpu-r").is_none()
    })
    .await;
    let (_heir, answer) = FakeClient::register(frps.addrs.control, &heir, "gpu-r").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
}

#[tokio::test]
async fn a_registration_under_another_accounts_client_id_is_refused() {
    let fleet = Fleet::start(1).await;
    let frps = &fleet.frps;
    let before = frps.state.registry.get("client-0").expect("registered");
    // A second provider account, logged in properly, claims client-0.
    let intruder = frps.other_account_token("intruder@example.com").await;
    let (_intruder, answer) = FakeClient::register(frps.addrs.control, &intruder, "client-0").await;
    match answer {
        Command::RegisterRefused { reason, retry } => {
            assert!(reason.contains("another account"), "{reason}");
            assert!(!retry);
        }
        other => panic!("expected RegisterRefused, got {other:?}"),
    }
    let after = frps
        .state
        .registry
        .get("client-0")
        .expect("still registered");
    assert_eq!(
        after.session, before.session,
        "the real client-0 was kicked"
    );
    // Set at the kick itself: no wait for the session's end needed.
    assert_eq!(before.kick_reason(), None, "the real client-0 was kicked");
    served(frps.public()).await;

    // Ids that are not ids at all, from the legitimate account.
    let token = frps.client_token().await;
    for forged in [
        "",
        "client-0/../admin",
        "client-0\u{0}",
        "client 0",
        "clïent-0",
        &"x".repeat(10_000),
    ] {
        let (_c, answer) = FakeClient::register(frps.addrs.control, &token, forged).await;
        assert!(
            matches!(answer, Command::RegisterRefused { retry: false, .. }),
            "{forged:?}: {answer:?}"
        );
    }
    // Nor machine ids and hostnames that are not text (stored, logged and
    // shown by the API).
    let long = "m".repeat(256);
    for (machine, host) in [
        ("", "box"),
        ("machine\u{0}", "box"),
        (long.as_str(), "box"),
        ("machine-x", "box\nINFO forged log line"),
        ("machine-x", long.as_str()),
    ] {
        let registration = common::protocol::Registration {
            client_id: "client-x".into(),
            machine_id: machine.into(),
            hostname: host.into(),
            protocol_version: common::protocol::PROTOCOL_VERSION,
            ..Default::default()
        };
        let (_c, answer) = FakeClient::register_as(frps.addrs.control, &token, registration).await;
        assert!(
            matches!(answer, Command::RegisterRefused { retry: false, .. }),
            "{machine:?} {host:?}: {answer:?}"
        );
    }
    assert_eq!(frps.state.registry.all().len(), 1);
    served(frps.public()).await;
}

/// The start of a TLS ClientHello, then bytes no HTTP parser accepts.
const TLS_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\xff\r\n\r\n";

/// A raw request head (and body) with `key` as the Bearer key.
fn raw_post(path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n{extra}\r\n"
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_501_and_reaches_no_box() {
    let fleet = Fleet::start(1).await;
    let public = fleet.frps.public();
    // hyper undoes the chunking of `gzip, chunked` and would pass the
    // gzip bytes on as a plain body.
    for coding in ["gzip, chunked", "gzip,chunked", "deflate, chunked"] {
        let post = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: {coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let raw = exchange(public, post.as_bytes(), End::Close).await;
        assert_eq!(status(&raw), 501, "{coding}: {raw}");
        assert!(raw.contains("unsupported_transfer_coding"), "{raw}");
        // Without a key, the key is what is wrong.
        let keyless = post.replace(&format!("Authorization: Bearer {API_KEY}\r\n"), "");
        let raw = exchange(public, keyless.as_bytes(), End::Close).await;
        assert_eq!(status(&raw), 401, "{coding}: {raw}");
    }
    assert!(
        fleet.backends[0]
            .seen()
            .iter()
            .all(|s| s.path != "/v1/chat/completions"),
        "nothing reached the box"
    );
    // Chunked alone goes through, in any case.
    let post = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let raw = exchange(public, post.as_bytes(), End::Close).await;
    assert_eq!(status(&raw), 200, "{raw}");
    assert!(raw.contains("hello"), "{raw}");
    served(public).await;
}

#[tokio::test]
async fn absolute_targets_and_connect_reach_no_other_host() {
    let fleet = Fleet::start(1).await;
    let public = fleet.frps.public();
    let absolute = format!(
        "GET http://admin.internal/secret?x=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n"
    );
    let raw = exchange(public, absolute.as_bytes(), End::Close).await;
    assert_eq!(status(&raw), 200, "{raw}");
    let seen = fleet.backends[0].seen();
    let secret = seen
        .iter()
        .find(|s| s.path == "/secret")
        .expect("forwarded");
    assert_eq!(secret.target, "/secret?x=1", "sent in origin form");
    // Its host is the target's (RFC 9112 §3.2.2), passed on as the caller's;
    // the service's Host stays its own.
    assert_eq!(secret.headers["x-forwarded-host"], "admin.internal");
    let service = fleet.backends[0].addr.to_string();
    assert_eq!(secret.headers["host"], service.as_str());
    // With a port and user information: host and port, as sent.
    let absolute = format!(
        "GET http://u:p@admin.internal:8443/port HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n"
    );
    let raw = exchange(public, absolute.as_bytes(), End::Close).await;
    assert_eq!(status(&raw), 200, "{raw}");
    let seen = fleet.backends[0].seen();
    let port = seen.iter().find(|s| s.path == "/port").expect("forwarded");
    assert_eq!(port.headers["x-forwarded-host"], "admin.internal:8443");
    assert_eq!(port.headers["host"], service.as_str());
    let connect = format!(
        "CONNECT admin.internal:22 HTTP/1.1\r\nHost: admin.internal:22\r\nAuthorization: Bearer {API_KEY}\r\n\r\n"
    );
    let raw = exchange(public, connect.as_bytes(), End::Close).await;
    assert_eq!(status(&raw), 405, "{raw}");
    assert!(raw.contains("method_not_allowed"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("allow: get, head, post, put, patch, delete, options\r\n"),
        "{raw}"
    );
    // Nor is a request echoed back.
    let trace = format!(
        "TRACE /secret HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nCookie: s=1\r\n\r\n"
    );
    let raw = exchange(public, trace.as_bytes(), End::Close).await;
    assert_eq!(status(&raw), 405, "{raw}");
    assert!(raw.contains("TRACE is not supported"), "{raw}");
    assert!(
        fleet.backends[0]
            .seen()
            .iter()
            .all(|s| !s.target.contains("admin.internal"))
    );
}

#[tokio::test]
async fn options_stop_where_max_forwards_runs_out() {
    let fleet = Fleet::start(1).await;
    let public = fleet.frps.public();
    let options = |left: &str| {
        format!(
            "OPTIONS /probe-{left} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nMax-Forwards: {left}\r\n\r\n"
        )
    };
    // 0: frps is the final recipient and answers itself.
    let raw = exchange(public, options("0").as_bytes(), End::Close).await;
    assert_eq!(status(&raw), 200, "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("content-length: 0\r\n"),
        "{raw}"
    );
    assert!(
        raw.to_ascii_lowercase()
            .contains("allow: get, head, post, put, patch, delete, options\r\n"),
        "{raw}"
    );
    // More: forwarded with one less.
    let raw = exchange(public, options("3").as_bytes(), End::Close).await;
    assert_eq!(status(&raw), 200, "{raw}");
    let seen = fleet.backends[0].seen();
    assert!(seen.iter().all(|s| s.path != "/probe-0"), "not forwarded");
    let probe = seen
        .iter()
        .find(|s| s.path == "/probe-3")
        .expect("forwarded");
    assert_eq!(probe.headers["max-forwards"], "2");
    // The key is still checked first.
    let raw = exchange(
        public,
        b"OPTIONS / HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n\r\n",
        End::Close,
    )
    .await;
    assert_eq!(status(&raw), 401, "{raw}");
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_at_the_keepalive_timeout() {
    let mut cfg = frps_config();
    cfg.keepalive_timeout = Duration::from_millis(500);
    let fleet = Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();
    // Routed (read whole by frps), small (read whole too) and streamed
    // (over 64 KiB, forwarded as it comes). The streamed one several times:
    // were the box blamed, it would cool down.
    let streamed = "Content-Length: 100000\r\n";
    for (path, length) in [
        ("/v1/chat/completions", "Content-Length: 100\r\n"),
        ("/echo", "Content-Length: 100\r\n"),
        ("/echo", streamed),
        ("/echo", streamed),
        ("/echo", streamed),
        ("/echo", streamed),
    ] {
        let mut s = TcpStream::connect(public).await.unwrap();
        let head = raw_post(path, length, b"{\"model\":");
        s.write_all(&head).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
        let raw = String::from_utf8_lossy(&out);
        assert!(read.is_ok(), "{path}: still open");
        assert_eq!(status(&raw), 408, "{path}: {raw}");
        assert!(raw.contains("request_timeout"), "{path}: {raw}");
    }
    // The box was not blamed for the caller's silence.
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    assert!(!client.is_cooling_down());
    served(public).await;
}

#[tokio::test]
async fn a_streamed_upload_that_keeps_trickling_is_cut_at_the_upload_timeout() {
    let mut cfg = frps_config();
    cfg.upload_timeout = Duration::from_secs(1);
    let fleet = Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();
    for length in [
        "Content-Length: 100000\r\n",
        "Transfer-Encoding: chunked\r\n",
    ] {
        let mut s = TcpStream::connect(public).await.unwrap();
        let chunked = length.starts_with("Transfer");
        s.write_all(&raw_post("/echo", length, b"")).await.unwrap();
        // A byte every 100 ms: never a gap, never an end.
        let sent = std::time::Instant::now();
        let (mut rd, mut wr) = s.into_split();
        let trickle = tokio::spawn(async move {
            let piece: &[u8] = if chunked { b"1\r\nx\r\n" } else { b"x" };
            while wr.write_all(piece).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, rd.read(&mut buf))
                .await
                .expect("an answer before WAIT")
                .unwrap();
            assert!(n > 0, "closed without an answer");
            out.extend_from_slice(&buf[..n]);
        }
        trickle.abort();
        let raw = String::from_utf8_lossy(&out);
        assert_eq!(status(&raw), 408, "{length}: {raw}");
        assert!(raw.contains("--upload-timeout"), "{length}: {raw}");
        assert!(sent.elapsed() >= Duration::from_secs(1), "{length}");
    }
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    assert!(
        !client.is_cooling_down(),
        "the caller's slowness, not the box's"
    );
    served(public).await;
}

#[tokio::test]
async fn a_fast_upload_to_a_service_reading_slowly_is_not_cut_at_the_upload_timeout() {
    let mut cfg = frps_config();
    cfg.upload_timeout = Duration::from_millis(500);
    let fleet = Fleet::start_with(1, cfg).await;
    // 32 MiB the caller sends at once and the service takes in 2 s: more
    // than the buffers on the way hold, so frps waits on the service.
    let body = "x".repeat(32 << 20);
    let started = std::time::Instant::now();
    let reply = Conn::open(fleet.frps.public())
        .await
        .post("/slow-read?ms=1", Some(API_KEY), body)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["read"], 32 << 20);
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "the service was slow"
    );
}

#[tokio::test]
async fn a_get_with_a_chunked_body_reaches_the_service_with_it() {
    let fleet = Fleet::start(1).await;
    let public = fleet.frps.public();
    let get = format!(
        "GET /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let raw = exchange(public, get.as_bytes(), End::Close).await;
    assert_eq!(status(&raw), 200, "{raw}");
    assert!(raw.ends_with("\r\n\r\nhello"), "{raw}");
}

#[tokio::test]
async fn bodies_held_in_memory_have_a_total_cap_and_a_deadline() {
    let mut cfg = frps_config();
    cfg.max_buffered_bodies = 100_000;
    cfg.max_body = 100_000;
    cfg.body_timeout = Duration::from_secs(1);
    let fleet = Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();
    // Bodies that keep coming, each piece under --keepalive-timeout, are
    // cut at --body-timeout however long they announce themselves.
    let mut slow = TcpStream::connect(public).await.unwrap();
    let head = raw_post(
        "/v1/chat/completions",
        "Content-Length: 90000\r\n",
        &[b' '; 80_000],
    );
    let head_sent = std::time::Instant::now();
    slow.write_all(&head).await.unwrap();
    let budget = fleet.frps.state.body_budget.clone();
    frpx_tests::eventually("frps holds the slow body's 80 kB", || {
        budget.available_permits() <= 20_000
    })
    .await;
    // 80 kB held: a second body that would take frps past 100 kB waits for
    // nothing, it is refused at once (and one that fits is served).
    let padded = |n: usize| async move {
        let body = format!(
            r#"{{"model":"model-of-client-0","pad":"{}"}}"#,
            "x".repeat(n)
        );
        Conn::open(public)
            .await
            .post("/v1/chat/completions", Some(API_KEY), body)
            .await
    };
    let reply = padded(30_000).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "server_busy");
    assert_eq!(reply.headers.get("retry-after").unwrap(), "1");
    served(public).await;
    // The slow one ends at its deadline (it is still sending: no gap), and
    // its share is given back.
    let mut out = Vec::new();
    let (mut rd, mut wr) = slow.split();
    let cut = async {
        loop {
            tokio::select! {
                read = rd.read_buf(&mut out) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    let _ = wr.write_all(b" ").await;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, cut)
        .await
        .expect("the slow body was cut");
    let raw = String::from_utf8_lossy(&out);
    assert_eq!(status(&raw), 408, "{raw}");
    assert!(
        raw.contains("did not arrive within 1s (--body-timeout)"),
        "{raw}"
    );
    // Cut at its deadline (1 s after the head), not before it.
    assert!(
        head_sent.elapsed() >= Duration::from_secs(1),
        "cut after {:?}",
        head_sent.elapsed()
    );
    let reply = padded(90_000).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test]
async fn large_announced_bodies_sent_a_byte_at_a_time_hold_little_of_the_budget() {
    const MIB: usize = 1 << 20;
    let mut cfg = frps_config();
    cfg.max_body = 10 * MIB;
    cfg.max_buffered_bodies = 20 * MIB;
    let fleet = Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();
    let budget = fleet.frps.state.body_budget.clone();
    // Two bodies announcing 10 MiB each, of which two bytes come.
    let mut held = Vec::new();
    for n in 1..=2 {
        let mut s = TcpStream::connect(public).await.unwrap();
        let head = raw_post("/v1/chat/completions", "Content-Length: 10485760\r\n", b"{");
        s.write_all(&head).await.unwrap();
        frpx_tests::eventually("the first byte held", || {
            budget.available_permits() < 20 * MIB - (n - 1) * (64 << 10)
        })
        .await;
        s.write_all(b"\"").await.unwrap();
        frpx_tests::eventually("the second byte joined", || {
            budget.available_permits() <= 20 * MIB - n * (64 << 10)
        })
        .await;
        held.push(s);
    }
    // They hold 64 KiB each (room for the whole 10 MiB emptied the budget).
    assert_eq!(budget.available_permits(), 20 * MIB - 2 * (64 << 10));
    served(public).await;
}

#[tokio::test]
async fn bad_requests_on_the_public_port_harm_no_one_else() {
    let fleet = Fleet::start(1).await;
    let public = fleet.frps.public();
    // A truncated head, left open while someone else is served.
    let mut slow = TcpStream::connect(public).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthor")
        .await
        .unwrap();
    served(public).await;

    let pinned = |id: &[u8]| {
        let mut r = raw_post("/v1/chat/completions", "Content-Length: 2\r\n", b"{}");
        let at = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
        let header = [b"X-Frpx-Client: ", id, b"\r\n"].concat();
        r.splice(at..at, header);
        r
    };
    let body = format!(r#"{{"model":"model-of-client-0","x":{}}}"#, nested(50_000));
    let deep = raw_post(
        "/v1/chat/completions",
        &format!("Content-Length: {}\r\n", body.len()),
        body.as_bytes(),
    );
    let cases: Vec<(&str, Vec<u8>, End, u16, &str)> = vec![
        ("garbage", TLS_HELLO.to_vec(), End::AsIs, 400, ""),
        (
            "truncated body",
            raw_post(
                "/v1/chat/completions",
                "Content-Length: 100\r\n",
                b"{\"model\"",
            ),
            End::HalfClose,
            400,
            "bad_body",
        ),
        // Refused on the announced length: nothing is read or buffered.
        (
            "4 GiB body",
            raw_post(
                "/v1/chat/completions",
                "Content-Length: 4294967296\r\n",
                b"{\"model\":",
            ),
            End::AsIs,
            413,
            "body_too_large",
        ),
        (
            "length overflow",
            raw_post(
                "/v1/chat/completions",
                "Content-Length: 18446744073709551616\r\n",
                b"",
            ),
            End::AsIs,
            400,
            "",
        ),
        (
            "invalid utf-8 key",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"
                .to_vec(),
            End::Close,
            401,
            "missing_api_key",
        ),
        (
            "invalid utf-8 path",
            b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            End::Close,
            400,
            "",
        ),
        // Not JSON, so no model to route on: any client serves it.
        (
            "invalid utf-8 body",
            raw_post(
                "/v1/chat/completions",
                "Content-Length: 13\r\n",
                b"{\"model\":\"\xff\"}",
            ),
            End::Close,
            200,
            "client-0",
        ),
        (
            "invalid utf-8 pin",
            pinned(b"\xff\xfe"),
            End::Close,
            400,
            "bad_client_id",
        ),
        (
            "forged pin",
            pinned(b"client-0.evil"),
            End::Close,
            404,
            "client_not_found",
        ),
        // Too deep to read a model from: routed like a body without one.
        ("nested json body", deep, End::Close, 200, "client-0"),
    ];
    for (what, bytes, end, code, needle) in cases {
        let raw = exchange(public, &bytes, end).await;
        assert_eq!(status(&raw), code, "{what}: {raw}");
        assert!(raw.contains(needle), "{what}: {raw}");
    }
    drop(slow);
    served(public).await;
}

#[tokio::test]
async fn bad_requests_on_the_management_api_harm_no_one_else() {
    let fleet = Fleet::start(1).await;
    let api = fleet.frps.addrs.api;
    let mut slow = TcpStream::connect(api).await.unwrap();
    slow.write_all(b"GET /api/clients HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let reply = Conn::open(api).await.get("/api/clients", None).await;
    assert_eq!(reply.status, 200);
    // Deep, but within the API's 1 KiB body limit (past it: 413, below).
    let body = nested(500);
    let deep = [
        format!(
            "GET /api/clients HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
        body.as_bytes(),
    ]
    .concat();
    let too_long = [
        &b"GET /api/clients HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1025\r\n\r\n"[..],
        &[b'x'; 1025],
    ]
    .concat();
    let cases: Vec<(&str, Vec<u8>, End, u16, &str)> = vec![
        ("garbage", TLS_HELLO.to_vec(), End::AsIs, 400, ""),
        (
            "truncated body",
            b"DELETE /api/clients/nobody HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{".to_vec(),
            End::HalfClose,
            400,
            "could not be read",
        ),
        (
            "4 GiB body",
            b"DELETE /api/clients/nobody HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4294967296\r\n\r\n{".to_vec(),
            End::AsIs,
            413,
            "limited to",
        ),
        ("invalid utf-8 path", b"GET /api/clients/\xff\xfe HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(), End::Close, 400, ""),
        (
            "invalid utf-8 escaped",
            b"GET /api/clients/%FF%FE HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            End::Close,
            400,
            "Invalid UTF-8",
        ),
        // Without --admin-token the header is not looked at.
        (
            "invalid utf-8 header",
            b"GET /api/clients HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\r\n\r\n".to_vec(),
            End::Close,
            200,
            "client-0",
        ),
        (
            "forged id",
            b"DELETE /api/clients/client-0%2F..%2Fclient-0 HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            End::Close,
            404,
            "not online",
        ),
        (
            "forged id with NUL",
            b"DELETE /api/clients/client-0%00 HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            End::Close,
            404,
            "not online",
        ),
        ("nested json body", deep, End::Close, 200, "client-0"),
        ("body over 1 KiB", too_long, End::Close, 413, "limited to"),
    ];
    for (what, bytes, end, code, needle) in cases {
        let raw = exchange(api, &bytes, end).await;
        assert_eq!(status(&raw), code, "{what}: {raw}");
        assert!(raw.contains(needle), "{what}: {raw}");
    }
    // axum's own refusals come in the envelope too, their headers kept.
    let refusals: [(&[u8], u16, &str); 3] = [
        (
            b"GET /api/clients/%FF%FE HTTP/1.1\r\nHost: localhost\r\n\r\n",
            400,
            "Invalid UTF-8",
        ),
        (
            b"PUT /api/clients HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
            405,
            "method not allowed",
        ),
        (
            b"GET /api/users?limit=many HTTP/1.1\r\nHost: localhost\r\n\r\n",
            400,
            "limit",
        ),
    ];
    for (bytes, code, needle) in refusals {
        let raw = exchange(api, bytes, End::Close).await;
        assert_eq!(status(&raw), code, "{raw}");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
        let json: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {raw}"));
        assert_eq!(json["success"], false, "{raw}");
        let message = json["message"].as_str().unwrap();
        assert!(!message.is_empty() && message.contains(needle), "{raw}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{raw}"
        );
        if code == 405 {
            assert!(head.to_ascii_lowercase().contains("allow: "), "{raw}");
        }
    }
    drop(slow);
    assert!(fleet.frps.state.registry.get("client-0").is_some());
    served(fleet.frps.public()).await;
}

/// One frame carrying `body` (length first), as a newer frps might send.
fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

#[tokio::test]
async fn frpc_skips_commands_it_does_not_know_during_the_handshake() {
    use common::codec::{FrameReader, write_command};
    // A newer frps: before each handshake reply it sends a command this
    // frpc does not know. frpc must skip it, not take it for a wrong reply
    // and reconnect for ever.
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = frps::BoundAddrs {
        control: control.local_addr().unwrap(),
        proxy: control.local_addr().unwrap(),
        public: control.local_addr().unwrap(),
        api: control.local_addr().unwrap(),
    };
    let backend = frpx_tests::Backend::start("box").await;
    let frpc = frpx_tests::Frpc::start(frpx_tests::frpc_config("box", &addrs, backend.addr));
    let (conn, _) = tokio::time::timeout(WAIT, control.accept())
        .await
        .expect("frpc dials")
        .unwrap();
    let (rd, mut wr) = tokio::io::split(conn);
    let mut reader = FrameReader::new(rd, common::MAX_FRAME);
    let newer = frame_of(br#"{"type":"ServerNotice","detail":{"text":"hello"}}"#);
    let next = async |reader: &mut FrameReader<_>| {
        tokio::time::timeout(WAIT, reader.read_command())
            .await
            .expect("a command in time")
            .unwrap()
            .expect("not closed")
    };
    assert!(matches!(next(&mut reader).await, Command::Login { .. }));
    wr.write_all(&newer).await.unwrap();
    write_command(
        &mut wr,
        &Command::LoginResult {
            ok: true,
            token: Some("frpxc_newer_frps_test_token".into()),
            expires_at: None,
            reason: None,
            code: None,
            retry_after_ms: None,
        },
    )
    .await
    .unwrap();
    let Command::Register(registration) = next(&mut reader).await else {
        panic!("expected Register after the login");
    };
    wr.write_all(&newer).await.unwrap();
    write_command(
        &mut wr,
        &Command::Registered {
            client_id: registration.client_id.clone(),
            session_key: "k".into(),
            heartbeat_interval_ms: 60_000,
            mux: false,
        },
    )
    .await
    .unwrap();
    // Registered: frpc reports on this connection (its metrics every
    // second here), and never dials again.
    loop {
        match next(&mut reader).await {
            Command::SystemInfo(_) => break,
            Command::Heartbeat { .. } | Command::ModelsUpdate { .. } => continue,
            other => panic!("unexpected {}", other.name()),
        }
    }
    let again = tokio::time::timeout(Duration::from_millis(300), control.accept()).await;
    assert!(again.is_err(), "frpc reconnected");
    frpc.kill().await;
}

// Two workers: the flood is written while frps reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_frames_without_pause_still_hears_its_commands() {
    let fleet = Fleet::start(0).await;
    let frps = &fleet.frps;
    let (fake, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "flood").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let FakeClient { mut reader, writer } = fake;
    // Frames frps takes without answering, written as fast as it reads.
    let json = br#"{"type":"NoSuchCommand"}"#;
    let mut frame = (json.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(json);
    let burst = frame.repeat(4096);
    let flooding = tokio::spawn(async move {
        let mut writer = writer;
        while writer.write_all(&burst).await.is_ok() {}
    });
    let request = tokio::spawn(frpx_tests::http::get(frps.public(), "/", Some(API_KEY)));
    // The dial-back request reaches the box while the frames keep coming.
    let heard = tokio::time::timeout(WAIT, reader.read_command())
        .await
        .expect("frps's command within WAIT");
    assert!(
        matches!(heard, Ok(Some(Command::OpenConnection { .. }))),
        "{heard:?}"
    );
    assert!(!flooding.is_finished(), "still flooding");
    flooding.abort();
    request.abort();
}

#[tokio::test]
async fn a_client_keeps_at_most_so_many_models_of_sane_names() {
    use common::protocol::ModelInfo;
    use frps::registry::{MAX_MODEL_NAME, MAX_MODELS};
    let model = |name: String| ModelInfo { name, size: None };
    // Names that are not names first, then more than frps keeps.
    let announced = |prefix: &str| {
        let mut models = vec![
            model(String::new()),
            model("x".repeat(MAX_MODEL_NAME + 1)),
            model("bad\nname".into()),
        ];
        models.extend((0..MAX_MODELS + 500).map(|i| model(format!("{prefix}-{i:05}"))));
        models
    };
    let frps = frpx_tests::Frps::start(frps_config()).await;
    let registration = common::Registration {
        client_id: "many".into(),
        machine_id: "machine-many".into(),
        protocol_version: common::PROTOCOL_VERSION,
        models: announced("reg"),
        ..Default::default()
    };
    let (mut c, answer) =
        FakeClient::register_as(frps.addrs.control, &frps.client_token().await, registration).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let client = frps.state.registry.get("many").expect("registered");
    let kept = client.models();
    assert_eq!(kept.len(), MAX_MODELS);
    assert_eq!(kept[0].name, "reg-00000", "the first ones kept, in order");
    assert_eq!(
        kept[MAX_MODELS - 1].name,
        format!("reg-{:05}", MAX_MODELS - 1)
    );
    assert!(client.registration.models.is_empty(), "kept once");
    // So with a report.
    c.send(Command::ModelsUpdate {
        models: announced("upd"),
        service_up: true,
    })
    .await;
    c.send(Command::Heartbeat { seq: 1 }).await;
    while c.recv().await != Some(Command::HeartbeatAck { seq: 1 }) {}
    let kept = client.models();
    assert_eq!(kept.len(), MAX_MODELS);
    assert_eq!(kept[0].name, "upd-00000");
}

/// An answer frps gives without reading the request's body (401 for a
/// wrong key, 413 for an announced length over `--max-body`) reaches a
/// caller that sends its whole body before reading, as HTTP clients do:
/// frps reads the rest away before it closes. Closing with bytes unread
/// resets the connection, which fails the caller's write and can destroy
/// the answer on its way.
#[tokio::test]
async fn an_answer_before_the_body_survives_the_body_sent_after_it() {
    let mut cfg = frps_config();
    cfg.max_body = 1024 * 1024;
    let frps = frpx_tests::Frps::start(cfg).await;
    let len = 4 * 1024 * 1024;
    let (public, api) = (frps.public(), frps.addrs.api);
    let cases = [
        (
            public,
            "/v1/chat/completions",
            "Bearer wrong-key".to_owned(),
            401,
            "invalid_api_key",
        ),
        (
            public,
            "/v1/chat/completions",
            format!("Bearer {API_KEY}"),
            413,
            "body_too_large",
        ),
        // The management API likewise.
        (
            api,
            "/api/users",
            "Bearer wrong-token".to_owned(),
            413,
            "request bodies are limited",
        ),
    ];
    for (addr, path, auth, status, code) in cases {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        );
        // The whole request first, then the answer.
        let sent = async {
            wr.write_all(head.as_bytes()).await?;
            let chunk = vec![b' '; 64 * 1024];
            for _ in 0..len / chunk.len() {
                wr.write_all(&chunk).await?;
            }
            std::io::Result::Ok(())
        };
        tokio::time::timeout(WAIT, sent)
            .await
            .expect("sent in time")
            .unwrap_or_else(|e| panic!("{status}: the body could not be sent: {e}"));
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, rd.read_to_end(&mut answer))
            .await
            .expect("answered in time")
            .unwrap_or_else(|e| panic!("{status}: the answer could not be read: {e}"));
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
        assert!(answer.contains(code), "{answer}");
    }
}

/// An HTTP/1.1 request names its `Host` exactly once (RFC 9112 §3.2): none,
/// or two, is a 400 before anything else; an HTTP/1.0 request may leave it
/// out.
#[tokio::test]
async fn a_request_without_one_host_is_a_400() {
    let fleet = Fleet::start(1).await;
    let public = fleet.frps.public();
    let ask = |head: String| async move {
        let mut s = TcpStream::connect(public).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let auth = format!("Authorization: Bearer {API_KEY}\r\nConnection: close\r\n");
    for head in [
        format!("GET / HTTP/1.1\r\n{auth}\r\n"),
        format!("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n{auth}\r\n"),
        format!("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n{auth}\r\n"),
    ] {
        let answer = ask(head.clone()).await;
        assert!(answer.contains(" 400 Bad Request\r\n"), "{head}: {answer}");
        assert!(answer.contains("bad_host"), "{head}: {answer}");
    }
    for head in [
        format!("GET / HTTP/1.1\r\nHost: a\r\n{auth}\r\n"),
        format!("GET / HTTP/1.0\r\n{auth}\r\n"),
    ] {
        let answer = ask(head.clone()).await;
        assert!(answer.contains(" 200 OK\r\n"), "{head}: {answer}");
    }
}

/// Peers that stop partway through the plain control and proxy ports'
/// handshakes are dropped at `--handshake-timeout` while a box is served:
/// one that logs in and never registers, one that says nothing, one that
/// sends half a frame.
#[tokio::test]
async fn peers_stalling_in_the_plain_handshakes_are_dropped_while_others_are_served() {
    let mut cfg = frps_config();
    cfg.handshake_timeout = Duration::from_millis(400);
    let fleet = Fleet::start_with(1, cfg).await;
    let frps = &fleet.frps;
    let started = std::time::Instant::now();
    let mut logged_in = FakeClient::connect(frps.addrs.control).await;
    logged_in
        .send(Command::LoginToken {
            token: frps.client_token().await,
        })
        .await;
    match logged_in.recv().await {
        Some(Command::LoginResult { ok: true, .. }) => {}
        other => panic!("expected a login, got {other:?}"),
    }
    let silent = TcpStream::connect(frps.addrs.control).await.unwrap();
    let mut half = TcpStream::connect(frps.addrs.proxy).await.unwrap();
    // A frame announcing 100 bytes, with 10 of them.
    half.write_all(&100u32.to_be_bytes()).await.unwrap();
    half.write_all(b"{\"type\":\"D").await.unwrap();
    served(frps.public()).await;
    let stalled = |mut s: TcpStream| async move {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                // An error frame before the close is fine.
                Ok(Ok(_)) => continue,
            }
        }
    };
    assert!(stalled(silent).await, "the silent peer was dropped");
    assert!(stalled(half).await, "the half frame's peer was dropped");
    // The logged-in peer that never registers: closed too.
    let ended =
        tokio::time::timeout(WAIT, async { while logged_in.recv().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the peer that never registered was dropped");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5),
        "dropped after {elapsed:?}"
    );
}

/// The per-address connection cap holds on the control and proxy ports
/// too: connections over it are closed at once (not at the handshake's
/// deadline), while the ones under it stay open.
#[tokio::test]
async fn connections_over_the_per_address_cap_on_the_control_and_proxy_ports_are_closed() {
    let mut cfg = frps_config();
    cfg.max_connections_per_ip = 2;
    cfg.handshake_timeout = Duration::from_secs(30);
    let frps = frpx_tests::Frps::start(cfg).await;
    for port in [frps.addrs.control, frps.addrs.proxy] {
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(port).await.unwrap());
        }
        let mut over = TcpStream::connect(port).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, over.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{port}: the connection over the cap stayed open"));
        assert!(matches!(read, Ok(0) | Err(_)), "{port}: {read:?}");
        // The two under it are still open.
        for s in &mut held {
            let open = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
            assert!(
                open.is_err(),
                "{port}: a connection under the cap was closed"
            );
        }
    }
}
