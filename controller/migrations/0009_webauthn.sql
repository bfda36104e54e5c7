-- WebAuthn security keys as a second factor (issue #3).
CREATE TABLE webauthn_credentials (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL REFERENCES users(id),
    -- base64url of the authenticator's credential id; one credential belongs to one account.
    credential_id  TEXT NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    -- The public key and signature counter (webauthn-rs `SecurityKey`, JSON). Not secret.
    security_key   TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    last_used_at   TEXT
);
CREATE INDEX webauthn_credentials_by_user ON webauthn_credentials (user_id);

-- Registrations and authentications under way: each answered once, within five minutes.
CREATE TABLE webauthn_ceremonies (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('register', 'authenticate')),
    -- webauthn-rs ceremony state (JSON): the challenge and the credentials it may be answered by.
    state       TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX webauthn_ceremonies_by_user ON webauthn_ceremonies (user_id);
