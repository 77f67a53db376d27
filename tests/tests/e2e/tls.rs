//! Encryption: TLS on the control and proxy ports (CA-signed or self-signed
//! and pinned), refusals that say what to change, the handshake deadline,
//! the password guard, and TLS on the public port.

use std::time::{Duration, Instant};

use bytes::Bytes;
use frpx_tests::http::{self, Conn};
use frpx_tests::tls::{TestCa, https_connect, temp_dir};
use frpx_tests::{API_KEY, Backend, Frpc, Frps, WAIT, frpc_config, frps_config};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// frps with TLS on control and proxy from a certificate of `ca` for `names`.
async fn frps_with_ca(ca: &TestCa, names: &[&str]) -> Frps {
    let cert = ca.issue("frps", names);
    let mut cfg = frps_config();
    cfg.tls_cert = Some(cert.cert);
    cfg.tls_key = Some(cert.key);
    Frps::start(cfg).await
}

/// [`https_connect`], failing after [`WAIT`].
async fn https_connect_within_wait(
    addr: std::net::SocketAddr,
    name: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>> {
    tokio::time::timeout(WAIT, https_connect(addr, name, config))
        .await
        .expect("the TLS connection (or its refusal) within WAIT")
}

/// Sends `req` on `sender` once it is ready, failing after [`WAIT`].
async fn send_within_wait(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    req: ::http::Request<http_body_util::Full<Bytes>>,
) -> ::http::Response<hyper::body::Incoming> {
    tokio::time::timeout(WAIT, async {
        sender.ready().await.unwrap();
        sender.send_request(req).await.unwrap()
    })
    .await
    .expect("the response head within WAIT")
}

/// A frpc configuration that refuses plaintext passwords (the default).
fn strict_config(id: &str, frps: &Frps, backend: &Backend) -> frpc::Config {
    let mut cfg = frpc_config(id, &frps.addrs, backend.addr);
    cfg.insecure_plaintext = false;
    cfg
}

/// Waits for frpc to give up and returns its error message.
async fn refusal(frpc: Frpc) -> String {
    let err = frpc.exit().await.expect_err("frpc must refuse to go on");
    format!("{err:#}")
}

#[tokio::test]
async fn round_trip_over_tls_with_a_ca_signed_certificate() {
    let ca = TestCa::new();
    let frps = frps_with_ca(&ca, &["localhost", "127.0.0.1"]).await;
    let backend = Backend::start("client-0").await;
    let mut cfg = strict_config("client-0", &frps, &backend);
    cfg.tls = true;
    cfg.tls_ca = Some(ca.ca_pem.clone());
    // By name: dial-backs go to the address the name had for the control
    // connection, and are still verified against the name.
    cfg.server_addr = "localhost".into();
    // The password login happens over TLS: no --insecure-plaintext needed.
    let _frpc = Frpc::start(cfg);
    frps.wait_for_clients(&["client-0"]).await;

    let mut conn = Conn::open(frps.public()).await;
    let reply = conn.get("/over-tls", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "client-0");
    // A large body crosses the TLS data connection intact, both ways.
    let payload = vec![b'y'; 300_000];
    let reply = conn.post("/echo", Some(API_KEY), payload.clone()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.as_bytes(), payload.as_slice());
    // And server-sent events still stream through TLS one by one.
    let req = http::request("GET", frps.public(), "/sse", Some(API_KEY), Bytes::new());
    let mut body = conn.send(req).await.unwrap().into_body();
    let first = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
    let first = first.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, Bytes::from("data: first\n\n"));
    backend.release_sse();
    assert_eq!(
        frpx_tests::whole(body).await.unwrap(),
        Bytes::from("data: last\n\n")
    );
}

