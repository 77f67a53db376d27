//! frp-compatible server plugins, against a real plugin HTTP server: what
//! each operation sends, rejections, modified content, chaining, failures,
//! and the seed's configuration files.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Command, PROTOCOL_VERSION, Registration};
use frps::plugins::PluginSpec;
use frpx_tests::fake::FakeClient;
use frpx_tests::http::{self, Conn};
use frpx_tests::plugin::{PLUGIN_PATH, PluginCall, PluginServer, Reply};
use frpx_tests::{API_KEY, Backend, Fleet, Frpc, Frps, frpc_config, frps_config};
use serde_json::{Value, json};

/// The management API token of the tests that read `/api/clients`.
const ADMIN: &str = "plugins-admin-token";

/// frps with `plugins` (and a plugin timeout of `timeout`).
async fn frps_with(plugins: Vec<PluginSpec>, timeout: Duration) -> Frps {
    let mut cfg = frps_config();
    cfg.plugins = plugins;
    cfg.plugin_timeout = timeout;
    Frps::start(cfg).await
}

/// Logs in with a fresh token and sends `reg`; returns frps's answer.
async fn register(frps: &Frps, reg: Registration) -> (FakeClient, Command) {
    let mut c = FakeClient::connect(frps.addrs.control).await;
    c.send(Command::LoginToken {
        token: frps.client_token().await,
    })
    .await;
    assert!(
        matches!(c.recv().await, Some(Command::LoginResult { ok: true, .. })),
        "the account login passes before any plugin is asked"
    );
    c.send(Command::Register(reg)).await;
    let answer = c.recv().await.expect("an answer to the registration");
    (c, answer)
}

fn registration(id: &str) -> Registration {
    Registration {
        client_id: id.into(),
        machine_id: format!("machine-{id}"),
        hostname: "gpu-host".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        version: "0.1.0".into(),
        protocol_version: PROTOCOL_VERSION,
        user: "fake".into(),
        metas: [("token".to_owned(), "fake".to_owned())].into(),
        ..Default::default()
    }
}

