//! One plugin call: `POST http://ADDR/PATH?version=0.1.0&op=OP` over a fresh
//! HTTP/1.1 connection, and the reading of the plugin's answer.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Deserializer};
use tokio::net::TcpStream;

/// Version of frp's plugin protocol, sent in the query and the body.
pub const API_VERSION: &str = "0.1.0";

/// Largest answer read from a plugin, in bytes.
pub const MAX_ANSWER: usize = 64 * 1024;

/// Why a call produced no usable answer. None of these carry the plugin's
/// address, so they may be shown to clients.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No TCP connection to the plugin.
    #[error("unreachable: {0}")]
    Connect(std::io::Error),
    /// No complete answer within the plugin timeout.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The HTTP exchange failed.
    #[error("HTTP exchange failed: {0}")]
    Http(String),
    /// The plugin answered with a status other than 200.
    #[error("answered HTTP {0}")]
    Status(StatusCode),
    /// The answer was longer than [`MAX_ANSWER`].
    #[error("answer longer than {MAX_ANSWER} bytes")]
    TooLarge,
    /// The answer is not one the protocol allows.
    #[error("invalid answer: {0}")]
    Invalid(String),
}

/// What a plugin decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Refuse the operation for this reason.
    Reject(String),
    /// Proceed with the content as sent.
    Unchanged,
    /// Proceed with this content instead.
    Replaced(serde_json::Value),
}

/// Sends `body` to `path_and_query` at `addr` and returns the answer body of
/// a 200 response. The connection lives only as long as the call.
pub async fn post(
    addr: &str,
    path_and_query: &str,
    reqid: &str,
    body: Vec<u8>,
) -> Result<Bytes, CallError> {
    let uri: Uri = path_and_query
        .parse()
        .map_err(|e| CallError::Http(format!("bad request path: {e}")))?;
    let request = Request::post(uri)
        .header(HOST, addr)
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("frps/", env!("CARGO_PKG_VERSION")))
        .header("X-Frp-Reqid", reqid)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| CallError::Http(e.to_string()))?;
    let stream = TcpStream::connect(addr).await.map_err(CallError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CallError::Http(e.to_string()))?;
    // The sender is dropped when the exchange ends, which closes the
    // connection and lets `conn` finish too.
    let exchange = async move {
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| CallError::Http(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            return Err(CallError::Status(resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    CallError::TooLarge
                } else {
                    CallError::Http(e.to_string())
                }
            })?;
        Ok(body.to_bytes())
    };
    let (answer, _) = tokio::join!(exchange, conn);
    answer
}

/// A boolean, or its string form (`"true"`, `"false"`) as frp's documentation
/// shows for `unchange`; `null` counts as absent.
fn flexible_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Text(String),
    }
    match Option::<Flag>::deserialize(d)? {
        None => Ok(None),
        Some(Flag::Bool(b)) => Ok(Some(b)),
        Some(Flag::Text(t)) => match t.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(serde::de::Error::custom(format!(
                "`{t}` is neither true nor false"
            ))),
        },
    }
}

#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(default, deserialize_with = "flexible_bool")]
    reject: Option<bool>,
    #[serde(default)]
    reject_reason: Option<String>,
    #[serde(default, deserialize_with = "flexible_bool")]
    unchange: Option<bool>,
    #[serde(default)]
    content: Option<serde_json::Value>,
}

/// Reads a plugin's answer. `unchange` may be a boolean or a string; when it
/// is absent, a `content` object replaces the content (as in frp) and no
/// content means unchanged.
pub fn verdict(body: &[u8]) -> Result<Verdict, CallError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| CallError::Invalid(format!("not JSON ({e})")))?;
    if !value.is_object() {
        return Err(CallError::Invalid("not a JSON object".into()));
    }
    let answer: Answer =
        serde_json::from_value(value).map_err(|e| CallError::Invalid(e.to_string()))?;
    if answer.reject == Some(true) {
        let reason = answer.reject_reason.unwrap_or_default();
        return Ok(Verdict::Reject(reason));
    }
    let content = answer.content.filter(|c| !c.is_null());
    match (answer.unchange, content) {
        (Some(true), _) | (None, None) => Ok(Verdict::Unchanged),
        (_, Some(c)) if c.is_object() => Ok(Verdict::Replaced(c)),
        (_, Some(_)) => Err(CallError::Invalid("`content` is not an object".into())),
        (Some(false), None) => Err(CallError::Invalid(
            "`unchange` is false but there is no `content`".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v(body: serde_json::Value) -> Result<Verdict, CallError> {
        verdict(body.to_string().as_bytes())
    }

    #[test]
    fn the_three_documented_answers() {
        assert_eq!(
            v(json!({"reject": true, "reject_reason": "invalid user"})).unwrap(),
            Verdict::Reject("invalid user".into())
        );
        assert_eq!(
            v(json!({"reject": false, "unchange": true})).unwrap(),
            Verdict::Unchanged
        );
        // The seed's example writes `unchange` as a string.
        assert_eq!(
            v(json!({"unchange": "false", "content": {"user": "x"}})).unwrap(),
            Verdict::Replaced(json!({"user": "x"}))
        );
        assert_eq!(
            v(json!({"reject": "false", "unchange": "true"})).unwrap(),
            Verdict::Unchanged
        );
    }

    #[test]
    fn absent_fields_follow_frp() {
        assert_eq!(v(json!({})).unwrap(), Verdict::Unchanged);
        assert_eq!(
            v(json!({"content": {"a": 1}})).unwrap(),
            Verdict::Replaced(json!({"a": 1}))
        );
        assert_eq!(
            v(json!({"unchange": true, "content": {"a": 1}})).unwrap(),
            Verdict::Unchanged
        );
        assert_eq!(
            v(json!({"reject": true})).unwrap(),
            Verdict::Reject(String::new())
        );
    }

    #[test]
    fn garbage_is_an_error() {
        for body in [
            &b"not json"[..],
            b"[true]",
            b"\"ok\"",
            br#"{"unchange": "maybe"}"#,
            br#"{"reject": 1}"#,
            br#"{"unchange": false}"#,
            br#"{"unchange": false, "content": [1]}"#,
            br#"{"reject_reason": 5}"#,
        ] {
            let res = verdict(body);
            assert!(
                matches!(res, Err(CallError::Invalid(_))),
                "{}: {res:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
