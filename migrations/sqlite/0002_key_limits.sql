-- Per-key rate limits: requests per minute and concurrent requests. NULL
-- means unlimited. Same columns as migrations/postgres/0002_key_limits.sql.
ALTER TABLE api_keys ADD COLUMN rpm INTEGER CHECK (rpm IS NULL OR rpm > 0);
ALTER TABLE api_keys ADD COLUMN max_concurrency INTEGER
    CHECK (max_concurrency IS NULL OR max_concurrency > 0);
