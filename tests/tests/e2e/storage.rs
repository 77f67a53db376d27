//! Accounts, API keys and their caches, on SQLite always and on real
//! PostgreSQL and Redis when configured.

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Command;
use frps::admin::{Admin, ClientCommand, KeyCommand, LimitArg, TokenCommand, UserCommand};
use frps::auth::KeyValidator;
use frps::auth::accounts::LoginError;
use frps::auth::keys::KeyCheck;
use frps::ratelimit::Limits;
use frps::store::Store;
use frpx_tests::fake::FakeClient;
use frpx_tests::http;
use frpx_tests::services::{self, Cutter, TestPg};
use frpx_tests::{
    API_KEY, Backend, Fleet, Frpc, Frps, TEST_EMAIL, TEST_PASSWORD, frpc_config, frps_config,
};
use sqlx::Row;

/// Two tests of `$test(url)`: on a new SQLite database, and on a new
/// PostgreSQL database when one is configured.
macro_rules! on_both_databases {
    ($sqlite:ident, $postgres:ident, $test:ident) => {
        #[tokio::test]
        async fn $sqlite() {
            $test(&frpx_tests::temp_sqlite_url()).await;
        }

        #[tokio::test]
        async fn $postgres() {
            let Some(pg) = TestPg::create().await else {
                return;
            };
            $test(&pg.url).await;
            pg.drop_db().await;
        }
    };
}

async fn exec(store: &Store, sql: &str) {
    match store {
        Store::Postgres(p, ..) => sqlx::query(sql).execute(p).await.map(|_| ()),
        Store::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Runs `statements` on the database at `url` as its own application
/// would, without frps's migrations.
async fn exec_unmigrated(url: &str, statements: &[&str]) {
    let store = Store::connect_without_migrations(url).await.unwrap();
    for sql in statements {
        exec(&store, sql).await;
    }
    store.close().await;
}

/// Every text value of every row of `table`, joined.
async fn table_text(store: &Store, table: &str) -> String {
    let sql = format!("SELECT * FROM {table}");
    let mut out = String::new();
    match store {
        Store::Postgres(p, ..) => {
            for row in sqlx::query(&sql).fetch_all(p).await.unwrap() {
                for i in 0..row.len() {
                    if let Ok(Some(v)) = row.try_get::<Option<String>, _>(i) {
                        out.push_str(&v);
                        out.push('\n');
                    }
                }
            }
        }
        Store::Sqlite(p) => {
            for row in sqlx::query(&sql).fetch_all(p).await.unwrap() {
                for i in 0..row.len() {
                    if let Ok(Some(v)) = row.try_get::<Option<String>, _>(i) {
                        out.push_str(&v);
                        out.push('\n');
                    }
                }
            }
        }
    }
    out
}

async fn status(frps: &Frps, key: &str) -> u16 {
    http::get(frps.public(), "/", Some(key))
        .await
        .status
        .as_u16()
}

#[tokio::test]
async fn seed_readme_flow_hand_inserted_key_works_on_sqlite() {
    let fleet = Fleet::start(1).await;
    exec(
        &fleet.frps.state.store,
        "INSERT INTO api_keys (key, status) VALUES ('test-api-key-123', 'active')",
    )
    .await;
    assert_eq!(status(&fleet.frps, "test-api-key-123").await, 200);
    assert_eq!(status(&fleet.frps, "test-api-key-124").await, 401);
}

#[cfg(unix)]
#[tokio::test]
async fn a_new_sqlite_database_and_its_wal_files_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let url = frpx_tests::temp_sqlite_url();
    let path = std::path::PathBuf::from(url.strip_prefix("sqlite://").unwrap());
    let store = Store::connect(&url).await.unwrap();
    // Writes reach the write-ahead log, so -wal and -shm exist.
    exec(
        &store,
        "INSERT INTO api_keys (key, status) VALUES ('k', 'active')",
    )
    .await;
    let mut wal = path.clone().into_os_string();
    wal.push("-wal");
    let mut shm = path.clone().into_os_string();
    shm.push("-shm");
    for file in [path.clone(), wal.into(), shm.into()] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", file.display());
    }
    // An existing file keeps its mode (frps only warns).
    drop(store);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let again = Store::connect(&url).await.unwrap();
    drop(again);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
}

#[tokio::test]
async fn seed_readme_flow_on_postgres_with_the_seeds_own_tables() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    // Exactly the seed README's set-up, before frps ever ran.
    exec_unmigrated(
        &pg.url,
        &[
            r#"CREATE TABLE "public"."api_keys" (
                key VARCHAR PRIMARY KEY,
                status VARCHAR DEFAULT 'active',
                "expiresAt" TIMESTAMP,
                "createdAt" TIMESTAMP DEFAULT NOW(),
                "updatedAt" TIMESTAMP DEFAULT NOW()
            )"#,
            r#"CREATE TABLE "public"."gpu_assets" (
                "userId" VARCHAR,
                "machineId" VARCHAR PRIMARY KEY,
                name VARCHAR,
                status VARCHAR DEFAULT 'online',
                "createdAt" TIMESTAMP DEFAULT NOW(),
                "updatedAt" TIMESTAMP DEFAULT NOW()
            )"#,
            r#"INSERT INTO "public"."api_keys" (key, status) VALUES ('test-api-key-123', 'active')"#,
        ],
    )
    .await;

    let mut cfg = frps_config();
    cfg.database_url = pg.url.clone();
    let fleet = Fleet::start_with(1, cfg).await;
    assert_eq!(status(&fleet.frps, "test-api-key-123").await, 200);
    assert_eq!(status(&fleet.frps, "nope").await, 401);
    // The registered client is recorded in the seed's gpu_assets table.
    let client = fleet.frps.state.registry.get("client-0").unwrap();
    let asset = fleet
        .frps
        .state
        .store
        .gpu_asset(&client.registration.machine_id)
        .await
        .unwrap()
        .expect("gpu_assets row");
    assert_eq!(asset.name.as_deref(), Some("client-0"));
    assert_eq!(asset.status.as_deref(), Some("online"));
    assert_eq!(asset.user_id, Some(fleet.frps.user_id.to_string()));
    // Migration 0002 added the limit columns to the seed's own table.
    let store = &fleet.frps.state.store;
    let limits = Limits {
        rpm: Some(1),
        max_concurrency: None,
    };
    let (rows, _) = KeyValidator::set_limits(store, None, "test-api-key-123", limits.into())
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let fresh = KeyValidator::new(None, Some(store.clone()), None);
    assert!(matches!(
        fresh.check("test-api-key-123").await,
        KeyCheck::Valid(grant) if grant.limits == limits
    ));
    fleet.frps.stop().await;
    pg.drop_db().await;
}

#[tokio::test]
async fn tables_made_before_frps_with_columns_it_cannot_read_are_named_at_start() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    // The seed's api_keys with a zoned expiry, and an application's own
    // users table: the migrations keep both as they are.
    exec_unmigrated(
        &pg.url,
        &[
            r#"CREATE TABLE api_keys (
                key VARCHAR PRIMARY KEY,
                status VARCHAR DEFAULT 'active',
                "expiresAt" TIMESTAMPTZ,
                "createdAt" TIMESTAMP DEFAULT NOW(),
                "updatedAt" TIMESTAMP DEFAULT NOW()
            )"#,
            // A domain is read as its base type; a zoned time frps only
            // writes is fine.
            "CREATE DOMAIN address AS VARCHAR(320)",
            "CREATE TABLE users (
                id BIGSERIAL PRIMARY KEY,
                email address NOT NULL UNIQUE,
                password TEXT,
                created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
                updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
            )",
            "INSERT INTO api_keys (key, status) VALUES ('test-api-key-123', 'active')",
        ],
    )
    .await;
    let err = match Store::connect(&pg.url).await {
        Ok(_) => panic!("started on columns it cannot read"),
        Err(e) => e,
    };
    let frps::store::StoreError::Schema(ref wrong) = err else {
        panic!("{err}");
    };
    assert_eq!(
        wrong,
        &[
            "api_keys.\"expiresAt\" is timestamptz where frps reads timestamp",
            "users has no column \"password_hash\"",
            "users.\"created_at\" is timestamptz where frps reads timestamp",
        ]
    );
    let said = err.to_string();
    assert!(said.contains("ALTER TABLE"), "{said}");
    // Mended, it starts, and the seed's key works.
    exec_unmigrated(
        &pg.url,
        &[
            r#"ALTER TABLE api_keys ALTER COLUMN "expiresAt" TYPE TIMESTAMP"#,
            "ALTER TABLE users RENAME COLUMN password TO password_hash",
            "ALTER TABLE users ALTER COLUMN created_at TYPE TIMESTAMP",
        ],
    )
    .await;
    let store = Store::connect(&pg.url).await.unwrap();
    let keys = KeyValidator::new(None, Some(store.clone()), None);
    assert!(matches!(
        keys.check("test-api-key-123").await,
        KeyCheck::Valid(_)
    ));
    // Accounts go in and out of the kept users table, its domain and its
    // zoned update time included.
    store
        .create_user("owner@example.com", "hash-1")
        .await
        .unwrap();
    assert!(
        store
            .set_password("owner@example.com", "hash-2")
            .await
            .unwrap()
    );
    let user = store.find_user("owner@example.com").await.unwrap().unwrap();
    assert_eq!(user.password_hash, "hash-2");
    store.close().await;
    pg.drop_db().await;
}

#[tokio::test]
async fn an_application_users_row_with_null_where_frps_reads_a_value_is_absent() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    exec_unmigrated(
        &pg.url,
        &[
            "CREATE TABLE users (
                id BIGSERIAL PRIMARY KEY,
                email VARCHAR UNIQUE,
                password_hash TEXT,
                created_at TIMESTAMP,
                updated_at TIMESTAMP
            )",
            "INSERT INTO users (email, password_hash, created_at) VALUES
                ('whole@example.com', 'h1', '2026-01-01'),
                ('no-time@example.com', 'h2', NULL),
                ('no-hash@example.com', NULL, '2026-01-02'),
                (NULL, 'h3', '2026-01-03'),
                ('NO-HASH@example.com', 'h4', '2026-01-04')",
        ],
    )
    .await;
    let store = Store::connect(&pg.url).await.unwrap();
    // Listed (no hash is shown), but for the rows without an email or a
    // creation time; before, the whole page failed as if the database were
    // down, and every page after it.
    let listed: Vec<String> = store
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.email)
        .collect();
    assert_eq!(
        listed,
        [
            "whole@example.com",
            "no-hash@example.com",
            "NO-HASH@example.com"
        ]
    );
    assert!(
        store
            .find_user("whole@example.com")
            .await
            .unwrap()
            .is_some()
    );
    // The oldest row of an email in any case is the account, as for a
    // password change: unreadable, it is absent (not the next row).
    for absent in ["no-time@example.com", "no-hash@example.com"] {
        assert!(
            store.find_user(absent).await.unwrap().is_none(),
            "{absent}: absent, not a failure"
        );
    }
    // Client ids of the account without an email (user 4) and of a whole
    // one (user 1): the listing leaves out the first, and does not fail.
    assert_eq!(
        store.claim_client_id("anonymous-box", 4, 10).await.unwrap(),
        Some(4)
    );
    assert_eq!(
        store.claim_client_id("whole-box", 1, 10).await.unwrap(),
        Some(1)
    );
    let ids: Vec<String> = store
        .list_client_ids()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["whole-box"]);
    store.close().await;
    pg.drop_db().await;
}

