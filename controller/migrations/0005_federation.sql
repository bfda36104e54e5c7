-- Federation (issue #3): a tenant's own OpenID Connect provider.
CREATE TABLE tenant_oidc (
    tenant_id      TEXT PRIMARY KEY REFERENCES tenants(id),
    issuer         TEXT NOT NULL,
    client_id      TEXT NOT NULL,
    -- Sealed under the master key; NULL for a public client (PKCE only).
    client_secret  TEXT,
    groups_claim   TEXT NOT NULL,
    -- JSON object: claim value (an IdP group) -> tenant role.
    role_map       TEXT NOT NULL,
    default_role   TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);

-- Logins under way: started by a client, finished once with the code (single use, 10 min).
CREATE TABLE oidc_logins (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    state          TEXT NOT NULL,
    nonce          TEXT NOT NULL,
    verifier       TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    expires_at     INTEGER NOT NULL
);

-- A federated user is known by (issuer, subject), never by a name the provider could reuse.
ALTER TABLE users ADD COLUMN federated_subject TEXT;
CREATE UNIQUE INDEX users_by_federated_subject ON users (tenant_id, federated_subject);
