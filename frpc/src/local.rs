//! The local model service: probing it for its models.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Command, MAX_FRAME, ModelInfo, Registration};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tracing::{debug, warn};

/// Largest model-list body read from the local service. It may list more
/// models than a control frame can carry: see [`ModelFit`].
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Room kept for the host name, which is read again at every registration
/// and so may differ from the one the budget was computed with.
const HOSTNAME_ROOM: usize = 1024;

/// A registration that cannot fit in a control frame whatever the models:
/// frps would refuse every attempt, so frpc stops at start instead.
#[derive(Debug, thiserror::Error)]
#[error(
    "the registration takes {len} bytes before any model (client id, --meta and --proxy-meta values, room for the host name), more than a control frame carries ({MAX_FRAME} bytes): shorten the metadata"
)]
pub struct RegistrationTooLarge {
    /// Encoded size without models, host-name room included.
    pub len: usize,
}

/// Trims model lists to what fits in one control frame.
///
/// The models travel in `Register` and `ModelsUpdate`, each of which must
/// fit in [`MAX_FRAME`] bytes; a service listing more (thousands of models,
/// long names) would otherwise make every registration fail. When the list
/// is too long, the models are taken in name order (whatever order the
/// service lists them in) and as many as fit are kept; the rest are left
/// out, with a warning the first time.
///
/// It also remembers which list the service answered last
/// ([`ModelFit::listed`]).
#[derive(Debug)]
pub struct ModelFit {
    /// Bytes available to the encoded model list (between its brackets).
    budget: usize,
    warned: AtomicBool,
    /// Whether names frps would not keep were said.
    unkept_warned: AtomicBool,
    /// Which model list the service gave last.
    pub listed: Listed,
}

/// Which model list the local service gave at the last probe: a service
/// that gave OpenAI's `/v1/models` (vLLM, llama.cpp) is asked for it
/// first, so each probe does not cost it a 404 for `/api/tags` (which
/// vLLM logs at every probe).
#[derive(Debug, Default)]
pub struct Listed {
    openai: AtomicBool,
}

impl ModelFit {
    /// The fit for the frames of a client registering with `template`
    /// (whose models, host name and health are ignored); an error when
    /// even a registration without models would not fit in a frame.
    pub fn new(template: &Registration) -> Result<ModelFit, RegistrationTooLarge> {
        let mut reg = template.clone();
        reg.models.clear();
        reg.hostname.clear();
        reg.service_up = false;
        let register = encoded_len(&Command::Register(reg)) + HOSTNAME_ROOM;
        let update = encoded_len(&Command::ModelsUpdate {
            models: Vec::new(),
            service_up: false,
        });
        if register > MAX_FRAME {
            return Err(RegistrationTooLarge { len: register });
        }
        Ok(ModelFit {
            budget: MAX_FRAME.saturating_sub(register.max(update)),
            warned: AtomicBool::new(false),
            unkept_warned: AtomicBool::new(false),
            listed: Listed::default(),
        })
    }

    /// `models` as frps keeps them and as they fit: names frps does not
    /// keep ([`common::model_name_kept`]) and repeats left out; then,
    /// unchanged when the rest are at most [`common::MAX_MODELS`] and fit a
    /// frame, else the first by name of those, as many as fit.
    pub fn fit(&self, mut models: Vec<ModelInfo>) -> Vec<ModelInfo> {
        let (unkept, _) = common::keep_named_models(&mut models);
        if unkept > 0 && !self.unkept_warned.swap(true, Ordering::Relaxed) {
            warn!(
                "the local service lists {unkept} model name(s) frps does not take (empty, longer than {} bytes, or with control characters): they are not announced",
                common::MAX_MODEL_NAME
            );
        }
        let listed = models.len();
        // In a JSON array the entries are separated by commas.
        let total: usize = models.iter().map(encoded_len).sum::<usize>() + listed.saturating_sub(1);
        if total <= self.budget && listed <= common::MAX_MODELS {
            return models;
        }
        models.sort_by(|a, b| a.name.cmp(&b.name).then(a.size.cmp(&b.size)));
        let mut used = 0;
        let mut kept = 0;
        for model in models.iter().take(common::MAX_MODELS) {
            let need = encoded_len(model) + usize::from(kept > 0);
            if used + need > self.budget {
                break;
            }
            used += need;
            kept += 1;
        }
        models.truncate(kept);
        let left_out = listed - kept;
        let why = if total > self.budget {
            format!("more than fit in a {MAX_FRAME}-byte control frame")
        } else {
            format!(
                "more than the {} frps takes from one box",
                common::MAX_MODELS
            )
        };
        if !self.warned.swap(true, Ordering::Relaxed) {
            warn!(
                "the local service lists {listed} models, {why}: announcing the first {kept} by name to frps and leaving out {left_out}, which frps will not route requests for"
            );
        } else {
            debug!("announcing {kept} of {listed} models; {left_out} left out: {why}");
        }
        models
    }
}

