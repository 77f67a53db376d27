-- Renewed client tokens: a token issued in place of another (the renewal
-- revokes the old one) belongs to the old one's family, the first token's
-- id (NULL: its own). Revoking any token of a family revokes all of it, so
-- revoking a token by the id or prefix an operator saw also ends what it
-- was renewed into.
ALTER TABLE client_tokens ADD COLUMN family_id TEXT;
