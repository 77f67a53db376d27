//! `/api/users`, `/api/tokens/active`.

use axum::extract::State as AxState;
use chrono::NaiveDateTime;

use super::types::{Token, User};
use super::{ApiError, ApiResult, ApiState, Envelope, ok};

fn rfc3339(t: NaiveDateTime) -> String {
    t.and_utc().to_rfc3339()
}

/// Provider accounts (never password hashes).
#[utoipa::path(get, path = "/api/users", tag = "accounts",
    responses((status = 200, body = Envelope<Vec<User>>), (status = 503, body = Envelope<String>)))]
pub async fn users(AxState(state): ApiState) -> ApiResult<Vec<User>> {
    let rows = state.store.list_users().await.map_err(ApiError::database)?;
    let clients = state.registry.all();
    let users: Vec<_> = rows
        .into_iter()
        .map(|u| User {
            clients_online: clients.iter().filter(|c| c.owner.user_id == u.id).count(),
            id: u.id,
            email: u.email,
            created_at: rfc3339(u.created_at),
        })
        .collect();
    let n = users.len();
    Ok(ok(users, &format!("{n} user(s)")))
}

/// Usable client tokens, masked to their visible prefix.
#[utoipa::path(get, path = "/api/tokens/active", tag = "accounts",
    responses((status = 200, body = Envelope<Vec<Token>>), (status = 503, body = Envelope<String>)))]
pub async fn active_tokens(AxState(state): ApiState) -> ApiResult<Vec<Token>> {
    let rows = state
        .store
        .list_client_tokens(true)
        .await
        .map_err(ApiError::database)?;
    let tokens: Vec<_> = rows
        .into_iter()
        .map(|t| Token {
            token: format!("{}…", t.prefix),
            id: t.id,
            email: t.email,
            created_at: rfc3339(t.created_at),
            expires_at: t.expires_at.map(rfc3339),
            last_used_at: t.last_used_at.map(rfc3339),
        })
        .collect();
    let n = tokens.len();
    Ok(ok(tokens, &format!("{n} active token(s)")))
}
