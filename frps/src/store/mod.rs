//! Persistent storage: accounts, client tokens, API keys and GPU assets, in
//! PostgreSQL or an embedded SQLite file. One function per operation; the
//! SQL is shared where both databases accept it. Migrations are embedded
//! (`migrations/postgres`, `migrations/sqlite`) and run on connect.

mod rows;
mod schema;

use std::str::FromStr;
use std::time::Duration;

use chrono::NaiveDateTime;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

pub use rows::{ApiKeyRow, ClientIdRow, ClientTokenRow, GpuAssetRow, UserRow};

/// The `api_keys` columns every [`ApiKeyRow`] is read from.
macro_rules! api_key_columns {
    () => {
        r#"key, status, "expiresAt", "createdAt", id, name, prefix, rpm, max_concurrency"#
    };
}

/// The columns of a `ClientTokenRow`: client tokens with their owner's email.
macro_rules! client_token_select {
    () => {
        "SELECT t.id, t.prefix, t.user_id, u.email, t.created_at, t.expires_at, t.last_used_at, t.revoked_at, t.renewed_from
            FROM client_tokens t JOIN users u
              ON u.id = t.user_id AND u.email IS NOT NULL AND t.created_at IS NOT NULL"
    };
}

/// A page of a listing: at most `limit` rows, from just after the row
/// whose sort key is `after` (from the start when `None`). Paging by key,
/// not by offset, so rows added or removed between two pages never make
/// the next one repeat or skip a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window<K> {
    /// Sort key of the last row of the previous page.
    pub after: Option<K>,
    /// Most rows returned.
    pub limit: u64,
}

impl<K> Window<K> {
    /// Every row.
    pub const ALL: Window<K> = Window {
        after: None,
        limit: i64::MAX as u64,
    };

    // SQL takes signed 64-bit numbers; larger values mean "no bound".
    fn limit(&self) -> i64 {
        i64::try_from(self.limit).unwrap_or(i64::MAX)
    }
}

/// Sort key of a client token in listings (newest first, ties by id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKey {
    /// The token's creation time, exactly as stored.
    pub created_at: NaiveDateTime,
    /// The token's id.
    pub id: String,
}

impl From<&ClientTokenRow> for TokenKey {
    fn from(row: &ClientTokenRow) -> Self {
        TokenKey {
            created_at: row.created_at,
            id: row.id.clone(),
        }
    }
}

/// A key to store (its hash is passed beside it).
#[derive(Debug, Clone, Copy)]
pub struct NewApiKey<'a> {
    /// frpx's id of the key.
    pub id: &'a str,
    /// Its visible prefix.
    pub prefix: &'a str,
    /// A label.
    pub name: Option<&'a str>,
    /// Expiry (UTC), if any.
    pub expires_at: Option<NaiveDateTime>,
    /// Rate limits.
    pub limits: crate::ratelimit::Limits,
}

/// Prefix of the `key` column for keys stored as a hash.
pub const HASH_PREFIX: &str = "sha256:";

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The URL names no supported database.
    #[error("unsupported database URL `{0}`: use postgres://... or sqlite://...")]
    UnsupportedUrl(String),
    /// A unique value (e.g. an email) is taken.
    #[error("{0} already exists")]
    Duplicate(String),
    /// Tables made before frps ran (kept by its migrations) have columns
    /// frps cannot read, each named.
    #[error(
        "the database's tables differ from what frps reads (made by hand before frps first ran?): {}; change those columns (ALTER TABLE ... ALTER COLUMN ... TYPE ...) or give frps another database",
        .0.join("; ")
    )]
    Schema(Vec<String>),
}

impl StoreError {
    /// Whether this is what another connection opening a SQLite database
    /// at the same moment causes: the database busy, or a migration that
    /// the other one applied first.
    fn is_sqlite_contention(&self) -> bool {
        match self {
            // A migration the other one applied first fails as it runs
            // (not a changed checksum or a missing version: those stay).
            StoreError::Migrate(
                sqlx::migrate::MigrateError::Execute(_)
                | sqlx::migrate::MigrateError::ExecuteMigration(..),
            ) => true,
            StoreError::Database(sqlx::Error::Database(e)) => {
                // SQLITE_BUSY and SQLITE_LOCKED, with their extended codes.
                e.code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .is_some_and(|c| matches!(c & 0xff, 5 | 6))
            }
            _ => false,
        }
    }

    /// Whether a row was read but cannot be decoded (a value frps never
    /// writes, put there by hand: a date without a time in SQLite, a
    /// number out of range): the row is unusable, the database is fine.
    pub fn is_unreadable_row(&self) -> bool {
        matches!(
            self,
            StoreError::Database(
                sqlx::Error::ColumnDecode { .. }
                    | sqlx::Error::Decode(_)
                    | sqlx::Error::ColumnNotFound(_)
                    | sqlx::Error::ColumnIndexOutOfBounds { .. }
                    | sqlx::Error::TypeNotFound { .. }
            )
        )
    }

    /// Whether the database itself is unreachable or failing (as opposed to
    /// a constraint or a missing row).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Database(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::WorkerCrashed
            )
        )
    }
}

/// A connection pool to one of the supported databases.
#[derive(Debug, Clone)]
pub enum Store {
    /// PostgreSQL (`postgres://`): the pool for everything, and a small one
    /// of its own for key lookups ([`Store::find_api_key`]), which take no
    /// lock: statements waiting for one (token logins behind another
    /// frps's migration or a transaction left open in psql, a fleet's
    /// logins at once) cannot take every connection from the public port's
    /// key checks.
    Postgres(PgPool, PgPool),
    /// Embedded SQLite (`sqlite://`).
    Sqlite(SqlitePool),
}

/// Connections of PostgreSQL's pool for key lookups ([`Store::Postgres`]): more
/// than one address may hold at once (`--key-lookups-per-ip`, 4).
const LOOKUP_CONNECTIONS: u32 = 8;

/// Runs `$body` with `$pool` bound to whichever pool `$store` holds (on
/// PostgreSQL, the one for everything but key lookups).
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Postgres($pool, ..) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}

/// Whether the database aborted a statement for a conflict with another
/// transaction (PostgreSQL's deadlock or serialization failure), which
/// running it again resolves.
fn is_conflict(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// Whether PostgreSQL refused a statement for calling a function it does
/// not have (42883, undefined_function): `sha256()` before 11,
/// `gen_random_uuid()` before 13.
fn is_missing_function(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "42883")
}

/// How many times a transaction the database aborted for a conflict runs
/// again ([`again_on_conflict`]).
const CONFLICT_RETRIES: u32 = 4;

