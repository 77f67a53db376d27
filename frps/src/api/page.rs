//! Paging of the listings: `?limit=&after=`, and a `Link` header naming
//! the next page.

use axum::Json;
use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::types::Page;
use super::{ApiError, Envelope};
use crate::listeners::public::shorten;
use crate::store::Window;

/// Bytes a cursor keeps as they are in a `Link` header (RFC 3986's
/// unreserved set); every other byte is percent-encoded.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Most entries one page holds (and how many a page without `limit` holds).
pub const MAX_PAGE: u64 = 1000;

/// A page of a listing, with a `Link` header to the next one.
pub type Paged<T> = Result<(HeaderMap, Json<Envelope<Vec<T>>>), ApiError>;

/// The page a request's `?limit=&after=` asks for, with one row more than
/// the page holds (to tell whether another follows); `parse` reads `after`,
/// the cursor of a `Link` header.
pub fn window<K>(
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
pub fn finish<T>(
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
    let Some(last) = rows.last() else {
        return (headers, String::new());
    };
    let after = cursor(last);
    // Ids come from clients and from hand-made rows, so the cursor is
    // percent-encoded: any byte outside the unreserved set would otherwise
    // end the query or make the header invalid. `?after=` is decoded again.
    let encoded = utf8_percent_encode(&after, NOT_UNRESERVED);
    let link = format!("<{path}?limit={limit}&after={encoded}>; rel=\"next\"");
    if let Ok(value) = HeaderValue::from_str(&link) {
        headers.insert(header::LINK, value);
    }
    (headers, format!("; more after {}", shorten(&after, 40)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn cursors_of_any_text_are_percent_encoded() {
        let mut rows = vec!["a", "bé x&y=z#\u{7f}\n"];
        let (headers, more) = finish("/api/clients", 2, &mut rows, |r| r.to_string());
        assert_eq!(rows, ["a"]);
        assert_eq!(
            headers[header::LINK],
            "</api/clients?limit=1&after=a>; rel=\"next\""
        );
        assert_eq!(more, "; more after a");
        let mut rows = vec!["bé x&y=z#\u{7f}\n_1.~", "c"];
        let (headers, _) = finish("/api/clients", 2, &mut rows, |r| r.to_string());
        assert_eq!(
            headers[header::LINK],
            "</api/clients?limit=1&after=b%C3%A9%20x%26y%3Dz%23%7F%0A_1.~>; rel=\"next\""
        );
        // The query extractor gives the cursor back as it was.
        let uri: axum::http::Uri = "/api/clients?limit=1&after=b%C3%A9%20x%26y%3Dz%23%7F%0A_1.~"
            .parse()
            .unwrap();
        let Query(page) = Query::<Page>::try_from_uri(&uri).unwrap();
        assert_eq!(page.after.as_deref(), Some("bé x&y=z#\u{7f}\n_1.~"));
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