#[tokio::test]
async fn frps_reads_and_writes_utc_whatever_the_databases_time_zone() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    // A server whose default zone is UTC+8.
    let mut psql = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url)
        .await
        .unwrap();
    let db = pg.url.rsplit('/').next().unwrap().to_owned();
    sqlx::query(&format!(
        "ALTER DATABASE {db} SET timezone TO 'Asia/Shanghai'"
    ))
    .execute(&mut psql)
    .await
    .unwrap();
    let mut cfg = frps_config();
    cfg.database_url = pg.url.clone();
    let frps = Frps::start(cfg).await;
    let Store::Postgres(pool, ..) = &frps.state.store else {
        unreachable!("a PostgreSQL store")
    };
    let (zone,): (String,) = sqlx::query_as("SHOW timezone")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(zone, "UTC");
    // Column defaults (NOW()) and frps's own timestamps agree.
    sqlx::query(r#"INSERT INTO api_keys (key, status) VALUES ('defaults', 'active')"#)
        .execute(pool)
        .await
        .unwrap();
    let (created,): (chrono::NaiveDateTime,) =
        sqlx::query_as(r#"SELECT "createdAt" FROM api_keys WHERE key = 'defaults'"#)
            .fetch_one(pool)
            .await
            .unwrap();
    let skew = (created - chrono::Utc::now().naive_utc())
        .num_seconds()
        .abs();
    assert!(skew < 60, "a default timestamp is {skew}s off UTC");
    drop(psql);
    frps.stop().await;
    pg.drop_db().await;
}

/// Statements waiting for a lock (token logins behind an operator's
/// transaction left open, or another frps's migration) hold frps's pool
/// connections until it is released, however soon frps gave up on them:
/// key lookups, which take no lock, have connections of their own and
/// still answer.
#[tokio::test]
async fn key_lookups_answer_while_statements_wait_for_a_lock() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::connect(&pg.url).await.unwrap();
    let (key, _) = KeyValidator::create(&store, None, None).await.unwrap();
    let mut psql = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE client_tokens IN ACCESS EXCLUSIVE MODE")
        .execute(&mut psql)
        .await
        .unwrap();
    // Twice as many token touches as the pool has connections, each given
    // up after a second, as frps's deadlines give up: their statements go
    // on waiting, each holding its connection.
    let touches = (0..32).map(|i| {
        let store = &store;
        async move {
            tokio::time::timeout(
                Duration::from_secs(1),
                store.touch_client_token(&format!("t{i}")),
            )
            .await
        }
    });
    let touched = futures_util::future::join_all(touches).await;
    assert!(
        touched.iter().all(Result::is_err),
        "they waited for the lock"
    );
    // A key is looked up, at once.
    let started = Instant::now();
    let found = store
        .find_api_key(&key, &frps::auth::secret::hash(&key))
        .await
        .expect("a lookup connection");
    assert!(found.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The lock released, the waiting statements end and the pool is whole.
    sqlx::raw_sql("ROLLBACK").execute(&mut psql).await.unwrap();
    drop(psql);
    tokio::time::timeout(Duration::from_secs(20), async {
        while store.touch_client_token("after").await.is_err() {}
    })
    .await
    .expect("the pool back");
    store.close().await;
    pg.drop_db().await;
}

/// The seal's shared secret is made by PostgreSQL itself (13 and later),
/// never sent as a statement's parameter (which a server logging its
/// statements would log), and read back as it is by every later start.
#[tokio::test]
async fn the_shared_secret_is_made_by_postgresql() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::connect(&pg.url).await.unwrap();
    let made = store
        .server_secret("test-secret", "sent-by-frps")
        .await
        .unwrap();
    assert_eq!(made.len(), 64, "{made}");
    assert!(made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
    let again = store.server_secret("test-secret", "another").await.unwrap();
    assert_eq!(again, made);
    store.close().await;
    pg.drop_db().await;
    // SQLite, in frps's own process, keeps what frps made.
    let sqlite = Store::connect(&frpx_tests::temp_sqlite_url())
        .await
        .unwrap();
    assert_eq!(
        sqlite
            .server_secret("test-secret", "made-here")
            .await
            .unwrap(),
        "made-here"
    );
    sqlite.close().await;
}

/// Applies only migration 0001 to the database at `url`, as an frps from
/// before rate limits did.
async fn migrate_to_0001(url: &str) -> Store {
    let store = Store::connect_without_migrations(url).await.unwrap();
    let dir = std::env::temp_dir().join(format!("frpx-0001-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(store.backend())
        .join("0001_init.sql");
    std::fs::copy(source, dir.join("0001_init.sql")).unwrap();
    let migrator = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    match &store {
        Store::Postgres(p, ..) => migrator.run(p).await,
        Store::Sqlite(p) => migrator.run(p).await,
    }
    .expect("migration 0001");
    std::fs::remove_dir_all(dir).unwrap();
    store
}

/// A database at migration 0001 with a key in it is upgraded by frps: the
/// key keeps working, unlimited, and limits can be set and are enforced by
/// the schema (positive or NULL).
async fn limits_migration_upgrades(url: &str) {
    let old = migrate_to_0001(url).await;
    exec(
        &old,
        "INSERT INTO api_keys (key, status) VALUES ('pre-upgrade-key', 'active')",
    )
    .await;
    old.close().await;

    let store = Store::connect(url).await.expect("0002 applies");
    let validator = KeyValidator::new(None, Some(store.clone()), None);
    assert!(matches!(
        validator.check("pre-upgrade-key").await,
        KeyCheck::Valid(grant) if grant.limits.is_unlimited()
    ));
    let limits = Limits {
        rpm: Some(5),
        max_concurrency: Some(2),
    };
    let (rows, _) = KeyValidator::set_limits(&store, None, "pre-upgrade-key", limits.into())
        .await
        .unwrap();
    assert_eq!(rows[0].1, limits);
    let row = store
        .find_api_key(
            "pre-upgrade-key",
            &frps::auth::secret::hash("pre-upgrade-key"),
        )
        .await
        .unwrap()
        .expect("row");
    assert_eq!(row.limits(), limits);
    for bad in [
        "UPDATE api_keys SET rpm = 0",
        "UPDATE api_keys SET max_concurrency = -1",
    ] {
        let refused = match &store {
            Store::Postgres(p, ..) => sqlx::query(bad).execute(p).await.is_err(),
            Store::Sqlite(p) => sqlx::query(bad).execute(p).await.is_err(),
        };
        assert!(refused, "{bad} was accepted");
    }
    let (key, _) = KeyValidator::create_with_limits(&store, None, None, limits)
        .await
        .unwrap();
    assert!(matches!(
        validator.check(&key).await,
        KeyCheck::Valid(grant) if grant.limits == limits
    ));
    store.close().await;
    // Running the migrations again changes nothing.
    Store::connect(url)
        .await
        .expect("migrations are idempotent")
        .close()
        .await;
}

#[tokio::test]
async fn limits_migration_upgrades_a_sqlite_database_from_0001() {
    limits_migration_upgrades(&frpx_tests::temp_sqlite_url()).await;
}

#[tokio::test]
async fn limits_migration_upgrades_a_postgres_database_from_0001() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    limits_migration_upgrades(&pg.url).await;
    pg.drop_db().await;
}

#[tokio::test]
async fn expired_and_inactive_keys_are_refused() {
    let fleet = Fleet::start(1).await;
    let store = &fleet.frps.state.store;
    exec(store, "INSERT INTO api_keys (key, status, \"expiresAt\") VALUES ('expired-key', 'active', '2000-01-01 00:00:00')").await;
    exec(
        store,
        "INSERT INTO api_keys (key, status) VALUES ('disabled-key', 'disabled')",
    )
    .await;
    exec(store, "INSERT INTO api_keys (key, status, \"expiresAt\") VALUES ('future-key', 'active', '2999-01-01 00:00:00')").await;
    assert_eq!(status(&fleet.frps, "expired-key").await, 401);
    assert_eq!(status(&fleet.frps, "disabled-key").await, 401);
    assert_eq!(status(&fleet.frps, "future-key").await, 200);
    let (key, _) = KeyValidator::create(
        store,
        Some("short"),
        Some(chrono::Utc::now().naive_utc() - chrono::Duration::seconds(1)),
    )
    .await
    .unwrap();
    assert_eq!(status(&fleet.frps, &key).await, 401);
}

#[tokio::test]
async fn created_keys_are_stored_only_as_hashes_in_the_database_and_redis() {
    let mut cfg = frps_config();
    let redis = services::redis_url();
    let prefix = services::redis_prefix();
    if let Some(url) = &redis {
        cfg.redis_url = url.clone();
        cfg.redis_prefix = prefix.clone();
    }
    let fleet = Fleet::start_with(1, cfg).await;
    let store = &fleet.frps.state.store;
    let (key, secret) = KeyValidator::create(store, Some("ci"), None).await.unwrap();
    assert!(key.starts_with("frpx_"));
    assert_eq!(status(&fleet.frps, &key).await, 200);
    let text = table_text(store, "api_keys").await;
    assert!(!text.contains(&key), "plaintext key in the database");
    assert!(text.contains(&secret.hash_hex));
    // What is stored does not work as a key (a leaked backup or Redis key
    // name gives away no access).
    let stored = format!("sha256:{}", secret.hash_hex);
    assert_eq!(status(&fleet.frps, &stored).await, 401);
    assert_eq!(
        fleet.frps.state.keys.check(&stored).await,
        KeyCheck::Invalid
    );
    let row = store
        .find_api_key(&stored, &frps::auth::secret::hash(&stored))
        .await
        .unwrap();
    assert!(row.is_none(), "the stored form matched itself");

    if let Some(url) = redis {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        frpx_tests::eventually_async("the key is cached in Redis", || {
            let mut conn = conn.clone();
            let pattern = format!("{prefix}*");
            async move {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                !keys.is_empty()
            }
        })
        .await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        for k in keys {
            assert!(!k.contains(&key), "plaintext key in a Redis key name");
            let v: String = redis::cmd("GET")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(!v.contains(&key), "plaintext key in a Redis value");
        }
    }
}

#[tokio::test]
async fn a_revoked_key_cannot_be_cached_again_by_a_late_validation() {
    let Some(url) = services::redis_url() else {
        return;
    };
    let prefix = services::redis_prefix();
    let redis = frps::auth::redis::RedisCache::connect_now(
        &url,
        &prefix,
        frps::auth::redis::Seal::random(),
    )
    .await
    .unwrap();
    let entry = frps::auth::redis::CachedKey {
        expires_at: None,
        limits: Limits::default(),
    };
    let now = chrono::Utc::now().timestamp();
    let (kept, revoked) = (
        frps::auth::secret::hash("kept"),
        frps::auth::secret::hash("revoked"),
    );
    redis.set(&kept, entry, now).await;
    redis.set(&revoked, entry, now).await;
    assert_eq!(redis.get(&revoked).await.map(|c| c.entry), Some(entry));
    // Gone from Redis; not "published": no frps listens on this prefix.
    assert!(!redis.revoke(&revoked).await);
    assert_eq!(redis.get(&revoked).await, None);
    // An frps that read the row just before the revocation writes it back:
    // the tombstone keeps it out.
    redis.set(&revoked, entry, now).await;
    assert_eq!(redis.get(&revoked).await, None);
    assert_eq!(redis.get(&kept).await.map(|c| c.entry), Some(entry));
    assert_eq!(redis.count_entries().await, Some(1));
    // Even a write that reaches Redis minutes late (a path retransmitting):
    // the tombstone outlasts any entry sealed before the revocation (one is
    // read for REDIS_TTL past its seal, a minute of clock skew each way).
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let tombstone = format!("{prefix}revoked:{{{}}}", frps::auth::secret::hex(&revoked));
    let left: i64 = redis::cmd("TTL")
        .arg(&tombstone)
        .query_async(&mut conn)
        .await
        .unwrap();
    let outlived = frps::auth::redis::REDIS_TTL.as_secs() as i64 + 2 * 60;
    assert!(left > outlived, "tombstone {tombstone} lasts {left} s");
}

/// What a subscription reported: `None` for "forget everything" (a new
/// subscription), a key hash for a revocation.
type Revocations = tokio::sync::mpsc::UnboundedReceiver<Option<[u8; 32]>>;

async fn next_revocation(rx: &mut Revocations, within: Duration) -> Option<Option<[u8; 32]>> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

#[tokio::test]
async fn a_command_connection_gone_silent_is_replaced() {
    let Some(url) = services::redis_url() else {
        return;
    };
    let cutter = Cutter::start(services::redis_addr(&url)).await;
    let via = format!("redis://{}", cutter.addr);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let cache = frps::auth::redis::RedisCache::start(
        &via,
        &services::redis_prefix(),
        frps::auth::redis::Seal::random(),
        std::sync::Arc::new(|_| {}),
        frps::auth::redis::Keepalive::default(),
        shutdown.clone(),
    )
    .unwrap();
    let hash = frps::auth::secret::hash("some key");
    frpx_tests::eventually_async("Redis answers", || async {
        cache.get(&hash).await;
        cache.is_healthy() && cache.subscriptions() == 1
    })
    .await;
    // The path dies without a reset: no error, no answer, for as long as
    // the kernel would retransmit (minutes). New connections get through.
    let stalled = Instant::now();
    cutter.stall_open();
    let mut unanswered = 0;
    loop {
        cache.get(&hash).await;
        if cache.is_healthy() {
            break;
        }
        unanswered += 1;
        assert!(
            unanswered < 40,
            "still no answer after {unanswered} operations"
        );
    }
    // A few went unanswered, then a new connection took over.
    assert!(unanswered >= 3, "{unanswered}");
    // The subscription is made again at once too (what failed may be a
    // Redis restarted or failed over, whose entries it must not trust),
    // not when its own pings find its path dead (15 s + 5 s).
    while cache.subscriptions() < 2 {
        assert!(
            stalled.elapsed() < Duration::from_secs(10),
            "the subscription was not made again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
}

#[tokio::test]
async fn a_silent_revocation_subscription_is_replaced_and_the_cache_forgotten() {
    let Some(url) = services::redis_url() else {
        return;
    };
    // The path to Redis goes quiet without a reset (a NAT forgetting the
    // flow): what Redis sends is held, and dropped with the connection.
    let cutter = Cutter::start(services::redis_addr(&url)).await;
    let via = format!("redis://{}", cutter.addr);
    let prefix = services::redis_prefix();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let keepalive = frps::auth::redis::Keepalive {
        every: Duration::from_millis(200),
        within: Duration::from_millis(500),
    };
    let _cache = frps::auth::redis::RedisCache::start(
        &via,
        &prefix,
        frps::auth::redis::Seal::random(),
        std::sync::Arc::new(move |hash| {
            let _ = tx.send(hash);
        }),
        keepalive,
        shutdown.clone(),
    )
    .unwrap();
    assert_eq!(
        next_revocation(&mut rx, Duration::from_secs(10)).await,
        Some(None),
        "subscribed"
    );
    let publisher = frps::auth::redis::RedisCache::connect_now(
        &url,
        &prefix,
        frps::auth::redis::Seal::random(),
    )
    .await
    .unwrap();
    let first = frps::auth::secret::hash("first");
    assert!(publisher.revoke(&first).await);
    assert_eq!(
        next_revocation(&mut rx, Duration::from_secs(5)).await,
        Some(Some(first)),
        "a revocation arrives while the path is alive"
    );

    // Pings keep a live subscription: nothing reconnects while Redis answers.
    let connections = cutter.accepted().len();
    tokio::time::sleep(keepalive.every * 3).await;
    assert_eq!(
        cutter.accepted().len(),
        connections,
        "reconnected needlessly"
    );

    cutter.hold_answers();
    let held = Instant::now();
    let lost = frps::auth::secret::hash("lost");
    assert!(publisher.revoke(&lost).await, "published past the cutter");
    // The ping goes unanswered: frps gives the connection up and tries a
    // new one, well before its in-process cache would have expired the key.
    frpx_tests::eventually_async("a new subscription is attempted", || {
        let n = cutter.accepted().len();
        async move { n > connections }
    })
    .await;
    assert!(
        held.elapsed() < frps::auth::keys::LOCAL_TTL,
        "noticed only after {:?}",
        held.elapsed()
    );
    assert!(rx.try_recv().is_err(), "nothing arrived while held");
    cutter.release_answers();
    // The held revocation went down with the old connection; the new
    // subscription says to forget everything instead.
    assert_eq!(
        next_revocation(&mut rx, Duration::from_secs(10)).await,
        Some(None),
        "the cache is forgotten"
    );
    let second = frps::auth::secret::hash("second");
    assert!(publisher.revoke(&second).await);
    assert_eq!(
        next_revocation(&mut rx, Duration::from_secs(5)).await,
        Some(Some(second)),
        "revocations arrive again"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn revocation_reaches_a_second_frps_at_once() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let Some(redis) = services::redis_url() else {
        return;
    };
    let prefix = services::redis_prefix();
    let config = || {
        let mut cfg = frps_config();
        cfg.database_url = pg.url.clone();
        cfg.redis_url = redis.clone();
        cfg.redis_prefix = prefix.clone();
        cfg
    };
    let a = Fleet::start_with(1, config()).await;
    let b = Fleet::start_with(1, config()).await;
    let (key, secret) = KeyValidator::create(&a.frps.state.store, None, None)
        .await
        .unwrap();
    assert_eq!(status(&a.frps, &key).await, 200);
    assert_eq!(status(&b.frps, &key).await, 200);
    assert_eq!(
        status(&b.frps, &key).await,
        200,
        "now served from b's caches"
    );
    let redis_ready = || b.frps.state.redis.as_ref().is_some_and(|r| r.is_healthy());
    frpx_tests::eventually("b is subscribed to Redis", redis_ready).await;

    // Revoke with the admin command, as an operator would.
    let mut out = Vec::new();
    let admin = Admin::Key {
        command: KeyCommand::Revoke {
            key: secret.id.clone(),
        },
    };
    frps::admin::run(
        admin,
        &config(),
        &mut out,
        &mut std::io::sink(),
        &mut std::io::empty(),
    )
    .await
    .unwrap();
    let revoked_at = Instant::now();
    assert!(String::from_utf8_lossy(&out).contains("revoked"));
    loop {
        if status(&b.frps, &key).await == 401 {
            break;
        }
        // Published at once (milliseconds here); 3 s of slack for a
        // loaded machine, still far below the 5-minute cache lifetime a
        // lost publication would leave.
        assert!(
            revoked_at.elapsed() < Duration::from_secs(3),
            "b still accepts the key after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&a.frps, &key).await, 401);
    // The command run with another prefix than the servers' reaches no
    // frps: it says so (0 listeners was taken for a published revocation).
    let mut elsewhere = config();
    elsewhere.redis_prefix = format!("{prefix}elsewhere:");
    let again = Admin::Key {
        command: KeyCommand::Revoke {
            key: secret.id.clone(),
        },
    };
    let (said, noted) = admin_said(&elsewhere, again, "").await.unwrap();
    assert!(said.starts_with("already revoked "), "{said}");
    assert!(
        noted.contains(&format!(
            "no frps listens on `{prefix}elsewhere:revocations`"
        )),
        "{noted}"
    );
    a.frps.stop().await;
    b.frps.stop().await;
    pg.drop_db().await;
}

/// Redis may lose a revocation (restarted from a snapshot older than it,
/// or a replica promoted before it got it) and bring back the revoked
/// key's entry, sealed and young enough to be taken. frps's subscription
/// ends with such a restart; entries sealed before the next one are taken
/// on the database's word.
#[tokio::test]
async fn an_entry_redis_brought_back_after_losing_a_revocation_is_not_trusted() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let cutter = Cutter::start(services::redis_addr(&redis)).await;
    let prefix = services::redis_prefix();
    let mut cfg = frps_config();
    cfg.redis_url = format!("redis://{}", cutter.addr);
    cfg.redis_prefix = prefix.clone();
    let fleet = Fleet::start_with(1, cfg.clone()).await;
    let frps = &fleet.frps;
    let cache = frps.state.redis.clone().expect("redis configured");
    frpx_tests::eventually("connected and subscribed", || {
        cache.is_healthy() && cache.subscriptions() == 1
    })
    .await;
    let (key, secret) = KeyValidator::create(&frps.state.store, None, None)
        .await
        .unwrap();
    let (other, _) = KeyValidator::create(&frps.state.store, None, None)
        .await
        .unwrap();
    assert_eq!(status(frps, &key).await, 200);
    assert_eq!(status(frps, &other).await, 200);
    frpx_tests::eventually_async("both keys cached in Redis", || async {
        cache.count_entries().await == Some(2)
    })
    .await;
    // The entry as Redis holds it, kept as a snapshot would.
    let mut direct = redis::Client::open(redis.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let hex = frps::auth::secret::hex(&frps::auth::secret::hash(&key));
    let (entry, tombstone) = (
        format!("{prefix}key:{{{hex}}}"),
        format!("{prefix}revoked:{{{hex}}}"),
    );
    let snapshot: String = redis::cmd("GET")
        .arg(&entry)
        .query_async(&mut direct)
        .await
        .unwrap();
    let revoke = Admin::Key {
        command: KeyCommand::Revoke {
            key: secret.id.clone(),
        },
    };
    let said = admin(&cfg, revoke, "").await.unwrap();
    assert!(said.contains("revoked"), "{said}");
    // Redis restarts from the snapshot: the revocation's deletion and
    // tombstone are lost, and every connection to it with them.
    let _: () = redis::cmd("SET")
        .arg(&entry)
        .arg(&snapshot)
        .arg("EX")
        .arg(300)
        .query_async(&mut direct)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&tombstone)
        .query_async(&mut direct)
        .await
        .unwrap();
    cutter.cut().await;
    cutter.restore();
    frpx_tests::eventually("subscribed again", || {
        cache.is_healthy() && cache.subscriptions() >= 2
    })
    .await;
    // The command connection is back too (its first command after the cut
    // fails, and would send the lookup to the database for that alone).
    frpx_tests::eventually_async("Redis answers again", || async {
        cache.count_entries().await == Some(2)
    })
    .await;
    // The brought-back entry is not taken: the database says revoked, and
    // the entry is deleted (tombstoned) for frps that still trust Redis.
    assert_eq!(status(frps, &key).await, 401);
    let left: Option<String> = redis::cmd("GET")
        .arg(&entry)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(left, None);
    let tombstoned: bool = redis::cmd("EXISTS")
        .arg(&tombstone)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert!(tombstoned);
    // A key that is valid is still served (from the database now).
    assert_eq!(status(frps, &other).await, 200);
}

#[tokio::test]
async fn requests_keep_succeeding_while_redis_is_down() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let cutter = Cutter::start(services::redis_addr(&redis)).await;
    let mut cfg = frps_config();
    cfg.redis_url = format!("redis://{}", cutter.addr);
    cfg.redis_prefix = services::redis_prefix();
    let fleet = Fleet::start_with(1, cfg).await;
    let store = &fleet.frps.state.store;
    let cache = fleet.frps.state.redis.clone().expect("redis configured");
    frpx_tests::eventually("Redis connected", || cache.is_healthy()).await;
    let (key, _) = KeyValidator::create(store, None, None).await.unwrap();
    for _ in 0..10 {
        assert_eq!(status(&fleet.frps, &key).await, 200);
    }
    // Redis was used: the key is cached there.
    frpx_tests::eventually_async("the key is cached in Redis", || async {
        cache.count_entries().await == Some(1)
    })
    .await;
    cutter.cut().await;
    let (fresh, _) = KeyValidator::create(store, None, None).await.unwrap();
    for _ in 0..20 {
        assert_eq!(status(&fleet.frps, &key).await, 200);
        assert_eq!(
            status(&fleet.frps, &fresh).await,
            200,
            "uncached key served from the database"
        );
        assert_eq!(status(&fleet.frps, "unknown").await, 401);
    }
    // The outage was seen, not served around by chance.
    assert!(!cache.is_healthy(), "Redis is known to be down");
    cutter.restore();
    for _ in 0..20 {
        assert_eq!(status(&fleet.frps, &key).await, 200);
    }
    // Recovery without restart: uncached keys are cached in Redis again.
    frpx_tests::eventually_async("Redis is used again", || async {
        let (fresh, _) = KeyValidator::create(store, None, None).await.unwrap();
        status(&fleet.frps, &fresh).await == 200
            && cache.is_healthy()
            && cache.count_entries().await.is_some_and(|n| n > 1)
    })
    .await;
}

/// PostgreSQL may log statements with their parameters: a caller's key,
/// valid or not, reaches it only as its hash, legacy plaintext rows
/// included (compared by PostgreSQL's own `sha256`).
#[tokio::test]
async fn presented_keys_never_reach_postgres_in_plaintext() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let cutter = Cutter::start(pg.addr()).await;
    // Unencrypted through the cutter, so what it records is what was sent.
    let mut url = url::Url::parse(&pg.url_via(cutter.addr)).unwrap();
    url.query_pairs_mut().append_pair("sslmode", "disable");
    let store = Store::connect(url.as_str()).await.unwrap();
    let legacy = "legacy-plaintext-key-6f1d";
    let stranger = "guessed-key-93ab";
    exec(
        &store,
        &format!("INSERT INTO api_keys (key, status) VALUES ('{legacy}', 'active')"),
    )
    .await;
    let validator = KeyValidator::new(None, Some(store.clone()), None);
    let (created, _) = KeyValidator::create(&store, None, None).await.unwrap();
    assert!(matches!(validator.check(legacy).await, KeyCheck::Valid(_)));
    assert!(matches!(
        validator.check(&created).await,
        KeyCheck::Valid(_)
    ));
    assert_eq!(validator.check(stranger).await, KeyCheck::Invalid);
    // A row that is not printable ASCII (no header value can carry its
    // key) is passed over, not a failure of every lookup.
    exec(
        &store,
        "INSERT INTO api_keys (key, status) VALUES ('clé-ünïcode', 'active')",
    )
    .await;
    let fresh = KeyValidator::new(None, Some(store.clone()), None);
    assert!(matches!(fresh.check(legacy).await, KeyCheck::Valid(_)));
    assert_eq!(fresh.check("another-guess").await, KeyCheck::Invalid);
    // A revoked legacy row is found, and refused.
    exec(
        &store,
        "UPDATE api_keys SET status = 'revoked' WHERE key LIKE 'legacy-%'",
    )
    .await;
    let row = store
        .find_api_key(legacy, &frps::auth::secret::hash(legacy))
        .await
        .unwrap()
        .expect("the legacy row, found by its hash");
    assert_eq!(row.status.as_deref(), Some("revoked"));
    let fresh = KeyValidator::new(None, Some(store.clone()), None);
    assert_eq!(fresh.check(legacy).await, KeyCheck::Invalid);
    let sent = cutter.sent();
    let seen = |s: &str| sent.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(
        seen("INSERT INTO api_keys"),
        "the cutter records the traffic"
    );
    for key in [created.as_str(), stranger] {
        assert!(!seen(key), "{key} was sent to PostgreSQL");
    }
    // The legacy key went in by the INSERT above, and only there.
    let statements = sent
        .windows(legacy.len())
        .filter(|w| *w == legacy.as_bytes());
    assert_eq!(statements.count(), 1);
    store.close().await;
    pg.drop_db().await;
}

#[tokio::test]
async fn database_down_cached_keys_work_and_unknown_keys_get_503() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let cutter = Cutter::start(pg.addr()).await;
    let mut cfg = frps_config();
    cfg.database_url = pg.url_via(cutter.addr);
    cfg.key_failures_per_minute = 3;
    let fleet = Fleet::start_with(1, cfg).await;
    let (key, _) = KeyValidator::create(&fleet.frps.state.store, None, None)
        .await
        .unwrap();
    assert_eq!(status(&fleet.frps, &key).await, 200);
    let (fresh, _) = KeyValidator::create(&fleet.frps.state.store, None, None)
        .await
        .unwrap();

    cutter.cut().await;
    // Lookups the database could not answer do not spend the address's
    // budget for unknown keys (3 a minute here).
    for i in 0..5 {
        let reply = http::get(fleet.frps.public(), "/", Some(&format!("unasked-{i}"))).await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "auth_unavailable");
    }
    assert_eq!(
        status(&fleet.frps, &key).await,
        200,
        "cached key keeps working"
    );
    assert_eq!(
        status(&fleet.frps, API_KEY).await,
        200,
        "static key keeps working"
    );
    let reply = http::get(fleet.frps.public(), "/", Some("never-seen-key")).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(
        reply.json()["error"]["message"],
        "authentication backend unavailable"
    );

    cutter.restore();
    frpx_tests::eventually_async("the database is used again", || async {
        status(&fleet.frps, &fresh).await == 200
    })
    .await;
    assert_eq!(
        status(&fleet.frps, "another-unknown-key").await,
        401,
        "looked up, not refused unasked"
    );
    fleet.frps.stop().await;
    pg.drop_db().await;
}

/// Another session's transaction holding tables exclusively: queries on
/// them wait on its locks for as long as it lasts.
struct TableLock(sqlx::PgConnection);

impl TableLock {
    /// Connects to `url` and locks `tables`.
    async fn take(url: &str, tables: &[&str]) -> TableLock {
        use sqlx::Connection;
        let mut lock = TableLock(sqlx::PgConnection::connect(url).await.unwrap());
        lock.again(tables).await;
        lock
    }

    /// Locks `tables` (again, after [`TableLock::release`]).
    async fn again(&mut self, tables: &[&str]) {
        sqlx::query("BEGIN").execute(&mut self.0).await.unwrap();
        for table in tables {
            sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
                .execute(&mut self.0)
                .await
                .unwrap();
        }
    }

    /// Ends the transaction: the waiting queries go on.
    async fn release(&mut self) {
        sqlx::query("ROLLBACK").execute(&mut self.0).await.unwrap();
    }
}

on_both_databases!(
    a_login_takes_the_accounts_email_in_ascii_case_only_on_sqlite,
    a_login_takes_the_accounts_email_in_ascii_case_only_on_postgres,
    a_login_takes_the_accounts_email_in_ascii_case_only
);

/// PostgreSQL's lower() folds `İ` to `i`: `admİn@…` found `admin@…`'s
/// account, and each such spelling had its own failure budget.
async fn a_login_takes_the_accounts_email_in_ascii_case_only(url: &str) {
    use frps::auth::accounts::{Accounts, LoginError, hash_password};
    let store = Store::connect(url).await.unwrap();
    store
        .create_user("admin@x.test", &hash_password("secret"))
        .await
        .unwrap();
    let accounts = Accounts::new(Some(store), None);
    let from: std::net::IpAddr = [192, 0, 2, 7].into();
    let err = accounts
        .login("adm\u{130}n@x.test", "secret", from)
        .await
        .unwrap_err();
    assert!(matches!(err, LoginError::InvalidCredentials), "{err:?}");
    // (From another address: the failure slows this one down.)
    let issued = accounts
        .login("ADMIN@X.test", "secret", [192, 0, 2, 8].into())
        .await
        .expect("the account's email in another ASCII case");
    assert_eq!(issued.principal.email, "admin@x.test");
}

#[tokio::test]
async fn rows_edited_into_values_frps_cannot_read_are_refused_not_an_outage() {
    use std::sync::atomic::Ordering;
    // SQLite keeps what it is given: a date without a time, which no
    // timestamp column of frps's can be read from.
    let frps = Frps::start_default().await;
    let store = &frps.state.store;
    let (key, _) = KeyValidator::create(store, Some("edited"), None)
        .await
        .unwrap();
    let token = frps.client_token().await;
    exec(
        store,
        r#"UPDATE api_keys SET "expiresAt" = date('now', '+30 days')"#,
    )
    .await;
    exec(store, "UPDATE client_tokens SET revoked_at = date('now')").await;
    // The key is refused (not 503, not the database reported down).
    assert_eq!(frps.state.keys.check(&key).await, KeyCheck::Invalid);
    assert_eq!(frps.state.keys.stats.db_errors.load(Ordering::Relaxed), 0);
    // The revoked token is refused, rather than "unavailable" for ever.
    let err = frps.state.accounts.check_token(&token).await.unwrap_err();
    assert!(matches!(err, LoginError::TokenInvalid), "{err:?}");
    // So is a login to an account whose row cannot be read.
    exec(store, "UPDATE users SET created_at = date('now')").await;
    let err = frps
        .state
        .accounts
        .login(
            frpx_tests::TEST_EMAIL,
            frpx_tests::TEST_PASSWORD,
            [192, 0, 2, 9].into(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, LoginError::InvalidCredentials), "{err:?}");
    frps.stop().await;
}

#[tokio::test]
async fn stalled_account_queries_are_unavailable_at_the_deadline_and_hold_nothing() {
    use frps::auth::accounts::{Accounts, DB_DEADLINE, LoginError, hash_password};
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::connect(&pg.url).await.unwrap();
    store
        .create_user("owner@example.com", &hash_password("secret"))
        .await
        .unwrap();
    let accounts = Accounts::new(Some(store.clone()), None);
    let from: std::net::IpAddr = [192, 0, 2, 7].into();
    let token = accounts
        .login("owner@example.com", "secret", from)
        .await
        .unwrap()
        .token;
    // Another session holds both tables: queries wait on its locks, as
    // long as they last (as on a path to the database gone silent).
    let mut locker = TableLock::take(&pg.url, &["users", "client_tokens"]).await;
    let timed =
        async |login: std::pin::Pin<Box<dyn std::future::Future<Output = LoginError> + '_>>| {
            let started = Instant::now();
            let err = tokio::time::timeout(DB_DEADLINE * 2, login)
                .await
                .expect("answered at the deadline, not when the lock goes");
            let waited = started.elapsed();
            assert!(
                waited >= DB_DEADLINE && waited < DB_DEADLINE + Duration::from_secs(2),
                "answered after {waited:?}"
            );
            err
        };
    let err = timed(Box::pin(async {
        accounts
            .login("owner@example.com", "secret", [192, 0, 2, 8].into())
            .await
            .unwrap_err()
    }))
    .await;
    assert!(matches!(err, LoginError::Unavailable), "{err:?}");
    let err = timed(Box::pin(async {
        accounts
            .login_token(&token, [192, 0, 2, 9].into())
            .await
            .unwrap_err()
    }))
    .await;
    assert!(matches!(err, LoginError::Unavailable), "{err:?}");
    locker.release().await;
    // Nothing was left held: logins from the same addresses go through.
    accounts
        .login("owner@example.com", "secret", [192, 0, 2, 8].into())
        .await
        .expect("a password login");
    accounts
        .login_token(&token, [192, 0, 2, 9].into())
        .await
        .expect("a token login");
    pg.drop_db().await;
}

#[tokio::test]
async fn a_stalled_key_lookup_is_unavailable_at_the_deadline() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::connect(&pg.url).await.unwrap();
    let (key, _) = KeyValidator::create(&store, None, None).await.unwrap();
    let validator = KeyValidator::new(None, Some(store.clone()), None);
    // Another session holds the table: the lookup waits on its lock, as
    // long as it lasts (past the revocation guards, were there no deadline).
    let mut locker = TableLock::take(&pg.url, &["api_keys"]).await;
    let deadline = frps::auth::keys::DB_TIMEOUT;
    let started = Instant::now();
    let answer = tokio::time::timeout(deadline * 2, validator.check(&key))
        .await
        .expect("answered at the deadline, not when the lock goes");
    assert_eq!(answer, KeyCheck::Unavailable);
    let waited = started.elapsed();
    assert!(
        waited >= deadline && waited < deadline + Duration::from_secs(2),
        "answered after {waited:?}"
    );
    locker.release().await;
    assert!(matches!(validator.check(&key).await, KeyCheck::Valid(_)));
    pg.drop_db().await;
}