fn refusal(answer: &Command) -> (&str, bool) {
    match answer {
        Command::RegisterRefused { reason, retry } => (reason.as_str(), *retry),
        other => panic!("expected RegisterRefused, got {other:?}"),
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

fn metas(pairs: &[(&str, &str)]) -> Value {
    let map: BTreeMap<&str, &str> = pairs.iter().copied().collect();
    json!(map)
}

#[tokio::test]
async fn every_operation_is_called_with_frps_documented_fields() {
    let plugin = PluginServer::allow_all().await;
    let all = [
        "Login",
        "NewProxy",
        "CloseProxy",
        "Ping",
        "NewWorkConn",
        "NewUserConn",
    ];
    let frps = frps_with(vec![plugin.spec("audit", &all)], Duration::from_secs(3)).await;
    let backend = Backend::start("gpu-a").await;
    let mut cfg = frpc_config("gpu-a", &frps.addrs, backend.addr);
    cfg.user = "fake".into();
    cfg.metas = vec![
        ("token".into(), "fake".into()),
        ("version".into(), "1.0.0".into()),
    ];
    cfg.proxy_metas = vec![("id".into(), "123".into())];
    let frpc = Frpc::start(cfg);
    frps.wait_for_clients(&["gpu-a"]).await;
    let run_id = frps
        .state
        .registry
        .get("gpu-a")
        .expect("registered")
        .session
        .to_string();

    let reply = http::get(frps.public(), "/through-the-tunnel", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "gpu-a");
    plugin.wait_for("Ping").await;
    frpc.kill().await;
    plugin.wait_for("CloseProxy").await;

    let calls = plugin.calls();
    let mut reqids = HashSet::new();
    for call in &calls {
        assert_eq!(call.path, PLUGIN_PATH);
        assert_eq!(call.query, format!("version=0.1.0&op={}", call.op()));
        assert_eq!(call.body["version"], "0.1.0");
        assert_eq!(keys(&call.body), ["content", "op", "version"]);
        assert!(call.content_type.starts_with("application/json"));
        assert_eq!(call.authorization, "", "no credentials configured");
        assert!(!call.reqid.is_empty(), "X-Frp-Reqid is set");
        assert!(
            reqids.insert(call.reqid.clone()),
            "X-Frp-Reqid is unique per call"
        );
    }
    let user = json!({
        "user": "fake",
        "metas": metas(&[("token", "fake"), ("version", "1.0.0")]),
        "run_id": run_id,
    });

    let login = plugin.wait_for("Login").await;
    let c = login.content();
    assert_eq!(
        keys(c),
        [
            "arch",
            "client_address",
            "hostname",
            "metas",
            "os",
            "pool_count",
            "privilege_key",
            "run_id",
            "timestamp",
            "user",
            "version"
        ]
    );
    assert_eq!(c["user"], "fake");
    assert_eq!(c["metas"], user["metas"]);
    assert_eq!(c["run_id"], run_id);
    assert_eq!(c["privilege_key"], "");
    assert_eq!(c["pool_count"], 0);
    assert_eq!(c["version"], env!("CARGO_PKG_VERSION"));
    for field in ["hostname", "os", "arch"] {
        assert!(!c[field].as_str().unwrap().is_empty(), "{field}");
    }
    assert!(c["timestamp"].as_i64().unwrap() > 1_600_000_000);
    assert!(
        c["client_address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    let proxy = plugin.wait_for("NewProxy").await;
    let c = proxy.content();
    assert_eq!(
        keys(c),
        [
            "custom_domains",
            "group",
            "group_key",
            "headers",
            "host_header_rewrite",
            "http_pwd",
            "http_user",
            "locations",
            "metas",
            "multiplexer",
            "proxy_name",
            "proxy_type",
            "remote_port",
            "sk",
            "subdomain",
            "use_compression",
            "use_encryption",
            "user"
        ]
    );
    assert_eq!(c["user"], user);
    assert_eq!(c["proxy_name"], "gpu-a");
    assert_eq!(c["proxy_type"], "http");
    assert_eq!(c["metas"], metas(&[("id", "123")]));
    assert_eq!(c["use_encryption"], false);
    assert_eq!(c["custom_domains"], json!([]));
    assert_eq!(c["locations"], json!([]));
    assert_eq!(c["group"], "");

    let ping = plugin.wait_for("Ping").await;
    let c = ping.content();
    assert_eq!(keys(c), ["privilege_key", "timestamp", "user"]);
    assert_eq!(c["user"], user);
    assert_eq!(c["privilege_key"], "");
    assert!(c["timestamp"].as_i64().unwrap() > 1_600_000_000);

    let work = plugin.wait_for("NewWorkConn").await;
    let c = work.content();
    assert_eq!(keys(c), ["privilege_key", "run_id", "timestamp", "user"]);
    assert_eq!(c["user"], user);
    assert_eq!(c["run_id"], run_id);

    let user_conn = plugin.wait_for("NewUserConn").await;
    let c = user_conn.content();
    assert_eq!(keys(c), ["proxy_name", "proxy_type", "remote_addr", "user"]);
    assert_eq!(c["user"], user);
    assert_eq!(c["proxy_name"], "gpu-a");
    assert_eq!(c["proxy_type"], "http");
    assert!(c["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"));

    let close = plugin.wait_for("CloseProxy").await;
    let c = close.content();
    assert_eq!(keys(c), ["proxy_name", "user"]);
    assert_eq!(c["user"], user);
    assert_eq!(c["proxy_name"], "gpu-a");

    // Login comes first, then NewProxy; CloseProxy last.
    let ops: Vec<&str> = calls.iter().map(PluginCall::op).collect();
    assert_eq!(&ops[..2], ["Login", "NewProxy"]);
    assert_eq!(ops.last(), Some(&"CloseProxy"));
}

#[tokio::test]
async fn a_client_that_left_while_plugins_decided_is_not_registered() {
    let plugin = PluginServer::start(|_| Reply::AllowAfter(Duration::from_millis(500))).await;
    let frps = frps_with(
        vec![plugin.spec("slow", &["NewProxy"])],
        Duration::from_secs(3),
    )
    .await;
    let changes = *frps.state.registry.subscribe().borrow();
    let mut c = FakeClient::connect(frps.addrs.control).await;
    c.send(Command::LoginToken {
        token: frps.client_token().await,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(Command::LoginResult { ok: true, .. })
    ));
    // frps's own tasks plus this connection's.
    let with_connection = frps.state.tasks.len();
    c.send(Command::Register(registration("quitter"))).await;
    plugin.wait_for("NewProxy").await;
    // Gives up while the plugin is still thinking.
    drop(c);
    frpx_tests::eventually("frps is done with the connection", || {
        frps.state.tasks.len() == with_connection - 1
    })
    .await;
    assert_eq!(
        *frps.state.registry.subscribe().borrow(),
        changes,
        "never registered (not even briefly)"
    );
    let asset = frps.state.store.gpu_asset("machine-quitter").await.unwrap();
    assert!(asset.is_none(), "{asset:?}");
}

#[tokio::test]
async fn frpc_waits_for_plugins_that_answer_within_their_timeout() {
    // Login and NewProxy each take 3 s of their 5 s: 6 s together, longer
    // than frps's own 5 s frame deadline.
    let plugin = PluginServer::start(|_| Reply::AllowAfter(Duration::from_secs(3))).await;
    let frps = frps_with(
        vec![plugin.spec("slow", &["Login", "NewProxy"])],
        Duration::from_secs(5),
    )
    .await;
    let backend = Backend::start("b").await;
    let frpc = Frpc::start(frpc_config("patient", &frps.addrs, backend.addr));
    frps.wait_for_clients(&["patient"]).await;
    assert_eq!(
        plugin.calls_for("NewProxy").len(),
        1,
        "registered at the first try"
    );
    frpc.kill().await;
}

#[tokio::test]
async fn a_login_rejection_reaches_frpc_which_stops_with_the_reason() {
    let plugin = PluginServer::start(|call| {
        if call.content()["user"] == "fake" {
            Reply::Reject("user fake is not allowed".into())
        } else {
            Reply::Allow
        }
    })
    .await;
    let frps = frps_with(
        vec![plugin.spec("user-manager", &["Login"])],
        Duration::from_secs(3),
    )
    .await;
    let backend = Backend::start("b").await;
    let mut cfg = frpc_config("gpu-a", &frps.addrs, backend.addr);
    cfg.user = "fake".into();
    let err = Frpc::start(cfg)
        .exit()
        .await
        .expect_err("a rejected frpc stops");
    assert!(
        err.to_string().contains("user fake is not allowed"),
        "frpc prints the plugin's reason: {err}"
    );
    assert!(frps.state.registry.is_empty());

    // Another user passes the same plugin.
    let mut cfg = frpc_config("gpu-b", &frps.addrs, backend.addr);
    cfg.user = "alice".into();
    let alice = Frpc::start(cfg);
    frps.wait_for_clients(&["gpu-b"]).await;
    alice.kill().await;
}

#[tokio::test]
async fn a_new_proxy_rejection_refuses_the_registration_and_stops_the_chain() {
    let first = PluginServer::start(|_| Reply::Reject("proxy name gpu-x is reserved".into())).await;
    let second = PluginServer::allow_all().await;
    let frps = frps_with(
        vec![
            first.spec("first", &["NewProxy"]),
            second.spec("second", &["NewProxy"]),
        ],
        Duration::from_secs(3),
    )
    .await;
    let (mut c, answer) = register(&frps, registration("gpu-x")).await;
    assert_eq!(refusal(&answer), ("proxy name gpu-x is reserved", false));
    assert!(c.recv().await.is_none(), "the connection closes");
    assert!(frps.state.registry.is_empty());
    assert!(
        second.calls().is_empty(),
        "plugins after a rejection are not asked"
    );
}

#[tokio::test]
async fn a_go_plugins_untagged_answer_rejects_and_modifies_as_under_frp() {
    // A Go plugin whose response struct has no JSON tags writes its field
    // names capitalised; frp's Go reads them in any case.
    let plugin = PluginServer::start(|call| match call.op() {
        "Login" => Reply::Json(json!({
            "Unchange": false,
            "Content": {"User": "mapped", "Metas": {"Tier": "gold"}},
        })),
        _ => Reply::Json(json!({"Reject": true, "REJECT_REASON": "reserved id"})),
    })
    .await;
    let frps = frps_with(
        vec![plugin.spec("go", &["Login", "NewProxy"])],
        Duration::from_secs(3),
    )
    .await;
    let (mut c, answer) = register(&frps, registration("gpu-x")).await;
    assert_eq!(refusal(&answer), ("reserved id", false));
    assert!(c.recv().await.is_none(), "the connection closes");
    assert!(frps.state.registry.is_empty());
    // NewProxy saw Login's modification under frp's field names.
    let proxy = plugin.wait_for("NewProxy").await;
    assert_eq!(proxy.content()["user"]["user"], "mapped");
    assert_eq!(proxy.content()["user"]["metas"]["Tier"], "gold");
}

#[tokio::test]
async fn a_redirect_on_the_plugins_own_address_is_followed_as_frp_does() {
    // A Flask plugin at `/handler/` answers `/handler` with a 308.
    let plugin = PluginServer::start(|call| match call.path.as_str() {
        "/handler/" => Reply::Reject("from the right path".into()),
        path if path.starts_with("/loop") => Reply::Redirect(307, format!("{path}x")),
        "/elsewhere" => Reply::Redirect(308, "http://plugin.example:9000/handler/".into()),
        _ => Reply::Redirect(308, format!("/handler/?{}", call.query)),
    })
    .await;
    let spec = |path: &str| {
        PluginSpec::new("flask", &plugin.addr.to_string(), path, &["NewProxy"]).unwrap()
    };
    let frps = frps_with(vec![spec("/handler")], Duration::from_secs(3)).await;
    let (_c, answer) = register(&frps, registration("gpu-r")).await;
    assert_eq!(refusal(&answer), ("from the right path", false));
    let calls = plugin.calls();
    let paths: Vec<&str> = calls.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, ["/handler", "/handler/"]);
    assert_eq!(calls[1].query, calls[0].query, "the query goes along");
    assert_eq!(calls[1].body, calls[0].body, "the call is sent again whole");
    // Another address is not followed; nor is a redirect loop, for ever.
    for (path, calls, why) in [
        (
            "/elsewhere",
            1,
            "to http://plugin.example:9000/handler/, which frps does not follow",
        ),
        (
            "/loop",
            1 + frps::plugins::MAX_REDIRECTS,
            "to /loopxxxxxx, which frps does not follow",
        ),
    ] {
        let before = plugin.calls().len();
        let frps = frps_with(vec![spec(path)], Duration::from_secs(3)).await;
        let (_c, answer) = register(&frps, registration("gpu-r")).await;
        let (reason, retry) = refusal(&answer);
        assert!(retry, "a failure, not a rejection");
        assert!(reason.contains(why), "{reason}");
        assert_eq!(plugin.calls().len() - before, calls, "{path}");
    }
}

#[tokio::test]
async fn a_user_conn_rejection_answers_403_with_the_reason() {
    let plugin = PluginServer::start(|_| Reply::Reject("monthly quota exceeded".into())).await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("quota", &["NewUserConn"])];
    let fleet = Fleet::start_with(1, cfg).await;
    let reply = http::get(fleet.frps.public(), "/v1/chat/completions", Some(API_KEY)).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let err = &reply.json()["error"];
    assert_eq!(err["message"], "monthly quota exceeded");
    assert_eq!(err["type"], "permission_error");
    assert_eq!(err["code"], "rejected_by_plugin");
    assert_eq!(fleet.backends[0].hits(), 0, "nothing reaches the GPU box");
    // Unauthenticated requests never reach the plugin.
    let before = plugin.calls().len();
    assert_eq!(http::get(fleet.frps.public(), "/", None).await.status, 401);
    assert_eq!(plugin.calls().len(), before);
}

#[tokio::test]
async fn a_caller_gone_while_a_user_conn_plugin_decides_frees_the_slot_at_once() {
    let plugin = PluginServer::start(|_| Reply::AllowAfter(Duration::from_secs(60))).await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("slow", &["NewUserConn"])];
    cfg.plugin_timeout = Duration::from_secs(60);
    let fleet = Fleet::start_with(1, cfg).await;
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    // An upload still coming (its body is streamed, so frps watches its
    // socket for the caller leaving).
    let mut caller = tokio::net::TcpStream::connect(fleet.frps.public())
        .await
        .unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut caller, head.as_bytes())
        .await
        .unwrap();
    plugin.wait_for("NewUserConn").await;
    assert_eq!(
        client.in_flight.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    drop(caller);
    frpx_tests::eventually("the slot is given back, not at the plugin timeout", || {
        client.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(fleet.backends[0].hits(), 0, "nothing reached the box");
}

#[tokio::test]
async fn a_ping_rejection_disconnects_the_client_with_the_reason() {
    let plugin = PluginServer::start(|_| Reply::Reject("this box is suspended".into())).await;
    let frps = frps_with(
        vec![plugin.spec("pinger", &["Ping"])],
        Duration::from_secs(3),
    )
    .await;
    let (mut c, answer) = register(&frps, registration("gpu-p")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let (reason, saw_ack) = disconnected_after_a_heartbeat(&mut c).await;
    assert_eq!(reason, "this box is suspended");
    assert!(saw_ack);
    frps.wait_for_clients(&[]).await;
}

/// Sends a heartbeat on `c` and reads until frps disconnects it: the
/// reason, and whether the heartbeat was acknowledged first.
async fn disconnected_after_a_heartbeat(c: &mut FakeClient) -> (String, bool) {
    c.send(Command::Heartbeat { seq: 1 }).await;
    let mut saw_ack = false;
    loop {
        match c.recv().await {
            Some(Command::HeartbeatAck { seq: 1 }) => saw_ack = true,
            Some(Command::Disconnect { reason }) => return (reason, saw_ack),
            other => panic!("expected an ack, then Disconnect; got {other:?}"),
        }
    }
}

/// A `Ping` plugin that fails (not a rejection) disconnects the box too,
/// with the failure as the reason; a rejection without a reason gets the
/// default one naming the plugin.
#[tokio::test]
async fn a_ping_failure_disconnects_and_a_reasonless_rejection_names_the_plugin() {
    let plugin = PluginServer::start(|call| match call.op() {
        "Ping" => Reply::Status(500),
        _ => Reply::Reject(String::new()),
    })
    .await;
    let frps = frps_with(
        vec![
            plugin.spec("pinger", &["Ping"]),
            plugin.spec("gate", &["NewProxy"]),
        ],
        Duration::from_secs(3),
    )
    .await;
    let (_refused, answer) = register(&frps, registration("gpu-r")).await;
    let (reason, retry) = refusal(&answer);
    assert_eq!(reason, "rejected by server plugin 'gate'");
    assert!(!retry);
    let frps = frps_with(
        vec![plugin.spec("pinger", &["Ping"])],
        Duration::from_secs(3),
    )
    .await;
    let (mut c, answer) = register(&frps, registration("gpu-q")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let (reason, _) = disconnected_after_a_heartbeat(&mut c).await;
    assert_eq!(
        reason,
        "server plugin 'pinger' failed on Ping: answered HTTP 500 Internal Server Error"
    );
    frps.wait_for_clients(&[]).await;
}

#[tokio::test]
async fn a_work_conn_rejection_refuses_the_data_connection_without_blaming_the_box() {
    let refuse = Arc::new(AtomicBool::new(true));
    let refusing = refuse.clone();
    let plugin = PluginServer::start(move |_| {
        if refusing.load(Ordering::SeqCst) {
            Reply::Reject("no work connections today".into())
        } else {
            Reply::Allow
        }
    })
    .await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("work", &["NewWorkConn"])];
    let fleet = Fleet::start_with(1, cfg).await;
    let started = Instant::now();
    // More refusals than the failures that cool a box down.
    for _ in 0..4 {
        let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        let error = &reply.json()["error"];
        assert_eq!(error["code"], "plugin_unavailable", "{}", reply.body);
        // The plugin's word is for the operator's log, not for callers.
        assert!(!reply.body.contains("work connections"), "{}", reply.body);
    }
    assert!(
        started.elapsed() < fleet.frps.state.config.connect_timeout,
        "the requests fail at once, not at the dial-back timeout"
    );
    assert_eq!(fleet.backends[0].hits(), 0);
    assert_eq!(fleet.frps.state.pending.len(), 0);
    // The box was not at fault: once the plugin allows its connections,
    // it serves at once (no cool-down).
    refuse.store(false, Ordering::SeqCst);
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test]
async fn a_user_and_password_in_addr_are_sent_as_basic_auth() {
    let plugin = PluginServer::start(|_| Reply::Allow).await;
    // As frp's Go client reads such an address: percent-decoded, Basic.
    let addr = format!("http://op%40lab:s3cr%3At@{}", plugin.addr);
    let spec = PluginSpec::new("guarded", &addr, PLUGIN_PATH, &["Login"]).unwrap();
    assert_eq!(spec.addr, plugin.addr.to_string());
    assert!(!format!("{spec:?}").contains("s3cr"), "{spec:?}");
    let frps = frps_with(vec![spec], Duration::from_secs(3)).await;
    let (_c, answer) = register(&frps, registration("gpu-basic")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let call = plugin.wait_for("Login").await;
    // base64("op@lab:s3cr:t")
    assert_eq!(call.authorization, "Basic b3BAbGFiOnMzY3I6dA==");
}

#[tokio::test]
async fn a_work_conn_plugin_refusing_every_box_costs_a_request_its_retries_only() {
    // A plugin refusing every data connection (down, slow or by policy):
    // a request tries as many boxes as its retries allow, not all of them.
    let plugin = PluginServer::start(|_| Reply::Reject("closed".into())).await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("work", &["NewWorkConn"])];
    let retries = cfg.max_retries;
    let fleet = Fleet::start_with(retries + 3, cfg).await;
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "plugin_unavailable");
    assert_eq!(plugin.calls_for("NewWorkConn").len(), retries + 1);
    for client in fleet.frps.state.registry.all() {
        assert!(!client.is_cooling_down(), "{} blamed", client.id);
    }
}

/// A `NewWorkConn` plugin slower than `--connect-timeout`: the box dialed
/// back in time, and the wait that ran out is the plugins', not the box's:
/// 503 `plugin_unavailable`, the box neither blamed nor cooled down (it
/// was answered 504 `client_timeout`, the box counted as failing).
#[tokio::test]
async fn a_work_conn_plugin_slower_than_the_connect_timeout_does_not_blame_the_box() {
    let plugin = PluginServer::start(|_| Reply::AllowAfter(Duration::from_secs(2))).await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("slow", &["NewWorkConn"])];
    cfg.connect_timeout = Duration::from_millis(500);
    cfg.plugin_timeout = Duration::from_secs(5);
    let fleet = Fleet::start_with(1, cfg).await;
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    for _ in 0..3 {
        let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "plugin_unavailable");
    }
    assert!(!plugin.calls_for("NewWorkConn").is_empty());
    assert_eq!(client.failures(), 0);
    assert!(!client.is_cooling_down());
}

#[tokio::test]
async fn unchange_may_be_a_boolean_or_a_string() {
    let plugin = PluginServer::start(|call| match call.op() {
        "Login" => Reply::Json(json!({"reject": false, "unchange": "true"})),
        _ => Reply::Json(json!({"reject": false, "unchange": true})),
    })
    .await;
    let frps = frps_with(
        vec![plugin.spec("p", &["Login", "NewProxy"])],
        Duration::from_secs(3),
    )
    .await;
    let (_c, answer) = register(&frps, registration("gpu-u")).await;
    assert!(matches!(answer, Command::Registered { ref client_id, .. } if client_id == "gpu-u"));
    let client = frps.state.registry.get("gpu-u").expect("registered");
    assert_eq!(client.registration.user, "fake");
    assert_eq!(plugin.calls().len(), 2);
}

#[tokio::test]
async fn modified_content_is_what_frps_uses() {
    let plugin = PluginServer::start(|call| {
        let mut content = call.content().clone();
        match call.op() {
            "Login" => {
                content["user"] = json!("mapped-user");
                content["metas"]["tier"] = json!("gold");
                Reply::Replace(content)
            }
            "NewProxy" => {
                let name = content["proxy_name"].as_str().unwrap().to_owned();
                content["proxy_name"] = json!(format!("renamed-{name}"));
                content["metas"]["rack"] = json!("r7");
                Reply::Replace(content)
            }
            _ => Reply::Allow,
        }
    })
    .await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("rewriter", &["Login", "NewProxy", "NewUserConn"])];
    cfg.admin_token = Some(ADMIN.into());
    let frps = Frps::start(cfg).await;
    let backend = Backend::start("gpu-m").await;
    let mut fc = frpc_config("gpu-m", &frps.addrs, backend.addr);
    fc.user = "fake".into();
    fc.metas = vec![("token".into(), "fake".into())];
    let frpc = Frpc::start(fc);

    // The rewritten client id is the one frps registers.
    frps.wait_for_clients(&["renamed-gpu-m"]).await;
    let client = frps.state.registry.get("renamed-gpu-m").unwrap();
    assert_eq!(client.registration.user, "mapped-user");
    assert_eq!(client.registration.metas["tier"], "gold");
    assert_eq!(client.registration.metas["token"], "fake");
    assert_eq!(client.registration.proxy_metas["rack"], "r7");
    let listed = Conn::open(frps.addrs.api)
        .await
        .get("/api/clients", Some(ADMIN))
        .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let ids: Vec<Value> = listed.json()["data"]
        .as_array()
        .expect("a list of clients")
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(
        ids,
        [json!("renamed-gpu-m")],
        "the API lists the rewritten id"
    );

    // The next plugin call sees Login's modification.
    let proxy = plugin.wait_for("NewProxy").await;
    assert_eq!(proxy.content()["user"]["user"], "mapped-user");
    assert_eq!(proxy.content()["user"]["metas"]["tier"], "gold");

    // frpc uses the id frps gave it: requests flow through the renamed client.
    let reply = http::get(frps.public(), "/renamed", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "gpu-m");
    let user_conn = plugin.wait_for("NewUserConn").await;
    assert_eq!(user_conn.content()["proxy_name"], "renamed-gpu-m");
    assert_eq!(user_conn.content()["user"]["user"], "mapped-user");
    frpc.kill().await;
}

