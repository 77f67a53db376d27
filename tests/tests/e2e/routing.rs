//! Inference-aware routing: models, balancing, capacity queues, failover.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use frps::Config;
use frpx_tests::http::{self, Conn, Reply};
use frpx_tests::{API_KEY, Backend, Frpc, Frps, WAIT, frpc_config, frps_config};
use http_body_util::BodyExt;

/// frps and one frpc per `(id, models, max_concurrency)`.
struct Boxes {
    frps: Frps,
    backends: HashMap<String, Backend>,
    clients: HashMap<String, Frpc>,
}

async fn boxes(config: Config, specs: &[(&str, &[&str], Option<u32>)]) -> Boxes {
    let frps = Frps::start(config).await;
    let mut backends = HashMap::new();
    let mut clients = HashMap::new();
    for (id, models, max) in specs {
        let backend = Backend::start(id).await;
        backend.set_models(models);
        let mut cfg = frpc_config(id, &frps.addrs, backend.addr);
        cfg.max_concurrency = *max;
        clients.insert(id.to_string(), Frpc::start(cfg));
        backends.insert(id.to_string(), backend);
    }
    let ids: Vec<&str> = specs.iter().map(|s| s.0).collect();
    frps.wait_for_clients(&ids).await;
    Boxes {
        frps,
        backends,
        clients,
    }
}