/// Queries of this test's database waiting on a lock now.
async fn waiting_on_locks(watcher: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(watcher)
    .await
    .unwrap()
}

/// Waits until `n` queries wait on locks, never seeing more than `n`, and
/// fails at `by`.
async fn until_waiting_on_locks(watcher: &mut sqlx::PgConnection, n: i64, by: Instant) {
    let seen = async {
        loop {
            let now = waiting_on_locks(watcher).await;
            assert!(now <= n, "{now} lookups in the database at once, not {n}");
            if now == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(by.saturating_duration_since(Instant::now()), seen)
        .await
        .unwrap_or_else(|_| panic!("{n} lookups never reached the database"));
}

#[tokio::test]
async fn key_lookups_from_one_address_take_turns_and_see_those_before_them() {
    use sqlx::Connection;
    use std::sync::atomic::Ordering;
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::connect(&pg.url).await.unwrap();
    let (key, _) = KeyValidator::create(&store, None, None).await.unwrap();
    let (other, _) = KeyValidator::create(&store, None, None).await.unwrap();
    let mut validator = KeyValidator::new(None, Some(store.clone()), None);
    validator.set_failure_budget(3);
    // What `--key-lookups-per-ip 3` sets.
    const LOOKUPS_PER_ADDRESS: usize = 3;
    validator.set_lookups_per_address(LOOKUPS_PER_ADDRESS);
    let validator = std::sync::Arc::new(validator);
    // Another session holds the table: lookups wait in the database (for
    // less than their deadline here).
    let mut locker = TableLock::take(&pg.url, &["api_keys"]).await;
    let mut watcher = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let lookup = |key: &str, from: [u8; 4]| {
        let (v, key) = (validator.clone(), key.to_owned());
        async move { v.check_from(&key, Some(from.into())).await }
    };
    // Ten requests at once from one caller, with a key frps has not cached:
    // a few reach the database, the rest wait their turn. Seen well within
    // the 5 s the lookups and the waits for a turn have.
    let by = Instant::now() + Duration::from_secs(3);
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..10 {
        burst.spawn(lookup(&key, [192, 0, 2, 10]));
    }
    until_waiting_on_locks(&mut watcher, LOOKUPS_PER_ADDRESS as i64, by).await;
    // Another caller is not queued behind them.
    let elsewhere = tokio::spawn(lookup(&other, [198, 51, 100, 7]));
    let expected = LOOKUPS_PER_ADDRESS as i64 + 1;
    until_waiting_on_locks(&mut watcher, expected, by).await;
    locker.release().await;
    for answer in burst.join_all().await {
        assert!(matches!(answer, KeyCheck::Valid(_)), "{answer:?}");
    }
    assert!(matches!(elsewhere.await.unwrap(), KeyCheck::Valid(_)));
    // The database was asked by the first turns and the other caller only:
    // the waiting ones found the key cached.
    assert_eq!(
        validator.stats.db_hits.load(Ordering::Relaxed),
        expected as u64
    );
    assert_eq!(validator.stats.turn_timeouts.load(Ordering::Relaxed), 0);

    // Ten guesses at once from another caller (3 failed lookups a minute):
    // the ones waiting their turn see the failures before them, so the
    // address pays for at most the turns already under way beyond its
    // budget, not for all ten.
    locker.again(&["api_keys"]).await;
    let by = Instant::now() + Duration::from_secs(3);
    let mut guesses = tokio::task::JoinSet::new();
    for i in 0..10 {
        guesses.spawn(lookup(&format!("guess-{i}"), [192, 0, 2, 20]));
    }
    until_waiting_on_locks(&mut watcher, LOOKUPS_PER_ADDRESS as i64, by).await;
    locker.release().await;
    let answers = guesses.join_all().await;
    let invalid = answers.iter().filter(|a| **a == KeyCheck::Invalid).count();
    let throttled = answers
        .iter()
        .filter(|a| matches!(a, KeyCheck::Throttled(_)))
        .count();
    assert!(
        (LOOKUPS_PER_ADDRESS..=3 + LOOKUPS_PER_ADDRESS - 1).contains(&invalid),
        "{answers:?}"
    );
    assert_eq!(invalid + throttled, 10, "{answers:?}");
    store.close().await;
    pg.drop_db().await;
}

/// The management API's account listings answer 503 at the database
/// deadline when their query waits on a lock, and hold nothing after.
#[tokio::test]
async fn stalled_listing_queries_are_503_at_the_deadline() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let mut cfg = frps_config();
    cfg.database_url = pg.url.clone();
    cfg.admin_token = Some("admin-token-for-the-listings".into());
    let fleet = Fleet::start_with(0, cfg).await;
    let list = async |path: &str| {
        let api = fleet.frps.addrs.api;
        let req = http::request(
            "GET",
            api,
            path,
            Some("admin-token-for-the-listings"),
            Bytes::new(),
        );
        http::read(http::Conn::open(api).await.send(req).await.unwrap()).await
    };
    let mut locker = TableLock::take(&pg.url, &["users", "client_tokens"]).await;
    let deadline = frps::auth::keys::DB_TIMEOUT;
    let started = Instant::now();
    let (users, tokens) = tokio::join!(list("/api/users"), list("/api/tokens/active"));
    let waited = started.elapsed();
    for (path, reply) in [("/api/users", users), ("/api/tokens/active", tokens)] {
        assert_eq!(reply.status, 503, "{path}: {}", reply.body);
        assert!(reply.body.contains("no answer within 5s"), "{}", reply.body);
        assert!(
            waited >= deadline && waited < deadline + Duration::from_secs(3),
            "{path} answered after {waited:?}"
        );
    }
    locker.release().await;
    for path in ["/api/users", "/api/tokens/active"] {
        assert_eq!(list(path).await.status, 200, "{path}");
    }
    fleet.frps.stop().await;
    pg.drop_db().await;
}

#[tokio::test]
async fn random_invalid_keys_are_never_cached_in_redis() {
    let Some(redis) = services::redis_url() else {
        return;
    };
    let mut cfg = frps_config();
    cfg.redis_url = redis;
    cfg.redis_prefix = services::redis_prefix();
    let frps = Frps::start(cfg).await;
    let (key, _) = KeyValidator::create(&frps.state.store, None, None)
        .await
        .unwrap();
    let cache = frps.state.redis.clone().expect("redis configured");
    frpx_tests::eventually("Redis connected", || cache.is_healthy()).await;
    assert!(matches!(
        frps.state.keys.check(&key).await,
        KeyCheck::Valid(_)
    ));
    frpx_tests::eventually_async("the valid key is in Redis", || async {
        cache.count_entries().await == Some(1)
    })
    .await;
    for i in 0..10_000 {
        let random = format!("frpx_random_{i}_{}", uuid::Uuid::new_v4());
        assert_eq!(frps.state.keys.check(&random).await, KeyCheck::Invalid);
    }
    assert_eq!(cache.count_entries().await, Some(1));
}

#[tokio::test]
async fn login_saves_a_private_token_and_the_next_start_uses_it() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("b").await;
    let cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    let token_file = cfg.token_file.clone();
    let frpc = Frpc::start(cfg.clone());
    frps.wait_for_clients(&["gpu"]).await;
    let saved = frpc::login::load(&token_file).expect("token saved");
    assert!(saved.token.starts_with("frpxc_"));
    assert_eq!(saved.email, TEST_EMAIL);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let tokens = table_text(&frps.state.store, "client_tokens").await;
    assert!(
        !tokens.contains(&saved.token),
        "plaintext token in the database"
    );
    frpc.kill().await;
    frps.wait_for_clients(&[]).await;

    // Next start: no password at all, the saved token suffices.
    let mut again = cfg;
    again.email = None;
    again.password = None;
    let frpc = Frpc::start(again);
    frps.wait_for_clients(&["gpu"]).await;
    frpc.kill().await;
    let listed = frps.state.store.list_client_tokens(true).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].last_used_at.is_some());
}