#[tokio::test]
async fn a_rewritten_client_id_that_is_invalid_is_refused() {
    let plugin = PluginServer::start(|call| {
        let mut content = call.content().clone();
        content["proxy_name"] = json!("not a valid id");
        Reply::Replace(content)
    })
    .await;
    let frps = frps_with(
        vec![plugin.spec("bad", &["NewProxy"])],
        Duration::from_secs(3),
    )
    .await;
    let (_c, answer) = register(&frps, registration("gpu-i")).await;
    let (reason, retry) = refusal(&answer);
    assert!(
        reason.contains("a server plugin changed this registration")
            && reason.contains("client id must be"),
        "{reason}"
    );
    assert!(
        retry,
        "the plugin's doing, not frpc's: a fixed plugin may accept it"
    );
    assert!(frps.state.registry.is_empty());
}

#[tokio::test]
async fn a_plugins_reason_reaches_frpc_bounded_and_on_one_line() {
    let plugin = PluginServer::start(|_| {
        Reply::Reject(format!("xxxx\nINFO forged line {}", "x".repeat(65_000)))
    })
    .await;
    let frps = frps_with(
        vec![plugin.spec("wordy", &["NewProxy"])],
        Duration::from_secs(3),
    )
    .await;
    // 65 KB of reason fit the plugin's answer but not a frame to frpc:
    // cut, so frpc hears the refusal (before, frps could not send it and
    // frpc took the closed connection for a reason to try again).
    let (_c, answer) = register(&frps, registration("gpu-w")).await;
    let (reason, retry) = refusal(&answer);
    assert!(!retry, "a rejection is final");
    assert!(
        reason.starts_with("xxxx") && reason.chars().count() <= 1024 + 1,
        "{} chars",
        reason.len()
    );
    assert!(!reason.contains('\n'));
}