fn chat(model: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

async fn post(addr: std::net::SocketAddr, path: &str, body: String) -> Reply {
    Conn::open(addr).await.post(path, Some(API_KEY), body).await
}

/// One box, `a`, serving `m1:latest` with one slot, taken by a `/hold`
/// stream (the returned connection and response). A request queued for
/// the slot waits longer than WAIT: one left asleep fails its test.
async fn one_busy_slot() -> (Boxes, Conn, hyper::Response<hyper::body::Incoming>) {
    let mut cfg = frps_config();
    cfg.queue_timeout = Duration::from_secs(120);
    let b = boxes(cfg, &[("a", &["m1:latest"], Some(1))]).await;
    let (conn, held) = http::start_hold(b.frps.public(), API_KEY).await;
    (b, conn, held)
}

/// Ends [`one_busy_slot`]'s stream, reading it to its end: the slot frees.
async fn free_the_slot(b: &Boxes, held: &mut hyper::Response<hyper::body::Incoming>) {
    b.backends["a"].release_holds();
    frpx_tests::whole(held.body_mut()).await.unwrap();
}

#[tokio::test]
async fn a_slot_an_earlier_session_frees_wakes_requests_for_what_the_new_one_serves() {
    // The box's one slot, taken by a stream of its first session.
    let (b, _conn, mut held) = one_busy_slot().await;
    let frps = &b.frps;
    let first = frps.state.registry.get("a").unwrap().session;
    // It reconnects (the stream goes on) serving a second model.
    b.backends["a"].set_models(&["m1:latest", "m2:latest"]);
    frps.state
        .registry
        .get("a")
        .unwrap()
        .kick("test: reconnect");
    frps.wait_until("the new session serves m2", |s| {
        s.registry
            .get("a")
            .is_some_and(|c| c.session != first && frps::router::serves(&c, "m2:latest"))
    })
    .await;
    // A request for m2 waits for the slot the old session's stream holds.
    let waiting = tokio::spawn(post(frps.public(), "/v1/chat/completions", chat("m2")));
    frpx_tests::eventually("the m2 request is queued", || {
        frps.state.queues.total() == 1
    })
    .await;
    free_the_slot(&b, &mut held).await;
    let reply = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("woken when the slot freed, not at the queue timeout")
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test]
async fn a_server_error_from_the_service_is_relayed_and_does_not_reset_failures() {
    let b = boxes(frps_config(), &[("a", &["m1:latest"], None)]).await;
    let frps = &b.frps;
    let client = frps.state.registry.get("a").unwrap();
    assert_eq!(
        client.record_failure(),
        None,
        "one failure: no cool-down yet"
    );
    let reply = http::get(frps.public(), "/status?code=500", Some(API_KEY)).await;
    assert_eq!(reply.status, 500, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "a");
    // The 500 did not wipe the first failure: a second one cools it down.
    assert!(client.record_failure().is_some());
    assert!(client.is_cooling_down());
    // Any other answer is a success that ends it.
    let client = frps.state.registry.get("a").unwrap();
    client.record_success();
    assert_eq!(client.record_failure(), None);
    let reply = http::get(frps.public(), "/status?code=404", Some(API_KEY)).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_eq!(client.record_failure(), None, "the 404 reset the count");
}

/// A box whose service fails every request at once (a model that cannot
/// load) has none in flight, so least-conn would send it most requests:
/// past `SERVER_ERRORS_BEFORE_FAILURE` 500s in a row, once they answered
/// more than one caller (a key from a network), it is cooled down as a
/// failing box; one caller alone (whose input the service cannot take)
/// cannot do that. Each answer is still relayed as the service gave it;
/// 503s and 504s neither count nor end a streak; any other answer (a 501
/// too) forgets them.
#[tokio::test]
async fn a_box_failing_every_request_is_cooled_down() {
    use frps::registry::{FAILURES_BEFORE_COOLDOWN, SERVER_ERRORS_BEFORE_FAILURE};
    let b = boxes(
        frps_config(),
        &[
            ("good", &["m1:latest"], None),
            ("bad", &["m1:latest"], None),
        ],
    )
    .await;
    let frps = &b.frps;
    let (other_key, _) = frps::auth::KeyValidator::create(&frps.state.store, None, None)
        .await
        .unwrap();
    let bad = &b.backends["bad"];
    let handle = frps.state.registry.get("bad").unwrap();
    let mut conn = Conn::open(frps.public()).await;
    // Each request pinned to the bad box, as least-conn would send most
    // requests there.
    bad.fail_with(500);
    // One key's 500s, however many: no failure.
    let alone = (SERVER_ERRORS_BEFORE_FAILURE + 4) as usize;
    for _ in 0..alone {
        let reply = pinned_chat(&mut conn, API_KEY, "bad", "m1").await;
        assert_eq!(reply.status, 500, "{}", reply.body);
        assert_eq!(reply.json()["error"], "bad cannot load its model");
    }
    assert_eq!(handle.failures(), 0);
    assert!(!handle.is_cooling_down());
    // Another caller's: the static key from another address, then another
    // key: the streak now counts, each a failure.
    let mut elsewhere = Conn::open_from(frps.public(), "127.0.0.2".parse().unwrap()).await;
    let reply = pinned_chat(&mut elsewhere, API_KEY, "bad", "m1").await;
    assert_eq!(reply.status, 500, "{}", reply.body);
    assert_eq!(handle.failures(), 1);
    let reply = pinned_chat(&mut conn, &other_key, "bad", "m1").await;
    assert_eq!(reply.status, 500, "{}", reply.body);
    assert_eq!(handle.failures(), FAILURES_BEFORE_COOLDOWN);
    assert!(handle.is_cooling_down());
    assert_eq!(bad.hits(), alone + FAILURES_BEFORE_COOLDOWN as usize);
    // Cooling down, it takes no requests; the good box does.
    let reply = conn
        .post("/v1/chat/completions", Some(API_KEY), chat("m1"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "good");
    // Its service recovers: once the cool-down ends, its next answer
    // forgets the server errors and failures.
    bad.fail_with(0);
    frpx_tests::eventually("the cool-down ends", || !handle.is_cooling_down()).await;
    assert_eq!(
        pinned_chat(&mut conn, API_KEY, "bad", "m1").await.status,
        200
    );
    assert_eq!(handle.failures(), 0);
    // A new streak from two callers: its first failure.
    bad.fail_with(500);
    for i in 0..=SERVER_ERRORS_BEFORE_FAILURE {
        let on = if i % 2 == 0 {
            &mut conn
        } else {
            &mut elsewhere
        };
        assert_eq!(pinned_chat(on, API_KEY, "bad", "m1").await.status, 500);
    }
    assert_eq!(handle.failures(), 1);
    // 503s (busy) and 504s (one request's own wait) neither count nor end
    // it: the next 500 is its second failure.
    for status in [503, 504] {
        bad.fail_with(status);
        for i in 0..3 {
            let on = if i % 2 == 0 {
                &mut conn
            } else {
                &mut elsewhere
            };
            assert_eq!(
                pinned_chat(on, &other_key, "bad", "m1").await.status,
                status
            );
        }
        assert_eq!(handle.failures(), 1, "{status}");
        assert!(!handle.is_cooling_down(), "{status}");
    }
    bad.fail_with(500);
    assert_eq!(
        pinned_chat(&mut conn, API_KEY, "bad", "m1").await.status,
        500
    );
    assert_eq!(handle.failures(), FAILURES_BEFORE_COOLDOWN);
    assert!(handle.is_cooling_down());
    // A 501 (an endpoint the service lacks) is an answer: it ends them.
    bad.fail_with(501);
    frpx_tests::eventually("the cool-down ends", || !handle.is_cooling_down()).await;
    assert_eq!(
        pinned_chat(&mut conn, API_KEY, "bad", "m1").await.status,
        501
    );
    assert_eq!(handle.failures(), 0);
}

#[tokio::test]
async fn a_caller_with_a_streamed_body_leaving_its_queue_gives_up_its_place() {
    use tokio::io::AsyncWriteExt;
    let (b, _conn, mut held) = one_busy_slot().await;
    let frps = &b.frps;
    // A chunked upload (streamed: hyper holds its first piece and reads no
    // further) waits for the one slot.
    let mut caller = tokio::net::TcpStream::connect(frps.public()).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: frps\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    );
    caller.write_all(head.as_bytes()).await.unwrap();
    frpx_tests::eventually("the upload is queued", || frps.state.queues.total() == 1).await;
    // The caller gives up: its place goes at once, not at the queue timeout.
    drop(caller);
    frpx_tests::eventually("the upload left the queue", || {
        frps.state.queues.total() == 0
    })
    .await;
    free_the_slot(&b, &mut held).await;
    // The slot it would have taken serves the next caller; the upload
    // never reached the box.
    let reply = http::get(frps.public(), "/after", Some(API_KEY)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        !b.backends["a"]
            .requests()
            .iter()
            .any(|r| r.path == "/upload"),
        "the abandoned upload was sent to the box"
    );
}

#[tokio::test]
async fn requests_for_a_model_go_only_to_boxes_that_have_it() {
    let b = boxes(
        frps_config(),
        &[
            ("a", &["llama3:latest"], None),
            ("b", &["qwen2.5:1.5b"], None),
            ("c", &["llama3:latest", "qwen2.5:1.5b"], None),
        ],
    )
    .await;
    let mut served: HashMap<(String, String), usize> = HashMap::new();
    let mut conn = Conn::open(b.frps.public()).await;
    for i in 0..60 {
        // `llama3` is `llama3:latest`, as in Ollama.
        let (model, path) = match i % 4 {
            0 => ("llama3", "/v1/chat/completions"),
            1 => ("qwen2.5:1.5b", "/api/chat"),
            2 => ("llama3:latest", "/api/generate"),
            _ => ("qwen2.5:1.5b", "/v1/embeddings"),
        };
        let reply = conn.post(path, Some(API_KEY), chat(model)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        // frps read the body to route it; the box gets it unchanged.
        assert_eq!(reply.json()["body"], chat(model), "{}", reply.body);
        let backend = reply.json()["backend"].as_str().unwrap().to_owned();
        *served
            .entry((model.replace(":latest", ""), backend))
            .or_default() += 1;
    }
    for ((model, backend), n) in &served {
        let ok = match model.as_str() {
            "llama3" => backend == "a" || backend == "c",
            _ => backend == "b" || backend == "c",
        };
        assert!(ok, "{model} went to {backend} ({n} times)");
    }
    let backends: HashSet<_> = served.keys().map(|(_, b)| b.clone()).collect();
    assert_eq!(backends.len(), 3, "{served:?}");
    // On the path it was sent to.
    let seen = b.backends["b"].seen();
    assert!(seen.iter().any(|s| s.path == "/api/chat"));
    // OpenAI's Responses API and Ollama's model details go by model too
    // (the latter by `name` as older clients send it).
    for _ in 0..10 {
        let reply = conn
            .post("/v1/responses", Some(API_KEY), chat("qwen2.5:1.5b"))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_ne!(reply.json()["backend"], "a", "a has no qwen");
        let show = serde_json::json!({"name": "qwen2.5:1.5b"}).to_string();
        let reply = conn.post("/api/show", Some(API_KEY), show).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_ne!(reply.json()["backend"], "a", "a has no qwen");
        // So do vLLM's and llama.cpp's other calls naming a model.
        for path in [
            "/v1/rerank",
            "/rerank",
            "/v1/score",
            "/tokenize",
            "/pooling",
        ] {
            let reply = conn.post(path, Some(API_KEY), chat("qwen2.5:1.5b")).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_ne!(reply.json()["backend"], "a", "{path}: a has no qwen");
        }
    }
}

/// A box whose service goes down (Ollama restarting, vLLM loading) keeps
/// its models, announced as down: their callers get 503 (retry), not 404
/// `model_not_found`, which SDKs take for good; and frps still lists them.
/// Back up, it serves them again. A name tagged `:latest` does not go to a
/// box that lists the model without a tag (vLLM takes only its own name).
#[tokio::test]
async fn a_box_whose_service_is_down_keeps_its_models_answered_503() {
    let b = boxes(
        frps_config(),
        &[("a", &["llama3:latest"], None), ("v", &["mistral"], None)],
    )
    .await;
    let public = b.frps.public();
    let reply = post(public, "/v1/chat/completions", chat("llama3")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // vLLM's untagged name: as it lists it, not with `:latest`.
    let reply = post(public, "/v1/chat/completions", chat("mistral")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = post(public, "/v1/chat/completions", chat("mistral:latest")).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    let reply = http::get(public, "/v1/models/mistral:latest", Some(API_KEY)).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    // Counted under the name its box lists.
    let metrics = http::get(b.frps.addrs.api, "/metrics", None).await.body;
    assert!(metrics.contains("model=\"mistral\""), "{metrics}");
    assert!(!metrics.contains("model=\"mistral:latest\""), "{metrics}");
    // a's service goes away; its frpc reports it down at its next probe.
    let a = b.frps.state.registry.get("a").unwrap();
    let addr = b.backends["a"].addr;
    b.backends["a"].stop();
    frpx_tests::eventually("a reported down", || !a.is_healthy()).await;
    let reply = post(public, "/v1/chat/completions", chat("llama3")).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "no_healthy_clients");
    assert_eq!(reply.headers["retry-after"], "1");
    let listed = http::get(public, "/v1/models", Some(API_KEY)).await;
    assert!(listed.body.contains("llama3:latest"), "{}", listed.body);
    // Back on the same address: served again.
    let back = Backend::start_on("a", addr).await;
    back.set_models(&["llama3:latest"]);
    frpx_tests::eventually("a reported up", || a.is_healthy()).await;
    let reply = post(public, "/v1/chat/completions", chat("llama3")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test]
async fn unknown_models_get_404_ambiguous_ones_400_and_an_empty_fleet_503() {
    let b = boxes(frps_config(), &[("a", &["llama3:latest"], None)]).await;
    let reply = post(b.frps.public(), "/v1/chat/completions", chat("mistral")).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    let err = &reply.json()["error"];
    assert_eq!(err["code"], "model_not_found");
    assert!(err["message"].as_str().unwrap().contains("mistral"));
    // A body that is not JSON, or names no model, goes to any client.
    let reply = post(b.frps.public(), "/v1/chat/completions", "not json".into()).await;
    assert_eq!(reply.status, 200);
    // One that names it twice is refused, not routed on one of the two.
    let twice = r#"{"model":"llama3","messages":[],"model":"mistral"}"#;
    let reply = post(b.frps.public(), "/v1/chat/completions", twice.into()).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "ambiguous_model");
    // As Ollama reads it: a name in another case is the same field, and an
    // escaped path is the path it spells.
    let twice = r#"{"model":"llama3","messages":[],"MODEL":"mistral"}"#;
    let reply = post(b.frps.public(), "/v1/chat/completions", twice.into()).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "ambiguous_model");
    for path in ["/v1/chat/%63ompletions", "/api/%67enerate"] {
        let reply = post(b.frps.public(), path, chat("mistral")).await;
        assert_eq!(reply.status, 404, "{path}: {}", reply.body);
        let reply = post(b.frps.public(), path, chat("llama3")).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    }
    for (_, c) in b.clients {
        c.kill().await;
    }
    b.frps.wait_for_clients(&[]).await;
    let reply = post(b.frps.public(), "/v1/chat/completions", chat("llama3")).await;
    assert_eq!(reply.status, 503);
    // A name no box could list (over 256 bytes, or with a control
    // character) is not looked for among the boxes (a 10 MiB one held
    // routing up): not found, whatever the fleet.
    for name in ["m".repeat(257), "llama3\u{1}".into(), "x".repeat(1 << 20)] {
        let reply = post(b.frps.public(), "/v1/chat/completions", chat(&name)).await;
        assert_eq!(
            reply.status,
            404,
            "{}",
            &reply.body[..reply.body.len().min(300)]
        );
        assert_eq!(reply.json()["error"]["code"], "model_not_found");
    }
    let reply = post(
        b.frps.public(),
        "/v1/chat/completions",
        chat(&"m".repeat(256)),
    )
    .await;
    assert_eq!(reply.status, 503, "a name a box could list is looked for");
}

#[tokio::test]
async fn the_fleets_models_are_listed_by_frps_itself() {
    let b = boxes(
        frps_config(),
        &[
            ("a", &["llama3:latest"], None),
            (
                "b",
                &["qwen2.5:1.5b", "llama3:latest", "org/tuned:v2"],
                None,
            ),
        ],
    )
    .await;
    let openai = http::get(b.frps.public(), "/v1/models", Some(API_KEY)).await;
    assert_eq!(openai.status, 200);
    let json = openai.json();
    assert_eq!(json["object"], "list");
    let ids: Vec<_> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama3:latest", "org/tuned:v2", "qwen2.5:1.5b"]);
    // OpenAI's "retrieve model" from the whole fleet, not from one box: a
    // name without a tag means `:latest`, and a slash may come encoded.
    for (path, id) in [
        ("/v1/models/llama3", "llama3:latest"),
        ("/v1/models/qwen2.5:1.5b", "qwen2.5:1.5b"),
        ("/v1/models/org/tuned:v2", "org/tuned:v2"),
        ("/v1/models/org%2Ftuned%3Av2", "org/tuned:v2"),
        // Escaped as the boxes' services would decode it: still frps's.
        ("/v1/%6dodels/qwen2.5:1.5b", "qwen2.5:1.5b"),
        ("/v1%2Fmodels/llama3", "llama3:latest"),
    ] {
        let one = http::get(b.frps.public(), path, Some(API_KEY)).await;
        assert_eq!(one.status, 200, "{path}: {}", one.body);
        assert_eq!(one.json()["id"], id, "{path}");
        assert_eq!(one.json()["object"], "model", "{path}");
    }
    for path in [
        "/v1/models/mistral",
        "/v1/models/",
        "/v1/models/org%2F",
        "/v1/%6dodels/mistral",
    ] {
        let missing = http::get(b.frps.public(), path, Some(API_KEY)).await;
        assert_eq!(missing.status, 404, "{path}: {}", missing.body);
        assert_eq!(missing.json()["error"]["code"], "model_not_found", "{path}");
    }
    assert_eq!(
        http::get(b.frps.public(), "/v1/models/llama3", None)
            .await
            .status,
        401
    );
    // A HEAD is answered as its GET, without the body.
    for path in ["/v1/models", "/api/tags", "/v1/models/llama3"] {
        let got = http::get(b.frps.public(), path, Some(API_KEY)).await;
        let req = http::request("HEAD", b.frps.public(), path, Some(API_KEY), Bytes::new());
        let mut conn = Conn::open(b.frps.public()).await;
        let head = http::read(conn.send(req).await.unwrap()).await;
        assert_eq!(head.status, 200, "{path}");
        assert_eq!(head.body, "", "{path}");
        let length = head.headers.get("content-length").unwrap();
        assert_eq!(
            length.to_str().unwrap(),
            got.body.len().to_string(),
            "{path}"
        );
    }
    let ollama = http::get(b.frps.public(), "/api/tags", Some(API_KEY))
        .await
        .json();
    let names: Vec<_> = ollama["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["llama3:latest", "org/tuned:v2", "qwen2.5:1.5b"]);
    // With every field Ollama gives (clients decoding it strictly need
    // them), filled where frps knows them.
    for m in ollama["models"].as_array().unwrap() {
        let since = m["modified_at"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(since).expect("RFC 3339");
        assert!(m["size"].is_u64() && m["digest"].is_string(), "{m}");
        for field in [
            "parent_model",
            "format",
            "family",
            "parameter_size",
            "quantization_level",
        ] {
            assert!(m["details"][field].is_string(), "{field}: {m}");
        }
    }
    // Authenticated like everything else, and never forwarded.
    assert_eq!(
        http::get(b.frps.public(), "/v1/models", None).await.status,
        401
    );
    assert!(b.backends.values().all(|be| be.hits() == 0));
}

/// A chat request for model `m` pinned to `client`, on a new connection.
async fn pinned(addr: std::net::SocketAddr, client: &str) -> Reply {
    pinned_chat(&mut Conn::open(addr).await, API_KEY, client, "m").await
}

/// A chat request for `model` with `key`, pinned (`X-Frpx-Client`) to
/// `client`, on `conn`.
async fn pinned_chat(conn: &mut Conn, key: &str, client: &str, model: &str) -> Reply {
    let req = ::http::Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", "x")
        .header("authorization", format!("Bearer {key}"))
        .header("x-frpx-client", client)
        .body(http_body_util::Full::new(Bytes::from(chat(model))))
        .unwrap();
    http::read(conn.send(req).await.unwrap()).await
}

#[tokio::test]
async fn x_frpx_client_pins_a_request() {
    let b = boxes(
        frps_config(),
        &[
            ("a", &["m"], None),
            ("b", &["m"], None),
            ("c", &["other"], None),
        ],
    )
    .await;
    for _ in 0..10 {
        let reply = pinned(b.frps.public(), "b").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["backend"], "b");
    }
    let reply = pinned(b.frps.public(), "nobody").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "client_not_found");
    // Pinned to a box without the model: the pin is named, not the fleet
    // (a and b serve it).
    let reply = pinned(b.frps.public(), "c").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "model_not_found");
    let said = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(said.contains("not served by client 'c'"), "{said}");
    // A box cooling down after failures is spared, pinned or not; the
    // caller is told when its cool-down ends.
    let cooling = b.frps.state.registry.get("b").unwrap();
    while cooling.record_failure().is_none_or(|d| d.as_secs() < 8) {}
    let reply = pinned(b.frps.public(), "b").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "no_healthy_clients");
    let wait: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((7..=8).contains(&wait), "{wait}");
    cooling.record_success();
    assert_eq!(pinned(b.frps.public(), "b").await.status, 200);
    // The header is frps's, not the box's.
    assert!(
        b.backends["b"]
            .seen()
            .iter()
            .all(|s| !s.headers.contains_key("x-frpx-client"))
    );
}