#[tokio::test]
async fn a_bad_saved_token_falls_back_to_login() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("b").await;
    let cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    let stale = frpc::login::SavedToken {
        token: "frpxc_revoked_or_made_up".into(),
        expires_at: None,
        server: String::new(),
        email: TEST_EMAIL.into(),
        tls: false,
    };
    frpc::login::save(&cfg.token_file, &stale).unwrap();
    let frpc = Frpc::start(cfg.clone());
    frps.wait_for_clients(&["gpu"]).await;
    let saved = frpc::login::load(&cfg.token_file).unwrap();
    assert_ne!(
        saved.token, stale.token,
        "a new token replaced the refused one"
    );
    assert!(frps.state.accounts.check_token(&saved.token).await.is_ok());
    frpc.kill().await;
}

#[tokio::test]
async fn a_token_saved_for_another_server_is_not_sent() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("b").await;
    let cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    // A token this frps would accept, saved as another server's.
    let other = frpc::login::SavedToken {
        token: frps.client_token().await,
        expires_at: None,
        server: "frps.elsewhere.example:17000".into(),
        email: TEST_EMAIL.into(),
        tls: false,
    };
    frpc::login::save(&cfg.token_file, &other).unwrap();
    let frpc = Frpc::start(cfg.clone());
    frps.wait_for_clients(&["gpu"]).await;
    let saved = frpc::login::load(&cfg.token_file).unwrap();
    assert_ne!(
        saved.token, other.token,
        "logged in with the password instead"
    );
    assert_eq!(saved.server, cfg.control_addr());
    frpc.kill().await;
}

#[tokio::test]
async fn revoking_a_token_ends_its_session_and_a_password_change_ends_them_all() {
    let frps = Frps::start_default().await;
    let cfg = frps.state.config.clone();
    let backend = Backend::start("b").await;
    let client_cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    let frpc = Frpc::start(client_cfg.clone());
    frps.wait_for_clients(&["gpu"]).await;
    let first = frps.state.registry.get("gpu").unwrap().session;
    let first_token = frpc::login::load(&client_cfg.token_file).unwrap().token;

    // Revoked: the session ends; frpc logs in again with its password,
    // without sending the revoked token (a failed login for its address).
    assert_eq!(frps.state.accounts.failing(), 0);
    let said = admin(
        &cfg,
        Admin::Token {
            command: TokenCommand::Revoke {
                token: TEST_EMAIL.into(),
            },
        },
        "",
    )
    .await
    .unwrap();
    assert!(said.contains("revoked 1 token"), "{said}");
    frpx_tests::eventually("a new session with a new token", || {
        frps.state
            .registry
            .get("gpu")
            .is_some_and(|c| c.session != first)
            && frpc::login::load(&client_cfg.token_file).is_some_and(|t| t.token != first_token)
    })
    .await;
    assert_eq!(
        frps.state.accounts.failing(),
        0,
        "the revoked token was sent"
    );

    // A new password: frpc's old one no longer logs in, and it stops.
    let said = admin(
        &cfg,
        Admin::User {
            command: UserCommand::Passwd {
                email: TEST_EMAIL.into(),
                password_stdin: true,
            },
        },
        "a brand new password\n",
    )
    .await
    .unwrap();
    assert!(said.contains("revoked its 1 client token"), "{said}");
    let err = frpc.exit().await.unwrap_err().to_string();
    assert!(err.contains("invalid email or password"), "{err}");
    frps.wait_for_clients(&[]).await;
}