#[tokio::test]
async fn plugins_run_in_configuration_order_each_seeing_the_last_content() {
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let chained = |name: &'static str, order: Arc<Mutex<Vec<String>>>| {
        move |call: &PluginCall| {
            let user = call.content()["user"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            order.lock().unwrap().push(format!("{name} saw {user}"));
            let mut content = call.content().clone();
            content["user"] = json!(format!("{user}+{name}"));
            Reply::Replace(content)
        }
    };
    let a = PluginServer::start(chained("a", order.clone())).await;
    let b = PluginServer::start(chained("b", order.clone())).await;
    let c = PluginServer::start(chained("c", order.clone())).await;
    // Configured b, then a, then c: the order of the file, not of start-up.
    let frps = frps_with(
        vec![
            b.spec("b", &["Login"]),
            a.spec("a", &["Login"]),
            c.spec("c", &["Login"]),
        ],
        Duration::from_secs(3),
    )
    .await;
    let (_c, answer) = register(&frps, registration("gpu-c")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    assert_eq!(
        *order.lock().unwrap(),
        ["b saw fake", "a saw fake+b", "c saw fake+b+a"]
    );
    let client = frps.state.registry.get("gpu-c").unwrap();
    assert_eq!(client.registration.user, "fake+b+a+c");
}

#[tokio::test]
async fn a_field_frps_takes_nothing_from_reaches_the_next_plugin_as_set() {
    // An enriching plugin sets `group` for a policy plugin after it.
    let enrich = PluginServer::start(|call| {
        let mut content = call.content().clone();
        content["group"] = json!("g1");
        content["custom_domains"] = json!(["a.example"]);
        Reply::Replace(content)
    })
    .await;
    let policy = PluginServer::start(|call| match call.content()["group"].as_str() {
        Some("g1") => Reply::Reject("group g1 is full".into()),
        _ => Reply::Allow,
    })
    .await;
    let frps = frps_with(
        vec![
            enrich.spec("enrich", &["NewProxy"]),
            policy.spec("policy", &["NewProxy"]),
        ],
        Duration::from_secs(3),
    )
    .await;
    let (_c, answer) = register(&frps, registration("gpu-g")).await;
    assert_eq!(refusal(&answer), ("group g1 is full", false));
    let seen = policy.wait_for("NewProxy").await;
    assert_eq!(seen.content()["custom_domains"], json!(["a.example"]));
}

#[tokio::test]
async fn a_hung_plugin_fails_the_operation_after_the_timeout() {
    let plugin = PluginServer::start(|_| Reply::Hang).await;
    let frps = frps_with(
        vec![plugin.spec("sleepy", &["Login"])],
        Duration::from_millis(300),
    )
    .await;
    let started = Instant::now();
    let (_c, answer) = register(&frps, registration("gpu-t")).await;
    let (reason, retry) = refusal(&answer);
    assert_eq!(
        reason,
        "server plugin 'sleepy' failed on Login: no answer within 300ms"
    );
    assert!(retry, "a plugin that could not decide may decide later");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(frps.state.registry.is_empty());
}

#[tokio::test]
async fn a_non_200_answer_fails_the_operation() {
    let plugin = PluginServer::start(|_| Reply::Status(500)).await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("broken", &["Login", "NewUserConn"])];
    let frps = Frps::start(cfg).await;
    let (_c, answer) = register(&frps, registration("gpu-5")).await;
    let (reason, retry) = refusal(&answer);
    assert_eq!(
        reason,
        "server plugin 'broken' failed on Login: answered HTTP 500 Internal Server Error"
    );
    assert!(retry);

    // On the public port a failing plugin is 503, never a pass.
    let plugin = PluginServer::start(|call| match call.op() {
        "NewUserConn" => Reply::Status(404),
        _ => Reply::Allow,
    })
    .await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("picky", &["NewUserConn"])];
    let fleet = Fleet::start_with(1, cfg).await;
    let reply = http::get(fleet.frps.public(), "/", Some(API_KEY)).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "plugin_unavailable");
    assert!(
        !reply.body.contains("picky"),
        "the cause stays in frps's log: {}",
        reply.body
    );
    assert_eq!(fleet.backends[0].hits(), 0);
}

