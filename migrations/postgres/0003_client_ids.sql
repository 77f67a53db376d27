-- Which account a client id belongs to: bound at its first registration,
-- so another account cannot take the id (and the requests pinned to it)
-- while its owner is offline. Same columns as
-- migrations/sqlite/0003_client_ids.sql.
CREATE TABLE IF NOT EXISTS client_ids (
    id VARCHAR PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX IF NOT EXISTS client_ids_user_idx ON client_ids (user_id);
