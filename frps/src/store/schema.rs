//! The column types frps reads, checked once the migrations ran.
//!
//! The PostgreSQL migrations create a table only when it is absent
//! (`CREATE TABLE IF NOT EXISTS`) and add columns only when missing, so a
//! table made by hand before frps first ran (the seed README's, or an
//! application's own `users`) is kept as it is. One whose columns frps
//! cannot decode (a `TIMESTAMPTZ` where frps reads `TIMESTAMP`, an
//! `INTEGER` id where it reads `BIGINT`) would fail every row at the first
//! request instead: frps refuses to start on it and names each column.
//! The SQLite file is frps's own (no seed set-up makes one), so only
//! PostgreSQL is checked.

use sqlx::PgPool;

/// PostgreSQL types frps decodes as text (sqlx's `String`). `CHAR(n)`
/// (`bpchar`) decodes, but a value shorter than `n` comes back padded
/// with spaces ([`padded`]).
const TEXT: &[&str] = &["text", "varchar", "bpchar", "name", "citext"];
/// `TIMESTAMP` without a zone, holding UTC (`chrono::NaiveDateTime`).
const TIMESTAMP: &[&str] = &["timestamp"];
/// A time frps only writes (never reads back): PostgreSQL casts the
/// `TIMESTAMP` frps sends to a zoned column, in the session's zone, UTC.
const WRITTEN_TIME: &[&str] = &["timestamp", "timestamptz"];
/// `INTEGER` (`i32`).
const INT4: &[&str] = &["int4"];
/// `BIGINT` (`i64`).
const INT8: &[&str] = &["int8"];

/// A column's name and the type names frps decodes it from.
type Column = (&'static str, &'static [&'static str]);

/// Every column frps reads or writes, by table, with the types it takes.
const COLUMNS: &[(&str, &[Column])] = &[
    (
        "api_keys",
        &[
            ("key", TEXT),
            ("status", TEXT),
            ("expiresAt", TIMESTAMP),
            ("createdAt", TIMESTAMP),
            ("updatedAt", WRITTEN_TIME),
            ("id", TEXT),
            ("name", TEXT),
            ("prefix", TEXT),
            ("rpm", INT4),
            ("max_concurrency", INT4),
        ],
    ),
    (
        "gpu_assets",
        &[
            ("userId", TEXT),
            ("machineId", TEXT),
            ("name", TEXT),
            ("status", TEXT),
            ("createdAt", WRITTEN_TIME),
            ("updatedAt", TIMESTAMP),
        ],
    ),
    (
        "users",
        &[
            ("id", INT8),
            ("email", TEXT),
            ("password_hash", TEXT),
            ("created_at", TIMESTAMP),
            ("updated_at", WRITTEN_TIME),
        ],
    ),
    (
        "client_tokens",
        &[
            ("id", TEXT),
            ("token_hash", TEXT),
            ("prefix", TEXT),
            ("user_id", INT8),
            ("created_at", TIMESTAMP),
            ("expires_at", TIMESTAMP),
            ("last_used_at", TIMESTAMP),
            ("revoked_at", TIMESTAMP),
            ("family_id", TEXT),
            ("renewed_from", TEXT),
        ],
    ),
    (
        "client_ids",
        &[("id", TEXT), ("user_id", INT8), ("created_at", TIMESTAMP)],
    ),
    ("server_secrets", &[("name", TEXT), ("value", TEXT)]),
];

/// Columns frps reads as a value that must be there (not `NULL`): a row
/// holding `NULL` in one cannot be read (its account, token or client id
/// is taken as absent). frps's own tables declare them `NOT NULL`; a table
/// made by hand may not.
const NOT_NULL: &[(&str, &str)] = &[
    ("users", "id"),
    ("users", "email"),
    ("users", "password_hash"),
    ("users", "created_at"),
    ("client_tokens", "id"),
    ("client_tokens", "prefix"),
    ("client_tokens", "user_id"),
    ("client_tokens", "created_at"),
    ("client_ids", "id"),
    ("client_ids", "user_id"),
    ("client_ids", "created_at"),
    ("server_secrets", "value"),
];

/// A column as the database has it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(super) struct Found {
    #[sqlx(rename = "table_name")]
    table: String,
    #[sqlx(rename = "column_name")]
    column: String,
    /// Its type's name (a domain's base type).
    ty: String,
    /// Declared `NOT NULL` (or a primary key).
    not_null: bool,
}

/// The columns of frps's tables as the database has them, the tables found as frps's statements find them (the
/// connection's `search_path`). A domain's column is of the domain's base
/// type, as PostgreSQL describes it to sqlx.
pub(super) async fn columns(pool: &PgPool) -> Result<Vec<Found>, sqlx::Error> {
    const SQL: &str = "WITH RECURSIVE base(oid, typ) AS (
            SELECT oid, oid FROM pg_type
            UNION ALL
            SELECT b.oid, t.typbasetype FROM base b JOIN pg_type t ON t.oid = b.typ
            WHERE t.typtype = 'd'
        )
        SELECT t.name AS table_name, a.attname::text AS column_name, ty.typname::text AS ty,
            a.attnotnull AS not_null
        FROM unnest($1::text[]) AS t(name)
        JOIN pg_attribute a ON a.attrelid = to_regclass(t.name) AND a.attnum > 0 AND NOT a.attisdropped
        JOIN base b ON b.oid = a.atttypid
        JOIN pg_type ty ON ty.oid = b.typ AND ty.typtype <> 'd'";
    let tables: Vec<&str> = COLUMNS.iter().map(|(table, _)| *table).collect();
    sqlx::query_as(SQL).bind(tables).fetch_all(pool).await
}

