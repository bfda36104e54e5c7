-- Who disabled an account: a platform account's hold cannot be lifted by the tenant.
ALTER TABLE users ADD COLUMN disabled_by_platform INTEGER NOT NULL DEFAULT 0;