#[tokio::test]
async fn a_box_with_only_its_token_gets_a_new_one_before_it_expires() {
    let mut cfg = frps_config();
    // Tokens live 8 s; the session's token is looked at every 1.2 s and
    // renewed once less than 4 s is left (seconds to spare on a loaded
    // machine).
    cfg.token_ttl = Duration::from_secs(8);
    cfg.heartbeat_interval = Duration::from_millis(200);
    let frps = Frps::start(cfg).await;
    let backend = Backend::start("b").await;
    let mut client_cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    let frpc = Frpc::start(client_cfg.clone());
    frps.wait_for_clients(&["gpu"]).await;
    let session = frps.state.registry.get("gpu").unwrap().session;
    let first = frpc::login::load(&client_cfg.token_file).unwrap();
    let first_ends = chrono::DateTime::parse_from_rfc3339(first.expires_at.as_deref().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);

    // Sent during the session and saved, before the first one ends.
    frpx_tests::eventually("a renewed token saved", || {
        frpc::login::load(&client_cfg.token_file).is_some_and(|t| t.token != first.token)
    })
    .await;
    let renewed = frpc::login::load(&client_cfg.token_file).unwrap();
    assert!(chrono::Utc::now() < first_ends, "renewed in time");
    assert_eq!(renewed.email, TEST_EMAIL);
    assert_eq!(renewed.server, client_cfg.control_addr());
    // Once frpc says it saved it (`TokenSaved`), the token it replaced
    // stops working at once: a copy of it logging in meanwhile could have
    // it renewed again, revoking the box's renewal (a renewal lost on its
    // way, never said saved, leaves the old one valid).
    let store = frps.state.store.clone();
    let row = |token: String| {
        let store = store.clone();
        async move {
            store
                .find_client_token(&frps::auth::secret::hash_hex(&token))
                .await
                .unwrap()
                .expect("a stored token")
        }
    };
    let first_row = row(first.token.clone()).await;
    frpx_tests::eventually_async("the replaced token revoked", || async {
        row(first.token.clone()).await.revoked_at.is_some()
    })
    .await;
    let renewed_row = row(renewed.token.clone()).await;
    assert!(renewed_row.renewed_from.is_none(), "confirmed");
    assert!(renewed_row.last_used_at.is_none(), "not logged in with yet");
    let copy = frps.state.accounts.check_token(&first.token).await;
    assert!(copy.is_err(), "a copy of the replaced token logs in");
    // The session outlives its first token: it goes on under the new one.
    while chrono::Utc::now() < first_ends + chrono::Duration::milliseconds(1500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(frps.state.registry.get("gpu").unwrap().session, session);
    frpc.kill().await;
    frps.wait_for_clients(&[]).await;

    // A box without a password logs in with the saved token (and, past
    // half its life by now, is given and saves the next one at login).
    client_cfg.email = None;
    client_cfg.password = None;
    let latest = frpc::login::load(&client_cfg.token_file).unwrap();
    let latest_ends = chrono::DateTime::parse_from_rfc3339(latest.expires_at.as_deref().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    // Past its half-life, with 3.5 s left to log in with it.
    while latest_ends - chrono::Utc::now() > chrono::Duration::milliseconds(3500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let frpc = Frpc::start(client_cfg.clone());
    frps.wait_for_clients(&["gpu"]).await;
    frpx_tests::eventually("the token renewed at login saved", || {
        frpc::login::load(&client_cfg.token_file).is_some_and(|t| t.token != latest.token)
    })
    .await;
    let newest = frpc::login::load(&client_cfg.token_file).unwrap();
    let newest_id = row(newest.token.clone()).await.id;
    // The renewal given at login, said saved, is the family's one valid
    // token: the one the box logged in with is revoked with the others.
    frpx_tests::eventually_async("the newest token the only valid one", || async {
        let tokens = store.list_client_tokens(false).await.unwrap();
        tokens
            .iter()
            .all(|t| (t.id == newest_id) == t.revoked_at.is_none())
    })
    .await;
    assert!(row(latest.token.clone()).await.renewed_from.is_none());

    // Revoking the first token, as an operator who saw it listed would,
    // revokes what it was renewed into: the session ends, and this box has
    // no password to come back with.
    let said = admin(
        &frps.state.config,
        Admin::Token {
            command: TokenCommand::Revoke {
                token: first_row.id.clone(),
            },
        },
        "",
    )
    .await
    .unwrap();
    assert!(said.contains("revoked"), "{said}");
    assert!(row(newest.token).await.revoked_at.is_some());
    let err = frpc.exit().await.unwrap_err().to_string();
    assert!(err.contains("refused the saved token"), "{err}");
    // Told why its session ended, it sent neither the token it logged in
    // with nor its renewal again (each a failed login for its address).
    assert_eq!(frps.state.accounts.failing(), 0);
}

#[tokio::test]
async fn tokens_dead_for_30_days_are_deleted_at_start() {
    let mut cfg = frps_config();
    cfg.database_url = frpx_tests::temp_sqlite_url();
    let frps = Frps::start(cfg.clone()).await;
    let store = frps.state.store.clone();
    let user = frps.user_id;
    let day = chrono::Duration::days(1);
    let now = chrono::Utc::now().naive_utc();
    for (id, expires) in [
        ("live", None),
        ("expired-long-ago", Some(now - day * 40)),
        ("expired-lately", Some(now - day)),
        ("revoked-long-ago", None),
        ("revoked-lately", None),
    ] {
        store
            .insert_client_token(id, &format!("hash-{id}"), id, user, expires, None)
            .await
            .unwrap();
    }
    let long_ago = (now - day * 40).format("%Y-%m-%d %H:%M:%S");
    exec(
        &store,
        &format!(
            "UPDATE client_tokens SET revoked_at = '{long_ago}' WHERE id = 'revoked-long-ago'"
        ),
    )
    .await;
    store.revoke_client_tokens("revoked-lately").await.unwrap();
    frps.stop().await;

    // The next start deletes what can never log in again and is old.
    let frps = Frps::start(cfg).await;
    let store = frps.state.store.clone();
    frpx_tests::eventually_async("old dead tokens are deleted", || {
        let store = store.clone();
        async move {
            let ids: Vec<String> = store
                .list_client_tokens(false)
                .await
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect();
            !ids.iter().any(|id| id.ends_with("long-ago"))
        }
    })
    .await;
    let mut ids: Vec<String> = store
        .list_client_tokens(false)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .filter(|id| ["live", "expired-lately", "revoked-lately"].contains(&id.as_str()))
        .collect();
    ids.sort();
    assert_eq!(ids, ["expired-lately", "live", "revoked-lately"]);
    frps.stop().await;
}

#[tokio::test]
async fn emails_match_in_any_letter_case() {
    let frps = Frps::start_default().await;
    let cfg = frps.state.config.clone();
    let shouted = TEST_EMAIL.to_uppercase();
    let add = Admin::User {
        command: UserCommand::Add {
            email: shouted.clone(),
            password_stdin: true,
        },
    };
    let err = admin(&cfg, add, "another password\n").await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let store = &frps.state.store;
    let before = store.list_client_tokens(true).await.unwrap().len();
    let issued = frps
        .state
        .accounts
        .login(&shouted, TEST_PASSWORD, [192, 0, 2, 9].into())
        .await
        .expect("the same account");
    assert_eq!(issued.principal.user_id, frps.user_id);
    assert_eq!(
        store.list_client_tokens(true).await.unwrap().len(),
        before + 1
    );
    let revoked = store.revoke_client_tokens(&shouted).await.unwrap();
    assert_eq!(revoked as usize, before + 1);
    assert!(store.list_client_tokens(true).await.unwrap().is_empty());
    assert_eq!(
        store.list_client_tokens(false).await.unwrap().len(),
        before + 1
    );
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error_and_writes_no_token_file() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("b").await;
    let mut cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    cfg.password = Some("wrong password".into());
    let err = Frpc::start(cfg.clone()).exit().await.unwrap_err();
    assert!(
        err.to_string().contains("invalid email or password"),
        "{err}"
    );
    assert!(!cfg.token_file.exists());
    assert!(frps.state.registry.is_empty());

    // An immediate retry is slowed down before any password check.
    let mut fake = FakeClient::connect(frps.addrs.control).await;
    fake.send(Command::Login {
        email: TEST_EMAIL.into(),
        password: TEST_PASSWORD.into(),
    })
    .await;
    match fake.recv().await {
        Some(Command::LoginResult {
            ok: false,
            code,
            reason,
            ..
        }) => {
            assert_eq!(code.as_deref(), Some("throttled"), "{reason:?}");
        }
        other => panic!("expected a throttled login, got {other:?}"),
    }
}

/// The code of the answer to a password login sent on `fake`.
async fn login_code(fake: &mut FakeClient, password: &str) -> String {
    fake.send(Command::Login {
        email: TEST_EMAIL.into(),
        password: password.into(),
    })
    .await;
    match fake.recv().await {
        Some(Command::LoginResult {
            ok: false, code, ..
        }) => code.unwrap_or_default(),
        Some(Command::LoginResult { ok: true, .. }) => "ok".into(),
        other => panic!("expected a login result, got {other:?}"),
    }
}

#[tokio::test]
async fn a_burst_of_guesses_costs_one_password_check() {
    let frps = Frps::start_default().await;
    let mut fakes = Vec::new();
    for _ in 0..20 {
        fakes.push(FakeClient::connect(frps.addrs.control).await);
    }
    // All sent before any answer: each used to get its own Argon2 check.
    let codes =
        futures_util::future::join_all(fakes.iter_mut().map(|f| login_code(f, "a wrong guess")))
            .await;
    let checked = codes.iter().filter(|c| *c == "invalid_credentials").count();
    let throttled = codes.iter().filter(|c| *c == "throttled").count();
    assert_eq!((checked, throttled), (1, 19), "{codes:?}");
}

#[tokio::test]
async fn logins_beyond_the_password_checks_at_once_wait_their_turn() {
    let frps = Frps::start_default().await;
    let cores = std::thread::available_parallelism().unwrap().get();
    // From different addresses and for different emails (no turn taking
    // per email or address), more at once than there are password checks.
    let emails: Vec<String> = (0..cores + 3)
        .map(|i| format!("guess-{i}@example.com"))
        .collect();
    let attempts = emails.iter().enumerate().map(|(i, email)| {
        let from = std::net::IpAddr::from([192, 0, 2, i as u8 + 1]);
        frps.state.accounts.login(email, "wrong", from)
    });
    let results = futures_util::future::join_all(attempts).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(LoginError::InvalidCredentials))),
        "each checked in turn: {results:?}"
    );
    assert!(LoginError::Busy.to_string().contains("retry in 1s"));
    assert_eq!(LoginError::Busy.code(), "throttled");
    let ok = frps
        .state
        .accounts
        .login(TEST_EMAIL, TEST_PASSWORD, [192, 0, 2, 200].into())
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn frpc_waits_out_a_throttled_login_instead_of_giving_up() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("b").await;
    // Someone else behind the same address just failed: frpc's first
    // attempt is refused with `throttled`, and it tries again.
    let mut fake = FakeClient::connect(frps.addrs.control).await;
    assert_eq!(
        login_code(&mut fake, "someone else's typo").await,
        "invalid_credentials"
    );
    // Through a forwarder that counts frpc's control connections.
    let counter = Cutter::start(frps.addrs.control).await;
    let mut addrs = frps.addrs;
    addrs.control = counter.addr;
    let frpc = Frpc::start(frpc_config("gpu", &addrs, backend.addr));
    frps.wait_for_clients(&["gpu"]).await;
    // A retry is a new connection: the first login was throttled, and
    // frpc waited as long as frps said, so the second got in (its own
    // backoff, 50 ms doubling, would have tried several times meanwhile).
    let tries = counter.accepted();
    assert_eq!(tries.len(), 2, "connections: {tries:?}");
    frpc.kill().await;
}

#[tokio::test]
async fn without_token_flags_or_terminal_frpc_says_what_to_pass() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("b").await;
    let mut cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    cfg.email = None;
    cfg.password = None;
    let err = Frpc::start(cfg).exit().await.unwrap_err().to_string();
    assert!(
        err.contains("--email") && err.contains("--password"),
        "{err}"
    );
}

#[tokio::test]
async fn gpu_assets_follow_clients_online_and_offline() {
    let mut fleet = Fleet::start(1).await;
    let machine = fleet.frps.machine_id("client-0");
    let store = fleet.frps.state.store.clone();
    frpx_tests::wait_for_asset(&store, &machine, "online", Some("client-0")).await;
    fleet.clients.remove(0).kill().await;
    fleet.frps.wait_for_clients(&[]).await;
    frpx_tests::wait_for_asset(&store, &machine, "offline", None).await;

    // Another account presenting the same machine id takes nothing over.
    let owner = store.gpu_asset(&machine).await.unwrap().unwrap().user_id;
    let written = store
        .upsert_gpu_asset(
            Some("another-account"),
            &machine,
            "intruder",
            "online",
            None,
        )
        .await
        .unwrap();
    assert_eq!(written, None);
    let row = store.gpu_asset(&machine).await.unwrap().unwrap();
    assert_eq!(row.user_id, owner);
    assert_eq!(row.status.as_deref(), Some("offline"));
    assert_eq!(row.name.as_deref(), Some("client-0"));
    // Its owner still refreshes it.
    let owner_id = owner.clone();
    assert!(
        store
            .upsert_gpu_asset(owner_id.as_deref(), &machine, "client-0", "online", None)
            .await
            .unwrap()
            .is_some()
    );
}

on_both_databases!(
    an_accounts_oldest_offline_machines_are_pruned_on_sqlite,
    an_accounts_oldest_offline_machines_are_pruned_on_postgres,
    an_accounts_oldest_offline_machines_are_pruned
);

/// `prune_gpu_assets` deletes only the account's offline rows beyond the
/// most recently written.
async fn an_accounts_oldest_offline_machines_are_pruned(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let put = |owner: &'static str, machine: &'static str, status: &'static str| {
        let store = store.clone();
        async move {
            store
                .upsert_gpu_asset(Some(owner), machine, "box", status, None)
                .await
                .unwrap()
                .expect("written");
        }
    };
    // Written in this order (each write's time is later: a loop until it is).
    for machine in ["old-1", "old-2", "new-1", "new-2"] {
        let before = chrono::Utc::now().naive_utc();
        while chrono::Utc::now().naive_utc() <= before {
            tokio::task::yield_now().await;
        }
        put("owner", machine, "offline").await;
    }
    put("owner", "live", "online").await;
    put("other", "theirs", "offline").await;
    exec(
        &store,
        r#"INSERT INTO gpu_assets ("machineId", name, status) VALUES ('seed-row', 'x', 'offline')"#,
    )
    .await;
    assert_eq!(store.prune_gpu_assets("owner", 2).await.unwrap(), 2);
    for (machine, kept) in [
        ("old-1", false),
        ("old-2", false),
        ("new-1", true),
        ("new-2", true),
        ("live", true),
        ("theirs", true),
        ("seed-row", true),
    ] {
        let row = store.gpu_asset(machine).await.unwrap();
        assert_eq!(row.is_some(), kept, "{machine}");
    }
    // Nothing more to prune.
    assert_eq!(store.prune_gpu_assets("owner", 2).await.unwrap(), 0);
    assert_eq!(store.prune_gpu_assets("other", 1).await.unwrap(), 0);
}

on_both_databases!(
    a_gpu_asset_write_can_wait_for_the_row_to_be_as_left_on_sqlite,
    a_gpu_asset_write_can_wait_for_the_row_to_be_as_left_on_postgres,
    a_gpu_asset_write_can_wait_for_the_row_to_be_as_left
);

#[tokio::test]
async fn a_gpu_asset_write_compares_with_the_time_as_the_row_keeps_it() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    // A seed table whose column keeps milliseconds, not microseconds.
    let store = Store::connect(&pg.url).await.unwrap();
    exec(
        &store,
        r#"ALTER TABLE gpu_assets ALTER COLUMN "updatedAt" TYPE TIMESTAMP(3)"#,
    )
    .await;
    a_gpu_asset_write_can_wait_for_the_row_to_be_as_left(&pg.url).await;
    pg.drop_db().await;
}

/// `unless_changed_since` writes only a row whose `updatedAt` is that time:
/// the time a write returns is the row's, to the database's precision.
async fn a_gpu_asset_write_can_wait_for_the_row_to_be_as_left(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let owner = Some("owner");
    let put = |status: &'static str, since| {
        let store = store.clone();
        async move {
            store
                .upsert_gpu_asset(owner, "m", "box", status, since)
                .await
                .unwrap()
        }
    };
    // A missing row is written either way.
    let ghost = chrono::DateTime::from_timestamp(1, 0).unwrap().naive_utc();
    let first = put("online", Some(ghost)).await.expect("a new row");
    assert!(first.is_some());
    let row = store.gpu_asset("m").await.unwrap().unwrap();
    assert_eq!(row.updated_at, first);
    // Another session's write since: the row is not as `first` left it.
    let second = loop {
        let at = put("online", None).await.expect("written");
        if at != first {
            break at;
        }
    };
    assert_eq!(put("offline", first).await, None);
    let row = store.gpu_asset("m").await.unwrap().unwrap();
    assert_eq!(row.status.as_deref(), Some("online"));
    assert_eq!(row.updated_at, second);
    // As the last write left it: written.
    let third = put("offline", second).await.expect("written");
    let row = store.gpu_asset("m").await.unwrap().unwrap();
    assert_eq!(row.status.as_deref(), Some("offline"));
    assert_eq!(row.updated_at, third);
}

async fn admin(cfg: &frps::Config, command: Admin, stdin: &str) -> anyhow::Result<String> {
    Ok(admin_said(cfg, command, stdin).await?.0)
}

/// An admin command's stdout and stderr.
async fn admin_said(
    cfg: &frps::Config,
    command: Admin,
    stdin: &str,
) -> anyhow::Result<(String, String)> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut input = std::io::Cursor::new(stdin.as_bytes().to_vec());
    frps::admin::run(command, cfg, &mut out, &mut err, &mut input).await?;
    Ok((
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    ))
}

#[tokio::test]
async fn a_prefix_shared_by_two_logins_or_keys_revokes_neither() {
    let cfg = frps_config();
    let store = frps::store::Store::connect(&cfg.database_url)
        .await
        .unwrap();
    let a = store.create_user("a@example.com", "hash").await.unwrap();
    let b = store.create_user("b@example.com", "hash").await.unwrap();
    for (id, user) in [("ta", a.id), ("tb", b.id)] {
        let hash = format!("hash-{id}");
        store
            .insert_client_token(id, &hash, "frpxc_shared", user, None, None)
            .await
            .unwrap();
    }
    let revoke = |token: &str| Admin::Token {
        command: TokenCommand::Revoke {
            token: token.into(),
        },
    };
    let err = admin(&cfg, revoke("frpxc_shared"), "").await.unwrap_err();
    assert!(err.to_string().contains("give the id"), "{err}");
    let live = store.list_client_tokens(true).await.unwrap();
    assert_eq!(live.len(), 2, "neither revoked");
    // By id, the one meant.
    admin(&cfg, revoke("ta"), "").await.unwrap();
    assert_eq!(store.list_client_tokens(true).await.unwrap().len(), 1);

    for id in ["ka", "kb"] {
        let new = frps::store::NewApiKey {
            id,
            prefix: "frpx_shared0",
            name: None,
            expires_at: None,
            limits: Default::default(),
        };
        store
            .insert_api_key(&new, &format!("{id:0>64}"))
            .await
            .unwrap();
    }
    let revoke = |key: &str| Admin::Key {
        command: KeyCommand::Revoke { key: key.into() },
    };
    let err = admin(&cfg, revoke("frpx_shared0"), "").await.unwrap_err();
    assert!(err.to_string().contains("give the id"), "{err}");
    let limit = Admin::Key {
        command: KeyCommand::Limits {
            key: "frpx_shared0".into(),
            rpm: Some(LimitArg::Set(1)),
            max_concurrency: None,
        },
    };
    let err = admin(&cfg, limit, "").await.unwrap_err();
    assert!(err.to_string().contains("give the id"), "{err}");
    // Both keys as they were: active, without limits.
    let shared = || async {
        let (rows, _) = store.list_api_keys().await.unwrap();
        let mut rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.prefix.as_deref() == Some("frpx_shared0"))
            .map(|r| (r.id.unwrap(), r.status, r.rpm))
            .collect();
        rows.sort();
        rows
    };
    let active = Some("active".to_owned());
    assert_eq!(
        shared().await,
        [
            ("ka".into(), active.clone(), None),
            ("kb".into(), active.clone(), None)
        ]
    );
    let out = admin(&cfg, revoke("kb"), "").await.unwrap();
    assert!(out.contains("revoked"), "{out}");
    let after = shared().await;
    assert_eq!(after[0], ("ka".into(), active.clone(), None));
    assert_ne!(after[1].1, active, "kb revoked by its id");
    store.close().await;
}

