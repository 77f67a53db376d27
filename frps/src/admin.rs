//! Admin commands: `frps user|key|token ...`, run against the same
//! `--database-url` (and `--redis-url`, for revocations) as the server.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{NaiveDateTime, Utc};
use clap::Subcommand;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use common::parse_positive_duration;

use crate::auth::accounts::{expiry_after, hash_password};
use crate::auth::keys::KeyValidator;
use crate::auth::redis::RedisCache;
use crate::config::Config;
use crate::ratelimit::{Limits, LimitsChange, MAX_CONCURRENCY, MAX_RPM};
use crate::store::{ApiKeyRow, Store, StoreError, redact};

/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 8;

/// Administrative commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Admin {
    /// Manage provider accounts (the people who run frpc).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage consumer API keys (used on the public port).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Manage client tokens (issued to frpc at login).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage client ids (each belongs to the account that first registered it).
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
}

/// `frps client ...`
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// List client ids and the accounts they belong to.
    List {
        /// A JSON array (RFC 3339 times) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Release a client id, so the next account to register it gets it
    /// (e.g. a machine handed to another account).
    Release {
        /// The client id.
        id: String,
    },
}

/// `frps user ...`
#[derive(Debug, Clone, Subcommand)]
pub enum UserCommand {
    /// Create an account.
    Add {
        /// Email of the account.
        #[arg(long)]
        email: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List accounts.
    List {
        /// A JSON array (RFC 3339 times) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change an account's password.
    Passwd {
        /// Email of the account.
        #[arg(long)]
        email: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
}

/// `frps key ...`
#[derive(Debug, Clone, Subcommand)]
pub enum KeyCommand {
    /// Create a key and print it once (only its hash is stored).
    Create {
        /// A label for the key.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. `30d`, `12h` (default: no expiry).
        #[arg(long, value_parser = parse_positive_duration)]
        expires_in: Option<Duration>,
        /// Requests per minute the key may make (default: unlimited).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_RPM as i64))]
        rpm: Option<u32>,
        /// Requests the key may have in flight at once (default: unlimited).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_CONCURRENCY as i64))]
        max_concurrency: Option<u32>,
    },
    /// List keys (masked), with their limits.
    List {
        /// A JSON array (RFC 3339 times; limits null when unlimited; a
        /// `state` of active, inactive, expired or revoked) instead of a
        /// table.
        #[arg(long)]
        json: bool,
    },
    /// Change the rate limits of keys (by key, id or visible prefix); every
    /// frps sharing Redis applies them at once, others within 10 s.
    Limits {
        /// The key, its id, or its visible prefix.
        key: String,
        /// Requests per minute: a number, or `unlimited` (omitted: unchanged).
        #[arg(long, value_parser = parse_rpm)]
        rpm: Option<LimitArg>,
        /// Requests in flight at once: a number, or `unlimited` (omitted: unchanged).
        #[arg(long, value_parser = parse_concurrency)]
        max_concurrency: Option<LimitArg>,
    },
    /// Revoke keys by key, id or visible prefix; every frps sharing Redis
    /// refuses them within a second (when this command reaches Redis too;
    /// else once the cached entries expire: up to 5 min, it says so).
    Revoke {
        /// The key, its id, or its visible prefix.
        key: String,
    },
}

/// A new value of one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitArg {
    /// Limit to this many.
    Set(u32),
    /// No limit.
    Unlimited,
}

impl LimitArg {
    /// The change `arg` asks for (`None`: none).
    fn change(arg: Option<LimitArg>) -> Option<Option<u32>> {
        arg.map(|a| match a {
            LimitArg::Set(n) => Some(n),
            LimitArg::Unlimited => None,
        })
    }
}

fn parse_limit(s: &str, max: u32) -> Result<LimitArg, String> {
    if matches!(s.trim(), "unlimited" | "none") {
        return Ok(LimitArg::Unlimited);
    }
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(LimitArg::Set(n)),
        _ => Err(format!("expected a number from 1 to {max}, or `unlimited`")),
    }
}

fn parse_rpm(s: &str) -> Result<LimitArg, String> {
    parse_limit(s, MAX_RPM)
}

fn parse_concurrency(s: &str) -> Result<LimitArg, String> {
    parse_limit(s, MAX_CONCURRENCY)
}

fn show_limit(v: Option<u32>) -> String {
    v.map_or_else(|| "unlimited".into(), |n| n.to_string())
}

/// `frps token ...`
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// List client tokens (masked).
    List {
        /// Include revoked and expired tokens.
        #[arg(long)]
        all: bool,
        /// A JSON array (RFC 3339 times) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke tokens by id, visible prefix, or every token of an email.
    Revoke {
        /// Token id, visible prefix, or account email.
        token: String,
    },
}

/// Refuses `needle` when it is the visible prefix of more than one key: a
/// prefix carries 42 random bits, so two keys may share one, and acting on
/// both would reach a stranger's key.
async fn refuse_shared_key_prefix(store: &Store, needle: &str, what: &str) -> anyhow::Result<()> {
    let matched = store
        .match_api_keys(needle, &crate::auth::secret::hash_hex(needle))
        .await?;
    if matched.len() > 1 {
        bail!(
            "`{needle}` is the start of {} keys; give the id of the one to {what} (`frps key list`)",
            matched.len()
        );
    }
    Ok(())
}

/// Runs `admin` against the database of `config`, writing results to `out`
/// (stdout: what a script reads, a new key alone on its line), notes and
/// warnings to `err` (stderr), and reading passwords from `input` when
/// asked to.
pub async fn run(
    admin: Admin,
    config: &Config,
    out: &mut dyn Write,
    err: &mut dyn Write,
    input: &mut dyn BufRead,
) -> anyhow::Result<()> {
    let notice = fresh_database_notice(&config.database_url);
    let store = Store::connect(&config.database_url)
        .await
        .with_context(|| format!("cannot open the database {}", redact(&config.database_url)))?;
    if let Some(notice) = notice {
        writeln!(err, "{notice}")?;
    }
    let result = dispatch(admin, config, &store, out, err, input).await;
    store.close().await;
    result
}

/// What an admin command says on stderr when `url` names an SQLite file
/// that does not exist yet: it creates a new, empty database, which is
/// right before frps's first start but not when run from another directory
/// than frps's (a relative path), whose changes frps would never see.
fn fresh_database_notice(url: &str) -> Option<String> {
    let file = crate::store::sqlite_file(url)?;
    if file.exists() {
        return None;
    }
    let shown = std::path::absolute(&file).unwrap_or(file);
    Some(format!(
        "frps: {} did not exist: this command creates a new, empty database there. frps serves the database its --database-url names (a relative path from the directory frps runs in): if it already runs elsewhere, run this command there or with its --database-url",
        shown.display()
    ))
}

async fn dispatch(
    admin: Admin,
    config: &Config,
    store: &Store,
    out: &mut dyn Write,
    err: &mut dyn Write,
    input: &mut dyn BufRead,
) -> anyhow::Result<()> {
    match admin {
        Admin::User { command } => match command {
            UserCommand::Add {
                email,
                password_stdin,
            } => {
                validate_email(&email)?;
                let password = read_password(password_stdin, input, true)?;
                let hash = hash_password(&password);
                match store.create_user(&email, &hash).await {
                    Ok(user) => writeln!(out, "created user {} (id {})", user.email, user.id)?,
                    Err(StoreError::Duplicate(_)) => {
                        bail!("a user with email {email} already exists")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            UserCommand::List { json } => {
                let users = store.list_users().await?;
                if json {
                    let rows = users.into_iter().map(|u| {
                        serde_json::json!({
                            "id": u.id,
                            "email": u.email,
                            "created_at": rfc3339(Some(u.created_at)),
                        })
                    });
                    return json_array(out, rows);
                }
                let mut table = table(&["id", "email", "created"]);
                for u in users {
                    table.add_row(vec![u.id.to_string(), u.email, time(Some(u.created_at))]);
                }
                writeln!(out, "{table}")?;
            }
            UserCommand::Passwd {
                email,
                password_stdin,
            } => {
                let password = read_password(password_stdin, input, true)?;
                if !store
                    .set_password(&email, &hash_password(&password))
                    .await?
                {
                    bail!("no user with email {email}");
                }
                // The old password's sessions end too: tokens issued with it
                // are revoked, and running frpc must log in with the new one.
                let revoked = store.revoke_client_tokens(&email).await.map_err(|e| {
                    anyhow::anyhow!(
                        "password changed for {email}, but its client tokens were NOT revoked ({e}): \
                         sessions of the old password go on until `frps token revoke {email}` succeeds"
                    )
                })?;
                writeln!(out, "password changed for {email}")?;
                if revoked > 0 {
                    writeln!(
                        out,
                        "revoked its {revoked} client token(s): its frpc are disconnected within six heartbeat intervals and must log in with the new password"
                    )?;
                }
            }
        },
        Admin::Key { command } => match command {
            KeyCommand::Create {
                name,
                expires_in,
                rpm,
                max_concurrency,
            } => {
                let expires_at = expires_in
                    .map(|d| {
                        expiry_after(Utc::now().naive_utc(), d).with_context(|| {
                            format!("--expires-in {d:?} is too far in the future: the expiry date would be out of range")
                        })
                    })
                    .transpose()?;
                let limits = Limits {
                    rpm,
                    max_concurrency,
                };
                let (plaintext, secret) =
                    KeyValidator::create_with_limits(store, name.as_deref(), expires_at, limits)
                        .await?;
                writeln!(out, "{plaintext}")?;
                writeln!(
                    out,
                    "id {}, expires {}, rpm {}, max concurrency {}. Store the key now: it is shown only once.",
                    secret.id,
                    time(expires_at),
                    show_limit(rpm),
                    show_limit(max_concurrency),
                )?;
            }
            KeyCommand::List { json } => {
                let (keys, unreadable) = store.list_api_keys().await?;
                for row in &unreadable {
                    writeln!(
                        err,
                        "warning: a row of api_keys cannot be read and is left out ({row}); frps refuses its key until it is fixed"
                    )?;
                }
                let now = Utc::now().naive_utc();
                if json {
                    let rows = keys.into_iter().map(|k| {
                        let limits = k.limits();
                        serde_json::json!({
                            "id": k.id,
                            "prefix": k.prefix,
                            "key": k.masked(),
                            "name": k.name,
                            "status": k.status,
                            "state": key_state(&k, now),
                            "expires_at": rfc3339(k.expires_at),
                            "created_at": rfc3339(k.created_at),
                            "rpm": limits.rpm,
                            "max_concurrency": limits.max_concurrency,
                        })
                    });
                    return json_array(out, rows);
                }
                let mut table = table(&[
                    "id",
                    "key",
                    "name",
                    "status",
                    "expires",
                    "created",
                    "rpm",
                    "max concurrency",
                ]);
                for k in keys {
                    let limits = k.limits();
                    table.add_row(vec![
                        k.id.clone().unwrap_or_else(|| "-".into()),
                        k.masked(),
                        k.name.clone().unwrap_or_default(),
                        key_state_shown(&k, now),
                        time(k.expires_at),
                        time(k.created_at),
                        show_limit(limits.rpm),
                        show_limit(limits.max_concurrency),
                    ]);
                }
                writeln!(out, "{table}")?;
            }
            KeyCommand::Limits {
                key,
                rpm,
                max_concurrency,
            } => {
                if rpm.is_none() && max_concurrency.is_none() {
                    bail!(
                        "nothing to change: pass --rpm and/or --max-concurrency (a number or `unlimited`)"
                    );
                }
                refuse_shared_key_prefix(store, &key, "change").await?;
                let redis = admin_redis(config, store).await;
                let change = LimitsChange {
                    rpm: LimitArg::change(rpm),
                    max_concurrency: LimitArg::change(max_concurrency),
                };
                let (rows, published) =
                    KeyValidator::set_limits(store, redis.as_ref(), &key, change).await?;
                if rows.is_empty() {
                    bail!("no key matches `{key}`");
                }
                for (row, limits) in &rows {
                    writeln!(
                        out,
                        "{}: rpm {}, max concurrency {}",
                        row.masked(),
                        show_limit(limits.rpm),
                        show_limit(limits.max_concurrency)
                    )?;
                }
                if !published {
                    writeln!(err, "{}", unpublished_note("apply the new limits", config))?;
                }
            }
            KeyCommand::Revoke { key } => {
                refuse_shared_key_prefix(store, &key, "revoke").await?;
                let redis = admin_redis(config, store).await;
                let (rows, published) = KeyValidator::revoke(store, redis.as_ref(), &key).await?;
                if rows.is_empty() {
                    bail!("no key matches `{key}`");
                }
                for row in &rows {
                    // Revoked before: its status stays as it was (told to
                    // the fleet again all the same, for a revocation whose
                    // Redis was unreachable then).
                    match row.status.as_deref() {
                        Some("revoked") => writeln!(out, "already revoked {}", row.masked())?,
                        _ => writeln!(out, "revoked {}", row.masked())?,
                    }
                }
                if !published {
                    writeln!(err, "{}", unpublished_note("refuse the key", config))?;
                }
            }
        },
        Admin::Token { command } => match command {
            TokenCommand::List { all, json } => {
                let tokens = store.list_client_tokens(!all).await?;
                if json {
                    let now = Utc::now().naive_utc();
                    let rows = tokens.into_iter().map(|t| {
                        let state = if t.revoked_at.is_some() {
                            "revoked"
                        } else if t.expires_at.is_some_and(|at| at <= now) {
                            "expired"
                        } else {
                            "active"
                        };
                        serde_json::json!({
                            "id": t.id,
                            "prefix": t.prefix,
                            "email": t.email,
                            "state": state,
                            "created_at": rfc3339(Some(t.created_at)),
                            "expires_at": rfc3339(t.expires_at),
                            "last_used_at": rfc3339(t.last_used_at),
                            "revoked_at": rfc3339(t.revoked_at),
                        })
                    });
                    return json_array(out, rows);
                }
                let mut table = table(&[
                    "id",
                    "token",
                    "user",
                    "created",
                    "expires",
                    "last used",
                    "revoked",
                ]);
                for t in tokens {
                    table.add_row(vec![
                        t.id.clone(),
                        format!("{}…", t.prefix),
                        t.email.clone(),
                        time(Some(t.created_at)),
                        time(t.expires_at),
                        time(t.last_used_at),
                        time(t.revoked_at),
                    ]);
                }
                writeln!(out, "{table}")?;
            }
            TokenCommand::Revoke { token } => {
                // Likewise for a token's prefix (36 random bits); an email
                // is meant to take all of its account's tokens.
                let families = store.client_token_families(&token).await?;
                if families > 1 {
                    bail!(
                        "`{token}` is the start of tokens of {families} logins; give the id of the one to revoke (`frps token list`)"
                    );
                }
                let n = store.revoke_client_tokens(&token).await?;
                if n == 0 {
                    // Nothing left to revoke of a token or account that
                    // exists is done, as for keys (a script run twice);
                    // a name that matches nothing is a mistake.
                    if families == 0 && !store.account_named(&token).await? {
                        bail!("no token or account matches `{token}`");
                    }
                    writeln!(
                        out,
                        "nothing to revoke: no active token matches `{token}` (revoked before, or the account has none)"
                    )?;
                    return Ok(());
                }
                writeln!(
                    out,
                    "revoked {n} token(s); frpc logged in with them are disconnected within six heartbeat intervals"
                )?;
            }
        },
        Admin::Client { command } => match command {
            ClientCommand::List { json } => {
                let ids = store.list_client_ids().await?;
                if json {
                    let rows = ids.into_iter().map(|c| {
                        serde_json::json!({
                            "id": c.id,
                            "email": c.email,
                            "created_at": rfc3339(Some(c.created_at)),
                        })
                    });
                    return json_array(out, rows);
                }
                let mut table = table(&["client id", "user", "since"]);
                for c in ids {
                    table.add_row(vec![c.id, c.email, time(Some(c.created_at))]);
                }
                writeln!(out, "{table}")?;
            }
            ClientCommand::Release { id } => {
                if !store.release_client_id(&id).await? {
                    bail!("client id `{id}` is not bound to any account");
                }
                writeln!(
                    out,
                    "released client id `{id}`; the next account to register it gets it (a client online under it stays until it disconnects)"
                )?;
            }
        },
    }
    Ok(())
}

/// What running frps servers do when a change could not be published
/// through Redis: without Redis they `act` once their in-process entry
/// expires; with a Redis this command could not reach, only once the
/// entry cached there expires too.
fn unpublished_note(act: &str, config: &Config) -> String {
    let local = crate::auth::keys::LOCAL_TTL.as_secs();
    match config.redis() {
        None => format!(
            "note: no Redis configured; running frps servers {act} once their in-process cache entry expires (at most {local}s)"
        ),
        Some(url) => format!(
            "warning: not told through Redis at {}: it is not reachable from here, or no frps listens on `{}revocations` (none running, or the servers use another --redis-url or --redis-prefix than this command); frps servers {act} only once the entry cached in their Redis expires (up to {}s, plus {local}s in-process); run this again with the servers' Redis settings to apply it at once",
            crate::store::redact(url),
            config.redis_prefix,
            crate::auth::redis::REDIS_TTL.as_secs()
        ),
    }
}

/// Redis of `config` for invalidations, when configured and reachable.
async fn admin_redis(config: &Config, store: &Store) -> Option<RedisCache> {
    let url = config.redis()?;
    let seal = crate::auth::redis::Seal::load(store).await.ok()?;
    RedisCache::connect_now(url, &config.redis_prefix, seal)
        .await
        .ok()
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

/// A listing as one JSON array, for scripts.
fn json_array(
    out: &mut dyn Write,
    rows: impl Iterator<Item = serde_json::Value>,
) -> anyhow::Result<()> {
    let rows: Vec<_> = rows.collect();
    writeln!(out, "{}", serde_json::Value::Array(rows))?;
    Ok(())
}

/// A stored (UTC) time in RFC 3339, to the second; `null` for none.
fn rfc3339(t: Option<NaiveDateTime>) -> Option<String> {
    t.map(|t| {
        t.and_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    })
}

/// What a key is now, as frps judges it: `active` (status `active` or
/// NULL, unexpired), `expired` (such a one past its expiry), `revoked`, or
/// `inactive` (any other status, which frps refuses: `disabled`, a
/// `CHAR`-padded `active`...).
fn key_state(k: &ApiKeyRow, now: NaiveDateTime) -> &'static str {
    // Active exactly when the validator takes it.
    if k.is_valid(now) {
        return "active";
    }
    match k.status.as_deref() {
        None | Some("active") => "expired",
        Some("revoked") => "revoked",
        Some(_) => "inactive",
    }
}

/// [`key_state`] for the table: with the stored status when that says
/// more (`inactive (disabled)`).
fn key_state_shown(k: &ApiKeyRow, now: NaiveDateTime) -> String {
    match (key_state(k, now), k.status.as_deref()) {
        ("inactive", Some(status)) => format!("inactive ({status:?})"),
        (state, _) => state.to_owned(),
    }
}

fn time(t: Option<NaiveDateTime>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

fn validate_email(email: &str) -> anyhow::Result<()> {
    let ok = email.len() <= crate::auth::accounts::MAX_EMAIL_BYTES
        && email.split_once('@').is_some_and(|(user, host)| {
            !user.is_empty()
                && !host.is_empty()
                && !email.contains(|c: char| c.is_whitespace() || c.is_control())
        });
    if !ok {
        bail!("`{email}` is not an email address");
    }
    // Unique in any letter case, as the database compares it: SQLite's
    // lower() folds only ASCII (PostgreSQL's depends on its locale).
    if !email.is_ascii() {
        bail!("`{email}`: only ASCII email addresses are taken (letter case is compared in ASCII)");
    }
    Ok(())
}

/// Reads a password from the first line of `input` (`from_stdin`) or from
/// a prompt on the terminal (asked twice when `confirm`).
fn read_password(
    from_stdin: bool,
    input: &mut dyn BufRead,
    confirm: bool,
) -> anyhow::Result<String> {
    let password = if from_stdin {
        let mut line = String::new();
        input
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        if confirm && rpassword::prompt_password("Repeat password: ")? != first {
            bail!("the passwords do not match");
        }
        first
    } else {
        bail!("no terminal to prompt for a password: pass --password-stdin and pipe it in");
    };
    if password.chars().count() < MIN_PASSWORD {
        bail!("the password must have at least {MIN_PASSWORD} characters");
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_creating_an_sqlite_database_says_where() {
        let dir = std::env::temp_dir().join(format!("frpx-admin-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("frpx.db");
        let url = format!("sqlite://{}", file.display());
        let notice = fresh_database_notice(&url).expect("a new file");
        assert!(notice.contains(&file.display().to_string()), "{notice}");
        assert!(notice.contains("new, empty database"), "{notice}");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(fresh_database_notice(&url), None, "it exists");
        for quiet in [
            "sqlite::memory:",
            "sqlite://x.db?mode=memory",
            "postgres://postgres@127.0.0.1/test",
        ] {
            assert_eq!(fresh_database_notice(quiet), None, "{quiet}");
        }
        // A relative path is shown from where the command runs.
        let notice = fresh_database_notice("sqlite://not-here-frpx-test.db").unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert!(
            notice.contains(&cwd.join("not-here-frpx-test.db").display().to_string()),
            "{notice}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn listings_take_json_from_the_command_line() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            let mut all = vec!["frps"];
            all.extend_from_slice(args);
            crate::Cli::try_parse_from(all).unwrap().command.unwrap()
        };
        assert!(matches!(
            parse(&["key", "list", "--json"]),
            Admin::Key {
                command: KeyCommand::List { json: true }
            }
        ));
        assert!(matches!(
            parse(&["token", "list", "--all", "--json"]),
            Admin::Token {
                command: TokenCommand::List {
                    all: true,
                    json: true
                }
            }
        ));
        assert!(matches!(
            parse(&["user", "list"]),
            Admin::User {
                command: UserCommand::List { json: false }
            }
        ));
        assert!(matches!(
            parse(&["client", "list", "--json"]),
            Admin::Client {
                command: ClientCommand::List { json: true }
            }
        ));
    }

    #[test]
    fn key_state_tells_expired_from_active() {
        let now = Utc::now().naive_utc();
        let key = |status: Option<&str>, expires: Option<i64>| ApiKeyRow {
            status: status.map(Into::into),
            expires_at: expires.map(|h| now + chrono::Duration::hours(h)),
            ..ApiKeyRow::default()
        };
        assert_eq!(key_state(&key(None, None), now), "active");
        assert_eq!(key_state(&key(Some("active"), Some(1)), now), "active");
        assert_eq!(key_state(&key(Some("active"), Some(-1)), now), "expired");
        assert_eq!(key_state(&key(None, Some(-1)), now), "expired");
        assert_eq!(key_state(&key(Some("revoked"), Some(-1)), now), "revoked");
        // Any other status frps refuses, whatever it looks like.
        for other in ["disabled", "Active", "", "active   "] {
            assert_eq!(key_state(&key(Some(other), None), now), "inactive");
        }
        assert_eq!(
            key_state_shown(&key(Some("disabled"), None), now),
            "inactive (\"disabled\")"
        );
        assert_eq!(key_state_shown(&key(None, Some(-1)), now), "expired");
    }

    #[test]
    fn limits_parse_and_apply() {
        assert_eq!(parse_rpm("60"), Ok(LimitArg::Set(60)));
        assert_eq!(parse_rpm("unlimited"), Ok(LimitArg::Unlimited));
        assert_eq!(parse_concurrency("none"), Ok(LimitArg::Unlimited));
        for bad in ["0", "-1", "x", "", "100001"] {
            assert!(parse_rpm(bad).is_err(), "{bad}");
        }
        assert_eq!(LimitArg::change(None), None);
        assert_eq!(LimitArg::change(Some(LimitArg::Set(2))), Some(Some(2)));
        assert_eq!(LimitArg::change(Some(LimitArg::Unlimited)), Some(None));
    }

    /// A password changed whose tokens could not be revoked says so, and
    /// how to finish, rather than fail as if nothing had changed.
    #[tokio::test]
    async fn a_password_change_whose_revocation_fails_says_what_is_left() {
        let db = crate::store::TempDb::new("admin");
        let config = Config::ephemeral("k", &db.url);
        let store = Store::connect(&db.url).await.unwrap();
        store
            .create_user("owner@example.com", &hash_password("old"))
            .await
            .unwrap();
        let Store::Sqlite(pool) = &store else {
            panic!("a SQLite store")
        };
        sqlx::query("DROP TABLE client_tokens")
            .execute(pool)
            .await
            .unwrap();
        let command = UserCommand::Passwd {
            email: "owner@example.com".into(),
            password_stdin: true,
        };
        let mut out = Vec::new();
        let e = run(
            Admin::User { command },
            &config,
            &mut out,
            &mut std::io::sink(),
            &mut "new password\n".as_bytes(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "password changed for owner@example.com, but its client tokens were NOT revoked"
            ),
            "{e}"
        );
        assert!(e.contains("frps token revoke owner@example.com"), "{e}");
        let user = store.find_user("owner@example.com").await.unwrap().unwrap();
        assert!(crate::auth::accounts::verify_password(
            "new password",
            &user.password_hash
        ));
    }

    #[tokio::test]
    async fn a_key_expiring_past_the_last_date_is_refused_not_a_panic() {
        let db = crate::store::TempDb::new("admin");
        let config = Config::ephemeral("k", &db.url);
        let create = async |expires_in| {
            let command = KeyCommand::Create {
                name: None,
                expires_in,
                rpm: None,
                max_concurrency: None,
            };
            let mut out = Vec::new();
            run(
                Admin::Key { command },
                &config,
                &mut out,
                &mut std::io::sink(),
                &mut std::io::empty(),
            )
            .await
        };
        // Within chrono's durations, but past the year 262143.
        let too_far = Duration::from_secs(100_000_000 * 86400);
        let e = create(Some(too_far)).await.unwrap_err();
        assert!(e.to_string().contains("--expires-in"), "{e}");
        assert!(e.to_string().contains("too far in the future"), "{e}");
        let e = create(Some(Duration::MAX)).await.unwrap_err();
        assert!(e.to_string().contains("too far in the future"), "{e}");
        create(Some(Duration::from_secs(86400))).await.unwrap();
    }

    #[test]
    fn emails_and_passwords_are_checked() {
        assert!(validate_email("a@b.c").is_ok());
        for bad in ["", "a", "@b", "a@", "a b@c", "a\u{0}@b", "a@b\u{1b}[2J"] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
        let e = validate_email("Ärger@example.com").unwrap_err().to_string();
        assert!(e.contains("only ASCII"), "{e}");
        let mut input = std::io::Cursor::new("short\n");
        assert!(read_password(true, &mut input, true).is_err());
        let mut input = std::io::Cursor::new("long enough pw\nignored\n");
        assert_eq!(
            read_password(true, &mut input, true).unwrap(),
            "long enough pw"
        );
    }
}