/// Runs `attempt` (one whole transaction) again, up to
/// [`CONFLICT_RETRIES`] times, when the database aborted it for a conflict
/// with another ([`is_conflict`]): nothing of it was kept.
async fn again_on_conflict<T, F>(mut attempt: impl FnMut() -> F) -> Result<T, sqlx::Error>
where
    F: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut aborted = 0;
    loop {
        match attempt().await {
            Err(e) if is_conflict(&e) && aborted < CONFLICT_RETRIES => aborted += 1,
            done => return done,
        }
    }
}

fn now() -> NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

/// The file an `sqlite:` URL names (`None` for another database, an
/// in-memory one, or a URL that does not parse).
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    if !url.starts_with("sqlite:") || url.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    let opts = SqliteConnectOptions::from_str(url).ok()?;
    Some(opts.get_filename().to_owned())
}

/// Creates a missing SQLite database file readable by its owner alone
/// (SQLite gives its `-wal` and `-shm` files the same mode): it holds the
/// key that signs Redis entries, password hashes and any plaintext keys of
/// the prototype's rows. An existing file that others may read is left as
/// it is, with a warning.
fn private_file(path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if let Some(mode) = common::private_file::open_to_others(path) {
                    tracing::warn!(
                        "the database file {} can be read by other users (mode {mode:o}): it holds the Redis signing key and password hashes; run chmod 600 on it and its -wal and -shm files",
                        path.display(),
                    );
                }
            }
            // SQLite reports the real problem (a missing directory, say).
            Err(_) => {}
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Attempts to open a SQLite database after the first, when another
/// process opening it at the same time got in the way (see
/// [`Store::connect`]).
const SQLITE_OPEN_TRIES: u64 = 5;

impl Store {
    /// Connects to `url` and runs the migrations. A `sqlite://` file is
    /// created when missing.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let mut tries = 0;
        loop {
            let opened = async {
                let store = Store::connect_without_migrations(url).await?;
                let checked = match store.migrate().await {
                    Ok(()) => store.check_schema().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = checked {
                    store.close().await;
                    return Err(e);
                }
                Ok(store)
            };
            match opened.await {
                // sqlx takes no lock on SQLite: two processes opening a new
                // or upgraded database at once (frps and an admin command)
                // meet in the switch to WAL ("database is locked") or in
                // one migration ("duplicate column", a unique version), and
                // the loser's transaction rolls back. Again, it sees what
                // the other did and goes on.
                Err(e)
                    if url.starts_with("sqlite:")
                        && e.is_sqlite_contention()
                        && tries < SQLITE_OPEN_TRIES =>
                {
                    tries += 1;
                    tracing::debug!("opening the SQLite database again: {e}");
                    tokio::time::sleep(Duration::from_millis(20 * tries)).await;
                }
                opened => return opened,
            }
        }
    }