#[tokio::test]
async fn admin_commands_manage_users_keys_and_tokens() {
    let cfg = frps_config();
    let add = || Admin::User {
        command: UserCommand::Add {
            email: "owner@example.com".into(),
            password_stdin: true,
        },
    };
    let out = admin(&cfg, add(), "first password\n").await.unwrap();
    assert!(out.contains("created user owner@example.com"), "{out}");
    let dup = admin(&cfg, add(), "first password\n").await.unwrap_err();
    assert!(dup.to_string().contains("already exists"));
    let list = admin(
        &cfg,
        Admin::User {
            command: UserCommand::List { json: false },
        },
        "",
    )
    .await
    .unwrap();
    assert!(
        list.contains("owner@example.com") && !list.contains("$argon2"),
        "{list}"
    );
    let passwd = Admin::User {
        command: UserCommand::Passwd {
            email: "owner@example.com".into(),
            password_stdin: true,
        },
    };
    admin(&cfg, passwd, "second password\n").await.unwrap();

    let store = Store::connect(&cfg.database_url).await.unwrap();
    let accounts = frps::auth::Accounts::new(Some(store.clone()), None);
    let from = "127.0.0.1".parse().unwrap();
    assert!(
        accounts
            .login("owner@example.com", "first password", from)
            .await
            .is_err()
    );
    // A fresh throttle: the failure above would (rightly) delay this login.
    let accounts = frps::auth::Accounts::new(Some(store.clone()), None);
    let issued = accounts
        .login("owner@example.com", "second password", from)
        .await
        .unwrap();

    let create = Admin::Key {
        command: KeyCommand::Create {
            name: Some("team-a".into()),
            expires_in: Some(Duration::from_secs(86400)),
            rpm: None,
            max_concurrency: None,
        },
    };
    let out = admin(&cfg, create, "").await.unwrap();
    let key = out.lines().next().unwrap().to_owned();
    assert!(key.starts_with("frpx_"), "{out}");
    let list = admin(
        &cfg,
        Admin::Key {
            command: KeyCommand::List { json: false },
        },
        "",
    )
    .await
    .unwrap();
    assert!(
        list.contains("team-a") && list.contains(&key[..12]) && !list.contains(&key),
        "{list}"
    );
    let validator = KeyValidator::new(None, Some(store.clone()), None);
    assert!(matches!(validator.check(&key).await, KeyCheck::Valid(_)));
    let revoke = Admin::Key {
        command: KeyCommand::Revoke {
            key: key[..12].to_owned(),
        },
    };
    let (said, noted) = admin_said(&cfg, revoke, "").await.unwrap();
    assert!(said.contains("revoked"), "{said}");
    // No Redis here: the in-process bound is the whole story, said on
    // stderr (stdout is the answer a script reads).
    assert!(!said.contains("note"), "{said}");
    assert!(
        noted.contains("no Redis configured") && noted.contains("10s"),
        "{noted}"
    );
    assert_eq!(
        KeyValidator::new(None, Some(store.clone()), None)
            .check(&key)
            .await,
        KeyCheck::Invalid
    );
    // For scripts: JSON, with what each key is now (one past its expiry
    // shows as expired in the table too).
    let past = chrono::Utc::now().naive_utc() - chrono::Duration::hours(1);
    KeyValidator::create_with_limits(&store, Some("old"), Some(past), Limits::default())
        .await
        .unwrap();
    let list_as = |json| Admin::Key {
        command: KeyCommand::List { json },
    };
    let listed = admin(&cfg, list_as(true), "").await.unwrap();
    let keys: serde_json::Value = serde_json::from_str(&listed).expect("one JSON document");
    let named = |name: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {listed}"))
            .clone()
    };
    let team = named("team-a");
    assert_eq!(team["state"], "revoked");
    assert_eq!(team["status"], "revoked");
    assert_eq!(team["prefix"], key[..12]);
    assert_eq!(team["rpm"], serde_json::Value::Null, "unlimited");
    let masked = team["key"].as_str().unwrap();
    assert!(
        masked.starts_with(&key[..12]) && !listed.contains(&key),
        "{listed}"
    );
    assert!(
        team["created_at"].as_str().unwrap().ends_with('Z'),
        "{team}"
    );
    assert_eq!(named("old")["state"], "expired");
    let table = admin(&cfg, list_as(false), "").await.unwrap();
    assert!(table.contains("expired"), "{table}");
    for listing in [
        Admin::User {
            command: UserCommand::List { json: true },
        },
        Admin::Token {
            command: TokenCommand::List {
                all: true,
                json: true,
            },
        },
        Admin::Client {
            command: ClientCommand::List { json: true },
        },
    ] {
        let out = admin(&cfg, listing, "").await.unwrap();
        let rows: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
        assert!(rows.is_array(), "{out}");
    }
    let users = admin(
        &cfg,
        Admin::User {
            command: UserCommand::List { json: true },
        },
        "",
    )
    .await
    .unwrap();
    assert!(users.contains("\"email\":\"owner@example.com\""), "{users}");
    // A Redis this command cannot reach: it says how long fleets using it
    // may still accept the key.
    let (second, _) = KeyValidator::create(&store, None, None).await.unwrap();
    let mut unreachable = cfg.clone();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    unreachable.redis_url = format!("redis://{}", closed.local_addr().unwrap());
    drop(closed);
    let revoke = Admin::Key {
        command: KeyCommand::Revoke {
            key: second[..12].to_owned(),
        },
    };
    let (said, noted) = admin_said(&unreachable, revoke.clone(), "").await.unwrap();
    assert!(said.starts_with("revoked "), "{said}");
    assert!(
        noted.contains("warning: not told through Redis at")
            && noted.contains("not reachable from here")
            && noted.contains("300s")
            && noted.contains("run this again"),
        "{noted}"
    );
    // Again: said to be revoked before (and told to the fleet again).
    let (said, _) = admin_said(&unreachable, revoke, "").await.unwrap();
    assert!(said.starts_with("already revoked "), "{said}");
    let missing = Admin::Key {
        command: KeyCommand::Revoke {
            key: "nothing-like-this".into(),
        },
    };
    assert!(admin(&cfg, missing, "").await.is_err());

    let tokens = admin(
        &cfg,
        Admin::Token {
            command: TokenCommand::List {
                all: false,
                json: false,
            },
        },
        "",
    )
    .await
    .unwrap();
    assert!(
        tokens.contains("owner@example.com") && !tokens.contains(&issued.token),
        "{tokens}"
    );
    let revoke = Admin::Token {
        command: TokenCommand::Revoke {
            token: "owner@example.com".into(),
        },
    };
    assert!(
        admin(&cfg, revoke.clone(), "")
            .await
            .unwrap()
            .contains("revoked 1 token(s)")
    );
    assert_eq!(
        accounts.check_token(&issued.token).await.unwrap_err(),
        frps::auth::LoginError::TokenInvalid
    );
    // Again, by account or by the token's id: nothing left, and no error
    // (a script run twice); a name that matches nothing is one.
    let tokens = store.list_client_tokens(false).await.unwrap();
    let id = tokens
        .into_iter()
        .find(|t| t.email == "owner@example.com")
        .expect("listed, revoked")
        .id;
    let id = Admin::Token {
        command: TokenCommand::Revoke { token: id },
    };
    for again in [revoke, id] {
        let said = admin(&cfg, again, "").await.unwrap();
        assert!(said.contains("nothing to revoke"), "{said}");
    }
    let nobody = Admin::Token {
        command: TokenCommand::Revoke {
            token: "nobody@example.com".into(),
        },
    };
    let err = admin(&cfg, nobody, "").await.unwrap_err().to_string();
    assert!(err.contains("no token or account matches"), "{err}");
    store.close().await;
}

async fn listings_page(url: &str) {
    use frps::store::{TokenKey, Window};
    let store = Store::connect(url).await.unwrap();
    let mut users = Vec::new();
    for i in 0..5 {
        let user = store
            .create_user(&format!("page{i}@example.com"), "not-a-hash")
            .await
            .unwrap();
        users.push(user.id);
        let s = frps::auth::secret::generate("frpxc");
        store
            .insert_client_token(&s.id, &s.hash_hex, &s.prefix, user.id, None, None)
            .await
            .unwrap();
    }
    fn page<K>(after: Option<K>, limit: u64) -> Window<K> {
        Window { after, limit }
    }
    let ids = |rows: Vec<frps::store::UserRow>| rows.into_iter().map(|u| u.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_users_in(page(None, 2)).await.unwrap()),
        users[..2]
    );
    assert_eq!(
        ids(store.list_users_in(page(Some(users[1]), 2)).await.unwrap()),
        users[2..4]
    );
    // A user added meanwhile comes last, after those not yet listed.
    let late = store
        .create_user("page-late@example.com", "not-a-hash")
        .await
        .unwrap();
    users.push(late.id);
    assert_eq!(
        ids(store.list_users_in(page(Some(users[3]), 2)).await.unwrap()),
        users[4..]
    );
    assert!(
        store
            .list_users_in(page(Some(late.id), 2))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(ids(store.list_users_in(Window::ALL).await.unwrap()), users);

    // Tokens: pages of two, newest first, each after the previous page's
    // last row; together the whole list, though a token is created and
    // one revoked between pages.
    let all: Vec<String> = store
        .list_client_tokens(true)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(all.len(), 5);
    let first = store
        .list_client_tokens_in(true, page(None, 2))
        .await
        .unwrap();
    let mut paged: Vec<String> = first.iter().map(|t| t.id.clone()).collect();
    let newer = frps::auth::secret::generate("frpxc");
    store
        .insert_client_token(
            &newer.id,
            &newer.hash_hex,
            &newer.prefix,
            users[0],
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(store.revoke_client_tokens(&first[0].id).await.unwrap(), 1);
    let mut after = first.last().map(TokenKey::from);
    while let Some(key) = after {
        let rows = store
            .list_client_tokens_in(true, page(Some(key), 2))
            .await
            .unwrap();
        after = (rows.len() == 2).then(|| TokenKey::from(&rows[1]));
        paged.extend(rows.into_iter().map(|t| t.id));
    }
    assert_eq!(paged, all, "no row repeated or skipped");
    // Every token, the revoked one too; the newest first.
    let every = store.list_client_tokens(false).await.unwrap();
    assert_eq!(every.len(), 6);
    assert_eq!(every[0].id, newer.id, "newest first");
    store.close().await;
}

/// Changes of a key's limits set only the limits they name: two changes of
/// different limits at once both land, and a limit not named keeps what the
/// database holds (even a hand-edited value frps reads as unlimited).
async fn limit_changes_touch_only_their_limits(url: &str) {
    use frps::ratelimit::LimitsChange;
    let store = Store::connect(url).await.unwrap();
    let start = Limits {
        rpm: Some(10),
        max_concurrency: Some(3),
    };
    let (key, _) = KeyValidator::create_with_limits(&store, None, None, start)
        .await
        .unwrap();
    let stored = async || {
        let row = store
            .find_api_key(&key, &frps::auth::secret::hash(&key))
            .await
            .unwrap()
            .unwrap();
        (row.rpm, row.max_concurrency)
    };
    for round in 1..=10u32 {
        let rpm = LimitsChange {
            rpm: Some(Some(100 + round)),
            max_concurrency: None,
        };
        let concurrency = LimitsChange {
            rpm: None,
            max_concurrency: Some(Some(round)),
        };
        let (a, b) = tokio::join!(
            KeyValidator::set_limits(&store, None, &key, rpm),
            KeyValidator::set_limits(&store, None, &key, concurrency),
        );
        assert_eq!((a.unwrap().0.len(), b.unwrap().0.len()), (1, 1));
        assert_eq!(
            stored().await,
            (Some(100 + round as i32), Some(round as i32)),
            "round {round}"
        );
    }
    exec(&store, "UPDATE api_keys SET max_concurrency = 999999").await;
    let (rows, _) = KeyValidator::set_limits(
        &store,
        None,
        &key,
        LimitsChange {
            rpm: Some(None),
            max_concurrency: None,
        },
    )
    .await
    .unwrap();
    // Reported as frps reads it; stored as it was.
    assert_eq!(rows[0].1, Limits::default());
    assert_eq!(stored().await, (None, Some(999999)));
    store.close().await;
}

/// Revoking a family while a renewal of it is first used (which locks the
/// parent, then the renewal) can deadlock on PostgreSQL; the revocation is
/// the statement aborted (it waited first), and runs again instead of
/// failing ("tokens were NOT revoked" after a password change).
#[tokio::test]
async fn a_revocation_aborted_as_a_deadlock_runs_again() {
    use sqlx::Connection;
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::connect(&pg.url).await.unwrap();
    let user = store.create_user("dl@example.com", "hash").await.unwrap();
    assert!(
        store
            .insert_client_token("p", "hash-p", "p", user.id, None, None)
            .await
            .unwrap()
    );
    assert!(
        store
            .rotate_client_token("p", "c", "hash-c", "c", None, None)
            .await
            .unwrap()
    );
    let mut other = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let mut watcher = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    // Another transaction holds the renewal's row...
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("UPDATE client_tokens SET revoked_at = revoked_at WHERE id = 'c'")
        .execute(&mut other)
        .await
        .unwrap();
    // ...the revocation takes the parent's and waits for the renewal's...
    let revoking = tokio::spawn({
        let store = store.clone();
        async move { store.revoke_client_tokens("p").await }
    });
    until_waiting_on_locks(&mut watcher, 1, Instant::now() + frpx_tests::WAIT).await;
    // ...and the other transaction then wants the parent's: a deadlock,
    // found by the revocation's wait first (after deadlock_timeout, 1 s).
    sqlx::query("UPDATE client_tokens SET revoked_at = revoked_at WHERE id = 'p'")
        .execute(&mut other)
        .await
        .expect("the revocation is the statement aborted");
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    let revoked = tokio::time::timeout(frpx_tests::WAIT, revoking)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.unwrap(), 2, "both revoked, after running again");
    store.close().await;
    pg.drop_db().await;
}

