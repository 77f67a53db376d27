//! Management API (`--api-port`, loopback by default). Every response uses
//! the seed's envelope: `{"success", "data", "message", "timestamp"}`.

use std::sync::Arc;

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use crate::state::State;

/// The seed's response envelope.
#[derive(Debug, Serialize)]
pub struct Envelope<T: Serialize> {
    /// Whether the call succeeded.
    pub success: bool,
    /// The payload (null on errors).
    pub data: Option<T>,
    /// Human-readable outcome, in English.
    pub message: String,
    /// RFC 3339 time of the response.
    pub timestamp: String,
}

/// Wraps `data` in a success envelope.
pub fn ok<T: Serialize>(data: T, message: &str) -> Response {
    Json(Envelope {
        success: true,
        data: Some(data),
        message: message.to_owned(),
        timestamp: chrono::Utc::now().to_rfc3339(),
    })
    .into_response()
}

/// An error envelope with `status`.
pub fn error(status: StatusCode, message: &str) -> Response {
    let body = Envelope::<()> {
        success: false,
        data: None,
        message: message.to_owned(),
        timestamp: chrono::Utc::now().to_rfc3339(),
    };
    (status, Json(body)).into_response()
}

/// The API's routes.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

async fn health(AxState(state): AxState<Arc<State>>) -> Response {
    ok(
        json!({
            "status": if state.shutdown.is_cancelled() { "shutting_down" } else { "ok" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": state.started_at.elapsed().as_secs(),
            "clients_online": state.registry.len(),
            "pending_connections": state.pending.len(),
        }),
        "server is healthy",
    )
}