    /// Connects to `url` without touching the schema.
    pub async fn connect_without_migrations(url: &str) -> Result<Store, StoreError> {
        let acquire = Duration::from_secs(3);
        let store = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // Timestamps are `TIMESTAMP` (no zone) holding UTC. sqlx starts
            // every session with `TimeZone=UTC` (a startup parameter that
            // poolers such as PgBouncer pass on), so NOW() and column
            // defaults are UTC whatever the server's zone; a test holds it.
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(acquire)
                .connect_with(opts.clone())
                .await?;
            // Connected when first needed: an admin command never is.
            let lookups = PgPoolOptions::new()
                .max_connections(LOOKUP_CONNECTIONS)
                .acquire_timeout(acquire)
                .connect_lazy_with(opts);
            Store::Postgres(pool, lookups)
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?;
            if let Some(file) = sqlite_file(url) {
                private_file(&file);
            }
            let opts = opts
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .acquire_timeout(acquire)
                .connect_with(opts)
                .await?;
            Store::Sqlite(pool)
        } else {
            return Err(StoreError::UnsupportedUrl(redact(url)));
        };
        Ok(store)
    }

    /// Applies the migrations this build has. One a newer frps applied
    /// that this build does not know is left alone (frps's migrations only
    /// add tables and columns): an older frps still starts on the database,
    /// so a fleet can be upgraded one server at a time or rolled back.
    async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(p, ..) => {
                let mut m = sqlx::migrate!("../migrations/postgres");
                m.set_ignore_missing(true);
                m.run(p).await?
            }
            Store::Sqlite(p) => {
                let mut m = sqlx::migrate!("../migrations/sqlite");
                m.set_ignore_missing(true);
                m.run(p).await?
            }
        }
        Ok(())
    }

    /// Fails with every column frps reads that a table kept from before
    /// frps ran lacks or has in a type frps cannot decode (PostgreSQL only:
    /// see [`schema`]).
    async fn check_schema(&self) -> Result<(), StoreError> {
        let Store::Postgres(p, ..) = self else {
            return Ok(());
        };
        let found = schema::columns(p).await?;
        let wrong = schema::mismatches(&found);
        if !wrong.is_empty() {
            return Err(StoreError::Schema(wrong));
        }
        let padded = schema::padded(&found);
        if !padded.is_empty() {
            tracing::warn!(
                "{} {} CHAR(n): PostgreSQL pads a shorter value with spaces, which frps reads as part of it (a key that no longer matches its cache entry, so its revocation waits for the cache's expiry; a status or email that matches nothing); change each to text (ALTER TABLE ... ALTER COLUMN ... TYPE text drops the padding)",
                padded.join(", "),
                if padded.len() == 1 { "is" } else { "are" }
            );
        }
        let nullable = schema::nullable(&found);
        if !nullable.is_empty() {
            tracing::warn!(
                "{} may hold NULL (a table made before frps first ran?): a row with NULL there cannot be read, and is taken as absent (an account that cannot log in, a token or client id unknown); declare them NOT NULL",
                nullable.join(", ")
            );
        }
        Ok(())
    }

    /// Which backend this is (`postgres` or `sqlite`).
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(..) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Closes the pool (both, on PostgreSQL).
    pub async fn close(&self) {
        if let Store::Postgres(_, lookups) = self {
            lookups.close().await;
        }
        on_pool!(self, p => p.close().await)
    }

    /// Whether [`Store::close`] was called.
    pub fn is_closed(&self) -> bool {
        on_pool!(self, p => p.is_closed())
    }

    // ---- API keys -------------------------------------------------------

    /// The row for a presented key (`hash`: its SHA-256): stored in
    /// plaintext (a legacy row inserted by hand) or as `sha256:<hex>`.
    ///
    /// PostgreSQL is sent the hash alone and compares it with the hashes of
    /// the plaintext rows itself, so a caller's key (or a guess) never
    /// reaches a server that may log statements with their parameters
    /// (`log_statement`, `log_min_duration_statement`, `auto_explain`). The
    /// hashed rows are looked up by the key's index first; only a key not
    /// stored so (a legacy one, or none) reads the plaintext rows, through
    /// their own index (migration 0007). Only rows of printable ASCII are
    /// hashed (a presented key is a header value: nothing else could match),
    /// so no stored byte sequence can make the conversion fail whatever the
    /// database's encoding. PostgreSQL before 11 has no `sha256()`: there
    /// frps sends the key as SQLite is sent it, and says so once.
    /// SQLite, a file in frps's own process, is sent the key.
    pub async fn find_api_key(
        &self,
        plaintext: &str,
        hash: &[u8; 32],
    ) -> Result<Option<ApiKeyRow>, StoreError> {
        const PG: &str = concat!(
            "(SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE key = $1 LIMIT 1) UNION ALL (SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE key NOT LIKE 'sha256:%' AND CASE",
            " WHEN key ~ '^[ -~]*$' THEN sha256(convert_to(key, 'UTF8')) = $2",
            " ELSE false END LIMIT 1) LIMIT 1"
        );
        const PLAIN: &str = concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE key = $1 OR key = $2 LIMIT 1"
        );
        let hashed = format!("{HASH_PREFIX}{}", crate::auth::secret::hex(hash));
        // A presented `sha256:…` only ever matches as a hash, never as the
        // stored form itself.
        let legacy = if plaintext.starts_with(HASH_PREFIX) {
            hashed.as_str()
        } else {
            plaintext
        };
        // Set once PostgreSQL turned out to have no sha256() (before 11):
        // each lookup then sends the plain query at once, instead of a
        // failing statement (an ERROR line in the server's log) first.
        static NO_SHA256: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let Store::Postgres(_, lookups) = self else {
            return Ok(
                on_pool!(self, p => sqlx::query_as(PLAIN).bind(&hashed).bind(legacy).fetch_optional(p).await?),
            );
        };
        if !NO_SHA256.load(std::sync::atomic::Ordering::Relaxed) {
            let found = sqlx::query_as(PG)
                .bind(&hashed)
                .bind(&hash[..])
                .fetch_optional(lookups)
                .await;
            match found {
                // No sha256() (before 11): on to the query SQLite is sent.
                Err(e) if is_missing_function(&e) => {
                    if !NO_SHA256.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(
                            "PostgreSQL before 11 has no sha256(): API keys are sent to the database as presented (upgrade PostgreSQL so they never reach it)"
                        );
                    }
                }
                found => return Ok(found?),
            }
        }
        Ok(sqlx::query_as(PLAIN)
            .bind(&hashed)
            .bind(legacy)
            .fetch_optional(lookups)
            .await?)
    }

    /// Stores a new key by its hash, with its rate limits.
    pub async fn insert_api_key(
        &self,
        new: &NewApiKey<'_>,
        hash_hex: &str,
    ) -> Result<(), StoreError> {
        const SQL: &str = r#"INSERT INTO api_keys (key, status, "expiresAt", "createdAt", "updatedAt", id, name, prefix, rpm, max_concurrency)
            VALUES ($1, 'active', $2, $3, $3, $4, $5, $6, $7, $8)"#;
        let key = format!("{HASH_PREFIX}{hash_hex}");
        let limit = |v: Option<u32>| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX));
        on_pool!(self, p => sqlx::query(SQL)
            .bind(&key).bind(new.expires_at).bind(now()).bind(new.id).bind(new.name).bind(new.prefix)
            .bind(limit(new.limits.rpm)).bind(limit(new.limits.max_concurrency))
            .execute(p).await?.rows_affected());
        Ok(())
    }

    /// Every key, newest first (rows inserted by hand without a creation
    /// time last, on either database), and those that cannot be read,
    /// each named by its id or prefix (never its key) with why: a row
    /// edited by hand into a value frps cannot decode (a date without a
    /// time in SQLite's `"expiresAt"`, say) is left out of the listing
    /// rather than failing all of it.
    pub async fn list_api_keys(&self) -> Result<(Vec<ApiKeyRow>, Vec<String>), StoreError> {
        use sqlx::{FromRow, Row};
        const SQL: &str = concat!(
            "SELECT ",
            api_key_columns!(),
            r#" FROM api_keys ORDER BY "createdAt" DESC NULLS LAST, id"#
        );
        Ok(on_pool!(self, p => {
            let mut keys = Vec::new();
            let mut unreadable = Vec::new();
            for row in sqlx::query(SQL).fetch_all(p).await? {
                match ApiKeyRow::from_row(&row) {
                    Ok(key) => keys.push(key),
                    Err(e) => {
                        let named = |column| row.try_get::<Option<String>, _>(column).ok().flatten();
                        let which = match (named("id"), named("prefix")) {
                            (Some(id), _) => format!("id {id}"),
                            (None, Some(prefix)) => format!("prefix {prefix}"),
                            (None, None) => "a row without id or prefix".to_owned(),
                        };
                        unreadable.push(format!("{which}: {e}"));
                    }
                }
            }
            (keys, unreadable)
        }))
    }

    /// Keys matching `needle`: a plaintext key, its `sha256:` form (whose
    /// hex is `hash_hex`), an id or a visible prefix.
    pub async fn match_api_keys(
        &self,
        needle: &str,
        hash_hex: &str,
    ) -> Result<Vec<ApiKeyRow>, StoreError> {
        const FIND: &str = concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE key = $1 OR key = $2 OR id = $1 OR prefix = $1"
        );
        let hashed = format!("{HASH_PREFIX}{hash_hex}");
        Ok(on_pool!(self, p => sqlx::query_as(FIND).bind(needle).bind(&hashed).fetch_all(p).await?))
    }

    /// Sets the rate limits of the key stored as `key` (NULL: unlimited).
    pub async fn set_api_key_limits(
        &self,
        key: &str,
        rpm: Option<Option<i32>>,
        max_concurrency: Option<Option<i32>>,
    ) -> Result<Option<(Option<i32>, Option<i32>)>, StoreError> {
        // One statement: only the limits given change, so two changes of
        // different limits at once both land (read, then write both, lost
        // one of them).
        const SQL: &str = r#"UPDATE api_keys SET
                rpm = CASE WHEN $2 THEN $3 ELSE rpm END,
                max_concurrency = CASE WHEN $4 THEN $5 ELSE max_concurrency END,
                "updatedAt" = $6
            WHERE key = $1
            RETURNING rpm, max_concurrency"#;
        let row = on_pool!(self, p => sqlx::query_as::<_, (Option<i32>, Option<i32>)>(SQL)
            .bind(key)
            .bind(rpm.is_some()).bind(rpm.flatten())
            .bind(max_concurrency.is_some()).bind(max_concurrency.flatten())
            .bind(now())
            .fetch_optional(p).await?);
        Ok(row)
    }

    /// Marks keys matching `needle` (a plaintext key, its `sha256:` form, an
    /// id or a visible prefix) as revoked; returns the matching rows as
    /// they were (`status` `revoked`: revoked before, left as it was).
    pub async fn revoke_api_keys(
        &self,
        needle: &str,
        hash_hex: &str,
    ) -> Result<Vec<ApiKeyRow>, StoreError> {
        const REVOKE: &str = r#"UPDATE api_keys SET status = 'revoked', "updatedAt" = $2
            WHERE key = $1 AND (status IS NULL OR status <> 'revoked')"#;
        let rows = self.match_api_keys(needle, hash_hex).await?;
        for row in &rows {
            on_pool!(self, p => sqlx::query(REVOKE).bind(&row.key).bind(now()).execute(p).await?.rows_affected());
        }
        Ok(rows)
    }

    // ---- users ----------------------------------------------------------

    /// Creates a user; `StoreError::Duplicate` when the email is taken, in
    /// any letter case (emails are matched case-insensitively).
    pub async fn create_user(
        &self,
        email: &str,
        password_hash: &str,
    ) -> Result<UserRow, StoreError> {
        // One statement checks and inserts, so two adds of the same email
        // in different letter cases cannot both pass the check: SQLite
        // takes its write lock before the statement reads; PostgreSQL's
        // snapshot would not see a concurrent insert, so adds there queue on
        // a transaction-scoped advisory lock first.
        const SQL: &str = "INSERT INTO users (email, password_hash, created_at, updated_at)
            SELECT $1, $2, $3, $3
            WHERE NOT EXISTS (SELECT 1 FROM users WHERE lower(email) = lower($1))
            RETURNING id, email, password_hash, created_at";
        const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('frpx.users.email'))";
        // The check sees what committed while this add queued for the lock,
        // whatever the database's default isolation (under repeatable
        // read the lock's statement took the snapshot before the wait: two
        // adds in different letter cases both passed the check).
        const FRESH: &str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED";
        let at = now();
        let res: Result<Option<UserRow>, sqlx::Error> = match self {
            Store::Postgres(p, ..) => {
                async {
                    let mut tx = p.begin().await?;
                    sqlx::query(FRESH).execute(&mut *tx).await?;
                    sqlx::query(LOCK).execute(&mut *tx).await?;
                    let insert = sqlx::query_as(SQL).bind(email).bind(password_hash).bind(at);
                    let row = insert.fetch_optional(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(row)
                }
                .await
            }
            Store::Sqlite(p) => {
                let insert = sqlx::query_as(SQL).bind(email).bind(password_hash).bind(at);
                insert.fetch_optional(p).await
            }
        };
        match res {
            Ok(Some(user)) => Ok(user),
            Ok(None) => Err(StoreError::Duplicate(format!("user {email}"))),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                Err(StoreError::Duplicate(format!("user {email}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The user with this email, in any letter case (the oldest, should a
    /// database from before this rule hold two that differ only in case).
    pub async fn find_user(&self, email: &str) -> Result<Option<UserRow>, StoreError> {
        // A row of an application's own table with NULL where frps reads a
        // value (named in a warning at start) is absent, not a failure; the
        // oldest row is the account still (as for `set_password`), not the
        // next one that reads.
        const SQL: &str = "SELECT id, email, password_hash, created_at FROM (
                SELECT id, email, password_hash, created_at FROM users
                WHERE lower(email) = lower($1) ORDER BY id LIMIT 1
            ) oldest
            WHERE password_hash IS NOT NULL AND created_at IS NOT NULL";
        Ok(on_pool!(self, p => sqlx::query_as(SQL).bind(email).fetch_optional(p).await?))
    }

    /// Whether any account has this email, in any letter case (also one
    /// [`Store::find_user`] leaves out for a NULL it cannot read).
    pub async fn account_named(&self, email: &str) -> Result<bool, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM users WHERE lower(email) = lower($1)";
        let n: i64 = on_pool!(self, p => sqlx::query_scalar(SQL).bind(email).fetch_one(p).await?);
        Ok(n > 0)
    }

    /// Every user, oldest first.
    pub async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.list_users_in(Window::ALL).await
    }

    /// The users in `window` (keyed by id), oldest first.
    pub async fn list_users_in(&self, window: Window<i64>) -> Result<Vec<UserRow>, StoreError> {
        // The listing shows no hash: an application's own table that leaves
        // it NULL for some accounts (named in a warning at start) still
        // lists them, instead of failing every page from that row on. A row
        // without an email or a creation time is absent, as everywhere.
        const SQL: &str =
            "SELECT id, email, COALESCE(password_hash, '') AS password_hash, created_at
            FROM users
            WHERE id > $1 AND email IS NOT NULL AND created_at IS NOT NULL
            ORDER BY id LIMIT $2";
        let after = window.after.unwrap_or(i64::MIN);
        Ok(
            on_pool!(self, p => sqlx::query_as(SQL).bind(after).bind(window.limit()).fetch_all(p).await?),
        )
    }

    /// Replaces a user's password hash; false when no such user.
    pub async fn set_password(&self, email: &str, password_hash: &str) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE users SET password_hash = $2, updated_at = $3
            WHERE id = (SELECT id FROM users WHERE lower(email) = lower($1) ORDER BY id LIMIT 1)";
        let done = on_pool!(self, p => sqlx::query(SQL).bind(email).bind(password_hash).bind(now()).execute(p).await?.rows_affected());
        Ok(done > 0)
    }

    /// The shared secret `name`, made by the first frps that asks (every
    /// frps on this database then reads the same one): `fresh` on SQLite
    /// and PostgreSQL before 13; PostgreSQL 13 and later make it themselves
    /// (64 hex digits from two `gen_random_uuid()`, 244 random bits): a
    /// secret sent as a statement's parameter would reach the server's log
    /// where it logs statements. Only a database that has it already is not
    /// sent `fresh` at all.
    pub async fn server_secret(&self, name: &str, fresh: &str) -> Result<String, StoreError> {
        const INSERT: &str = "INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";
        const INSERT_MADE_THERE: &str = "INSERT INTO server_secrets (name, value) VALUES ($1, \
             replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')) \
             ON CONFLICT (name) DO NOTHING";
        const SELECT: &str = "SELECT value FROM server_secrets WHERE name = $1";
        let found: Option<(String,)> =
            on_pool!(self, p => sqlx::query_as(SELECT).bind(name).fetch_optional(p).await?);
        if let Some((value,)) = found {
            return Ok(value);
        }
        let made_there = match self {
            Store::Postgres(p, ..) => {
                match sqlx::query(INSERT_MADE_THERE).bind(name).execute(p).await {
                    Ok(_) => true,
                    // No gen_random_uuid() (before 13).
                    Err(e) if is_missing_function(&e) => false,
                    Err(e) => return Err(e.into()),
                }
            }
            Store::Sqlite(_) => false,
        };
        if !made_there {
            on_pool!(self, p => sqlx::query(INSERT).bind(name).bind(fresh).execute(p).await?.rows_affected());
        }
        let (value,): (String,) =
            on_pool!(self, p => sqlx::query_as(SELECT).bind(name).fetch_one(p).await?);
        Ok(value)
    }

    // ---- client tokens --------------------------------------------------

    /// Stores a client token by its hash for `user_id`. With `verified`
    /// (the password hash a login just checked), only if the user's hash
    /// is still that one: a password change (which revokes the user's
    /// tokens after it) cannot miss a token from a login that was checking
    /// the old password meanwhile. False when nothing was stored (no such
    /// user, or the password changed). PostgreSQL locks the user's row for
    /// the insert, so a change in flight is waited for and seen; SQLite runs
    /// one writer at a time.
    pub async fn insert_client_token(
        &self,
        id: &str,
        hash_hex: &str,
        prefix: &str,
        user_id: i64,
        expires_at: Option<NaiveDateTime>,
        verified: Option<&str>,
    ) -> Result<bool, StoreError> {
        macro_rules! insert {
            () => {
                "INSERT INTO client_tokens (id, token_hash, prefix, user_id, created_at, expires_at)
                SELECT $1, $2, $3, u.id, $5, $6 FROM users u
                WHERE u.id = $4 AND ($7 IS NULL OR u.password_hash = $7)"
            };
        }
        const PG: &str = concat!(insert!(), " FOR SHARE OF u");
        const LITE: &str = insert!();
        let sql = match self {
            Store::Postgres(..) => PG,
            Store::Sqlite(_) => LITE,
        };
        let done = on_pool!(self, p => sqlx::query(sql)
            .bind(id).bind(hash_hex).bind(prefix).bind(user_id).bind(now()).bind(expires_at).bind(verified)
            .execute(p).await?.rows_affected());
        Ok(done == 1)
    }

    /// The token with this hash, with its owner's email.
    pub async fn find_client_token(
        &self,
        hash_hex: &str,
    ) -> Result<Option<ClientTokenRow>, StoreError> {
        const SQL: &str = concat!(client_token_select!(), " WHERE t.token_hash = $1");
        Ok(on_pool!(self, p => sqlx::query_as(SQL).bind(hash_hex).fetch_optional(p).await?))
    }

    /// The token with this id, with its owner's email.
    pub async fn find_client_token_by_id(
        &self,
        id: &str,
    ) -> Result<Option<ClientTokenRow>, StoreError> {
        const SQL: &str = concat!(client_token_select!(), " WHERE t.id = $1");
        Ok(on_pool!(self, p => sqlx::query_as(SQL).bind(id).fetch_optional(p).await?))
    }

    /// Records that a token was used now.
    pub async fn touch_client_token(&self, id: &str) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE client_tokens SET last_used_at = $2 WHERE id = $1";
        on_pool!(self, p => sqlx::query(SQL).bind(id).bind(now()).execute(p).await?.rows_affected());
        Ok(())
    }

    /// Records the first use of token `id`, renewed from `parent`: every
    /// other token of its family (what it was renewed from, and any
    /// renewal of it that was lost on its way) is revoked, and it is marked
    /// used. `None` (nothing changed) when `id` was revoked meanwhile (its
    /// parent renewed again by a login racing this one); else how many
    /// were revoked.
    pub async fn confirm_client_token(
        &self,
        id: &str,
        parent: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.confirm_renewal(id, parent, true).await
    }

    /// [`Store::confirm_client_token`] for a renewal its box says it saved
    /// (`TokenSaved`), not yet used to log in: its `last_used_at` stays;
    /// `None` also when it was renewed again meanwhile (the newer renewal's
    /// own `TokenSaved` confirms that one).
    pub async fn confirm_saved_client_token(
        &self,
        id: &str,
        parent: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.confirm_renewal(id, parent, false).await
    }

    async fn confirm_renewal(
        &self,
        id: &str,
        parent: &str,
        used: bool,
    ) -> Result<Option<u64>, StoreError> {
        // Rows are locked parent first, as a renewal does, so the two take
        // turns instead of deadlocking.
        const LOCK: &str = "UPDATE client_tokens SET revoked_at = revoked_at WHERE id = $1";
        const USED: &str = "UPDATE client_tokens SET renewed_from = NULL, last_used_at = $2
            WHERE id = $1 AND revoked_at IS NULL";
        // A renewal said saved after it was renewed again (its write slow,
        // the next renewal on its way) is left as it is: confirming it would
        // revoke the newer one the box may be saving.
        const SAVED: &str = "UPDATE client_tokens SET renewed_from = NULL
            WHERE id = $1 AND revoked_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM client_tokens c
                              WHERE c.renewed_from = $1 AND c.revoked_at IS NULL)";
        const REVOKE: &str = "UPDATE client_tokens SET revoked_at = $2
            WHERE revoked_at IS NULL AND id <> $1
              AND COALESCE(family_id, id) = (SELECT COALESCE(family_id, id) FROM client_tokens WHERE id = $1)";
        // Locked parent first, as a renewal does; a revocation can still
        // take them the other way and PostgreSQL then aborts one of the
        // two as a deadlock: this one runs again (a login failing here
        // after its password or token was checked), as a revocation does.
        let at = now();
        let revoked = on_pool!(self, p => again_on_conflict(|| async {
            let mut tx = p.begin().await?;
            sqlx::query(LOCK).bind(parent).execute(&mut *tx).await?;
            let marked = if used {
                sqlx::query(USED).bind(id).bind(at).execute(&mut *tx).await?
            } else {
                sqlx::query(SAVED).bind(id).execute(&mut *tx).await?
            };
            Ok(if marked.rows_affected() == 0 {
                tx.rollback().await?;
                None
            } else {
                let n = sqlx::query(REVOKE).bind(id).bind(at).execute(&mut *tx).await?.rows_affected();
                tx.commit().await?;
                Some(n)
            })
        }).await?);
        Ok(revoked)
    }

    /// Client tokens, newest first; only usable ones when `active_only`
    /// (filtered by the database: revoked and expired rows are not read).
    pub async fn list_client_tokens(
        &self,
        active_only: bool,
    ) -> Result<Vec<ClientTokenRow>, StoreError> {
        self.list_client_tokens_in(active_only, Window::ALL).await
    }

    /// The client tokens in `window`, newest first (ties by id).
    pub async fn list_client_tokens_in(
        &self,
        active_only: bool,
        window: Window<TokenKey>,
    ) -> Result<Vec<ClientTokenRow>, StoreError> {
        const ALL: &str = concat!(
            client_token_select!(),
            "
            WHERE ($2 IS NULL OR t.created_at < $2 OR (t.created_at = $2 AND t.id > $3))
            ORDER BY t.created_at DESC, t.id LIMIT $1"
        );
        const ACTIVE: &str = concat!(
            client_token_select!(),
            "
            WHERE ($2 IS NULL OR t.created_at < $2 OR (t.created_at = $2 AND t.id > $3))
              AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > $4)
            ORDER BY t.created_at DESC, t.id LIMIT $1"
        );
        let limit = window.limit();
        let (created, id) = match window.after {
            Some(key) => (Some(key.created_at), key.id),
            None => (None, String::new()),
        };
        Ok(if active_only {
            on_pool!(self, p => sqlx::query_as(ACTIVE).bind(limit).bind(created).bind(&id).bind(now()).fetch_all(p).await?)
        } else {
            on_pool!(self, p => sqlx::query_as(ALL).bind(limit).bind(created).bind(&id).fetch_all(p).await?)
        })
    }

    /// Deletes the tokens revoked or expired before `cutoff` (they can never
    /// log in again; newer ones stay listed for a while, for the record).
    /// Returns how many went.
    pub async fn purge_client_tokens(&self, cutoff: NaiveDateTime) -> Result<u64, StoreError> {
        const SQL: &str = "DELETE FROM client_tokens
            WHERE revoked_at < $1 OR (revoked_at IS NULL AND expires_at < $1)";
        Ok(on_pool!(self, p => sqlx::query(SQL).bind(cutoff).execute(p).await?.rows_affected()))
    }

    /// Revokes tokens whose id or visible prefix is `needle`, or every token
    /// of the user with that email; returns how many were revoked.
    pub async fn revoke_client_tokens(&self, needle: &str) -> Result<u64, StoreError> {
        // A token named by id or prefix takes its whole family (what it was
        // renewed from and into) with it.
        const SQL: &str = "UPDATE client_tokens SET revoked_at = $2
            WHERE revoked_at IS NULL AND (
              COALESCE(family_id, id) IN (SELECT COALESCE(family_id, id) FROM client_tokens
                                          WHERE id = $1 OR prefix = $1)
              OR user_id IN (SELECT id FROM users WHERE lower(email) = lower($1)))";
        // A renewal committing while this ran (its new token not yet there
        // when the statement started) is caught by the next pass. One that
        // locks the family's rows in the other order (a renewal's first
        // use: parent, then the renewal) can make PostgreSQL abort this
        // statement as a deadlock: nothing was revoked by it, and it runs
        // again (an operator told "tokens were NOT revoked" after a
        // password change, for a race with a box logging in).
        let mut revoked = 0;
        let mut aborted = 0;
        let mut passes = 0;
        while passes < 4 {
            let ran = on_pool!(self, p => sqlx::query(SQL).bind(needle).bind(now()).execute(p).await.map(|d| d.rows_affected()));
            let n = match ran {
                Ok(n) => n,
                Err(e) if is_conflict(&e) && aborted < CONFLICT_RETRIES => {
                    aborted += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            revoked += n;
            passes += 1;
            if n == 0 {
                break;
            }
        }
        Ok(revoked)
    }

    /// How many token families hold a token with this id or prefix (an
    /// email names none here).
    pub async fn client_token_families(&self, needle: &str) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(DISTINCT COALESCE(family_id, id)) FROM client_tokens
            WHERE id = $1 OR prefix = $1";
        Ok(on_pool!(self, p => sqlx::query_scalar::<_, i64>(SQL).bind(needle).fetch_one(p).await?))
    }

    /// Renews token `parent` into a new one (`id`, `hash_hex`, `prefix`,
    /// `expires_at`) of the same account and family; false (nothing
    /// changed) when `parent` is revoked. `parent` stays valid until the new
    /// one is first used ([`Store::confirm_client_token`]), so a renewal
    /// lost on its way costs nothing; an earlier renewal of `parent` that
    /// was never used is deleted here (it was lost, since `parent` is being
    /// renewed again; revoked instead when it was renewed itself).
    ///
    /// With `unused_since`, nothing changes either when `parent` logged in
    /// after that time (a session that started then renews nothing once
    /// its box logged in again on another connection: that login's own
    /// renewal, handed to the box, would be revoked here as lost); checked
    /// under the row lock, so a login renewing it meanwhile is seen.
    pub async fn rotate_client_token(
        &self,
        parent: &str,
        id: &str,
        hash_hex: &str,
        prefix: &str,
        expires_at: Option<NaiveDateTime>,
        unused_since: Option<NaiveDateTime>,
    ) -> Result<bool, StoreError> {
        // Takes the parent's row lock (a no-op write) so that two frps
        // renewing it at once take turns, the second seeing the first's
        // renewal to revoke.
        const LOCK: &str = "UPDATE client_tokens SET revoked_at = NULL
            WHERE id = $1 AND revoked_at IS NULL
              AND ($2 IS NULL OR last_used_at IS NULL OR last_used_at <= $2)";
        // Never used nor renewed itself: deleted, not kept revoked for the
        // 30 days of the purge (a box logging in again and again with a
        // token past half its life added a row each time, without end).
        const GONE: &str = "DELETE FROM client_tokens
            WHERE renewed_from = $1 AND revoked_at IS NULL AND last_used_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM client_tokens c WHERE c.renewed_from = client_tokens.id)";
        const LOST: &str = "UPDATE client_tokens SET revoked_at = $2
            WHERE renewed_from = $1 AND revoked_at IS NULL";
        const INSERT: &str = "INSERT INTO client_tokens
              (id, token_hash, prefix, user_id, created_at, expires_at, family_id, renewed_from)
            SELECT $1, $2, $3, p.user_id, $4, $5, COALESCE(p.family_id, p.id), p.id
            FROM client_tokens p WHERE p.id = $6";
        // Aborted as a deadlock with a revocation of the family (see
        // `confirm_renewal`): run again.
        let at = now();
        let rotated = on_pool!(self, p => again_on_conflict(|| async {
            let mut tx = p.begin().await?;
            let live = sqlx::query(LOCK)
                .bind(parent)
                .bind(unused_since)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let inserted = if live == 1 {
                sqlx::query(GONE).bind(parent).execute(&mut *tx).await?;
                sqlx::query(LOST).bind(parent).bind(at).execute(&mut *tx).await?;
                sqlx::query(INSERT)
                    .bind(id).bind(hash_hex).bind(prefix).bind(at).bind(expires_at).bind(parent)
                    .execute(&mut *tx).await?.rows_affected()
            } else {
                0
            };
            Ok(if inserted == 1 {
                tx.commit().await?;
                true
            } else {
                tx.rollback().await?;
                false
            })
        }).await?);
        Ok(rotated)
    }

    // ---- client ids -----------------------------------------------------

    /// Binds `client_id` to `user_id` unless it is bound already, in one
    /// statement (two frps sharing a database cannot both bind it), or the
    /// account holds `most` ids already; returns the account it belongs to
    /// (`None`: it is not bound, as the account has no room for it). An id
    /// already bound is only looked up; new ids of one account are bound
    /// one at a time, so the cap is exact however many register at once.
    pub async fn claim_client_id(
        &self,
        client_id: &str,
        user_id: i64,
        most: u32,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(owner) = self.client_id_owner(client_id).await? {
            return Ok(Some(owner));
        }
        // The no-op update makes RETURNING yield a row bound meanwhile.
        // SQLite takes its write lock before the statement reads the count;
        // on PostgreSQL, whose snapshot would not see another transaction's
        // insert, claims for one account first queue on its row's lock.
        const SQL: &str = "INSERT INTO client_ids (id, user_id, created_at)
            SELECT $1, $2, $3
            WHERE (SELECT COUNT(*) FROM client_ids WHERE user_id = $2) < $4
            ON CONFLICT (id) DO UPDATE SET id = excluded.id
            RETURNING user_id";
        // Not one that blocks the key-share locks of inserts that name the
        // account (its logins' tokens).
        const LOCK: &str = "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE";
        // Each statement sees what committed before it, whatever the
        // database's default: the count, what the claim before it bound.
        const FRESH: &str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED";
        const COUNT: &str = "SELECT COUNT(*) FROM client_ids WHERE user_id = $1";
        let at = now();
        let most = i64::from(most);
        // An account at its cap is refused without queuing for the lock
        // (or the write lock), holding a pooled connection meanwhile.
        let (held,): (i64,) =
            on_pool!(self, p => sqlx::query_as(COUNT).bind(user_id).fetch_one(p).await?);
        let owner: Option<(i64,)> = match self {
            _ if held >= most => None,
            Store::Postgres(p, ..) => {
                let mut tx = p.begin().await?;
                sqlx::query(FRESH).execute(&mut *tx).await?;
                sqlx::query(LOCK).bind(user_id).execute(&mut *tx).await?;
                let claim = sqlx::query_as(SQL)
                    .bind(client_id)
                    .bind(user_id)
                    .bind(at)
                    .bind(most);
                let owner = claim.fetch_optional(&mut *tx).await?;
                tx.commit().await?;
                owner
            }
            Store::Sqlite(p) => {
                let claim = sqlx::query_as(SQL)
                    .bind(client_id)
                    .bind(user_id)
                    .bind(at)
                    .bind(most);
                claim.fetch_optional(p).await?
            }
        };
        match owner {
            Some((owner,)) => Ok(Some(owner)),
            // At its cap: the id may have been bound by another account
            // since the look-up.
            None => self.client_id_owner(client_id).await,
        }
    }

    /// The account `client_id` is bound to, if it is bound.
    pub async fn client_id_owner(&self, client_id: &str) -> Result<Option<i64>, StoreError> {
        const SQL: &str = "SELECT user_id FROM client_ids WHERE id = $1";
        let owner: Option<(i64,)> =
            on_pool!(self, p => sqlx::query_as(SQL).bind(client_id).fetch_optional(p).await?);
        Ok(owner.map(|(o,)| o))
    }

    /// Every bound client id with its account's email, by id.
    pub async fn list_client_ids(&self) -> Result<Vec<ClientIdRow>, StoreError> {
        // An account without an email (an application's own users table
        // anonymising it) is absent, as everywhere else.
        const SQL: &str = "SELECT c.id, c.user_id, u.email, c.created_at
            FROM client_ids c JOIN users u ON u.id = c.user_id
            WHERE u.email IS NOT NULL ORDER BY c.id";
        Ok(on_pool!(self, p => sqlx::query_as(SQL).fetch_all(p).await?))
    }

    /// Unbinds a client id, so the next account to register it gets it;
    /// false when it was not bound.
    pub async fn release_client_id(&self, client_id: &str) -> Result<bool, StoreError> {
        const SQL: &str = "DELETE FROM client_ids WHERE id = $1";
        let gone =
            on_pool!(self, p => sqlx::query(SQL).bind(client_id).execute(p).await?.rows_affected());
        Ok(gone > 0)
    }

    // ---- GPU assets -----------------------------------------------------

    /// Inserts or refreshes a machine's row: `Some` with the `"updatedAt"`
    /// the row now holds, `None` (nothing written) when the machine id
    /// belongs to another account's row or, with `unless_changed_since`,
    /// the row changed since.
    pub async fn upsert_gpu_asset(
        &self,
        user_id: Option<&str>,
        machine_id: &str,
        name: &str,
        status: &str,
        unless_changed_since: Option<NaiveDateTime>,
    ) -> Result<Option<Option<NaiveDateTime>>, StoreError> {
        // Machine ids come from frpc: one account must not take over (or
        // mark offline) the row of another account's machine. With
        // `unless_changed_since`, an existing row is written only while its
        // `updatedAt` is still that one (a session's `offline` must not
        // undo what another frps wrote since for the box's new session).
        const SQL: &str = r#"INSERT INTO gpu_assets ("userId", "machineId", name, status, "createdAt", "updatedAt")
            VALUES ($1, $2, $3, $4, $5, $5)
            ON CONFLICT ("machineId") DO UPDATE SET
              "userId" = excluded."userId", name = excluded.name,
              status = excluded.status, "updatedAt" = excluded."updatedAt"
            WHERE (gpu_assets."userId" IS NULL OR gpu_assets."userId" = excluded."userId")
              AND ($6 IS NULL OR gpu_assets."updatedAt" = $6)
            RETURNING "updatedAt""#;
        // The time as the row keeps it (a seed table's column may keep
        // less than the microseconds frps sends): what a later write
        // compares with.
        let written: Option<(Option<NaiveDateTime>,)> = on_pool!(self, p => sqlx::query_as(SQL)
            .bind(user_id).bind(machine_id).bind(name).bind(status).bind(now())
            .bind(unless_changed_since)
            .fetch_optional(p).await?);
        Ok(written.map(|(at,)| at))
    }

    /// Deletes `user_id`'s `offline` machine rows beyond the `keep` most
    /// recently written; returns how many went.
    pub async fn prune_gpu_assets(&self, user_id: &str, keep: u32) -> Result<u64, StoreError> {
        const SQL: &str = r#"DELETE FROM gpu_assets
            WHERE "userId" = $1 AND status = 'offline' AND "machineId" NOT IN (
              SELECT "machineId" FROM gpu_assets
              WHERE "userId" = $1 AND status = 'offline'
              ORDER BY "updatedAt" DESC NULLS LAST, "machineId" DESC
              LIMIT $2)"#;
        let gone = on_pool!(self, p => sqlx::query(SQL)
            .bind(user_id).bind(i64::from(keep))
            .execute(p).await?.rows_affected());
        Ok(gone)
    }

    /// The row of one machine.
    pub async fn gpu_asset(&self, machine_id: &str) -> Result<Option<GpuAssetRow>, StoreError> {
        const SQL: &str = r#"SELECT "userId", "machineId", name, status, "updatedAt" FROM gpu_assets WHERE "machineId" = $1"#;
        Ok(on_pool!(self, p => sqlx::query_as(SQL).bind(machine_id).fetch_optional(p).await?))
    }
}