/// A renewal's first use (which locks the parent, then the renewal) and a
/// renewal of a token whose last renewal is unused (parent, then that
/// renewal, deleted) can deadlock with a transaction taking the two the
/// other way (a revocation); the one aborted runs again instead of failing
/// the login it is part of.
#[tokio::test]
async fn renewals_aborted_as_a_deadlock_run_again() {
    use sqlx::Connection;
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::connect(&pg.url).await.unwrap();
    let user = store.create_user("dl2@example.com", "hash").await.unwrap();
    for confirm in [true, false] {
        let (parent, renewal) = if confirm { ("p1", "c1") } else { ("p2", "c2") };
        assert!(
            store
                .insert_client_token(
                    parent,
                    &format!("hash-{parent}"),
                    parent,
                    user.id,
                    None,
                    None
                )
                .await
                .unwrap()
        );
        assert!(
            store
                .rotate_client_token(
                    parent,
                    renewal,
                    &format!("hash-{renewal}"),
                    renewal,
                    None,
                    None
                )
                .await
                .unwrap()
        );
        let mut other = sqlx::PgConnection::connect(&pg.url).await.unwrap();
        let mut watcher = sqlx::PgConnection::connect(&pg.url).await.unwrap();
        // Another transaction holds the renewal's row...
        sqlx::query("BEGIN").execute(&mut other).await.unwrap();
        sqlx::query("UPDATE client_tokens SET revoked_at = revoked_at WHERE id = $1")
            .bind(renewal)
            .execute(&mut other)
            .await
            .unwrap();
        // ...the store takes the parent's and waits for the renewal's...
        let running = tokio::spawn({
            let store = store.clone();
            async move {
                if confirm {
                    store
                        .confirm_client_token(renewal, parent)
                        .await
                        .map(|n| n.is_some())
                } else {
                    store
                        .rotate_client_token(parent, "n2", "hash-n2", "n2", None, None)
                        .await
                }
            }
        });
        until_waiting_on_locks(&mut watcher, 1, Instant::now() + frpx_tests::WAIT).await;
        // ...and the other then wants the parent's: a deadlock, found by
        // the store's wait first (it waited first).
        sqlx::query("UPDATE client_tokens SET revoked_at = revoked_at WHERE id = $1")
            .bind(parent)
            .execute(&mut other)
            .await
            .expect("the store's statement is the one aborted");
        sqlx::query("COMMIT").execute(&mut other).await.unwrap();
        let done = tokio::time::timeout(frpx_tests::WAIT, running)
            .await
            .unwrap()
            .unwrap();
        assert!(done.unwrap(), "done after running again");
        let live: Vec<String> =
            sqlx::query_scalar("SELECT id FROM client_tokens WHERE revoked_at IS NULL AND id IN ($1, $2, 'n2') ORDER BY id")
                .bind(parent)
                .bind(renewal)
                .fetch_all(&mut watcher)
                .await
                .unwrap();
        if confirm {
            assert_eq!(live, [renewal], "the parent revoked by the first use");
        } else {
            assert_eq!(
                live,
                ["n2", parent],
                "the unused renewal gone, a new one made"
            );
        }
    }
    store.close().await;
    pg.drop_db().await;
}

/// Each statement of `plans` is carried out through its index on SQLite
/// (`EXPLAIN QUERY PLAN` says `USING [COVERING] INDEX <name>`), and PostgreSQL's
/// migrations made the same indexes.
async fn found_through_indexes(plans: &[(&str, &str)]) {
    let store = Store::connect(&frpx_tests::temp_sqlite_url())
        .await
        .unwrap();
    let Store::Sqlite(pool) = &store else {
        panic!("SQLite")
    };
    for (sql, index) in plans {
        let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>("detail"))
            .collect();
        assert!(
            plan.iter()
                .any(|d| d.contains("USING ") && d.contains(&format!("INDEX {index}"))),
            "{sql}: {plan:?}"
        );
    }
    store.close().await;
    if let Some(pg) = TestPg::create().await {
        let store = Store::connect(&pg.url).await.unwrap();
        let Store::Postgres(pool, ..) = &store else {
            panic!("PostgreSQL")
        };
        for (_, index) in plans {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_indexes WHERE indexname = $1")
                .bind(index)
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(n, 1, "{index}");
        }
        store.close().await;
        pg.drop_db().await;
    }
}

/// A renewal's first use revokes the rest of its family, and `frps token
/// revoke` finds tokens by prefix, through indexes (migration 0010), not
/// by reading every row.
#[tokio::test]
async fn token_families_and_prefixes_are_found_by_their_indexes() {
    found_through_indexes(&[
        // The statement the first use of a renewal runs (store/mod.rs).
        (
            "UPDATE client_tokens SET revoked_at = '2026-01-01 00:00:00'
             WHERE revoked_at IS NULL AND id <> 'x'
               AND COALESCE(family_id, id) = (SELECT COALESCE(family_id, id) FROM client_tokens WHERE id = 'x')",
            "client_tokens_family_idx",
        ),
        (
            "SELECT id FROM client_tokens WHERE prefix = 'frpxc_ab'",
            "client_tokens_prefix_idx",
        ),
    ])
    .await;
}

/// The daily purge of revoked and expired tokens and the token listing's
/// pages go through indexes (migration 0011), not a scan of every row
/// (under SQLite's one write lock, for the purge).
#[tokio::test]
async fn token_purges_and_listings_use_their_indexes() {
    const PURGE: &str = "DELETE FROM client_tokens WHERE revoked_at < '2026-01-01 00:00:00' \
         OR (revoked_at IS NULL AND expires_at < '2026-01-01 00:00:00')";
    found_through_indexes(&[
        // The purge (store/mod.rs, purge_client_tokens), each half of it
        // through its index.
        (PURGE, "client_tokens_revoked_idx"),
        (PURGE, "client_tokens_expires_idx"),
        // A page of the listing, newest first.
        (
            "SELECT id FROM client_tokens ORDER BY created_at DESC, id LIMIT 200",
            "client_tokens_created_idx",
        ),
    ])
    .await;
}

/// Logins find their account through the `lower(email)` index
/// (migration 0008), not by reading every row.
#[tokio::test]
async fn accounts_are_found_by_the_lower_email_index() {
    found_through_indexes(&[(
        "SELECT id FROM users WHERE lower(email) = lower('A@b.c')",
        "users_lower_email_idx",
    )])
    .await;
}

/// `frps key list` shows keys newest first, and a row inserted by hand
/// without a creation time last, on either database.
async fn key_listing_order(url: &str) {
    let store = Store::connect(url).await.unwrap();
    exec(
        &store,
        r#"INSERT INTO api_keys (key, status, "createdAt") VALUES ('by-hand', 'active', NULL)"#,
    )
    .await;
    let (_, first) = KeyValidator::create(&store, None, None).await.unwrap();
    let (_, second) = KeyValidator::create(&store, None, None).await.unwrap();
    let (keys, unreadable) = store.list_api_keys().await.unwrap();
    let keys: Vec<_> = keys.into_iter().map(|k| k.id.unwrap_or(k.key)).collect();
    assert_eq!(keys, [second.id, first.id, "by-hand".to_owned()]);
    assert!(unreadable.is_empty(), "{unreadable:?}");
    // SQLite keeps whatever text a hand-written row puts in a time column:
    // a row frps cannot read is named (by id, never its key) and left out,
    // the rest still listed.
    if url.starts_with("sqlite") {
        exec(
            &store,
            r#"INSERT INTO api_keys (key, status, "expiresAt", id) VALUES ('secret-by-hand', 'active', '2026-01-01', 'dated')"#,
        )
        .await;
        let (keys, unreadable) = store.list_api_keys().await.unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(unreadable.len(), 1, "{unreadable:?}");
        assert!(unreadable[0].starts_with("id dated: "), "{unreadable:?}");
        assert!(!unreadable[0].contains("secret-by-hand"), "{unreadable:?}");
        let cfg = frps::Config {
            database_url: url.to_owned(),
            ..frps_config()
        };
        let list = Admin::Key {
            command: KeyCommand::List { json: true },
        };
        let (said, noted) = admin_said(&cfg, list, "").await.unwrap();
        let listed: serde_json::Value = serde_json::from_str(&said).expect("JSON alone on stdout");
        assert_eq!(listed.as_array().unwrap().len(), 3, "{said}");
        assert!(
            noted.contains("a row of api_keys cannot be read") && noted.contains("id dated"),
            "{noted}"
        );
    }
    store.close().await;
}

on_both_databases!(
    key_listing_order_on_sqlite,
    key_listing_order_on_postgres,
    key_listing_order
);

on_both_databases!(
    limit_changes_touch_only_their_limits_on_sqlite,
    limit_changes_touch_only_their_limits_on_postgres,
    limit_changes_touch_only_their_limits
);

/// Client ids bind to the first account that registers them, on `url`'s
/// database, and `frps client list` / `release` manage the bindings.
async fn client_ids_bind(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let alice = store.create_user("alice@example.com", "h").await.unwrap();
    let bob = store.create_user("bob@example.com", "h").await.unwrap();
    assert_eq!(
        store.claim_client_id("gpu-a", alice.id, 10).await.unwrap(),
        Some(alice.id)
    );
    assert_eq!(
        store.claim_client_id("gpu-a", alice.id, 10).await.unwrap(),
        Some(alice.id)
    );
    assert_eq!(
        store.claim_client_id("gpu-a", bob.id, 10).await.unwrap(),
        Some(alice.id),
        "the first account keeps it"
    );
    assert_eq!(
        store.claim_client_id("gpu-b", bob.id, 10).await.unwrap(),
        Some(bob.id)
    );
    let rows = store.list_client_ids().await.unwrap();
    let listed: Vec<_> = rows
        .iter()
        .map(|r| (r.id.as_str(), r.email.as_str()))
        .collect();
    assert_eq!(
        listed,
        [("gpu-a", "alice@example.com"), ("gpu-b", "bob@example.com")]
    );

    // The CLI against the same database.
    let mut cfg = frps_config();
    cfg.database_url = url.to_owned();
    let list = Admin::Client {
        command: ClientCommand::List { json: false },
    };
    let out = admin(&cfg, list, "").await.unwrap();
    assert!(
        out.contains("gpu-a") && out.contains("alice@example.com"),
        "{out}"
    );
    let release = |id: &str| Admin::Client {
        command: ClientCommand::Release { id: id.into() },
    };
    let out = admin(&cfg, release("gpu-a"), "").await.unwrap();
    assert!(out.contains("released client id `gpu-a`"), "{out}");
    let err = admin(&cfg, release("gpu-a"), "").await.unwrap_err();
    assert!(err.to_string().contains("not bound"), "{err}");
    // Released: the next account to register it gets it.
    assert_eq!(
        store.claim_client_id("gpu-a", bob.id, 10).await.unwrap(),
        Some(bob.id)
    );
    store.close().await;
}

on_both_databases!(
    client_ids_bind_on_sqlite,
    client_ids_bind_on_postgres,
    client_ids_bind
);

/// An account holds at most the ids it may; at its cap it still claims
/// the ones it holds, and hears whose another account's are.
async fn client_ids_stop_at_the_accounts_cap(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let alice = store.create_user("alice@example.com", "h").await.unwrap();
    let bob = store.create_user("bob@example.com", "h").await.unwrap();
    let claim = |id: &'static str, user: i64| store.claim_client_id(id, user, 2);
    assert_eq!(claim("bob-1", bob.id).await.unwrap(), Some(bob.id));
    assert_eq!(claim("a-1", alice.id).await.unwrap(), Some(alice.id));
    assert_eq!(claim("a-2", alice.id).await.unwrap(), Some(alice.id));
    assert_eq!(claim("a-3", alice.id).await.unwrap(), None, "full");
    assert_eq!(store.client_id_owner("a-3").await.unwrap(), None);
    assert_eq!(claim("a-1", alice.id).await.unwrap(), Some(alice.id));
    assert_eq!(claim("bob-1", alice.id).await.unwrap(), Some(bob.id));
    // Bob's own count is his: one more fits.
    assert_eq!(claim("bob-2", bob.id).await.unwrap(), Some(bob.id));
    assert!(store.release_client_id("a-1").await.unwrap());
    assert_eq!(claim("a-3", alice.id).await.unwrap(), Some(alice.id));
    store.close().await;
}

on_both_databases!(
    client_ids_stop_at_the_accounts_cap_on_sqlite,
    client_ids_stop_at_the_accounts_cap_on_postgres,
    client_ids_stop_at_the_accounts_cap
);

/// An application's own `users` table may leave `password_hash` NULL for
/// accounts that log in elsewhere (frps warns at start): the listing, which
/// shows no hash, still lists them and the rows after them.
#[tokio::test]
async fn users_without_a_password_hash_are_listed() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::connect(&pg.url).await.unwrap();
    let first = store.create_user("first@example.com", "h").await.unwrap();
    exec(
        &store,
        "ALTER TABLE users ALTER COLUMN password_hash DROP NOT NULL",
    )
    .await;
    exec(
        &store,
        "INSERT INTO users (email, password_hash, created_at, updated_at)
         VALUES ('sso@example.com', NULL, NOW(), NOW())",
    )
    .await;
    let last = store.create_user("last@example.com", "h").await.unwrap();
    let listed = store.list_users_in(frps::store::Window::ALL).await.unwrap();
    let emails: Vec<_> = listed.iter().map(|u| u.email.as_str()).collect();
    assert_eq!(
        emails,
        ["first@example.com", "sso@example.com", "last@example.com"]
    );
    assert_eq!((listed[0].id, listed[2].id), (first.id, last.id));
    store.close().await;
    pg.drop_db().await;
}

/// Sixteen new ids of one account claimed at once against a cap of five,
/// on `url`'s database: exactly five are bound, however the claims
/// interleave; another account's claims at the same time are not held to
/// it.
async fn concurrent_claims_stop_at_the_cap(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let alice = store.create_user("alice@example.com", "h").await.unwrap();
    let bob = store.create_user("bob@example.com", "h").await.unwrap();
    let claims = (0..16).map(|i| {
        let store = store.clone();
        let user = if i % 4 == 0 { bob.id } else { alice.id };
        tokio::spawn(async move {
            let id = format!("gpu-{i}");
            (user, store.claim_client_id(&id, user, 5).await.unwrap())
        })
    });
    let mut bound = std::collections::HashMap::<i64, usize>::new();
    for claim in futures_util::future::join_all(claims).await {
        let (user, owner) = claim.unwrap();
        match owner {
            Some(owner) => {
                assert_eq!(owner, user);
                *bound.entry(user).or_default() += 1;
            }
            None => assert_eq!(user, alice.id, "bob claims four ids only"),
        }
    }
    assert_eq!(bound[&alice.id], 5, "{bound:?}");
    assert_eq!(bound[&bob.id], 4, "{bound:?}");
    let rows = store.list_client_ids().await.unwrap();
    let held = |user: i64| rows.iter().filter(|r| r.user_id == user).count();
    assert_eq!((held(alice.id), held(bob.id)), (5, 4));
    store.close().await;
}

on_both_databases!(
    concurrent_claims_stop_at_the_cap_on_sqlite,
    concurrent_claims_stop_at_the_cap_on_postgres,
    concurrent_claims_stop_at_the_cap
);

on_both_databases!(
    listings_page_on_sqlite,
    listings_page_on_postgres,
    listings_page
);

