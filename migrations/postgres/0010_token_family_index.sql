-- A token's family and its prefix, found without reading the whole table:
-- the first use of a renewal (or frpc saying it saved it) revokes the rest
-- of its family, and `frps token revoke` names a token by id or prefix;
-- each read every row before, on SQLite under its one write lock.
CREATE INDEX IF NOT EXISTS client_tokens_family_idx ON client_tokens ((COALESCE(family_id, id)));
CREATE INDEX IF NOT EXISTS client_tokens_prefix_idx ON client_tokens (prefix);
