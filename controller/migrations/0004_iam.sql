-- no-transaction
-- Identity and access management (issue #3): more roles, disabled accounts, MFA, sessions,
-- key expiry, groups, tenant policies, instance tags, alerts.
-- SQLite cannot change a CHECK constraint in place, so `users` is rebuilt; foreign keys are
-- off while the table is swapped, and the swap is one transaction.
PRAGMA foreign_keys = OFF;
BEGIN;
CREATE TABLE users_new (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE,
    tenant_id             TEXT REFERENCES tenants(id),
    role                  TEXT NOT NULL CHECK (role IN ('platform_admin', 'security_admin',
                              'auditor', 'operator', 'tenant_admin', 'member', 'reader')),
    password_hash         TEXT NOT NULL,
    must_change_password  INTEGER NOT NULL DEFAULT 1,
    created_at            TEXT NOT NULL,
    failed_logins         INTEGER NOT NULL DEFAULT 0,
    lockouts              INTEGER NOT NULL DEFAULT 0,
    locked_until          INTEGER,
    -- Unix time of the last password change, for the maximum password age.
    password_changed_at   INTEGER NOT NULL DEFAULT 0,
    disabled_at           TEXT,
    -- TOTP seed sealed under the platform master key; pending until the first code confirms it.
    totp_sealed           TEXT,
    totp_confirmed        INTEGER NOT NULL DEFAULT 0,
    totp_last_step        INTEGER,
    -- Platform roles belong to platform accounts, tenant roles to tenant accounts.
    CHECK ((tenant_id IS NULL) = (role IN ('platform_admin', 'security_admin', 'auditor',
                                           'operator')))
);
INSERT INTO users_new (id, name, tenant_id, role, password_hash, must_change_password,
                       created_at, failed_logins, lockouts, locked_until, password_changed_at)
    SELECT id, name, tenant_id,
           CASE role WHEN 'tenant_member' THEN 'member' ELSE role END,
           password_hash, must_change_password, created_at, failed_logins, lockouts,
           locked_until, CAST(strftime('%s', 'now') AS INTEGER)
    FROM users;
DROP TABLE users;
ALTER TABLE users_new RENAME TO users;
CREATE INDEX users_by_tenant ON users (tenant_id);

ALTER TABLE tenants ADD COLUMN disabled_at TEXT;
-- A deleted tenant's row stays (its deleted instances keep their erase records) under a
-- freed name; it is gone from every listing and lookup.
ALTER TABLE tenants ADD COLUMN deleted_at TEXT;
-- Per-tenant tightening of the platform rules (never loosening: the code takes the stricter).
ALTER TABLE tenants ADD COLUMN require_mfa INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN password_min_length INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN password_max_age_days INTEGER NOT NULL DEFAULT 0;
-- Where the tenant's identity alerts are posted, and the HMAC secret (sealed) they are signed with.
ALTER TABLE tenants ADD COLUMN webhook_url TEXT;
ALTER TABLE tenants ADD COLUMN webhook_secret TEXT;
-- The tenant's Cedar policies (validated against the schema on upload).
ALTER TABLE tenants ADD COLUMN policies TEXT NOT NULL DEFAULT '';

-- Sessions are keys too ('session': short-lived, idle timeout); 'api' keys may expire.
ALTER TABLE api_keys ADD COLUMN kind TEXT NOT NULL DEFAULT 'api';
ALTER TABLE api_keys ADD COLUMN expires_at INTEGER;
ALTER TABLE api_keys ADD COLUMN idle_secs INTEGER;
ALTER TABLE api_keys ADD COLUMN last_used_at INTEGER;
-- When the holder last proved a second factor on this key (fresh MFA for admin actions).
ALTER TABLE api_keys ADD COLUMN mfa_at INTEGER;
CREATE INDEX api_keys_by_user ON api_keys (user_id);

-- One-time recovery codes, as keyed hashes (HMAC under a master-key subkey).
CREATE TABLE recovery_codes (
    user_id    TEXT NOT NULL REFERENCES users(id),
    code_hash  TEXT NOT NULL,
    used_at    TEXT,
    PRIMARY KEY (user_id, code_hash)
);

CREATE TABLE groups (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    name       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE TABLE group_members (
    group_id  TEXT NOT NULL REFERENCES groups(id),
    user_id   TEXT NOT NULL REFERENCES users(id),
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_by_user ON group_members (user_id);

-- Tags (a JSON object of string → string) that tenant policies can match.
ALTER TABLE instances ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';

-- Identity anomalies; each also lands in the audit log.
CREATE TABLE alerts (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT,
    user_id     TEXT,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX alerts_by_tenant ON alerts (tenant_id, created_at);
-- Source addresses each identity has used, to notice a new one.
CREATE TABLE known_sources (
    user_id     TEXT NOT NULL,
    source      TEXT NOT NULL,
    first_seen  TEXT NOT NULL,
    PRIMARY KEY (user_id, source)
);
PRAGMA foreign_key_check;
COMMIT;
PRAGMA foreign_keys = ON;