/// Length of `value` encoded as JSON, as frames carry it.
fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_vec(value)
        .expect("protocol types always encode")
        .len()
}

/// Why the local service could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Could not connect or talk HTTP.
    #[error("local service unreachable: {0}")]
    Unreachable(String),
    /// Answered, but not with a model list we understand.
    #[error("local service answered {status} on {path}")]
    Status {
        /// Path probed.
        path: &'static str,
        /// Status received.
        status: u16,
    },
    /// Answered 200 with a body that is not a model list.
    #[error("unreadable model list from {path}: {detail}")]
    Body {
        /// Path probed.
        path: &'static str,
        /// Parse error.
        detail: String,
    },
    /// No answer in time.
    #[error("local service did not answer within {0:?}")]
    Timeout(Duration),
}

impl ProbeError {
    /// What kind of answer this was, without details that change from
    /// one answer to the next (a parse error's position): the same kind
    /// twice is the same reason.
    pub fn kind(&self) -> String {
        match self {
            ProbeError::Unreachable(_) => "unreachable".into(),
            ProbeError::Status { path, status } => format!("{status} on {path}"),
            ProbeError::Body { path, .. } => format!("unreadable list on {path}"),
            ProbeError::Timeout(_) => "timeout".into(),
        }
    }
}

#[derive(Deserialize)]
struct OllamaTags {
    models: Vec<OllamaModel>,
}

