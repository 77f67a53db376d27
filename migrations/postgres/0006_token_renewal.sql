-- A renewed token is not revoked as its replacement is issued, only when
-- the replacement is first used: a replacement lost on its way (a session
-- dying as it was sent, a token file that could not be written) leaves the
-- box its old token. `renewed_from` is the token a not yet used one was
-- renewed from (NULL once used, and for tokens from a password login); its
-- first use revokes the rest of its family.
ALTER TABLE client_tokens ADD COLUMN renewed_from VARCHAR;
CREATE INDEX IF NOT EXISTS client_tokens_renewed_from_idx ON client_tokens (renewed_from);
