-- A rotated key names its successor: a key has at most one live successor, so rotating the
-- same key again cannot mint extra keys during the overlap.
ALTER TABLE api_keys ADD COLUMN rotated_to TEXT;