#[derive(Deserialize)]
struct OllamaModel {
    name: String,
    /// Bytes in Ollama; llama.cpp's imitation of `/api/tags` sends `""`.
    #[serde(default)]
    size: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OpenAiModels {
    data: Vec<OpenAiModel>,
}

#[derive(Deserialize)]
struct OpenAiModel {
    id: String,
}

/// Lists the models served at `host` (`addr:port`): Ollama's `/api/tags`,
/// falling back to OpenAI's `/v1/models` (vLLM, llama.cpp); a service that
/// gave OpenAI's list last time (`listed`) is asked for it first.
pub async fn models(
    host: &str,
    limit: Duration,
    listed: &Listed,
) -> Result<Vec<ModelInfo>, ProbeError> {
    tokio::time::timeout(limit, async {
        if listed.openai.load(Ordering::Relaxed) {
            match get(host, "/v1/models").await {
                Ok(body) => {
                    if let Ok(models) = parse_openai(&body) {
                        return Ok(models);
                    }
                }
                // No list there any more (another service on the port,
                // an Ollama now, say): both are tried again below.
                Err(ProbeError::Status { status: 404, .. }) => {}
                // Down, not ready, refusing: as it is, not a reason to
                // ask for Ollama's list too.
                Err(e) => return Err(e),
            }
            listed.openai.store(false, Ordering::Relaxed);
        }
        match get(host, "/api/tags").await {
            Ok(body) => match parse_ollama(&body) {
                Ok(models) => Ok(models),
                // Not Ollama's list after all: OpenAI's, if it has one.
                Err(unreadable) => match get(host, "/v1/models").await {
                    Ok(body) => parse_openai(&body),
                    Err(_) => Err(unreadable),
                },
            },
            Err(ProbeError::Unreachable(e)) => Err(ProbeError::Unreachable(e)),
            // No Ollama list there at all: a service that gives OpenAI's
            // is asked for it first from now on. (Not after another
            // failure: an Ollama answering 500 once also serves OpenAI's
            // list, without the sizes its own carries.)
            Err(ProbeError::Status { status: 404, .. }) => {
                let models = parse_openai(&get(host, "/v1/models").await?)?;
                listed.openai.store(true, Ordering::Relaxed);
                Ok(models)
            }
            Err(_) => parse_openai(&get(host, "/v1/models").await?),
        }
    })
    .await
    .map_err(|_| ProbeError::Timeout(limit))?
}

fn parse_ollama(body: &[u8]) -> Result<Vec<ModelInfo>, ProbeError> {
    let tags: OllamaTags = serde_json::from_slice(body).map_err(|e| ProbeError::Body {
        path: "/api/tags",
        detail: e.to_string(),
    })?;
    Ok(tags
        .models
        .into_iter()
        .map(|m| ModelInfo {
            name: m.name,
            size: m.size.and_then(|s| s.as_u64()),
        })
        .collect())
}

fn parse_openai(body: &[u8]) -> Result<Vec<ModelInfo>, ProbeError> {
    let list: OpenAiModels = serde_json::from_slice(body).map_err(|e| ProbeError::Body {
        path: "/v1/models",
        detail: e.to_string(),
    })?;
    Ok(list
        .data
        .into_iter()
        .map(|m| ModelInfo {
            name: m.id,
            size: None,
        })
        .collect())
}

/// One GET over a fresh connection; the body of a 200, else an error.
async fn get(host: &str, path: &'static str) -> Result<Bytes, ProbeError> {
    let unreachable = |e: &dyn std::fmt::Display| ProbeError::Unreachable(format!("{host}: {e}"));
    let stream = common::stream::connect_any(host)
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(&e))?;
    let conn = tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .expect("static request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(&e))?;
    let status = resp.status().as_u16();
    if status != 200 {
        conn.abort();
        return Err(ProbeError::Status { path, status });
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ProbeError::Body {
            path,
            detail: e.to_string(),
        })?
        .to_bytes();
    conn.abort();
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::testing::logged;
    use std::sync::Arc;

    #[test]
    fn both_model_list_shapes_parse() {
        let ollama = br#"{"models":[{"name":"qwen2.5:1.5b","size":986061892,"digest":"x"}]}"#;
        assert_eq!(
            parse_ollama(ollama).unwrap(),
            vec![ModelInfo {
                name: "qwen2.5:1.5b".into(),
                size: Some(986061892)
            }]
        );
        let openai =
            br#"{"object":"list","data":[{"id":"meta-llama/Llama-3-8B","object":"model"}]}"#;
        assert_eq!(
            parse_openai(openai).unwrap()[0].name,
            "meta-llama/Llama-3-8B"
        );
        assert!(parse_ollama(b"<html>").is_err());
        // llama.cpp's server imitates /api/tags with empty strings for what
        // it does not know.
        let llama_cpp = br#"{"models":[{"name":"Qwen3-8B-Q4_K_M.gguf","model":"Qwen3-8B-Q4_K_M.gguf","modified_at":"","size":"","digest":"","type":"model","details":{"format":"gguf"}}],"object":"list","data":[]}"#;
        assert_eq!(
            parse_ollama(llama_cpp).unwrap(),
            vec![ModelInfo {
                name: "Qwen3-8B-Q4_K_M.gguf".into(),
                size: None
            }]
        );
    }

    fn template() -> Registration {
        Registration {
            client_id: "gpu-01".into(),
            machine_id: "0123456789abcdef".into(),
            hostname: "gpu-01.lab".into(),
            version: "0.1.0".into(),
            metas: [("token".to_owned(), "x".repeat(500))].into(),
            local_host: "127.0.0.1:11434".into(),
            ..Default::default()
        }
    }

    #[test]
    fn metadata_too_large_for_any_registration_is_refused_up_front() {
        let mut reg = template();
        reg.metas.insert("notes".into(), "n".repeat(MAX_FRAME));
        let err = ModelFit::new(&reg).unwrap_err();
        assert!(err.len > MAX_FRAME, "{err}");
        assert!(err.to_string().contains("--meta"), "{err}");
        // Just under the limit still registers (without room for models).
        let mut reg = template();
        let base = ModelFit::new(&reg).unwrap();
        assert!(base.budget > 0);
        reg.metas
            .insert("notes".into(), "n".repeat(MAX_FRAME - 3_000));
        assert!(ModelFit::new(&reg).is_ok());
    }

    /// frpc announces what frps keeps: at most 1,024 models (the first by
    /// name, not the first 1,024 the service happens to list), names frps
    /// takes, each once.
    #[test]
    fn the_models_announced_are_those_frps_keeps() {
        let short: Vec<ModelInfo> = (0..1_500)
            .rev()
            .map(|i| ModelInfo {
                name: format!("m{i:04}"),
                size: None,
            })
            .collect();
        let fit = ModelFit::new(&template()).unwrap();
        let (kept, warning) = logged(|| fit.fit(short.clone()));
        assert_eq!(kept.len(), common::MAX_MODELS);
        assert_eq!(kept[0].name, "m0000");
        assert_eq!(kept[common::MAX_MODELS - 1].name, "m1023");
        assert!(
            warning.contains("lists 1500 models")
                && warning.contains("more than the 1024 frps takes")
                && warning.contains("leaving out 476"),
            "{warning}"
        );
        let named = |name: &str| ModelInfo {
            name: name.into(),
            size: None,
        };
        let odd = vec![
            named("llama3:latest"),
            named(""),
            named("bad\nname"),
            named(&"x".repeat(common::MAX_MODEL_NAME + 1)),
            named("llama3:latest"),
            named("mistral"),
        ];
        let fit = ModelFit::new(&template()).unwrap();
        let (kept, warning) = logged(|| fit.fit(odd));
        assert_eq!(kept, [named("llama3:latest"), named("mistral")]);
        assert!(
            warning.contains("lists 3 model name(s) frps does not take"),
            "{warning}"
        );
        // Said once.
        let (_, again) = logged(|| fit.fit(vec![named("")]));
        assert!(!again.contains("WARN"), "{again}");
    }

    #[test]
    fn a_model_list_too_long_for_a_frame_is_trimmed_by_name_with_one_warning() {
        // Listed in reverse name order, as a service might.
        let models: Vec<ModelInfo> = (0..5_000)
            .rev()
            .map(|i| ModelInfo {
                name: format!("{i:05}-{}", "long-model-name/".repeat(6)),
                size: Some(1 << 40),
            })
            .collect();
        let fit = ModelFit::new(&template()).unwrap();
        let (kept, warning) = logged(|| fit.fit(models.clone()));
        assert!(
            !kept.is_empty() && kept.len() < models.len(),
            "{}",
            kept.len()
        );
        let mut first_by_name = models.clone();
        first_by_name.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            kept,
            first_by_name[..kept.len()],
            "the first by name are kept"
        );
        let left_out = models.len() - kept.len();
        assert!(
            warning.contains("WARN")
                && warning.contains("lists 5000 models")
                && warning.contains(&format!("leaving out {left_out}")),
            "{warning}"
        );

        // Both frames that carry the list fit, with any host name.
        let mut reg = template();
        reg.hostname = "h".repeat(255);
        reg.models = kept.clone();
        let register = common::codec::encode(&Command::Register(reg), MAX_FRAME).unwrap();
        assert!(register.len() > MAX_FRAME * 9 / 10, "little room is wasted");
        let update = Command::ModelsUpdate {
            models: kept.clone(),
            service_up: true,
        };
        common::codec::encode(&update, MAX_FRAME).unwrap();

        // The next probe keeps the same models, without warning again.
        let (again, warning) = logged(|| fit.fit(models.into_iter().rev().collect()));
        assert_eq!(again, kept);
        assert!(warning.is_empty(), "{warning}");
    }