#[tokio::test]
async fn a_self_signed_certificate_is_pinned_by_fingerprint_and_reused() {
    let dir = temp_dir("self-signed");
    let mut cfg = frps_config();
    cfg.tls_self_signed = true;
    cfg.tls_dir = Some(dir.clone());
    let frps = Frps::start(cfg.clone()).await;
    let fingerprint = frps.state.tls.fingerprint.clone().expect("fingerprint");
    assert!(dir.join(frps::tls::SELF_SIGNED_CERT).exists());
    assert!(dir.join(frps::tls::SELF_SIGNED_KEY).exists());

    let backend = Backend::start("pinned").await;
    let mut good = strict_config("pinned", &frps, &backend);
    good.tls_fingerprint = Some(frpc::config::parse_fingerprint(&fingerprint).unwrap());
    let pinned = Frpc::start(good.clone());
    frps.wait_for_clients(&["pinned"]).await;
    let reply = http::get(frps.public(), "/pinned", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "pinned");

    let mut wrong = strict_config("impostor", &frps, &backend);
    wrong.tls_fingerprint = Some([0x42; 32]);
    let message = refusal(Frpc::start(wrong)).await;
    assert!(
        message.contains("does not match --tls-fingerprint"),
        "{message}"
    );
    assert!(message.contains(&fingerprint), "{message}");
    pinned.kill().await;
    frps.stop().await;

    // The next start reuses the certificate: the pin still holds.
    let mut again = cfg;
    again.database_url = frpx_tests::temp_sqlite_url();
    let frps = Frps::start(again).await;
    assert_eq!(
        frps.state.tls.fingerprint.as_deref(),
        Some(fingerprint.as_str())
    );
    let mut good = strict_config("pinned", &frps, &backend);
    good.tls_fingerprint = Some(frpc::config::parse_fingerprint(&fingerprint).unwrap());
    let _pinned = Frpc::start(good);
    frps.wait_for_clients(&["pinned"]).await;
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let ca = TestCa::new();
    let frps = frps_with_ca(&ca, &["frps.example"]).await;
    let backend = Backend::start("named").await;
    let mut cfg = strict_config("named", &frps, &backend);
    cfg.tls_ca = Some(ca.ca_pem.clone());
    let message = refusal(Frpc::start(cfg.clone())).await;
    assert!(message.contains("not valid for the name"), "{message}");
    assert!(message.contains("--tls-server-name"), "{message}");

    // An unknown CA is refused too, saying what to pass.
    let other_ca = TestCa::new();
    let mut untrusting = cfg.clone();
    untrusting.tls_ca = Some(other_ca.ca_pem.clone());
    untrusting.tls_server_name = Some("frps.example".into());
    let message = refusal(Frpc::start(untrusting)).await;
    assert!(message.contains("unknown CA"), "{message}");

    // With the certificate's name, the same client gets in.
    cfg.tls_server_name = Some("frps.example".into());
    let _frpc = Frpc::start(cfg);
    frps.wait_for_clients(&["named"]).await;
}

/// A box that registered once is not stopped for good by a frps that
/// came back with a certificate it refuses (a bad deployment, fixed
/// later): it retries, and registers once the right one is back. At a
/// first start the same refusal stops it (above).
#[tokio::test]
async fn a_refused_certificate_after_registering_is_retried_not_fatal() {
    let ca = TestCa::new();
    let good = ca.issue("frps", &["127.0.0.1"]);
    let mut cfg = frps_config();
    cfg.tls_cert = Some(good.cert.clone());
    cfg.tls_key = Some(good.key.clone());
    cfg.database_url = frpx_tests::temp_sqlite_url();
    let frps = Frps::start(cfg.clone()).await;
    let backend = Backend::start("steady").await;
    let mut client = strict_config("steady", &frps, &backend);
    client.tls = true;
    client.tls_ca = Some(ca.ca_pem.clone());
    let frpc = Frpc::start(client);
    frps.wait_for_clients(&["steady"]).await;
    // The same ports, a certificate of a CA frpc does not trust.
    let addrs = frps.addrs;
    frps.stop().await;
    let other = TestCa::new().issue("frps", &["127.0.0.1"]);
    let mut wrong = cfg.clone();
    wrong.tls_cert = Some(other.cert);
    wrong.tls_key = Some(other.key);
    wrong.control_port = addrs.control.port();
    wrong.proxy_port = addrs.proxy.port();
    let frps = Frps::start(wrong).await;
    // Time for several refused handshakes (400 ms apart at the tests'
    // reconnect pace; the first would have stopped it), and frpc still
    // running.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!frpc.is_finished(), "frpc stopped for good");
    assert!(frps.state.registry.get("steady").is_none());
    frps.stop().await;
    // The right certificate is back: it registers.
    let mut right = cfg;
    right.control_port = addrs.control.port();
    right.proxy_port = addrs.proxy.port();
    let frps = Frps::start(right).await;
    frps.wait_for_clients(&["steady"]).await;
    frpc.kill().await;
}

#[tokio::test]
async fn plaintext_against_tls_and_tls_against_plaintext_fail_clearly() {
    let ca = TestCa::new();
    let tls_frps = frps_with_ca(&ca, &["127.0.0.1"]).await;
    let backend = Backend::start("mismatch").await;
    let plain = frpc_config("mismatch", &tls_frps.addrs, backend.addr);
    let message = refusal(Frpc::start(plain)).await;
    assert!(message.contains("requires TLS"), "{message}");
    assert!(message.contains("--tls"), "{message}");

    let plain_frps = Frps::start_default().await;
    let mut tls = frpc_config("mismatch", &plain_frps.addrs, backend.addr);
    tls.tls_ca = Some(ca.ca_pem.clone());
    let message = refusal(Frpc::start(tls)).await;
    assert!(message.contains("does not speak TLS"), "{message}");
    assert!(plain_frps.state.registry.all().is_empty());
    assert!(tls_frps.state.registry.all().is_empty());
}