#[tokio::test]
async fn garbage_answers_and_unreachable_plugins_fail_the_operation() {
    let cases = [
        (
            Reply::Raw("<html>hello</html>".into()),
            "invalid answer: not JSON",
        ),
        (
            Reply::Json(json!({"unchange": "maybe"})),
            "invalid answer: `maybe` is neither true nor false",
        ),
        (
            Reply::Json(json!({"unchange": false})),
            "invalid answer: `unchange` is false but there is no `content`",
        ),
        (
            Reply::Json(json!({"unchange": false, "content": {"timestamp": "later"}})),
            "invalid answer: modified content does not fit Login",
        ),
        (
            Reply::Raw(format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000))),
            "answer longer than 65536 bytes",
        ),
        // The head is held to the limit too.
        (
            Reply::AllowPadded(100_000),
            "HTTP exchange failed: message head is too large",
        ),
    ];
    for (reply, expected) in cases {
        let plugin = PluginServer::start(move |_| reply.clone()).await;
        let frps = frps_with(
            vec![plugin.spec("junk", &["Login"])],
            Duration::from_secs(3),
        )
        .await;
        let (_c, answer) = register(&frps, registration("gpu-g")).await;
        let (reason, retry) = refusal(&answer);
        assert!(
            reason.starts_with(&format!("server plugin 'junk' failed on Login: {expected}")),
            "{reason}"
        );
        assert!(retry);
        assert!(frps.state.registry.is_empty());
    }

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gone = PluginSpec::new("gone", &closed.to_string(), "/handler", &["Login"]).unwrap();
    let frps = frps_with(vec![gone], Duration::from_secs(3)).await;
    let (_c, answer) = register(&frps, registration("gpu-g")).await;
    let (reason, retry) = refusal(&answer);
    assert!(
        reason.starts_with("server plugin 'gone' failed on Login: unreachable"),
        "{reason}"
    );
    assert!(retry);
}

#[tokio::test]
async fn close_proxy_is_a_notification_whose_answer_is_ignored() {
    let plugin = PluginServer::start(|call| match call.op() {
        "CloseProxy" => Reply::Status(500),
        _ => Reply::Allow,
    })
    .await;
    let after = PluginServer::allow_all().await;
    let frps = frps_with(
        vec![
            plugin.spec("closer", &["CloseProxy"]),
            after.spec("after", &["CloseProxy"]),
        ],
        Duration::from_secs(3),
    )
    .await;
    let (c, answer) = register(&frps, registration("gpu-q")).await;
    assert!(matches!(answer, Command::Registered { .. }));
    drop(c);
    let call = plugin.wait_for("CloseProxy").await;
    assert_eq!(call.content()["proxy_name"], "gpu-q");
    // Every plugin hears of it, whatever the one before answered, and
    // with the content frps made (frp's way with notifications).
    let after = after.wait_for("CloseProxy").await;
    assert_eq!(after.content(), call.content());
    frps.wait_for_clients(&[]).await;
    // Another registration is unaffected by the failed notification.
    let (_c, answer) = register(&frps, registration("gpu-q")).await;
    assert!(matches!(answer, Command::Registered { .. }));
}