    #[test]
    fn a_model_list_that_fits_is_left_as_listed() {
        let models = vec![
            ModelInfo {
                name: "qwen2.5:1.5b".into(),
                size: Some(1),
            },
            ModelInfo {
                name: "llama3:8b".into(),
                size: None,
            },
        ];
        let (kept, warning) = logged(|| ModelFit::new(&template()).unwrap().fit(models.clone()));
        assert_eq!(kept, models);
        assert!(warning.is_empty(), "{warning}");
    }

    #[tokio::test]
    async fn an_unreadable_ollama_list_falls_back_to_openais() {
        let answers = Arc::new(std::sync::Mutex::new(vec![
            ("/api/tags", 200, "<html>a web UI, not a model list</html>"),
            (
                "/v1/models",
                200,
                r#"{"object":"list","data":[{"id":"served-model"}]}"#,
            ),
        ]));
        let (addr, asked) = service(answers).await;
        let listed = models(&addr, Duration::from_secs(5), &Listed::default())
            .await
            .unwrap();
        assert_eq!(listed[0].name, "served-model");
        assert_eq!(*asked.lock().unwrap(), ["/api/tags", "/v1/models"]);
    }

    /// The `(path, status, body)` a test service answers with.
    type Answers = Arc<std::sync::Mutex<Vec<(&'static str, u16, &'static str)>>>;