/// `url` with any password replaced by `***`, for messages: the one in
/// `user:password@`, and the values of query parameters whose name holds
/// `password` (`?password=`, `&sslpassword=`, in any letter case) or is
/// `pass` (a Redis socket's `redis+unix:///run/redis.sock?pass=`), or of
/// such keywords in libpq's `key=value` form (`host=db password=secret`).
pub fn redact(url: &str) -> String {
    if !has_scheme(url) && url.contains('=') {
        return redact_keywords(url);
    }
    let url = redact_query(url);
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url,
            }
        }
        _ => url,
    }
}

/// libpq's keyword form with the values of keys holding `password`
/// replaced by `***`: `key = value` pairs, blanks allowed around `=`, a
/// value bare or quoted (`password = 'a b\\'c'`).
fn redact_keywords(conninfo: &str) -> String {
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    loop {
        // Blanks, then the key up to `=` (or blanks before it).
        let blanks = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..blanks]);
        rest = &rest[blanks..];
        let Some(eq) = rest.find('=') else {
            out.push_str(rest);
            return out;
        };
        let key = rest[..eq].trim_end();
        let secret = names_password(key);
        out.push_str(&rest[..=eq]);
        rest = &rest[eq + 1..];
        let blanks = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..blanks]);
        rest = &rest[blanks..];
        // The value's end: past its closing quote, else the next blank.
        let end = if let Some(quoted) = rest.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map_or(rest.len(), |(i, _)| i + 2)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push_str(if secret { "***" } else { &rest[..end] });
        rest = &rest[end..];
    }
}

