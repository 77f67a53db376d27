-- Secrets frps instances sharing this database share: each made by the
-- first frps that needs it. `redis-entry-mac` authenticates the key
-- entries frps writes to Redis, so an entry Redis holds that no frps wrote
-- (a shared or impersonated Redis) does not pass for a valid key.
CREATE TABLE IF NOT EXISTS server_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