/// Starts a `/hold` request and returns once its first chunk arrived.
async fn hold(addr: std::net::SocketAddr) -> (String, hyper::body::Incoming) {
    let mut conn = Conn::open(addr).await;
    let req = http::request("GET", addr, "/hold", Some(API_KEY), Bytes::new());
    let resp = conn.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = String::from_utf8(first.into_data().unwrap().to_vec()).unwrap();
    let who = text.trim().strip_prefix("started ").unwrap().to_owned();
    // Keep the connection alive with the body.
    tokio::spawn(async move { drop(conn) });
    (who, body)
}

#[tokio::test]
async fn least_conn_spreads_concurrent_slow_requests_one_per_box() {
    let b = boxes(
        frps_config(),
        &[("a", &[], None), ("b", &[], None), ("c", &[], None)],
    )
    .await;
    let mut bodies = Vec::new();
    let mut who = HashSet::new();
    for _ in 0..3 {
        let (w, body) = hold(b.frps.public()).await;
        who.insert(w);
        bodies.push(body);
    }
    assert_eq!(who.len(), 3, "each box got exactly one: {who:?}");
    for be in b.backends.values() {
        be.release_holds();
    }
    for body in bodies {
        let rest = frpx_tests::whole(body).await.unwrap();
        assert!(rest.ends_with(b"done\n"));
    }
}

