-- Plaintext keys (rows inserted by hand, as the seed README did) are
-- compared by PostgreSQL with the presented key's SHA-256, so the key
-- itself never reaches the server; this index keeps that comparison to
-- those rows instead of the whole table (a key frps does not know, a guess
-- included, reads only them).
CREATE INDEX IF NOT EXISTS api_keys_plaintext_idx ON api_keys (key) WHERE key NOT LIKE 'sha256:%';
