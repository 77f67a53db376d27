-- frpx schema for the embedded SQLite database. Same tables and columns as
-- the PostgreSQL set (migrations/postgres), in SQLite's types.

CREATE TABLE IF NOT EXISTS api_keys (
    key TEXT PRIMARY KEY,
    status TEXT DEFAULT 'active',
    "expiresAt" TIMESTAMP,
    "createdAt" TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    id TEXT,
    name TEXT,
    prefix TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_id_key ON api_keys (id);
CREATE INDEX IF NOT EXISTS api_keys_prefix_idx ON api_keys (prefix);

CREATE TABLE IF NOT EXISTS gpu_assets (
    "userId" TEXT,
    "machineId" TEXT PRIMARY KEY,
    name TEXT,
    status TEXT DEFAULT 'online',
    "createdAt" TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS client_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP,
    last_used_at TIMESTAMP,
    revoked_at TIMESTAMP
);
CREATE INDEX IF NOT EXISTS client_tokens_user_idx ON client_tokens (user_id);