#[tokio::test]
async fn with_capacity_one_requests_queue_and_are_served_in_order() {
    let b = boxes(frps_config(), &[("solo", &["m"], Some(1))]).await;
    let state = b.frps.state.clone();
    let addr = b.frps.public();
    // The only slot is taken.
    let (_, held) = hold(addr).await;
    let mut tasks = Vec::new();
    for i in 1..=5 {
        let body = chat("m");
        tasks.push(tokio::spawn(async move {
            Conn::open(addr)
                .await
                .post(&format!("/sleep?ms=10&n={i}"), Some(API_KEY), body)
                .await
        }));
        frpx_tests::eventually("the request waits in line", || state.queues.total() == i).await;
    }
    assert_eq!(
        b.backends["solo"]
            .seen()
            .iter()
            .filter(|s| s.path == "/sleep")
            .count(),
        0,
        "nothing piled onto the box"
    );
    b.backends["solo"].release_holds();
    frpx_tests::whole(held).await.unwrap();
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let order: Vec<String> = b.backends["solo"]
        .seen()
        .into_iter()
        .filter(|s| s.path == "/sleep")
        .map(|s| s.query.unwrap_or_default())
        .collect();
    let expected: Vec<String> = (1..=5).map(|i| format!("ms=10&n={i}")).collect();
    assert_eq!(order, expected, "served in arrival order");
    assert_eq!(state.queues.total(), 0);
}

