//! `GET /v1/models` and `GET /api/tags` on the public port, answered by frps
//! itself: the union of the models of every online client.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Response, header};
use http_body_util::{Either, Full};
use serde_json::json;

use super::public::PublicBody;
use crate::state::State;

/// The fleet's models in OpenAI's shape, or Ollama's when `ollama`.
pub fn list(state: &State, ollama: bool) -> Response<PublicBody> {
    let mut models: BTreeMap<String, Option<u64>> = BTreeMap::new();
    for c in state.registry.all() {
        if c.kick.is_cancelled() {
            continue;
        }
        c.with_models(|ms| {
            for m in ms {
                let size = models.entry(m.name.clone()).or_insert(None);
                *size = size.or(m.size);
            }
        });
    }
    let body = if ollama {
        let list: Vec<_> = models
            .iter()
            .map(|(name, size)| json!({"name": name, "model": name, "size": size.unwrap_or(0)}))
            .collect();
        json!({ "models": list })
    } else {
        let list: Vec<_> = models
            .keys()
            .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "frpx"}))
            .collect();
        json!({ "object": "list", "data": list })
    };
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