/// A PostgreSQL database whose default isolation is repeatable read (or
/// serializable): two adds of one email in different letter cases, both
/// queued behind the lock the adds take, make one account and one
/// duplicate (the check ran on a snapshot from before the wait: both
/// passed).
#[tokio::test]
async fn adds_queued_under_repeatable_read_still_make_one_account() {
    use sqlx::Connection;
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let mut admin = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    for (n, level) in ["repeatable read", "serializable"].into_iter().enumerate() {
        sqlx::query(&format!(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = %L', current_database(), '{level}'); END $$"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        // Connections made from now on take it.
        let store = Store::connect(&pg.url).await.unwrap();
        sqlx::query("SELECT pg_advisory_lock(hashtext('frpx.users.email'))")
            .execute(&mut admin)
            .await
            .unwrap();
        let email = format!("queued{n}@example.com");
        let adds: Vec<_> = [email.clone(), email.to_uppercase()]
            .into_iter()
            .map(|email| {
                let store = store.clone();
                tokio::spawn(async move { store.create_user(&email, "h").await })
            })
            .collect();
        // Both wait for the lock before it is let go.
        let started = Instant::now();
        loop {
            let (waiting,): (i64,) = sqlx::query_as(
                // pg_locks covers the whole server: other tests' databases
                // take the same advisory lock at the same time.
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&mut admin)
            .await
            .unwrap();
            if waiting == 2 {
                break;
            }
            assert!(
                started.elapsed() < frpx_tests::WAIT,
                "the adds never queued: {waiting}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sqlx::query("SELECT pg_advisory_unlock(hashtext('frpx.users.email'))")
            .execute(&mut admin)
            .await
            .unwrap();
        let mut created = 0;
        for add in futures_util::future::join_all(adds).await {
            match add.unwrap() {
                Ok(_) => created += 1,
                Err(frps::store::StoreError::Duplicate(_)) => {}
                Err(e) => panic!("{level}: {e}"),
            }
        }
        assert_eq!(created, 1, "{level}");
        store.close().await;
    }
    drop(admin);
    pg.drop_db().await;
}

/// Sixteen adds of one email in different letter cases at once, on `url`'s
/// database: exactly one account comes of them, the rest are duplicates.
async fn concurrent_adds_make_one_account(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let adds = (0..16).map(|i| {
        let store = store.clone();
        // Every variant differs from the others in the case of some letters.
        let email: String = "racer@example.com"
            .chars()
            .enumerate()
            .map(|(n, c)| {
                if n < 4 && i >> n & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        tokio::spawn(async move { store.create_user(&email, "h").await })
    });
    let mut created = 0;
    for add in futures_util::future::join_all(adds).await {
        match add.unwrap() {
            Ok(_) => created += 1,
            Err(frps::store::StoreError::Duplicate(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(created, 1);
    let racers: Vec<_> = store
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .filter(|u| u.email.eq_ignore_ascii_case("racer@example.com"))
        .collect();
    assert_eq!(racers.len(), 1);
    store.close().await;
}

on_both_databases!(
    concurrent_adds_make_one_account_on_sqlite,
    concurrent_adds_make_one_account_on_postgres,
    concurrent_adds_make_one_account
);

#[tokio::test]
async fn a_refused_token_stays_on_disk_and_an_expired_one_is_never_sent() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("b").await;

    // Refused, and no password to fall back on: frpc stops with the reason
    // and keeps the file (frps may refuse it only for now: a database being
    // restored).
    let mut cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    cfg.email = None;
    cfg.password = None;
    let dead = frpc::login::SavedToken {
        token: "frpxc_revoked_or_made_up".into(),
        expires_at: None,
        server: String::new(),
        email: TEST_EMAIL.into(),
        tls: false,
    };
    frpc::login::save(&cfg.token_file, &dead).unwrap();
    let err = Frpc::start(cfg.clone()).exit().await.unwrap_err();
    assert!(
        err.to_string().contains("frps refused the saved token"),
        "{err}"
    );
    assert_eq!(frpc::login::load(&cfg.token_file), Some(dead), "kept");

    // A token frps would take, but past the expiry saved with it: frpc
    // logs in with the password instead.
    let cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    let expired = frpc::login::SavedToken {
        token: frps.client_token().await,
        expires_at: Some("2020-01-01T00:00:00+00:00".into()),
        server: String::new(),
        email: TEST_EMAIL.into(),
        tls: false,
    };
    frpc::login::save(&cfg.token_file, &expired).unwrap();
    let frpc = Frpc::start(cfg.clone());
    frps.wait_for_clients(&["gpu"]).await;
    let saved = frpc::login::load(&cfg.token_file).unwrap();
    assert_ne!(saved.token, expired.token, "logged in with the password");
    let row = frps
        .state
        .store
        .find_client_token(&frps::auth::secret::hash_hex(&expired.token))
        .await
        .unwrap()
        .expect("the token frps issued");
    assert!(
        row.last_used_at.is_none(),
        "the expired token was never sent"
    );
    frpc.kill().await;
}

#[tokio::test]
async fn a_token_that_cannot_be_saved_does_not_stop_frpc() {
    let frps = Frps::start_default().await;
    let backend = Backend::start("b").await;
    let mut cfg = frpc_config("gpu", &frps.addrs, backend.addr);
    // The token's directory would be a file: nothing can be saved there.
    let blocker = std::env::temp_dir().join(format!("frpx-test-{}", uuid::Uuid::new_v4()));
    std::fs::write(&blocker, "a file").unwrap();
    cfg.token_file = blocker.join("token.json");
    let frpc = Frpc::start(cfg);
    frps.wait_for_clients(&["gpu"]).await;
    assert_eq!(
        http::get(frps.public(), "/", Some(API_KEY)).await.status,
        200
    );
    assert!(!frpc.is_finished());
    frpc.kill().await;
    std::fs::remove_file(blocker).unwrap();
}

/// A token from a login that verified a password the user no longer has is
/// not stored, on `url`'s database.
async fn tokens_follow_only_the_current_password(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let user = store
        .create_user("pw@example.com", "hash-old")
        .await
        .unwrap();
    let stored = store
        .insert_client_token("t1", "hash-t1", "t1", user.id, None, Some("hash-old"))
        .await
        .unwrap();
    assert!(stored);
    assert!(
        store
            .set_password("pw@example.com", "hash-new")
            .await
            .unwrap()
    );
    let stored = store
        .insert_client_token("t2", "hash-t2", "t2", user.id, None, Some("hash-old"))
        .await
        .unwrap();
    assert!(
        !stored,
        "a login that checked the old password gets no token"
    );
    assert!(store.find_client_token("hash-t2").await.unwrap().is_none());
    assert!(store.find_client_token("hash-t1").await.unwrap().is_some());
    store.close().await;
}

on_both_databases!(
    tokens_follow_only_the_current_password_on_sqlite,
    tokens_follow_only_the_current_password_on_postgres,
    tokens_follow_only_the_current_password
);

#[tokio::test]
async fn a_key_entry_no_frps_of_this_fleet_wrote_to_redis_opens_nothing() {
    let Some(url) = services::redis_url() else {
        return;
    };
    let prefix = services::redis_prefix();
    let mut cfg = frps_config();
    cfg.redis_url = url.clone();
    cfg.redis_prefix = prefix.clone();
    let fleet = Fleet::start_with(1, cfg).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let entry = r#"{"expires_at":null,"limits":{"rpm":null,"max_concurrency":null}}"#;
    // A real key's sealed entry, for a forger to copy.
    let (real, _) = KeyValidator::create(&fleet.frps.state.store, None, None)
        .await
        .unwrap();
    assert_eq!(status(&fleet.frps, &real).await, 200);
    let slot = |key: &str| {
        let hash = frps::auth::secret::hash(key);
        format!("{prefix}key:{{{}}}", frps::auth::secret::hex(&hash))
    };
    let get = |slot: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("GET")
                .arg(slot)
                .query_async::<Option<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    frpx_tests::eventually_async("the real key's entry is in Redis", || async {
        get(slot(&real)).await.is_some()
    })
    .await;
    let copied = get(slot(&real)).await.unwrap();
    assert!(copied.starts_with("v2."), "{copied}");
    let other_fleet = {
        // Sealed right, under a secret this fleet's database does not hold.
        let cache = frps::auth::redis::RedisCache::connect_now(
            &url,
            &prefix,
            frps::auth::redis::Seal::random(),
        )
        .await
        .unwrap();
        let key = "frpx_sealed_by_another_fleet";
        let value = frps::auth::redis::CachedKey {
            expires_at: None,
            limits: Limits::default(),
        };
        cache
            .set(
                &frps::auth::secret::hash(key),
                value,
                chrono::Utc::now().timestamp(),
            )
            .await;
        key
    };
    for (key, value) in [
        ("frpx_plain_json_entry", Some(entry.to_owned())),
        ("frpx_copied_entry", Some(copied.clone())),
        (
            "frpx_bad_mac",
            Some(format!("v2.{}.{entry}", "0".repeat(64))),
        ),
        (other_fleet, None),
    ] {
        if let Some(value) = value {
            let _: () = redis::cmd("SET")
                .arg(slot(key))
                .arg(value)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        assert_eq!(status(&fleet.frps, key).await, 401, "{key}");
    }
    assert_eq!(status(&fleet.frps, &real).await, 200);
}

/// A database a newer frps migrated further (a migration this build does
/// not have) still opens, on `url`.
async fn a_newer_frps_migration_does_not_stop_this_one(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let checksum = match store.backend() {
        "postgres" => r"'\x00'::bytea",
        _ => "X'00'",
    };
    let sql = format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99990001, 'from a newer frps', TRUE, {checksum}, 0)"
    );
    exec(&store, &sql).await;
    store.close().await;
    let again = Store::connect(url).await.expect("opens all the same");
    again.close().await;
}

on_both_databases!(
    a_newer_frps_migration_does_not_stop_this_one_on_sqlite,
    a_newer_frps_migration_does_not_stop_this_one_on_postgres,
    a_newer_frps_migration_does_not_stop_this_one
);

/// A renewal replaces a token with one of its family, once; revoking any
/// token of a family by id or prefix revokes all of it, on `url`'s
/// database.
async fn renewed_tokens_form_a_family(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let user = store.create_user("fam@example.com", "hash").await.unwrap();
    let other = store
        .create_user("other@example.com", "hash")
        .await
        .unwrap();
    for (id, user) in [("t1", user.id), ("o1", other.id)] {
        let hash = format!("hash-{id}");
        assert!(
            store
                .insert_client_token(id, &hash, id, user, None, None)
                .await
                .unwrap()
        );
    }
    let rotate = |parent: &'static str, id: &'static str| {
        let store = store.clone();
        async move {
            store
                .rotate_client_token(parent, id, &format!("hash-{id}"), id, None, None)
                .await
                .unwrap()
        }
    };
    let live = |id: &'static str| {
        let store = store.clone();
        async move {
            let row = store
                .find_client_token(&format!("hash-{id}"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(row.user_id, if id == "o1" { other.id } else { user.id });
            row.revoked_at.is_none()
        }
    };
    // t1 -> t2: t1 stays valid until t2 is used.
    assert!(rotate("t1", "t2").await);
    assert!(live("t1").await && live("t2").await);
    let gone = |id: &'static str| {
        let store = store.clone();
        async move {
            store
                .find_client_token(&format!("hash-{id}"))
                .await
                .unwrap()
                .is_none()
        }
    };
    // t1 renewed again (t2 never reached its box): t2, never used, is
    // deleted; t3 is the one renewal of t1 that counts.
    assert!(rotate("t1", "t3").await);
    assert!(live("t1").await && gone("t2").await && live("t3").await);
    assert_eq!(
        store
            .find_client_token("hash-t3")
            .await
            .unwrap()
            .unwrap()
            .renewed_from
            .as_deref(),
        Some("t1")
    );
    // t3's first use revokes the rest of the family, and only that.
    // t2's login came too late (t1 was renewed again meanwhile): refused,
    // nothing changes.
    assert_eq!(store.confirm_client_token("t2", "t1").await.unwrap(), None);
    assert!(live("t1").await && live("t3").await);
    assert_eq!(
        store.confirm_client_token("t3", "t1").await.unwrap(),
        Some(1)
    );
    assert!(!live("t1").await && live("t3").await && live("o1").await);
    let t3 = store.find_client_token("hash-t3").await.unwrap().unwrap();
    assert!(t3.renewed_from.is_none() && t3.last_used_at.is_some());
    // A revoked token cannot be renewed; a used renewal can.
    assert!(!rotate("t1", "tX").await);
    assert!(store.find_client_token("hash-tX").await.unwrap().is_none());
    // A session that started before t3's last login renews nothing; one
    // that started after it does.
    let used = t3.last_used_at.unwrap();
    let since = |secs| Some(used + chrono::Duration::seconds(secs));
    assert!(
        !store
            .rotate_client_token("t3", "tY", "hash-tY", "tY", None, since(-1))
            .await
            .unwrap()
    );
    assert!(store.find_client_token("hash-tY").await.unwrap().is_none());
    assert!(
        store
            .rotate_client_token("t3", "tZ", "hash-tZ", "tZ", None, since(1))
            .await
            .unwrap()
    );
    assert!(rotate("t3", "t4").await);
    // t4 renewed t3 again: tZ never reached its box, and is deleted.
    assert!(gone("tZ").await);
    assert!(live("t3").await && live("t4").await);
    // Said saved by its box (TokenSaved) after it was renewed again (a
    // slow write): t4 confirms nothing, which would revoke t5 on its way;
    // t5 said saved revokes the rest, and is not marked as logged in with.
    assert!(rotate("t4", "t5").await);
    let saved = |id, parent| store.confirm_saved_client_token(id, parent);
    assert_eq!(saved("t4", "t3").await.unwrap(), None);
    assert!(live("t3").await && live("t4").await && live("t5").await);
    assert_eq!(saved("t5", "t4").await.unwrap(), Some(2));
    assert!(!live("t3").await && !live("t4").await && live("t5").await);
    let t5 = store.find_client_token("hash-t5").await.unwrap().unwrap();
    assert!(t5.renewed_from.is_none() && t5.last_used_at.is_none());
    // Renewed again and again (a box logging in with t5 past half its
    // life, over and over): one renewal at a time, not a row each.
    let rows = || async { store.list_client_tokens(false).await.unwrap().len() };
    let before = rows().await;
    for i in 0..20 {
        let id = format!("tr{i}");
        let hash = format!("hash-{id}");
        let rotated = store.rotate_client_token("t5", &id, &hash, &id, None, None);
        assert!(rotated.await.unwrap());
    }
    assert_eq!(rows().await, before + 1, "one renewal of t5 at a time");
    assert!(gone("tr0").await);
    // One renewed itself before its parent was renewed again (a renewal
    // said saved while the next is on its way) is revoked, not deleted:
    // its own renewal names it.
    assert!(rotate("o1", "o2").await && rotate("o2", "o3").await);
    assert!(rotate("o1", "o4").await);
    let o2 = store.find_client_token("hash-o2").await.unwrap().unwrap();
    assert!(o2.revoked_at.is_some(), "kept, revoked");
    // Revoking the first one by its id reaches the last; other families
    // are untouched.
    assert_eq!(store.revoke_client_tokens("t1").await.unwrap(), 2);
    assert!(!live("t3").await && !live("t4").await && !live("t5").await);
    assert!(live("o1").await);
    store.close().await;
}

on_both_databases!(
    renewed_tokens_form_a_family_on_sqlite,
    renewed_tokens_form_a_family_on_postgres,
    renewed_tokens_form_a_family
);

#[tokio::test]
async fn a_test_database_is_dropped_even_when_its_test_fails() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let name = url::Url::parse(&pg.url).unwrap().path()[1..].to_owned();
    let admin = std::env::var("FRPX_TEST_DATABASE_URL").unwrap();
    let exists = |name: String| {
        let admin = admin.clone();
        async move {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
                .await
                .unwrap();
            sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_optional(&mut conn)
                .await
                .unwrap()
                .is_some()
        }
    };
    assert!(exists(name.clone()).await);
    // A failing test unwinds past its `drop_db`.
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _pg = pg;
        panic!("the test failed");
    }));
    assert!(failed.is_err());
    assert!(!exists(name).await, "the database is gone");
}