#[tokio::test]
async fn a_queued_request_goes_to_a_box_whose_cool_down_ends() {
    let mut cfg = frps_config();
    cfg.queue_timeout = Duration::from_secs(120);
    let b = boxes(cfg, &[("a", &["m"], Some(1)), ("b", &["m"], Some(1))]).await;
    let state = b.frps.state.clone();
    let addr = b.frps.public();
    // a cools down after failures (4 s: time enough to queue a request
    // on a busy machine); b's one slot is taken.
    let a = state.registry.get("a").unwrap();
    while !a.is_cooling_down() {
        frps::dispatch::record_failure(&state, &a);
    }
    frps::dispatch::record_failure(&state, &a);
    frps::dispatch::record_failure(&state, &a);
    let (who, held) = hold(addr).await;
    assert_eq!(who, "b");
    let waiting = tokio::spawn(async move {
        Conn::open(addr)
            .await
            .post("/v1/chat/completions", Some(API_KEY), chat("m"))
            .await
    });
    frpx_tests::eventually("the request waits in line", || state.queues.total() == 1).await;
    // Served by a once its cool-down is over, not when b frees its slot
    // (never, here) or the queue gives up (two minutes).
    let reply = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("served when the cool-down ended")
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "a");
    b.backends["b"].release_holds();
    frpx_tests::whole(held).await.unwrap();
}

