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

/// PostgreSQL types frps decodes as text (sqlx's `String`).
const TEXT: &[&str] = &["text", "varchar", "bpchar", "name", "citext"];
/// `TIMESTAMP` without a zone, holding UTC (`chrono::NaiveDateTime`).
const TIMESTAMP: &[&str] = &["timestamp"];
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
            ("updatedAt", TIMESTAMP),
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
            ("createdAt", TIMESTAMP),
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
            ("updated_at", TIMESTAMP),
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

/// The columns of frps's tables as the database has them: (table, column,
/// type name), the tables found as frps's statements find them (the
/// connection's `search_path`).
pub(super) async fn columns(pool: &PgPool) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    const SQL: &str = "SELECT t.name, a.attname::text, ty.typname::text
        FROM unnest($1::text[]) AS t(name)
        JOIN pg_attribute a ON a.attrelid = to_regclass(t.name) AND a.attnum > 0 AND NOT a.attisdropped
        JOIN pg_type ty ON ty.oid = a.atttypid";
    let tables: Vec<&str> = COLUMNS.iter().map(|(table, _)| *table).collect();
    sqlx::query_as(SQL).bind(tables).fetch_all(pool).await
}

/// What differs between `found` (as [`columns`] reads it) and what frps
/// reads: one line per column missing or of a type frps cannot decode.
pub(super) fn mismatches(found: &[(String, String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (table, wanted) in COLUMNS {
        if !found.iter().any(|(t, ..)| t == table) {
            out.push(format!("there is no table {table}"));
            continue;
        }
        for (column, types) in *wanted {
            match found
                .iter()
                .find(|(t, c, _)| t == table && c == column)
                .map(|(.., ty)| ty)
            {
                None => out.push(format!("{table} has no column \"{column}\"")),
                Some(ty) if !types.contains(&ty.as_str()) => out.push(format!(
                    "{table}.\"{column}\" is {ty} where frps reads {}",
                    types.join(" or ")
                )),
                Some(_) => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The columns as frps's own migrations make them.
    fn as_migrated() -> Vec<(String, String, String)> {
        COLUMNS
            .iter()
            .flat_map(|(table, columns)| {
                columns
                    .iter()
                    .map(|(column, types)| (table.to_string(), column.to_string(), types[0].into()))
            })
            .collect()
    }

    #[test]
    fn each_column_missing_or_of_another_type_is_named() {
        assert!(mismatches(&as_migrated()).is_empty());
        let mut found = as_migrated();
        for (table, column, ty) in &mut found {
            match (table.as_str(), column.as_str()) {
                ("api_keys", "expiresAt") => *ty = "timestamptz".into(),
                ("users", "id") => *ty = "int4".into(),
                // Any of the text types will do.
                ("gpu_assets", "userId") => *ty = "bpchar".into(),
                _ => {}
            }
        }
        found.retain(|(t, c, _)| !(t == "users" && c == "password_hash"));
        found.retain(|(t, ..)| t != "server_secrets");
        // A column frps does not know is no concern of its own.
        found.push(("users".into(), "nickname".into(), "jsonb".into()));
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
}
