//! `/api/users`, `/api/tokens/active`.

use std::collections::HashMap;

use axum::extract::Query;
use axum::extract::State as AxState;
use axum::extract::rejection::QueryRejection;
use chrono::NaiveDateTime;

use super::page::{Paged, finish, window};
use super::types::{Page, Token, User};
use super::{ApiError, ApiState, Envelope, ok};
use crate::store::TokenKey;

fn rfc3339(t: NaiveDateTime) -> String {
    t.and_utc().to_rfc3339()
}

/// Cursor of a token in listings: its creation time in nanoseconds since
/// 1970 (exact: the key compares equal to the stored time) and its id.
/// A time outside what nanoseconds in an `i64` hold (before 1677, after
/// 2262: a hand-edited row) is written `<seconds>.<nanoseconds, 9
/// digits>`; before, it became 2262 and the next page started over or
/// skipped rows.
fn token_cursor(key: &TokenKey) -> String {
    let at = key.created_at.and_utc();
    match at.timestamp_nanos_opt() {
        Some(nanos) => format!("{nanos}_{}", key.id),
        None => format!(
            "{}.{:09}_{}",
            at.timestamp(),
            at.timestamp_subsec_nanos(),
            key.id
        ),
    }
}

/// Longest token id a cursor may carry, in bytes.
const MAX_CURSOR_ID: usize = 1024;

fn parse_token_cursor(cursor: &str) -> Option<TokenKey> {
    // The id is the row's, whatever it holds: frps makes alphanumeric ones,
    // but a hand-made row's (a UUID with dashes, say) is written into the
    // next page's link as it is, and must be read back (it stopped paging).
    let (nanos, id) = cursor.split_once('_')?;
    if id.is_empty() || id.len() > MAX_CURSOR_ID {
        return None;
    }
    let created_at = match nanos.split_once('.') {
        Some((secs, subsec)) => {
            if subsec.len() != 9 || !subsec.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            chrono::DateTime::from_timestamp(secs.parse().ok()?, subsec.parse().ok()?)?
        }
        None => chrono::DateTime::from_timestamp_nanos(nanos.parse().ok()?),
    }
    .naive_utc();
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
    let mut rows = ApiError::within_deadline(state.store.list_users_in(window)).await?;
    let (headers, more) = finish("/api/users", limit, &mut rows, |u| u.id.to_string());
    let mut online: HashMap<i64, usize> = HashMap::new();
    for client in state.registry.online() {
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
    let mut rows =
        ApiError::within_deadline(state.store.list_client_tokens_in(true, window)).await?;
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
        // Beyond what nanoseconds in an i64 hold, both ways.
        for (secs, nanos, written) in [
            (-11_676_096_000, 5, "-11676096000.000000005_a1"),
            (9_999_999_999, 0, "9999999999.000000000_a1"),
        ] {
            let key = TokenKey {
                created_at: chrono::DateTime::from_timestamp(secs, nanos)
                    .unwrap()
                    .naive_utc(),
                id: "a1".into(),
            };
            let cursor = token_cursor(&key);
            assert_eq!(cursor, written);
            assert_eq!(parse_token_cursor(&cursor), Some(key));
        }
        // A hand-made row's id, whatever it holds, is read back as written.
        for id in [
            "550e8400-e29b-41d4-a716-446655440000",
            "a_b c/é",
            &"a".repeat(200),
        ] {
            let key = TokenKey {
                created_at,
                id: id.into(),
            };
            assert_eq!(parse_token_cursor(&token_cursor(&key)), Some(key), "{id}");
        }
    }

    #[test]
    fn malformed_token_cursors_are_refused() {
        for bad in [
            "",
            "123",
            "_abc",
            "123_",
            "x_abc",
            &format!("1_{}", "a".repeat(MAX_CURSOR_ID + 1)),
            "99999999999999999999_abc",
            "1.5_abc",
            "1.0000000001_abc",
            "1.-00000001_abc",
            "x.000000000_abc",
            "999999999999999999.000000000_abc",
        ] {
            assert_eq!(parse_token_cursor(bad), None, "{bad:?}");
        }
    }
}