#[tokio::test]
async fn a_request_pinned_to_a_busy_box_does_not_hold_up_the_others() {
    let mut cfg = frps_config();
    // Longer than the test waits: a request left waiting fails it.
    cfg.queue_timeout = Duration::from_secs(120);
    let b = boxes(cfg, &[("x", &["m"], Some(1)), ("y", &["m"], Some(1))]).await;
    let addr = b.frps.public();
    let mut held = HashMap::new();
    for _ in 0..2 {
        let (who, body) = hold(addr).await;
        held.insert(who, body);
    }
    assert_eq!(held.len(), 2, "one hold per box");
    let state = &b.frps.state;
    // First a request pinned to x, then one for any box serving m.
    let to_x = tokio::spawn(async move { pinned(addr, "x").await });
    frpx_tests::eventually("the pinned request waits", || state.queues.total() == 1).await;
    let to_any = tokio::spawn(async move { post(addr, "/v1/chat/completions", chat("m")).await });
    frpx_tests::eventually("both wait", || state.queues.total() == 2).await;
    assert_eq!(state.queues.depths(), vec![("m:latest".to_owned(), 2)]);
    // y frees its slot: the unpinned request takes it (it used to wait in
    // one queue behind the pinned one, which was woken and could not).
    b.backends["y"].release_holds();
    frpx_tests::whole(held.remove("y").unwrap()).await.unwrap();
    let reply = tokio::time::timeout(WAIT, to_any)
        .await
        .expect("served")
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["backend"], "y");
    assert_eq!(state.queues.total(), 1);
    b.backends["x"].release_holds();
    frpx_tests::whole(held.remove("x").unwrap()).await.unwrap();
    let reply = tokio::time::timeout(WAIT, to_x)
        .await
        .expect("served")
        .unwrap();
    assert_eq!(reply.json()["backend"], "x");
    // Queues exist only while requests wait in them.
    assert!(state.queues.is_empty());
}