/// What differs between `found` (as [`columns`] reads it) and what frps
/// reads: one line per column missing or of a type frps cannot decode.
pub(super) fn mismatches(found: &[Found]) -> Vec<String> {
    let mut out = Vec::new();
    for (table, wanted) in COLUMNS {
        if !found.iter().any(|f| f.table == *table) {
            out.push(format!("there is no table {table}"));
            continue;
        }
        for (column, types) in *wanted {
            match found
                .iter()
                .find(|f| f.table == *table && f.column == *column)
            {
                None => out.push(format!("{table} has no column \"{column}\"")),
                Some(f) if !types.contains(&f.ty.as_str()) => out.push(format!(
                    "{table}.\"{column}\" is {} where frps reads {}",
                    f.ty,
                    types.join(" or ")
                )),
                Some(_) => {}
            }
        }
    }
    out
}

/// Columns of `found` frps reads or writes that are `CHAR(n)`: their
/// values come back padded with spaces to `n`, which frps takes as part of
/// the value (a key's hash: its revocations reached no cache, so a revoked
/// key stayed valid for the cache's lifetime; a status, which then refused
/// every key; an email, which no login matched). Worth a warning (not a
/// refusal: a column whose values all fill it, a `CHAR(36)` of UUIDs,
/// works).
pub(super) fn padded(found: &[Found]) -> Vec<String> {
    found
        .iter()
        .filter(|f| f.ty == "bpchar")
        .filter(|f| {
            COLUMNS.iter().any(|(table, columns)| {
                *table == f.table && columns.iter().any(|(column, _)| *column == f.column)
            })
        })
        .map(|f| format!("{}.\"{}\"", f.table, f.column))
        .collect()
}

/// Columns of `found` that frps reads as a value and that allow `NULL`:
/// worth a warning, since a row with `NULL` there is unusable.
pub(super) fn nullable(found: &[Found]) -> Vec<String> {
    NOT_NULL
        .iter()
        .filter(|(table, column)| {
            found
                .iter()
                .any(|f| f.table == *table && f.column == *column && !f.not_null)
        })
        .map(|(table, column)| format!("{table}.\"{column}\""))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The columns as frps's own migrations make them.
    fn as_migrated() -> Vec<Found> {
        COLUMNS
            .iter()
            .flat_map(|(table, columns)| {
                columns.iter().map(|(column, types)| Found {
                    table: table.to_string(),
                    column: column.to_string(),
                    ty: types[0].into(),
                    not_null: NOT_NULL.contains(&(table, column)),
                })
            })
            .collect()
    }

    fn column<'a>(found: &'a mut [Found], table: &str, column: &str) -> &'a mut Found {
        found
            .iter_mut()
            .find(|f| f.table == table && f.column == column)
            .unwrap()
    }

    #[test]
    fn each_column_missing_or_of_another_type_is_named() {
        assert!(mismatches(&as_migrated()).is_empty());
        let mut found = as_migrated();
        column(&mut found, "api_keys", "expiresAt").ty = "timestamptz".into();
        column(&mut found, "users", "id").ty = "int4".into();
        // Any of the text types will do, and a zoned time frps only writes.
        column(&mut found, "gpu_assets", "userId").ty = "citext".into();
        column(&mut found, "api_keys", "key").ty = "bpchar".into();
        column(&mut found, "users", "updated_at").ty = "timestamptz".into();
        found.retain(|f| !(f.table == "users" && f.column == "password_hash"));
        found.retain(|f| f.table != "server_secrets");
        // A column frps does not know is no concern of its own.
        found.push(Found {
            table: "users".into(),
            column: "nickname".into(),
            ty: "jsonb".into(),
            not_null: false,
        });
        assert_eq!(
            mismatches(&found),
            [
                "api_keys.\"expiresAt\" is timestamptz where frps reads timestamp",
                "users.\"id\" is int4 where frps reads int8",
                "users has no column \"password_hash\"",
                "there is no table server_secrets",
            ]
        );
    }

    #[test]
    fn char_columns_are_named() {
        assert!(padded(&as_migrated()).is_empty());
        let mut found = as_migrated();
        column(&mut found, "api_keys", "key").ty = "bpchar".into();
        column(&mut found, "users", "email").ty = "bpchar".into();
        // Not one frps neither reads nor writes.
        found.push(Found {
            table: "users".into(),
            column: "country".into(),
            ty: "bpchar".into(),
            not_null: false,
        });
        assert_eq!(padded(&found), ["api_keys.\"key\"", "users.\"email\""]);
    }

    #[test]
    fn columns_read_as_values_that_allow_null_are_named() {
        assert!(nullable(&as_migrated()).is_empty());
        let mut found = as_migrated();
        column(&mut found, "users", "password_hash").not_null = false;
        // One frps reads as optional may hold NULL.
        column(&mut found, "client_tokens", "expires_at").not_null = false;
        assert_eq!(nullable(&found), ["users.\"password_hash\""]);
    }
}
