-- Palisade controller state, first version (SQLite).

CREATE TABLE tenants (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    quota_instances   INTEGER NOT NULL,
    quota_vcpus       INTEGER NOT NULL,
    quota_memory_mib  INTEGER NOT NULL,
    created_at        TEXT NOT NULL
);

CREATE TABLE users (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE,
    tenant_id             TEXT REFERENCES tenants(id),
    role                  TEXT NOT NULL CHECK (role IN ('platform_admin', 'tenant_member')),
    password_hash         TEXT NOT NULL,
    must_change_password  INTEGER NOT NULL DEFAULT 1,
    created_at            TEXT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id),
    name        TEXT NOT NULL,
    public_key  TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

-- Nonces of accepted signed requests, kept a little longer than the signature window.
CREATE TABLE seen_nonces (
    key_id   TEXT NOT NULL,
    nonce    TEXT NOT NULL,
    seen_at  INTEGER NOT NULL,
    PRIMARY KEY (key_id, nonce)
);
CREATE INDEX seen_nonces_by_time ON seen_nonces (seen_at);

CREATE TABLE images (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    kernel_path    TEXT NOT NULL,
    kernel_sha256  TEXT NOT NULL,
    initrd_path    TEXT NOT NULL,
    initrd_sha256  TEXT NOT NULL,
    cmdline        TEXT NOT NULL,
    public         INTEGER NOT NULL,
    created_at     TEXT NOT NULL
);

-- desired: what the tenant asked for; state: what the reconciler last saw or is doing.
CREATE TABLE instances (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    name            TEXT NOT NULL,
    image_id        TEXT NOT NULL REFERENCES images(id),
    flavor          TEXT NOT NULL,
    vcpus           INTEGER NOT NULL,
    memory_mib      INTEGER NOT NULL,
    disk_gib        INTEGER NOT NULL,
    host            TEXT NOT NULL,
    desired         TEXT NOT NULL CHECK (desired IN ('running', 'stopped', 'deleted')),
    state           TEXT NOT NULL CHECK (state IN ('starting', 'running', 'stopping', 'stopped',
                                                   'deleting', 'deleted', 'error')),
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    deleted_at      TEXT,
    disk_erased_at  TEXT
);
CREATE INDEX instances_by_tenant ON instances (tenant_id, deleted_at);
