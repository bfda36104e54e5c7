-- User names differ in more than letter case: `ALICE@acme` next to `alice@acme` would be a
-- look-alike account. Logins still match the name exactly.
CREATE UNIQUE INDEX users_name_nocase ON users (name COLLATE NOCASE);
