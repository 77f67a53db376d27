-- A box owner's machine rows, found without reading the whole table: frps
-- keeps each account's offline rows to the most recent --max-client-ids,
-- deleting older ones whenever one of its machines goes offline (machine
-- ids come from frpc, so an account presenting new ones could otherwise
-- add rows for good).
CREATE INDEX IF NOT EXISTS gpu_assets_user_idx ON gpu_assets ("userId");