#[tokio::test]
async fn names_no_box_serves_leave_no_queue_and_no_series() {
    // Listed as Ollama lists it, with its tag.
    let b = boxes(frps_config(), &[("x", &["m:latest"], Some(1))]).await;
    let addr = b.frps.public();
    let (_, held) = hold(addr).await;
    // The box is at capacity; none of these names is served.
    let long = "n".repeat(100_000);
    for name in ["unknown-model", " m-ish ", long.as_str()] {
        let reply = post(addr, "/v1/chat/completions", chat(name)).await;
        assert_eq!(reply.status, 404, "{}", reply.body);
        assert!(reply.body.len() < 1_000, "the name is not echoed whole");
    }
    assert!(b.frps.state.queues.is_empty());
    let metrics = http::get(b.frps.addrs.api, "/metrics", None).await.body;
    assert!(!metrics.contains("unknown-model") && !metrics.contains("nnnn"));
    b.backends["x"].release_holds();
    frpx_tests::whole(held).await.unwrap();
    // Spellings of one served model are one series.
    for name in ["m", " m ", "m:latest"] {
        let reply = post(addr, "/v1/chat/completions", chat(name)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let metrics = http::get(b.frps.addrs.api, "/metrics", None).await.body;
    let series: HashSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("frpx_requests_total{"))
        .filter_map(|l| l.split("model=\"").nth(1))
        .filter_map(|l| l.split('"').next())
        .filter(|m| !m.is_empty())
        .collect();
    assert_eq!(series, HashSet::from(["m:latest"]), "{metrics}");
}

#[tokio::test]
async fn a_full_or_timed_out_queue_answers_429_with_retry_after() {
    let mut cfg = frps_config();
    // Long enough for the checks below to run while one request waits,
    // on a loaded machine too.
    cfg.queue_timeout = Duration::from_secs(3);
    cfg.queue_max = 1;
    let b = boxes(cfg, &[("solo", &[], Some(1))]).await;
    let (_, held) = hold(b.frps.public()).await;
    let addr = b.frps.public();
    let waiting = tokio::spawn(async move { http::get(addr, "/x", Some(API_KEY)).await });
    frpx_tests::eventually("one request waits", || b.frps.state.queues.total() == 1).await;
    let stats = http::get(b.frps.addrs.api, "/api/stats", None).await.json();
    assert_eq!(stats["data"]["queue_depth"]["*"], 1, "{stats}");
    let metrics = http::get(b.frps.addrs.api, "/metrics", None).await.body;
    assert!(
        metrics.contains("frpx_queue_depth{model=\"*\"} 1"),
        "{metrics}"
    );
    // The queue (max 1) is full: refused at once.
    let full = http::get(addr, "/y", Some(API_KEY)).await;
    assert_eq!(full.status, 429, "{}", full.body);
    assert_eq!(full.json()["error"]["code"], "capacity_exceeded");
    assert!(full.headers.contains_key("retry-after"));
    // The waiting one gives up after the queue timeout.
    let timed_out = waiting.await.unwrap();
    assert_eq!(timed_out.status, 429);
    assert_eq!(
        timed_out.headers["retry-after"], "3",
        "the queue timeout, in seconds"
    );
    b.backends["solo"].release_holds();
    frpx_tests::whole(held).await.unwrap();
    assert_eq!(http::get(addr, "/z", Some(API_KEY)).await.status, 200);
}

#[tokio::test]
async fn a_box_killed_mid_run_fails_no_request_that_had_not_started_streaming() {
    let mut b = boxes(
        frps_config(),
        &[
            ("a", &["m"], None),
            ("b", &["m"], None),
            ("c", &["m"], None),
        ],
    )
    .await;
    let addr = b.frps.public();
    let mut tasks = Vec::new();
    for i in 0..120 {
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let req = http::request(
                "POST",
                addr,
                "/v1/chat/completions",
                Some(API_KEY),
                Bytes::from(chat("m")),
            );
            match conn.send(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    // A failure after the response started is reported by
                    // closing the stream; that is allowed, nothing else is.
                    let complete = frpx_tests::whole(resp.into_body()).await.is_ok();
                    (status.as_u16(), complete)
                }
                Err(e) => panic!("request {i} failed before any response: {e}"),
            }
        }));
        if i == 40 {
            b.clients.remove("b").unwrap().kill().await;
        }
    }
    let mut ok = 0;
    for t in tasks {
        let (status, complete) = t.await.unwrap();
        assert_eq!(
            status, 200,
            "no request that had not started streaming may fail"
        );
        if complete {
            ok += 1;
        }
    }
    assert!(
        ok >= 110,
        "only streams cut mid-body may fail: {ok}/120 complete"
    );
}

