//! Admin commands: `frps user|key|token ...`, run against the same
//! `--database-url` (and `--redis-url`, for revocations) as the server.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{NaiveDateTime, Utc};
use clap::Subcommand;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use common::parse_duration;

use crate::auth::accounts::hash_password;
use crate::auth::keys::KeyValidator;
use crate::auth::redis::RedisCache;
use crate::config::Config;
use crate::store::{Store, StoreError, redact};

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
    List,
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
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// List keys (masked).
    List,
    /// Revoke keys by key, id or visible prefix; every frps sharing Redis
    /// refuses them within a second.
    Revoke {
        /// The key, its id, or its visible prefix.
        key: String,
    },
}

/// `frps token ...`
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// List client tokens (masked).
    List {
        /// Include revoked and expired tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke tokens by id, visible prefix, or every token of an email.
    Revoke {
        /// Token id, visible prefix, or account email.
        token: String,
    },
}

/// Runs `admin` against the database of `config`, writing results to `out`
/// and reading passwords from `input` when asked to.
pub async fn run(
    admin: Admin,
    config: &Config,
    out: &mut dyn Write,
    input: &mut dyn BufRead,
) -> anyhow::Result<()> {
    let store = Store::connect(&config.database_url)
        .await
        .with_context(|| format!("cannot open the database {}", redact(&config.database_url)))?;
    let result = dispatch(admin, config, &store, out, input).await;
    store.close().await;
    result
}

async fn dispatch(
    admin: Admin,
    config: &Config,
    store: &Store,
    out: &mut dyn Write,
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
            UserCommand::List => {
                let mut table = table(&["id", "email", "created"]);
                for u in store.list_users().await? {
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
                writeln!(out, "password changed for {email}")?;
            }
        },
        Admin::Key { command } => match command {
            KeyCommand::Create { name, expires_in } => {
                let expires_at = expires_in
                    .map(|d| chrono::Duration::from_std(d).context("expiry too far in the future"))
                    .transpose()?
                    .map(|d| Utc::now().naive_utc() + d);
                let (plaintext, secret) =
                    KeyValidator::create(store, name.as_deref(), expires_at).await?;
                writeln!(out, "{plaintext}")?;
                writeln!(
                    out,
                    "id {}, expires {}. Store the key now: it is shown only once.",
                    secret.id,
                    time(expires_at)
                )?;
            }
            KeyCommand::List => {
                let mut table = table(&["id", "key", "name", "status", "expires", "created"]);
                for k in store.list_api_keys().await? {
                    table.add_row(vec![
                        k.id.clone().unwrap_or_else(|| "-".into()),
                        k.masked(),
                        k.name.clone().unwrap_or_default(),
                        k.status.clone().unwrap_or_else(|| "active".into()),
                        time(k.expires_at),
                        time(k.created_at),
                    ]);
                }
                writeln!(out, "{table}")?;
            }
            KeyCommand::Revoke { key } => {
                let redis = match config.redis() {
                    Some(url) => RedisCache::connect_now(url, &config.redis_prefix)
                        .await
                        .ok(),
                    None => None,
                };
                let (rows, published) = KeyValidator::revoke(store, redis.as_ref(), &key).await?;
                if rows.is_empty() {
                    bail!("no key matches `{key}`");
                }
                for row in &rows {
                    writeln!(out, "revoked {}", row.masked())?;
                }
                if !published {
                    writeln!(
                        out,
                        "note: Redis unreachable; running frps servers refuse the key once their in-process cache entry expires (at most {}s)",
                        crate::auth::keys::LOCAL_TTL.as_secs()
                    )?;
                }
            }
        },
        Admin::Token { command } => match command {
            TokenCommand::List { all } => {
                let mut table = table(&[
                    "id",
                    "token",
                    "user",
                    "created",
                    "expires",
                    "last used",
                    "revoked",
                ]);
                for t in store.list_client_tokens(!all).await? {
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
                let n = store.revoke_client_tokens(&token).await?;
                if n == 0 {
                    bail!("no active token matches `{token}`");
                }
                writeln!(out, "revoked {n} token(s)")?;
            }
        },
    }
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

fn time(t: Option<NaiveDateTime>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

fn validate_email(email: &str) -> anyhow::Result<()> {
    let ok = email.len() <= 254
        && email.split_once('@').is_some_and(|(user, host)| {
            !user.is_empty() && !host.is_empty() && !email.contains(char::is_whitespace)
        });
    if !ok {
        bail!("`{email}` is not an email address");
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
    fn emails_and_passwords_are_checked() {
        assert!(validate_email("a@b.c").is_ok());
        for bad in ["", "a", "@b", "a@", "a b@c"] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
        let mut input = std::io::Cursor::new("short\n");
        assert!(read_password(true, &mut input, true).is_err());
        let mut input = std::io::Cursor::new("long enough pw\nignored\n");
        assert_eq!(
            read_password(true, &mut input, true).unwrap(),
            "long enough pw"
        );
    }
}
