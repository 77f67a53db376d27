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
use crate::listeners::public::shorten;
use crate::store::{TokenKey, Window};

/// Most entries one page holds (and how many a page without `limit` holds).
pub const MAX_PAGE: u64 = 1000;

/// A page of a listing, with a `Link` header to the next one.
type Paged<T> = Result<(HeaderMap, Json<Envelope<Vec<T>>>), ApiError>;

fn rfc3339(t: NaiveDateTime) -> String {
    t.and_utc().to_rfc3339()
}

/// The page a request's `?limit=&after=` asks for, with one row more than
/// the page holds (to tell whether another follows); `parse` reads `after`,
/// the cursor of a `Link` header.
fn window<K>(
    query: Result<Query<Page>, QueryRejection>,
    parse: impl FnOnce(&str) -> Option<K>,
) -> Result<Window<K>, ApiError> {
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
    let after = match page.after.as_deref() {
        None => None,
        Some(cursor) => Some(parse(cursor).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "after: {:?} is not a cursor from a Link header of this listing",
                    shorten(cursor, 40)
                ),
            )
        })?),
    };
    Ok(Window {
        after,
        limit: limit + 1,
    })
}

/// Cuts `rows` (read with [`window`]'s extra row, `limit` being the page
/// size plus one) to the page asked for; returns the message's tail and the
/// headers naming the next page, which starts after the last row kept
/// (`cursor` names it), when there is one.
fn finish<T>(
    path: &str,
    limit: u64,
    rows: &mut Vec<T>,
    cursor: impl FnOnce(&T) -> String,
) -> (HeaderMap, String) {
    let limit = limit - 1;
    let mut headers = HeaderMap::new();
    if rows.len() as u64 <= limit {
        return (headers, String::new());
    }
    rows.truncate(limit as usize);
    let after = cursor(rows.last().expect("limit is at least 1"));
    let link = format!("<{path}?limit={limit}&after={after}>; rel=\"next\"");
    headers.insert(
        header::LINK,
        HeaderValue::from_str(&link).expect("a fixed path, digits, a cursor of [0-9a-z_]"),
    );
    (headers, format!("; more after {after}"))
}

/// Cursor of a token in listings: its creation time in nanoseconds since
/// 1970 (exact: the key compares equal to the stored time) and its id.
fn token_cursor(key: &TokenKey) -> String {
    let nanos = key
        .created_at
        .and_utc()
        .timestamp_nanos_opt()
        .unwrap_or(i64::MAX);
    format!("{nanos}_{}", key.id)
}

fn parse_token_cursor(cursor: &str) -> Option<TokenKey> {
    let (nanos, id) = cursor.split_once('_')?;
    let valid_id =
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    if !valid_id {
        return None;
    }
    let created_at = chrono::DateTime::from_timestamp_nanos(nanos.parse().ok()?).naive_utc();
    Some(TokenKey {
        created_at,
        id: id.to_owned(),
    })
}

/// Provider accounts (never password hashes), oldest first.
#[utoipa::path(get, path = "/api/users", tag = "accounts", params(Page),
    responses((status = 200, body = Envelope<Vec<User>>), (status = 400, description = "A page parameter (`limit`, `after`) that is not valid", body = Envelope<String>),
        (status = 503, description = "The database is unavailable", body = Envelope<String>)))]
pub async fn users(
    AxState(state): ApiState,
    query: Result<Query<Page>, QueryRejection>,
) -> Paged<User> {
    let window = window(query, |after| after.parse::<i64>().ok())?;
    let limit = window.limit;
    let mut rows = state
        .store
        .list_users_in(window)
        .await
        .map_err(ApiError::database)?;
    let (headers, more) = finish("/api/users", limit, &mut rows, |u| u.id.to_string());
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
    responses((status = 200, body = Envelope<Vec<Token>>), (status = 400, description = "A page parameter (`limit`, `after`) that is not valid", body = Envelope<String>),
        (status = 503, description = "The database is unavailable", body = Envelope<String>)))]
pub async fn active_tokens(
    AxState(state): ApiState,
    query: Result<Query<Page>, QueryRejection>,
) -> Paged<Token> {
    let window = window(query, parse_token_cursor)?;
    let limit = window.limit;
    let mut rows = state
        .store
        .list_client_tokens_in(true, window)
        .await
        .map_err(ApiError::database)?;
    let (headers, more) = finish("/api/tokens/active", limit, &mut rows, |t| {
        token_cursor(&TokenKey::from(t))
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_cursor_names_its_row_exactly() {
        let created_at = chrono::DateTime::from_timestamp(1_764_583_200, 123_456_789)
            .unwrap()
            .naive_utc();
        let key = TokenKey {
            created_at,
            id: "a1b2c3d4e5f6".into(),
        };
        let cursor = token_cursor(&key);
        assert_eq!(cursor, "1764583200123456789_a1b2c3d4e5f6");
        assert_eq!(parse_token_cursor(&cursor), Some(key));
    }

    #[test]
    fn malformed_token_cursors_are_refused() {
        for bad in [
            "",
            "123",
            "_abc",
            "123_",
            "x_abc",
            "123_a-b",
            "123_a b",
            &format!("1_{}", "a".repeat(65)),
            "99999999999999999999_abc",
        ] {
            assert_eq!(parse_token_cursor(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_last_row_kept_names_the_next_page() {
        let mut rows = vec![1, 2, 3];
        // A page of two read with one row more.
        let (headers, more) = finish("/api/users", 3, &mut rows, |r| r.to_string());
        assert_eq!(rows, [1, 2]);
        assert_eq!(
            headers[header::LINK],
            "</api/users?limit=2&after=2>; rel=\"next\""
        );
        assert_eq!(more, "; more after 2");
        let mut rows = vec![7, 8];
        let (headers, more) = finish("/api/users", 3, &mut rows, |r| r.to_string());
        assert_eq!(rows, [7, 8]);
        assert!(headers.is_empty() && more.is_empty());
    }

    #[test]
    fn long_cursors_are_cut_in_errors() {
        let refused = |after: &str| {
            let page = Page {
                limit: None,
                after: Some(after.to_owned()),
            };
            window(Ok(Query(page)), |_| None::<i64>).unwrap_err()
        };
        let e = refused(&"é".repeat(100));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains(&format!("\"{}…\"", "é".repeat(40))),
            "{}",
            e.message
        );
        assert!(!e.message.contains(&"é".repeat(41)), "{}", e.message);
        let e = refused("short");
        assert!(e.message.contains("\"short\""), "{}", e.message);
    }
}