/// Whether a connection setting named `name` holds a password (`password`,
/// `sslpassword`, and `pass`, where the Redis client reads the password of
/// a `redis+unix://` socket; in any letter case): its value is never shown.
fn names_password(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("password") || name == "pass"
}

/// Whether `url` starts with a URL scheme (`postgres://`, `sqlite:`…) rather
/// than being libpq's keyword form.
fn has_scheme(url: &str) -> bool {
    url.split_once(':').is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    })
}

/// `url` with the values of its password query parameters replaced by `***`.
fn redact_query(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _)) if names_password(name) => {
                format!("{name}=***")
            }
            _ => param.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

/// A SQLite database in a fresh temporary directory, removed when dropped
/// (for unit tests).
#[cfg(test)]
pub(crate) struct TempDb {
    /// `sqlite://` URL of the database.
    pub url: String,
    dir: std::path::PathBuf,
}

#[cfg(test)]
impl TempDb {
    /// A new empty directory for a database; `label` names it.
    pub fn new(label: &str) -> TempDb {
        let dir = std::env::temp_dir().join(format!("frps-{label}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        TempDb {
            url: format!("sqlite://{}", dir.join("db").display()),
            dir,
        }
    }
}

#[cfg(test)]
impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two processes starting on one new SQLite database at once (frps and
    /// an admin command) both start: the one whose migration lost the race
    /// runs them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_opening_a_new_sqlite_database_at_once_both_start() {
        for round in 0..10 {
            let db = TempDb::new("migrate-race");
            let open = |url: String| tokio::spawn(async move { Store::connect(&url).await });
            let (a, b) = tokio::join!(open(db.url.clone()), open(db.url.clone()));
            for store in [a.unwrap(), b.unwrap()] {
                let store = store.unwrap_or_else(|e| panic!("round {round}: {e}"));
                assert!(store.list_users().await.unwrap().is_empty());
                store.close().await;
            }
        }
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://frpx.db"), "sqlite://frpx.db");
    }

