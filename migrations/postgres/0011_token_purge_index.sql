-- The daily purge of revoked and expired client tokens, and the token
-- listings (newest first, in pages), without reading the whole table: a
-- box restarted in a loop without its token file adds a token at each
-- password login, and the purge's scan held SQLite's one write lock
-- (logins, token touches and machine rows waited behind it). Partial: each
-- half of the purge reads only the rows it can delete (most tokens are
-- neither revoked nor expired), and SQLite, which has no statistics, took an
-- index of every revoked_at for the `revoked_at IS NULL` half.
CREATE INDEX IF NOT EXISTS client_tokens_revoked_idx ON client_tokens (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS client_tokens_expires_idx ON client_tokens (expires_at) WHERE revoked_at IS NULL;
CREATE INDEX IF NOT EXISTS client_tokens_created_idx ON client_tokens (created_at DESC, id);