#[tokio::test]
async fn a_caller_that_leaves_while_queued_gives_up_its_place() {
    let mut cfg = frps_config();
    cfg.queue_timeout = Duration::from_secs(120);
    let b = boxes(cfg, &[("a", &["m"], Some(1))]).await;
    let addr = b.frps.public();
    let (_, held) = hold(addr).await;
    let state = &b.frps.state;
    for close in ["fin", "reset"] {
        let mut caller = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = chat("m");
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut caller, head.as_bytes())
            .await
            .unwrap();
        frpx_tests::eventually("the request waits", || state.queues.total() == 1).await;
        if close == "reset" {
            caller.set_zero_linger().unwrap();
        }
        drop(caller);
        frpx_tests::eventually(&format!("the queue place is given up ({close})"), || {
            state.queues.total() == 0
        })
        .await;
    }
    b.backends["a"].release_holds();
    frpx_tests::whole(held).await.unwrap();
    // A request through the one slot: a queued one wrongly woken by its
    // freeing would have gone first.
    let after = post(addr, "/v1/chat/completions?after", chat("m")).await;
    assert_eq!(after.status, 200, "{}", after.body);
    // Neither request reached the box after the slot freed.
    assert_eq!(
        b.backends["a"]
            .seen()
            .iter()
            .filter(|s| s.path == "/v1/chat/completions" && s.query.as_deref() != Some("after"))
            .count(),
        0
    );
}

#[tokio::test]
async fn a_caller_that_disconnects_cancels_the_upstream_request() {
    let b = boxes(frps_config(), &[("a", &[], None)]).await;
    let (_, body) = hold(b.frps.public()).await;
    assert_eq!(b.backends["a"].holding(), 1);
    drop(body);
    frpx_tests::eventually("the backend sees the caller leave", || {
        b.backends["a"].cancelled() == 1
    })
    .await;
    frpx_tests::eventually("the slot is freed", || {
        b.frps
            .state
            .registry
            .get("a")
            .unwrap()
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
    })
    .await;
}

#[tokio::test]
async fn a_request_queued_when_shutdown_starts_is_still_served() {
    let b = boxes(frps_config(), &[("solo", &["m"], Some(1))]).await;
    let Boxes {
        frps,
        backends,
        clients: _clients,
    } = b;
    let state = frps.state.clone();
    let addr = frps.public();
    // The only slot is taken; a second request waits for it.
    let (_, held) = hold(addr).await;
    let queued = tokio::spawn(async move {
        Conn::open(addr)
            .await
            .post("/sleep?ms=10", Some(API_KEY), chat("m"))
            .await
    });
    frpx_tests::eventually("the request waits in line", || state.queues.total() == 1).await;

    let stopping = tokio::spawn(frps.stop());
    frpx_tests::eventually("the public port stops accepting", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    // While frps drains, the box stays registered and can still dial back:
    // the queued request gets the slot once the first one ends.
    backends["solo"].release_holds();
    frpx_tests::whole(held).await.unwrap();
    let reply = queued.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        backends["solo"]
            .seen()
            .iter()
            .filter(|s| s.path == "/sleep")
            .count(),
        1
    );
    stopping.await.unwrap();
}

/// Requests queued for the only client serving their model are answered
/// as soon as it leaves (503: no client is online), not when the queue
/// times out; one pinned to it likewise (404 `client_not_found`).
#[tokio::test]
async fn queued_requests_hear_at_once_that_their_only_client_left() {
    use common::{Command, PROTOCOL_VERSION, Registration, protocol::ModelInfo};
    let mut cfg = frps_config();
    cfg.queue_timeout = Duration::from_secs(120);
    // The silent fake client is not evicted while the test runs.
    cfg.heartbeat_interval = Duration::from_secs(60);
    let frps = Frps::start(cfg).await;
    let registration = Registration {
        client_id: "only".into(),
        machine_id: "machine-only".into(),
        protocol_version: PROTOCOL_VERSION,
        models: vec![ModelInfo {
            name: "m:latest".into(),
            size: None,
        }],
        max_concurrency: Some(1),
        ..Default::default()
    };
    let token = frps.client_token().await;
    let (fake, answer) =
        frpx_tests::fake::FakeClient::register_as(frps.addrs.control, &token, registration).await;
    assert!(matches!(answer, Command::Registered { .. }), "{answer:?}");
    // Its one slot is taken (as by a long stream).
    let client = frps.state.registry.get("only").unwrap();
    assert!(client.try_reserve());
    let public = frps.public();
    let queued = tokio::spawn(post(public, "/v1/chat/completions", chat("m")));
    let pinned = tokio::spawn(async move {
        let mut conn = Conn::open(public).await;
        let mut req = http::request("GET", public, "/x", Some(API_KEY), Bytes::new());
        req.headers_mut()
            .insert("x-frpx-client", "only".parse().unwrap());
        http::read(conn.send(req).await.unwrap()).await
    });
    let state = frps.state.clone();
    frpx_tests::eventually("both wait", || state.queues.total() == 2).await;
    drop(fake);
    let started = std::time::Instant::now();
    let reply = tokio::time::timeout(WAIT, queued)
        .await
        .expect("answered once the client left")
        .unwrap();
    // No client is online at all now: 503, as for an empty fleet.
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "no_clients_available");
    let reply = tokio::time::timeout(WAIT, pinned)
        .await
        .expect("answered once the client left")
        .unwrap();
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "client_not_found");
    assert!(started.elapsed() < WAIT);
    client.release_slot();
}