    /// A local service answering the probes with the `(path, status, body)`
    /// of `answers` (404 for other paths), taken from the shared list at
    /// each request; the paths it was asked for.
    async fn service(answers: Answers) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut head = vec![0u8; 4096];
                let n = s.read(&mut head).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&head[..n]).into_owned();
                let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                seen.lock().unwrap().push(path.clone());
                let (status, body) = answers
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(p, _, _)| *p == path)
                    .map_or((404, "not found"), |&(_, status, body)| (status, body));
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        (addr, asked)
    }

    /// A vLLM (OpenAI's list only) is asked for that list first once it
    /// gave it; replaced by an Ollama, Ollama's list is asked for again;
    /// not ready, it is said so without a second request.
    #[tokio::test]
    async fn a_service_is_asked_first_for_the_list_it_gave() {
        const OPENAI: &str = r#"{"object":"list","data":[{"id":"mistral"}]}"#;
        const OLLAMA: &str = r#"{"models":[{"name":"llama3:latest","size":1}]}"#;
        let answers = Arc::new(std::sync::Mutex::new(vec![("/v1/models", 200, OPENAI)]));
        let (addr, asked) = service(answers.clone()).await;
        let listed = Listed::default();
        let probe = || models(&addr, Duration::from_secs(5), &listed);
        let take = || std::mem::take(&mut *asked.lock().unwrap());
        assert_eq!(probe().await.unwrap()[0].name, "mistral");
        assert_eq!(take(), ["/api/tags", "/v1/models"]);
        assert_eq!(probe().await.unwrap()[0].name, "mistral");
        assert_eq!(take(), ["/v1/models"]);
        // Loading again (llama.cpp's 503): said at once.
        *answers.lock().unwrap() = vec![("/v1/models", 503, "loading")];
        let err = probe().await.unwrap_err();
        assert!(
            matches!(err, ProbeError::Status { status: 503, .. }),
            "{err}"
        );
        assert_eq!(take(), ["/v1/models"]);
        // An Ollama on the port now.
        *answers.lock().unwrap() = vec![("/api/tags", 200, OLLAMA)];
        assert_eq!(probe().await.unwrap()[0].name, "llama3:latest");
        assert_eq!(take(), ["/v1/models", "/api/tags"]);
        assert_eq!(probe().await.unwrap()[0].name, "llama3:latest");
        assert_eq!(take(), ["/api/tags"]);
        // Its list failing once (it serves OpenAI's too): Ollama's is
        // still asked first at the next probe, for the sizes.
        *answers.lock().unwrap() = vec![("/api/tags", 500, "oops"), ("/v1/models", 200, OPENAI)];
        assert_eq!(probe().await.unwrap()[0].name, "mistral");
        assert_eq!(take(), ["/api/tags", "/v1/models"]);
        *answers.lock().unwrap() = vec![("/api/tags", 200, OLLAMA), ("/v1/models", 200, OPENAI)];
        assert_eq!(probe().await.unwrap()[0].name, "llama3:latest");
        assert_eq!(take(), ["/api/tags"]);
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let err = models(&addr, Duration::from_secs(5), &Listed::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Unreachable(_)), "{err}");
    }
}
