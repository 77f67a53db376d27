//! `/api/users`, `/api/tokens/active`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::Query;
use axum::extract::State as AxState;
use axum::extract::rejection::QueryRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use chrono::NaiveDateTime;

use super::types::{Page, Token, User};
use super::{ApiError, ApiState, Envelope, ok};
use crate::store::Window;

/// Most entries one page holds (and how many a page without `limit` holds).
pub const MAX_PAGE: u64 = 1000;

/// A page of a listing, with a `Link` header to the next one.
type Paged<T> = Result<(HeaderMap, Json<Envelope<Vec<T>>>), ApiError>;

fn rfc3339(t: NaiveDateTime) -> String {
    t.and_utc().to_rfc3339()
}

/// The rows a request's `?limit=&offset=` asks for, plus one (to tell
/// whether another page follows).
fn window(query: Result<Query<Page>, QueryRejection>) -> Result<Window, ApiError> {
    let Query(page) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad paging parameters: {}", e.body_text()),
        )
    })?;
    let limit = page.limit.unwrap_or(MAX_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1 to {MAX_PAGE}"),
        ));
    }
    Ok(Window {
        offset: page.offset.unwrap_or(0),
        limit: limit + 1,
    })
}

/// Cuts `rows` (read with [`window`]'s extra row) to the page asked for;
/// returns the message's tail and the headers naming the next page when
/// there is one.
fn finish<T>(path: &str, window: Window, rows: &mut Vec<T>) -> (HeaderMap, String) {
    let limit = window.limit - 1;
    let mut headers = HeaderMap::new();
    if rows.len() as u64 <= limit {
        return (headers, String::new());
    }
    rows.truncate(limit as usize);
    let next = window.offset.saturating_add(limit);
    let link = format!("<{path}?limit={limit}&offset={next}>; rel=\"next\"");
    headers.insert(
        header::LINK,
        HeaderValue::from_str(&link).expect("digits and a fixed path"),
    );
    (headers, format!("; more from offset {next}"))
}

/// Provider accounts (never password hashes), oldest first.
#[utoipa::path(get, path = "/api/users", tag = "accounts", params(Page),
    responses((status = 200, body = Envelope<Vec<User>>), (status = 400, body = Envelope<String>),
        (status = 503, body = Envelope<String>)))]
pub async fn users(
    AxState(state): ApiState,
    query: Result<Query<Page>, QueryRejection>,
) -> Paged<User> {
    let window = window(query)?;
    let mut rows = state
        .store
        .list_users_in(window)
        .await
        .map_err(ApiError::database)?;
    let (headers, more) = finish("/api/users", window, &mut rows);
    let mut online: HashMap<i64, usize> = HashMap::new();
    for client in state.registry.all() {
        *online.entry(client.owner.user_id).or_default() += 1;
    }
    let users: Vec<_> = rows
        .into_iter()
        .map(|u| User {
            clients_online: online.get(&u.id).copied().unwrap_or(0),
            id: u.id,
            email: u.email,
            created_at: rfc3339(u.created_at),
        })
        .collect();
    let n = users.len();
    Ok((headers, ok(users, &format!("{n} user(s){more}"))))
}

/// Usable client tokens, masked to their visible prefix, newest first.
#[utoipa::path(get, path = "/api/tokens/active", tag = "accounts", params(Page),
    responses((status = 200, body = Envelope<Vec<Token>>), (status = 400, body = Envelope<String>),
        (status = 503, body = Envelope<String>)))]
pub async fn active_tokens(
    AxState(state): ApiState,
    query: Result<Query<Page>, QueryRejection>,
) -> Paged<Token> {
    let window = window(query)?;
    let mut rows = state
        .store
        .list_client_tokens_in(true, window)
        .await
        .map_err(ApiError::database)?;
    let (headers, more) = finish("/api/tokens/active", window, &mut rows);
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
    Ok((headers, ok(tokens, &format!("{n} active token(s){more}"))))
}
