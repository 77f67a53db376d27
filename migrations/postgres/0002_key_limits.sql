-- Per-key rate limits: requests per minute and concurrent requests. NULL
-- means unlimited. IF NOT EXISTS keeps this safe on a seed table that an
-- operator already extended by hand.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rpm INTEGER CHECK (rpm IS NULL OR rpm > 0);
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS max_concurrency INTEGER
    CHECK (max_concurrency IS NULL OR max_concurrency > 0);
