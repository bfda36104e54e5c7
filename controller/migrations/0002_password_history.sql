-- Earlier password hashes of each user, so a change cannot go back to a recent password.
CREATE TABLE password_history (
    user_id     TEXT NOT NULL REFERENCES users(id),
    hash        TEXT NOT NULL,
    replaced_at TEXT NOT NULL
);
CREATE INDEX password_history_by_user ON password_history (user_id, replaced_at);