/// `PROGRAM --config PATH`.
fn with_config(program: &str, path: &Path) -> Vec<OsString> {
    vec![program.into(), "--config".into(), path.into()]
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

#[test]
fn the_seed_frps_ini_and_frps_toml_parse_as_given() {
    for file in ["frps.ini", "frps.toml"] {
        let path = fixture(file);
        let cli = frps::config_file::load_from(with_config("frps", &path))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let c = cli.config;
        assert_eq!(
            c.control_port, 7000,
            "{file}: bind_port is the control port"
        );
        let plugins: Vec<(&str, &str, &str, Vec<&str>)> = c
            .plugins
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.addr.as_str(),
                    p.path.as_str(),
                    p.ops.iter().map(|o| o.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            plugins,
            [
                ("user-manager", "127.0.0.1:9000", "/handler", vec!["Login"]),
                (
                    "port-manager",
                    "127.0.0.1:9001",
                    "/handler",
                    vec!["NewProxy"]
                ),
            ],
            "{file}"
        );
        assert_eq!(c.plugin_timeout, Duration::from_secs(3));
    }
}

#[test]
fn the_seed_frpc_ini_parses_as_given() {
    let path = fixture("frpc.ini");
    let c =
        frpc::config_file::load_from(with_config("frpc", &path)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.server_addr, "127.0.0.1");
    assert_eq!(c.control_port, 7000);
    assert_eq!(c.user, "fake");
    assert_eq!(
        frpc::config::meta_map(&c.metas),
        [("token", "fake"), ("version", "1.0.0")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into()
    );
    assert_eq!(c.client_id.as_deref(), Some("ssh"));
    assert_eq!(c.local_port, 22);
    assert_eq!(
        frpc::config::meta_map(&c.proxy_metas),
        [("id".to_owned(), "123".to_owned())].into()
    );
}

#[tokio::test]
async fn ini_files_drive_a_real_frps_and_frpc_with_a_plugin() {
    let plugin = PluginServer::start(|call| {
        if call.op() == "Login" && call.content()["metas"]["token"] != "fake" {
            Reply::Reject("bad token".into())
        } else {
            Reply::Allow
        }
    })
    .await;
    let dir = std::env::temp_dir().join(format!("frpx-plugins-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let frps_ini = dir.join("frps.ini");
    std::fs::write(
        &frps_ini,
        format!(
            "[common]\nbind_addr = 127.0.0.1\nbind_port = 0\nproxy_port = 0\npublic_port = 0\napi_bind = 127.0.0.1\napi_port = 0\napi_key = {API_KEY}\ndatabase_url = {}\nredis_url = none\nplugin_timeout = 2s\nforward_paths = /v1/*, /api/chat\n\n[plugin.user-manager]\naddr = {}\npath = {PLUGIN_PATH}\nops = Login, NewProxy\n",
            frpx_tests::temp_sqlite_url(),
            plugin.addr
        ),
    )
    .unwrap();
    let cli = frps::config_file::load_from(with_config("frps", &frps_ini))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cli.config.forward_paths,
        [
            frps::paths::PathRule::Prefix("/v1/".into()),
            frps::paths::PathRule::Exact("/api/chat".into())
        ],
        "a list in the file"
    );
    let frps = Frps::start(cli.config).await;
    let backend = Backend::start("ini-box").await;

    let frpc_ini = dir.join("frpc.ini");
    std::fs::write(
        &frpc_ini,
        format!(
            "[common]\nserver_addr = 127.0.0.1\nserver_port = {}\nproxy_port = {}\nuser = fake\nmeta_token = fake\nemail = {}\npassword = {}\nno_prompt = true\ninsecure_plaintext = true\ntoken_file = {}\nreconnect_min = 50ms\n\n[ini-box]\ntype = http\nlocal_ip = 127.0.0.1\nlocal_port = {}\nmeta_id = 123\n",
            frps.addrs.control.port(),
            frps.addrs.proxy.port(),
            frpx_tests::TEST_EMAIL,
            frpx_tests::TEST_PASSWORD,
            dir.join("token.json").display(),
            backend.addr.port()
        ),
    )
    .unwrap();
    let cfg = frpc::config_file::load_from(with_config("frpc", &frpc_ini))
        .unwrap_or_else(|e| panic!("{e}"));
    let frpc = Frpc::start(cfg);
    frps.wait_for_clients(&["ini-box"]).await;
    let reply = http::get(frps.public(), "/v1/chat/completions", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "ini-box");
    let proxy = plugin.wait_for("NewProxy").await;
    assert_eq!(proxy.content()["metas"]["id"], "123");
    assert_eq!(proxy.content()["user"]["user"], "fake");
    frpc.kill().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_session_replaced_by_a_reconnect_does_not_close_the_proxy() {
    let plugin = PluginServer::allow_all().await;
    let frps = frps_with(
        vec![plugin.spec("audit", &["NewProxy", "CloseProxy"])],
        Duration::from_secs(3),
    )
    .await;
    let (mut old, answer) = register(&frps, registration("gpu-r")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let first = frps
        .state
        .registry
        .get("gpu-r")
        .expect("registered")
        .session;

    // The client reconnects before its old connection was noticed dead.
    let (new, answer) = register(&frps, registration("gpu-r")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let second = frps
        .state
        .registry
        .get("gpu-r")
        .expect("registered")
        .session;
    assert_ne!(first, second, "the reconnect is a new session");
    match old.recv().await {
        Some(Command::Disconnect { reason }) => assert_eq!(reason, common::protocol::REPLACED),
        other => panic!("expected Disconnect, got {other:?}"),
    }
    // frps closes the old connection once that session's clean-up is over.
    assert!(old.recv().await.is_none());
    assert_eq!(plugin.calls_for("NewProxy").len(), 2);
    assert!(
        plugin.calls_for("CloseProxy").is_empty(),
        "the proxy is live in the new session: {:?}",
        plugin.calls_for("CloseProxy")
    );

    // A real disconnect closes it, once, as the live session's.
    drop(new);
    let close = plugin.wait_for("CloseProxy").await;
    assert_eq!(close.content()["proxy_name"], "gpu-r");
    assert_eq!(close.content()["user"]["run_id"], second.to_string());
    frps.wait_for_clients(&[]).await;
    assert_eq!(plugin.calls_for("CloseProxy").len(), 1);
}

/// Every NewProxy the plugins accepted gets its CloseProxy, also when frps
/// refuses the registration after asking them (here: the client id belongs
/// to another account; then a client id the plugin rewrote to one frps
/// refuses).
#[tokio::test]
async fn a_registration_refused_after_new_proxy_closes_its_proxy() {
    let plugin = PluginServer::start(|call| match call.op() {
        "NewProxy" if call.content()["proxy_name"] == "rename-me" => {
            let mut content = call.content().clone();
            content["proxy_name"] = json!("not an id/..");
            Reply::Replace(content)
        }
        "NewProxy" if call.content()["proxy_name"] == "take-gpu-o" => {
            let mut content = call.content().clone();
            content["proxy_name"] = json!("gpu-o");
            Reply::Replace(content)
        }
        _ => Reply::Allow,
    })
    .await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("audit", &["NewProxy", "CloseProxy"])];
    cfg.plugin_timeout = Duration::from_secs(3);
    // The silent fake clients are not evicted (which closes proxies too)
    // while the test runs.
    cfg.heartbeat_interval = Duration::from_secs(60);
    let frps = Frps::start(cfg).await;
    // gpu-o is the first account's.
    let (owner, answer) = register(&frps, registration("gpu-o")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    // Another account's id: refused before the plugins hear of it (a
    // NewProxy for the live name, then its CloseProxy, would tell them
    // the live one ended).
    let other = frps.other_account_token("other@example.com").await;
    let (_other, answer) =
        FakeClient::register_as(frps.addrs.control, &other, registration("gpu-o")).await;
    let (reason, retry) = refusal(&answer);
    assert!(reason.contains("another account"), "{reason}");
    assert!(!retry);
    assert_eq!(plugin.calls_for("NewProxy").len(), 1, "the owner's only");
    assert!(
        frps.state.registry.get("gpu-o").is_some(),
        "the owner stays"
    );

    // Renamed by a plugin into an id frps refuses: refused after the
    // NewProxy, which gets its CloseProxy (same run_id).
    let (_renamed, answer) = register(&frps, registration("rename-me")).await;
    let (reason, _) = refusal(&answer);
    assert!(reason.contains("client id"), "{reason}");
    let close = plugin.wait_for("CloseProxy").await;
    let opened = plugin.calls_for("NewProxy");
    assert_eq!(opened.len(), 2);
    assert_eq!(close.content()["proxy_name"], "not an id/..");
    assert_eq!(
        close.content()["user"]["run_id"],
        opened[1].content()["user"]["run_id"],
        "the refused session's proxy"
    );
    drop(owner);
    frpx_tests::eventually("the owner's proxy is closed", || {
        plugin.calls_for("CloseProxy").len() == 2
    })
    .await;
    let closes = plugin.calls_for("CloseProxy");
    assert_eq!(closes[1].content()["proxy_name"], "gpu-o");

    // Renamed by a plugin onto the first account's id: the plugin's doing,
    // not the box's `--client-id` (which the refusal's advice named, and
    // frpc stopped for good): said so, and retried.
    let (_taker, answer) =
        FakeClient::register_as(frps.addrs.control, &other, registration("take-gpu-o")).await;
    let (reason, retry) = refusal(&answer);
    assert!(
        reason.contains("a server plugin renamed this client 'take-gpu-o' to 'gpu-o'"),
        "{reason}"
    );
    assert!(reason.contains("another account"), "{reason}");
    assert!(!reason.contains("choose another"), "{reason}");
    assert!(retry);
    frpx_tests::eventually("its proxy is closed", || {
        plugin.calls_for("CloseProxy").len() == 3
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_heartbeats_makes_one_ping_call_at_a_time() {
    let plugin = PluginServer::start(|_| Reply::AllowAfter(Duration::from_millis(500))).await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("pinger", &["Ping"])];
    cfg.plugin_timeout = Duration::from_secs(3);
    // Long enough that the pauses below do not evict the client.
    cfg.heartbeat_interval = Duration::from_secs(10);
    let frps = Frps::start(cfg).await;
    let (mut c, answer) = register(&frps, registration("gpu-f")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");

    const BURST: u64 = 2_000;
    for seq in 1..=BURST {
        c.send(Command::Heartbeat { seq }).await;
    }
    for seq in 1..=BURST {
        match c.recv().await {
            Some(Command::HeartbeatAck { seq: acked }) => assert_eq!(acked, seq),
            other => panic!("expected the ack of heartbeat {seq}, got {other:?}"),
        }
    }
    // The burst made a call, and never two at once (each takes 500 ms:
    // a burst longer than that makes a second one after the first).
    plugin.wait_for("Ping").await;
    let during = plugin.calls_for("Ping").len();
    assert!(
        (1..=2).contains(&during),
        "{BURST} heartbeats in a burst made {during} Ping calls"
    );
    assert_eq!(plugin.most_at_once(), 1, "Ping calls overlapped");

    // Once the call in flight has ended, heartbeats are pinged again.
    let mut seq = BURST;
    let resumed = async {
        while plugin.calls_for("Ping").len() == during {
            seq += 1;
            c.send(Command::Heartbeat { seq }).await;
            assert!(matches!(c.recv().await, Some(Command::HeartbeatAck { .. })));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(frpx_tests::WAIT, resumed)
        .await
        .expect("a heartbeat after the call ended is pinged");
    assert_eq!(plugin.most_at_once(), 1, "Ping calls overlapped");
    assert!(frps.state.registry.get("gpu-f").is_some());
}

#[tokio::test]
async fn plugin_calls_reuse_their_connections_and_survive_the_plugin_closing_them() {
    use frpx_tests::services::Cutter;
    let plugin = PluginServer::allow_all().await;
    // frps reaches the plugin through a forwarder that counts connections
    // and can drop them all (the plugin restarting, or closing idle ones).
    let gate = Cutter::start(plugin.addr).await;
    let mut spec = plugin.spec("audit", &["NewUserConn"]);
    spec.addr = gate.addr.to_string();
    let mut cfg = frps_config();
    cfg.plugins = vec![spec];
    let fleet = Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();
    for i in 0..20 {
        let reply = http::get(public, &format!("/n/{i}"), Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    assert_eq!(plugin.calls_for("NewUserConn").len(), 20);
    assert_eq!(
        gate.accepted().len(),
        1,
        "one connection for 20 calls in a row"
    );
    assert_eq!(
        fleet
            .frps
            .state
            .plugins
            .idle_connections(&gate.addr.to_string()),
        1
    );
    // The plugin drops its connections: the next call opens a new one,
    // and no request fails for it.
    gate.cut().await;
    gate.restore();
    for i in 0..5 {
        let reply = http::get(public, &format!("/after/{i}"), Some(API_KEY)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    assert_eq!(plugin.calls_for("NewUserConn").len(), 25);
    assert_eq!(gate.accepted().len(), 2, "one new connection after the cut");
    // Calls at once each get a connection; what is left idle stays within
    // the cap.
    let many = (0..40)
        .map(|i| async move { http::get(public, &format!("/burst/{i}"), Some(API_KEY)).await });
    let replies = futures_util::future::join_all(many).await;
    assert!(replies.iter().all(|r| r.status == 200));
    let idle = fleet
        .frps
        .state
        .plugins
        .idle_connections(&gate.addr.to_string());
    assert!(
        (1..=frps::plugins::MAX_IDLE_CONNECTIONS).contains(&idle),
        "{idle} idle"
    );
}

/// A burst of calls to a plugin takes at most MAX_CALLS_AT_ONCE
/// connections (the rest wait their turn), all of which are kept: a
/// connection per call, closed after it past the idle cap, left frps a
/// socket in TIME_WAIT each.
#[tokio::test]
async fn a_burst_of_plugin_calls_waits_for_the_connections_kept() {
    use frpx_tests::services::Cutter;
    let plugin = PluginServer::start(|_| Reply::AllowAfter(Duration::from_millis(200))).await;
    let gate = Cutter::start(plugin.addr).await;
    let mut spec = plugin.spec("audit", &["NewUserConn"]);
    spec.addr = gate.addr.to_string();
    let mut cfg = frps_config();
    cfg.plugins = vec![spec];
    let fleet = Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();
    let burst = frps::plugins::MAX_CALLS_AT_ONCE + 16;
    let many = (0..burst)
        .map(|i| async move { http::get(public, &format!("/burst/{i}"), Some(API_KEY)).await });
    let replies = futures_util::future::join_all(many).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(plugin.calls_for("NewUserConn").len(), burst);
    let opened = gate.accepted().len();
    assert!(
        (1..=frps::plugins::MAX_CALLS_AT_ONCE).contains(&opened),
        "{opened} connections for {burst} calls"
    );
    let idle = fleet
        .frps
        .state
        .plugins
        .idle_connections(&gate.addr.to_string());
    assert_eq!(idle, opened, "every one kept");
}

/// Per-request calls waiting their turn do not hold back the control
/// plane's: while every turn of a plugin's `NewUserConn` calls is taken
/// (by calls that hang), a box's `Login` and `NewProxy` to the same plugin
/// go through at once, not after the hanging calls' timeout (and a
/// heartbeat's `Ping` failing would disconnect its box).
#[tokio::test]
async fn control_calls_do_not_wait_behind_request_calls() {
    let plugin = PluginServer::start(|call| match call.op() {
        "NewUserConn" => Reply::Hang,
        _ => Reply::Allow,
    })
    .await;
    let mut cfg = frps_config();
    cfg.plugins = vec![plugin.spec("manager", &["NewUserConn", "Login", "NewProxy"])];
    cfg.plugin_timeout = Duration::from_secs(3);
    let fleet = Fleet::start_with(1, cfg).await;
    let public = fleet.frps.public();
    let burst = frps::plugins::MAX_CALLS_AT_ONCE + 8;
    let hanging = tokio::spawn(futures_util::future::join_all((0..burst).map(
        move |i| async move { http::get(public, &format!("/burst/{i}"), Some(API_KEY)).await },
    )));
    frpx_tests::eventually("every turn taken", || {
        plugin.calls_for("NewUserConn").len() == frps::plugins::MAX_CALLS_AT_ONCE
    })
    .await;
    let since = std::time::Instant::now();
    let (_box, answer) = register(&fleet.frps, registration("gpu-late")).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    // Waiting for a turn, it would come after the calls' 3 s timeout.
    assert!(
        since.elapsed() < Duration::from_millis(2500) && !hanging.is_finished(),
        "the registration waited {:?} for the request calls",
        since.elapsed()
    );
    let replies = hanging.await.unwrap();
    assert!(
        replies.iter().all(|r| r.status == 503),
        "the hanging calls fail"
    );
}

#[tokio::test]
async fn a_plugin_refusing_by_status_keeps_its_connection() {
    use frpx_tests::services::Cutter;
    // A refusal with a body (read, so the connection can carry the next).
    let plugin =
        PluginServer::start(|_| Reply::StatusWith(403, "not on my watch ".repeat(100))).await;
    let gate = Cutter::start(plugin.addr).await;
    let mut spec = plugin.spec("gatekeeper", &["NewUserConn"]);
    spec.addr = gate.addr.to_string();
    let mut cfg = frps_config();
    cfg.plugins = vec![spec];
    let fleet = Fleet::start_with(1, cfg).await;
    for i in 0..10 {
        let reply = http::get(fleet.frps.public(), &format!("/n/{i}"), Some(API_KEY)).await;
        assert_eq!(reply.status, 503, "{}", reply.body);
    }
    assert_eq!(plugin.calls_for("NewUserConn").len(), 10);
    assert_eq!(
        gate.accepted().len(),
        1,
        "one connection for 10 refusals in a row"
    );
}

#[tokio::test]
async fn a_hello_that_proves_no_live_session_is_refused_before_pairing() {
    let plugin = PluginServer::allow_all().await;
    let frps = frps_with(
        vec![plugin.spec("work", &["NewWorkConn"])],
        Duration::from_secs(3),
    )
    .await;
    let token = frps.client_token().await;
    let (_client, answer) = FakeClient::register(frps.addrs.control, &token, "box").await;
    let Command::Registered { session_key, .. } = answer else {
        panic!("expected Registered, got {answer:?}");
    };
    // A hello with another key (a forged one, or a session replaced a
    // moment ago): refused before any pairing, and not shown to plugins.
    let mut conn = tokio::net::TcpStream::connect(frps.addrs.proxy)
        .await
        .unwrap();
    let conn_id = uuid::Uuid::new_v4();
    common::write_command(
        &mut conn,
        &Command::DataHello {
            conn_id,
            client_id: "box".into(),
            session_key: format!("{session_key}-old"),
        },
    )
    .await
    .unwrap();
    let refused = common::read_one_command(&mut conn, common::MAX_FRAME, frpx_tests::WAIT)
        .await
        .unwrap();
    match refused {
        Command::DataRejected {
            conn_id: id,
            reason,
        } => {
            assert_eq!(id, conn_id);
            assert_eq!(reason, "unknown client or wrong session key");
        }
        other => panic!("expected DataRejected, got {other:?}"),
    }
    // The session's own key, for a connection frps never asked for: refused
    // too, without a plugin call (a box could have them called at will).
    let mut conn = tokio::net::TcpStream::connect(frps.addrs.proxy)
        .await
        .unwrap();
    common::write_command(
        &mut conn,
        &Command::DataHello {
            conn_id,
            client_id: "box".into(),
            session_key: session_key.clone(),
        },
    )
    .await
    .unwrap();
    let refused = common::read_one_command(&mut conn, common::MAX_FRAME, frpx_tests::WAIT)
        .await
        .unwrap();
    match refused {
        Command::DataRejected { reason, .. } => {
            assert_eq!(reason, "unknown or expired connection id");
        }
        other => panic!("expected DataRejected, got {other:?}"),
    }
    assert!(plugin.calls_for("NewWorkConn").is_empty());
}

/// The fenced blocks of `lang` in `doc` (a path under the repository).
fn doc_blocks(doc: &str, lang: &str) -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(doc);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{doc}: {e}"));
    let fence = format!("```{lang}");
    let mut blocks = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let body = body.strip_prefix('\n').unwrap_or(body);
        let end = body.find("```").expect("a closed block");
        blocks.push(body[..end].to_owned());
        rest = &body[end + 3..];
    }
    blocks
}

#[test]
fn the_documented_configuration_files_load_as_shown() {
    let dir = std::env::temp_dir().join(format!("frpx-doc-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut loaded = 0;
    for (lang, ext) in [("ini", "ini"), ("toml", "toml")] {
        for (i, block) in doc_blocks("docs/server-plugin.md", lang).iter().enumerate() {
            let path = dir.join(format!("example-{i}.{ext}"));
            std::fs::write(&path, block).unwrap();
            // Which program a block is for: its first line names the file.
            if block.contains("frpc") && !block.contains("[plugin.") {
                frpc::config_file::load_from(with_config("frpc", &path))
                    .unwrap_or_else(|e| panic!("frpc example {i} ({ext}):\n{block}\n{e}"));
            } else {
                frps::config_file::load_from(with_config("frps", &path))
                    .unwrap_or_else(|e| panic!("frps example {i} ({ext}):\n{block}\n{e}"));
            }
            loaded += 1;
        }
    }
    assert!(loaded >= 2, "the frps.ini and frpc.ini examples were found");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_id_released_while_its_owner_is_live_is_refused_before_the_plugins_hear_it() {
    let plugin = PluginServer::allow_all().await;
    let frps = frps_with(
        vec![plugin.spec("audit", &["NewProxy", "CloseProxy"])],
        Duration::from_secs(3),
    )
    .await;
    let (_old, answer) =
        FakeClient::register(frps.addrs.control, &frps.client_token().await, "gpu-r").await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    let live = frps.state.registry.get("gpu-r").unwrap().session;
    assert!(frps.state.store.release_client_id("gpu-r").await.unwrap());
    let heir = frps.other_account_token("heir@example.com").await;
    let (_h, answer) = FakeClient::register(frps.addrs.control, &heir, "gpu-r").await;
    let Command::RegisterRefused { reason, retry, .. } = answer else {
        panic!("{answer:?}");
    };
    assert!(retry && reason.contains("still live"), "{reason}");
    // The plugin heard the live run's NewProxy alone: no second NewProxy
    // (the end of the live run, to a plugin) nor its CloseProxy.
    let ops: Vec<_> = plugin.calls().iter().map(|c| c.op().to_owned()).collect();
    assert_eq!(ops, ["NewProxy"], "{ops:?}");
    assert_eq!(frps.state.registry.get("gpu-r").unwrap().session, live);
}
