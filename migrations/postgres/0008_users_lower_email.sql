-- Logins and password changes find an account by lower(email) (an email
-- is unique in any letter case): this index answers that without reading
-- the whole table.
CREATE INDEX IF NOT EXISTS users_lower_email_idx ON users (lower(email));
