//! `GET /v1/models`, `GET /v1/models/{model}` and `GET /api/tags` on the
//! public port, answered by frps itself from the union of the models of
//! every online client.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{Either, Full};
use serde_json::json;

use super::public::{PublicBody, error_response};
use crate::state::State;

/// The fleet's models in OpenAI's shape, or Ollama's when `ollama`.
pub fn list(state: &State, ollama: bool) -> Response<PublicBody> {
    // Each name's size (the first box to know it) and since when a box
    // online serves it.
    type Seen = (Option<u64>, chrono::DateTime<chrono::Utc>);
    let mut models: BTreeMap<String, Seen> = BTreeMap::new();
    for c in state.registry.online() {
        c.with_models(|ms| {
            for m in ms {
                let (size, since) = models
                    .entry(m.name.clone())
                    .or_insert((None, c.connected_at));
                *size = size.or(m.size);
                *since = (*since).min(c.connected_at);
            }
        });
    }
    let body = if ollama {
        // Ollama's fields, all of them: clients decoding its list strictly
        // (typed ones) need `modified_at`, `digest` and `details`, which
        // the boxes do not report: empty, and the time the model came
        // online here.
        let list: Vec<_> = models
            .iter()
            .map(|(name, (size, since))| {
                json!({
                    "name": name,
                    "model": name,
                    "modified_at": since.to_rfc3339(),
                    "size": size.unwrap_or(0),
                    "digest": "",
                    "details": {
                        "parent_model": "",
                        "format": "",
                        "family": "",
                        "families": null,
                        "parameter_size": "",
                        "quantization_level": "",
                    },
                })
            })
            .collect();
        json!({ "models": list })
    } else {
        let list: Vec<_> = models
            .keys()
            .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "frpx"}))
            .collect();
        json!({ "object": "list", "data": list })
    };
    json_response(&body)
}

/// OpenAI's "retrieve model": the model `wanted`, the rest of the
/// percent-decoded path (names such as `org/model` may come as `org%2Fmodel`)
/// if an online client serves it, else 404 `model_not_found`. Answered here
/// rather than by one box, which would know only its own models.
pub fn one(state: &State, wanted: &str) -> Response<PublicBody> {
    let found = if wanted.trim().is_empty() {
        None
    } else {
        state
            .registry
            .online()
            .iter()
            .find_map(|c| crate::router::listed_name(c, wanted))
    };
    match found {
        Some(name) => {
            json_response(&json!({"id": name, "object": "model", "created": 0, "owned_by": "frpx"}))
        }
        None => error_response(
            StatusCode::NOT_FOUND,
            &format!(
                "The model `{}` does not exist on any online client",
                super::public::shorten(wanted, 200)
            ),
            "invalid_request_error",
            "model_not_found",
        ),
    }
}

fn json_response(body: &serde_json::Value) -> Response<PublicBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