#[tokio::test]
async fn a_password_is_never_sent_in_clear_without_insecure_plaintext() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("careful").await;
    let cfg = strict_config("careful", &frps, &backend);
    let message = refusal(Frpc::start(cfg.clone())).await;
    assert!(message.contains("over plaintext"), "{message}");
    assert!(message.contains("--insecure-plaintext"), "{message}");
    assert!(message.contains("--tls"), "{message}");
    // Without a password, the reason is that there is none.
    let mut none = cfg.clone();
    none.email = None;
    none.password = None;
    let message = refusal(Frpc::start(none)).await;
    assert!(message.contains("no usable saved token"), "{message}");
    assert!(!message.contains("over plaintext"), "{message}");

    // A saved token may go over plaintext (with a warning): no password is sent.
    let token = frpc::login::SavedToken {
        token: frps.client_token().await,
        expires_at: None,
        server: frps.addrs.control.to_string(),
        email: frpx_tests::TEST_EMAIL.into(),
        tls: false,
    };
    frpc::login::save(&cfg.token_file, &token).unwrap();
    let mut with_token = cfg;
    with_token.password = None;
    let _frpc = Frpc::start(with_token);
    frps.wait_for_clients(&["careful"]).await;
}

#[tokio::test]
async fn a_silent_peer_on_the_tls_control_port_is_dropped_while_others_are_served() {
    let ca = TestCa::new();
    let cert = ca.issue("frps", &["127.0.0.1"]);
    let mut cfg = frps_config();
    cfg.tls_cert = Some(cert.cert);
    cfg.tls_key = Some(cert.key);
    cfg.handshake_timeout = Duration::from_millis(400);
    let frps = Frps::start(cfg).await;

    let started = Instant::now();
    // One peer says nothing; another starts a TLS record and stalls.
    let mut silent = TcpStream::connect(frps.addrs.control).await.unwrap();
    let mut stalled = TcpStream::connect(frps.addrs.proxy).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();

    let backend = Backend::start("served").await;
    let mut good = strict_config("served", &frps, &backend);
    good.tls_ca = Some(ca.ca_pem.clone());
    let _frpc = Frpc::start(good);
    frps.wait_for_clients(&["served"]).await;
    let reply = http::get(frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    for (name, peer) in [("silent", &mut silent), ("stalled", &mut stalled)] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, peer.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the {name} peer was never dropped"));
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the {name} peer got {read:?}"
        );
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5),
        "dropped after {elapsed:?}"
    );
}

#[tokio::test]
async fn the_public_port_serves_https_to_a_client_trusting_the_certificate() {
    let ca = TestCa::new();
    let cert = ca.issue("public", &["localhost", "127.0.0.1"]);
    let mut cfg = frps_config();
    cfg.public_tls_cert = Some(cert.cert);
    cfg.public_tls_key = Some(cert.key);
    let fleet = frpx_tests::Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();

    let mut sender = https_connect_within_wait(public, "localhost", ca.client_config())
        .await
        .expect("TLS handshake with the public port");
    for path in ["/one", "/two"] {
        let req = http::request("GET", public, path, Some(API_KEY), Bytes::new());
        let reply = http::read(send_within_wait(&mut sender, req).await).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["path"], path);
    }
    // The service learns that the caller came over HTTPS.
    let seen = fleet.backends[0].seen();
    let one = seen
        .iter()
        .find(|s| s.path == "/one")
        .expect("/one reached the box");
    assert_eq!(one.headers["x-forwarded-proto"], "https");
    let req = http::request("GET", public, "/", Some("wrong-key"), Bytes::new());
    let reply = http::read(send_within_wait(&mut sender, req).await).await;
    assert_eq!(reply.status, 401);

    // A client that does not trust the certificate gets no HTTP at all.
    let stranger = TestCa::new();
    assert!(
        https_connect_within_wait(public, "localhost", stranger.client_config())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn over_the_connection_cap_an_https_caller_gets_503_in_tls() {
    let ca = TestCa::new();
    let cert = ca.issue("public", &["localhost", "127.0.0.1"]);
    let mut cfg = frps_config();
    cfg.public_tls_cert = Some(cert.cert);
    cfg.public_tls_key = Some(cert.key);
    cfg.max_connections_per_ip = 1;
    let fleet = frpx_tests::Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();
    let mut first = https_connect_within_wait(public, "localhost", ca.client_config())
        .await
        .unwrap();
    let req = http::request("GET", public, "/", Some(API_KEY), Bytes::new());
    assert_eq!(send_within_wait(&mut first, req).await.status(), 200);
    // The second connection: a 503 the HTTPS caller can read, not
    // plaintext it would take for a broken handshake.
    let mut second = https_connect_within_wait(public, "localhost", ca.client_config())
        .await
        .expect("TLS handshake though over the cap");
    let req = http::request("GET", public, "/", Some(API_KEY), Bytes::new());
    let reply = http::read(send_within_wait(&mut second, req).await).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "too_many_connections");
    assert_eq!(reply.headers["retry-after"], "1");
}
