//! Rows as read from the database.

use chrono::NaiveDateTime;
use serde::Serialize;

/// One `api_keys` row.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct ApiKeyRow {
    /// The key in plaintext (legacy, hand-inserted) or `sha256:<hex>`.
    pub key: String,
    /// `active`, `revoked`, or anything an operator wrote (only `active` is valid).
    pub status: Option<String>,
    /// Expiry (UTC), if any.
    #[sqlx(rename = "expiresAt")]
    pub expires_at: Option<NaiveDateTime>,
    /// Creation time (UTC).
    #[sqlx(rename = "createdAt")]
    pub created_at: Option<NaiveDateTime>,
    /// frpx's id for keys it created.
    pub id: Option<String>,
    /// Label given at creation.
    pub name: Option<String>,
    /// Visible start of keys frpx created.
    pub prefix: Option<String>,
    /// Requests per minute allowed (NULL: unlimited).
    pub rpm: Option<i32>,
    /// Requests allowed in flight at once (NULL: unlimited).
    pub max_concurrency: Option<i32>,
}

impl ApiKeyRow {
    /// Whether the key may be used at `now`.
    pub fn is_valid(&self, now: NaiveDateTime) -> bool {
        self.status.as_deref().unwrap_or("active") == "active"
            && self.expires_at.is_none_or(|exp| exp > now)
    }

    /// The key's rate limits (non-positive values, which the schema
    /// refuses, count as unlimited; so do values past what `frps key
    /// limits` accepts, which only a hand-edited row can hold: a limit that
    /// high limits nothing, and counting up to it would let one key's
    /// remembered requests grow without the bound the cap gives).
    pub fn limits(&self) -> crate::ratelimit::Limits {
        use crate::ratelimit::{MAX_CONCURRENCY, MAX_RPM};
        let within = |v: Option<i32>, max: u32| {
            v.and_then(|v| u32::try_from(v).ok())
                .filter(|v| (1..=max).contains(v))
        };
        crate::ratelimit::Limits {
            rpm: within(self.rpm, MAX_RPM),
            max_concurrency: within(self.max_concurrency, MAX_CONCURRENCY),
        }
    }

    /// Whether the row stores a hash rather than the key itself.
    pub fn is_hashed(&self) -> bool {
        self.key.starts_with(super::HASH_PREFIX)
    }

    /// How the key may be shown: its prefix for hashed keys, a masked form
    /// of legacy plaintext keys.
    pub fn masked(&self) -> String {
        match (&self.prefix, self.is_hashed()) {
            (Some(prefix), _) => format!("{prefix}…"),
            (None, true) => "(hashed)".into(),
            (None, false) => mask(&self.key),
        }
    }
}

/// The first few characters of a secret, the rest elided.
pub fn mask(secret: &str) -> String {
    let shown: String = secret.chars().take(4).collect();
    format!("{shown}…")
}

/// One `users` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    /// User id.
    pub id: i64,
    /// Email (unique).
    pub email: String,
    /// Argon2 PHC string.
    pub password_hash: String,
    /// Creation time (UTC).
    pub created_at: NaiveDateTime,
}

/// One `client_tokens` row, with its owner's email.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ClientTokenRow {
    /// Token id.
    pub id: String,
    /// Visible start of the token.
    pub prefix: String,
    /// Owner.
    pub user_id: i64,
    /// Owner's email.
    pub email: String,
    /// Creation time (UTC).
    pub created_at: NaiveDateTime,
    /// Expiry (UTC), if any.
    pub expires_at: Option<NaiveDateTime>,
    /// Last login with it (UTC).
    pub last_used_at: Option<NaiveDateTime>,
    /// Revocation time (UTC).
    pub revoked_at: Option<NaiveDateTime>,
    /// For a renewed token not used yet: the token it was renewed from
    /// (still valid until this one's first use).
    pub renewed_from: Option<String>,
}

impl ClientTokenRow {
    /// Whether the token may be used at `now`.
    pub fn is_usable(&self, now: NaiveDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|exp| exp > now)
    }
}

/// One `gpu_assets` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GpuAssetRow {
    /// Owner's user id.
    #[sqlx(rename = "userId")]
    pub user_id: Option<String>,
    /// Machine id.
    #[sqlx(rename = "machineId")]
    pub machine_id: String,
    /// Client id.
    pub name: Option<String>,
    /// `online` or `offline`.
    pub status: Option<String>,
    /// Last write (UTC).
    #[sqlx(rename = "updatedAt")]
    pub updated_at: Option<NaiveDateTime>,
}

/// One `client_ids` row: a client id and the account it belongs to.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ClientIdRow {
    /// The client id.
    pub id: String,
    /// The account.
    pub user_id: i64,
    /// That account's email.
    pub email: String,
    /// When the id was first registered (UTC).
    pub created_at: NaiveDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{MAX_CONCURRENCY, MAX_RPM};

    fn row(rpm: Option<i32>, max_concurrency: Option<i32>) -> ApiKeyRow {
        ApiKeyRow {
            key: "k".into(),
            rpm,
            max_concurrency,
            ..ApiKeyRow::default()
        }
    }

    #[test]
    fn limits_outside_what_the_cli_sets_limit_nothing() {
        let l = row(Some(60), Some(4)).limits();
        assert_eq!((l.rpm, l.max_concurrency), (Some(60), Some(4)));
        let max = row(Some(MAX_RPM as i32), Some(MAX_CONCURRENCY as i32)).limits();
        assert_eq!(
            (max.rpm, max.max_concurrency),
            (Some(MAX_RPM), Some(MAX_CONCURRENCY))
        );
        // Hand-edited: past the caps, or not positive.
        for (rpm, conc) in [
            (Some(2_000_000_000), Some(MAX_CONCURRENCY as i32 + 1)),
            (Some(0), Some(-3)),
            (None, None),
        ] {
            assert!(row(rpm, conc).limits().is_unlimited(), "{rpm:?} {conc:?}");
        }
    }
}