    #[test]
    fn password_query_parameters_are_redacted() {
        assert_eq!(
            redact("postgres://frpx@db/frpx?password=secret"),
            "postgres://frpx@db/frpx?password=***"
        );
        assert_eq!(
            redact(
                "postgres://frpx@db/frpx?sslmode=require&sslpassword=k3y&PassWord=p@ss&application_name=frps"
            ),
            "postgres://frpx@db/frpx?sslmode=require&sslpassword=***&PassWord=***&application_name=frps"
        );
        let both = redact("postgres://u:secret@h/db?password=other");
        assert_eq!(both, "postgres://u:***@h/db?password=***");
        assert_eq!(
            redact("sqlite://frpx.db?mode=rwc"),
            "sqlite://frpx.db?mode=rwc"
        );
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            redact("redis+unix:///run/redis.sock?db=1&PASS=s3cret&user=frps"),
            "redis+unix:///run/redis.sock?db=1&PASS=***&user=frps"
        );
        assert_eq!(
            redact("unix:///run/r.sock?pass=x"),
            "unix:///run/r.sock?pass=***"
        );
    }

    #[test]
    fn libpq_keyword_passwords_are_redacted() {
        assert_eq!(
            redact("host=db user=frpx password=s3cret dbname=frpx"),
            "host=db user=frpx password=*** dbname=frpx"
        );
        assert_eq!(
            redact("host=db PASSWORD='a b\\'c' sslpassword=k dbname=x"),
            "host=db PASSWORD=*** sslpassword=*** dbname=x"
        );
        assert_eq!(redact("password='unclosed"), "password=***");
        assert_eq!(redact("host=db dbname=x"), "host=db dbname=x");
        assert_eq!(redact("password="), "password=***");
        // Blanks around `=`, and values that look like URLs.
        assert_eq!(
            redact("host=db password = s3cret user=u"),
            "host=db password = *** user=u"
        );
        assert_eq!(redact("password= s3cret"), "password= ***");
        assert_eq!(redact("password=a://b host=db"), "password=*** host=db");
        assert_eq!(redact("  password  =  'x y'  "), "  password  =  ***  ");
    }
}
