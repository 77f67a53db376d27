//! The local model service: probing it for its models.

use std::time::Duration;

use bytes::Bytes;
use common::ModelInfo;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// Largest model-list body read from the local service.
const MAX_BODY: usize = 4 * 1024 * 1024;

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

#[derive(Deserialize)]
struct OllamaTags {
    models: Vec<OllamaModel>,
}

#[derive(Deserialize)]
struct OllamaModel {
    name: String,
    #[serde(default)]
    size: Option<u64>,
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
/// falling back to OpenAI's `/v1/models` (vLLM, llama.cpp).
pub async fn models(host: &str, limit: Duration) -> Result<Vec<ModelInfo>, ProbeError> {
    tokio::time::timeout(limit, async {
        match get(host, "/api/tags").await {
            Ok(body) => parse_ollama(&body),
            Err(ProbeError::Unreachable(e)) => Err(ProbeError::Unreachable(e)),
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
            size: m.size,
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
    let stream = TcpStream::connect(host)
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
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let err = models(&addr, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Unreachable(_)), "{err}");
    }
}
