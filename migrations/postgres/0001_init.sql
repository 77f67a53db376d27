-- frpx schema for PostgreSQL.
--
-- The seed's tables (api_keys, gpu_assets) keep their columns exactly and are
-- created only when absent, so a database set up by hand from the seed README
-- migrates cleanly; frpx's own columns are added with IF NOT EXISTS.

CREATE TABLE IF NOT EXISTS api_keys (
    key VARCHAR PRIMARY KEY,
    status VARCHAR DEFAULT 'active',
    "expiresAt" TIMESTAMP,
    "createdAt" TIMESTAMP DEFAULT NOW(),
    "updatedAt" TIMESTAMP DEFAULT NOW()
);
-- Keys frpx creates are stored as key = 'sha256:<hex>' with a short visible
-- prefix and an id for listing and revocation; hand-inserted plaintext rows
-- leave these NULL.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS id VARCHAR;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS name VARCHAR;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS prefix VARCHAR;
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_id_key ON api_keys (id);
CREATE INDEX IF NOT EXISTS api_keys_prefix_idx ON api_keys (prefix);

CREATE TABLE IF NOT EXISTS gpu_assets (
    "userId" VARCHAR,
    "machineId" VARCHAR PRIMARY KEY,
    name VARCHAR,
    status VARCHAR DEFAULT 'online',
    "createdAt" TIMESTAMP DEFAULT NOW(),
    "updatedAt" TIMESTAMP DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS users (
    id BIGSERIAL PRIMARY KEY,
    email VARCHAR NOT NULL UNIQUE,
    password_hash VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP NOT NULL DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS client_tokens (
    id VARCHAR PRIMARY KEY,
    token_hash VARCHAR NOT NULL UNIQUE,
    prefix VARCHAR NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP,
    last_used_at TIMESTAMP,
    revoked_at TIMESTAMP
);
CREATE INDEX IF NOT EXISTS client_tokens_user_idx ON client_tokens (user_id);
